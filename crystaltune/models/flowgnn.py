"""FlowGNN: CGCNN gated convolutions interleaved with RealNVP affine-coupling layers on atom embeddings.

After every :class:`~crystaltune.models.cgcnn.CGConv`, ``flow_layers`` affine couplings (Dinh et
al., RealNVP, 2017) transform each atom's embedding ``x`` (dimension ``d = hidden``) invertibly.
The channels are split into ``x_a = x[:, :d//2]`` and ``x_b = x[:, d//2:]``; one half conditions
the other:

    s, t  = split(MLP(x_c))                     # MLP: Linear -> softplus -> Linear (last layer zeroed)
    s     = s_max * tanh(s / s_max)             # log-scale bounded to (-s_max, s_max)
    y_t   = x_t * exp(s) + t,   y_c = x_c
    log|det dy/dx| = sum(s)                      # per atom

where (c, t) = (a, b) for even-numbered couplings and (b, a) for odd ones, so consecutive couplings
transform alternate halves (numbering runs across the whole backbone). The inverse is
``x_t = (y_t - t) * exp(-s)`` with ``s, t`` from the unchanged ``y_c = x_c``. The zero-initialised
last layer makes every coupling start as the identity, so an untrained FlowGNN computes exactly what
CGCNN would. The per-crystal sum of log-determinants of the last forward pass is kept in
``model.log_det`` (shape ``(num_graphs,)``) for losses or diagnostics that want it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CrystaltuneError
from ..schema import option
from .base import CrystalModel
from .cgcnn import CGConv
from .params import ModelParams, require
from .zoo import MODELS


class AffineCoupling(nn.Module):
    """One RealNVP affine coupling on the last dimension (see the module docstring)."""

    def __init__(self, dim: int, hidden: int | None = None, flip: bool = False, s_max: float = 2.0):
        super().__init__()
        if dim < 2:
            raise CrystaltuneError(f"affine coupling needs at least 2 channels, got {dim}")
        self.dim, self.flip, self.s_max = dim, flip, float(s_max)
        self.split = dim // 2
        n_cond, n_trans = (dim - self.split, self.split) if flip else (self.split, dim - self.split)
        hidden = hidden or dim
        self.net = nn.Sequential(nn.Linear(n_cond, hidden), nn.Softplus(), nn.Linear(hidden, 2 * n_trans))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x[..., : self.split], x[..., self.split :]
        return (b, a) if self.flip else (a, b)  # (conditioning, transformed)

    def _join(self, cond: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
        return torch.cat([trans, cond] if self.flip else [cond, trans], dim=-1)

    def _scale_shift(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.net(cond).chunk(2, dim=-1)
        return self.s_max * torch.tanh(s / self.s_max), t

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, log_det)`` with ``log_det`` of shape ``x.shape[:-1]``."""
        cond, trans = self._halves(x)
        s, t = self._scale_shift(cond)
        return self._join(cond, trans * torch.exp(s) + t), s.sum(dim=-1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        cond, trans = self._halves(y)
        s, t = self._scale_shift(cond)
        return self._join(cond, (trans - t) * torch.exp(-s))


@dataclass
class FlowGNNParams(ModelParams):
    flow_layers: int = option(1, lo=0, hi=16, doc="affine couplings after each convolution (0: CGCNN)")
    flow_hidden: int | None = option(None, lo=1, hi=4096, doc="width of the coupling MLPs (null: model.hidden)")
    s_max: float = option(2.0, lo=0, hi=20, open_lo=True, doc="bound of the log-scale")

    def check(self, model) -> None:
        require(
            not self.flow_layers or model.hidden >= 2,
            "model.params.flow_layers",
            f"coupling layers need model.hidden >= 2, got {model.hidden}",
        )


@MODELS.register("flowgnn")
class FlowGNN(CrystalModel):
    """CGConv layers each followed by ``flow_layers`` affine couplings (see the module docstring)."""

    Params = FlowGNNParams

    def __init__(self, config, n_targets: int = 1, cutoff: float = 8.0, params: FlowGNNParams | None = None):
        super().__init__(config, n_targets, cutoff, params)
        self.log_det: torch.Tensor | None = None

    def build_backbone(self) -> None:
        c, p = self.config, self.params
        self.convs = nn.ModuleList(CGConv(c.hidden, self.edge_dim, c.norm, c.residual) for _ in range(c.layers))
        self.flows = nn.ModuleList(
            nn.ModuleList(
                AffineCoupling(c.hidden, p.flow_hidden, flip=(i * p.flow_layers + k) % 2 == 1, s_max=p.s_max)
                for k in range(p.flow_layers)
            )
            for i in range(c.layers)
        )

    def message_passing(self, x, edge_index, e, batch):
        log_det = x.new_zeros(x.shape[0])
        for conv, flows in zip(self.convs, self.flows):
            x = conv(x, edge_index, e, batch.degree)
            for flow in flows:
                x, ld = flow(x)
                log_det = log_det + ld
        self.log_det = x.new_zeros(batch.num_graphs).index_add_(0, batch.batch, log_det)
        return x
