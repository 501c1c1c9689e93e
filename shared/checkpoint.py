"""Checkpoints that carry their model config: a torch file of tensors and plain values only.

Loaded with ``torch.load(weights_only=True)``, so a checkpoint can never execute code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.errors import CheckpointError
from shared.models import SCDG, VAE, MLPClassifier, MLPConfig, SCDGConfig, VAEConfig

FORMAT_VERSION = 1
_KINDS: dict[str, tuple[type[nn.Module], type[Any]]] = {
    "vae": (VAE, VAEConfig),
    "scdg": (SCDG, SCDGConfig),
    "mlp": (MLPClassifier, MLPConfig),
}


def _kind_of(model: nn.Module) -> str:
    for kind, (cls, _) in _KINDS.items():
        if isinstance(model, cls):
            return kind
    msg = f"cannot checkpoint a {type(model).__name__}; expected one of VAE, SCDG, MLPClassifier"
    raise CheckpointError(msg)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Dataclass config -> plain dict (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def config_from_dict(cls: type[Any], values: dict[str, Any]) -> Any:
    """Plain dict -> frozen dataclass config, restoring tuples for tuple-typed fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        msg = f"unknown {cls.__name__} fields {sorted(unknown)}; the checkpoint was written by another version"
        raise CheckpointError(msg)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    """Instantiate a model of `kind` ('vae', 'scdg', 'mlp') from a config dict."""
    if kind not in _KINDS:
        msg = f"unknown model kind {kind!r}; expected one of {sorted(_KINDS)}"
        raise CheckpointError(msg)
    cls, cfg_cls = _KINDS[kind]
    return cls(config_from_dict(cfg_cls, config))


# ----------------------------------------------------------------------------- the wire form of a model
# (its config as JSON, its weights as a numpy state dict): what the server sends and the sites send back.


def model_json(model: nn.Module) -> str:
    """The model's config dataclass as JSON (travels with its weights; ``build_model`` reads it back)."""
    return json.dumps(config_to_dict(model.config), sort_keys=True)


def state_of(model: nn.Module) -> dict[str, np.ndarray]:
    """Detached numpy copy of a model's state dict."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_state(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    """Load a numpy state dict into ``model`` in place, and put it in eval mode."""
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    model.eval()


def model_hash(model: nn.Module) -> str:
    """Short SHA-256 of a model's weights (order-stable), for provenance."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensor.detach().cpu().numpy()).tobytes())
    return h.hexdigest()[:16]


def save_model(model: nn.Module, path: str | Path) -> Path:
    """Write `model` with its config to `path` atomically; return the path."""
    path = Path(path)
    payload = {
        "format_version": FORMAT_VERSION,
        "kind": _kind_of(model),
        "config": config_to_dict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_model(path: str | Path, kind: str | None = None) -> nn.Module:
    """Load a checkpoint written by `save_model`; check its kind when given."""
    path = Path(path)
    if not path.is_file():
        msg = f"no checkpoint at {path}; pass the path of a file written by `scdd pretrain` or a run"
        raise CheckpointError(msg)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        found = payload["kind"]
        config = payload["config"]
        state = payload["state_dict"]
    except Exception as exc:  # noqa: BLE001 - any read failure means the same to the user
        msg = f"{path} is not a fedscdd checkpoint ({type(exc).__name__}); re-create it with `scdd pretrain`"
        raise CheckpointError(msg) from None
    if kind is not None and found != kind:
        msg = f"{path} holds a {found!r} model, expected {kind!r}"
        raise CheckpointError(msg)
    model = build_model(found, config)
    model.load_state_dict(state)
    model.eval()
    return model
