"""The model registry (filled by ``@MODELS.register`` in each model module)."""

from __future__ import annotations

from ..registry import Registry

MODELS: Registry = Registry("model")
