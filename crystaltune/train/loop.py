"""fit(config): one trial's training, the same standalone and as a Ray Train worker.

Standalone, metrics go to a callback; in a Ray Train worker group (world size > 1) the model is
wrapped for DDP (gloo on CPU, NCCL on GPU), each rank trains on its shard with batch_size / world
crystals per step (the same effective batch), and every epoch is reported with a checkpoint. The
test metrics of the best-val model are re-evaluated whenever val improves and sent with every
report, because a trial stopped early by ASHA never reaches code after its last epoch.
"""

from __future__ import annotations

import copy
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import save_checkpoint
from ..config import TrialConfig
from ..domain import domain_of
from ..errors import CrystaltuneError
from ..graphs.device_store import DeviceGraphStore, on_device
from ..losses import Loss
from ..models import build_model
from ..normalizer import Normalizer
from . import averaging
from .malloc import keep_freed_memory
from .metrics import embedding_metrics, predict_indices, regression_metrics
from .optim import make_optimizer
from .trial_data import TrialData, prepare_trial_data

Report = Callable[[dict[str, Any], str | None], None]


class TrialDiverged(RuntimeError):
    """The loss became NaN/inf: the trial is recorded as failed with this reason."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise CrystaltuneError("train.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class Run:
    """What stays fixed while one configuration trains: config, data, device, model, DDP layout."""

    cfg: TrialConfig
    data: TrialData
    batches: Any  # GraphStore or DeviceGraphStore: anything with .batch(index, targets)
    device: torch.device
    model: torch.nn.Module
    train_model: torch.nn.Module  # the model, or its DDP wrapper
    normalizer: Normalizer
    loss_fn: Loss
    world: int
    rank: int
    per_rank: int
    steps: int
    use_amp: bool
    amp_dtype: torch.dtype
    domain: dict[str, Any]  # training elements and target ranges, saved with every checkpoint (domain.py)


@dataclass
class TrainingState:
    """What changes from epoch to epoch: saved in every epoch checkpoint and restored as one object,
    so that a retried trial continues exactly as if it had never stopped."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    epoch: int = 0  # the next epoch to run
    best: dict[str, Any] = field(default_factory=lambda: {"val_mae": math.inf})
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    bad_epochs: int = 0
    averaged: Any = None  # torch.optim.swa_utils.AveragedModel with train.averaging (averaging.py)

    def state_dict(self, model: torch.nn.Module) -> dict[str, Any]:
        """Everything to resume, written after epoch ``self.epoch`` (0-based) ran and before the counter
        moves on. Batch order needs no state: it is drawn from (seed, epoch) alone (train_epoch)."""
        saved = {
            "model": model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),  # {} when disabled (no fp16 autocast)
            "epoch": self.epoch,
            "best": self.best,
            "best_state": self.best_state,
            "history": self.history,
            "bad_epochs": self.bad_epochs,
            "averaged": self.averaged.state_dict() if self.averaged is not None else None,
            "torch_rng": torch.get_rng_state(),  # dropout on the CPU
        }
        device = _device_of(model)
        if device.type == "cuda":
            saved["cuda_rng"] = torch.cuda.get_rng_state(device)  # dropout on the GPU
        return saved

    def load_state_dict(self, model: torch.nn.Module, saved: dict[str, Any]) -> None:
        """Continue from ``state_dict``'s output (a Ray Train retry or a resumed search)."""
        model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scheduler is not None and saved.get("scheduler"):
            self.scheduler.load_state_dict(saved["scheduler"])
        if saved.get("scaler"):  # ignored by a disabled scaler (a retry without fp16)
            self.scaler.load_state_dict(saved["scaler"])
        self.epoch = saved["epoch"] + 1
        self.best, self.best_state, self.history = saved["best"], saved["best_state"], saved["history"]
        self.bad_epochs = saved["bad_epochs"]
        if self.averaged is not None:
            self.averaged.load_state_dict(saved["averaged"])
        torch.set_rng_state(saved["torch_rng"])
        device = _device_of(model)
        if device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)


