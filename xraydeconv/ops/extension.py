"""Loads the compiled extension ``xraydeconv._C`` and says how to build it when it is missing."""

from __future__ import annotations

import importlib

import torch  # noqa: F401  (loads libc10 and friends before the extension)

_BUILD_HINT = (
    "the compiled extension xraydeconv._C is not built; run `pip install --no-build-isolation -e .` "
    "in the source tree (needs a C++ compiler), or use backend='native'"
)

_loaded: bool | None = None
_error: str | None = None


def load() -> bool:
    """Import ``xraydeconv._C`` once (registering the ``torch.ops.xraydeconv`` ops); False if it is missing."""
    global _loaded, _error
    if _loaded is None:
        try:
            importlib.import_module("xraydeconv._C")
            _loaded = True
        except ImportError as exc:  # not built, or built against another torch
            _loaded = False
            _error = str(exc)
    return _loaded


def require() -> None:
    """Raise a RuntimeError that says how to build the extension when it cannot be loaded."""
    if not load():
        raise RuntimeError(f"{_BUILD_HINT} (import error: {_error})")
