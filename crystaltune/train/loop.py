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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import Normalizer, save_checkpoint
from ..config import TrialConfig
from ..errors import CrystaltuneError
from ..graphs.device_store import DeviceGraphStore, on_device
from ..losses import Loss
from ..models import build_model
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


def fit(cfg: TrialConfig, report: Report | None = None, *, data: TrialData | None = None,
        resume: dict[str, Any] | None = None, checkpoint_every_epoch: bool = False, verbose: bool = False,
        device_store: bool | None = None) -> dict[str, Any]:
    """Train one configuration; returns the final summary (best-val epoch's test metrics).
    ``device_store``: gather batches from a copy of the graphs on the training device (default: on a
    GPU when the graphs fit its budget; True forces it, also on the CPU, as the tests do)."""
    t = cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
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
    normalizer = Normalizer.fit(y_train)
    model = build_model(copy.deepcopy(cfg.model), len(targets), cfg.data.cutoff).to(device)
    per_rank = max(1, t.batch_size // world)
    steps = max(1, len(data.train) // (per_rank * world))  # equal for every rank (DDP needs that)
    optimizer, scheduler = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], steps)
    loss_fn = Loss(cfg.loss)
    use_amp = t.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    start_epoch, best, best_state, history = 0, {"val_mae": math.inf}, None, []
    if resume is not None:  # a Ray Train retry: continue from the last epoch checkpoint
        state = resume
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, best_state, history = state["epoch"] + 1, state["best"], state["best_state"], state["history"]
        torch.set_rng_state(state["torch_rng"])
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    bad_epochs = 0
    for epoch in range(start_epoch, t.epochs):
        t0 = time.perf_counter()
        order = np.random.default_rng([t.seed, epoch]).permutation(data.train)
        model.train()
        abs_err, count = torch.zeros(len(targets)), torch.zeros(len(targets))
        seen = 0
        for s in range(steps):
            idx = order[(s * world + rank) * per_rank:(s * world + rank + 1) * per_rank]
            batch = batches.batch(idx, targets).to(device)
            seen += len(idx)
            y = normalizer.norm(batch.y)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                pred = train_model(batch)
            loss, _ = loss_fn(pred.float(), y)
            bad = not torch.isfinite(loss)
            if world > 1:  # every rank must stop together, or the others wait forever in all-reduce
                flag = torch.tensor([float(bad)], device=device if device.type == "cuda" else "cpu")
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                bad = bool(flag.item())
            if bad:
                raise TrialDiverged(f"loss became {float(loss.detach())} at epoch {epoch + 1}, step {s + 1} (lr {optimizer.param_groups[0]['lr']:.3g})")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.optim.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step()
            with torch.no_grad():
                err = (normalizer.denorm(pred.detach().float()) - batch.y).abs().cpu()
                m = torch.isfinite(err)
                abs_err += torch.where(m, err, 0).sum(0)
                count += m.sum(0)
        train_time = time.perf_counter() - t0
        if world > 1:
            stats = torch.cat([abs_err, count]).to(device if device.type == "cuda" else "cpu")
            dist.all_reduce(stats)
            abs_err, count = stats.cpu()[: len(targets)], stats.cpu()[len(targets):]
        train_mae = float((abs_err / count.clamp_min(1))[count > 0].mean())
        pv, yv = predict_indices(model, batches, data.val, targets, normalizer, device, t.eval_batch_size)
        val = regression_metrics(pv, yv, targets, "val")
        if not math.isfinite(val["val_mae"]):
            raise TrialDiverged(f"validation MAE is {val['val_mae']} at epoch {epoch + 1}")
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val["val_mae"])
        improved = val["val_mae"] < best["val_mae"]
        if improved:
            bad_epochs = 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            pt, yt = predict_indices(model, batches, data.test, targets, normalizer, device, t.eval_batch_size)
            best = {"val_mae": val["val_mae"], "best_epoch": epoch + 1,
                    **regression_metrics(pt, yt, targets, "test"),
                    **embedding_metrics(model, store, data.test, device, seed=t.seed)}
        else:
            bad_epochs += 1
        epoch_time = time.perf_counter() - t0
        metrics = {
            "epoch": epoch + 1, "train_mae": train_mae, **val, "lr": optimizer.param_groups[0]["lr"],
            "epoch_time_s": epoch_time, "graphs_per_s": seen * world / train_time,
            "best_val_mae": best["val_mae"], **{k: v for k, v in best.items() if k != "val_mae"},
        }
        history.append({k: metrics[k] for k in ("epoch", "train_mae", "val_mae", "lr")})
        stop = t.early_stopping is not None and bad_epochs >= t.early_stopping
        metrics["done"] = bool(stop or epoch + 1 == t.epochs)
        if verbose and rank == 0:
            print(f"epoch {epoch + 1:3d}/{t.epochs}  train_mae {train_mae:.4f}  val_mae {val['val_mae']:.4f}  "
                  f"lr {metrics['lr']:.2e}  {metrics['graphs_per_s']:.0f} graphs/s{'  *' if improved else ''}", flush=True)
        if report is not None:
            if checkpoint_every_epoch:
                with tempfile.TemporaryDirectory() as tmp:
                    if rank == 0:
                        _write_epoch_checkpoint(tmp, model, optimizer, scheduler, epoch, best, best_state, history, cfg,
                                                normalizer, targets)
                    report(metrics, tmp if rank == 0 else None)
            else:
                report(metrics, None)
        if stop:
            break

    summary = {**best, "epochs_run": len(history), "targets": targets, "train_size": int(len(data.train)),
               "val_size": int(len(data.val)), "test_size": int(len(data.test))}
    if cfg.output and rank == 0 and best_state is not None:
        model.load_state_dict(best_state)
        save_checkpoint(cfg.output, model, cfg, normalizer, targets, metrics=summary)
    return summary


def load_epoch_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The resume state written by _write_epoch_checkpoint."""
    return torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=True)


def _write_epoch_checkpoint(directory, model, optimizer, scheduler, epoch, best, best_state, history, cfg, normalizer, targets):
    """state.pt (everything to resume) and best.pt (the best-val model, a crystaltune checkpoint)."""
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "epoch": epoch, "best": best, "best_state": best_state, "history": history,
                "torch_rng": torch.get_rng_state()}, Path(directory) / "state.pt")
    if best_state is not None:
        current = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best_state)
        save_checkpoint(Path(directory) / "best.pt", model, cfg, normalizer, targets, metrics=best)
        model.load_state_dict(current)
