"""Retraining replicates as jobs: each one an MLflow run of its own, trained in this process or, when
the machine has CPU cores to spare, several at a time in spawned processes with the cores shared out
(on 2 cores two one-thread trainings of small crystal graphs finish sooner than two two-thread ones
in turn)."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

from .config import TrialConfig
from .search import runs


@dataclass
class Job:
    """One replicate to train: its config (seed and fold set), run name, progress label and run tags."""

    cfg: TrialConfig
    name: str
    label: str
    tags: dict[str, str]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_slots() -> int:
    """How many replicates to train at a time here: one per CPU core (at most 8), one with a GPU."""
    import torch

    return 1 if torch.cuda.is_available() else max(1, min(8, _cores()))


def run_jobs(client, exp_id: str, jobs: list[Job], keep_models: bool, log: Callable[[str], None], slots: int = 1):
    """Train every job; returns each one's run id (None for a diverged one), in order. With ``slots`` > 1
    and more than one job, up to ``slots`` train at once, each on its share of the cores."""
    n = min(slots, len(jobs))
    if n <= 1:
        return [train_job(client, exp_id, job, keep_models, log) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, _cores() // n)
    log(f"training {len(jobs)} replicates, {n} at a time ({threads} thread(s) each)")
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_job_in_process, client.tracking_uri, exp_id, j, keep_models, threads) for j in jobs]
        try:
            return [f.result() for f in futures]
        except BaseException:  # Ctrl-C, SIGTERM or a job's error: the queued jobs never start
            _stop_workers(futures)
            raise


def _stop_workers(futures) -> None:
    """Cancel the jobs not started and interrupt the running ones (they close their runs as KILLED and
    exit), so leaving the pool does not wait for trainings nobody will read."""
    import multiprocessing
    import signal

    for f in futures:
        f.cancel()
    for child in multiprocessing.active_children():  # this pool's workers: the retraining starts no others
        with suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGINT)


def _job_in_process(tracking_uri: str, exp_id: str, job: Job, keep_models: bool, threads: int) -> str | None:
    """A spawned process's job: its own MLflow client and torch thread count; progress on stdout."""
    import torch
    from mlflow.tracking import MlflowClient

    torch.set_num_threads(threads)
    try:
        return train_job(
            MlflowClient(tracking_uri), exp_id, job, keep_models, lambda s: print(f"[crystaltune] {s}", flush=True)
        )
    except KeyboardInterrupt:  # the run is closed as KILLED; the worker exits rather than take the next job
        os._exit(130)


def train_job(client, exp_id: str, job: Job, keep_models: bool, log: Callable[[str], None]) -> str | None:
    """One replicate: its MLflow run, per-epoch curves, final metrics (and its checkpoint with
    ``keep_models``); returns the run id, or None for a diverged one (marked FAILED)."""
    from mlflow.entities import Param, RunTag

    from .mlflow_metrics import finite_metrics
    from .train.loop import TrialDiverged, fit

    cfg, label = job.cfg, job.label
    rid = client.create_run(exp_id, run_name=job.name, tags=job.tags).info.run_id
    client.log_batch(rid, params=[Param(k, str(v)[:6000]) for k, v in cfg.used_flat().items()])
    with tempfile.TemporaryDirectory(prefix="ct-retrain-") if keep_models else nullcontext() as tmp:
        if tmp is not None:
            cfg.output = str(Path(tmp) / "best.pt")
        t0 = time.perf_counter()
        try:
            m = fit(cfg, _epoch_logger(client, rid, label, cfg.train.epochs, log))
        except TrialDiverged as exc:
            client.set_tag(rid, runs.ERROR, str(exc)[:5000])
            client.set_terminated(rid, "FAILED")
            log(f"{label}: diverged ({exc})")
            return None
        except BaseException as exc:  # an error or Ctrl-C: the run is closed, never left RUNNING
            client.set_tag(rid, runs.ERROR, f"{type(exc).__name__}: {exc}"[:5000])
            client.set_terminated(rid, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        train_time = time.perf_counter() - t0
        if tmp is not None:
            client.log_artifact(rid, cfg.output, artifact_path=runs.CHECKPOINT_DIR)
    metrics = {**m, "best_val_mae": m["val_mae"], "train_time_s": train_time}
    client.log_batch(
        rid,
        metrics=finite_metrics(metrics, ("test_mae", "test_rmse", "test_r2", "best_val_mae", "train_time_s"), 0),
        tags=[RunTag(runs.EPOCHS_RUN, str(m.get("epochs_run", "")))],
    )
    client.set_terminated(rid, "FINISHED")
    log(f"{label}: val MAE {m['val_mae']:.4f}, test MAE {m['test_mae']:.4f} ({train_time:.0f} s)")
    return rid


def _epoch_logger(client, run_id: str, label: str, epochs: int, log):
    """``fit``'s per-epoch callback for a retrain: epoch curves in MLflow as for a trial, and a progress
    line every tenth of the run."""
    from .mlflow_metrics import finite_metrics

    t0 = time.perf_counter()

    def per_epoch(metrics: dict, _checkpoint) -> None:
        step = int(metrics["epoch"])
        client.log_batch(run_id, metrics=finite_metrics(metrics, ("train_mae", "val_mae", "lr"), step))
        if step % max(1, epochs // 10) == 0:
            log(
                f"{label}: epoch {step}/{epochs}, val MAE {metrics['val_mae']:.4f} "
                f"(best {metrics['best_val_mae']:.4f}), {time.perf_counter() - t0:.0f} s"
            )

    return per_epoch
