"""The Hook module: ``x <- x + r * W2 ReLU(W1 x)``, bias-free linears, ``r`` a learnable scalar (0.5 at init)."""

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
