"""Routing plans: how many experts each MoE layer runs, applied through one patch point.

The patch point
---------------
Every supported MoE block calls its router (``block.gate`` or ``block.router``), which reads
``self.top_k`` on each call and returns ``(logits, top-k weights, top-k indices)``; the block then hands
weights and indices to its experts. hookmoe changes routing only there:

* a **static** rule (``topk``, ``tlnle``, ``layers``) sets ``router.top_k`` — the architecture's own
  code then selects and (re)normalises exactly as if the model had been built with that k;
* a **dynamic** rule (``topp``, ``ratio``, ``naee``, ``entropy``) lets the router select its usual
  ``max_k`` candidates and a forward hook on the router drops slots per token. A dropped slot gets weight
  0 and — on the ``grouped_mm`` experts path — the sentinel index ``num_experts`` so it is never computed.
  Kept weights follow the architecture's semantics (``renorm=native``: renormalising architectures
  rescale the kept weights to the original total) or stay as the router gave them (``renorm=keep``);
* every call is counted (Act per layer; padding excluded; gradient-checkpoint recomputation excluded).

Plan syntax (``Plan.parse``)
----------------------------
``native``                       the model's own routing
``topk:K``                       top-K in every MoE layer
``tlnle:k=K,l=L[,r=R]``          top-K below layer L, top-(K-1) in layers L..R (R defaults to the last
                                 layer); ``k`` defaults to the native k. ``tlnle:k=2,l=16`` = top-2 in
                                 layers 0-15, top-1 from layer 16 up (the paper's TLNLE(2,16)).
``layers:K0,K1,...``             one k per MoE layer (or per decoder layer; dense layers' entries ignored)
``topp:T``                       D2D top-p: the shortest prefix of the sorted probabilities whose sum
                                 reaches T (crossing expert included)
``ratio:T``                      MoED max-ratio: keep expert i iff p_i >= (1-T) * max_j p_j
``naee[:B]``                     NAEE: skip the j-th candidate iff p_j < B * p_1 (B per layer from
                                 calibration, or one value for all layers)
``entropy:ACT`` / ``entropy:t=a/b/..``  k from the routing entropy: 1 + #thresholds below the entropy
                                 (thresholds calibrated to reach Act = ACT, or given)
Dynamic rules take options ``,max=K`` (candidate cap, default native k) and ``,renorm=native|keep``;
``topp`` and ``ratio`` thresholds may change linearly with depth: ``topp:0.7..0.4``.
A JSON file: ``{"format": "hookmoe-plan/1", "base": "<plan string>", "layers": {"16-31": "topk:1",
"3": "naee:0.4"}}`` — per-layer entries override the base.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union


from hookmoe.errors import PlanError


RENORM_MODES = ("native", "keep")

#: How a plan is spelled on the command line (the help of every ``--plan`` option).
PLAN_HELP = "native | topk:K | tlnle:k=K,l=L | layers:K0,K1,.. | topp:T | ratio:T | naee[:B] | entropy:ACT | plan.json"


@dataclass(frozen=True)
class Native:
    def describe(self) -> str:
        return "native"


@dataclass(frozen=True)
class TopK:
    k: int

    def describe(self) -> str:
        return f"topk:{self.k}"


@dataclass(frozen=True)
class Dynamic:
    """A per-token rule over the router's ``max_k`` candidates, sorted by probability."""

    kind: str  # topp | ratio | naee | entropy
    value: float | None = None  # tau (topp/ratio), beta (naee), target Act (entropy, uncalibrated)
    thresholds: tuple[float, ...] | None = None  # entropy thresholds (ascending)
    max_k: int | None = None
    renorm: str = "native"

    def describe(self) -> str:
        if self.kind == "entropy" and self.thresholds is not None:
            s = "entropy:t=" + "/".join(f"{t:.6g}" for t in self.thresholds)
        elif self.value is None:
            s = self.kind
        else:
            s = f"{self.kind}:{self.value:.6g}"
        if self.max_k is not None:
            s += f",max={self.max_k}"
        if self.renorm != "native":
            s += f",renorm={self.renorm}"
        return s

    @property
    def calibrated(self) -> bool:
        if self.kind == "naee":
            return self.value is not None
        if self.kind == "entropy":
            return self.thresholds is not None
        return True


