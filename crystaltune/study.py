"""Retraining study: the search's best config and a baseline config, each retrained over several
seeds on the search's split, every run logged to MLflow under the search run (so the report, and the
README section it writes, read the numbers back instead of anyone typing them)."""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from typing import Any

from .config import TrialConfig
from .errors import CrystaltuneError

#: data settings that must match for two test MAEs to be comparable
SPLIT_KEYS = ("dataset", "data", "targets", "split_seed", "split", "limit")


def best_config_of(client, parent_run_id: str) -> TrialConfig:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(parent_run_id, "search/best_config.yaml", tmp)
        except Exception as exc:
            raise CrystaltuneError(f"search run {parent_run_id} has no search/best_config.yaml ({exc})") from None
        return TrialConfig.from_yaml(path)


def check_same_split(best: TrialConfig, baseline: TrialConfig, baseline_source: str) -> None:
    a, b = best.to_dict()["data"], baseline.to_dict()["data"]
    diff = [k for k in SPLIT_KEYS if a.get(k) != b.get(k)]
    if diff:
        raise CrystaltuneError(f"{baseline_source}: data.{diff[0]} is {b.get(diff[0])!r} but the search used "
                               f"{a.get(diff[0])!r}; the baseline must train on the search's split")


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


def retrain_runs(client, exp_id: str, parent_run_id: str) -> list:
    return client.search_runs([exp_id], filter_string=f"tags.`crystaltune.kind` = 'retrain' and "
                              f"tags.`crystaltune.search_run` = '{parent_run_id}'", max_results=1000)


def retrain(client, exp_id: str, parent_run_id: str, role: str, cfg: TrialConfig, seeds: list[int],
            source: str, log=print) -> None:
    """Train ``cfg`` once per seed (skipping seeds already logged for this exact config) and log each run."""
    from mlflow.entities import Param, RunTag

    from .mlflow_metrics import finite_metrics
    from .train.data import prepare_trial_data
    from .train.loop import TrialDiverged, fit

    digest = config_digest(cfg)
    done = {(r.data.tags.get("crystaltune.role"), r.data.tags.get("crystaltune.config_digest"),
             r.data.tags.get("crystaltune.seed")) for r in retrain_runs(client, exp_id, parent_run_id)
            if r.info.status == "FINISHED"}
    data = None
    for seed in seeds:
        if (role, digest, str(seed)) in done:
            log(f"[crystaltune] {role} seed {seed}: already in MLflow, not retrained")
            continue
        c = TrialConfig.from_dict({**cfg.to_dict(), "output": None})
        c.train.seed = seed
        if data is None:
            data = prepare_trial_data(c)
        run = client.create_run(exp_id, run_name=f"{role} s{seed}", tags={
            "mlflow.parentRunId": parent_run_id, "crystaltune.kind": "retrain", "crystaltune.role": role,
            "crystaltune.search_run": parent_run_id, "crystaltune.seed": str(seed),
            "crystaltune.config_digest": digest, "crystaltune.source": source})
        rid = run.info.run_id
        client.log_batch(rid, params=[Param(k, str(v)[:6000]) for k, v in c.flat().items()])
        t0 = time.perf_counter()
        try:
            m = fit(c, _epoch_logger(client, rid, f"{role} seed {seed}", c.train.epochs, log), data=data)
        except TrialDiverged as exc:
            client.set_tag(rid, "crystaltune.error", str(exc)[:5000])
            client.set_terminated(rid, "FAILED")
            log(f"[crystaltune] {role} seed {seed}: diverged ({exc})")
            continue
        metrics = {**m, "best_val_mae": m["val_mae"], "train_time_s": time.perf_counter() - t0}
        client.log_batch(rid, metrics=finite_metrics(metrics, ("test_mae", "test_rmse", "test_r2", "best_val_mae",
                                                               "train_time_s"), 0),
                         tags=[RunTag("crystaltune.epochs_run", str(m.get("epochs_run", "")))])
        client.set_terminated(rid, "FINISHED")
        log(f"[crystaltune] {role} seed {seed}: test MAE {m['test_mae']:.4f} ({metrics['train_time_s']:.0f} s)")


def _epoch_logger(client, run_id: str, label: str, epochs: int, log):
    """``fit``'s per-epoch callback for a retrain: epoch curves in MLflow as for a trial, and a progress
    line every tenth of the run."""
    from .mlflow_metrics import finite_metrics

    t0 = time.perf_counter()

    def per_epoch(metrics: dict, _checkpoint) -> None:
        step = int(metrics["epoch"])
        client.log_batch(run_id, metrics=finite_metrics(metrics, ("train_mae", "val_mae", "lr"), step))
        if step % max(1, epochs // 10) == 0:
            log(f"[crystaltune] {label}: epoch {step}/{epochs}, val MAE {metrics['val_mae']:.4f} "
                f"(best {metrics['best_val_mae']:.4f}), {time.perf_counter() - t0:.0f} s")

    return per_epoch


def summarize(client, exp_id: str, parent_run_id: str) -> dict[str, Any]:
    """role -> {source, seeds: {seed: test_mae}, mean, sd}; the latest config per role wins."""
    by_role: dict[str, list] = {}
    for r in sorted(retrain_runs(client, exp_id, parent_run_id), key=lambda r: r.info.start_time):
        if r.info.status == "FINISHED" and "test_mae" in r.data.metrics:
            by_role.setdefault(r.data.tags["crystaltune.role"], []).append(r)
    out = {}
    for role, runs in by_role.items():
        digest = runs[-1].data.tags.get("crystaltune.config_digest")
        runs = [r for r in runs if r.data.tags.get("crystaltune.config_digest") == digest]
        seeds = {int(r.data.tags["crystaltune.seed"]): r.data.metrics["test_mae"] for r in runs}
        vals = list(seeds.values())
        out[role] = {"source": runs[-1].data.tags.get("crystaltune.source", ""), "seeds": dict(sorted(seeds.items())),
                     "mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                     "params": runs[-1].data.params, "epochs": runs[-1].data.tags.get("crystaltune.epochs_run", "")}
    if "best" in out and "baseline" in out:
        out["improvement"] = 1 - out["best"]["mean"] / out["baseline"]["mean"]
    return out


def improvement_sentence(improvement: float, target: float = 0.20) -> str:
    """How the best config's mean test MAE compares with the baseline's, against the target."""
    word = "lower" if improvement >= 0 else "higher"
    met = "meets" if improvement >= target else "misses"
    return (f"The best config's mean test MAE is **{100 * abs(improvement):.1f}% {word}** than the baseline's on "
            f"the same split ({met} the {100 * target:.0f}% improvement target).")
