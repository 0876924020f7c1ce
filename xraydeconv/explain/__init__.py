"""What a network looks at: the deconvnet (with guided-backprop and gradient variants) and occlusion."""

from xraydeconv.explain.deconvnet import METHODS, MODES, RANKS, DeconvNet, Projection

__all__ = ["DeconvNet", "Projection", "METHODS", "MODES", "RANKS"]
