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
from pathlib import Path

import numpy as np

from .errors import CrystaltuneError, cli_main
from .fmt import num, pyplot


def _latest_parent(client, exp_id: str, run_id: str | None):
    if run_id:
        return client.get_run(run_id)
    runs = client.search_runs(
        [exp_id],
        filter_string="tags.`crystaltune.kind` = 'search'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise CrystaltuneError("no search run in this experiment")
    return runs[0]


def search_timing(client, parent, children) -> dict:
    """Wall time of the search split into training epochs (train + per-epoch evaluation, summed over
    trials) and everything else (trial start-up, Ray, Tune, MLflow, checkpoints), per trial slot."""
    tuner_s = sum(m.value for m in client.get_metric_history(parent.info.run_id, "search_time_s"))
    if not tuner_s and parent.info.end_time:  # searches logged before search_time_s existed: the parent
        tuner_s = (parent.info.end_time - parent.info.start_time) / 1000  # run's span (a slight overestimate)
    train_s = sum(m.value for r in children for m in client.get_metric_history(r.info.run_id, "epoch_time_s"))
    spans = sorted(
        [(r.info.start_time, 1) for r in children] + [(r.info.end_time or r.info.start_time, -1) for r in children]
    )
    cur = peak = 0
    for _, d in spans:
        cur += d
        peak = max(peak, cur)
    slot_s = tuner_s * max(peak, 1)
    m = parent.data.metrics
    p = parent.data.params
    full = m.get("epochs_full_budget") or int(p.get("search.num_samples", 0)) * int(p.get("search.max_epochs", 0))
    run = m.get("epochs_run") or sum(int(float(r.data.tags.get("crystaltune.epochs_run", 0) or 0)) for r in children)
    return {
        "tuner_s": tuner_s,
        "training_s": train_s,
        "concurrent_trials": peak,
        "overhead_fraction": 1 - train_s / slot_s if slot_s else math.nan,
        "epochs_run": int(run),
        "epochs_full_budget": int(full),
    }


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


def _f(x, nd=4):
    return num(x, nd) if isinstance(x, float) else "-"


def build_report(
    name: str,
    tracking_uri: str,
    output: Path,
    run_id: str | None = None,
    baseline: str | None = None,
    seeds: list[int] | None = None,
    retrain_epochs: int | None = None,
    top_k: int = 1,
    reference: str | None = None,
    cv: int | None = None,
) -> tuple[Path, dict]:
    """Write report.md (+ PNGs) for a finished search; first, when ``seeds`` or ``cv`` ask for it,
    retrain the top-k trials and the baselines on the same split (each seed) or on each of ``cv``
    folds. Returns the report path and the facts the README section is rendered from."""
    from mlflow.tracking import MlflowClient

    from . import retraining
    from .search.leaderboard import ranked

    client = MlflowClient(tracking_uri)
    exp_id, parent, children = _search_runs(client, name, tracking_uri, run_id)
    pid = parent.info.run_id
    output.mkdir(parents=True, exist_ok=True)
    if seeds or cv:
        _retrain_study(client, exp_id, pid, baseline, reference, seeds, cv, top_k, retrain_epochs)
    rows = [_trial_row(r) for r in children]
    ok = sorted([r for r in rows if ranked(r["status"], r["val"])], key=lambda r: r["val"])
    failed = [r for r in rows if r not in ok]
    facts = _facts(name, tracking_uri, parent, children, rows, ok)
    facts["timing"] = search_timing(client, parent, children)
    facts["retrained"] = retraining.summarize(client, exp_id, pid)
    facts["rungs"] = rung_correlation(client, children, int(facts["max_epochs"] or 0)) if facts["max_epochs"] else []
    facts["training_table"] = _training_table(ok)
    lines = _header_lines(name, tracking_uri, parent, rows, ok) + _timing_lines(facts["timing"])
    lines += _retrained_lines(facts["retrained"]) + _rung_lines(facts["rungs"], facts["max_epochs"])
    lines += _leaderboard_lines(ok, failed) + _training_table_lines(facts["training_table"])
    if ok:
        lines += ["", "## Best model on the test split", ""] + _best_model_plots(client, ok[0], output)
    lines += _importance_lines(client, pid)
    report = output / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (output / "leaderboard.json").write_text(json.dumps(ok + failed, indent=1, default=str))
    (output / "facts.json").write_text(json.dumps(facts, indent=1, default=str))
    return report, facts


def _search_runs(client, name: str, tracking_uri: str, run_id: str | None):
    """(experiment id, the search's parent run, its trial runs): the latest search unless ``run_id``."""
    exp = client.get_experiment_by_name(f"crystaltune-{name}")
    if exp is None:
        raise CrystaltuneError(f"no MLflow experiment 'crystaltune-{name}' in {tracking_uri}")
    parent = _latest_parent(client, exp.experiment_id, run_id)
    children = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`crystaltune.kind` = 'trial'",
        max_results=5000,
    )
    if not children:
        raise CrystaltuneError(f"search run {parent.info.run_id} has no trial runs")
    return exp.experiment_id, parent, children


