"""Models: a registry of crystal GNNs sharing featurizers, pooling, global features and heads."""

from __future__ import annotations

from ..config import ModelConfig
from . import cgcnn  # noqa: F401  (registers)
from .base import CrystalModel
from .pooling import POOLINGS
from .registry import MODELS

for _mod in ("csgcnn", "csgann", "csginn", "flowgnn"):
    try:
        __import__(f"{__name__}.{_mod}")
    except ModuleNotFoundError as _exc:  # variants land one by one
        if _exc.name != f"{__name__}.{_mod}":
            raise


def build_model(config: ModelConfig, n_targets: int = 1, cutoff: float = 8.0) -> CrystalModel:
    """Instantiate a registered model from its config."""
    cls = MODELS.get(config.name)
    return cls(config, n_targets, cutoff, **config.params)


__all__ = ["MODELS", "POOLINGS", "CrystalModel", "build_model"]
