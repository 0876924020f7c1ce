"""What a network looks at: the deconvnet (with guided-backprop and gradient variants), occlusion, and the other
attribution methods behind ``heat_maps``."""

from xraydeconv.explain.deconvnet import METHODS, MODES, RANKS, DeconvNet, Projection
from xraydeconv.explain.methods import explainer, heat_maps

__all__ = ["DeconvNet", "Projection", "METHODS", "MODES", "RANKS", "explainer", "heat_maps"]
