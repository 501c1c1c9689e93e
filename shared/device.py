"""Where a site's models train: ``cpu`` (the tested default), ``cuda`` / ``cuda:N``, or ``auto`` (a GPU when torch sees
one)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Run a block that may start numba's OpenMP pool (scanpy's wilcoxon, neighbors, UMAP) and give torch its thread
    count back afterwards.

    Starting that pool (with scikit-learn's OpenMP runtime loaded) resets the process's OpenMP thread count to all
    cores, and torch reads it: a site process set to 1 thread trained on every core after its first fidelity score,
    and simulated sites sharing the cores oversubscribed them (the demo's evaluation ran about 4 times slower; README,
    "Demo cost").
    """
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
