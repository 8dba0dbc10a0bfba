"""``bench gpu``: what one GPU does for crystaltune's trials.

Per model, batch 32 / 256 / 1024 with AMP off and on (one trial), then 1 / 2 / 4 / 8 packed trials
(that many training processes sharing the GPU, as ``--trials-per-gpu`` runs them: aggregate graphs/s
and each one's peak GPU memory), and the reference CGCNN code on the same GPU when its folder is
given. Every figure is a fresh ``bench train`` process. Without CUDA the GPU parts are skipped and the
result says so (CI runs it that way with ``--quick``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import torch

from .recipe import BenchRecipe
from .suite import train_in_subprocess

BATCHES, PACKED = (32, 256, 1024), (1, 2, 4, 8)


def packed_trials(n: int, recipe: BenchRecipe) -> dict[str, Any]:
    """``n`` bench-train processes on the GPU at once: their summed graphs/s and peak memories."""
    cmd = [sys.executable, "-m", "crystaltune.bench", "train", "--json", *recipe.cli_args()]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    outs = [p.communicate() for p in procs]
    runs = [json.loads(o[o.index("{") :]) for o, _ in outs if "{" in o]
    return {
        "trials": n,
        "finished": len(runs),
        "wall_s": time.perf_counter() - t0,
        "graphs_per_s_total": sum(r["graphs_per_s"] for r in runs),
        "peak_cuda_mb": [r.get("peak_cuda_mb") for r in runs],
    }


def bench_gpu(
    quick: bool = False,
    models: tuple[str, ...] = ("cgcnn",),
    reference_code: str | None = None,
    dataset_limit: int | None = None,
) -> dict[str, Any]:
    """The measurements above, as a JSON-ready dict."""
    if not torch.cuda.is_available():
        return {"device": None, "skipped": "no CUDA device: GPU figures not measured", "quick": quick}
    limit = 512 if quick else dataset_limit
    epochs = 2 if quick else 3
    gpu = BenchRecipe(epochs=epochs, threads=1, device="cuda", limit=limit)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "quick": quick, "single": {}, "packed": {}}
    for model in models:
        for batch in BATCHES[:2] if quick else BATCHES:
            for amp in (False, True):
                r = train_in_subprocess(gpu.replace(model=model, batch_size=batch, amp=amp))
                out["single"][f"{model}_b{batch}_{'amp' if amp else 'fp32'}"] = {
                    "graphs_per_s": r["graphs_per_s"],
                    "peak_cuda_mb": r.get("peak_cuda_mb"),
                }
        packed = gpu.replace(model=model, batch_size=256)
        out["packed"][model] = [packed_trials(n, packed) for n in (PACKED[:2] if quick else PACKED)]
    if reference_code:
        from .train import bench_train

        r = bench_train(gpu.replace(model="cgcnn", batch_size=256, threads=2), reference_code)
        out["reference_code"] = {
            "ours": r["graphs_per_s"],
            "reference": r["reference_code_graphs_per_s"],
            "ratio": r["speedup_vs_reference_code"],
        }
    return out
