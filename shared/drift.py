"""SCAFFOLD's control variates at a site (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", ICML 2020): a correction of every local gradient for client drift under label skew.

Each site keeps ``c_i``, its own estimate of its gradient; the server keeps ``c``, the sites' cell-weighted average.
Every local step adds ``c - c_i`` to the minibatch gradient, so a site follows the federation's gradient rather than
its own. After its steps the site's new ``c_i`` is the mean of its raw (uncorrected) gradients over those steps: with
plain SGD this is exactly SCAFFOLD's "option II" update ``c_i - c + (x - y_i) / (K lr)``; written as a mean of
gradients it stays a gradient estimate with AdamW, whose steps are not proportional to the gradient. The correction
goes into the gradient before AdamW rescales it (decoupled weight decay is not a gradient and is left alone).

Flower 1.42 ships no SCAFFOLD strategy (its strategies combine weights only, with no per-client state), so the
pieces are here and in ``server.fedavg`` / ``client.control_state``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

StateArrays = Mapping[str, np.ndarray]


def zero_controls(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A zero control variate for every trainable parameter of ``model`` (float32, the parameters' shapes)."""
    return {name: np.zeros(tuple(p.shape), dtype=np.float32) for name, p in model.named_parameters() if p.requires_grad}


class GradientShift:
    """Adds ``server - local`` to each step's gradients and averages the raw gradients it saw (the new ``c_i``)."""

    def __init__(self, model: torch.nn.Module, server: StateArrays, local: StateArrays) -> None:
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        for what, given in (("server", server), ("site", local)):
            if set(given) != set(params):
                missing, extra = sorted(set(params) - set(given)), sorted(set(given) - set(params))
                msg = (
                    f"{what} control variates do not match the model's parameters "
                    f"(missing {missing[:3]}, unexpected {extra[:3]})"
                )
                raise ValueError(msg)
        self._params = params
        self._local = {name: np.asarray(local[name], dtype=np.float32) for name in params}
        self._shift: dict[str, torch.Tensor] = {}
        for name, p in params.items():
            diff = np.asarray(server[name], dtype=np.float32) - np.asarray(local[name], dtype=np.float32)
            if diff.shape != tuple(p.shape):
                msg = f"control variate {name!r} has shape {list(diff.shape)}, the parameter {list(p.shape)}"
                raise ValueError(msg)
            self._shift[name] = torch.from_numpy(diff).to(p.device)
        self._sums = {name: torch.zeros_like(p, requires_grad=False) for name, p in params.items()}
        self.steps = 0

    def apply(self) -> None:
        """Call between ``backward`` and the optimiser's step: record the raw gradients, then shift them."""
        self.steps += 1
        with torch.no_grad():
            for name, p in self._params.items():
                if p.grad is None:  # a parameter this step did not reach: raw gradient 0, the shift still applies
                    p.grad = self._shift[name].clone()
                    continue
                self._sums[name].add_(p.grad)
                p.grad.add_(self._shift[name])

    def mean_gradient(self) -> dict[str, np.ndarray]:
        """The site's new control variate: the mean raw gradient over the steps taken (zeros when none were)."""
        n = max(self.steps, 1)
        return {name: (s / n).detach().cpu().numpy().astype(np.float32) for name, s in self._sums.items()}

    def change(self) -> dict[str, np.ndarray]:
        """What the site sends: its new control variate minus the one it started the round with."""
        return {name: (new - self._local[name]).astype(np.float32) for name, new in self.mean_gradient().items()}
