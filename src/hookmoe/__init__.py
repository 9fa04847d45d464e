"""hookmoe: run MoE LLMs with fewer experts, win the quality back with a trained Hook."""

__version__ = "0.1.0"
