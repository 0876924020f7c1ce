"""xraydeconv: anatomy classifiers for X-rays and Zeiler & Fergus deconvnet projections of what they look at."""

__version__ = "0.1.0"
