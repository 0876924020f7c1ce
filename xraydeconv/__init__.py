"""xraydeconv: anatomy classifiers for X-rays and Zeiler & Fergus deconvnet projections of what they look at."""

__version__ = "0.1.0"

__all__ = ["DeconvNet", "Projection", "__version__"]


def __getattr__(name: str):
    # Lazy: `import xraydeconv` stays light (no torch, no matplotlib) until the deconvnet is asked for.
    if name in ("DeconvNet", "Projection"):
        from xraydeconv import deconvnet

        return getattr(deconvnet, name)
    raise AttributeError(f"module 'xraydeconv' has no attribute {name!r}")
