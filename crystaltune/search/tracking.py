"""MLflow tracking from the Tune driver only: a parent run per search, a child run per trial.

Every MLflow write of a search happens in this callback, in the driver process, so a local SQLite
store never sees concurrent writers. Its state (run ids, last logged epoch per trial) is saved with
the Tune experiment, so ``--resume`` and trial retries never duplicate runs or metric rows.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from ..mlflow_metrics import finite_metrics
from ..outputs import redact
from . import runs
from .space import SearchSpace, decode_sampled

#: per epoch; best_val_mae (the best val MAE so far) is the selection metric everywhere: leaderboard,
#: Optuna's objective, ASHA's rungs and the MLflow column to sort by
EPOCH_METRICS = ("train_mae", "val_mae", "best_val_mae", "lr", "graphs_per_s", "epoch_time_s")
#: where a trial ran, sent with its results by the trial itself (search/trainable.py placement)
PLACEMENT_KEYS = ("node_id", "node_type", "gpu_share")
FINAL_METRICS = ("best_val_mae", "test_mae", "test_rmse", "test_r2", "alignment", "uniformity", "best_epoch")


log = logging.getLogger(__name__)
DONE = ("FINISHED", "FAILED")


@dataclass
class TrialRecord:
    """What the tracker knows of one Tune trial: its MLflow run, its last logged epoch and result, its
    status and why it failed (the watchdog's reason first). Saved as JSON with the Tune experiment."""

    run_id: str
    name: str
    config: dict[str, Any] = field(default_factory=dict)  # Tune's config: Optuna's raw values
    status: str = "PENDING"  # RUNNING, FINISHED, FAILED, INTERRUPTED, LOST
    last_epoch: int = 0
    last_result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    watchdog: str = ""

    @property
    def done(self) -> bool:
        return self.status in DONE


def records_from_state(state: dict[str, Any]) -> dict[str, TrialRecord]:
    """Trial records from a saved tracker state."""
    return {tid: TrialRecord(**rec) for tid, rec in state.get("trials", {}).items()}


def run_name(index: int, sampled: dict[str, Any], base: dict[str, Any]) -> str:
    """A readable child-run name: ``t007 csgcnn rbf/extended kl``."""

    def get(key):
        if key in sampled:
            return sampled[key]
        cur = base
        for p in key.split("."):
            cur = cur.get(p, {}) if isinstance(cur, dict) else {}
        return cur

    kl = " kl" if get("loss.kl") else ""
    return f"t{index:03d} {get('model.name')} {get('model.edge_featurizer')}/{get('model.node_featurizer')}{kl}"


class MLflowTracker(tune.Callback):
    """Tune callback writing parent/child runs, per-epoch metrics and final metrics to MLflow."""

    def __init__(
        self,
        tracking_uri: str,
        space: SearchSpace,
        experiment: str,
        search_info: dict[str, Any],
        state_file: str | None = None,
        verbose: bool = True,
    ):
        self.tracking_uri = tracking_uri
        self.verbose = verbose
        self.state_file = state_file
        self.space = space
        self.experiment = experiment
        self.search_info = search_info
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self.trials: dict[str, TrialRecord] = {}  # Tune trial id -> its record
        self.stop_reason = ""  # why the driver stopped the search early (e.g. disk full), if it did
        self._client = None
        self._reconciled = False
        self._placed: dict[str, dict[str, str]] = {}  # run id -> the placement last tagged

    # pickling / Tune experiment state ------------------------------------------------------------
    def __getstate__(self):
        d = self.__dict__.copy()
        d["_client"] = None
        d["_reconciled"] = False
        return d

    def get_state(self) -> dict[str, Any]:
        return {
            "parent_run_id": self.parent_run_id,
            "experiment_id": self.experiment_id,
            "stop_reason": self.stop_reason,
            "trials": {tid: dataclasses.asdict(rec) for tid, rec in self.trials.items()},
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore after --resume. Tune's snapshot of this state can lag behind (it is taken
        periodically); the JSON mirror is written on every event, so it wins when present."""
        if self.state_file and Path(self.state_file).exists():
            import json

            try:
                state = json.loads(Path(self.state_file).read_text())
            except (OSError, ValueError):
                pass
        self.parent_run_id, self.experiment_id = state.get("parent_run_id"), state.get("experiment_id")
        self.stop_reason = state.get("stop_reason", "")
        self.trials = records_from_state(state)

    def name(self, trial_id: str) -> str:
        rec = self.trials.get(trial_id)
        return rec.name if rec else trial_id

    def save(self) -> None:
        """Mirror the state to a JSON file the driver reads after the Tuner returns."""
        if self.state_file:
            import json

            tmp = f"{self.state_file}.tmp"
            try:
                with open(tmp, "w") as fh:
                    json.dump(self.get_state(), fh, default=str)
                os.replace(tmp, self.state_file)
            except OSError as exc:  # a full disk: keep the last complete mirror; Tune's snapshot has the rest
                log.warning("could not save %s: %s", self.state_file, exc)

    @classmethod
    def from_state_file(cls, path: str, tracking_uri: str, space: SearchSpace, experiment: str) -> MLflowTracker:
        import json

        t = cls(tracking_uri, space, experiment, {}, state_file=None, verbose=False)
        t.set_state(json.loads(Path(path).read_text()))
        return t

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # parent run --------------------------------------------------------------------------------
    def setup(self, **info) -> None:
        self.ensure_parent()
        self.save()

    def ensure_parent(self) -> str:
        if self.experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            self.experiment_id = exp.experiment_id if exp else self._create_experiment()
            # MLflow 3 opens experiments of unknown kind on its GenAI traces page: say these are model runs
            self.client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind", "custom_model_development")
        if self.parent_run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"search {self.space.name} {time.strftime('%Y-%m-%d %H:%M')}",
                tags={runs.KIND: runs.SEARCH, runs.SPACE: self.space.name},
            )
            self.parent_run_id = run.info.run_id
            from mlflow.entities import Param

            params = {f"search.{k}": v for k, v in self.search_info.items()}
            searched = {p.name for p in self.space.params}  # the parent lists only what no trial varies
            fixed = self.space.trial_config(self.space.default_point).used_flat()  # the horizon applied
            params.update({f"fixed.{k}": v for k, v in fixed.items() if k not in searched})
            self.client.log_batch(self.parent_run_id, params=[Param(k, redact(v)[:6000]) for k, v in params.items()])
        else:
            self.client.update_run(self.parent_run_id, status="RUNNING")
        return self.parent_run_id

    def _create_experiment(self) -> str:
        """Create the experiment; when another search sharing the store created it a moment earlier,
        MLflow refuses the duplicate name and that one is used."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(self.experiment)
        except MlflowException:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    # child runs --------------------------------------------------------------------------------
    def child(self, trial, trials=None) -> TrialRecord:
        """The trial's record and MLflow run, created on first sight and named by Tune's creation order
        (``trials``), so the default configuration, created first, is t001 whichever trial starts first."""
        tid = trial.trial_id
        if tid in self.trials:
            return self.trials[tid]
        number = len(self.trials) + 1
        if trials is not None and trial in trials:
            taken = {int(r.name.split()[0][1:]) for r in self.trials.values() if r.name[1:4].isdigit()}
            number = trials.index(trial) + 1
            while number in taken:
                number += 1
        sampled = decode_sampled(trial.config, self.space)
        is_default = sampled == self.space.default_point
        name = run_name(number, sampled, self.space.base) + (" (default)" if is_default else "")
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={
                runs.PARENT: self.parent_run_id,
                runs.TRIAL_ID: tid,
                runs.KIND: runs.TRIAL,
                runs.DEFAULT: str(is_default).lower(),
            },
        )
        rec = self.trials[tid] = TrialRecord(run.info.run_id, name, dict(trial.config))
        cfg = self.space.trial_config(sampled)
        from mlflow.entities import Param

        params = {k: redact(v)[:6000] for k, v in cfg.used_flat().items()}  # each once, only what it used
        self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
        return rec

    def on_step_begin(self, iteration, trials, **info):
        if not self._reconciled:  # the first step after a --resume sees every restored trial
            self._reconciled = True
            self.stop_reason = ""  # why the previous session stopped; this one runs afresh
            self.reconcile(trials)

    def reconcile(self, trials) -> None:
        """Square this state with the trials Tune restored. Tune snapshots its experiment periodically,
        this tracker on every event, so a driver killed in between leaves trials only this tracker knows.
        Tune never resumes those: an unfinished one is marked lost (kept in MLflow, out of the
        leaderboard; Tune samples its slot again), a finished one is kept as it is."""
        known = {t.trial_id for t in trials}
        for tid, rec in self.trials.items():
            if tid in known:
                continue
            rid, name = rec.run_id, rec.name
            if rec.status in ("RUNNING", "INTERRUPTED"):
                self.client.set_tag(rid, runs.KIND, runs.LOST_TRIAL)
                self.client.set_tag(rid, runs.STATUS, "lost")
                self.client.set_tag(
                    rid,
                    runs.NOTE,
                    "started after Tune's last experiment snapshot before the "
                    "driver died; Tune could not resume it and sampled its slot again",
                )
                self.client.set_terminated(rid, "KILLED")
                rec.status = "LOST"
                if self.verbose:
                    log.info(
                        "%s: started after Tune's last snapshot, so it cannot be resumed; "
                        "kept in MLflow as a lost trial, its slot is sampled again",
                        name,
                    )
            elif rec.done and self.verbose:
                log.info("%s: finished after Tune's last snapshot; kept, and Tune samples one more trial", name)
        self.save()

    def on_trial_start(self, iteration, trials, trial, **info):
        rec = self.child(trial, trials)
        if not rec.done:  # not a --resume restart of a done trial
            rec.status = "RUNNING"
        self.save()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        rec = self.child(trial, trials)
        if result.get("trial_failed"):  # a diverged / out-of-memory trial, reported by its workers
            rec.error = str(result["trial_failed"])
            self.save()
            return
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        if epoch <= rec.last_epoch:
            return  # a retried worker re-reporting an epoch already logged
        rec.last_result = {
            k: result[k] for k in (*EPOCH_METRICS, *FINAL_METRICS, "epoch", "checkpoint_path") if k in result
        }
        rec.last_epoch = epoch
        self.client.log_batch(rec.run_id, metrics=finite_metrics(result, EPOCH_METRICS, epoch))
        self._tag_placement(rec, result)
        self.save()

    def _tag_placement(self, rec: TrialRecord, result: dict) -> None:
        """Where the trial runs (node id, node type, GPU share), tagged when it first reports and again
        if a retry moved it to another node."""
        where = {k: str(result[k]) for k in PLACEMENT_KEYS if k in result}
        placed = self._placed
        if where and placed.get(rec.run_id) != where:
            from mlflow.entities import RunTag

            self.client.log_batch(rec.run_id, tags=[RunTag(f"crystaltune.{k}", v) for k, v in where.items()])
            placed[rec.run_id] = where

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        """A direct trial's epoch checkpoint, persisted by Tune after its result (Ray Train trials send
        the path in the result instead)."""
        rec = self.trials.get(trial.trial_id)
        if rec is not None and rec.last_result:
            rec.last_result["checkpoint_path"] = checkpoint.path
            self.save()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finish(trial, "FAILED" if self.child(trial).error else "FINISHED")

    def note_watchdog(self, trial_id: str, reason: str) -> None:
        """The watchdog stopped this trial (Tune may retry it): the reason if it ends in error."""
        if trial_id in self.trials:
            self.trials[trial_id].watchdog = reason
            self.save()

    def on_trial_error(self, iteration, trials, trial, **info):
        rec = self.child(trial)
        rec.error = rec.watchdog or trial_error_message(trial)
        self.finish(trial, "FAILED")

    def finish(self, trial, status: str) -> None:
        rec = self.child(trial)
        if rec.done:
            return  # already recorded before an interruption; --resume must not log it twice
        last = rec.last_result
        metrics = finite_metrics(last, FINAL_METRICS, int(last.get("epoch", 0)))
        if metrics:
            self.client.log_batch(rec.run_id, metrics=metrics)
        if status == "FAILED":
            self.client.set_tag(rec.run_id, runs.ERROR, rec.error[:5000])
        self._log_checkpoint(rec)
        self.client.set_tag(rec.run_id, runs.EPOCHS_RUN, str(last.get("epoch", 0)))
        self.client.set_terminated(rec.run_id, status)
        rec.status = status
        self.save()
        if not self.verbose:
            return
        if status == "FAILED":
            log.info("%s: FAILED (%s)", rec.name, rec.error[:200])
        else:
            log.info(
                "%s: best val_mae %.4f, test_mae %.4f after %s epoch(s)",
                rec.name,
                last.get("best_val_mae", float("nan")),
                last.get("test_mae", float("nan")),
                last.get("epoch", 0),
            )

    def _log_checkpoint(self, rec: TrialRecord) -> None:
        ck = rec.last_result.get("checkpoint_path")
        if ck and Path(ck, "best.pt").exists():
            try:
                self.client.log_artifact(rec.run_id, str(Path(ck, "best.pt")), artifact_path=runs.CHECKPOINT_DIR)
            except Exception as exc:  # artifact store trouble must not stop the search
                self.client.set_tag(rec.run_id, runs.ARTIFACT_ERROR, str(exc)[:500])

    def on_experiment_end(self, trials, **info):
        for t in trials:  # trials stopped by Ctrl-C: mark interrupted, resumable
            rec = self.trials.get(t.trial_id)
            if rec is not None and rec.status == "RUNNING":
                self.client.set_tag(rec.run_id, runs.STATUS, "interrupted")
                self.client.set_terminated(rec.run_id, "KILLED")
                rec.status = "INTERRUPTED"
        self.save()


def trial_error_message(trial) -> str:
    """The last meaningful line of a trial's error (e.g. 'TrialDiverged: loss became nan ...')."""
    text = ""
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        text = Path(path).read_text(errors="replace")
    elif hasattr(trial, "get_error"):
        text = str(trial.get_error() or "")
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Diverged|OutOfMemoryError)\b", ln) or "TrialDiverged" in ln:
            return ln[:1000]
    return (lines[-1] if lines else "unknown error")[:1000]
