"""EGCNN: edge-gated crystal network, with edge features updated every layer and optional bond angles.

The backbone follows the edge-gated graph convolution pattern (Bresson & Laurent's gated GCN as
used by ALIGNN and coGN): bonds carry a ``hidden``-wide feature vector of their own, refreshed by
every layer but the last (whose bond features nothing would read), and each neighbour's message is
weighted by a sigmoid gate computed from both end atoms and the bond. With i the centre atom
(``edge_index[1]``) and j the neighbour (``edge_index[0]``):

    g_ij = C x_i + D x_j + E e_ij                                  (edge gate, pre-activation)
    h_i  = A x_i + sum_j sigmoid(g_ij) * B x_j / (sum_j sigmoid(g_ij) + eps)
    x_i <- x_i + dropout(act(norm(h_i)))
    e_ij <- e_ij + dropout(act(norm(g_ij)))

(without the ``x +`` / ``e +`` when ``residual`` is off). Residuals around normalised updates keep
deep stacks (``layers`` 3 to 12 and more) trainable. The distance expansion of the edge featurizer
(``edge_dim`` wide) is first projected to ``hidden`` by a linear layer and ``act``.

Bond angles (``angles=True``): for two distinct bonds j->i and k->i into the same centre atom i
(periodic images of one atom are distinct bonds), ``cos theta_jik`` between the bond vectors
``r_ij`` and ``r_ik`` (``Batch.vec``) is expanded on ``angle_bins`` Gaussians spread over [-1, 1].
Before the atom update of each of the first ``angle_layers`` layers, the bonds are updated by the
same gated convolution on the line graph (bonds as nodes, pairs of bonds sharing a centre as edges):

    t_jik = F e_ij + G e_ik + T rbf(cos theta_jik)
    u_ij  = P e_ij + sum_{k != j} sigmoid(t_jik) * Q e_ik / (sum_{k != j} sigmoid(t_jik) + eps)
    e_ij <- e_ij + dropout(act(norm(u_ij)))

The angle features themselves are not updated (unlike ALIGNN's triplet features): every layer reads
them afresh through its own ``T``. With a uniform degree k (``Batch.degree``, edges sorted by centre
atom) the bond pairs are an (N, k, k) block handled by :class:`GatedPairSum` (broadcasts, in-place
work, a hand-written backward); otherwise they are listed by index (:func:`bond_pairs`). Both give
the same numbers.

Cost: N k (k - 1) pair messages of width ``hidden`` per angle layer, about k times the tensors of an
atom layer. Measured on perovskites (k = 12, hidden 64, 3 layers, batch 256, 2 CPU threads): 1780
graphs/s without angles, 250 with an angle update in every layer, 500 with ``angle_layers=1``
(cgcnn: 1380), and about 2.3x the peak memory; ``angle_layers`` is the knob that bounds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CrystaltuneError
from ..graphs.store import Batch
from ..schema import option
from .activations import Activation, make_activation
from .base import CrystalModel, make_norm
from .cgcnn import factored_edge_linear, scatter_target
from .params import ModelParams
from .zoo import MODELS

EPS = 1e-6


# bond pairs and angle features ---------------------------------------------------------------------
def bond_pairs(dst: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered pair ``(a, b)`` of distinct edges with the same target atom (``a`` = j->i,
    ``b`` = k->i, a != b as edge indices, so two images of one neighbour are two bonds), for any edge
    order. Returns two (T,) index tensors with T = sum_i deg_i (deg_i - 1)."""
    order = torch.argsort(dst, stable=True)
    counts = torch.bincount(dst, minlength=n)
    start = torch.cumsum(counts, 0) - counts  # first sorted position of each atom's edges
    centre = dst.index_select(0, order)
    size = counts.index_select(0, centre)  # group size of each sorted edge
    pos_a = torch.repeat_interleave(torch.arange(len(order), device=dst.device), size)
    block = torch.cumsum(size, 0) - size
    within = torch.arange(len(pos_a), device=dst.device) - block.index_select(0, pos_a)
    pos_b = start.index_select(0, centre).index_select(0, pos_a) + within
    keep = pos_a != pos_b
    return order.index_select(0, pos_a[keep]), order.index_select(0, pos_b[keep])


def bond_cosines(vec: torch.Tensor, dst: torch.Tensor, n: int, degree: int = 0):
    """``cos theta`` between bonds sharing a centre atom.

    With ``degree`` k > 0 (edges sorted by target, k each): an (N, k, k) tensor, entry [i, a, b]
    for the a-th and b-th bonds of atom i (the diagonal, a bond with itself, is 1 and unused).
    Otherwise ``(a, b, cos)`` with the pairs of :func:`bond_pairs` and cos of shape (T,)."""
    u = nn.functional.normalize(vec, dim=1)
    if degree:
        uu = u.view(n, degree, 3)
        return torch.bmm(uu, uu.transpose(1, 2)).clamp(-1.0, 1.0)
    a, b = bond_pairs(dst, n)
    return a, b, (u.index_select(0, a) * u.index_select(0, b)).sum(1).clamp(-1.0, 1.0)


