"""The search's final model (``--finalize K``): after the trials, its top-K configurations are
retrained at the full horizon; on a set under ``cv_below`` crystals the one with the lowest mean val
MAE over K-fold cross-validation on train + val is chosen (the test crystals never take part),
otherwise the one with the lowest mean val MAE over the seeds; the default trial, when among them,
is kept unless beaten by more than one standard error. The chosen configuration and the
well-trained default (the search's default point, same horizon) are each trained over the seeds on
the search's split; the chosen one's seed models, as one ensemble, become the registered model
``models:/crystaltune-NAME@best``. Every run is logged under the search run (``report`` reads them)."""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import TrialConfig
from ..errors import CrystaltuneError
from ..fmt import lower_or_higher
from ..log import console
from ..schema import build, option
from . import runs
from .runs import TrialRow


@dataclass
class FinalizePlan:
    """How the final model is made (the space file's ``finalize:`` block; ``--finalize K`` sets top_k)."""

    top_k: int = option(3, lo=1, hi=50, doc="configurations retrained: the search's best K trials")
    seeds: list[int] = option(default_factory=lambda: [0, 1, 2], doc="seeds each final model is trained with")
    cv_folds: int = option(3, lo=2, hi=20, doc="folds of train + val for the choice on small sets")
    cv_below: int = option(3000, lo=0, doc="crystals: below this the choice is made by cross-validation")

    def check(self, where: str) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise CrystaltuneError(f"{where}.seeds: distinct non-negative integers, at least one; got {self.seeds}")

    def describe_choice(self, cross_validated: bool) -> str:
        if cross_validated:
            return f"{self.cv_folds}-fold cross-validation on train + val"
        return f"mean val MAE over {len(self.seeds)} seeds"


@dataclass
class FinalModel:
    """What the final step measured: the chosen trial, its and the default's test MAE per seed, and
    their seed ensembles' test MAE."""

    trial: str
    chosen_by: str
    selection: dict[str, float]  # trial -> the mean val MAE it was chosen by
    test_mae: list[float]
    default_test_mae: list[float]
    ensemble_test_mae: float
    default_ensemble_test_mae: float
    model_uri: str = ""
    version: str = ""

    @property
    def gain(self) -> float:
        """How much lower the final ensemble's test MAE is than the default's ensemble (fraction)."""
        return 1 - self.ensemble_test_mae / self.default_ensemble_test_mae

    def lines(self) -> list[str]:
        """The console's closing lines (also the MLflow parent run's description)."""

        def ms(v: list[float]) -> str:
            return f"{statistics.fmean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.4f}"

        n = len(self.test_mae)
        return [
            f"final model: {self.trial} (chosen by {self.chosen_by}), retrained over {n} seeds: test MAE "
            f"{ms(self.test_mae)}, their ensemble {self.ensemble_test_mae:.4f}",
            f"well-trained default retrained the same way: test MAE {ms(self.default_test_mae)}, its ensemble "
            f"{self.default_ensemble_test_mae:.4f}; the final model is {lower_or_higher(self.gain)}",
            f"registered: {self.model_uri} (version {self.version}, alias best)",
        ]


def parse_plan(raw: Any, where: str) -> FinalizePlan:
    """The space file's ``finalize:`` mapping as a checked plan."""
    plan = build(FinalizePlan, raw, where)
    plan.check(where)
    return plan


@dataclass
class Choice:
    """The configuration chosen, what it was chosen by, and the runs of its seed models."""

    trial: str
    chosen_by: str
    selection: dict[str, float]  # trial -> its mean val MAE in the choice
    run_ids: list[str]


def finalize(tracker, space, ok: list[TrialRow], crystals: int, plan: FinalizePlan) -> FinalModel:
    """Choose, retrain over the seeds, ensemble, register; see the module docstring."""
    from ..retrain_jobs import local_slots
    from ..retraining import RetrainStudy

    client, exp, parent, log = tracker.client, tracker.experiment_id, tracker.parent_run_id, console().info
    study = dict(log=log, parallel=local_slots())
    seeds = RetrainStudy(client, exp, parent, [(s, None) for s in plan.seeds], keep_models=True, **study)
    top = ok[: plan.top_k]
    candidates = {r.trial: _config_of(tracker, space, r) for r in top}
    default_trial = next((r.trial for r in top if r.default), None)
    default = ("baseline", space.trial_config(space.default_point), "the search's default (final)", None)
    cross_validated = crystals < plan.cv_below and len(candidates) > 1
    if cross_validated:
        cv = RetrainStudy(client, exp, parent, [(plan.seeds[0], f) for f in range(plan.cv_folds)], cv="val", **study)
        folds = cv.retrain_all([(runs.CV_ROLE, c, f"trial {t}", _trial_tag(t)) for t, c in candidates.items()])
        scores = {t: _val_maes(client, ids) for t, ids in zip(candidates, folds)}
        trial, why = pick(scores, default_trial)
        if trial == default_trial:  # the default is trained once, as the default
            (default_ids,) = seeds.retrain_all([default])
            final_ids = default_ids
        else:
            chosen = ("candidate", candidates[trial], f"trial {trial} (final)", _trial_tag(trial))
            final_ids, default_ids = seeds.retrain_all([chosen, default])
    else:
        others = [t for t in candidates if t != default_trial]
        items = [("candidate", candidates[t], f"trial {t} (final)", _trial_tag(t)) for t in others]
        *ids, default_ids = seeds.retrain_all(items + [default])
        by_trial = dict(zip(others, ids)) | ({default_trial: default_ids} if default_trial else {})
        scores = {t: _val_maes(client, by_trial[t]) for t in candidates}
        trial, why = pick(scores, default_trial)
        final_ids = by_trial[trial]
    selection = {t: statistics.fmean(v) for t, v in scores.items()}
    choice = Choice(trial, plan.describe_choice(cross_validated) + why, selection, final_ids)
    return _measure_and_register(tracker, space, choice, default_ids)


