"""Activation functions by name (``model.params.activation`` of the models that take one)."""

from __future__ import annotations

from typing import Literal

from torch import nn

from ..registry import Registry

ACTIVATIONS: Registry[type[nn.Module]] = Registry("activation")
ACTIVATIONS.register("silu")(nn.SiLU)
ACTIVATIONS.register("softplus")(nn.Softplus)

#: the type of an ``activation`` option: one of the registered names
Activation = Literal[tuple(ACTIVATIONS)]  # type: ignore[valid-type]


def make_activation(name: str) -> nn.Module:
    return ACTIVATIONS.get(name)()
