"""Retraining after a search: its top-k configs, the well-trained default and a reference recipe, each
retrained per seed on the search's split (or per fold of a k-fold partition), every run logged to
MLflow under the search run (so the report, and the README section it writes, read the numbers back
instead of anyone typing them)."""

from __future__ import annotations

import hashlib
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TrialConfig
from .errors import CrystaltuneError
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
    best checkpoint to its run."""

    client: Any
    exp_id: str
    parent_run_id: str
    reps: list[tuple[int, int | None]]
    log: Callable[[str], None] = field(default=lambda line: print(f"[crystaltune] {line}", flush=True))  # a line
    cv: str = "test"
    keep_models: bool = False

    def fold_tag(self, fold: int | None) -> str:
        return "" if fold is None else f"{'val' if self.cv == 'val' else ''}{fold}"

    def retrain(self, role: str, cfg: TrialConfig, source: str, tags: dict[str, str] | None = None) -> list[str]:
        """Train ``cfg`` once per replicate (skipping those already logged for this exact config), log
        each run, and return the run ids of its replicates; ``tags`` mark the runs further (e.g. which
        trial a candidate is)."""
        digest = config_digest(cfg)
        done = {
            (r.data.tags.get(runs.ROLE), r.data.tags.get(runs.CONFIG_DIGEST))
            + (r.data.tags.get(runs.SEED), r.data.tags.get(runs.FOLD, "")): r.info.run_id
            for r in runs.retrain_runs(self.client, self.exp_id, self.parent_run_id)
            if r.info.status == "FINISHED"
        }
        folds = max((f for _, f in self.reps if f is not None), default=-1) + 1 or None
        out = []
        for seed, fold in self.reps:
            label = f"{role} seed {seed}" + (f" {self.cv} fold {fold}" if fold is not None else "")
            key = (role, digest, str(seed), self.fold_tag(fold))
            if key in done:
                self.log(f"{label}: already in MLflow, not retrained")
                out.append(done[key])
                continue
            tags_of_run = {
                runs.PARENT: self.parent_run_id,
                runs.KIND: runs.RETRAIN,
                runs.ROLE: role,
                runs.SEARCH_RUN: self.parent_run_id,
                runs.SEED: str(seed),
                runs.FOLD: self.fold_tag(fold),
                runs.CONFIG_DIGEST: digest,
                runs.SOURCE: source,
                **(tags or {}),
            }
            name = f"{role} s{seed}" + (f" f{self.fold_tag(fold)}" if fold is not None else "")
            rid = self._train_one(_replicate_config(cfg, seed, fold, folds, self.cv), name, label, tags_of_run)
            out += [rid] if rid else []
        return out

    def _train_one(self, cfg: TrialConfig, name: str, label: str, tags: dict[str, str]) -> str | None:
        """One replicate: its MLflow run, per-epoch curves, final metrics (and its checkpoint with
        ``keep_models``); returns the run id, or None for a diverged one (marked FAILED)."""
        from mlflow.entities import Param, RunTag

        from .mlflow_metrics import finite_metrics
        from .train.loop import TrialDiverged, fit

        client = self.client
        rid = client.create_run(self.exp_id, run_name=name, tags=tags).info.run_id
        client.log_batch(rid, params=[Param(k, str(v)[:6000]) for k, v in cfg.used_flat().items()])
        with tempfile.TemporaryDirectory(prefix="ct-retrain-") if self.keep_models else nullcontext() as tmp:
            if tmp is not None:
                cfg.output = str(Path(tmp) / "best.pt")
            t0 = time.perf_counter()
            try:
                m = fit(cfg, _epoch_logger(client, rid, label, cfg.train.epochs, self.log))
            except TrialDiverged as exc:
                client.set_tag(rid, runs.ERROR, str(exc)[:5000])
                client.set_terminated(rid, "FAILED")
                self.log(f"{label}: diverged ({exc})")
                return None
            train_time = time.perf_counter() - t0
            if tmp is not None:
                client.log_artifact(rid, cfg.output, artifact_path=runs.CHECKPOINT_DIR)
        metrics = {**m, "best_val_mae": m["val_mae"], "train_time_s": train_time}
        client.log_batch(
            rid,
            metrics=finite_metrics(metrics, ("test_mae", "test_rmse", "test_r2", "best_val_mae", "train_time_s"), 0),
            tags=[RunTag(runs.EPOCHS_RUN, str(m.get("epochs_run", "")))],
        )
        client.set_terminated(rid, "FINISHED")
        self.log(f"{label}: val MAE {m['val_mae']:.4f}, test MAE {m['test_mae']:.4f} ({metrics['train_time_s']:.0f} s)")
        return rid


def _epoch_logger(client, run_id: str, label: str, epochs: int, log):
    """``fit``'s per-epoch callback for a retrain: epoch curves in MLflow as for a trial, and a progress
    line every tenth of the run."""
    from .mlflow_metrics import finite_metrics

    t0 = time.perf_counter()

    def per_epoch(metrics: dict, _checkpoint) -> None:
        step = int(metrics["epoch"])
        client.log_batch(run_id, metrics=finite_metrics(metrics, ("train_mae", "val_mae", "lr"), step))
        if step % max(1, epochs // 10) == 0:
            log(
                f"{label}: epoch {step}/{epochs}, val MAE {metrics['val_mae']:.4f} "
                f"(best {metrics['best_val_mae']:.4f}), {time.perf_counter() - t0:.0f} s"
            )

    return per_epoch


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


def summarize(client, exp_id: str, parent_run_id: str) -> dict[str, Any]:
    """role -> stats (latest config per role; per trial for candidates). ``best``: the candidate with
    the lowest mean val MAE (the test MAE plays no part in the choice); ``improvement``: how much
    lower its mean test MAE is than the baseline's (the well-trained default)."""
    done = sorted(
        (
            r
            for r in runs.retrain_runs(client, exp_id, parent_run_id)
            if r.info.status == "FINISHED" and "test_mae" in r.data.metrics
        ),
        key=lambda r: r.info.start_time,
    )
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
    if out.get("candidates"):
        out["best"] = min(out["candidates"].values(), key=lambda c: c["best_val_mae_mean"])
    for ref in ("baseline", "reference"):
        if "best" in out and ref in out:
            out["improvement" if ref == "baseline" else "improvement_reference"] = (
                1 - out["best"]["test_mae_mean"] / out[ref]["test_mae_mean"]
            )
    return out
