"""What an engine needs to serve an export: the per-layer rules and the Hook, checked against the model.

:func:`read_spec` reads an export directory (``hookmoe export --target vllm``) — ``config.json``,
``hookmoe_export.json``, ``plan.json`` and ``hook/`` — and resolves the plan against the served model's
own configuration. The model is built on the ``meta`` device (no weights, no memory), so the checks are
exactly hookmoe's (:meth:`hookmoe.routing.Plan.resolve`, the Hook's hidden size, layers and model
fingerprint) and cost well under a second even for Mixtral-8x7B shapes. Every failure is a
:class:`~hookmoe.errors.UserError` whose one sentence says what to re-run. No engine is imported here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hookmoe.errors import ArtifactError, PlanError

EXPORT_NAME = "hookmoe_export.json"  # same file name as hookmoe.hook's export manifest
ENGINE_KEY = "engine"  # key added to hookmoe_export.json by hookmoe.serving.export
ARCH_PREFIX = "Hookmoe"  # config.json architectures of an engine export: Hookmoe<vLLM class name>

# hookmoe architecture -> the vLLM model class an engine export names (with ARCH_PREFIX) and the attribute
# of a vLLM decoder layer holding the MoE block. Only architectures whose vLLM classes build their experts
# through FusedMoEFactory with a plain softmax router are listed.
VLLM_ARCHS: dict[str, tuple[str, str, str]] = {
    # arch: (vLLM module, vLLM class, MoE block attribute of a decoder layer)
    "mixtral": ("vllm.model_executor.models.mixtral", "MixtralForCausalLM", "block_sparse_moe"),
    "qwen2_moe": ("vllm.model_executor.models.qwen2_moe", "Qwen2MoeForCausalLM", "mlp"),
    "qwen3_moe": ("vllm.model_executor.models.qwen3_moe", "Qwen3MoeForCausalLM", "mlp"),
    "olmoe": ("vllm.model_executor.models.olmoe", "OlmoeForCausalLM", "mlp"),
    "deepseek_v2": ("vllm.model_executor.models.deepseek_v2", "DeepseekV2ForCausalLM", "mlp"),
}
# why the others are not served with a plan or a Hook (a uniform topk export still serves natively)
NOT_SERVED = {
    "deepseek_v3": "vLLM routes it with grouped top-k and a score-correction bias, which hookmoe's dynamic "
                   "rules do not reproduce yet",
    "granitemoe": "not wired into the vLLM plugin yet",
    "gpt_oss": "vLLM's GPT-OSS MoE uses its own fused router/kernels",
    "hookmoe_cmoe": "vLLM has no model class for hookmoe's converted (CMoE) models",
}


@dataclass
class ServingSpec:
    """The routing of one export, per MoE layer (decoder-layer indices), ready for an engine."""

    directory: Path
    arch: str
    rules: dict[int, Any]  # hookmoe.routing rule per MoE layer (Native | TopK | Dynamic)
    native_k: int
    num_experts: int
    renormalize: bool
    score: str
    hidden_size: int
    plan_text: str
    hook_manifest: dict | None = None  # hookmoe.hook.read_manifest() of hook/, or None
    warnings: list[str] = field(default_factory=list)

    @property
    def hook_layers(self) -> list[int]:
        return list(self.hook_manifest["_layers"]) if self.hook_manifest else []

    def top_k(self, layer: int) -> int:
        """The k an engine builds this layer with: the static k, or the candidate cap of a dynamic rule."""
        from hookmoe.routing.plan import Dynamic, TopK

        r = self.rules.get(layer)
        if isinstance(r, TopK):
            return r.k
        if isinstance(r, Dynamic):
            return r.max_k or self.native_k
        return self.native_k

    def dynamic(self, layer: int):
        from hookmoe.routing.plan import Dynamic

        r = self.rules.get(layer)
        return r if isinstance(r, Dynamic) else None

    @property
    def has_dynamic(self) -> bool:
        return any(self.dynamic(i) is not None for i in self.rules)

    def describe(self) -> dict:
        return {"arch": self.arch, "plan": self.plan_text,
                "k_per_layer": {i: self.top_k(i) for i in sorted(self.rules)},
                "dynamic": {i: r.describe() for i in sorted(self.rules) if (r := self.dynamic(i)) is not None},
                "hook_layers": self.hook_layers}


def read_export_manifest(directory: str | Path) -> dict | None:
    """``hookmoe_export.json`` of ``directory`` (None when absent); ArtifactError when unreadable."""
    f = Path(directory) / EXPORT_NAME
    if not f.is_file():
        return None
    try:
        m = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{f} is corrupt (not valid JSON); re-run `hookmoe export`") from None
    if not isinstance(m, dict):
        raise ArtifactError(f"{f} is corrupt (not a JSON object); re-run `hookmoe export`")
    return m


def meta_moe_model(config):
    """A :class:`hookmoe.models.MoEModel` of ``config`` built on the meta device (no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hookmoe.models.moe_model import MoEModel

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return MoEModel(model, None, source="<meta>")


def read_spec(directory: str | Path, config=None) -> ServingSpec:
    """Read and check the plan and Hook of an engine export against its own ``config.json``.

    ``config``: the model's transformers config as the engine loaded it (default: read from
    ``directory``). Raises ArtifactError / PlanError with one sentence.
    """
    from hookmoe.routing.plan import Dynamic, Plan

    d = Path(directory)
    m = read_export_manifest(d)
    if m is None:
        raise ArtifactError(f"{d} has no {EXPORT_NAME}: export it with `hookmoe export MODEL --target vllm`")
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(d))
    mm = meta_moe_model(config)
    plan_file = d / (m.get("plan") or "plan.json")
    if not plan_file.is_file():
        raise ArtifactError(f"export {d} lacks its plan ({plan_file.name}); re-export with `hookmoe export --plan`")
    plan = Plan.parse(plan_file)
    base = m.get("base_model") or {}
    try:
        rules = plan.resolve(mm)
    except PlanError as e:
        raise PlanError(f"the plan in {plan_file} does not fit this {mm.arch} model "
                        f"({str(e).rstrip('.')}); re-export with a --plan made for it") from None
    for i, r in rules.items():
        if isinstance(r, Dynamic) and not r.calibrated:
            raise PlanError(f"plan rule '{r.describe()}' in {plan_file} is not calibrated; re-export with a "
                            "calibrated --plan (e.g. naee:0.3 or entropy:t=1.2/1.6)")
    hook_manifest = None
    if m.get("hook"):
        hook_manifest = _check_hook(d / m["hook"], mm, base)
    return ServingSpec(directory=d, arch=mm.arch, rules=rules, native_k=mm.native_top_k,
                       num_experts=mm.num_experts, renormalize=mm.renormalize, score=mm.adapter.score,
                       hidden_size=int(config.hidden_size), plan_text=Plan(base=plan.base, layers=plan.layers).describe(), hook_manifest=hook_manifest)


