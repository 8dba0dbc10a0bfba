"""``python -m crystaltune.report NAME``: a Markdown report of a finished search, read from MLflow.

Leaderboard, the notes-style TRAINING TABLE (model x edge featurizer x node featurizer -> test MAE of
the best-val trial of that combination), parity plot and error histogram of the best model on the
test split, parameter importances. Every number comes from the tracking store; nothing is typed in.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

from . import render
from .errors import CrystaltuneError, cli_main
from .fmt import num
from .search import runs


def search_timing(client, parent, children) -> dict:
    """Wall time of the search split into training epochs (train + per-epoch evaluation, summed over
    trials) and everything else (trial start-up, Ray, Tune, MLflow, checkpoints), per trial slot."""
    tuner_s = sum(m.value for m in client.get_metric_history(parent.info.run_id, "search_time_s"))
    epochs = {r.info.run_id: client.get_metric_history(r.info.run_id, "epoch_time_s") for r in children}
    train_s = sum(m.value for hist in epochs.values() for m in hist)
    # a trial holds its slot until its last epoch: the run's end comes later, once the driver has
    # logged its artifacts, by when Tune may have started the next trial in that slot
    spans = sorted(
        [(r.info.start_time, 1) for r in children] + [(_slot_end(r, epochs[r.info.run_id]), -1) for r in children]
    )
    cur = peak = 0
    for _, d in spans:
        cur += d
        peak = max(peak, cur)
    slot_s = tuner_s * max(peak, 1)
    m = parent.data.metrics
    return {
        "tuner_s": tuner_s,
        "training_s": train_s,
        "concurrent_trials": peak,
        "overhead_fraction": 1 - train_s / slot_s if slot_s else math.nan,
        "epochs_run": int(m.get("epochs_run", 0)),
        "epochs_full_budget": int(m.get("epochs_full_budget", 0)),
    }


def _slot_end(run, epoch_history) -> int:
    """When a trial stopped training (its last epoch's timestamp), else its run's end or start."""
    if epoch_history:
        return max(m.timestamp for m in epoch_history)
    return run.info.end_time or run.info.start_time


def rung_correlation(client, children, max_epochs: int) -> list[dict]:
    """How well a trial's val MAE at epoch e ranks it by its final (best) val MAE: Spearman rho over
    the trials that ran the full budget, for the epochs ASHA's rungs could sit at. A search run with
    ``--grace-period`` = ``--max-epochs`` gives every trial the full budget."""
    from scipy.stats import spearmanr

    curves = []
    for r in children:
        hist = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "val_mae")}
        if len(hist) >= max_epochs and all(math.isfinite(v) for v in hist.values()):
            curves.append(hist)
    if len(curves) < 5:
        return []
    final = [min(h.values()) for h in curves]
    out = []
    for e in sorted({e for e in (1, 2, 3, 5, 10, 15, 20, 30, 40, 50, 60, 80) if e < max_epochs} | {max_epochs // 3}):
        rho = spearmanr([h[e] for h in curves], final).statistic
        out.append({"epoch": e, "rho": float(rho), "trials": len(curves)})
    return out


@dataclass
class RetrainPlan:
    """What ``report`` retrains before it writes: the top-k trials and the baselines, once per seed on
    the search's split or on each of ``cv`` folds; ``epochs`` overrides the horizon (not the reference's)."""

    seeds: list[int] | None = None
    cv: int | None = None
    top_k: int = 1
    epochs: int | None = None
    baseline: str | None = None
    reference: str | None = None


def build_report(
    name: str, tracking_uri: str, output: Path, run_id: str | None = None, plan: RetrainPlan | None = None
) -> tuple[Path, dict]:
    """Write report.md (+ PNGs) for a finished search; first, when ``plan`` asks for it, retrain the
    top-k trials and the baselines. Returns the report path and the facts the README section is
    rendered from."""
    from mlflow.tracking import MlflowClient

    from . import retraining

    client = MlflowClient(tracking_uri)
    exp_id = runs.find_experiment(client, name, tracking_uri)
    parent = runs.latest_search(client, exp_id, run_id)
    pid = parent.info.run_id
    children = runs.trial_runs(client, exp_id, pid)
    if not children:
        raise CrystaltuneError(f"search run {pid} has no trial runs")
    output.mkdir(parents=True, exist_ok=True)
    final_trial = parent.data.tags.get(runs.FINAL_TRIAL, "")
    if plan and (plan.seeds or plan.cv):
        _retrain_study(client, exp_id, pid, plan)
    elif plan and plan.reference:
        _reference_beside_final(client, exp_id, pid, final_trial, plan.reference)
    rows = [runs.TrialRow.from_run(r) for r in children]
    ok, failed = runs.rank(rows)
    facts = _facts(name, tracking_uri, parent, rows)
    facts["timing"] = search_timing(client, parent, children)
    facts["retrained"] = retraining.summarize(client, exp_id, pid, final_trial)
    facts["final"] = _final_facts(parent, name) if final_trial else {}
    facts["rungs"] = rung_correlation(client, children, int(facts["max_epochs"] or 0)) if facts["max_epochs"] else []
    facts["training_table"] = render.training_table(ok)
    lines = _header_lines(name, tracking_uri, parent, rows, ok) + render.timing_lines(facts["timing"])
    lines += _retrained_lines(facts["retrained"]) + render.rung_lines(facts["rungs"], facts["max_epochs"])
    lines += ["## Leaderboard", "", *render.trial_table(ok, render.REPORT_COLUMNS, failed)]
    lines += render.training_table_lines(facts["training_table"])
    if ok:
        lines += ["", "## Best model on the test split", ""] + _best_model_plots(client, ok[0], output)
    lines += render.importance_lines(_importances(client, pid))
    report = output / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (output / "leaderboard.json").write_text(json.dumps([asdict(r) for r in ok + failed], indent=1, default=str))
    (output / "facts.json").write_text(json.dumps(facts, indent=1, default=_as_json))
    return report, facts


def _as_json(x):
    """facts.json: rows as their fields, anything else as text."""
    return asdict(x) if is_dataclass(x) else str(x)


def _facts(name: str, tracking_uri: str, parent, rows: list) -> dict:
    """What the README section is rendered from: the search's setting as its parent run logged it."""
    pp = parent.data.params
    return {
        "name": name,
        "run_id": parent.info.run_id,
        "tracking_uri": tracking_uri,
        "date": time.strftime("%Y-%m-%d", time.localtime(parent.info.start_time / 1000)),
        "machine": pp.get("search.machine", "-"),
        "versions": pp.get("search.versions", "-"),
        "crystals": pp.get("search.crystals"),
        "num_samples": pp.get("search.num_samples"),
        "max_epochs": pp.get("search.max_epochs"),
        "executor": pp.get("search.executor", "train"),
        "space_arg": pp.get("search.space_arg", name),
        "seed": pp.get("search.seed", "0"),
        "trials": len(rows),
        **_status_counts(rows),
        "search_status": parent.data.tags.get(runs.STATUS, ""),
        "top": runs.rank(rows)[0][:5],
        "targets": rows[0].params.get("data.targets", ""),
    }


