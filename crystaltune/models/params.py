"""Typed ``model.params``: each model declares a dataclass of its own options beside its class
(``Params``), with types, defaults and a ``check`` for ranges and combinations with the rest of the
model config. ``TrialConfig.validate`` parses them, so a bad value fails before Ray starts, with the
key in the message, never inside a trial.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import CrystaltuneError


@dataclass
class ModelParams:
    """No options (the base of every model's Params)."""

    def check(self, model) -> None:
        """Ranges and combinations with the model config (``model``: a ModelConfig); raise
        CrystaltuneError naming the key."""


def parse_params(cls: type[ModelParams], raw: dict[str, Any], model, where: str = "model.params") -> ModelParams:
    """``raw`` (YAML values) -> a checked ``cls`` instance: unknown keys, types, ranges."""
    from ..config import _build

    params = _build(cls, raw or {}, where)
    params.check(model)
    return params


def as_kwargs(params: ModelParams) -> dict[str, Any]:
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}


def require(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise CrystaltuneError(f"{where}: {message}")
