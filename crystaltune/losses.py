"""Loss registry (l1, mse, huber, weighted) with an optional Gaussian KL regulariser; masked for
missing targets, computed on normalised targets.

Gaussian KL: with (mu_p, s_p) the mean and standard deviation of a batch's normalised predictions
and (mu_t, s_t) those of its normalised targets (per target, over the entries present),

    KL(N(mu_p, s_p^2) || N(mu_t, s_t^2)) = log(s_t / s_p) + (s_p^2 + (mu_p - mu_t)^2) / (2 s_t^2) - 1/2

which is zero when the predicted distribution matches the target distribution's first two moments;
``kl_weight`` scales it. It discourages predictions collapsing towards the mean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from .registry import Registry

if TYPE_CHECKING:  # config imports this registry (lazily), never the reverse
    from .config import LossConfig

LOSSES: Registry[Callable[..., torch.Tensor]] = Registry("loss")
EPS = 1e-6


@LOSSES.register("l1")
def l1(pred, y, delta=1.0):
    """Mean absolute error (elementwise)."""
    return (pred - y).abs()


@LOSSES.register("mse")
def mse(pred, y, delta=1.0):
    return (pred - y) ** 2


@LOSSES.register("huber")
def huber(pred, y, delta=1.0):
    return F.huber_loss(pred, y, reduction="none", delta=delta)


@LOSSES.register("weighted")
def weighted(pred, y, delta=1.0):
    """0.4 mse + 0.4 l1 + 0.2 huber (the original notes' blend)."""
    return 0.4 * mse(pred, y) + 0.4 * l1(pred, y) + 0.2 * huber(pred, y, delta)


def gaussian_kl(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Closed-form KL between Gaussians moment-matched to ``pred`` and to ``y`` (1-D, >= 2 values)."""
    mu_p, mu_t = pred.mean(), y.mean()
    var_p, var_t = pred.var(unbiased=False) + EPS, y.var(unbiased=False) + EPS
    return 0.5 * torch.log(var_t / var_p) + (var_p + (mu_p - mu_t) ** 2) / (2 * var_t) - 0.5


class Loss:
    """Masked, per-target averaged loss on normalised values, plus ``kl_weight`` x Gaussian KL."""

    def __init__(self, config: LossConfig):
        self.fn = LOSSES.get(config.name)
        self.kl_weight = float(config.kl_weight) if config.kl else 0.0
        self.delta = float(config.huber_delta)

    def __call__(self, pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        mask = torch.isfinite(y)
        y0 = torch.where(mask, y, torch.zeros_like(y))
        per = self.fn(pred, y0, self.delta) * mask
        counts = mask.sum(0).clamp_min(1)
        present = mask.any(0)
        base = ((per.sum(0) / counts)[present]).mean()
        parts = {"base": float(base.detach())}
        total = base
        if self.kl_weight > 0:
            kls = [
                gaussian_kl(pred[mask[:, t], t], y[mask[:, t], t]) for t in range(y.shape[1]) if mask[:, t].sum() >= 2
            ]
            if kls:
                kl = torch.stack(kls).mean()
                parts["kl"] = float(kl.detach())
                total = total + self.kl_weight * kl
        return total, parts
