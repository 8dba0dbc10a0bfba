"""Retraining after a search: its top-k configs, the well-trained default and a reference recipe, each
retrained per seed on the search's split (or per fold of a k-fold partition), every run logged to
MLflow under the search run (so the report, and the README section it writes, read the numbers back
instead of anyone typing them)."""

from __future__ import annotations

import hashlib
import math
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import TrialConfig
from .errors import CrystaltuneError
from .retrain_jobs import Job, run_jobs
from .search import runs

#: data settings that must match for two test MAEs to be comparable
SPLIT_KEYS = ("dataset", "file", "targets", "split_seed", "split", "limit", "folds", "fold", "val_folds")


def top_configs_of(client, parent_run_id: str, k: int) -> list[tuple[str, TrialConfig]]:
    """(trial, config) of the search's top-k trials by val MAE, from its ``search/top_configs.yaml``."""
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(parent_run_id, runs.TOP_CONFIGS, tmp)
        except Exception as exc:
            raise CrystaltuneError(f"search run {parent_run_id} has no {runs.TOP_CONFIGS} ({exc})") from None
        entries = yaml.safe_load(open(path))
        return [(e["trial"], TrialConfig.from_dict(e["config"])) for e in entries[:k]]


def check_same_split(best: TrialConfig, baseline: TrialConfig, baseline_source: str) -> None:
    """A baseline of the user's own must already train on the search's split: refused otherwise."""
    a, b = best.to_dict()["data"], baseline.to_dict()["data"]
    diff = [k for k in SPLIT_KEYS if a.get(k) != b.get(k)]
    if diff:
        raise CrystaltuneError(
            f"{baseline_source}: data.{diff[0]} is {b.get(diff[0])!r} but the search used "
            f"{a.get(diff[0])!r}; the baseline must train on the search's split"
        )


def on_search_split(best: TrialConfig, baseline: TrialConfig) -> tuple[TrialConfig, list[str]]:
    """A shipped baseline's recipe (model, graph, optimiser, epochs) on the search's data and split, as
    the search's own default trial is (the space decides the data), e.g. for a copied space pointed at
    new data.
    Also returns the split keys the baseline's file said otherwise, to say so."""
    a, d = best.to_dict()["data"], baseline.to_dict()
    changed = [k for k in SPLIT_KEYS if d["data"].get(k) != a.get(k)]
    d["data"].update({k: a.get(k) for k in SPLIT_KEYS})
    return TrialConfig.from_dict(d, where="baseline on the search's split"), changed


def with_epochs(cfg: TrialConfig, epochs: int) -> TrialConfig:
    """``cfg`` trained for ``epochs`` epochs; step-schedule milestones scale along (cosine follows by itself)."""
    d = cfg.to_dict()
    old = d["train"]["epochs"]
    d["train"]["epochs"] = epochs
    d["optim"]["milestones"] = [max(1, round(m * epochs / old)) for m in d["optim"].get("milestones") or []]
    return TrialConfig.from_dict(d)


def config_digest(cfg: TrialConfig) -> str:
    d = cfg.to_dict()
    d.pop("output", None)
    d["train"].pop("seed", None)
    return hashlib.sha1(repr(sorted(TrialConfig.from_dict(d).flat().items())).encode()).hexdigest()[:12]


def replicates(seeds: list[int] | None, folds: int | None) -> list[tuple[int, int | None]]:
    """(seed, fold) pairs to train each config on: every seed on the search's split, or with ``folds``
    every fold of a k-fold partition (seed: the first of ``seeds``, else 0)."""
    if folds:
        return [((seeds or [0])[0], f) for f in range(folds)]
    return [(s, None) for s in seeds or []]


def _replicate_config(cfg: TrialConfig, seed: int, fold: int | None, folds: int | None, cv: str) -> TrialConfig:
    """``cfg`` with the replicate's seed and fold: the test fold (``cv`` "test") or the validation
    fold of the rest (``cv`` "val": a choice that never sees the test crystals)."""
    d = {**cfg.to_dict(), "output": None}
    d["train"]["seed"] = seed
    if fold is not None:
        d["data"].update({"folds" if cv == "test" else "val_folds": folds, "fold": fold})
    return TrialConfig.from_dict(d)