def _check_hook(hook_dir: Path, mm, base: dict) -> dict:
    """The Hook manifest, checked like :func:`hookmoe.hook.attach_hooks` does, and its weights verified."""
    from hookmoe.hook.artifact import read_manifest, read_weights

    try:
        hm = read_manifest(hook_dir)
        read_weights(hook_dir, hm)  # checksum, keys, shapes, finite values
    except ArtifactError as e:
        raise ArtifactError(f"{str(e).rstrip('.')}; re-export with `hookmoe export --hook DIR`") from None
    hidden = int(mm.config.hidden_size)
    hb = hm.get("base_model") or {}
    if hm["_hidden"] != hidden:
        raise ArtifactError(f"the Hook in {hook_dir} was trained for hidden size {hm['_hidden']} "
                            f"({hb.get('arch', '?')}) but this model has {hidden}; re-export with `hookmoe export "
                            "--hook DIR` for this model")
    fp = hb.get("fingerprint")
    if fp and fp != mm.fingerprint():
        raise ArtifactError(f"the Hook in {hook_dir} was trained for another model ({hb.get('arch', '?')} "
                            f"{hb.get('source', '?')}); re-export with `hookmoe export --hook DIR` for this model")
    for i in hm["_layers"]:
        if i not in mm.moe_layer_indices:
            raise ArtifactError(f"the Hook in {hook_dir} hooks layer {i}, which is not an MoE layer of this model; "
                                "re-export with `hookmoe export --hook DIR` for this model")
    return hm


__all__ = ["ServingSpec", "read_spec", "read_export_manifest", "meta_moe_model", "VLLM_ARCHS", "NOT_SERVED",
           "ARCH_PREFIX", "EXPORT_NAME", "ENGINE_KEY"]
