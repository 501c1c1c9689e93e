"""MLP classifier G-256-256-C used to evaluate (synthetic) training sets."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import nn


@dataclass(frozen=True)
class MLPConfig:
    """Shape of the evaluation MLP."""

    n_genes: int
    n_classes: int
    hidden: tuple[int, ...] = (256, 256)
    dropout: float = 0.2


class MLPClassifier(nn.Module):
    """Plain MLP on log-normalised expression."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        sizes = [config.n_genes, *config.hidden]
        layers: list[nn.Module] = []
        for a, b in pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(config.dropout)]
        layers.append(nn.Linear(sizes[-1], config.n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits (n, C)."""
        return self.net(x)
