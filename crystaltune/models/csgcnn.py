"""CSGCNN: CGCNN with extended atom features, optional learnable edge embeddings and edge updates.

From the researcher's notes: the crystal graph CNN of Xie & Grossman fed richer atom descriptors
(``node_featurizer="cgcnn+extended"``, the default of the search space: the 92 CGCNN one-hot
features plus standardised electronegativity, radius, ionisation energy, electron affinity and
valence) and, with ``learnable_edge``, a learned projection of the distance expansion (both are
handled by :class:`~crystaltune.models.base.CrystalModel`, so they are config options here).

What the backbone adds to CGCNN is a per-layer **edge update** (``edge_update=True``, the default):
between two gated convolutions every edge feature is refreshed from its end atoms,

    e_ij <- e_ij + W_2 softplus(norm(W_1 [x_i, x_j, e_ij] + b_1)) + b_2

(i the centre atom, j the neighbour), so later convolutions see bond features that know about the
current atom states, not only the interatomic distance. ``W_1`` is applied in the same factored form
as :class:`~crystaltune.models.cgcnn.CGConv` (``A x`` and ``B x`` once per atom, gathered per edge),
so an update costs two ``edge_dim x edge_dim`` products per edge. No update follows the last
convolution (its result would be unused). With ``edge_update=False`` the model is exactly CGCNN (same
parameter names; a ``cgcnn`` state dict loads into it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..schema import option
from .base import make_norm
from .cgcnn import CGCNN, factored_edge_linear
from .params import ModelParams
from .zoo import MODELS


class EdgeUpdate(nn.Module):
    """``e + MLP([x_dst, x_src, e])`` with a factored first layer (see the module docstring)."""

    def __init__(self, dim: int, edge_dim: int, norm: str = "batch"):
        super().__init__()
        self.dim = dim
        self.fc1 = nn.Linear(2 * dim + edge_dim, edge_dim)
        self.norm = make_norm(norm, edge_dim)
        self.fc2 = nn.Linear(edge_dim, edge_dim)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, e: torch.Tensor, degree: int = 0) -> torch.Tensor:
        h = factored_edge_linear(self.fc1, self.dim, x, edge_index, e, degree)
        return e + self.fc2(F.softplus(self.norm(h)))


@dataclass
class CSGCNNParams(ModelParams):
    edge_update: bool = option(
        True, doc="refresh the edge features from their end atoms after every convolution but the last (false: CGCNN)"
    )


@MODELS.register("csgcnn")
class CSGCNN(CGCNN):
    """CGCNN gated convolutions with an edge update between consecutive layers (module docstring)."""

    Params = CSGCNNParams

    def build_backbone(self) -> None:
        super().build_backbone()
        c = self.config
        self.edge_updates = (
            nn.ModuleList(EdgeUpdate(c.hidden, self.edge_dim, c.norm) for _ in range(c.layers - 1))
            if self.params.edge_update
            else None
        )

    def message_passing(self, x, edge_index, e, batch):
        for i, conv in enumerate(self.convs):
            x = conv(x, edge_index, e, batch.degree)
            if self.edge_updates is not None and i < len(self.edge_updates):
                e = self.edge_updates[i](x, edge_index, e, batch.degree)
        return x