class AngleBasis(nn.Module):
    """Gaussians exp(-((c - mu_k) / w)^2) with ``bins`` centres mu_k evenly over [-1, 1], w their spacing."""

    def __init__(self, bins: int):
        super().__init__()
        self.register_buffer("centres", torch.linspace(-1.0, 1.0, bins), persistent=False)
        self.gamma = ((bins - 1) / 2.0) ** 2

    def forward(self, cos: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.gamma * (cos.unsqueeze(-1) - self.centres) ** 2)


@dataclass
class AngleGraph:
    """Angle basis of the bond pairs of one batch: (N, k, k, bins) when ``degree`` > 0 (fast path),
    else (T, bins) with the pair indices ``a`` (bond j->i) and ``b`` (bond k->i)."""

    rbf: torch.Tensor
    degree: int = 0
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None


# layers ----------------------------------------------------------------------------------------------
class EdgeGatedConv(nn.Module):
    """One edge-gated convolution on the crystal graph: updates atoms and, unless ``update_edges`` is
    off (the last layer, whose bond features nothing reads), bonds (module docstring)."""

    def __init__(self, dim: int, norm: str, residual: bool, dropout: float, activation: str, update_edges: bool = True):
        super().__init__()
        self.dim = dim
        self.gate = nn.Linear(3 * dim, dim)  # [x_i, x_j, e_ij] -> g_ij, applied factored
        self.node = nn.Linear(dim, 2 * dim)  # A x, B x
        self.norm_x = make_norm(norm, dim)
        self.norm_e = make_norm(norm, dim) if update_edges else None
        self.act = make_activation(activation)
        self.drop = nn.Dropout(dropout)
        self.residual = residual

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, e: torch.Tensor, degree: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        src, dst = edge_index
        g = factored_edge_linear(self.gate, self.dim, x, edge_index, e, degree)
        sig = torch.sigmoid(g)
        ax, bx = self.node(x).chunk(2, dim=1)
        # numerator and denominator summed apart: no (E, 2 dim) concatenation to write and read back
        num = scatter_target(sig * bx.index_select(0, src), dst, x.shape[0], degree)
        den = scatter_target(sig, dst, x.shape[0], degree)
        h = ax + num / (den + EPS)
        dx = self.drop(self.act(self.norm_x(h)))
        x = x + dx if self.residual else dx
        if self.norm_e is None:
            return x, e
        de = self.drop(self.act(self.norm_e(g)))
        return x, (e + de if self.residual else de)


class GatedPairSum(torch.autograd.Function):
    """Fast-path line-graph aggregation over the (N, k, k) bond pairs of atoms with k bonds each:

        s[n, a, b] = sigmoid(rbf[n, a, b] W^T + bias + f[n, a] + g[n, b])   (0 for b == a)
        num[n, a]  = sum_b s[n, a, b] * q[n, b],    den[n, a] = sum_b s[n, a, b]

    ``rbf`` (N, k, k, bins), ``f``/``g``/``q`` (N, k, d). The (N, k, k, d) pair tensors are the largest
    of the model (k times the edge tensors); most of what autograd spends on these expressions goes
    to allocating and copying several of them per layer. Here one is saved (``s``), one more is made
    in the backward, and everything else works in place or on (N, k, d) slices."""

    @staticmethod
    def forward(ctx, rbf, weight, bias, f, g, q):
        dtype = f.dtype  # the Linear outputs' dtype (float16 under autocast)
        n, k, _, bins = rbf.shape
        rbf2 = rbf.reshape(-1, bins).to(dtype)
        s = torch.mm(rbf2, weight.to(dtype).t()).view(n, k, k, -1)  # the bias goes with f: one pass less
        s.add_((f + bias.to(dtype)).unsqueeze(2)).add_(g.unsqueeze(1)).sigmoid_()
        s.diagonal(dim1=1, dim2=2).zero_()  # a bond is not its own neighbour
        den = s.sum(2)
        num = torch.zeros_like(den)
        for j in range(k):
            num.addcmul_(s[:, :, j], q[:, j : j + 1])
        ctx.save_for_backward(rbf2, weight, s, q)
        return num, den

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_num, grad_den):
        rbf2, weight, s, q = ctx.saved_tensors
        k = s.shape[1]
        grad_num, grad_den = grad_num.to(s.dtype), grad_den.to(s.dtype)
        grad_q = None
        if ctx.needs_input_grad[5]:
            grad_q = torch.zeros_like(q)
            for i in range(k):
                grad_q.addcmul_(s[:, i], grad_num[:, i : i + 1])
        gs = torch.addcmul(s, s, s, value=-1.0)  # s (1 - s), the sigmoid's derivative (0 on the diagonal)
        buf = torch.empty_like(grad_num)
        for j in range(k):  # x (grad_den[a] + grad_num[a] q[b]) for b = j
            gs[:, :, j].mul_(torch.addcmul(grad_den, grad_num, q[:, j : j + 1], out=buf))
        grad_f = gs.sum(2)
        grad_g = gs.sum(1) if ctx.needs_input_grad[4] else None
        grad_w = (gs.view(-1, gs.shape[-1]).t() @ rbf2).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = grad_f.sum((0, 1)).to(weight.dtype) if ctx.needs_input_grad[2] else None
        grad_rbf = None
        if ctx.needs_input_grad[0]:  # only if bond vectors require grad (e.g. forces)
            grad_rbf = (gs.view(-1, gs.shape[-1]) @ weight.to(gs.dtype)).view(*s.shape[:3], -1)
        return grad_rbf, grad_w, grad_b, grad_f, grad_g, grad_q