def _facts(name: str, tracking_uri: str, parent, children, rows: list[dict], ok: list[dict]) -> dict:
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
        "search_status": parent.data.tags.get("crystaltune.status", ""),
        "top": ok[:5],
        "targets": children[0].data.params.get("data.targets", ""),
    }


def _status_counts(rows: list[dict]) -> dict[str, int]:
    """Trials by how their MLflow run ended: an interrupted trial (KILLED) still ranks with the epochs
    it ran, so it is counted apart from the finished ones."""
    return {
        "finished": sum(r["status"] == "FINISHED" for r in rows),
        "interrupted": sum(r["status"] == "KILLED" for r in rows),
        "failed": sum(r["status"] == "FAILED" for r in rows),
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
        + f"{sum(r['epochs'] for r in rows)} epochs run.",
        "",
    ]
    if ok:
        b = ok[0]
        lines += [
            f"**Best trial** (lowest val MAE): `{b['name']}`: val MAE {_f(b['val'])}, test MAE {_f(b['test'])}, "
            f"test RMSE {_f(b['rmse'])}, test R² {_f(b['r2'], 3)}.",
            "",
        ]
    return lines


def _timing_lines(t: dict) -> list[str]:
    return [
        "## Search time",
        "",
        f"`tuner.fit` took {t['tuner_s']:.0f} s with up to {t['concurrent_trials']} trials at a time; training epochs "
        f"(including per-epoch evaluation) took {t['training_s']:.0f} s in all, so {100 * t['overhead_fraction']:.1f}% "
        f"of the trial-slot time was overhead (trial start-up, Ray, Tune, MLflow, checkpoints). ASHA ran "
        f"{t['epochs_run']} of the {t['epochs_full_budget']} epochs a full-budget search would run.",
        "",
    ]


def _training_table_lines(table: list[dict]) -> list[str]:
    return [
        "",
        "## TRAINING TABLE",
        "",
        "Test MAE of the best-val trial of each model x edge featurizer x node featurizer combination tried.",
        "",
        "| model | edge featurizer | node featurizer | trials | best val MAE | its test MAE |",
        "|---|---|---|---|---|---|",
    ] + [
        f"| {g['model']} | {g['edge']} | {g['node']} | {g['trials']} | {_f(g['val'])} | {_f(g['test'])} |"
        for g in table
    ]


def _trial_row(r) -> dict:
    """One trial's row from its MLflow run."""
    m, p = r.data.metrics, r.data.params
    return {
        "name": r.info.run_name,
        "status": r.info.status,
        "run_id": r.info.run_id,
        "val": m.get("best_val_mae", math.nan),
        "test": m.get("test_mae", math.nan),
        "rmse": m.get("test_rmse", math.nan),
        "r2": m.get("test_r2", math.nan),
        "epochs": int(float(r.data.tags.get("crystaltune.epochs_run", 0) or 0)),
        "model": p.get("model.name"),
        "edge": p.get("model.edge_featurizer"),
        "node": p.get("model.node_featurizer"),
        "kl": p.get("loss.kl"),
        "loss": p.get("loss.name"),
        "hidden": p.get("model.hidden"),
        "layers": p.get("model.layers"),
        "lr": p.get("optim.lr"),
        "error": r.data.tags.get("crystaltune.error", ""),
    }


def _rung_lines(rungs: list[dict], max_epochs) -> list[str]:
    if not rungs:
        return []
    return [
        "## How early val MAE predicts the final one",
        "",
        f"Spearman rank correlation between a trial's val MAE at epoch e and its best val MAE over the full "
        f"{max_epochs} epochs ({rungs[0]['trials']} trials that ran the full budget). ASHA compares "
        "trials at its rungs (grace period x reduction factor^i): rungs where rho is low stop trials that "
        "would have ended well.",
        "",
        "| epoch | " + " | ".join(str(r["epoch"]) for r in rungs) + " |",
        "|---|" + "---|" * len(rungs),
        "| rho | " + " | ".join(f"{r['rho']:.2f}" for r in rungs) + " |",
        "",
    ]


