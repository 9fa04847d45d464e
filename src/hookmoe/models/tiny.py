"""``tiny:<arch>``: small random models of each supported architecture, built offline from transformers configs,
with a byte-level tokenizer."""

from __future__ import annotations


import torch
from torch import nn

from hookmoe.errors import ModelError
from hookmoe.models.adapters import ADAPTERS, supported_text






def tiny_tokenizer():
    """A byte-level tokenizer that needs no files (259 ids; pad 0, eos 1)."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(extra_ids=0)


def tiny_config(arch: str, **overrides):
    from transformers import AutoConfig

    if arch not in ADAPTERS or not ADAPTERS[arch].tiny:
        raise ModelError(f"unknown tiny architecture '{arch}'; choose one of: {supported_text()}")
    kw = dict(ADAPTERS[arch].tiny)
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def build_tiny(arch: str, *, seed: int = 0, **overrides) -> nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, **overrides)
    with _seeded(seed):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        _init_router_state(model)
    return model.eval()


class _seeded:
    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        torch.random.set_rng_state(self.state)


def _init_router_state(model: nn.Module) -> None:
    # Give zero-initialised parts (DeepSeek-V3's score-correction bias) small random values so that the
    # tiny model exercises them; real checkpoints carry their own.
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.normal_(0.0, 0.02)