class AngleUpdate(nn.Module):
    """Edge-gated convolution on the line graph: bonds updated from the other bonds of their centre
    atom, gated by the bond-angle basis (module docstring)."""

    def __init__(self, dim: int, bins: int, norm: str, residual: bool, dropout: float, activation: str):
        super().__init__()
        self.bond = nn.Linear(dim, 4 * dim)  # P e (with the bias), Q e, F e, G e
        self.angle = nn.Linear(bins, dim)  # T rbf (+ gate bias)
        self.norm = make_norm(norm, dim)
        self.act = make_activation(activation)
        self.drop = nn.Dropout(dropout)
        self.residual = residual

    def forward(self, e: torch.Tensor, angles: AngleGraph) -> torch.Tensor:
        pe, qe, fe, ge = self.bond(e).chunk(4, dim=1)
        k = angles.degree
        if k:
            shape = (e.shape[0] // k, k, e.shape[1])
            num, den = GatedPairSum.apply(
                angles.rbf, self.angle.weight, self.angle.bias, fe.reshape(shape), ge.reshape(shape), qe.reshape(shape)
            )
            num, den = num.reshape(e.shape), den.reshape(e.shape)
        else:
            a, b = angles.a, angles.b
            sig = torch.sigmoid(self.angle(angles.rbf) + fe.index_select(0, a) + ge.index_select(0, b))
            msg = torch.cat([sig * qe.index_select(0, b), sig], 1)
            num, den = msg.new_zeros(e.shape[0], msg.shape[1]).index_add_(0, a, msg).chunk(2, dim=1)
        de = self.drop(self.act(self.norm(pe + num / (den + EPS))))
        return e + de if self.residual else de


# the model ---------------------------------------------------------------------------------------------
@dataclass
class EGCNNParams(ModelParams):
    angles: bool = option(False, doc="add the bond-angle line-graph update")
    angle_bins: int = option(16, lo=2, hi=128, doc="Gaussians on cos theta")
    angle_layers: int | None = option(
        None, lo=0, hi=64, doc="how many of the first layers get the angle update (null or more than layers: all)"
    )
    activation: Activation = option("silu", doc="activation of the atom, bond and angle updates")


@MODELS.register("egcnn")
class EGCNN(CrystalModel):
    """Edge-gated crystal network (see the module docstring)."""

    Params = EGCNNParams

    def build_backbone(self) -> None:
        c, p = self.config, self.params
        self.edge_embedding = nn.Sequential(nn.Linear(self.edge_dim, c.hidden), make_activation(p.activation))
        # every parameter takes part in the loss (DDP runs without find_unused_parameters): the last layer
        # does not update the bonds
        self.convs = nn.ModuleList(
            EdgeGatedConv(c.hidden, c.norm, c.residual, c.dropout, p.activation, update_edges=i < c.layers - 1)
            for i in range(c.layers)
        )
        n_angle = 0
        if p.angles:
            n_angle = c.layers if p.angle_layers is None else min(p.angle_layers, c.layers)
        self.angle_basis = AngleBasis(p.angle_bins) if n_angle else None
        self.angle_updates = nn.ModuleList(
            AngleUpdate(c.hidden, p.angle_bins, c.norm, c.residual, c.dropout, p.activation) for _ in range(n_angle)
        )

    def angle_graph(self, edge_index: torch.Tensor, batch: Batch, n: int) -> AngleGraph:
        if batch.vec is None:
            raise CrystaltuneError("egcnn: angles need bond vectors (Batch.vec), and this batch has none")
        if batch.degree:
            return AngleGraph(self.angle_basis(bond_cosines(batch.vec, edge_index[1], n, batch.degree)), batch.degree)
        a, b, cos = bond_cosines(batch.vec, edge_index[1], n)
        return AngleGraph(self.angle_basis(cos), 0, a=a, b=b)

    def message_passing(self, x, edge_index, e, batch):
        e = self.edge_embedding(e)
        angles = self.angle_graph(edge_index, batch, x.shape[0]) if len(self.angle_updates) else None
        for i, conv in enumerate(self.convs):
            if i < len(self.angle_updates):
                e = self.angle_updates[i](e, angles)
            x, e = conv(x, edge_index, e, batch.degree)
        return x


__all__ = ["EGCNN", "AngleBasis", "bond_cosines", "bond_pairs"]
