"""The ``hookmoe`` model type of lm-evaluation-harness: an ``HFLM`` that routes with a plan, carries Hooks, and
counts Act on real tokens.

Importing this module registers it (``@register_model("hookmoe")``); ``import hookmoe`` does not (lm-eval is an
optional extra and heavy to import). lm-eval (>= 0.4.13) has no plugin discovery, so:

* command line: ``python -m hookmoe.lm_eval --model hookmoe --model_args pretrained=MODEL,plan=PLAN,hook=DIR
  --tasks arc_easy`` — every option of ``lm-eval run`` works (batching, ``--device``, ``parallelize=True``,
  ``device_map``, ``accelerate launch -m hookmoe.lm_eval ...`` for data parallelism);
* Python: ``import hookmoe.lm_eval_model`` then ``lm_eval.simple_evaluate(model="hookmoe", model_args=...)``,
  or pass an instance: ``simple_evaluate(model=HookMoELM(pretrained=mm), ...)``.

``model_args`` (besides every ``HFLM`` argument: ``dtype``, ``device``, ``parallelize``, ``device_map``,
``max_memory_per_gpu``, ``max_length``, ``add_bos_token``, ...):

``pretrained``  any hookmoe MODEL: hub id, local directory, ``.gguf`` file, ``tiny:<arch>``, a directory written by
                ``hookmoe export`` (its plan and Hook are used unless given) — or a loaded
                :class:`~hookmoe.models.MoEModel` / ``nn.Module`` (Python only).
``plan``        a routing plan (default: the Hook's training plan, else ``native``). lm-eval splits model_args at
                commas, so ``plan=tlnle:k=2,l=16`` arrives as ``plan=tlnle:k=2`` + ``l=16``: the plan options
                ``k``, ``l``, ``r``, ``max``, ``renorm`` are joined back onto the plan. Quote plans whose commas
                separate values (``plan='layers:2,2,1,1'``) or use a plan JSON file.
``hook``        a Hook artifact directory to attach.
``calib``, ``calib_blocks``, ``calib_len``, ``act``
                dynamic rules that need fitting (``naee``, ``entropy:ACT``, or any dynamic rule with ``act=A``) are
                calibrated first on ``calib_blocks`` x ``calib_len`` tokens of the ``train`` split of ``calib``
                (default ``builtin``), as ``hookmoe eval`` does.
``seed``        the seed of ``tiny:<arch>`` weights and of the calibration sample.
``dtype``       default as ``hookmoe eval``: bfloat16 on a GPU, float32 otherwise (lm-eval's ``auto`` would take the
                checkpoint's dtype).
``add_bos_token`` default: True iff the tokenizer's own call starts with BOS (then no other special tokens are
                added; lm-eval's default would add whatever the tokenizer adds, e.g. an EOS after every context).

Act is counted on real tokens only: ``HFLM`` right-pads a batch of log-likelihood requests and calls the model
without an attention mask; this class records the unpadded lengths where lm-eval pads (its ``pad_and_concat``)
and passes the matching attention mask with the batch, which the routing patch reads (padding positions never
count; the logits of real positions are those of the unpadded sequences — right padding is invisible to causal
attention). Batch-size probing (``batch_size=auto``) is not counted. Generation passes lm-eval's own mask.
Results: ``results["config"]`` carries ``act``, ``act_per_layer`` and ``hookmoe`` (plan, rules, counted tokens,
params, hook); under data parallelism the counts of all ranks are summed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

try:
    import lm_eval.models.huggingface as _hf
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - exercised only without the extra
    from hookmoe.errors import UserError

    raise UserError("the lm-eval model needs lm-evaluation-harness: run `pip install hookmoe[eval]` "
                    "(or `pip install lm-eval`)") from e

from hookmoe.errors import ModelError, UserError
from hookmoe.models.adapters import ADAPTERS
from hookmoe.models.moe_model import MoEModel
from hookmoe.models.tiny import build_tiny, tiny_config, tiny_tokenizer

#: plan options lm-eval's comma split separates from ``plan=...``
PLAN_OPTION_KEYS = ("k", "l", "r", "max", "renorm")
EXPORT_MANIFEST = "hookmoe_export.json"
_REPORTS: list[dict] = []  # the Act results of finished evaluations in this process (the last 16)


def reports() -> list[dict]:
    """Act results (:meth:`HookMoELM.act_result`) of the evaluations finished in this process, oldest first."""
    return list(_REPORTS)


def _rejoin_plan(plan: Any, kwargs: dict) -> Any:
    stray = [k for k in list(kwargs) if k in PLAN_OPTION_KEYS]
    if not stray:
        return plan
    if plan is None:
        raise UserError(f"model_args has {', '.join(f'{k}=' for k in stray)} but no plan= (plan options follow the "
                        "plan, e.g. plan=tlnle:k=2,l=16)")
    text = str(plan)
    for k in stray:
        text += f",{k}={kwargs.pop(k)}"
    return text


def _tiny_arch(spec: Any) -> str | None:
    if isinstance(spec, str) and spec.startswith("tiny:"):
        arch = spec.split(":", 1)[1]
        if arch not in ADAPTERS or not ADAPTERS[arch].tiny:
            raise ModelError(f"unknown tiny architecture '{arch}'")
        return arch
    return None


def _mask_from_lengths(lengths: list[int], width: int, side: str, device) -> torch.Tensor | None:
    """[batch, width] 1/0 mask of real positions; None when nothing is padded."""
    if all(n >= width for n in lengths):
        return None
    pos = torch.arange(width, device=device).unsqueeze(0)
    n = torch.tensor(lengths, device=device).unsqueeze(1)
    mask = pos < n if side == "right" else pos >= (width - n)
    return mask.long()


def _hooks_to_block_devices(mm, hs) -> None:
    """Each Hook on its block's device (``attach_hooks`` uses the first parameter's; with a device_map the layers
    are spread over several devices)."""
    for i, h in hs.hooks.items():
        w = next(mm.layer(i).router.parameters(), None)
        if w is not None and w.device.type != "meta":
            h.to(w.device)


@register_model("hookmoe")
class HookMoELM(HFLM):
    """lm-eval's HF model with a hookmoe routing plan, Hooks, and Act per layer on real tokens."""

    def __init__(self, pretrained: Any = None, plan: Any = None, hook: str | Path | None = None,
                 calib: str = "builtin", calib_blocks: int = 8, calib_len: int = 256, act: float | None = None,
                 seed: int = 0, **kwargs) -> None:
        from hookmoe.hook.inject import attach_hooks

        if pretrained is None:
            raise UserError("the hookmoe lm-eval model needs pretrained=MODEL (e.g. pretrained=tiny:mixtral)")
        plan = _rejoin_plan(plan, kwargs)
        self._hookmoe_seed = int(seed)
        self._hookmoe_spec: str | None = None
        self._global_counts: tuple[float, dict[int, float]] | None = None
        self._pad_lengths: tuple[list[int], str] | None = None
        if kwargs.get("device") in (None, "auto"):
            kwargs["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        own_routing = True
        if isinstance(pretrained, MoEModel):
            mm = pretrained
            if mm.tokenizer is None and kwargs.get("tokenizer") is None:
                raise UserError("lm-eval needs a tokenizer, and this model has none")
            kwargs.setdefault("tokenizer", mm.tokenizer)
            super().__init__(pretrained=mm.model, **kwargs)
            self.mm = mm
            own_routing = plan is not None  # a pre-loaded model keeps the routing its owner manages
        elif isinstance(pretrained, torch.nn.Module):
            super().__init__(pretrained=pretrained, **kwargs)
            self.mm = MoEModel(self.model, self.tokenizer)
        else:
            spec = str(pretrained)
            from hookmoe.models.loading import OFFLINE_MODELS, offline_gguf

            if spec in OFFLINE_MODELS:
                spec = str(offline_gguf(spec))
            path = Path(spec).expanduser()
            if path.suffix == ".gguf":
                if not path.is_file():
                    raise ModelError(f"GGUF file not found: {spec}")
                kwargs.setdefault("gguf_file", path.name)
                spec = str(path.parent)
            elif not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
                raise ModelError(f"model path not found: {spec}")
            elif (path / EXPORT_MANIFEST).is_file():  # hookmoe export: base model + plan + hook
                if hook is None and (path / "hook").is_dir():
                    hook = path / "hook"
                if plan is None and (path / "plan.json").is_file():
                    plan = path / "plan.json"
            self._hookmoe_spec = spec
            if kwargs.get("dtype") in (None, "auto"):  # hookmoe's default (as `hookmoe eval`): bf16 on GPU, else fp32
                kwargs["dtype"] = "bfloat16" if str(kwargs["device"]).startswith("cuda") else "float32"
            super().__init__(pretrained=spec, **kwargs)
            self.mm = MoEModel(self.model, self.tokenizer, source=str(pretrained))
        if kwargs.get("add_bos_token") is None:
            # as `hookmoe eval`: BOS iff the tokenizer's own call adds it, and never other special tokens (lm-eval's
            # default would let e.g. a byte-level tokenizer append EOS to every context)
            from hookmoe.data.blocks import needs_bos

            self.add_bos_token = needs_bos(self.tokenizer)
        if hook is not None:
            hs = attach_hooks(self.mm, hook)
            _hooks_to_block_devices(self.mm, hs)
            if plan is None and hs.plan is not None:
                plan = hs.plan
        if own_routing:
            plan = self._calibrated(plan if plan is not None else "native", calib, calib_blocks, calib_len, act)
            self.mm.active_plan = self.mm.routing(plan)

    # ---- loading tiny:<arch> and hookmoe specs through HFLM's own (device_map / accelerate) path ----------
    def _get_config(self, pretrained: str, **kw) -> None:
        arch = _tiny_arch(pretrained)
        if arch is not None:
            self._config = tiny_config(arch)
            return
        try:
            from hookmoe.models.loading import _register_converted_type

            _register_converted_type()
        except ImportError:  # pragma: no cover
            pass
        try:
            super()._get_config(pretrained, **kw)
        except (OSError, ValueError, KeyError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"cannot load model '{pretrained}': {msg}") from e
        mt = getattr(self._config, "model_type", None)
        if mt not in ADAPTERS:
            raise ModelError(f"'{mt}' is not a supported MoE architecture (supported: "
                             f"{', '.join(a for a in ADAPTERS if ADAPTERS[a].tiny)})")

    def _create_tokenizer(self, pretrained, tokenizer, **kw) -> None:
        if not tokenizer and _tiny_arch(pretrained) is not None:
            self.tokenizer = tiny_tokenizer()
            return
        try:
            super()._create_tokenizer(pretrained, tokenizer, **kw)
        except (OSError, ValueError, TypeError, AttributeError):
            if tokenizer or not isinstance(pretrained, str):
                raise
            from hookmoe.models.loading import _load_tokenizer

            tok = _load_tokenizer(pretrained)
            if tok is None:
                raise ModelError(f"cannot load a tokenizer for '{pretrained}'") from None
            self.tokenizer = tok

    def _create_model(self, pretrained: str, dtype: Any = "auto", **kw) -> None:
        arch = _tiny_arch(pretrained)
        if arch is None:
            super()._create_model(pretrained, dtype=dtype, **kw)
            return
        from lm_eval.models.utils_hf import get_dtype

        model = build_tiny(arch, seed=self._hookmoe_seed)
        dt = torch.float32 if dtype in (None, "auto") else get_dtype(dtype)
        self._model = model.to(self.device, dt)

    # ---- dynamic plans that need fitting -----------------------------------------------------------------
    def _calibrated(self, plan: Any, calib: str, n_blocks: int, block_len: int, act: float | None) -> Any:
        from hookmoe.eval.scope import _has_dynamic, needs_calibration

        if not (needs_calibration(self.mm, plan) or (act is not None and _has_dynamic(self.mm, plan))):
            return plan
        from hookmoe.data.blocks import make_blocks
        from hookmoe.routing.calibrate import calibrate_plan

        blocks = make_blocks(self.tokenizer, calib, int(n_blocks), int(block_len), seed=self._hookmoe_seed,
                             split="train", progress=False)
        return calibrate_plan(self.mm, plan, blocks, target_act=act, batch_size=self.batch_size_per_gpu
                              if isinstance(self.batch_size_per_gpu, int) else 8)

    # ---- counting on real tokens -------------------------------------------------------------------------
    def _patch(self):
        p = getattr(self.mm, "_routing_patch", None)
        return p if p is not None and getattr(p, "_active", False) else None

    @contextlib.contextmanager
    def _recording_padding(self):
        """While inside, lm-eval's ``pad_and_concat`` reports the unpadded lengths of each batch it builds."""
        original = getattr(_hf, "pad_and_concat", None)
        if original is None:  # a future lm-eval that pads elsewhere: count every position, and say so once
            if not getattr(HookMoELM, "_warned_padding", False):
                HookMoELM._warned_padding = True
                import logging

                logging.getLogger(__name__).warning(
                    "this lm-eval version does not pad through pad_and_concat; Act may include padding")
            yield
            return

        def recording(max_length, tensors, padding_side="right"):
            lengths = [int(t.shape[-1]) for t in tensors]
            out = original(max_length, tensors, padding_side=padding_side)
            self._pad_lengths = (lengths, padding_side)
            return out

        _hf.pad_and_concat = recording
        try:
            yield
        finally:
            _hf.pad_and_concat = original
            self._pad_lengths = None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        with self._recording_padding():
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        pending, self._pad_lengths = self._pad_lengths, None
        if attn_mask is None and labels is None and pending is not None and len(pending[0]) == inps.shape[0]:
            mask = _mask_from_lengths(pending[0], inps.shape[1], pending[1], inps.device)
            if mask is not None:
                with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                                     enabled=self.mixed_precision_dtype is not None):
                    return self.model(inps, attention_mask=mask).logits
        return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _detect_batch_size(self, requests=None, pos: int = 0):
        from hookmoe.routing.stats import RoutingStats

        patch = self._patch()
        if patch is None:
            return super()._detect_batch_size(requests, pos)
        saved = patch.stats
        patch.stats = RoutingStats(self.mm.moe_layer_indices, self.mm.num_experts)  # probes are not counted
        try:
            return super()._detect_batch_size(requests, pos)
        finally:
            patch.stats = saved

    # ---- data parallelism: sum the counts of every rank after each request type ------------------------------
    def _sync_counts(self) -> None:
        if self.world_size <= 1:
            return
        patch = self._patch()
        layers = self.mm.moe_layer_indices
        if patch is None:
            local = torch.zeros(1 + len(layers), dtype=torch.float64, device=self.device)
        else:
            st = patch.stats
            tokens = st.tokens
            per = st.act_per_layer()
            local = torch.tensor([tokens] + [per.get(i, 0.0) * tokens for i in layers], dtype=torch.float64,
                                 device=self.device)
        total = self.all_gather(local.unsqueeze(0)).sum(0).tolist()
        self._global_counts = (total[0], {i: total[1 + j] for j, i in enumerate(layers)})

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        out = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        self._sync_counts()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        out = super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        self._sync_counts()
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = super().generate_until(requests, disable_tqdm=disable_tqdm)
        self._sync_counts()
        return out

    # ---- results -----------------------------------------------------------------------------------------
    def act_result(self) -> dict:
        """Plan, rules, Act (overall and per MoE layer), counted tokens, params and Hooks of this evaluation."""
        from hookmoe.eval.scope import finish_result

        patch = self._patch()
        if patch is None:
            return {"act": None, "act_per_layer": {}, "tokens": 0}
        if self._global_counts is not None:
            tokens, kept = self._global_counts
            per = {i: k / tokens for i, k in kept.items()} if tokens else {}
        else:
            tokens, per = patch.stats.tokens, patch.stats.act_per_layer()
        return finish_result(self.mm, patch, {"tokens": tokens}, act_per_layer=per)

    def reset_act(self) -> None:
        """Start counting afresh (e.g. between two ``simple_evaluate`` calls on one instance)."""
        patch = self._patch()
        if patch is not None:
            patch.stats.reset()
        self._global_counts = None

    def get_model_info(self) -> dict:
        spec = self._hookmoe_spec
        local = spec is None or _tiny_arch(spec) is not None or Path(spec).expanduser().exists()
        if local:  # no hub lookup for models that are not on the hub
            info = {"model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                    "model_dtype": str(next(self._model.parameters()).dtype)}
        else:
            info = super().get_model_info()
        r = self.act_result()
        if self.rank == 0:
            _REPORTS.append(r)
            del _REPORTS[:-16]
        info["act"] = r.get("act")
        info["act_per_layer"] = r.get("act_per_layer", {})
        info["hookmoe"] = {k: r[k] for k in ("plan", "plan_json", "rules", "tokens", "native_top_k", "params", "hook")
                           if k in r}
        return info
