"""hookmoe's vLLM plugin: serve an export's per-layer k, dynamic rules and Hooks in vLLM.

Installed with ``pip install hookmoe[vllm]``; vLLM finds it through the ``vllm.general_plugins`` entry
point ``hookmoe = hookmoe.serving.vllm_plugin:register`` and calls :func:`register` in every process
(API server, engine core, workers). This module imports vLLM only inside functions, so hookmoe imports
without vLLM.

What :func:`register` does:

* registers ``Hookmoe<Class>`` (e.g. ``HookmoeMixtralForCausalLM``) for every architecture of
  :data:`hookmoe.serving.spec.VLLM_ARCHS` with ``ModelRegistry.register_model`` (lazily, as a
  ``module:Class`` string) — the names ``hookmoe export --target vllm`` writes into ``config.json``;
* adds a config check for those names to vLLM's per-architecture config hooks, which vLLM runs in the
  front-end process while it builds its configuration: a bad export (missing or corrupt Hook weights, a
  plan or Hook made for another model, an uncalibrated rule) stops ``vllm serve`` right there with
  hookmoe's one-line reason (``error: ...``, exit status 2) and ``vllm.LLM(OUT)`` with a
  :class:`hookmoe.errors.UserError`, before any engine process starts.

The model classes themselves are in :mod:`hookmoe.serving.vllm_models`.
"""

from __future__ import annotations

import logging
import os
import sys

from hookmoe.serving.spec import ARCH_PREFIX, VLLM_ARCHS

logger = logging.getLogger("vllm.hookmoe")  # a child of vLLM's own logger: same handler and format

_registered = False


def architectures() -> dict[str, str]:
    """``Hookmoe<Class>`` -> ``module:Class`` of the plugin's model classes."""
    return {ARCH_PREFIX + cls: f"hookmoe.serving.vllm_models:{ARCH_PREFIX + cls}" for _, cls, _ in VLLM_ARCHS.values()}


def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent; vLLM may call it more than once per process)."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    for name, target in architectures().items():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, target)
    try:
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP

        check = _config_check_class()
        for name in architectures():
            MODELS_CONFIG_MAP.setdefault(name, check)
    except ImportError:  # pragma: no cover - older vLLM: the check then runs when the model is built
        logger.warning("hookmoe: this vLLM has no per-architecture config hooks; a bad export fails at model build")
    _registered = True


def model_directory(model_config) -> str:
    """The local directory of the served model (downloads hookmoe's small files for a hub id)."""
    path = str(model_config.model)
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, revision=getattr(model_config, "revision", None),
                                 allow_patterns=["config.json", "hookmoe_export.json", "plan.json", "hook/*"])
    except Exception as e:  # hub errors come in many types
        from hookmoe.errors import ArtifactError

        raise ArtifactError(f"cannot read hookmoe's files of '{path}' ({type(e).__name__})") from None


def _is_cli() -> bool:
    """True in a vLLM command's own process: ``vllm serve ...`` or ``python -m vllm.entrypoints...``."""
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None) or ""
    return os.path.basename(sys.argv[0] or "") == "vllm" or name.startswith("vllm.entrypoints")


def check_export(model_config):
    """:func:`hookmoe.serving.read_spec` of the served model; on a bad export, ``vllm serve`` prints one
    ``error:`` line and exits 2, library callers get the :class:`~hookmoe.errors.UserError`."""
    from hookmoe.errors import UserError
    from hookmoe.serving.spec import read_spec

    try:
        # the config as written in the export (vLLM may adjust its own copy of the HF config)
        return read_spec(model_directory(model_config))
    except UserError as e:
        if _is_cli():
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        raise


def _verify(vllm_config) -> None:
    spec = check_export(vllm_config.model_config)
    warn_dynamic(spec)
    logger.info("hookmoe: serving %s with plan %s (k per layer %s, Hooks at %s)", spec.arch, spec.plan_text,
                spec.describe()["k_per_layer"], spec.hook_layers or "none")


def warn_dynamic(spec) -> None:
    """The documented warning for dynamic rules: vLLM's fused-MoE kernels still compute dropped slots."""
    if spec.has_dynamic:
        import warnings

        msg = ("hookmoe: dynamic routing rules run through vLLM's custom routing function; dropped slots get "
               "weight 0 but vLLM's fused-MoE kernels still compute them, so they save no time in vLLM "
               "(see docs/serving.md)")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        logger.warning(msg)


def _config_check_class():
    """vLLM's per-architecture config hook for ``Hookmoe*`` models (built here: vLLM is imported lazily)."""
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    return type("HookmoeConfigCheck", (VerifyAndUpdateConfig,),
                {"verify_and_update_config": staticmethod(_verify), "__module__": __name__})


__all__ = ["register", "architectures", "check_export", "model_directory"]
