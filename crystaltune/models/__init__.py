"""Models: a registry of crystal GNNs sharing featurizers, pooling, global features and heads."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import cgcnn, csgann, csgcnn, csginn, egcnn, flowgnn  # noqa: F401  (each registers its model)
from .base import CrystalModel
from .params import parse_params
from .pooling import POOLINGS
from .zoo import MODELS

if TYPE_CHECKING:
    from ..config import ModelConfig


def build_model(config: ModelConfig, n_targets: int = 1, cutoff: float = 8.0) -> CrystalModel:
    """Instantiate a registered model from its config (``config.params`` parsed by the model's Params)."""
    cls = MODELS.get(config.name)
    return cls(config, n_targets, cutoff, parse_params(cls.Params, config.params, config))


__all__ = ["MODELS", "POOLINGS", "CrystalModel", "build_model"]
