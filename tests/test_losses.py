"""Losses: registry, masking, and the Gaussian KL term against a numeric estimate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crystaltune.config import LossConfig
from crystaltune.errors import CrystaltuneError
from crystaltune.losses import LOSSES, Loss, gaussian_kl


def numeric_kl(mu_p, s_p, mu_t, s_t):
    """KL(p||q) by quadrature of p log(p/q) on a fine grid."""
    x = np.linspace(min(mu_p, mu_t) - 12 * max(s_p, s_t), max(mu_p, mu_t) + 12 * max(s_p, s_t), 400001)
    logp = -0.5 * ((x - mu_p) / s_p) ** 2 - np.log(s_p * np.sqrt(2 * np.pi))
    logq = -0.5 * ((x - mu_t) / s_t) ** 2 - np.log(s_t * np.sqrt(2 * np.pi))
    return np.trapezoid(np.exp(logp) * (logp - logq), x)


@pytest.mark.parametrize("seed", range(4))
def test_gaussian_kl_matches_numeric_integral(seed):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(500, generator=g) * (0.3 + seed * 0.4) + seed * 0.2
    y = torch.randn(500, generator=g) * 1.1 - 0.3
    kl = float(gaussian_kl(pred, y))
    mu_p, s_p = pred.mean().item(), pred.std(unbiased=False).item()
    mu_t, s_t = y.mean().item(), y.std(unbiased=False).item()
    assert kl == pytest.approx(numeric_kl(mu_p, s_p, mu_t, s_t), rel=1e-3, abs=1e-5)
    assert float(gaussian_kl(y, y)) == pytest.approx(0.0, abs=1e-5)


def test_weighted_is_the_notes_blend():
    p, y = torch.tensor([[0.0], [3.0]]), torch.tensor([[1.0], [0.0]])
    expected = 0.4 * ((p - y) ** 2).mean() + 0.4 * (p - y).abs().mean() + 0.2 * torch.nn.functional.huber_loss(p, y)
    total, _ = Loss(LossConfig("weighted"))(p, y)
    assert float(total) == pytest.approx(float(expected))


def test_masked_multi_target_loss_ignores_missing():
    pred = torch.tensor([[1.0, 5.0], [2.0, 100.0]])
    y = torch.tensor([[1.5, 4.0], [2.5, float("nan")]])
    total, _ = Loss(LossConfig("l1"))(pred, y)
    assert float(total) == pytest.approx((0.5 + 1.0) / 2)


def test_kl_weight_adds_the_term():
    pred, y = torch.randn(64, 1), torch.randn(64, 1) * 2
    base, _ = Loss(LossConfig("mse"))(pred, y)
    with_kl, parts = Loss(LossConfig("mse", kl=True, kl_weight=0.5))(pred, y)
    assert float(with_kl) == pytest.approx(float(base) + 0.5 * parts["kl"], rel=1e-5)


def test_unknown_loss():
    assert set(LOSSES.names()) == {"l1", "mse", "huber", "weighted"}
    with pytest.raises(CrystaltuneError, match="did you mean 'huber'"):
        Loss(LossConfig("hubber"))
