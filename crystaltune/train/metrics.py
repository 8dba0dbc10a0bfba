"""Evaluation: MAE/RMSE/R² in target units, and contrastive alignment/uniformity of embeddings."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from ..graphs.store import GraphStore
from ..normalizer import Normalizer


@torch.no_grad()
def predict_indices(
    model,
    store: GraphStore,
    index: np.ndarray,
    targets: list[str],
    normalizer: Normalizer,
    device,
    batch_size: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, targets) in target units for crystals ``index``."""
    model.eval()
    preds, ys = [], []
    for s in range(0, len(index), batch_size):
        b = store.batch(index[s : s + batch_size], targets).to(device)
        preds.append(normalizer.denorm(model(b).float()).cpu())
        ys.append(b.y.cpu())
    if not preds:
        return np.zeros((0, len(targets))), np.zeros((0, len(targets)))
    return torch.cat(preds).numpy(), torch.cat(ys).numpy()


def regression_metrics(pred: np.ndarray, y: np.ndarray, targets: list[str], prefix: str) -> dict[str, float]:
    """``{prefix}_mae`` (mean over targets), ``_rmse``, ``_r2``, and per-target values when several."""
    out: dict[str, float] = {}
    pred, y = np.asarray(pred, np.float64), np.asarray(y, np.float64)  # float32 squares overflow beyond 1e19
    maes, rmses, r2s = [], [], []
    for t, name in enumerate(targets):
        m = np.isfinite(y[:, t])
        if not m.any():
            continue
        err = pred[m, t] - y[m, t]
        mae, rmse = float(np.abs(err).mean()), float(np.sqrt((err**2).mean()))
        var = float(((y[m, t] - y[m, t].mean()) ** 2).sum())
        r2 = 1.0 - float((err**2).sum()) / var if var > 0 else float("nan")
        maes.append(mae)
        rmses.append(rmse)
        r2s.append(r2)
        if len(targets) > 1:
            out[f"{prefix}_mae_{name}"] = mae
    out[f"{prefix}_mae"] = float(np.mean(maes)) if maes else float("nan")
    out[f"{prefix}_rmse"] = float(np.mean(rmses)) if rmses else float("nan")
    out[f"{prefix}_r2"] = float(np.mean(r2s)) if r2s else float("nan")
    return out


@torch.no_grad()
def embedding_metrics(
    model, store: GraphStore, index: np.ndarray, device, noise: float = 0.05, seed: int = 0, batch_size: int = 512
) -> dict[str, float]:
    """alignment: mean cosine similarity of each crystal's pooled embedding with that of a copy whose
    atoms are moved by N(0, noise^2) Å (same edges, distances recomputed); uniformity: mean pairwise
    Euclidean distance between L2-normalised embeddings (0..2; higher = more spread out)."""
    model.eval()
    rng = np.random.default_rng(seed)
    clean, noisy = [], []
    for s in range(0, len(index), batch_size):
        idx = index[s : s + batch_size]
        clean.append(model.embed(store.batch(idx, []).to(device)).float().cpu())
        noisy.append(model.embed(store.batch(idx, [], noise=noise, rng=rng).to(device)).float().cpu())
    if not clean:
        return {}
    a, b = torch.cat(clean), torch.cat(noisy)
    alignment = float(F.cosine_similarity(a, b, dim=1).mean())
    z = F.normalize(a, dim=1)
    n = len(z)
    uniformity = float(torch.pdist(z).mean()) if n > 1 else float("nan")
    return {"alignment": alignment, "uniformity": uniformity}