def _device_of(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are (whose CUDA RNG its dropout draws from)."""
    return next(model.parameters(), torch.empty(0)).device


def _patience_spent(cfg: TrialConfig, state: TrainingState) -> bool:
    """Early stopping: ``train.early_stopping`` epochs in a row without a better val MAE."""
    return cfg.train.early_stopping is not None and state.bad_epochs >= cfg.train.early_stopping


def fit(
    cfg: TrialConfig,
    report: Report | None = None,
    *,
    data: TrialData | None = None,
    resume: dict[str, Any] | None = None,
    checkpoint_every_epoch: bool = False,
    verbose: bool = False,
    device_store: bool | None = None,
) -> dict[str, Any]:
    """Train one configuration; returns the final summary (best-val epoch's test metrics).
    ``device_store``: gather batches from a copy of the graphs on the training device (default: on a
    GPU when the graphs fit its budget; True forces it, also on the CPU, as the tests do)."""
    run, state = setup(cfg, data, device_store)
    if resume is not None:
        state.load_state_dict(run.model, resume)
    # a trial resumed from the checkpoint of the epoch that ended it early has nothing left to train
    while state.epoch < cfg.train.epochs and not _patience_spent(cfg, state):
        t0 = time.perf_counter()
        train_mae, seen, train_time = train_epoch(run, state)
        val = evaluate(run, state)
        improved = update_best(run, state, val)
        metrics = {
            "epoch": state.epoch + 1,
            "train_mae": train_mae,
            **val,
            "lr": state.optimizer.param_groups[0]["lr"],
            "epoch_time_s": time.perf_counter() - t0,
            "graphs_per_s": seen * run.world / train_time,
            "best_val_mae": state.best["val_mae"],
            **{k: v for k, v in state.best.items() if k != "val_mae"},
        }
        state.history.append({k: metrics[k] for k in ("epoch", "train_mae", "val_mae", "lr")})
        stop = _patience_spent(cfg, state)
        metrics["done"] = bool(stop or state.epoch + 1 == cfg.train.epochs)
        if verbose and run.rank == 0:
            print(
                f"epoch {state.epoch + 1:3d}/{cfg.train.epochs}  train_mae {train_mae:.4f}  "
                f"val_mae {val['val_mae']:.4f}  "
                f"lr {metrics['lr']:.2e}  {metrics['graphs_per_s']:.0f} graphs/s{'  *' if improved else ''}",
                flush=True,
            )
        if report is not None:
            _report(run, state, report, metrics, checkpoint_every_epoch)
        state.epoch += 1
        if stop:
            break
    return finish(run, state)


def setup(cfg: TrialConfig, data: TrialData | None, device_store: bool | None) -> tuple[Run, TrainingState]:
    """Seed, device, data, model (DDP-wrapped when several ranks), optimiser and schedule."""
    t = cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    keep_freed_memory()  # a CPU step frees and reallocates tens of MB: keep them in the process
    seed_everything(t.seed)
    device = pick_device(t.device)
    data = data if data is not None else prepare_trial_data(cfg)
    if len(data.train) == 0 or len(data.val) == 0:
        raise CrystaltuneError(f"{data.name}: the split leaves no training or validation crystals")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    store, targets = data.store, data.targets
    if device_store is None:
        batches = on_device(store, device) or store
    else:
        batches = DeviceGraphStore(store, device) if device_store else store
    y_train = torch.from_numpy(np.stack([store.props[k][data.train] for k in targets], 1)).float()
    model = build_model(copy.deepcopy(cfg.model), len(targets), cfg.data.cutoff).to(device)
    per_rank = max(1, t.batch_size // world)
    steps = max(1, len(data.train) // (per_rank * world))  # equal for every rank (DDP needs that)
    optimizer, scheduler = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], steps)
    use_amp = t.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    run = Run(
        cfg,
        data,
        batches,
        device,
        model,
        train_model,
        Normalizer.fit(y_train),
        Loss(cfg.loss),
        world,
        rank,
        per_rank,
        steps,
        use_amp,
        amp_dtype,
        domain_of(data),
    )
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    return run, TrainingState(optimizer, scheduler, scaler, averaged=averaging.make_averaged(t, model))


def train_epoch(run: Run, state: TrainingState) -> tuple[float, int, float]:
    """One pass over this rank's share of the training crystals: (train MAE, graphs seen, seconds).
    Per-step errors stay on the device; they are summed and read once, after the epoch."""
    t0, cfg, targets = time.perf_counter(), run.cfg, run.data.targets
    order = np.random.default_rng([cfg.train.seed, state.epoch]).permutation(run.data.train)
    run.model.train()
    abs_err = torch.zeros(len(targets), device=run.device)
    count = torch.zeros(len(targets), device=run.device)
    seen = 0
    for s in range(run.steps):
        lo = (s * run.world + run.rank) * run.per_rank
        batch = run.batches.batch(order[lo : lo + run.per_rank], targets).to(run.device)
        seen += batch.num_graphs
        pred = _step(run, state, batch, s)
        with torch.no_grad():
            err = (run.normalizer.denorm(pred.detach().float()) - batch.y).abs()
            m = torch.isfinite(err)
            abs_err += torch.where(m, err, 0).sum(0)
            count += m.sum(0)
    if averaging.swa_due(cfg.train, state.epoch):
        state.averaged.update_parameters(run.model)
    train_time = time.perf_counter() - t0
    if run.world > 1:
        stats = torch.cat([abs_err, count])
        dist.all_reduce(stats)
        abs_err, count = stats[: len(targets)], stats[len(targets) :]
    abs_err, count = abs_err.cpu(), count.cpu()
    return float((abs_err / count.clamp_min(1))[count > 0].mean()), seen, train_time


def _step(run: Run, state: TrainingState, batch, s: int) -> torch.Tensor:
    """Forward, loss, a divergence check all ranks agree on, backward, optimiser and schedule step."""
    y = run.normalizer.norm(batch.y)
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.use_amp):
        pred = run.train_model(batch)
    loss, _ = run.loss_fn(pred.float(), y)
    bad = not torch.isfinite(loss)
    if run.world > 1:  # every rank must stop together, or the others wait forever in all-reduce
        flag = torch.tensor([float(bad)], device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = bool(flag.item())
    if bad:
        raise TrialDiverged(
            f"loss became {float(loss.detach())} at epoch {state.epoch + 1}, step {s + 1} "
            f"(lr {state.optimizer.param_groups[0]['lr']:.3g})"
        )
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if run.cfg.optim.grad_clip:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.optim.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if run.cfg.train.averaging == "ema":
        state.averaged.update_parameters(run.model)
    if state.scheduler is not None and not isinstance(state.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        state.scheduler.step()
    return pred


def evaluate(run: Run, state: TrainingState) -> dict[str, float]:
    """Validation metrics after an epoch (and the plateau schedule's step)."""
    pv, yv = predict_indices(
        averaging.evaluated(run.model, state.averaged),
        run.batches,
        run.data.val,
        run.data.targets,
        run.normalizer,
        run.device,
        run.cfg.train.eval_batch_size,
    )
    val = regression_metrics(pv, yv, run.data.targets, "val")
    if not math.isfinite(val["val_mae"]):
        raise TrialDiverged(f"validation MAE is {val['val_mae']} at epoch {state.epoch + 1}")
    if isinstance(state.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        state.scheduler.step(val["val_mae"])
    return val


def update_best(run: Run, state: TrainingState, val: dict[str, float]) -> bool:
    """Keep the weights and test metrics of the best-val epoch; count epochs without improvement."""
    if not val["val_mae"] < state.best["val_mae"]:
        state.bad_epochs += 1
        return False
    state.bad_epochs = 0
    model = averaging.evaluated(run.model, state.averaged)  # the weights this epoch was judged by
    state.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    pt, yt = predict_indices(
        model,
        run.batches,
        run.data.test,
        run.data.targets,
        run.normalizer,
        run.device,
        run.cfg.train.eval_batch_size,
    )
    state.best = {
        "val_mae": val["val_mae"],
        "best_epoch": state.epoch + 1,
        **regression_metrics(pt, yt, run.data.targets, "test"),
        **embedding_metrics(model, run.data.store, run.data.test, run.device, seed=run.cfg.train.seed),
    }
    return True


def _report(run: Run, state: TrainingState, report: Report, metrics: dict[str, Any], with_checkpoint: bool) -> None:
    if not with_checkpoint:
        report(metrics, None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if run.rank == 0:
            _write_epoch_checkpoint(tmp, run, state)
        report(metrics, tmp if run.rank == 0 else None)


def finish(run: Run, state: TrainingState) -> dict[str, Any]:
    """The summary (best-val epoch's metrics); the best weights saved when the config names an output."""
    data = run.data
    summary = {
        **state.best,
        "epochs_run": len(state.history),
        "targets": data.targets,
        "train_size": int(len(data.train)),
        "val_size": int(len(data.val)),
        "test_size": int(len(data.test)),
    }
    if run.cfg.output and run.rank == 0 and state.best_state is not None:
        run.model.load_state_dict(state.best_state)
        save_checkpoint(
            run.cfg.output,
            run.model,
            run.cfg,
            run.normalizer,
            data.targets,
            metrics=summary,
            extra={"domain": run.domain},
        )
    return summary


def load_epoch_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The resume state written by _write_epoch_checkpoint."""
    return torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=True)


def _write_epoch_checkpoint(directory, run: Run, state: TrainingState) -> None:
    """state.pt (everything to resume) and best.pt (the best-val model, a crystaltune checkpoint)."""
    torch.save(state.state_dict(run.model), Path(directory) / "state.pt")
    if state.best_state is not None:
        current = {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()}
        run.model.load_state_dict(state.best_state)
        save_checkpoint(
            Path(directory) / "best.pt",
            run.model,
            run.cfg,
            run.normalizer,
            run.data.targets,
            metrics=state.best,
            extra={"domain": run.domain},
        )
        run.model.load_state_dict(current)
