"""Every table and plot a search shows, in one place: the console leaderboard, the MLflow run
description, the report's sections and the README's, all from plain rows (``search.runs.TrialRow``
and the retraining stats), so one result reads the same wherever it is shown.

Nothing here reads a store or trains: callers fetch rows, this module turns them into text or PNGs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .fmt import lower_or_higher, num, pyplot

Row = Any  # a search.runs.TrialRow


# generic tables ----------------------------------------------------------------------------------------
def markdown(head: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    """A GitHub-flavoured Markdown table, a line per row."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body]


def text(head: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    """A plain-text table with aligned columns, for the console."""
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(head), line(["-" * w for w in widths]), *map(line, body)]


def short(v: Any) -> str:
    """A parameter value in a table cell: 3 significant digits, lists joined with '+'."""
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return "+".join(map(str, v)) or "none"
    return str(v)


# trial tables ------------------------------------------------------------------------------------------
#: column header -> cell of a ranked row (its rank, the row)
TRIAL_COLUMNS: dict[str, Callable[[str, Row], str]] = {
    "#": lambda rank, r: rank,
    "trial": lambda rank, r: r.trial,
    "run": lambda rank, r: r.name,
    "status": lambda rank, r: r.status,
    "best_val_mae": lambda rank, r: num(r.best_val_mae),
    "test_mae": lambda rank, r: num(r.test_mae),
    "R²": lambda rank, r: num(r.test_r2, 3),
    "epochs": lambda rank, r: str(r.epochs),
    "model": lambda rank, r: str(r.params.get("model.name")),
    "edge": lambda rank, r: str(r.params.get("model.edge_featurizer")),
    "node": lambda rank, r: str(r.params.get("model.node_featurizer")),
    "loss": lambda rank, r: str(r.params.get("loss.name")),
    "KL": lambda rank, r: str(r.params.get("loss.kl")),
    "hidden": lambda rank, r: str(r.params.get("model.hidden")),
    "layers": lambda rank, r: str(r.params.get("model.layers")),
    "lr": lambda rank, r: num(float(r.params["optim.lr"]), 5) if r.params.get("optim.lr") else "-",
}
#: the trial columns of the MLflow description, the report and the README
DESCRIPTION_COLUMNS = ("#", "run", "best_val_mae", "test_mae")
REPORT_COLUMNS = ("#", "trial", "best_val_mae", "test_mae", "R²", "epochs", "model", "edge", "node", "loss", "KL")
REPORT_COLUMNS += ("hidden", "layers", "lr")
README_COLUMNS = ("trial", "best_val_mae", "test_mae", "model", "edge", "node", "loss", "epochs")
#: how a column is headed in Markdown (the console uses the metric names as they are logged)
HEADERS = {"best_val_mae": "val MAE", "test_mae": "test MAE", "run": "trial"}


def trial_table(ok: Sequence[Row], columns: Sequence[str], failed: Sequence[Row] = ()) -> list[str]:
    """Markdown table of ranked trials (best first) with ``columns``; failed trials after them, with
    their status in the metric column and their error in the last."""
    body = [[TRIAL_COLUMNS[c](str(i), r) for c in columns] for i, r in enumerate(ok, 1)]
    for r in failed:
        cells = {c: TRIAL_COLUMNS[c]("-", r) for c in columns if c in ("#", "trial", "run", "model", "edge", "node")}
        cells.update({"best_val_mae": r.status, columns[-1]: r.error[:80]})
        body.append([cells.get(c, "") for c in columns])
    return markdown([HEADERS.get(c, c) for c in columns], body)


def differing_params(rows: Sequence[Row]) -> list[str]:
    """The sampled parameters whose value differs between the rows (the columns worth showing)."""
    keys = sorted({k for r in rows for k in r.params})
    return [k for k in keys if len({repr(r.params.get(k)) for r in rows}) > 1]


def column_names(keys: list[str]) -> list[str]:
    """Short unique headers: the last part of a dotted key, or its section where that part repeats or
    says nothing alone (``loss.name`` -> ``loss``, ``model.name`` -> ``model``)."""
    last = [k.split(".")[-1] for k in keys]
    vague = [x == "name" or last.count(x) > 1 for x in last]
    return [k.split(".")[-2] if v and "." in k else k.split(".")[-1] for k, v in zip(keys, vague)]


