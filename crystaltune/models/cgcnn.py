"""CGCNN (Xie & Grossman, PRL 120, 145301, 2018) with scatter-based message passing.

The reference edge layer ``W [x_i, x_j, e_ij] + b`` is computed as ``A x_i + B x_j + C e_ij + b``
with ``A x`` and ``B x`` evaluated once per atom and gathered per edge: the same numbers (reference
checkpoints load unchanged into ``fc_full``) with far less work than concatenating per edge.
On the CPU, training with batch norm runs each convolution's edge work as one fused autograd node
(:mod:`crystaltune.models.fused`, same numbers within float rounding); other cases use autograd.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import CrystalModel, make_norm
from .fused import can_fuse, fused_gated_conv
from .zoo import MODELS


def scatter_target(msg: torch.Tensor, dst: torch.Tensor, n: int, degree: int = 0) -> torch.Tensor:
    """Sum of edge messages per target atom."""
    if degree:
        return msg.view(n, degree, -1).sum(1)
    return msg.new_zeros(n, msg.shape[1]).index_add_(0, dst, msg)


def factored_edge_linear(
    linear: nn.Linear, dim: int, x: torch.Tensor, edge_index: torch.Tensor, e: torch.Tensor, degree: int = 0
) -> torch.Tensor:
    """``W [x_dst, x_src, e] + b`` computed as ``(A x + b)[dst] + (B x)[src] + C e``: the same numbers as
    the concatenation, with the atom products done once per atom instead of once per edge. With a
    uniform degree ``A x + b`` is added as a broadcast over each atom's k edges (no per-edge copy)."""
    src, dst = edge_index
    w = linear.weight
    ax = F.linear(x, w[:, :dim], linear.bias)
    bx = x @ w[:, dim : 2 * dim].t()
    z = torch.addmm(bx.index_select(0, src), e, w[:, 2 * dim :].t())
    if degree:
        return (z.view(x.shape[0], degree, -1) + ax.unsqueeze(1)).view(z.shape)
    return z + ax.index_select(0, dst)


class CGConv(nn.Module):
    """One gated convolution: sigmoid filter x softplus core summed over neighbours, batch norm on
    the messages and on their sum, softplus residual (the reference ConvLayer)."""

    def __init__(self, dim: int, edge_dim: int, norm: str = "batch", residual: bool = True):
        super().__init__()
        self.dim = dim
        self.fc_full = nn.Linear(2 * dim + edge_dim, 2 * dim)
        self.bn1 = make_norm(norm, 2 * dim)
        self.bn2 = make_norm(norm, dim)
        self.residual = residual

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, e: torch.Tensor, degree: int = 0) -> torch.Tensor:
        # message from neighbour (edge_index[0]) to centre (edge_index[1])
        if can_fuse(self.bn1, x):
            summed = self.bn2(fused_gated_conv(self, x, edge_index, e, degree))
            return F.softplus(x + summed) if self.residual else F.softplus(summed)
        gated = self.bn1(factored_edge_linear(self.fc_full, self.dim, x, edge_index, e, degree))
        filt, core = gated.chunk(2, dim=1)
        msg = torch.sigmoid(filt) * F.softplus(core)
        summed = self.bn2(scatter_target(msg, edge_index[1], x.shape[0], degree))
        return F.softplus(x + summed) if self.residual else F.softplus(summed)


@MODELS.register("cgcnn")
class CGCNN(CrystalModel):
    """The reference architecture: linear atom embedding, ``layers`` gated convolutions, pooling,
    softplus dense layers, one linear output per target."""

    def build_backbone(self) -> None:
        c = self.config
        self.convs = nn.ModuleList(CGConv(c.hidden, self.edge_dim, c.norm, c.residual) for _ in range(c.layers))

    def message_passing(self, x, edge_index, e, batch):
        for conv in self.convs:
            x = conv(x, edge_index, e, batch.degree)
        return x
