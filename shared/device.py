"""Where a site's models train: ``cpu`` (the tested default), ``cuda`` / ``cuda:N``, or ``auto`` (a GPU when torch sees
one)."""

from __future__ import annotations

import re

import torch

from shared.errors import ConfigError

CHOICES = "'cpu', 'auto' (a GPU when there is one), 'cuda' or 'cuda:N'"


def check_device(name: str) -> None:
    """Refuse a device name this module does not know (without looking for a GPU)."""
    if name not in ("cpu", "auto") and not re.fullmatch(r"cuda(:\d+)?", name):
        msg = f"unknown device {name!r}; expected {CHOICES}"
        raise ConfigError(msg)


def resolve_device(name: str) -> torch.device:
    """The torch device for ``name``, refusing a GPU that torch cannot see."""
    check_device(name)
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda")
    if not torch.cuda.is_available():
        msg = (
            f"device={name!r} asks for a GPU, but torch sees none "
            "(torch.cuda.is_available() is False: no GPU, or a CPU-only torch); "
            "use device='auto' (a GPU when there is one) or 'cpu'"
        )
        raise ConfigError(msg)
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        msg = (
            f"device={name!r}, but torch sees {torch.cuda.device_count()} GPU(s) "
            f"(cuda:0 ... cuda:{torch.cuda.device_count() - 1})"
        )
        raise ConfigError(msg)
    return torch.device(name)
