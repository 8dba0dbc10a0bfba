"""Typed ``model.params``: each model declares a dataclass of its own options beside its class
(``Params``). Each field is the one declaration of an option: its annotation is the type
(``Literal[...]`` for choices), :func:`~crystaltune.schema.option` gives its default, range and doc,
and :func:`~crystaltune.schema.build` checks all three. ``check`` is left with the combinations with
the rest of the model config. ``TrialConfig.validate`` parses them, so a bad value fails before Ray
starts, with the key in the message, never inside a trial.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import CrystaltuneError
from ..schema import build


@dataclass
class ModelParams:
    """No options (the base of every model's Params)."""

    def check(self, model) -> None:
        """Combinations with the model config (``model``: a ModelConfig); raise CrystaltuneError naming
        the key. Types, choices and single-field ranges are the fields' own (schema.build)."""


def parse_params(cls: type[ModelParams], raw: dict[str, Any] | ModelParams | None, model, where: str = "model.params"):
    """``raw`` (YAML values, a ``cls`` instance to check again, or None) -> a checked ``cls`` instance."""
    params = build(cls, raw, where)
    params.check(model)
    return params


def require(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise CrystaltuneError(f"{where}: {message}")
