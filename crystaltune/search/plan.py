"""Per-trial resources from what the machine or cluster has: ``auto`` amounts are planned, explicit
ones checked, and a trial that can never fit is refused with one line instead of waiting forever.

With GPUs, ``auto`` packs ``TRIALS_PER_GPU`` one-worker trials on each GPU (Ray's fractional GPUs):
a CGCNN-sized trial leaves most of a GPU idle (one trial at batch 256 used ~27.8k graphs/s on an H100,
four processes sharing it 66.8k: STACK-NOTES), and each trial gets an equal share of the CPU cores for
its threads. Without GPUs, ``auto`` means one CPU per trial and as many trials as cores.
"""

from __future__ import annotations

from ..errors import CrystaltuneError

TRIALS_PER_GPU = 4


def resolve_auto(space, res: dict[str, float], trials_per_gpu: int | None = None) -> None:
    """Fill ``auto`` (None) resource amounts of ``space`` in place from cluster resources ``res``."""
    gpus, cpus = res.get("GPU", 0.0), res.get("CPU", 1.0)
    per_gpu = trials_per_gpu or TRIALS_PER_GPU
    if space.gpus_per_worker is None:
        space.gpus_per_worker = (1.0 / per_gpu if space.workers == 1 else 1.0) if gpus >= 1 else 0.0
    if space.cpus_per_worker is None:
        slots = gpus / (space.workers * space.gpus_per_worker) if space.gpus_per_worker else cpus / space.workers
        space.cpus_per_worker = float(max(1, int(cpus // max(slots, 1))))


def plan_concurrency(space, res: dict[str, float]) -> int:
    """How many trials run at once on resources ``res``; a CrystaltuneError naming both sides when one
    trial can never fit (Ray would otherwise wait for resources forever)."""
    cpu = (1 + space.workers * space.cpus_per_worker) if space.uses_ray_train else space.cpus_per_worker
    gpu = space.workers * space.gpus_per_worker
    how = f"{space.workers} worker(s) x {space.cpus_per_worker:g} CPU" + (
        " + 1 for the trial's driver" if space.uses_ray_train else ""
    )
    if gpu > res.get("GPU", 0):
        raise CrystaltuneError(
            f"each trial needs {gpu:g} GPU(s) ({space.workers} worker(s) x {space.gpus_per_worker:g}); "
            f"the cluster has {res.get('GPU', 0):g}: use --gpus-per-worker 0 to train on CPUs"
        )
    if cpu > res.get("CPU", 0):
        raise CrystaltuneError(
            f"each trial needs {cpu:g} CPUs ({how}); the cluster has {res.get('CPU', 0):g}: lower "
            "resources.cpus_per_worker (--cpus-per-worker) or --workers-per-trial, or start Ray with "
            "more (--num-cpus)"
        )
    fits = int(res["CPU"] // cpu)
    return max(1, min(fits, int(res.get("GPU", 0) // gpu)) if gpu else fits)
