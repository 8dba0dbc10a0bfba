"""``bench all``: the whole speed suite in one JSON document (graphs, cache, training per model,
DDP scaling, search overhead and ASHA's saving, GPU figures when CUDA is present)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import CrystaltuneError
from .recipe import BenchRecipe

MODELS = ("cgcnn", "csgcnn", "csgann", "csginn", "flowgnn", "egcnn")


def search_overhead(space: str, workdir: Path, num_samples: int | None = None) -> dict[str, Any]:
    """Run a search, then split its wall time (from MLflow, as the report does) into training epochs
    and everything else (trial start-up, Ray, Tune, MLflow, checkpoints)."""
    from mlflow.tracking import MlflowClient

    from ..report import search_timing
    from ..search import runs
    from ..search.engine import SearchOptions, run_search

    old = Path.cwd()
    os.chdir(workdir)
    try:
        t0 = time.perf_counter()
        summary = run_search(
            SearchOptions(space=space, output=str(workdir / "out"), quiet=True, num_samples=num_samples)
        )
        wall = time.perf_counter() - t0
    finally:
        os.chdir(old)
    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    children = runs.trial_runs(client, parent.info.experiment_id, parent.info.run_id)
    timing = search_timing(client, parent, children)
    return {
        "space": space,
        "trials": summary["trials"],
        "wall_s": wall,
        "executor": parent.data.params.get("search.executor"),
        "best_test_mae": summary.get("best_test_mae"),
        **timing,
        "asha_epoch_fraction": timing["epochs_run"] / max(timing["epochs_full_budget"], 1),
    }


def train_in_subprocess(recipe: BenchRecipe, reference_code: str | None = None) -> dict[str, Any]:
    """``bench train`` in a fresh process, so each model's peak memory is its own."""
    cmd = [sys.executable, "-m", "crystaltune.bench", "train", "--json", *recipe.cli_args()]
    cmd += ["--reference-code", reference_code] if reference_code else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise CrystaltuneError(f"bench train --model {recipe.model} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout[out.stdout.index("{") :])


def ddp_scaling(limit: int | None, epochs: int) -> dict[str, Any]:
    import ray

    from ..config import TrialConfig
    from ..raysession import start_local_ray
    from ..train.distributed import fit_distributed

    cfg = TrialConfig.from_dict({"data": {"limit": limit}, "train": {"epochs": epochs, "batch_size": 64}})
    out = {}
    start_local_ray(num_cpus=3)
    try:
        for w in (1, 2):
            t0 = time.perf_counter()
            m = fit_distributed(cfg, num_workers=w)
            out[f"workers_{w}"] = {
                "graphs_per_s_last_epoch": m["graphs_per_s"],
                "wall_s": time.perf_counter() - t0,
                "val_mae": m["best_val_mae"],
            }
    finally:
        ray.shutdown()
    out["speedup"] = out["workers_2"]["graphs_per_s_last_epoch"] / out["workers_1"]["graphs_per_s_last_epoch"]
    return out


def bench_all(
    quick: bool = False, searches: tuple[str, ...] | None = None, command: str = "", reference_code: str | None = None
) -> dict[str, Any]:
    """Every speed figure of the README's Performance section, measured now on this machine; with
    ``reference_code`` (the reference CGCNN code's folder) cgcnn's figure is compared with that code."""
    from ..data import load_dataset
    from ..environment import describe_machine, versions_line
    from .graphs import bench_graphs

    batch, threads = 256, min(2, os.cpu_count() or 1)
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": describe_machine(),
        "versions": versions_line(),
        "command": command,
        "quick": quick,
        "train_batch_size": batch,
        "train_threads": threads,
    }
    res["graphs"] = bench_graphs("perovskites", 50 if quick else 300)
    load_dataset("perov5")
    t0 = time.perf_counter()
    res["cache_load_perov5_crystals"] = len(load_dataset("perov5"))
    res["cache_load_perov5_s"] = time.perf_counter() - t0
    limit, epochs = (256, 2) if quick else (None, 3)
    recipe = BenchRecipe(epochs=epochs, batch_size=batch, threads=threads, limit=limit)
    res["train"] = {
        m: train_in_subprocess(recipe.replace(model=m), reference_code if m == "cgcnn" else None) for m in MODELS
    }
    res["ddp"] = ddp_scaling(240 if quick else None, 2 if quick else 3)
    res["searches"] = []
    for space in searches or (("smoke",) if quick else ("smoke", "perovskites")):
        with tempfile.TemporaryDirectory() as tmp:
            res["searches"].append(search_overhead(space, Path(tmp)))
    if torch.cuda.is_available():
        res["gpu"] = {
            f"{m}_{'amp' if amp else 'fp32'}": train_in_subprocess(
                BenchRecipe(m, epochs=3, batch_size=batch, threads=threads, device="cuda", amp=amp)
            )
            for m in ("cgcnn", "csgcnn")
            for amp in (False, True)
        }
    return res