Rule = Union[Native, TopK, Dynamic]


def _float(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise PlanError(f"{what} must be a number, got '{text}'") from None
    if not math.isfinite(v):
        raise PlanError(f"{what} must be finite, got '{text}'")
    return v


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise PlanError(f"{what} must be a whole number, got '{text}'") from None


def _tau(text: str, kind: str) -> float:
    v = _float(text, f"{kind} threshold")
    if not 0.0 < v <= 1.0:
        raise PlanError(f"{kind} threshold must be in (0, 1], got {v:g}")
    return v


def _options(parts: list[str], allowed: set[str], kind: str) -> dict[str, str]:
    opts = {}
    for p in parts:
        if "=" not in p:
            raise PlanError(f"malformed option '{p}' in {kind} plan (expected key=value)")
        key, val = (x.strip() for x in p.split("=", 1))
        if key not in allowed:
            raise PlanError(f"unknown option '{key}' for {kind} (allowed: {', '.join(sorted(allowed))})")
        opts[key] = val
    return opts


#: Keys of a plan file and their JSON types (anything else is refused with its name).
PLAN_SCHEMA = {"format": str, "base": str, "layers": (dict, type(None)), "name": (str, type(None)),
               "meta": (dict, type(None))}


@dataclass
class Plan:
    """A routing plan: a base rule set plus per-layer overrides, resolved against a model on apply."""

    base: str = "native"
    layers: dict[str, str] = field(default_factory=dict)  # "lo-hi" or "i" -> per-layer rule string
    name: str | None = None
    meta: dict = field(default_factory=dict)

    # ---- parsing -------------------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: Any) -> "Plan":
        if isinstance(spec, Plan):
            return spec
        if spec is None:
            return cls()
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        if isinstance(spec, Path) or (isinstance(spec, str) and spec.strip().endswith(".json")):
            from hookmoe.files import read_json_file

            path = Path(spec)
            data = read_json_file(path, what="plan file", error=PlanError)
            return cls.from_dict(data, name=path.stem, where=f"plan file {path}")
        if not isinstance(spec, str) or not spec.strip():
            raise PlanError("empty routing plan")
        plan = cls(base=spec.strip())
        plan._check_syntax()
        return plan

    @classmethod
    def from_dict(cls, data: dict, name: str | None = None, where: str = "plan") -> "Plan":
        from hookmoe.files import check_keys

        check_keys(data, PLAN_SCHEMA, where=where, error=PlanError)  # a misspelt key is refused, not ignored
        fmt = data.get("format", "hookmoe-plan/1")
        if fmt != "hookmoe-plan/1":
            raise PlanError(f"unsupported plan format '{fmt}' (expected hookmoe-plan/1)")
        layers = data.get("layers", {}) or {}
        if not isinstance(layers, dict) or not all(isinstance(v, str) for v in layers.values()):
            raise PlanError("plan 'layers' must map layer ranges to rule strings, e.g. {\"16-31\": \"topk:1\"}")
        plan = cls(base=str(data.get("base", "native")), layers={str(k): v for k, v in layers.items()},
                   name=data.get("name", name), meta=dict(data.get("meta") or {}))
        plan._check_syntax()
        return plan

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"format": "hookmoe-plan/1", "base": self.base}
        if self.layers:
            d["layers"] = dict(self.layers)
        if self.name:
            d["name"] = self.name
        if self.meta:
            d["meta"] = self.meta
        return d

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        from hookmoe.files import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def describe(self) -> str:
        if self.name:
            return self.name
        if not self.layers:
            return self.base
        return self.base + " + " + ", ".join(f"{k}:{v}" for k, v in self.layers.items())

    def _check_syntax(self) -> None:
        _parse_base(self.base)  # raises PlanError
        for sel, rule in self.layers.items():
            _parse_selector(sel)
            _parse_rule(rule)

    # ---- resolution ----------------------------------------------------------------------------
    def resolve(self, mm) -> dict[int, Rule]:
        """Concrete rule per MoE layer (decoder-layer index) of ``mm``, validated against the model."""
        moe_idx = mm.moe_layer_indices
        kind, args = _parse_base(self.base)
        rules: dict[int, Rule]
        if kind == "native":
            rules = {i: Native() for i in moe_idx}
        elif kind == "topk":
            rules = {i: TopK(args["k"]) for i in moe_idx}
        elif kind == "tlnle":
            k = args.get("k") or mm.native_top_k
            lo = args["l"]
            hi = args.get("r", mm.num_layers - 1)
            _check_layer(lo, mm, "tlnle l")
            _check_layer(hi, mm, "tlnle r")
            if hi < lo:
                raise PlanError(f"tlnle needs l <= r, got l={lo}, r={hi}")
            if k - 1 < 1:
                raise PlanError(f"tlnle with k={k} would leave layers with 0 experts (need k >= 2)")
            rules = {i: TopK(k - 1 if lo <= i <= hi else k) for i in moe_idx}
        elif kind == "layers":
            ks = args["ks"]
            if len(ks) == len(moe_idx):
                rules = {i: TopK(k) for i, k in zip(moe_idx, ks)}
            elif len(ks) == mm.num_layers:
                rules = {i: TopK(ks[i]) for i in moe_idx}
            else:
                raise PlanError(
                    f"layers: plan has {len(ks)} entries but the model has {len(moe_idx)} MoE layers "
                    f"({mm.num_layers} decoder layers); give one k per MoE layer"
                )
        else:  # dynamic with an optional depth schedule
            rule, sched = args["rule"], args.get("schedule")
            rules = {}
            for pos, i in enumerate(moe_idx):
                r = rule
                if sched is not None:
                    a, b = sched
                    frac = pos / max(1, len(moe_idx) - 1)
                    r = replace(rule, value=a + (b - a) * frac)
                rules[i] = r
        for sel, text in self.layers.items():
            lo, hi = _parse_selector(sel)
            _check_layer(lo, mm, "plan layer")
            _check_layer(hi, mm, "plan layer")
            rule = _parse_rule(text)
            for i in moe_idx:
                if lo <= i <= hi:
                    rules[i] = rule
        for i, r in rules.items():
            _validate_rule(r, mm, i)
        return rules


