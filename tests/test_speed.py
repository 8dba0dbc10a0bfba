"""The fused CGCNN convolution (models/fused.py) against the autograd path it replaces in training."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch

import crystaltune.models.cgcnn as cgcnn
from crystaltune.config import ModelConfig
from crystaltune.models import build_model
from crystaltune.models.cgcnn import CGConv


def _edges(n: int, k: int, uniform: bool, seed: int = 0) -> torch.Tensor:
    """Random edges, k per target atom: sorted by target (uniform degree) or shuffled."""
    g = torch.Generator().manual_seed(seed)
    dst = torch.arange(n).repeat_interleave(k)
    src = torch.randint(0, n, (n * k,), generator=g)
    if not uniform:
        perm = torch.randperm(n * k, generator=g)
        dst, src = dst[perm], src[perm]
    return torch.stack([src, dst])


def _run(conv, x, edge_index, e, degree, fused: bool, monkeypatch):
    """Output, input grads, parameter grads and buffers after one forward/backward."""
    with monkeypatch.context() as m:
        if not fused:
            m.setattr(cgcnn, "can_fuse", lambda *a: False)
        x, e = x.clone().requires_grad_(), e.clone().requires_grad_()
        out = conv(x, edge_index, e, degree)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        (out * weights).sum().backward()
    grads = {k: p.grad for k, p in conv.named_parameters()}
    return out, x.grad, e.grad, grads, dict(conv.named_buffers())


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_conv_matches_autograd(uniform, momentum, monkeypatch):
    n, k, dim, edge_dim = 50, 6, 8, 11
    torch.manual_seed(0)
    conv = CGConv(dim, edge_dim).double()
    conv.bn1.momentum = momentum
    with torch.no_grad():
        conv.bn1.weight.uniform_(0.5, 1.5)
        conv.bn1.bias.normal_()
    x, e = torch.randn(n, dim, dtype=torch.float64), torch.rand(n * k, edge_dim, dtype=torch.float64)
    edge_index = _edges(n, k, uniform)
    degree = k if uniform else 0
    twin = copy.deepcopy(conv)
    fused = _run(conv, x, edge_index, e, degree, True, monkeypatch)
    plain = _run(twin, x, edge_index, e, degree, False, monkeypatch)
    for a, b in zip(fused, plain):
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-10, msg=key)
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fused_path_only_in_cpu_batch_norm_training():
    x = torch.zeros(3, 4)
    bn = torch.nn.BatchNorm1d(8)
    assert cgcnn.can_fuse(bn, x)
    assert not cgcnn.can_fuse(bn.eval(), x)
    assert not cgcnn.can_fuse(torch.nn.LayerNorm(8), x)
    assert not cgcnn.can_fuse(torch.nn.BatchNorm1d(8, track_running_stats=False), x)


@pytest.mark.parametrize("name", ["cgcnn", "csgcnn", "flowgnn"])
def test_training_steps_match_autograd(name, monkeypatch):
    """Two SGD steps of a whole model on real crystals: same losses and weights as the autograd path."""
    from crystaltune.data import load_dataset

    ds = load_dataset("perovskites")
    batch = ds.store.batch(np.arange(24), ds.targets)
    assert batch.degree
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, hidden=16, head_hidden=16, layers=2), 1)
    twin = copy.deepcopy(model)
    y = torch.nan_to_num(batch.y[:, :1])

    def train(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        losses = []
        for _ in range(2):
            loss = (m(batch) - y).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    fused_losses = train(model)
    monkeypatch.setattr(cgcnn, "can_fuse", lambda *a: False)
    plain_losses = train(twin)
    np.testing.assert_allclose(fused_losses, plain_losses, rtol=1e-5)
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=key)


def test_keep_freed_memory_is_idempotent():
    from crystaltune.train.malloc import keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() == first
    if sys.platform.startswith("linux"):  # glibc: the thresholds are set
        assert first
    x = torch.ones(2**23)  # 32 MB: allocated and freed as before
    del x
