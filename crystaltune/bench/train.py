"""Training-throughput benchmark: graphs/s (excluding the first epoch) and peak memory."""

from __future__ import annotations

import resource
import sys
from typing import Any

import numpy as np
import torch

from ..config import TrialConfig
from .recipe import BenchRecipe


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def bench_train(recipe: BenchRecipe, reference_code: str | None = None) -> dict[str, Any]:
    """Train the recipe's model on the dataset's training split and report throughput;
    ``reference_code`` (the reference CGCNN code's folder) also runs that code itself on the same crystals."""
    torch.set_num_threads(recipe.threads)
    from ..train import fit, prepare_trial_data

    cfg = TrialConfig.from_dict(recipe.trial_config())
    data = prepare_trial_data(cfg)
    if recipe.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rates: list[float] = []
    fit(cfg, report=lambda m, _: rates.append(m["graphs_per_s"]), data=data)
    out: dict[str, Any] = {
        "dataset": recipe.dataset,
        "model": recipe.model,
        "device": recipe.device,
        "amp": recipe.amp,
        "threads": recipe.threads,
        "batch_size": recipe.batch_size,
        "epochs": recipe.epochs,
        "train_crystals": int(len(data.train)),
        "architecture": recipe.architecture,
        "graphs_per_s": float(np.mean(rates[1:] if len(rates) > 1 else rates)),
        "graphs_per_s_by_epoch": rates,
        "peak_rss_mb": peak_rss_mb(),
    }
    if recipe.device == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if reference_code:
        out.update(_reference_code_figures(recipe, data, reference_code, out["graphs_per_s"]))
    return out


def _reference_code_figures(recipe: BenchRecipe, data, code: str, ours: float) -> dict[str, Any]:
    """The reference code run on this benchmark's training crystals, and our speed-up over it."""
    from ..data import read_source
    from ..train.trial_data import load_trial_dataset
    from .reference_code import reference_throughput

    wanted = set(data.store.ids[data.train].tolist())
    source = load_trial_dataset(TrialConfig.from_dict(recipe.trial_config())).source
    records = [r for r in read_source(source).records if r["id"] in wanted]
    ref = reference_throughput(code, records, data.targets[0], recipe)
    return {
        "reference_code": ref,
        "reference_code_graphs_per_s": ref["graphs_per_s"],
        "speedup_vs_reference_code": ours / ref["graphs_per_s"],
    }
