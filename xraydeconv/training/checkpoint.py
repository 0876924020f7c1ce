"""Checkpoints: one self-describing file per snapshot, written atomically, loadable with ``weights_only=True``.

A checkpoint is a plain dict of tensors and primitive containers::

    {"format": "xraydeconv-checkpoint", "version": 1,
     "model_name": str, "model_kwargs": {"num_classes", "in_channels", "input_size"},
     "class_names": [str], "input_size": int, "config": dict, "epoch": int, "step": int,
     "metrics": dict, "state_dict": {name: Tensor},
     "training": None | {"optimizer": ..., "scheduler": ..., "rng": ..., ...}}

``training`` holds everything an exact resume needs (optimizer, LR scheduler, the torch / numpy / python
RNG states, the augmentation generator and the position in the epoch); it is None in files meant only
for inference. Because nothing but tensors, numbers, strings, lists and dicts is stored, loading never
unpickles arbitrary objects.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xraydeconv.errors import UserError
from xraydeconv.io import atomic_write_bytes
from xraydeconv.training.models import ARCHITECTURES, build

FORMAT = "xraydeconv-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model (weights loaded, eval mode) and what it was trained on."""

    model: nn.Module
    model_name: str
    class_names: list[str]
    input_size: int
    config: dict
    epoch: int
    metrics: dict
    sha256: str
    step: int = 0
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def rng_state() -> dict:
    """The torch (CPU and CUDA), numpy and python RNG states as tensors and lists."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state()`` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def model_kwargs(model: nn.Module, num_classes: int) -> dict:
    """The ``build`` arguments that recreate ``model``'s architecture."""
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return {"num_classes": num_classes, "in_channels": first_conv.in_channels, "input_size": model.input_size}


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    model_name: str,
    class_names: list[str],
    input_size: int,
    config: dict,
    epoch: int,
    step: int = 0,
    metrics: dict | None = None,
    training: dict | None = None,
) -> str:
    """Write a checkpoint atomically (temp file + fsync + ``os.replace``) and return its sha256.

    Args:
        path: destination file; its folder is created if needed.
        model: the network (unwrap DistributedDataParallel first).
        model_name: one of ``MODEL_NAMES``.
        class_names: label order of the logits.
        input_size: side of the square training images.
        config: the training configuration (primitives only).
        epoch: completed epochs.
        step: optimizer steps taken so far.
        metrics: anything JSON-like worth keeping beside the weights.
        training: optimizer / scheduler / RNG / data-position state for exact resume, or None.
    """
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_name": model_name,
        "model_kwargs": model_kwargs(model, len(class_names)),
        "class_names": list(class_names),
        "input_size": int(input_size),
        "config": dict(config),
        "epoch": int(epoch),
        "step": int(step),
        "metrics": dict(metrics or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "training": training,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[dict, str]:
    """Load and validate the raw checkpoint dict; returns it with the file's sha256.

    The file is never read whole into memory first: a file that does not start like a zip archive (what
    ``torch.save`` writes) is refused after reading four bytes, and the digest is computed in chunks.

    Raises:
        UserError: naming the file when it is missing, not a torch file, truncated, or not an xraydeconv
            checkpoint of a known model with well-formed settings.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:  # one open file: a snapshot renamed over it meanwhile does not mix in
        if f.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
            raise UserError(f"{path}: not a readable torch checkpoint (not the zip archive torch.save writes)")
        f.seek(0)
        try:
            raw = torch.load(f, map_location=map_location, weights_only=True)
        except Exception as exc:  # zip errors, unpickling errors, EOF: all mean "not a readable checkpoint"
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"{path}: not a readable torch checkpoint (truncated or corrupt?): {reason[:200]}"
            ) from None
        f.seek(0)
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise UserError(f"{path}: not an xraydeconv checkpoint (no 'format: {FORMAT}' entry)")
    if raw.get("version") != VERSION:
        raise UserError(f"{path}: checkpoint version {raw.get('version')!r} is not supported (expected {VERSION})")
    missing = [k for k in ("model_name", "model_kwargs", "class_names", "input_size", "state_dict") if k not in raw]
    if missing:
        raise UserError(f"{path}: checkpoint lacks {', '.join(missing)}")
    if raw["model_name"] not in ARCHITECTURES:
        raise UserError(f"{path}: unknown model {raw['model_name']!r} (known: {', '.join(ARCHITECTURES)})")
    _check_settings(path, raw)
    return raw, digest


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_settings(path: Path, raw: dict) -> None:
    """The model settings and class list are what ``save_checkpoint`` writes (a hand edit may break them)."""
    kw, names = raw["model_kwargs"], raw["class_names"]
    if not isinstance(kw, dict) or set(kw) - {"num_classes", "in_channels", "input_size"} \
            or not all(_is_count(v) for v in kw.values()):
        raise UserError(f"{path}: model settings {kw!r} are not num_classes, in_channels and input_size "
                        "as positive integers")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}: class_names must be a list of names, got {type(names).__name__}")
    if len(names) != kw.get("num_classes", 24):
        raise UserError(f"{path}: {len(names)} class names for a model with {kw.get('num_classes', 24)} outputs")
    if not _is_count(raw["input_size"]):
        raise UserError(f"{path}: input_size must be a positive integer, got {raw['input_size']!r}")
    if not isinstance(raw["state_dict"], dict) or not all(torch.is_tensor(v) for v in raw["state_dict"].values()):
        raise UserError(f"{path}: state_dict must map parameter names to tensors")


def non_finite_weights(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in ``state_dict`` that hold NaN or infinity."""
    return [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", pool_backend: str = "auto"
) -> Checkpoint:
    """Load a checkpoint and rebuild its model (weights loaded, eval mode).

    Raises:
        UserError: naming the file when it is missing, not a torch file, truncated, not ours, from an unknown
            model, with malformed settings, with non-finite weights, or when its weights do not fit the architecture.
    """
    raw, digest = read_checkpoint(path, map_location=map_location)
    bad = non_finite_weights(raw["state_dict"])
    if bad:
        raise UserError(f"{path}: {len(bad)} weight tensors hold NaN or infinity (e.g. {bad[0]}); the run that "
                        "wrote it diverged")
    model = build(raw["model_name"], pool_backend=pool_backend, **raw["model_kwargs"])
    try:
        model.load_state_dict(raw["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{path}: weights do not fit model {raw['model_name']!r}: {first[:200]}") from None
    model.to(map_location).eval()
    return Checkpoint(
        model=model,
        model_name=raw["model_name"],
        class_names=list(raw["class_names"]),
        input_size=int(raw["input_size"]),
        config=dict(raw.get("config") or {}),
        epoch=int(raw.get("epoch", 0)),
        metrics=dict(raw.get("metrics") or {}),
        sha256=digest,
        step=int(raw.get("step", 0)),
        path=Path(path),
        raw=raw,
    )
