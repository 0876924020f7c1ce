"""xraydeconv: anatomy classifiers for X-rays and Zeiler & Fergus deconvnet projections of what they look at.

Subpackages follow the data flow: ``data`` -> ``training`` -> ``explain`` -> ``metrics`` -> ``reports``, with
``ops`` (the kernels' Python face) below the models and ``cli`` on top.
"""

__version__ = "0.1.0"

__all__ = ["DeconvNet", "Projection", "load_checkpoint", "__version__"]

_LAZY = {
    "DeconvNet": "xraydeconv.explain.deconvnet",
    "Projection": "xraydeconv.explain.deconvnet",
    "load_checkpoint": "xraydeconv.training.checkpoint",
}


def __getattr__(name: str):
    # Lazy: `import xraydeconv` stays light (no torch, no matplotlib) until one of these is asked for.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xraydeconv' has no attribute {name!r}")
