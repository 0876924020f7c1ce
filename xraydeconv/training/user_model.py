"""Users' own models: a factory that builds the module, a state-dict file, the class names.

``load_user_model("mynets.radiology:make_net", "w.pt", "classes.txt")`` imports ``mynets.radiology``, calls
``make_net()``, loads ``w.pt`` into what it returns and hands back a :class:`~xraydeconv.training.checkpoint.Checkpoint`
like ``load_checkpoint`` does, so that everything that projects or evaluates our checkpoints takes it as well.
Nothing is unpickled: the weights are read with ``torch.load(..., weights_only=True)``. Every failure is one
``UserError`` naming the factory or the file and what is wrong with it (missing or unexpected keys, shapes,
class count).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from xraydeconv.data.classes import CLASS_NAMES
from xraydeconv.errors import UserError
from xraydeconv.training.checkpoint import Checkpoint, non_finite_weights

DEFAULT_INPUT_SIZE = 256
MIN_INPUT_SIZE = 16


def _few(names: list[str], n: int = 3) -> str:
    """``a, b, c, … (4 more)``: the first ``n`` names and how many were left out."""
    shown = ", ".join(names[:n])
    return shown + (f", … ({len(names) - n} more)" if len(names) > n else "")


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def import_factory(factory: str) -> nn.Module:
    """Import ``package.module:function``, call it with no arguments and return the ``nn.Module`` it builds.

    The module is looked up on ``sys.path`` and, failing that, in the current folder (as ``python -m`` does).
    """
    module_name, sep, attr = factory.partition(":")
    if not sep or not module_name or not attr or ":" in attr:
        raise UserError(f"--model-factory {factory!r}: expected package.module:function")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import error, or any error raised while the module runs
        raise UserError(f"--model-factory {factory}: cannot import {module_name} ({_why(exc)})") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    fn: object = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise UserError(f"--model-factory {factory}: {module_name} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise UserError(f"--model-factory {factory}: {attr} is a {type(fn).__name__}, not a function")
    try:
        model = fn()
    except Exception as exc:
        raise UserError(f"--model-factory {factory}: calling {attr}() failed ({_why(exc)})") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model-factory {factory}: {attr}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def read_weights(path: Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in ``path`` (or under its ``"state_dict"`` key) and the file's sha256."""
    try:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            f.seek(0)
            raw = torch.load(f, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"--weights {path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"--weights {path}: is a folder, not a weights file") from None
    except Exception as exc:  # zip, unpickling, EOF errors: not a file torch.save wrote from tensors
        raise UserError(f"--weights {path}: not a state dict saved with torch.save(model.state_dict()) "
                        f"({_why(exc)})") from None
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not raw or not all(isinstance(k, str) and torch.is_tensor(v)
                                                       for k, v in raw.items()):
        raise UserError(f"--weights {path}: expected a state dict (parameter name -> tensor), "
                        f"got {type(raw).__name__}")
    bad = non_finite_weights(raw)
    if bad:
        raise UserError(f"--weights {path}: {len(bad)} tensors hold NaN or infinity ({_few(bad)})")
    return raw, digest


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``state`` into ``model``, every key and shape matching; the error lists what does not."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = ([f"missing keys {_few(missing)}"] if missing else []) + \
                ([f"unexpected keys {_few(unexpected)}"] if unexpected else [])
        raise UserError(f"--weights {path}: {'; '.join(parts)}")
    wrong = [f"{k} is {'x'.join(map(str, v.shape)) or 'a scalar'} in the file but "
             f"{'x'.join(map(str, own[k].shape)) or 'a scalar'} in the model"
             for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise UserError(f"--weights {path}: {wrong[0]}" + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    model.load_state_dict(state)


def read_classes(path: Path) -> list[str]:
    """Class names from a text file (one per line, blank lines skipped) or a JSON list of strings."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--classes {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--classes {path}: not a readable text file ({_why(exc)})") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"--classes {path}: not valid JSON ({exc})") from None
        if not all(isinstance(n, str) and n.strip() for n in names):
            raise UserError(f"--classes {path}: the JSON list must hold non-empty class names")
        names = [n.strip() for n in names]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise UserError(f"--classes {path}: no class names")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"--classes {path}: class name(s) listed twice: {_few(twice)}")
    return names


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= MIN_INPUT_SIZE


def _count_outputs(model: nn.Module, factory: str, in_channels: int, size: int) -> int:
    """Run one blank image through the model: it must return (1, classes) logits."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, in_channels, size, size, device=next(model.parameters()).device))
    except Exception as exc:
        raise UserError(f"--model-factory {factory}: the model fails on a 1x{in_channels}x{size}x{size} input "
                        f"({_why(exc)})") from None
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape[0] != 1:
        shape = "x".join(map(str, out.shape)) if torch.is_tensor(out) else type(out).__name__
        raise UserError(f"--model-factory {factory}: the model returns {shape} for one image, "
                        "expected 1 x classes logits")
    return int(out.shape[1])


def load_user_model(
    factory: str,
    weights: str | os.PathLike,
    classes: str | os.PathLike | None = None,
    input_size: int | None = None,
    map_location: str | torch.device = "cpu",
) -> Checkpoint:
    """Build a user's model with ``factory``, load ``weights`` into it and describe it as a ``Checkpoint``.

    Args:
        factory: ``"package.module:function"``; the function is called with no arguments and must return an
            ``nn.Module`` CNN taking (B, C, S, S) images (C from its first ``Conv2d``) to (B, classes) logits.
        weights: a file written by ``torch.save(model.state_dict())`` (a dict holding it as ``"state_dict"``
            is accepted too); every key and shape must match the model's.
        classes: a text file with one class name per line, or a JSON list; the count must match the logits.
            None: the 24 anatomy classes for a 24-logit model, else ``class-0`` … ``class-<N-1>``.
        input_size: the side S images are letterboxed to; default the model's ``input_size`` attribute, else 256.
        map_location: device of the returned model.
    Returns:
        A ``Checkpoint`` with the model in eval mode, ``model_name`` = ``factory``, ``sha256`` of the weights file,
        ``path`` = the weights file, ``epoch`` 0, and ``config`` recording the three arguments.
    Raises:
        UserError: one line naming the factory or the file: bad factory, import or call failure, not a module,
            no Conv2d, unreadable or non-tensor weights, missing or unexpected keys, shape mismatch, NaN weights,
            a bad class file or a class count that differs from the logits, a bad input size.
    """
    if input_size is not None and not _is_size(input_size):
        raise UserError(f"--input-size {input_size!r}: must be an integer of at least {MIN_INPUT_SIZE}")
    model = import_factory(factory)
    own = getattr(model, "input_size", None)
    size = int(input_size if input_size is not None else own if _is_size(own) else DEFAULT_INPUT_SIZE)
    path = Path(weights)
    state, digest = read_weights(path, map_location)
    load_weights(model, state, path)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        raise UserError(f"--model-factory {factory}: the model has no Conv2d layer; only CNNs can be projected")
    model.to(map_location).eval()
    n = _count_outputs(model, factory, first_conv.in_channels, size)
    if classes is not None:
        names = read_classes(Path(classes))
        if len(names) != n:
            raise UserError(f"--classes {classes}: {len(names)} class names for a model with {n} outputs")
    else:
        names = list(CLASS_NAMES) if n == len(CLASS_NAMES) else [f"class-{i}" for i in range(n)]
    config = {"factory": factory, "weights": str(path), "classes": None if classes is None else str(classes)}
    return Checkpoint(model=model, model_name=factory, class_names=names, input_size=size, config=config, epoch=0,
                      metrics={}, sha256=digest, step=0, path=path)
