"""The Hook module (HookMoE): a tiny bias-free MLP placed in front of a chosen MoE block.

``x <- x + r * W2 ReLU(W1 x)`` with ``r`` a learnable scalar (0.5 at init). The Hook sits *inside* the
MoE block: a forward pre-hook on ``MoELayer.block`` replaces the block's input by the Hook's output, so
the router, the routed experts and the shared experts all see it. The decoder layer adds its residual
outside the block from the un-hooked input, so the residual stream is untouched — true for every
supported architecture (transformers 5.x: ``residual = h; h = post_attention_layernorm(h); h = mlp(h);
h = residual + h``; Granite scales by ``residual_multiplier``; GPT-OSS's block also returns router scores).

The Hook is registered as a real submodule of the block (``block.hookmoe_hook``), so ``state_dict``,
``.to()`` and ``requires_grad`` work; :func:`remove_hooks` deletes it and the pre-hook.

Like a PEFT adapter, a trained Hook is a directory (:func:`attach_hooks` / :meth:`HookSet.save_pretrained`):

* ``hook.safetensors`` — tensors ``layers.<i>.linear1.weight`` ``[inner, hidden]``,
  ``layers.<i>.linear2.weight`` ``[hidden, inner]``, ``layers.<i>.r`` ``[]`` per hooked decoder layer ``i``;
* ``hookmoe.json`` — format version, the base model (source, architecture, ``fingerprint()``, hidden
  size), hooked layers, hook dims and init, the routing plan it was trained for, training config, final
  metrics and the SHA-256 of the weights file.

Attaching it to a model it was not made for (other fingerprint, other hidden size, missing layer) or a
corrupt/truncated file is refused with an :class:`~hookmoe.errors.ArtifactError`.

``hookmoe export`` writes a self-contained directory: the base model (``save_pretrained``) and its
tokenizer, the hook (``hook/``), the plan (``plan.json``) and ``hookmoe_export.json``;
``hookmoe.models.load(OUT)`` restores all three (:func:`load_export`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from hookmoe.kernels.cpu_gemm import linear
from hookmoe.errors import ArtifactError


HOOK_FORMAT = "hookmoe-hook/1"


INITS = ("zero", "paper")


DEFAULT_INIT = "zero"  # measured: see benchmarks/results/hook_objectives.json


R_INIT = 0.5


class Hook(nn.Module):
    """``x + r * linear2(relu(linear1(x)))``, both linears bias-free, ``r`` a learnable scalar.

    ``init="paper"``: standard ``nn.Linear`` init for both linears, ``r = 0.5``.
    ``init="zero"``: the same but ``linear2 = 0``, so the Hook starts as the identity (the model's
    output is bit-identical to the model without it) and only ``linear2`` gets a gradient at step 0.

    The Hook computes in its own dtype (keep fp32 master weights for training) and returns the input's
    dtype; under ``torch.autocast`` the linears run in the autocast dtype.
    """

    def __init__(self, hidden_size: int, inner_size: int, init: str = DEFAULT_INIT, *, r_init: float = R_INIT,
                 seed: int | None = 0, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        if init not in INITS:
            raise ArtifactError(f"unknown hook init '{init}' (use one of: {', '.join(INITS)})")
        if hidden_size < 1 or inner_size < 1:
            raise ArtifactError(f"hook sizes must be positive, got hidden={hidden_size}, inner={inner_size}")
        self.hidden_size = int(hidden_size)
        self.inner_size = int(inner_size)
        self.init = init
        kw = {"dtype": dtype or torch.float32, "device": device}
        # built on the meta device (no global-RNG draw), then materialised and initialised from ``seed``
        self.linear1 = nn.Linear(hidden_size, inner_size, bias=False, device="meta", dtype=kw["dtype"])
        self.linear2 = nn.Linear(inner_size, hidden_size, bias=False, device="meta", dtype=kw["dtype"])
        self.linear1.to_empty(device=device or "cpu")
        self.linear2.to_empty(device=device or "cpu")
        self.r = nn.Parameter(torch.tensor(float(r_init), **kw))
        self.enabled = True  # plain attribute: not part of the state dict
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int | None = 0) -> None:
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.linear1.weight.device)
            gen.manual_seed(int(seed))
        with torch.no_grad():
            # nn.Linear's own default (kaiming-uniform, a=sqrt(5)), drawn from a private generator so that
            # inserting a Hook never disturbs the global RNG and is reproducible from ``seed``.
            for lin in (self.linear1, self.linear2):
                nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=gen)
            if self.init == "zero":
                self.linear2.weight.zero_()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.linear1.weight, self.linear2.weight
        return self.r * linear(F.relu(linear(x.to(w1.dtype), w1)), w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return x + self.delta(x).to(x.dtype)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, inner={self.inner_size}, init={self.init}"