def _leaderboard_lines(ok: list[dict], failed: list[dict]) -> list[str]:
    lines = [
        "## Leaderboard",
        "",
        "| # | trial | val MAE | test MAE | R² | epochs | model | edge | node | loss | KL | hidden | layers | lr |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(ok, 1):
        lr = _f(float(r["lr"]), 5) if r["lr"] else "-"
        lines.append(
            f"| {i} | {r['name'].split()[0]} | {_f(r['val'])} | {_f(r['test'])} | {_f(r['r2'], 3)} | {r['epochs']} | "
            f"{r['model']} | {r['edge']} | {r['node']} | {r['loss']} | {r['kl']} | {r['hidden']} | "
            f"{r['layers']} | {lr} |"
        )
    for r in failed:
        lines.append(
            f"| - | {r['name'].split()[0]} | {r['status']} | | | | {r['model']} | {r['edge']} | {r['node']} | "
            f"{r['loss']} | "
            f"{r['kl']} | | | {r['error'][:80]} |"
        )
    return lines


def _training_table(ok: list[dict]) -> list[dict]:
    """The notes' TRAINING TABLE: per model x edge x node featurizer, the best-val trial's test MAE."""
    groups: dict[tuple, list] = {}
    for r in ok:
        groups.setdefault((r["model"], r["edge"], r["node"]), []).append(r)
    return [
        {"model": k[0], "edge": k[1], "node": k[2], "trials": len(v), "val": v[0]["val"], "test": v[0]["test"]}
        for k, v in sorted(groups.items(), key=lambda kv: kv[1][0]["val"])
    ]


def _importance_lines(client, pid: str) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            imp = json.loads(Path(client.download_artifacts(pid, "search/param_importances.json", tmp)).read_text())
        except Exception:
            return ["", "(no parameter importances: too few finished trials)"]
    return ["", "## Parameter importances (fANOVA on best val MAE)", "", "| parameter | importance |", "|---|---|"] + [
        f"| {k} | {v:.3f} |" for k, v in imp.items()
    ]


def _retrained_lines(retrained: dict) -> list[str]:
    """The report's table of retrained configurations: candidates, the one chosen, the baselines."""
    if not retrained:
        return []
    from . import retraining

    over = "fold" if retrained.get("best", {}).get("cv") else "seed"
    lines = [
        f"## Retrained per {over} (same split{'s' if over == 'fold' else ''})",
        "",
        "The searched configuration is the candidate with the lowest mean val MAE; test MAE plays no part.",
        "",
        f"| configuration | test MAE per {over} | mean ± sd | mean val MAE |",
        "|---|---|---|---|",
    ]
    rows = [
        (f"candidate {t}" + (" (chosen)" if c is retrained.get("best") else ""), c)
        for t, c in retrained.get("candidates", {}).items()
    ]
    rows += [(role, retrained[role]) for role in ("baseline", "reference") if role in retrained]
    for label, r in rows:
        lines.append(
            f"| {label} ({r['source']}) | {' / '.join(f'{v:.4f}' for v in r['seeds'].values())} | "
            f"{r['mean']:.4f} ± {r['sd']:.4f} | {r['val_mean']:.4f} |"
        )
    if "improvement" in retrained:
        lines += ["", retraining.improvement_sentence(retrained["improvement"])]
    return lines + [""]


def _retrain_study(
    client,
    exp_id: str,
    pid: str,
    baseline: str | None,
    reference: str | None,
    seeds: list[int] | None,
    cv: int | None,
    top_k: int,
    retrain_epochs: int | None,
) -> None:
    """Retrain the top-k searched configs (candidates), the baseline and the reference on the same
    replicates. The shipped baselines train on the search's data and split, as its default trial does;
    a baseline file of the user's own must already name that split (checked before any training).
    ``retrain_epochs`` applies to the well-trained default too: a longer horizon for the candidates
    alone would compare them with a default trained less. The reference keeps its own recipe."""
    from . import retraining
    from .config import TrialConfig

    reps = retraining.replicates(seeds, cv)
    candidates = retraining.top_configs_of(client, pid, top_k)
    if retrain_epochs:
        candidates = [(t, retraining.with_epochs(c, retrain_epochs)) for t, c in candidates]
    from .search.space import builtin_spaces_dir

    others = []
    for role, path in (("baseline", baseline), ("reference", reference)):
        if not path:
            continue
        cfg = TrialConfig.from_yaml(path)
        if not Path(path).resolve().is_relative_to(builtin_spaces_dir().resolve()):
            retraining.check_same_split(candidates[0][1], cfg, path)  # the user's own file: as written
            others.append((role, path, cfg))
        else:
            cfg, changed = retraining.on_search_split(candidates[0][1], cfg)
            if changed:
                said = ", ".join(f"data.{k}" for k in changed)
                print(f"[crystaltune] {role} {path}: trained on the search's data and split ({said} set aside)")
            others.append((role, path, cfg))
    if retrain_epochs:
        others = [(r, p, retraining.with_epochs(c, retrain_epochs) if r == "baseline" else c) for r, p, c in others]
    suffix = f", {retrain_epochs} epochs" if retrain_epochs else ""
    for rank, (trial, cfg) in enumerate(candidates, 1):
        retraining.retrain(
            client,
            exp_id,
            pid,
            "candidate",
            cfg,
            reps,
            f"trial {trial} (#{rank} of the search){suffix}",
            tags={"crystaltune.trial": trial},
        )
    for role, path, cfg in others:
        retraining.retrain(client, exp_id, pid, role, cfg, reps, Path(path).as_posix())


def _best_model_plots(client, best, output: Path) -> list[str]:
    plt = pyplot()

    from .checkpoint import load_checkpoint
    from .train.metrics import predict_indices
    from .train.trial_data import prepare_trial_data

    with tempfile.TemporaryDirectory() as tmp:
        try:
            ck = client.download_artifacts(best["run_id"], "checkpoint/best.pt", tmp)
        except Exception as exc:
            return [f"(best checkpoint not available: {exc})"]
        loaded = load_checkpoint(ck)
    data = prepare_trial_data(loaded.config)
    p, y = predict_indices(loaded.model, data.store, data.test, data.targets, loaded.normalizer, "cpu")
    out = []
    for t, target in enumerate(data.targets):
        m = np.isfinite(y[:, t])
        err = p[m, t] - y[m, t]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4), dpi=110)
        a1.scatter(y[m, t], p[m, t], s=8, alpha=0.6)
        lo, hi = float(min(y[m, t].min(), p[m, t].min())), float(max(y[m, t].max(), p[m, t].max()))
        a1.plot([lo, hi], [lo, hi], "k--", lw=1)
        a1.set_xlabel(f"true {target}")
        a1.set_ylabel(f"predicted {target}")
        a1.set_title(f"parity, test MAE {np.abs(err).mean():.4f}")
        a2.hist(err, bins=30)
        a2.set_xlabel("prediction error")
        a2.set_title(f"errors (n={len(err)})")
        fig.tight_layout()
        fig.savefig(output / f"best_{target}.png")
        plt.close(fig)
        out += [
            f"![parity and error histogram](best_{target}.png)",
            "",
            f"{target}: n = {len(err)}, MAE {np.abs(err).mean():.4f}, RMSE {np.sqrt((err**2).mean()):.4f}, "
            f"median |error| {np.median(np.abs(err)):.4f}, "
            f"90th percentile |error| {np.quantile(np.abs(err), 0.9):.4f}.",
        ]
    return out


def _space_default_file(name: str) -> str | None:
    """The default configuration file a built-in space names (``default:``), if any."""
    from .search.space import load_space

    try:
        source = load_space(name).default_source
    except CrystaltuneError:
        return None
    return source if Path(source).is_file() else None


@cli_main
def main(argv: list[str] | None = None) -> int:
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
    ap.add_argument("--reference", help="a second baseline config YAML (e.g. the reference code's own recipe)")
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
    a = ap.parse_args(argv)
    for flag, value in (
        ("--baseline", a.baseline),
        ("--retrain-epochs", a.retrain_epochs),
        ("--reference", a.reference),
    ):
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
    path, facts = build_report(
        a.name,
        uri,
        Path(a.output or f"crystaltune-results/{a.name}/report"),
        a.run_id,
        a.baseline,
        a.retrain_seeds,
        a.retrain_epochs,
        a.top_k,
        a.reference,
        a.cv,
    )
    print(f"report: {path}")
    if a.readme:
        from .readme import render_results, splice

        splice(a.readme, f"results-{a.name}", render_results({**facts, "target_mae": a.target_mae}))
        print(f"README section results-{a.name}: {a.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
