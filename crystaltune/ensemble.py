"""``python -m crystaltune.ensemble NAME --top-k K``: the top-k trials of a finished search as one
model with an uncertainty.

The members are the trials' own best checkpoints (from MLflow: nothing is retrained). A prediction is
the members' mean, its uncertainty their standard deviation times a factor fitted on the
validation split (members of one search agree more than their errors warrant). The command measures
on the search's test split the ensemble's MAE against the best single model (the member with the lowest val MAE) and
the calibration of the std (share of crystals within 1 and 2 std, rank correlation of |error| with
std), writes ``ensemble.pt`` (``predict --checkpoint`` takes it: ``id,<target>,<target>_std``),
logs all of it to MLflow under the search run and registers it as ``crystaltune-NAME-ensemble``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import ENSEMBLE_FORMAT, load_checkpoint_dict, read_checkpoint
from .errors import CrystaltuneError, cli_main


def member_checkpoints(client, exp_id: str, parent_id: str, k: int, folder: Path) -> list[tuple[str, dict]]:
    """(trial name, checkpoint dict) of the k trials with the lowest best_val_mae that have a checkpoint."""
    from .search import runs

    ok, _ = runs.rank([runs.TrialRow.from_run(r) for r in runs.trial_runs(client, exp_id, parent_id)])
    out = []
    for r in ok:
        try:
            path = client.download_artifacts(r.run_id, runs.CHECKPOINT, str(folder))
        except Exception:
            continue  # a trial without a logged checkpoint cannot be a member
        out.append((r.trial, read_checkpoint(Path(path).rename(folder / f"{r.run_id}.pt"))))
        if len(out) == k:
            break
    if len(out) < 2:
        raise CrystaltuneError(f"an ensemble needs at least 2 trials with checkpoints; this search has {len(out)}")
    return out


def split_predictions(members: list, split: str = "test") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Each member's predictions on a split's crystals all members can describe: (k, n, T), (n, T), ids."""
    from .train.metrics import predict_indices
    from .train.trial_data import prepare_trial_data

    per_member = []
    for m in members:
        data = prepare_trial_data(m.config)
        index = getattr(data, split)
        p, y = predict_indices(m.model, data.store, index, data.targets, m.normalizer, "cpu")
        per_member.append({str(i): (p[j], y[j]) for j, i in enumerate(data.store.ids[index])})
    ids = sorted(set.intersection(*(set(d) for d in per_member)))
    preds = np.stack([[d[i][0] for i in ids] for d in per_member])
    return preds, np.stack([per_member[0][i][1] for i in ids]), ids


def std_scale(preds: np.ndarray, y: np.ndarray) -> float:
    """The factor that turns the members' std into a calibrated error scale, fitted on the validation
    split (members of one search agree more than their errors warrant): for Gaussian errors the median
    of |error| / sigma is 0.6745."""
    std = preds.std(0)
    ok = np.isfinite(y) & (std > 0)
    return float(np.median(np.abs(preds.mean(0) - y)[ok] / std[ok]) / 0.6745) if ok.any() else 1.0


def calibration(preds: np.ndarray, y: np.ndarray, scale: float = 1.0) -> dict[str, float]:
    """Ensemble vs best single model (member 0) on the test split, and how well the (scaled) std tracks
    the error."""
    from scipy.stats import spearmanr

    mean, std = preds.mean(0), scale * preds.std(0)
    err = np.abs(mean - y)
    ok = np.isfinite(y)
    single = float(np.abs(preds[0] - y)[ok].mean())
    ens = float(err[ok].mean())
    return {
        "test_mae_ensemble": ens,
        "test_mae_best_single": single,
        "improvement": 1 - ens / single,
        "within_1_std": float((err[ok] <= std[ok]).mean()),
        "within_2_std": float((err[ok] <= 2 * std[ok]).mean()),
        "spearman_abs_error_std": float(spearmanr(err[ok], std[ok]).statistic),
        "mean_std": float(std[ok].mean()),
        "std_scale": scale,
        "test_crystals": int(ok.sum()),
    }


