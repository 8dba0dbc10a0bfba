"""The model zoo: the registry every model module fills with ``@MODELS.register``."""

from __future__ import annotations

from ..registry import Registry

MODELS: Registry = Registry("model")
