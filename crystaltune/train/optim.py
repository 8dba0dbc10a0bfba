"""Optimisers and learning-rate schedules by name: one registry each, read by config validation and
by the training loop alike, so a name is valid exactly when something can be built from it."""

from __future__ import annotations

import torch

from ..registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")
SCHEDULES: Registry = Registry("schedule")

OPTIMIZERS.register("sgd")(
    lambda params, o: torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
)
OPTIMIZERS.register("adam")(lambda params, o: torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay))
OPTIMIZERS.register("adamw")(lambda params, o: torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay))

# each: (optimizer, optim config, total epochs, steps per epoch) -> scheduler or None
SCHEDULES.register("cosine")(
    lambda opt, o, epochs, steps: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
)
SCHEDULES.register("onecycle")(
    lambda opt, o, epochs, steps: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=o.lr, total_steps=epochs * steps)
)
SCHEDULES.register("plateau")(
    lambda opt, o, epochs, steps: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=5)
)
SCHEDULES.register("step")(
    lambda opt, o, epochs, steps: torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[m * steps for m in o.milestones], gamma=0.1
    )
)
SCHEDULES.register("none")(lambda opt, o, epochs, steps: None)


def make_optimizer(cfg, params, steps_per_epoch: int):
    """The trial's optimiser and its (per-step) schedule."""
    o = cfg.optim
    opt = OPTIMIZERS.get(o.name)(params, o)
    return opt, SCHEDULES.get(o.schedule)(opt, o, cfg.train.epochs, steps_per_epoch)
