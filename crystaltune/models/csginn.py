"""CSGINN: crystal graph isomorphism network, GINE convolutions (Hu et al. 2020) with edge features.

Each layer is :class:`torch_geometric.nn.GINEConv`,

    h_i = MLP((1 + eps) x_i + AGG_j ReLU(x_j + W_e e_ij))

(AGG = ``aggr``, sum by default as in GIN: injective on multisets, so the layer can count
neighbours; ``eps`` learnable when ``train_eps``), followed by

    x <- dropout(softplus(x + norm(h)))        (without the ``x +`` when ``residual`` is off).

The MLP has ``mlp_layers`` linear layers of width ``hidden`` with norm + softplus between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from torch import nn
from torch.nn import functional as F
from torch_geometric.nn import GINEConv

from ..schema import option
from .base import CrystalModel, make_norm
from .params import ModelParams
from .zoo import MODELS

Aggregation = Literal["add", "sum", "mean", "max"]
AGGREGATIONS = get_args(Aggregation)


def _mlp(dim: int, n_layers: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(n_layers - 1):
        layers += [nn.Linear(dim, dim), make_norm(norm, dim), nn.Softplus()]
    layers.append(nn.Linear(dim, dim))
    return nn.Sequential(*layers)


class GINEBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        edge_dim: int,
        norm: str,
        residual: bool,
        dropout: float,
        train_eps: bool,
        aggr: str,
        mlp_layers: int,
    ):
        super().__init__()
        self.conv = GINEConv(_mlp(dim, mlp_layers, norm), train_eps=train_eps, edge_dim=edge_dim, aggr=aggr)
        self.norm = make_norm(norm, dim)
        self.drop = nn.Dropout(dropout)
        self.residual = residual

    def forward(self, x, edge_index, e):
        h = self.norm(self.conv(x, edge_index, e))
        return self.drop(F.softplus(x + h if self.residual else h))


@dataclass
class CSGINNParams(ModelParams):
    train_eps: bool = option(True, doc="learn GIN's eps")
    aggr: Aggregation = option("add", doc="neighbour aggregation AGG (add and sum are the same)")
    mlp_layers: int = option(2, lo=1, hi=8, doc="linear layers of each GINE MLP")


@MODELS.register("csginn")
class CSGINN(CrystalModel):
    """GINE message passing (see the module docstring)."""

    Params = CSGINNParams

    def build_backbone(self) -> None:
        c, p = self.config, self.params
        self.blocks = nn.ModuleList(
            GINEBlock(c.hidden, self.edge_dim, c.norm, c.residual, c.dropout, p.train_eps, p.aggr, p.mlp_layers)
            for _ in range(c.layers)
        )
