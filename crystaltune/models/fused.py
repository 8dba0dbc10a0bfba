"""A fused CGCNN convolution for training with batch norm: the edge work of one :class:`CGConv` as one
autograd node with a hand-written backward.

Autograd spends most of a CPU step on the (E, 2 dim) edge tensors: the broadcast of ``A x`` per edge
is copied, the filter/core split is concatenated back in the backward, the neighbour sum's gradient
is materialised, and each elementwise op keeps its own buffer. Here the forward writes the edge
pre-activation once (in place), batch norm runs as ATen's kernels (same numbers and running-stat
update as ``nn.BatchNorm1d``), the two derivatives of the messages are kept (in place of buffers the
forward made anyway), and the backward turns the incoming gradient into the pre-activation's with
two products. Measured on perovskites (batch 256, hidden 64, 2 CPU threads): about 1.2x per epoch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def batch_norm_factor(bn: nn.BatchNorm1d) -> float:
    """Count the batch and return the running-stat momentum, as ``nn.BatchNorm1d.forward`` does in training."""
    if bn.num_batches_tracked is None:
        return 0.0 if bn.momentum is None else bn.momentum
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


def can_fuse(bn: nn.Module, x: torch.Tensor) -> bool:
    """The fused path covers CPU training with batch norm (affine, running stats), without autocast;
    a GPU keeps the autograd path."""
    return (
        x.device.type == "cpu"
        and isinstance(bn, nn.BatchNorm1d)
        and bn.training
        and bn.track_running_stats
        and bn.affine
        and not torch.is_autocast_enabled(x.device.type)
    )


def _pre_activation(x, weight, bias, e, src, dst, dim: int, degree: int) -> torch.Tensor:
    """``(A x + b)[dst] + (B x)[src] + C e``, written once into a fresh (E, 2 dim) tensor."""
    ax = torch.addmm(bias, x, weight[:, :dim].t())
    bx = x @ weight[:, dim : 2 * dim].t()
    z = bx.index_select(0, src).addmm_(e, weight[:, 2 * dim :].t())
    if degree:
        z.view(x.shape[0], degree, -1).add_(ax.unsqueeze(1))
    else:
        z.add_(ax.index_select(0, dst))
    return z


def _sum_target(t: torch.Tensor, dst: torch.Tensor, n: int, degree: int) -> torch.Tensor:
    """Per-target-atom sum of edge rows (a view-sum with a uniform degree, else index_add)."""
    if degree:
        return t.view(n, degree, -1).sum(1)
    return t.new_zeros(n, t.shape[1]).index_add_(0, dst, t)


def _target_rows(t: torch.Tensor, dst: torch.Tensor, degree: int) -> torch.Tensor:
    """``t[dst]`` as (n, k, c) broadcast with a uniform degree, else gathered (E, c)."""
    return t.unsqueeze(1) if degree else t.index_select(0, dst)


class FusedGatedConv(torch.autograd.Function):
    """``sum_j sigmoid(f_ij) * softplus(c_ij)`` per centre atom, ``[f, c] = BN(W [x_i, x_j, e_ij] + b)``.

    Inputs: x (N, d), weight (2d, 2d + edge_dim), bias (2d), e (E, edge_dim), gamma/beta (2d) of the
    batch norm, edge_index, its running stats, momentum and eps, and the uniform degree (0: none)."""

    @staticmethod
    def forward(ctx, x, weight, bias, e, gamma, beta, edge_index, running_mean, running_var, momentum, eps, degree):
        src, dst = edge_index
        n, dim = x.shape
        z = _pre_activation(x, weight, bias, e, src, dst, dim, degree)
        y, mean, invstd = torch.native_batch_norm(z, gamma, beta, running_mean, running_var, True, momentum, eps)
        msg = F.softplus(y[:, dim:])
        y.sigmoid_()  # [sigmoid(f), sigmoid(c)]: the gate, and softplus' derivative
        gate = y[:, :dim]
        msg.mul_(gate)
        out = _sum_target(msg, dst, n, degree)
        # what the backward multiplies the incoming gradient by, made in place of the messages and of y:
        # d msg / d f = msg (1 - sigmoid(f)) and d msg / d c = sigmoid(f) sigmoid(c)
        msg.addcmul_(msg, gate, value=-1.0)
        y[:, dim:].mul_(gate)
        ctx.save_for_backward(x, weight, e, edge_index, gamma, z, y, msg, mean, invstd)
        ctx.dims = (dim, degree, eps)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, e, edge_index, gamma, z, y, d_gate, mean, invstd = ctx.saved_tensors
        dim, degree, eps = ctx.dims
        src, dst = edge_index
        n = x.shape[0]
        grad_y = _activation_grad(grad_out, d_gate, y[:, dim:], dst, dim, degree)
        grad_z, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
            grad_y, z, gamma, None, None, mean, invstd, True, eps, [True, True, True]
        )
        del grad_y
        grad_ax = _sum_target(grad_z, dst, n, degree)
        grad_bx = grad_z.new_zeros(n, 2 * dim).index_add_(0, src, grad_z)
        grad_x = torch.addmm(grad_ax @ weight[:, :dim], grad_bx, weight[:, dim : 2 * dim])
        # e^T grad_z, transposed after: MKL runs this long-K product faster than grad_z^T e
        grad_w = torch.cat([grad_ax.t() @ x, grad_bx.t() @ x, (e.t() @ grad_z).t()], 1)
        grad_e = grad_z @ weight[:, 2 * dim :] if ctx.needs_input_grad[3] else None
        return grad_x, grad_w, grad_ax.sum(0), grad_e, grad_gamma, grad_beta, None, None, None, None, None, None


def _activation_grad(grad_out, d_gate, d_core, dst, dim: int, degree: int) -> torch.Tensor:
    """Gradient w.r.t. the normalised pre-activation [f, c]: the incoming gradient of each edge's
    target atom times the saved derivatives (E, dim) of its message by f and by c."""
    g = _target_rows(grad_out, dst, degree)
    shape = (-1, degree, dim) if degree else (-1, dim)
    grad_y = d_gate.new_empty(d_gate.shape[0], 2 * dim)
    torch.mul(d_gate.view(shape), g, out=grad_y[:, :dim].view(shape))
    torch.mul(d_core.view(shape), g, out=grad_y[:, dim:].view(shape))
    return grad_y


def fused_gated_conv(conv: nn.Module, x: torch.Tensor, edge_index: torch.Tensor, e: torch.Tensor, degree: int):
    """The summed messages of ``conv`` (a CGConv in training mode, before ``bn2``) by FusedGatedConv."""
    bn, fc = conv.bn1, conv.fc_full
    return FusedGatedConv.apply(
        x,
        fc.weight,
        fc.bias,
        e,
        bn.weight,
        bn.bias,
        edge_index,
        bn.running_mean,
        bn.running_var,
        batch_norm_factor(bn),
        bn.eps,
        degree,
    )
