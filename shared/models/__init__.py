"""Plain PyTorch models: latent VAE, single-step conditional diffusion generator, MLP classifier."""

from shared.models.classifier import MLPClassifier, MLPConfig
from shared.models.scdg import SCDG, SCDGConfig
from shared.models.vae import VAE, VAEConfig

__all__ = ["SCDG", "VAE", "MLPClassifier", "MLPConfig", "SCDGConfig", "VAEConfig"]
