"""How the server turns the sites' pretraining updates into the next global weights (pure numpy, no Flower).

Two independent choices, both run-config options:

- class-aware averaging (``class-aware-aggregation``): the rows of a class-indexed parameter (the
  VAE's label head, the SCDG's class embeddings and QA classifier) are averaged over the sites that
  have that class only; a class no site has keeps its previous rows. Under label skew plain FedAvg
  pulls a class's rows toward the untouched initial values of every site that lacks it.
- a server optimiser (``server-optimizer``): FedAvg takes the average as the next weights;
  FedAvgM / FedAdam / FedYogi treat ``average - current`` as a pseudo-gradient (Reddi et al.,
  "Adaptive Federated Optimization", ICLR 2021).

Why not Flower's ``FedAdam`` / ``FedYogi`` / ``FedAvgM`` objects: they own a ``strategy.start``
loop over Messages of one ArrayRecord, while our pretraining is three phases with different,
validated payloads (VAE, latent moments, SCDG + encoder). The update rules below are the same
formulas as flwr 1.42's (``tests/server/test_aggregation.py`` checks FedAdam and FedYogi step for
step against Flower's own classes); they apply to trainable parameters only, buffers are averaged.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from server.averaging import fedavg

State = Mapping[str, np.ndarray]
OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
DEFAULT_SERVER_LR = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 1e-2, "fedyogi": 1e-2}


def average(
    states: Sequence[State],
    weights: Sequence[float],
    *,
    site_classes: Sequence[Collection[int]] | None = None,
    class_rows: Collection[str] = (),
    n_classes: int = 0,
    previous: State | None = None,
) -> dict[str, np.ndarray]:
    """Weighted FedAvg; with ``site_classes``, each class's rows of ``class_rows`` averaged over the sites that have it.

    ``site_classes[i]``: class ids present at site i. Rows ``c < n_classes`` of every parameter in
    ``class_rows`` come from the sites holding class c (weights renormalised among them); a class
    held by none keeps its row of ``previous``. Rows from ``n_classes`` on (the SCDG's null class)
    are plain averages.
    """
    out = fedavg(states, weights)
    if site_classes is None:
        return out
    if len(site_classes) != len(states):
        msg = f"need the classes of every site: {len(site_classes)} sets for {len(states)} states"
        raise ValueError(msg)
    w = np.asarray(weights, dtype=np.float64)
    for key in class_rows:
        if key not in out:
            continue
        rows = out[key].astype(np.float64, copy=True)
        for c in range(min(n_classes, rows.shape[0])):
            holders = [i for i, have in enumerate(site_classes) if c in have and w[i] > 0]
            if not holders:
                if previous is not None:
                    rows[c] = np.asarray(previous[key], np.float64)[c]
                continue
            wc = w[holders] / w[holders].sum()
            rows[c] = sum(wi * np.asarray(states[i][key], np.float64)[c] for wi, i in zip(wc, holders, strict=True))
        out[key] = rows.astype(out[key].dtype)
    return out


@dataclass
class ServerOptimizer:
    """Server-side update from the averaged weights; keeps its moments across rounds of one stage.

    ``kind``: 'fedavg' (next = average), 'fedavgm' (momentum ``beta_1`` on the pseudo-gradient, as
    flwr's FedAvgM), 'fedadam' or 'fedyogi' (as flwr's FedAdam / FedYogi, with ``tau``).
    """

    kind: str = "fedavg"
    lr: float = 1.0
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    params: frozenset[str] | None = None  # keys that are trainable parameters (None: every float entry)
    t: int = 0
    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZERS:
            msg = f"server-optimizer {self.kind!r} unknown; expected one of {', '.join(OPTIMIZERS)}"
            raise ValueError(msg)
        if self.lr <= 0:
            msg = f"the server learning rate must be > 0, got {self.lr}"
            raise ValueError(msg)

    def _trainable(self, key: str, value: np.ndarray) -> bool:
        return value.dtype.kind == "f" and (self.params is None or key in self.params)

    def step(self, current: State, averaged: State) -> dict[str, np.ndarray]:
        """The next global weights from the current ones and the sites' (weighted) average."""
        if self.kind == "fedavg":
            return {k: np.array(v, copy=True) for k, v in averaged.items()}
        self.t += 1
        out: dict[str, np.ndarray] = {}
        for key, avg in averaged.items():
            avg = np.asarray(avg)
            if not self._trainable(key, avg):
                out[key] = np.array(avg, copy=True)
                continue
            x = np.asarray(current[key], np.float64)
            delta = avg.astype(np.float64) - x
            out[key] = (x + self._update(key, delta)).astype(avg.dtype)
        return out

    def _update(self, key: str, delta: np.ndarray) -> np.ndarray:
        if (
            self.kind == "fedavgm"
        ):  # flwr FedAvgM: momentum on the pseudo-gradient -delta, first round = the gradient itself
            self.m[key] = delta if key not in self.m else self.beta_1 * self.m[key] + delta
            return self.lr * self.m[key]
        m = self.beta_1 * self.m.get(key, np.zeros_like(delta)) + (1 - self.beta_1) * delta
        v = self.v.get(key, np.zeros_like(delta))
        if self.kind == "fedadam":
            v = self.beta_2 * v + (1 - self.beta_2) * delta**2
            lr = (
                self.lr * np.sqrt(1 - self.beta_2 ** (self.t + 1.0)) / (1 - self.beta_1 ** (self.t + 1.0))
            )  # flwr's bias correction
        else:  # fedyogi
            v = v - (1.0 - self.beta_2) * delta**2 * np.sign(v - delta**2)
            lr = self.lr
        self.m[key], self.v[key] = m, v
        return lr * m / (np.sqrt(v) + self.tau)