def _status_counts(rows: list) -> dict[str, int]:
    """Trials by how their MLflow run ended: an interrupted trial (KILLED) still ranks with the epochs
    it ran, so it is counted apart from the finished ones."""
    return {
        "finished": sum(r.status == "FINISHED" for r in rows),
        "interrupted": sum(r.status == "KILLED" for r in rows),
        "failed": sum(r.status == "FAILED" for r in rows),
    }


def _header_lines(name: str, tracking_uri: str, parent, rows: list, ok: list) -> list[str]:
    lines = [
        f"# crystaltune report: {name}",
        "",
        f"Search run `{parent.info.run_id}` ({parent.info.run_name}) in `{tracking_uri}`; report written "
        f"{time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}).",
        "",
        "{} trials: {finished} finished, {interrupted} interrupted, {failed} failed; ".format(
            len(rows), **_status_counts(rows)
        )
        + f"{sum(r.epochs for r in rows)} epochs run.",
        "",
    ]
    if ok:
        b = ok[0]
        lines += [
            f"**Best trial** (lowest val MAE): `{b.name}`: val MAE {num(b.best_val_mae)}, test MAE "
            f"{num(b.test_mae)}, test RMSE {num(b.test_rmse)}, test R² {num(b.test_r2, 3)}.",
            "",
        ]
    return lines


def _importances(client, pid: str) -> dict[str, float] | None:
    """The search's fANOVA importances as its parent run logged them (None: too few trials)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return json.loads(Path(client.download_artifacts(pid, runs.IMPORTANCES, tmp)).read_text())
        except Exception:
            return None


def _retrained_lines(retrained: dict) -> list[str]:
    """The report's section on the retrained configurations: candidates, the one chosen, the baselines."""
    if not retrained:
        return []
    over = render.replicate_word(retrained)
    lines = [
        f"## Retrained per {over} (same split{'s' if over == 'fold' else ''})",
        "",
        (
            f"The searched configuration is the final step's trial {retrained['final']} (chosen on train + val)"
            if retrained.get("final")
            else "The searched configuration is the candidate with the lowest mean val MAE"
        )
        + "; test MAE plays no part.",
        "",
        *render.retrained_table(retrained),
    ]
    if "improvement" in retrained:
        lines += ["", render.improvement_sentence(retrained["improvement"])]
    return lines + [""]