def console_leaderboard(rows: Sequence[Row], top: int = 10) -> str:
    """The leaderboard the search prints: the top trials (and the default, always) with the parameters
    that differ between trials."""
    diff = differing_params(rows)
    head = ["#", "trial", "status", "best_val_mae", "test_mae", "epochs", *column_names(diff)]
    shown = list(rows[:top]) + [r for r in rows[top:] if r.default]
    body = [
        [
            str(rows.index(r) + 1),
            r.trial + ("*" if r.default else ""),
            *(TRIAL_COLUMNS[c]("", r) for c in ("status", "best_val_mae", "test_mae", "epochs")),
            *[short(r.params.get(k, "-")) for k in diff],
        ]
        for r in shown
    ]
    note = ["* the default configuration (the search's first trial)"] if any(r.default for r in shown) else []
    return "\n".join([*text(head, body), *note])


def run_description(space: str, summary, ok: Sequence[Row], exp_id: str) -> str:
    """The parent run's Markdown description (MLflow shows it on the run page): outcome and top trials."""
    s = summary
    lines = [
        f"**crystaltune search `{space}`**: {s.trials} trials ({s.failed} failed), "
        f"{s.epochs_run} of {s.epochs_full_budget} epochs run (ASHA).",
        "",
    ]
    if s.best is not None:
        lines += [
            f"Best: **{s.best.name}**, best_val_mae {s.best.best_val_mae:.4f}, test_mae "
            f"{s.best.test_mae:.4f} ([run](#/experiments/{exp_id}/runs/{s.best.run_id})).",
            "",
        ]
    if s.default is not None:
        lines += [f"Default configuration ({s.default.name}): best_val_mae {s.default.best_val_mae:.4f}.", ""]
    return "\n".join(lines + trial_table(ok[:5], DESCRIPTION_COLUMNS))


# retraining --------------------------------------------------------------------------------------------
def retrained_table(retrained: dict[str, Any], describe: Callable[[dict], str] | None = None) -> list[str]:
    """The retrained configurations (candidates, the one chosen, the baselines): test MAE per seed or
    fold, mean ± sd, mean val MAE. ``describe`` (the README's) labels each by its config instead of
    its source, baselines first."""
    over, best = replicate_word(retrained), retrained.get("best")
    cands = list(retrained.get("candidates", {}).items())
    if describe:
        rows = [(ROLE_LABELS[k], retrained[k]) for k in ("reference", "baseline") if k in retrained]
        chosen = " (the final model)" if retrained.get("final") else " (chosen by val)"
        rows += [(f"searched, trial {t}" + (chosen if c is best else ""), c) for t, c in cands]
    else:
        rows = [(f"candidate {t}" + (" (chosen)" if c is best else ""), c) for t, c in cands]
        rows += [(k, retrained[k]) for k in ("baseline", "reference") if k in retrained]
    body = []
    for label, c in rows:
        reps = " / ".join(f"{v:.4f}" for v in c["test_mae"].values())
        body.append(
            [
                f"{label}: {describe(c['params'])}" if describe else f"{label} ({c['source']})",
                f"{reps} ({over}s {', '.join(map(str, c['test_mae']))})" if describe else reps,
                f"{c['test_mae_mean']:.4f} ± {c['test_mae_sd']:.4f}",
                f"{c['best_val_mae_mean']:.4f}",
            ]
        )
    return markdown(["configuration", f"test MAE per {over}", "mean ± sd", "mean val MAE"], body)


#: the README's names for the retrained baselines
ROLE_LABELS = {"reference": "reference recipe", "baseline": "well-trained default"}


def replicate_word(retrained: dict[str, Any]) -> str:
    """'fold' when the latest retraining was a cross-validation, else 'seed'."""
    return "fold" if retrained.get("best", {}).get("cv") else "seed"


def improvement_sentence(improvement: float, target: float | None = None) -> str:
    """How the searched config's mean test MAE compares with the well-trained default's (and, given a
    target fraction, whether it meets it)."""
    verdict = ""
    if target is not None:
        verdict = f" ({'meets' if improvement >= target else 'misses'} the {100 * target:.0f}% improvement target)"
    return (
        f"The searched config's mean test MAE is **{lower_or_higher(improvement)}** than the well-trained "
        f"default's on the same split{verdict}."
    )


