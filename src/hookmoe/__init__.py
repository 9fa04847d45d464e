"""hookmoe: run MoE LLMs with fewer experts, win the quality back with a trained Hook.

    import hookmoe
    mm = hookmoe.load("tiny:mixtral")            # or a hub id, a local dir, a .gguf file
    with mm.routing("topk:1") as patch: ...       # see hookmoe.routing for plans
"""

from hookmoe._version import __version__

from hookmoe.errors import ArtifactError, ModelError, PlanError, UserError
from hookmoe.hook import load
from hookmoe.models import MoEModel
from hookmoe.routing import Plan, apply_plan

__all__ = ["load", "MoEModel", "Plan", "apply_plan", "UserError", "ModelError", "PlanError", "ArtifactError",
           "__version__"]
