"""The ``xraydeconv`` command line (installed as the module ``xraydeconv.cli``)."""