def _retrain_study(client, exp_id: str, pid: str, plan: RetrainPlan) -> None:
    """Retrain the top-k searched configs (candidates), the baseline and the reference on the same
    replicates. ``plan.epochs`` applies to the well-trained default too: a longer horizon for the
    candidates alone would compare them with a default trained less. The reference keeps its recipe."""
    from . import retraining
    from .retrain_jobs import local_slots

    reps = retraining.replicates(plan.seeds, plan.cv)
    study = retraining.RetrainStudy(client, exp_id, pid, reps, parallel=local_slots())
    candidates = retraining.top_configs_of(client, pid, plan.top_k)
    if plan.epochs:
        candidates = [(t, retraining.with_epochs(c, plan.epochs)) for t, c in candidates]
    others = _baselines(plan, candidates[0][1])  # a baseline on another split is refused before any training
    suffix = f", {plan.epochs} epochs" if plan.epochs else ""
    items = [
        ("candidate", cfg, f"trial {trial} (#{rank} of the search){suffix}", {runs.TRIAL_NAME: trial})
        for rank, (trial, cfg) in enumerate(candidates, 1)
    ]
    study.retrain_all(items + [(role, cfg, Path(path).as_posix(), None) for role, path, cfg in others])


def _reference_beside_final(client, exp_id: str, pid: str, final_trial: str, reference: str) -> None:
    """``--reference`` alone on a search with a final step: the reference recipe trained over the
    final model's seeds, on its split; nothing else is retrained."""
    from . import retraining
    from .retrain_jobs import local_slots

    if not final_trial:
        raise CrystaltuneError("--reference needs --retrain-seeds or --cv, or a search that ran its final step")
    done = runs.retrain_runs(client, exp_id, pid)
    final = [
        r for r in done if r.data.tags.get(runs.TRIAL_NAME) == final_trial and r.data.tags.get(runs.ROLE) == "candidate"
    ]
    final = final or [r for r in done if r.data.tags.get(runs.ROLE) == "baseline"]  # the default kept as final
    seeds = sorted({int(r.data.tags[runs.SEED]) for r in final})
    if not seeds:
        raise CrystaltuneError(f"the final step's runs of trial {final_trial} are not in the store")
    searched = retraining.top_configs_of(client, pid, 1)[0][1]  # the search's data and split
    (role, path, cfg), *_ = _baselines(RetrainPlan(seeds=seeds, reference=reference), searched)
    study = retraining.RetrainStudy(client, exp_id, pid, retraining.replicates(seeds, None), parallel=local_slots())
    study.retrain(role, cfg, Path(path).as_posix())


def _final_facts(parent, name: str) -> dict:
    """The final step's outcome as the search run logged it: its trial, its seed ensemble's test MAE
    against the default's, and the registered model."""
    m = parent.data.metrics
    return {
        "trial": parent.data.tags[runs.FINAL_TRIAL],
        "ensemble_test_mae": m.get(runs.FINAL_TEST),
        "default_ensemble_test_mae": m.get(runs.FINAL_DEFAULT_TEST),
        "gain": m.get(runs.FINAL_GAIN),
        "model_uri": f"models:/{runs.model_name(name)}@best",
    }


def _baselines(plan: RetrainPlan, searched):
    """(role, file, config) of the baseline and the reference. The shipped ones train on the search's
    data and split, as its default trial does; a file of the user's own must already name that split
    (checked before any training)."""
    from . import retraining
    from .config import TrialConfig
    from .search.space import builtin_spaces_dir

    out = []
    for role, path in (("baseline", plan.baseline), ("reference", plan.reference)):
        if not path:
            continue
        cfg = TrialConfig.from_yaml(path)
        if not Path(path).resolve().is_relative_to(builtin_spaces_dir().resolve()):
            retraining.check_same_split(searched, cfg, path)  # the user's own file: as written
        else:
            cfg, changed = retraining.on_search_split(searched, cfg)
            if changed:
                said = ", ".join(f"data.{k}" for k in changed)
                print(f"[crystaltune] {role} {path}: trained on the search's data and split ({said} set aside)")
        if plan.epochs and role == "baseline":
            cfg = retraining.with_epochs(cfg, plan.epochs)
        out.append((role, path, cfg))
    return out


