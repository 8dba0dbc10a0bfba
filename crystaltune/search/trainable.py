"""What runs inside Ray: the Tune trial functions and the training they share.

``trial_fn`` (executor "train"): the Ray 2.60 / Train V2 pattern for Train inside Tune, a function
trainable that builds a TorchTrainer (W workers, DDP) whose ``TuneReportCallback`` forwards every
worker report to Tune. ``direct_trial_fn`` (executor "direct", the default for one worker): trains in
the Tune trial's own actor, which Tune reuses, so a trial starts in well under a second instead of
the ~10 s a worker group takes to start (the search-overhead figure in the README).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from ..config import TrialConfig
from ..errors import is_disk_full

#: Test-only fault hook: "rank1_exit_epoch2" makes rank 1 exit during epoch 2, once per marker file.
FAULT_ENV = "CRYSTALTUNE_TEST_FAULT"
#: Test clusters of logical GPUs (Ray's fake autoscaler) set this to 1: a trial given a GPU that torch
#: cannot see trains on the CPU there (DDP over gloo) instead of failing as it must on a real node
FAKE_GPUS_ENV = "CRYSTALTUNE_FAKE_GPUS"


def fake_gpus() -> bool:
    return os.environ.get(FAKE_GPUS_ENV) == "1"


def placement(gpu_share: float) -> dict[str, str]:
    """Where this trial runs, for its MLflow run: node id, node type (cluster.yaml's label) and GPU share."""
    from .autoscale import NODE_TYPE_LABEL

    if not ray.is_initialized():  # a trial run outside Ray (tests, the train CLI): nowhere to name
        return {}
    ctx = ray.get_runtime_context()
    labels = ctx.get_node_labels() or {}
    node_type = labels.get(NODE_TYPE_LABEL, "unlabelled")
    return {"node_id": ctx.get_node_id(), "node_type": node_type, "gpu_share": f"{gpu_share:g}"}


def trial_device(config: dict[str, Any]) -> str:
    """``cuda`` where Ray gave the trial a GPU and torch sees one; a GPU torch cannot see is an error
    naming the node (never a silent CPU run), except on a test cluster of logical GPUs."""
    import torch

    if not config.get("use_gpu"):
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if fake_gpus():
        return "cpu"
    from ..errors import CrystaltuneError

    where = config.get("placement") or {}
    raise CrystaltuneError(
        f"Ray assigned GPU(s) {ray.get_gpu_ids()} on node {where.get('node_id', '?')} ({where.get('node_type', '?')}) "
        f"but torch sees no CUDA device there (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, "
        f"torch {torch.__version__}): install the CUDA build of torch on that node type"
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: prepare data from the shared object-store copy, resume, fit, report."""
    import torch

    cfg = TrialConfig.from_dict(config["trial"])
    if config.get("use_gpu") and torch.cuda.is_available():
        torch.cuda.set_device(ray.train.torch.get_device())

    def send(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        )

    run_trial(cfg, config, ray.train.get_checkpoint(), send, rank=ray.train.get_context().get_world_rank())


def run_trial(cfg: TrialConfig, config: dict[str, Any], checkpoint, send, rank: int = 0) -> None:
    """The training shared by both executors: device and threads, data from the object store, resume
    from ``checkpoint``, fit, and every epoch's metrics (+ checkpoint directory) to ``send``."""
    import torch

    from ..train.loop import TrialDiverged, fit, load_epoch_checkpoint
    from ..train.trial_data import prepare_trial_data

    config = {**config, "placement": placement(float(config.get("gpu_share", 0.0)))}
    cfg.train.device = trial_device(config)
    if cfg.train.device == "cpu":
        torch.set_num_threads(max(1, int(config.get("cpus_per_worker", 1))))
    dataset = ray.get(config["data_ref"]) if config.get("data_ref") is not None else None
    data = prepare_trial_data(cfg, dataset)
    resume = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = load_epoch_checkpoint(d)
    fault = os.environ.get(FAULT_ENV, "")
    last_epoch = [resume["epoch"] + 1 if resume else 0]

    reported = [False]

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        _maybe_inject_fault(fault, rank, int(metrics["epoch"]))
        _send_or_wait_on_full_disk(send, {**metrics, **config["placement"]}, checkpoint_dir)
        last_epoch[0] = int(metrics["epoch"])
        reported[0] = True

    try:
        fit(cfg, report=report, data=data, resume=resume, checkpoint_every_epoch=True)
        if not reported[0] and resume is not None and resume.get("history"):
            # resumed from the final epoch's checkpoint (the driver died before it saw the trial end):
            # nothing left to train, so repeat the last result (Tune needs one; the tracker drops duplicates)
            best = resume["best"]
            send({**best, "best_val_mae": best["val_mae"], **resume["history"][-1], "done": True}, None)
    except (TrialDiverged, torch.OutOfMemoryError) as exc:
        # deterministic failures: report them (the trial is recorded as failed with this reason) instead
        # of raising, which would make Ray retry the same doomed run max_failures times
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        send(
            {
                "epoch": last_epoch[0] + 1,
                "val_mae": float("inf"),
                "best_val_mae": float("inf"),
                "trial_failed": reason,
                "done": True,
            },
            None,
        )


def _maybe_inject_fault(fault: str, rank: int, epoch: int) -> None:
    if fault.startswith("hang_epoch"):  # the first trial to reach that epoch hangs there, on every try
        spec, _, marker = fault.partition(":")
        me = tune.get_context().get_trial_id()
        if epoch == int(spec.removeprefix("hang_epoch")) and marker:
            if not Path(marker).exists():
                Path(marker).write_text(me)
            if Path(marker).read_text() == me:
                import time

                time.sleep(3600)
        return
    if not fault.startswith("rank"):
        return
    spec, _, marker = fault.partition(":")
    want_rank, want_epoch = spec.removeprefix("rank").split("_exit_epoch")
    if rank == int(want_rank) and epoch == int(want_epoch) and marker and not Path(marker).exists():
        Path(marker).write_text("fired")
        os._exit(17)


@dataclass
class TrialSettings:
    """How every trial of a search runs, handed to the trainable once: its worker group, where Ray
    Train stores its checkpoints, its retries, and (on --resume) the trials already done."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    train_storage: str | None = None
    max_failures: int = 2
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)  # trial id -> its last result

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def worker_config(self, data_ref) -> dict[str, Any]:
        """What each training worker is told besides the trial's config."""
        return {
            "data_ref": data_ref[0] if data_ref else None,
            "use_gpu": self.use_gpu,
            "gpu_share": self.gpus_per_worker,
            "cpus_per_worker": self.cpus_per_worker,
        }


def finished_before_resume(settings: TrialSettings) -> bool:
    """On --resume: a trial the tracker saw finish after Tune's last snapshot (so Tune restarts it)
    repeats its recorded last result instead of training on; the tracker drops the duplicate."""
    last = settings.finished.get(tune.get_context().get_trial_id())
    if last is None:
        return False
    tune.report({**last, "done": True})
    return True


def trial_fn(config: dict[str, Any], space=None, data_ref=None, settings: TrialSettings | None = None) -> None:
    """The Tune function trainable: one TorchTrainer (W workers, DDP) per trial."""
    from .space import decode_sampled

    settings = settings or TrialSettings()
    if finished_before_resume(settings):
        return
    trial_id = tune.get_context().get_trial_id()
    cfg = space.trial_config(decode_sampled(config, space))
    resources = {"CPU": settings.cpus_per_worker, **({"GPU": settings.gpus_per_worker} if settings.use_gpu else {})}
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"trial": cfg.to_dict(), **settings.worker_config(data_ref)},
        # logical GPUs of a test cluster: Ray must not pick NCCL, which needs CUDA
        torch_config=ray.train.torch.TorchConfig(backend="gloo") if settings.use_gpu and fake_gpus() else None,
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.workers, use_gpu=settings.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",
            storage_path=settings.train_storage,
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def _send_or_wait_on_full_disk(send, metrics: dict[str, Any], checkpoint_dir: str | None, wait_s: float = 120) -> None:
    """A full disk while the epoch checkpoint is stored is not this trial's fault: wait for the driver's
    DiskGuard to stop the search (the trial stays resumable from its last checkpoint) instead of
    failing it; if nothing stops it within ``wait_s`` (a disk the driver does not watch), fail as before."""
    try:
        send(metrics, checkpoint_dir)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        time.sleep(wait_s)
        raise


def direct_trial_fn(config: dict[str, Any], space=None, data_ref=None, settings: TrialSettings | None = None) -> None:
    """The Tune function trainable for one-worker trials: train right here, report to Tune."""
    from .space import decode_sampled

    settings = settings or TrialSettings()
    if finished_before_resume(settings):
        return
    cfg = space.trial_config(decode_sampled(config, space))

    def send(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    run_trial(cfg, settings.worker_config(data_ref), tune.get_checkpoint(), send)
