"""The MLflow format of a search, in one place: experiment and model names, run kinds, tag keys,
artifact paths, the queries for a search's runs, and the one row a trial result is read into.

Everything that writes a search (tracking.py, report_artifacts.py, retraining.py) names its tags and
paths through these constants; everything that reads one back (report, ensemble, bench, warm start)
goes through ``find_experiment`` / ``latest_search`` / ``trial_runs`` and ``TrialRow``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import CrystaltuneError

PREFIX = "crystaltune-"

# run kinds (the value of KIND)
SEARCH, TRIAL, RETRAIN, LOST_TRIAL, ENSEMBLE = "search", "trial", "retrain", "lost_trial", "ensemble"

# tag keys
PARENT = "mlflow.parentRunId"
DESCRIPTION = "mlflow.note.content"
KIND = "crystaltune.kind"
SPACE = "crystaltune.space"
STATUS = "crystaltune.status"
NOTE = "crystaltune.note"
TRIAL_ID = "crystaltune.trial_id"
DEFAULT = "crystaltune.default"
ERROR = "crystaltune.error"
EPOCHS_RUN = "crystaltune.epochs_run"
BEST_RUN = "crystaltune.best_run"
REGISTERED_MODEL = "crystaltune.registered_model"
ARTIFACT_ERROR = "crystaltune.artifact_error"
OPTUNA_ERROR = "crystaltune.optuna_artifacts_error"
MODEL_LOG_ERROR = "crystaltune.model_log_error"
# retraining runs
ROLE = "crystaltune.role"
SEARCH_RUN = "crystaltune.search_run"
SEED = "crystaltune.seed"
FOLD = "crystaltune.fold"
CONFIG_DIGEST = "crystaltune.config_digest"
SOURCE = "crystaltune.source"
TRIAL_NAME = "crystaltune.trial"
CV_ROLE = "cv"  # the final step's cross-validation runs (their ROLE)

# artifact paths
CHECKPOINT_DIR = "checkpoint"  # a trial's best checkpoint: CHECKPOINT_DIR/best.pt
CHECKPOINT = f"{CHECKPOINT_DIR}/best.pt"
SEARCH_DIR = "search"  # the parent run's artifacts
TOP_CONFIGS = f"{SEARCH_DIR}/top_configs.yaml"
IMPORTANCES = f"{SEARCH_DIR}/param_importances.json"

# the parent run's summary metrics, named apart from the trials' so it never sorts among them
PARENT_BEST_VAL, PARENT_BEST_TEST = "search.best_val_mae", "search.best_test_mae"
# the final model's (search/finalize.py): its seed ensemble's test MAE, the default's, the gain
FINAL_TEST, FINAL_DEFAULT_TEST, FINAL_GAIN = "final.ensemble_test_mae", "final.default_ensemble_test_mae", "final.gain"
FINAL_TRIAL = "crystaltune.final_trial"
FINAL_ERROR = "crystaltune.final_error"

MAX_RUNS = 5000


def experiment_name(space: str) -> str:
    """The MLflow experiment (and Optuna study) of a search space's searches."""
    return f"{PREFIX}{space}"


def model_name(space: str, kind: str = "") -> str:
    """The registered model of a space's searches (``kind``: e.g. "ensemble")."""
    return experiment_name(space) + (f"-{kind}" if kind else "")


def find_experiment(client, space: str, tracking_uri: str) -> str:
    """The id of the space's experiment, or a CrystaltuneError naming the store."""
    exp = client.get_experiment_by_name(experiment_name(space))
    if exp is None:
        raise CrystaltuneError(f"no MLflow experiment '{experiment_name(space)}' in {tracking_uri}")
    return exp.experiment_id


def latest_search(client, exp_id: str, run_id: str | None = None):
    """The parent run of the latest search in the experiment (or of ``run_id``)."""
    if run_id:
        return client.get_run(run_id)
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.`{KIND}` = '{SEARCH}'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if not runs:
        raise CrystaltuneError("no search run in this experiment")
    return runs[0]


def trial_runs(client, exp_id: str, parent_id: str) -> list:
    """Every trial run of one search (lost trials excluded: their kind is LOST_TRIAL)."""
    return client.search_runs(
        [exp_id], filter_string=f"tags.`{PARENT}` = '{parent_id}' and tags.`{KIND}` = '{TRIAL}'", max_results=MAX_RUNS
    )


def retrain_runs(client, exp_id: str, parent_id: str) -> list:
    """Every retraining run made after one search (report --retrain-seeds / --cv)."""
    return client.search_runs(
        [exp_id],
        filter_string=f"tags.`{KIND}` = '{RETRAIN}' and tags.`{SEARCH_RUN}` = '{parent_id}'",
        max_results=MAX_RUNS,
    )


def ranked(status: str, best_val_mae: float) -> bool:
    """The one rule for "this trial has a result": it did not fail and has a finite selection metric.
    Interrupted trials count with the epochs they ran; failed ones are listed last, unranked."""
    return status != "FAILED" and math.isfinite(best_val_mae)


@dataclass
class TrialRow:
    """One trial's result, the same whether read from the tracker's record or from its MLflow run."""

    name: str  # the run name: "t007 csgcnn rbf/extended kl"
    status: str
    run_id: str
    best_val_mae: float = math.nan
    test_mae: float = math.nan
    test_rmse: float = math.nan
    test_r2: float = math.nan
    epochs: int = 0
    error: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # sampled values (record) or the logged config (run)
    default: bool = False
    trial_id: str = ""
    checkpoint: str = ""  # the trial's checkpoint folder (records only)

    @property
    def trial(self) -> str:
        """The short name, ``t007``."""
        return self.name.split(" ")[0]

    @property
    def ranked(self) -> bool:
        return ranked(self.status, self.best_val_mae)

    @classmethod
    def from_record(cls, trial_id: str, rec, sampled: dict[str, Any], default: bool) -> TrialRow:
        """From the tracker's TrialRecord and its decoded sampled values."""
        last = rec.last_result
        return cls(
            name=rec.name,
            status=rec.status,
            run_id=rec.run_id,
            **{k: last.get(k, math.nan) for k in ("best_val_mae", "test_mae", "test_rmse", "test_r2")},
            epochs=int(last.get("epoch", 0) or 0),
            error=rec.error,
            params=sampled,
            default=default,
            trial_id=trial_id,
            checkpoint=last.get("checkpoint_path", ""),
        )

    @classmethod
    def from_run(cls, run) -> TrialRow:
        """From a trial's MLflow run: its final metrics, tags and logged parameters."""
        m, tags = run.data.metrics, run.data.tags
        return cls(
            name=run.info.run_name,
            status=run.info.status,
            run_id=run.info.run_id,
            **{k: m.get(k, math.nan) for k in ("best_val_mae", "test_mae", "test_rmse", "test_r2")},
            epochs=int(float(tags.get(EPOCHS_RUN, 0) or 0)),
            error=tags.get(ERROR, ""),
            params=dict(run.data.params),
            default=tags.get(DEFAULT) == "true",
            trial_id=tags.get(TRIAL_ID, ""),
        )


def rank(rows: list[TrialRow]) -> tuple[list[TrialRow], list[TrialRow]]:
    """(ranked rows best first by best_val_mae, the others in their order)."""
    ok = sorted((r for r in rows if r.ranked), key=lambda r: r.best_val_mae)
    return ok, [r for r in rows if not r.ranked]
