"""Weight averaging (``train.averaging``): an exponential moving average of the weights over steps
(``ema``, decay ``train.ema_decay``) or an equal average of the end-of-epoch weights over the last
epochs of the schedule (``swa``, from ``train.swa_start`` x epochs on). Validation, the best epoch's
test metrics and the saved checkpoints all use the averaged weights once there are any."""

from __future__ import annotations

import math

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..config import TrainConfig


def make_averaged(train: TrainConfig, model: torch.nn.Module) -> AveragedModel | None:
    """The averaged copy of ``model`` (batch-norm statistics averaged along), or None without averaging."""
    if train.averaging == "ema":
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(train.ema_decay), use_buffers=True)
    if train.averaging == "swa":
        return AveragedModel(model, use_buffers=True)
    return None


def swa_due(train: TrainConfig, epoch: int) -> bool:
    """Whether SWA takes the weights at the end of ``epoch`` (0-based): the epochs from ``swa_start``
    of the schedule on, the last one always."""
    return train.averaging == "swa" and epoch >= min(math.floor(train.swa_start * train.epochs), train.epochs - 1)


def evaluated(model: torch.nn.Module, averaged: AveragedModel | None) -> torch.nn.Module:
    """The weights to evaluate: the average once it has taken any, else the model itself."""
    if averaged is None or int(averaged.n_averaged) == 0:
        return model
    return averaged.module