@dataclass
class RetrainStudy:
    """Retraining under one search: its MLflow client, experiment and parent run, and the (seed, fold)
    replicates every configuration is trained on, so all of them compare on the same ones. ``cv``:
    which set the folds hold out ("test", or "val" of the rest); ``keep_models`` logs each replicate's
    best checkpoint to its run; ``parallel`` trains that many replicates at a time."""

    client: Any
    exp_id: str
    parent_run_id: str
    reps: list[tuple[int, int | None]]
    log: Callable[[str], None] = field(default=lambda line: print(f"[crystaltune] {line}", flush=True))  # a line
    cv: str = "test"
    keep_models: bool = False
    parallel: int = 1  # replicates trained at a time (retrain_jobs.local_slots(): one per core)

    def fold_tag(self, fold: int | None) -> str:
        return "" if fold is None else f"{'val' if self.cv == 'val' else ''}{fold}"

    def retrain(self, role: str, cfg: TrialConfig, source: str, tags: dict[str, str] | None = None) -> list[str]:
        """Train ``cfg`` once per replicate (skipping those already logged for this exact config), log
        each run, and return the run ids of its replicates; ``tags`` mark the runs further (e.g. which
        trial a candidate is)."""
        return self.retrain_all([(role, cfg, source, tags)])[0]

    def retrain_all(self, items: list[tuple[str, TrialConfig, str, dict[str, str] | None]]) -> list[list[str]]:
        """``retrain`` for several (role, config, source, tags) at once, so their replicates can train
        side by side (``parallel`` at a time); the run ids per item, in order."""
        done = {
            (r.data.tags.get(runs.ROLE), r.data.tags.get(runs.CONFIG_DIGEST))
            + (r.data.tags.get(runs.SEED), r.data.tags.get(runs.FOLD, "")): r.info.run_id
            for r in runs.retrain_runs(self.client, self.exp_id, self.parent_run_id)
            if r.info.status == "FINISHED"
        }
        slots: list[list] = []  # per item: a run id already logged, or the index of a job to train
        jobs: list[Job] = []
        for role, cfg, source, tags in items:
            slots.append([])
            for seed, fold in self.reps:
                key = (role, config_digest(cfg), str(seed), self.fold_tag(fold))
                if key in done:
                    self.log(f"{self._label(role, seed, fold)}: already in MLflow, not retrained")
                    slots[-1].append(done[key])
                else:
                    slots[-1].append(len(jobs))
                    jobs.append(self._job(role, cfg, source, tags, seed, fold))
        ids = run_jobs(self.client, self.exp_id, jobs, self.keep_models, self.log, self.parallel)

        def run_id(slot: str | int) -> str | None:  # a job's index, or a run logged before
            return ids[slot] if isinstance(slot, int) else slot

        return [[rid for rid in map(run_id, item) if rid] for item in slots]

    def _label(self, role: str, seed: int, fold: int | None) -> str:
        return f"{role} seed {seed}" + (f" {self.cv} fold {fold}" if fold is not None else "")

    def _job(self, role: str, cfg: TrialConfig, source: str, tags: dict[str, str] | None, seed: int, fold) -> Job:
        """The replicate (seed, fold) of ``cfg`` as a job: its config, run name and tags."""
        folds = max((f for _, f in self.reps if f is not None), default=-1) + 1 or None
        run_tags = {
            runs.PARENT: self.parent_run_id,
            runs.KIND: runs.RETRAIN,
            runs.ROLE: role,
            runs.SEARCH_RUN: self.parent_run_id,
            runs.SEED: str(seed),
            runs.FOLD: self.fold_tag(fold),
            runs.CONFIG_DIGEST: config_digest(cfg),
            runs.SOURCE: source,
            **(tags or {}),
        }
        name = f"{role} s{seed}" + (f" f{self.fold_tag(fold)}" if fold is not None else "")
        cfg = _replicate_config(cfg, seed, fold, folds, self.cv)
        return Job(cfg, name, self._label(role, seed, fold), run_tags)


