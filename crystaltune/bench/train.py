"""Training-throughput benchmark: graphs/s (excluding the first epoch) and peak memory."""

from __future__ import annotations

import resource
import sys
from typing import Any

import numpy as np
import torch

from ..config import TrialConfig


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def bench_train(
    dataset: str = "perovskites",
    model: str = "cgcnn",
    epochs: int = 3,
    batch_size: int = 256,
    threads: int = 2,
    hidden: int = 64,
    head_hidden: int = 128,
    layers: int = 3,
    device: str = "cpu",
    amp: bool = False,
    extra: dict[str, Any] | None = None,
    limit: int | None = None,
    reference_code: str | None = None,
) -> dict[str, Any]:
    """Train ``model`` on the dataset's training split and report throughput; ``reference_code`` (the
    reference CGCNN code's folder) also runs that code itself on the same crystals."""
    torch.set_num_threads(threads)
    from ..train import fit, prepare_trial_data

    cfg = TrialConfig.from_dict(
        {
            "data": {"dataset": dataset, "limit": limit},
            "model": {"name": model, "hidden": hidden, "head_hidden": head_hidden, "layers": layers, **(extra or {})},
            "optim": {"name": "sgd", "lr": 0.01, "schedule": "none"},
            "loss": {"name": "mse"},
            "train": {"epochs": epochs, "batch_size": batch_size, "num_threads": threads, "device": device, "amp": amp},
        }
    )
    data = prepare_trial_data(cfg)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rates: list[float] = []
    fit(cfg, report=lambda m, _: rates.append(m["graphs_per_s"]), data=data)
    out: dict[str, Any] = {
        "dataset": dataset,
        "model": model,
        "device": device,
        "amp": amp,
        "threads": threads,
        "batch_size": batch_size,
        "epochs": epochs,
        "train_crystals": int(len(data.train)),
        "architecture": {"hidden": hidden, "head_hidden": head_hidden, "layers": layers},
        "graphs_per_s": float(np.mean(rates[1:] if len(rates) > 1 else rates)),
        "graphs_per_s_by_epoch": rates,
        "peak_rss_mb": peak_rss_mb(),
    }
    if device == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if reference_code:
        out.update(_reference_code_figures(cfg, data, reference_code, out["graphs_per_s"]))
    return out


def _reference_code_figures(cfg, data, code: str, ours: float) -> dict[str, Any]:
    """The reference code run on this benchmark's training crystals, and our speed-up over it."""
    from ..data import read_source
    from ..train.trial_data import load_trial_dataset
    from .reference_code import reference_throughput

    wanted = set(data.store.ids[data.train].tolist())
    records = [r for r in read_source(load_trial_dataset(cfg).source).records if r["id"] in wanted]
    ref = reference_throughput(
        code,
        records,
        data.targets[0],
        cfg.train.epochs,
        cfg.train.batch_size,
        cfg.train.num_threads,
        cfg.model.hidden,
        cfg.model.head_hidden,
        cfg.model.layers,
        cuda=cfg.train.device == "cuda",
    )
    return {
        "reference_code": ref,
        "reference_code_graphs_per_s": ref["graphs_per_s"],
        "speedup_vs_reference_code": ours / ref["graphs_per_s"],
    }