# report sections ---------------------------------------------------------------------------------------
def timing_lines(t: dict) -> list[str]:
    """Where the search's wall time went (see report.search_timing)."""
    return [
        "## Search time",
        "",
        f"`tuner.fit` took {t['tuner_s']:.0f} s with up to {t['concurrent_trials']} trials at a time; training epochs "
        f"(including per-epoch evaluation) took {t['training_s']:.0f} s in all, so {100 * t['overhead_fraction']:.1f}% "
        f"of the trial-slot time was overhead (trial start-up, Ray, Tune, MLflow, checkpoints). ASHA ran "
        f"{t['epochs_run']} of the {t['epochs_full_budget']} epochs a full-budget search would run.",
        "",
    ]


def rung_lines(rungs: list[dict], max_epochs) -> list[str]:
    """How well early val MAE ranks trials by their final one (report.rung_correlation)."""
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
        *markdown(["epoch", *(str(r["epoch"]) for r in rungs)], [["rho", *(f"{r['rho']:.2f}" for r in rungs)]]),
        "",
    ]


def training_table(ok: Sequence[Row]) -> list[dict]:
    """The notes' TRAINING TABLE: per model x edge x node featurizer, the best-val trial's test MAE."""
    groups: dict[tuple, list] = {}
    for r in ok:
        key = tuple(r.params.get(f"model.{k}") for k in ("name", "edge_featurizer", "node_featurizer"))
        groups.setdefault(key, []).append(r)
    return [
        {"model": k[0], "edge": k[1], "node": k[2], "trials": len(v), "best_val_mae": v[0].best_val_mae}
        | {"test_mae": v[0].test_mae}
        for k, v in sorted(groups.items(), key=lambda kv: kv[1][0].best_val_mae)
    ]


def training_table_lines(table: list[dict]) -> list[str]:
    head = ["model", "edge featurizer", "node featurizer", "trials", "best val MAE", "its test MAE"]
    body = [
        [str(g["model"]), str(g["edge"]), str(g["node"]), str(g["trials"]), num(g["best_val_mae"]), num(g["test_mae"])]
        for g in table
    ]
    return [
        "",
        "## TRAINING TABLE",
        "",
        "Test MAE of the best-val trial of each model x edge featurizer x node featurizer combination tried.",
        "",
        *markdown(head, body),
    ]


def importance_lines(importances: dict[str, float] | None) -> list[str]:
    if not importances:
        return ["", "(no parameter importances: too few finished trials)"]
    body = [[k, f"{v:.3f}"] for k, v in importances.items()]
    return ["", "## Parameter importances (fANOVA on best val MAE)", "", *markdown(["parameter", "importance"], body)]


def error_summary(target: str, y: np.ndarray, p: np.ndarray) -> str:
    """One line of error statistics of a model on a split."""
    err = np.abs(p - y)
    return (
        f"{target}: n = {len(err)}, MAE {err.mean():.4f}, RMSE {np.sqrt((err**2).mean()):.4f}, "
        f"median |error| {np.median(err):.4f}, 90th percentile |error| {np.quantile(err, 0.9):.4f}."
    )


# plots -------------------------------------------------------------------------------------------------
def parity_plot(y: np.ndarray, p: np.ndarray, title: str, path: Path, target: str = "") -> None:
    """Predicted against true with the diagonal, beside a histogram of the errors; finite pairs only."""
    plt = pyplot()
    m = np.isfinite(y) & np.isfinite(p)
    y, p = y[m], p[m]
    err = p - y
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4), dpi=110)
    a1.scatter(y, p, s=8, alpha=0.6)
    lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
    a1.plot([lo, hi], [lo, hi], "k--", lw=1)
    a1.set_xlabel(f"true {target}".strip())
    a1.set_ylabel(f"predicted {target}".strip())
    a1.set_title(f"{title}\ntest MAE {np.abs(err).mean():.4f}", fontsize=9)
    a2.hist(err, bins=30 if np.ptp(err) > 1e-9 else 1)  # one bar when every error is the same
    a2.set_xlabel("prediction error")
    a2.set_title(f"errors (n={len(err)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