def _check_layer(i: int, mm, what: str) -> None:
    if not 0 <= i < mm.num_layers:
        raise PlanError(f"{what} {i} is out of range: the model has layers 0..{mm.num_layers - 1}")


def _validate_rule(r: Rule, mm, layer: int) -> None:
    if isinstance(r, TopK):
        if not 1 <= r.k <= mm.max_top_k:
            raise PlanError(
                f"k={r.k} for layer {layer} is out of range: this model allows 1..{mm.max_top_k} experts per token"
            )
    elif isinstance(r, Dynamic):
        if r.max_k is not None and not 1 <= r.max_k <= mm.max_top_k:
            raise PlanError(f"max={r.max_k} is out of range: this model allows 1..{mm.max_top_k} experts per token")
        if r.kind in ("topp", "ratio") and not 0.0 < float(r.value) <= 1.0:
            raise PlanError(f"{r.kind} threshold for layer {layer} must be in (0, 1], got {r.value:g}")
        if r.kind == "naee" and r.value is not None and not 0.0 <= r.value <= 1.0:
            raise PlanError(f"naee beta must be in [0, 1], got {r.value:g}")
        if r.kind == "entropy" and r.thresholds is None and r.value is not None:
            cap = r.max_k or mm.native_top_k
            if not 1.0 <= r.value <= cap:
                raise PlanError(f"entropy target Act must be in [1, {cap}], got {r.value:g}")


def _parse_selector(sel: str) -> tuple[int, int]:
    s = sel.strip()
    if "-" in s:
        a, b = s.split("-", 1)
        lo, hi = _int(a, "layer"), _int(b, "layer")
    else:
        lo = hi = _int(s, "layer")
    if lo > hi or lo < 0:
        raise PlanError(f"bad layer range '{sel}'")
    return lo, hi


def _parse_rule(text: str) -> Rule:
    kind, args = _parse_base(text)
    if kind == "native":
        return Native()
    if kind == "topk":
        return TopK(args["k"])
    if kind in ("tlnle", "layers"):
        raise PlanError(f"'{text}' is a whole-model plan; per-layer entries take native, topk, topp, ratio, "
                        "naee or entropy")
    if args.get("schedule") is not None:
        raise PlanError(f"a depth schedule ('..') is only allowed in a base plan, not per layer: '{text}'")
    return args["rule"]