def pick(scores: dict[str, list[float]], default_trial: str | None) -> tuple[str, str]:
    """The trial with the lowest mean val MAE, unless the default's mean is within one standard error
    of it (Breiman's one-standard-error rule): a gain the folds or seeds cannot tell from noise does not
    replace the well-trained default. Returns the trial and, when the rule kept the default, why."""
    best = min(scores, key=lambda t: statistics.fmean(scores[t]))
    if default_trial is None or best == default_trial:
        return best, ""
    v = scores[best]
    se = statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else 0.0
    if statistics.fmean(scores[default_trial]) <= statistics.fmean(v) + se:
        return default_trial, f"; the default kept: {best}'s lower mean is within one standard error ({se:.4f})"
    return best, ""


def _trial_tag(trial: str) -> dict[str, str]:
    return {runs.TRIAL_NAME: trial}


def _config_of(tracker, space, row: TrialRow) -> TrialConfig:
    from .space import decode_sampled

    return space.trial_config(decode_sampled(tracker.trials[row.trial_id].config, space))


def _val_maes(client, run_ids: list[str]) -> list[float]:
    return [client.get_run(r).data.metrics["best_val_mae"] for r in run_ids]


def _test_maes(client, run_ids: list[str]) -> list[float]:
    return [client.get_run(r).data.metrics["test_mae"] for r in run_ids]


def _members(client, run_ids: list[str], folder: Path, label: str) -> list[tuple[str, dict]]:
    """(name, checkpoint dict) of each seed model, from its run's artifacts."""
    from ..checkpoint import read_checkpoint

    out = []
    for rid in run_ids:
        path = Path(client.download_artifacts(rid, runs.CHECKPOINT, str(folder / rid)))
        out.append((f"{label} seed {client.get_run(rid).data.tags[runs.SEED]}", read_checkpoint(path)))
    return out


def _measure_and_register(tracker, space, choice: Choice, default_ids: list[str]) -> FinalModel:
    """The seed ensembles of the chosen config and of the default on the test split; the chosen one's
    registered as the space's model with alias ``best``; the parent run told."""
    import torch

    from ..ensemble import ensemble_payload, log_ensemble

    client, name = tracker.client, runs.model_name(space.name)
    with tempfile.TemporaryDirectory(prefix="ct-final-") as tmp:
        final = ensemble_payload(_members(client, choice.run_ids, Path(tmp), choice.trial))
        base = ensemble_payload(_members(client, default_ids, Path(tmp), "default"))
        torch.save(final, Path(tmp) / "final.pt")
        parent = client.get_run(tracker.parent_run_id)
        info = log_ensemble(client, tracker.tracking_uri, parent, Path(tmp) / "final.pt", final, name)
    result = FinalModel(
        trial=choice.trial,
        chosen_by=choice.chosen_by,
        selection=choice.selection,
        test_mae=_test_maes(client, choice.run_ids),
        default_test_mae=_test_maes(client, default_ids),
        ensemble_test_mae=final["metrics"]["test_mae_ensemble"],
        default_ensemble_test_mae=base["metrics"]["test_mae_ensemble"],
        model_uri=f"models:/{name}@best",
        version=str(info.registered_model_version or ""),
    )
    _tell(tracker, space, result)
    return result


def _tell(tracker, space, result: FinalModel) -> None:
    """Alias ``best`` on the final ensemble's version, described; the parent run's final metrics."""
    from mlflow.entities import Metric

    client, name = tracker.client, runs.model_name(space.name)
    text = " ".join(result.lines()[:2])
    if result.version:
        about = f"Final model of the `{space.name}` search. {text}"
        client.update_model_version(name, result.version, description=about)
        client.set_model_version_tag(name, result.version, "trial", result.trial)
        client.set_model_version_tag(name, result.version, "kind", "final ensemble")
        client.set_registered_model_alias(name, "best", result.version)
    metrics = {
        runs.FINAL_TEST: result.ensemble_test_mae,
        runs.FINAL_DEFAULT_TEST: result.default_ensemble_test_mae,
        runs.FINAL_GAIN: result.gain,
    }
    now = int(time.time() * 1000)  # a later final step (--resume) must read as the latest value, not tie at 0
    client.log_batch(tracker.parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    client.set_tag(tracker.parent_run_id, runs.FINAL_TRIAL, result.trial)
