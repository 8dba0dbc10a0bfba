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


def _latest_parent(client, exp_id: str, run_id: str | None):
    if run_id:
        return client.get_run(run_id)
    runs = client.search_runs([exp_id], filter_string="tags.`crystaltune.kind` = 'search'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise CrystaltuneError("no search run in this experiment")
    return runs[0]


def _f(x, nd=4):
    return f"{x:.{nd}f}" if isinstance(x, float) and math.isfinite(x) else "-"


def build_report(name: str, tracking_uri: str, output: Path, run_id: str | None = None) -> Path:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(f"crystaltune-{name}")
    if exp is None:
        raise CrystaltuneError(f"no MLflow experiment 'crystaltune-{name}' in {tracking_uri}")
    parent = _latest_parent(client, exp.experiment_id, run_id)
    pid = parent.info.run_id
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{pid}'",
                                  max_results=5000)
    if not children:
        raise CrystaltuneError(f"search run {pid} has no trial runs")
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in children:
        m, p = r.data.metrics, r.data.params
        rows.append({"name": r.info.run_name, "status": r.info.status, "run_id": r.info.run_id,
                     "val": m.get("best_val_mae", math.nan), "test": m.get("test_mae", math.nan),
                     "rmse": m.get("test_rmse", math.nan), "r2": m.get("test_r2", math.nan),
                     "epochs": int(float(r.data.tags.get("crystaltune.epochs_run", 0) or 0)),
                     "model": p.get("model.name"), "edge": p.get("model.edge_featurizer"),
                     "node": p.get("model.node_featurizer"), "kl": p.get("loss.kl"), "loss": p.get("loss.name"),
                     "hidden": p.get("model.hidden"), "layers": p.get("model.layers"), "lr": p.get("optim.lr"),
                     "error": r.data.tags.get("crystaltune.error", "")})
    ok = sorted([r for r in rows if r["status"] == "FINISHED" and math.isfinite(r["val"])], key=lambda r: r["val"])
    failed = [r for r in rows if r not in ok]
    lines = [f"# crystaltune report: {name}", "",
             f"Search run `{pid}` ({parent.info.run_name}) in `{tracking_uri}`; report written "
             f"{time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({platform.processor() or platform.machine()}, "
             f"Python {platform.python_version()}).", "",
             f"{len(rows)} trials: {len(ok)} finished, {len(failed)} failed or interrupted; "
             f"{sum(r['epochs'] for r in rows)} epochs run.", ""]
    if ok:
        b = ok[0]
        lines += [f"**Best trial** (lowest val MAE): `{b['name']}`: val MAE {_f(b['val'])}, test MAE {_f(b['test'])}, "
                  f"test RMSE {_f(b['rmse'])}, test R² {_f(b['r2'], 3)}.", ""]
    lines += ["## Leaderboard", "", "| # | trial | val MAE | test MAE | R² | epochs | model | edge | node | loss | KL | hidden | layers | lr |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(ok, 1):
        lr = _f(float(r["lr"]), 5) if r["lr"] else "-"
        lines.append(f"| {i} | {r['name'].split()[0]} | {_f(r['val'])} | {_f(r['test'])} | {_f(r['r2'], 3)} | {r['epochs']} | "
                     f"{r['model']} | {r['edge']} | {r['node']} | {r['loss']} | {r['kl']} | {r['hidden']} | {r['layers']} | {lr} |")
    for r in failed:
        lines.append(f"| - | {r['name'].split()[0]} | {r['status']} | | | | {r['model']} | {r['edge']} | {r['node']} | {r['loss']} | "
                     f"{r['kl']} | | | {r['error'][:80]} |")
    # TRAINING TABLE ---------------------------------------------------------------------------------
    groups: dict[tuple, list] = {}
    for r in ok:
        groups.setdefault((r["model"], r["edge"], r["node"]), []).append(r)
    lines += ["", "## TRAINING TABLE", "",
              "Test MAE of the best-val trial of each model x edge featurizer x node featurizer combination tried.", "",
              "| model | edge featurizer | node featurizer | trials | best val MAE | its test MAE |", "|---|---|---|---|---|---|"]
    for (model, edge, node), rs in sorted(groups.items(), key=lambda kv: kv[1][0]["val"]):
        lines.append(f"| {model} | {edge} | {node} | {len(rs)} | {_f(rs[0]['val'])} | {_f(rs[0]['test'])} |")
    # best model plots ---------------------------------------------------------------------------------
    if ok:
        lines += ["", "## Best model on the test split", ""]
        lines += _best_model_plots(client, ok[0], output)
    # importances ------------------------------------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(pid, "search/param_importances.json", tmp)
            imp = json.loads(Path(path).read_text())
            lines += ["", "## Parameter importances (fANOVA on val MAE)", "", "| parameter | importance |", "|---|---|"]
            lines += [f"| {k} | {v:.3f} |" for k, v in imp.items()]
        except Exception:
            lines += ["", "(no parameter importances: too few finished trials)"]
    report = output / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (output / "leaderboard.json").write_text(json.dumps(ok + failed, indent=1, default=str))
    return report


def _best_model_plots(client, best, output: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import load_checkpoint
    from .train.data import prepare_trial_data
    from .train.metrics import predict_indices

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
        out += [f"![parity and error histogram](best_{target}.png)", "",
                f"{target}: n = {len(err)}, MAE {np.abs(err).mean():.4f}, RMSE {np.sqrt((err ** 2).mean()):.4f}, "
                f"median |error| {np.median(np.abs(err)):.4f}, 90th percentile |error| {np.quantile(np.abs(err), 0.9):.4f}."]
    return out


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m crystaltune.report", description=__doc__)
    ap.add_argument("name", help="search-space name (MLflow experiment crystaltune-NAME)")
    ap.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///./mlflow.db)")
    ap.add_argument("--run-id", help="a specific search (parent) run; default: the latest")
    ap.add_argument("--output", help="folder for report.md and PNGs (default: crystaltune-results/NAME/report)")
    a = ap.parse_args(argv)
    from .search.engine import default_tracking_uri

    uri = a.tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise CrystaltuneError(f"no MLflow store at {uri}")
    path = build_report(a.name, uri, Path(a.output or f"crystaltune-results/{a.name}/report"), a.run_id)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
