"""CSGANN: crystal graph attention network, multi-head attention over neighbours with edge features.

Each layer is one PyG attention convolution in which every neighbour's message is weighted by a
softmax over the centre atom's incoming edges, the edge features entering the attention score (and,
for the transformer, the message):

* ``attention="transformer"`` (default): :class:`torch_geometric.nn.TransformerConv` (Shi et al.
  2021), per head ``alpha_ij = softmax_j((W_q x_i)^T (W_k x_j + W_e e_ij) / sqrt(d))`` and
  ``h_i = W_r x_i + sum_j alpha_ij (W_v x_j + W_e e_ij)``;
* ``attention="gatv2"``: :class:`torch_geometric.nn.GATv2Conv` (Brody et al. 2022),
  ``alpha_ij = softmax_j(a^T LeakyReLU(W_r x_i + W_l x_j + W_e e_ij))``,
  ``h_i = sum_j alpha_ij W_l x_j``;
  no self loops are added (periodic self-images are real edges and must not be dropped).

The ``heads`` heads have ``max(1, hidden // heads)`` channels each; they are concatenated and
projected back to ``hidden`` by a linear layer (the usual multi-head output projection). Then

    x <- dropout(act(x + norm(W_o h)))        (act = ``activation``: softplus or silu)

(without the ``x +`` when ``residual`` is off). Attention weights are dropped with ``dropout`` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from torch import nn
from torch_geometric.nn import GATv2Conv, TransformerConv

from ..schema import option
from .activations import Activation, make_activation
from .base import CrystalModel, make_norm
from .params import ModelParams, require
from .zoo import MODELS

Attention = Literal["transformer", "gatv2"]
ATTENTIONS = get_args(Attention)


class AttentionBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        edge_dim: int,
        heads: int,
        attention: str,
        norm: str,
        residual: bool,
        dropout: float,
        activation: str,
    ):
        super().__init__()
        head_dim = max(1, dim // heads)
        if attention == "transformer":
            self.conv = TransformerConv(dim, head_dim, heads=heads, concat=True, dropout=dropout, edge_dim=edge_dim)
        else:
            self.conv = GATv2Conv(
                dim, head_dim, heads=heads, concat=True, dropout=dropout, edge_dim=edge_dim, add_self_loops=False
            )
        self.proj = nn.Linear(heads * head_dim, dim)
        self.norm = make_norm(norm, dim)
        self.act = make_activation(activation)
        self.drop = nn.Dropout(dropout)
        self.residual = residual

    def forward(self, x, edge_index, e):
        h = self.norm(self.proj(self.conv(x, edge_index, e)))
        return self.drop(self.act(x + h if self.residual else h))


@dataclass
class CSGANNParams(ModelParams):
    heads: int = option(4, doc="attention heads, in [1, model.hidden]")
    attention: Attention = option("transformer", doc="TransformerConv or GATv2Conv (module docstring)")
    activation: Activation = option("softplus")

    def check(self, model) -> None:
        require(
            1 <= self.heads <= model.hidden,
            "model.params.heads",
            f"must be in [1, model.hidden = {model.hidden}], got {self.heads}",
        )


@MODELS.register("csgann")
class CSGANN(CrystalModel):
    """Attention message passing with edge features (see the module docstring)."""

    Params = CSGANNParams

    def build_backbone(self) -> None:
        c, p = self.config, self.params
        self.num_heads = p.heads  # not self.heads: the base class keeps the output heads there
        self.blocks = nn.ModuleList(
            AttentionBlock(c.hidden, self.edge_dim, p.heads, p.attention, c.norm, c.residual, c.dropout, p.activation)
            for _ in range(c.layers)
        )