def _stats(group: list) -> dict[str, Any]:
    """Test MAE per replicate (seed, or fold "f0", ...) of one config's runs, its mean and sd, and the
    mean best val MAE (what the choice among candidates reads)."""
    last = group[-1].data.tags
    key = (lambda r: f"f{r.data.tags[runs.FOLD]}") if last.get(runs.FOLD) else (lambda r: int(r.data.tags[runs.SEED]))
    test = {key(r): r.data.metrics["test_mae"] for r in group}
    vals = list(test.values())
    return {
        "source": last.get(runs.SOURCE, ""),
        "test_mae": dict(sorted(test.items())),
        "cv": bool(last.get(runs.FOLD)),
        "test_mae_mean": statistics.fmean(vals),
        "test_mae_sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "best_val_mae_mean": statistics.fmean(r.data.metrics.get("best_val_mae", math.nan) for r in group),
        "params": group[-1].data.params,
        "epochs": last.get(runs.EPOCHS_RUN, ""),
        "trial": last.get(runs.TRIAL_NAME, ""),
    }


def summarize(client, exp_id: str, parent_run_id: str, final_trial: str = "") -> dict[str, Any]:
    """role -> stats (latest config per role; per trial for candidates). ``best``: the final step's
    trial when the search has one, else the candidate with the lowest mean val MAE (the test MAE
    plays no part in the choice); ``improvement``: how much lower its mean test MAE is than the
    baseline's (the well-trained default); ``selection``: the final step's cross-validation, trial ->
    mean val MAE over its folds."""
    done = sorted(
        (
            r
            for r in runs.retrain_runs(client, exp_id, parent_run_id)
            if r.info.status == "FINISHED" and "test_mae" in r.data.metrics
        ),
        key=lambda r: r.info.start_time,
    )
    selection = _selection([r for r in done if r.data.tags.get(runs.ROLE) == runs.CV_ROLE])
    done = [r for r in done if r.data.tags.get(runs.ROLE) != runs.CV_ROLE]
    cv = bool(done and done[-1].data.tags.get(runs.FOLD))  # the latest study's kind: per fold or per seed
    groups: dict[tuple, list] = {}
    for r in done:
        if bool(r.data.tags.get(runs.FOLD)) == cv:
            role = r.data.tags[runs.ROLE]
            sub = r.data.tags.get(runs.TRIAL_NAME, "") if role == "candidate" else ""
            groups.setdefault((role, sub), []).append(r)
    out: dict[str, Any] = {}
    for (role, sub), group in groups.items():
        digest = group[-1].data.tags.get(runs.CONFIG_DIGEST)
        stats = _stats([r for r in group if r.data.tags.get(runs.CONFIG_DIGEST) == digest])
        if role == "candidate":
            out.setdefault("candidates", {})[sub] = stats
        else:
            out[role] = stats
    if selection:
        out["selection"] = selection
    if final_trial in out.get("candidates", {}):
        out["best"], out["final"] = out["candidates"][final_trial], final_trial
    elif final_trial and "baseline" in out:  # the final step kept the default: its models are the baseline's
        out["best"], out["final"], out["final_is_default"] = out["baseline"], final_trial, True
    elif out.get("candidates"):
        out["best"] = min(out["candidates"].values(), key=lambda c: c["best_val_mae_mean"])
    for ref in ("baseline", "reference"):
        if "best" in out and ref in out:
            out["improvement" if ref == "baseline" else "improvement_reference"] = (
                1 - out["best"]["test_mae_mean"] / out[ref]["test_mae_mean"]
            )
    return out


def _selection(cv_runs: list) -> dict[str, dict[str, Any]]:
    """The final step's choice by cross-validation: trial -> its folds and their mean val MAE."""
    by: dict[str, list] = {}
    for r in cv_runs:
        by.setdefault(r.data.tags.get(runs.TRIAL_NAME, ""), []).append(r.data.metrics.get("best_val_mae", math.nan))
    return {t: {"folds": len(v), "val_mae_mean": statistics.fmean(v)} for t, v in by.items()}