def build_ensemble(name: str, tracking_uri: str, k: int, output: Path) -> dict[str, Any]:
    """Members, test-split measurements, ensemble.pt, and the MLflow run and registered model."""
    from mlflow.tracking import MlflowClient

    from .search import runs

    client = MlflowClient(tracking_uri)
    parent = runs.latest_search(client, runs.find_experiment(client, name, tracking_uri))
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        chosen = member_checkpoints(client, parent.info.experiment_id, parent.info.run_id, k, Path(tmp))
    payload = ensemble_payload(chosen)
    torch.save(payload, output / "ensemble.pt")
    (output / "ensemble.json").write_text(json.dumps({"trials": payload["trials"], **payload["metrics"]}, indent=1))
    registered = runs.model_name(parent.data.tags[runs.SPACE], "ensemble")
    log_ensemble(client, tracking_uri, parent, output / "ensemble.pt", payload, registered)
    return {"trials": payload["trials"], **payload["metrics"], "checkpoint": str(output / "ensemble.pt")}


def ensemble_payload(chosen: list[tuple[str, dict]]) -> dict[str, Any]:
    """The ensemble checkpoint of (name, checkpoint dict) members: its std scale fitted on the
    validation split and its measurements on the test split."""
    members = [load_checkpoint_dict(ck, name) for name, ck in chosen]
    val_preds, val_y, _ = split_predictions(members, "val")
    scale = std_scale(val_preds[:, :, 0], val_y[:, 0])
    preds, y, _ = split_predictions(members, "test")
    return {
        "format": ENSEMBLE_FORMAT,
        "version": 1,
        "std_scale": scale,
        "members": [ck for _, ck in chosen],
        "trials": [t for t, _ in chosen],
        "targets": members[0].targets,
        "metrics": calibration(preds[:, :, 0], y[:, 0], scale),
    }


def log_ensemble(client, uri: str, parent, checkpoint: Path, payload: dict, registered: str):
    """An MLflow run under the search (metrics, the checkpoint) and the ensemble registered as a pyfunc
    under ``registered``; returns the model's info (its registered version)."""
    import warnings

    import mlflow
    from mlflow.entities import Metric, Param

    from .config import TrialConfig
    from .search import runs
    from .search.report_artifacts import config_example, pyfunc_signature

    trials, metrics = payload["trials"], payload["metrics"]
    example = config_example(TrialConfig.from_dict(payload["members"][0]["config"]))
    run = client.create_run(
        parent.info.experiment_id,
        run_name=f"ensemble of {len(trials)}: {' '.join(trials)}",
        tags={runs.PARENT: parent.info.run_id, runs.KIND: runs.ENSEMBLE},
    )
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
        params=[Param("members", " ".join(trials))],
    )
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run.info.run_id), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = mlflow.pyfunc.log_model(
            name="ensemble",
            python_model=str(Path(__file__).parent / "search" / "mlflow_model.py"),
            artifacts={"checkpoint": str(checkpoint)},
            registered_model_name=registered,
            pip_requirements=["crystaltune", "torch", "torch-geometric", "pymatgen"],
            input_example=example,
            signature=pyfunc_signature(example, checkpoint),  # id optional, as for the single models
        )
    client.set_terminated(run.info.run_id, "FINISHED")
    return info


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m crystaltune.ensemble", description=__doc__)
    ap.add_argument("name", help="search-space name or the space file the search ran (experiment crystaltune-NAME)")
    ap.add_argument("--top-k", type=int, default=5, help="members: the K trials with the lowest best_val_mae")
    ap.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///./mlflow.db)")
    ap.add_argument("--output", help="folder for ensemble.pt and ensemble.json (default: crystaltune-results/NAME)")
    a = ap.parse_args(argv)
    if a.top_k < 2:
        raise CrystaltuneError(f"--top-k must be >= 2, got {a.top_k}")
    from .search.engine import default_tracking_uri

    uri = a.tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise CrystaltuneError(f"no MLflow store at {uri}")
    from .search.space import experiment_space

    a.name = experiment_space(a.name)[0]
    out = build_ensemble(a.name, uri, a.top_k, Path(a.output or f"crystaltune-results/{a.name}"))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