def _parse_base(text: str) -> tuple[str, dict]:
    t = text.strip()
    kind, _, rest = t.partition(":")
    kind = kind.strip().lower()
    parts = [p.strip() for p in rest.split(",")] if rest.strip() else []
    if kind == "native":
        if parts:
            raise PlanError("'native' takes no arguments")
        return kind, {}
    if kind == "topk":
        if len(parts) != 1:
            raise PlanError("topk needs one number: topk:K")
        k = _int(parts[0], "topk K")
        if k <= 0:
            raise PlanError(f"topk K must be >= 1, got {k}")
        return kind, {"k": k}
    if kind == "tlnle":
        opts = _options(parts, {"k", "l", "r"}, "tlnle")
        if "l" not in opts:
            raise PlanError("tlnle needs the first reduced layer: tlnle:k=K,l=L")
        out = {key: _int(v, f"tlnle {key}") for key, v in opts.items()}
        if "k" in out and out["k"] < 2:
            raise PlanError(f"tlnle k is the base k and must be >= 2 (k-1 experts run from layer l up), got {out['k']}")
        return kind, out
    if kind == "layers":
        if not parts:
            raise PlanError("layers needs one k per MoE layer: layers:K0,K1,...")
        ks = [_int(p, "layers k") for p in parts]
        if any(k <= 0 for k in ks):
            raise PlanError("every k in a layers plan must be >= 1")
        return kind, {"ks": ks}
    if kind in ("topp", "ratio", "naee", "entropy"):
        return kind, _parse_dynamic(kind, parts)
    known = "native, topk:K, tlnle:k=K,l=L, layers:K0,K1,..., topp:T, ratio:T, naee, entropy:ACT, or a .json file"
    raise PlanError(f"unknown plan '{text}' (use {known})")


def _parse_dynamic(kind: str, parts: list[str]) -> dict:
    value, schedule, thresholds = None, None, None
    head = parts[0] if parts and "=" not in parts[0] else None
    opts = _options(parts[1:] if head is not None else parts, {"max", "renorm", "t", "b"}, kind)
    if head is not None:
        if kind in ("topp", "ratio") and ".." in head:
            a, b = head.split("..", 1)
            schedule = (_tau(a, kind), _tau(b, kind))
            value = schedule[0]
        elif kind in ("topp", "ratio"):
            value = _tau(head, kind)
        elif kind == "naee":
            value = _float(head, "naee beta")
        else:
            value = _float(head, "entropy target Act")
    if "b" in opts:
        if kind != "naee":
            raise PlanError(f"option b= is for naee, not {kind}")
        value = _float(opts["b"], "naee beta")
    if "t" in opts:
        if kind != "entropy":
            raise PlanError(f"option t= is for entropy, not {kind}")
        thresholds = tuple(sorted(_float(x, "entropy threshold") for x in opts["t"].split("/") if x.strip()))
        if not thresholds:
            raise PlanError("entropy t= needs at least one threshold, e.g. entropy:t=1.2/1.6")
    if kind in ("topp", "ratio") and value is None:
        raise PlanError(f"{kind} needs a threshold in (0, 1]: {kind}:T")
    if kind == "naee" and value is not None and not 0.0 <= value <= 1.0:
        raise PlanError(f"naee beta must be in [0, 1], got {value:g}")
    if kind == "entropy" and value is None and thresholds is None:
        raise PlanError("entropy needs a target Act (entropy:1.5) or thresholds (entropy:t=1.2/1.6)")
    max_k = _int(opts["max"], "max") if "max" in opts else None
    if max_k is not None and max_k < 1:
        raise PlanError(f"max must be >= 1, got {max_k}")
    renorm = opts.get("renorm", "native")
    if renorm not in RENORM_MODES:
        raise PlanError(f"renorm must be one of {', '.join(RENORM_MODES)}, got '{renorm}'")
    rule = Dynamic(kind, value, thresholds, max_k, renorm)
    return {"rule": rule, "schedule": schedule}