def _best_model_plots(client, best, output: Path) -> list[str]:
    """Parity plot and error histogram of the best trial's checkpoint on the test split, per target."""
    from .search.report_artifacts import parity_plots

    with tempfile.TemporaryDirectory() as tmp:
        try:
            ck = client.download_artifacts(best.run_id, runs.CHECKPOINT, tmp)
        except Exception as exc:
            return [f"(best checkpoint not available: {exc})"]
        _, summaries = parity_plots(Path(ck), best.name, output, "best")
    out = []
    for target, summary in summaries.items():
        out += [f"![parity and error histogram](best_{target}.png)", "", summary]
    return out


def _space_default_file(name: str) -> str | None:
    """The default configuration file a built-in space names (``default:``), if any."""
    from .search.space import load_space

    try:
        source = load_space(name).default_source
    except CrystaltuneError:
        return None
    return source if Path(source).is_file() else None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m crystaltune.report", description=__doc__)
    ap.add_argument("name", help="search-space name or the space file the search ran (experiment crystaltune-NAME)")
    ap.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///./mlflow.db)")
    ap.add_argument("--run-id", help="a specific search (parent) run; default: the latest")
    ap.add_argument("--output", help="folder for report.md and PNGs (default: crystaltune-results/NAME/report)")
    ap.add_argument(
        "--retrain-seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="first retrain the search's top-k configs and the baselines once per seed; logged to MLflow",
    )
    ap.add_argument(
        "--top-k",
        type=int,
        default=1,
        metavar="K",
        help="retrain the K best trials of the search and keep the one with the lowest mean val MAE",
    )
    ap.add_argument(
        "--cv", type=int, metavar="K", help="retrain on each fold of a K-fold partition instead of per seed"
    )
    ap.add_argument(
        "--reference",
        help="a second baseline config YAML (e.g. the reference code's own recipe); on a search with a final "
        "step and no --retrain-seeds, trained over the final model's seeds, nothing else retrained",
    )
    ap.add_argument(
        "--retrain-epochs",
        type=int,
        metavar="N",
        help="retrain the top-k configs and the well-trained default for N epochs instead of their own "
        "(LR schedules stretched; the reference keeps its recipe)",
    )
    ap.add_argument(
        "--baseline",
        help="the well-trained default to retrain as the baseline (same split as the search; "
        "default: the space's `default:` file, when it has one)",
    )
    ap.add_argument("--readme", help="also write this search's Results section into that README (between markers)")
    ap.add_argument("--target-mae", type=float, help="a test-MAE target to state the best trial against")
    return ap


def _check_args(a: argparse.Namespace) -> str:
    """Every flag checked before any retraining; the space resolved (``a.name``: its experiment's
    name, its baseline filled in). Returns the MLflow store's URI."""
    for flag, value in (("--baseline", a.baseline), ("--retrain-epochs", a.retrain_epochs)):
        if value is not None and not (a.retrain_seeds or a.cv):
            raise CrystaltuneError(f"{flag} needs --retrain-seeds or --cv")
    for flag, value, lo in (("--retrain-epochs", a.retrain_epochs, 1), ("--top-k", a.top_k, 1), ("--cv", a.cv, 2)):
        if value is not None and value < lo:
            raise CrystaltuneError(f"{flag} must be >= {lo} (got {value})")
    from .search.space import experiment_space

    a.name, source = experiment_space(a.name)
    if (a.retrain_seeds or a.cv) and not a.baseline:
        a.baseline = _space_default_file(source)
    for flag, path in (("--baseline", a.baseline), ("--reference", a.reference), ("--readme", a.readme)):
        if path and not Path(path).is_file():  # checked before any retraining
            raise CrystaltuneError(f"{flag} {path}: no such file")
    from .search.engine import default_tracking_uri

    uri = a.tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise CrystaltuneError(f"no MLflow store at {uri}")
    return uri


@cli_main
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    uri = _check_args(a)
    plan = RetrainPlan(a.retrain_seeds, a.cv, a.top_k, a.retrain_epochs, a.baseline, a.reference)
    path, facts = build_report(a.name, uri, Path(a.output or f"crystaltune-results/{a.name}/report"), a.run_id, plan)
    print(f"report: {path}")
    if a.readme:
        from .readme import render_results, splice

        splice(a.readme, f"results-{a.name}", render_results({**facts, "target_mae": a.target_mae}))
        print(f"README section results-{a.name}: {a.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
