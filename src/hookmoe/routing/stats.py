"""Act statistics: activated experts per real token, per layer and overall."""

from __future__ import annotations


import torch



class RoutingStats:
    """Activated experts per real token, per MoE layer (kept on device; read on demand)."""

    def __init__(self, layer_indices: list[int], num_experts: int):
        self.layer_indices = list(layer_indices)
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self._kept: dict[int, torch.Tensor] = {}
        self._tokens: dict[int, torch.Tensor] = {}
        self._experts: dict[int, torch.Tensor] = {}

    def record(self, layer: int, kept: torch.Tensor, token_w: torch.Tensor | None,
               index: torch.Tensor, keep: torch.Tensor | None) -> None:
        kept = kept.detach().float()
        if token_w is None:
            tok = torch.tensor(float(kept.shape[0]), device=kept.device)
            ks = kept.sum()
            w_slot = keep.float() if keep is not None else None
        else:
            token_w = token_w.to(kept.device, torch.float32)
            tok = token_w.sum()
            ks = (kept * token_w).sum()
            w_slot = token_w.unsqueeze(-1).expand(index.shape)
            if keep is not None:
                w_slot = w_slot * keep.float()
        if w_slot is None:
            w_slot = torch.ones(index.shape, device=index.device)
        idx = index.detach().clamp(0, self.num_experts - 1).reshape(-1)
        counts = torch.zeros(self.num_experts, device=index.device, dtype=torch.float32)
        counts.index_add_(0, idx, w_slot.reshape(-1).to(counts.device))
        if layer in self._kept:
            self._kept[layer] += ks.double()
            self._tokens[layer] += tok.double()
            self._experts[layer] += counts
        else:
            self._kept[layer], self._tokens[layer], self._experts[layer] = ks.double(), tok.double(), counts

    @property
    def tokens(self) -> float:
        if not self._tokens:
            return 0.0
        return float(next(iter(self._tokens.values())).item())

    def act_per_layer(self) -> dict[int, float]:
        return {i: float((self._kept[i] / self._tokens[i].clamp_min(1)).item())
                for i in self.layer_indices if i in self._kept}

    def act(self) -> float:
        per = self.act_per_layer()
        return sum(per.values()) / len(per) if per else float("nan")

    def expert_counts(self) -> dict[int, list[float]]:
        return {i: self._experts[i].tolist() for i in self.layer_indices if i in self._experts}

    def to_dict(self) -> dict:
        return {"act": self.act(), "act_per_layer": {str(k): v for k, v in self.act_per_layer().items()},
                "tokens": self.tokens}
