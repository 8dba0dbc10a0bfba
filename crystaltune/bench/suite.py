"""``bench all``: the whole speed suite in one JSON document (graphs, cache, training per model,
DDP scaling, search overhead and ASHA's saving, GPU figures when CUDA is present)."""

from __future__ import annotations

import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MODELS = ("cgcnn", "csgcnn", "csgann", "csginn", "flowgnn")


def search_overhead(space: str, workdir: Path, num_samples: int | None = None) -> dict[str, Any]:
    """Run a search and split its wall time into training (sum of epoch times over the trial slots)
    and everything else (Ray start, worker groups, Tune, MLflow, evaluation)."""
    from mlflow.tracking import MlflowClient

    from ..search.engine import SearchOptions, run_search

    old = Path.cwd()
    os.chdir(workdir)
    try:
        t0 = time.perf_counter()
        summary = run_search(SearchOptions(space=space, output=str(workdir / "out"), quiet=True, num_samples=num_samples))
        wall = time.perf_counter() - t0
    finally:
        os.chdir(old)
    client = MlflowClient(summary["tracking_uri"])
    exp = client.get_experiment_by_name(summary["experiment"])
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    train_s = sum(m.value for r in runs for m in client.get_metric_history(r.info.run_id, "epoch_time_s"))
    spans = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs])
    cur = peak = 0
    for _, d in spans:
        cur += d
        peak = max(peak, cur)
    slot_s = summary["search_time_s"] * max(peak, 1)
    return {"space": space, "trials": summary["trials"], "wall_s": wall, "tuner_s": summary["search_time_s"],
            "concurrent_trials": peak, "training_s": train_s,
            "overhead_fraction": 1 - train_s / slot_s if slot_s else math.nan,
            "epochs_run": summary["epochs_run"], "epochs_full_budget": summary["epochs_full_budget"],
            "asha_epoch_fraction": summary["epochs_run"] / summary["epochs_full_budget"]}


def ddp_scaling(limit: int | None, epochs: int) -> dict[str, Any]:
    import ray

    from ..config import TrialConfig
    from ..train.distributed import fit_distributed

    cfg = TrialConfig.from_dict({"data": {"limit": limit}, "train": {"epochs": epochs, "batch_size": 64}})
    out = {}
    ray.init(num_cpus=3, log_to_driver=False)
    try:
        for w in (1, 2):
            t0 = time.perf_counter()
            m = fit_distributed(cfg, num_workers=w)
            out[f"workers_{w}"] = {"graphs_per_s_last_epoch": m["graphs_per_s"], "wall_s": time.perf_counter() - t0,
                                   "val_mae": m["best_val_mae"]}
    finally:
        ray.shutdown()
    out["speedup"] = out["workers_2"]["graphs_per_s_last_epoch"] / out["workers_1"]["graphs_per_s_last_epoch"]
    return out


def bench_all(quick: bool = False, search_space: str = "smoke") -> dict[str, Any]:
    import mlflow
    import ray

    from ..data import load_dataset
    from .graphs import bench_graphs
    from .train import bench_train

    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                           "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                           "mlflow": mlflow.__version__, "quick": quick}
    res["graphs"] = bench_graphs("perovskites", 50 if quick else 300)
    load_dataset("perov5")
    t0 = time.perf_counter()
    load_dataset("perov5")
    res["cache_load_perov5_s"] = time.perf_counter() - t0
    limit, epochs = (256, 2) if quick else (None, 3)
    res["train"] = {m: bench_train("perovskites", m, epochs, 256, 2, limit=limit, reference=(m == "cgcnn"))
                    for m in MODELS}
    res["ddp"] = ddp_scaling(240 if quick else None, 2 if quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        res["search"] = search_overhead(search_space, Path(tmp))
    if torch.cuda.is_available():
        res["gpu"] = {f"{m}_{'amp' if amp else 'fp32'}": bench_train("perovskites", m, 2, 256, 2, device="cuda", amp=amp)
                      for m in ("cgcnn", "csgcnn") for amp in (False, True)}
    return res
