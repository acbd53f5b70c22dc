"""Prediction heads on top of a fused embedding."""

from __future__ import annotations

import torch
from torch import nn


class TimeTransformer(nn.Module):
    """The paper's Time-Transformer: encoder layers (MHSA + FFN) over the fused embedding, sigmoid output.

    The fused embedding is one token (sequence length 1), so attention mixes nothing across positions; the
    layers act as residual, normalized feature mixers. Kept as in the paper, with an MLP head beside it for the
    ablation the paper itself suggests.
    """

    def __init__(self, dim: int, depth: int = 2, heads: int = 8, ffn_dim: int = 2048, dropout: float = 0.1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding width {dim} is not divisible by {heads} attention heads")
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=ffn_dim, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder(x.unsqueeze(1)).squeeze(1)
        return torch.sigmoid(self.out(self.norm(x))).squeeze(-1)


class MLPTimeHead(nn.Module):
    """A plain MLP regressor with the same input, width and sigmoid output (the ablation baseline)."""

    def __init__(self, dim: int, depth: int = 2, hidden: int = 2048, dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        width = dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x)).squeeze(-1)


def time_head(kind: str, dim: int, depth: int, heads: int, ffn_dim: int) -> nn.Module:
    if kind == "transformer":
        return TimeTransformer(dim, depth, heads, ffn_dim)
    if kind == "mlp":
        return MLPTimeHead(dim, depth, ffn_dim)
    raise ValueError(f"unknown time head {kind!r} (known: transformer, mlp)")
