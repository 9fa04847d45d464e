"""hookmoe: run MoE LLMs with fewer experts, win the quality back with a trained Hook.

    import hookmoe
    mm = hookmoe.load("tiny:mixtral")            # or a hub id, a local dir, a .gguf file
    with mm.routing("topk:1") as patch: ...       # see hookmoe.routing for plans
"""

from .errors import ArtifactError, ModelError, PlanError, UserError
from .models import MoEModel, load
from .routing import Plan, apply_plan

__version__ = "0.1.0"
__all__ = ["load", "MoEModel", "Plan", "apply_plan", "UserError", "ModelError", "PlanError", "ArtifactError"]
