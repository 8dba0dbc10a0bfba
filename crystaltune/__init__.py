"""crystaltune: distributed hyperparameter search for crystal graph neural networks."""

__version__ = "0.1.0"
