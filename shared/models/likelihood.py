"""Count likelihoods for the VAE's count head: the negative binomial of scVI (mean / inverse-dispersion form).

NB(x; mu, theta) with mean mu and inverse dispersion theta (variance mu + mu^2 / theta) is a Gamma-Poisson
mixture: lambda ~ Gamma(shape=theta, scale=mu / theta), x ~ Poisson(lambda). Written out rather than taken from
torch.distributions.NegativeBinomial, whose (total_count, probs/logits) form loses precision when mu << theta.
"""

from __future__ import annotations

import numpy as np
import torch

EPS = 1e-8


def nb_log_prob(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, *, exact: bool = True) -> torch.Tensor:
    """Elementwise log NB(x; mu, theta), differentiable in mu and theta (x: non-negative counts).

    ``exact=False`` leaves out ``-lgamma(x + 1)``, which depends on the data only: the same gradients, less work
    (what training uses).
    """
    log_theta_mu = torch.log(theta + mu + EPS)
    out = (
        theta * (torch.log(theta + EPS) - log_theta_mu)
        + x * (torch.log(mu + EPS) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
    )
    return out - torch.lgamma(x + 1.0) if exact else out


def sample_nb(mu: np.ndarray, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integer counts drawn from NB(mu, theta) as a Gamma-Poisson mixture (same shape as mu), float32."""
    mu = np.asarray(mu, dtype=np.float64)
    theta = np.broadcast_to(np.asarray(theta, dtype=np.float64), mu.shape)
    lam = rng.gamma(shape=theta, scale=np.maximum(mu, 0.0) / theta)
    return rng.poisson(lam).astype(np.float32)
