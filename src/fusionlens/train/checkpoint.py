"""Checkpoints: one file (written atomically) with the model config, training config, model, optimizer,
scheduler and grad-scaler state, the step, every RNG state and the last metrics -- enough to resume a run
exactly or to rebuild the model for evaluation, decomposition or pruning."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusionlens.io import atomic_torch_save, load_torch_file
from fusionlens.models import FusionModel, ModelConfig, build_model

CHECKPOINT_FORMAT = "fusionlens-checkpoint-v1"
_EXPECTED = f"a fusionlens checkpoint ({CHECKPOINT_FORMAT}, written by fusionlens train)"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    model_config: ModelConfig,
    train_config: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    step: int = 0,
    metrics: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (a crash mid-write leaves the previous file intact)."""
    module = getattr(model, "module", model)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": model_config.to_dict(),
        "train_config": train_config,
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer else None,
        "scheduler": scheduler.state_dict() if scheduler else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": int(step),
        "rng": rng_state(),
        "metrics": metrics or {},
        "extra": extra or {},
    }
    atomic_torch_save(path, payload)
    return Path(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint (CPU tensors) and check its format."""
    path = _existing(path)
    return _checked(load_torch_file(path, what="checkpoint", expected=_EXPECTED), path)


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], str]:
    """Read a checkpoint file once: its payload (as :func:`load_checkpoint`) and the SHA-1 of the file's bytes,
    a fingerprint of exactly the weights in the payload."""
    path = _existing(path)
    data = path.read_bytes()
    payload = load_torch_file(path, what="checkpoint", expected=_EXPECTED, data=data)
    return _checked(payload, path), hashlib.sha1(data).hexdigest()


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {path}")
    return path


def _checked(payload: Any, path: Path) -> dict[str, Any]:
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        if isinstance(payload, dict) and isinstance(payload.get("format"), str):
            kind = f"a {payload['format']} file"
        elif isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            kind = f"a bare state dict ({len(payload)} tensors; e.g. camera weights)"
        else:
            kind = f"a PyTorch file holding a {type(payload).__name__}"
        raise ValueError(f"checkpoint {path} is {kind}, not {_EXPECTED}")
    return payload


def config_differences(a: ModelConfig, b: ModelConfig) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ between two model configs: name -> (a's, b's)."""
    da, db = a.to_dict(), b.to_dict()
    return {k: (da[k], db.get(k)) for k in da if da[k] != db.get(k)}


def load_model_state(model: FusionModel, payload: dict[str, Any], source: str = "checkpoint") -> None:
    """Load a checkpoint's weights into ``model`` after checking that the configs agree.

    A checkpoint of a structurally pruned model (``fusionlens prune --structured``) records the pruned shapes
    under ``extra["pruning"]["structure"]``; ``model``, built from the config, is reshaped to them first
    (:func:`fusionlens.prune.serialize.reshape_to`), so every command that rebuilds a model opens it."""
    saved = ModelConfig.from_dict(payload["model_config"])
    diff = config_differences(model.config, saved)
    if diff:
        details = "; ".join(f"{k}: model {v[0]!r} vs {source} {v[1]!r}" for k, v in diff.items())
        raise ValueError(f"{source} was trained for a different model config -- {details}")
    structure = ((payload.get("extra") or {}).get("pruning") or {}).get("structure")
    if structure:
        from fusionlens.prune.serialize import reshape_to

        reshape_to(model, structure)
    model.load_state_dict(payload["model"])


def load_model(
    path: str | Path, device: str | torch.device = "cpu", payload: dict[str, Any] | None = None
) -> tuple[FusionModel, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained as, with its weights, in eval mode, and the payload.

    ``payload``: the checkpoint as already read from ``path`` (:func:`read_checkpoint`; ``model_config`` and ``model``
    are what it needs); the file is then not read again."""
    if payload is None:
        payload = load_checkpoint(path)
    model = build_model(ModelConfig.from_dict(payload["model_config"]), load_camera_weights=False)
    load_model_state(model, payload, source=str(path))
    return model.to(device).eval(), payload
