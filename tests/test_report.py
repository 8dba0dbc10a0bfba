"""Reports read back from the search's MLflow records: the leaderboard's columns, report.md, the README
results line, the best config and a baseline retrained (per seed and per fold), the ensemble of the top
trials. The MLflow-backed tests share the session's smoke search (conftest.py)."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import _runs, run_report

ROOT = Path(__file__).resolve().parents[1]


def test_leaderboard_headers_are_unique_and_say_what_they_are():
    from crystaltune.render import column_names

    keys = ["data.max_neighbors", "loss.name", "model.edge_params.step", "model.name", "optim.lr", "optim.name"]
    assert column_names(keys) == ["max_neighbors", "loss", "step", "model", "lr", "optim"]
    assert column_names(["model.name"]) == ["model"]


def test_report_from_mlflow(smoke_search):
    work, _, _ = smoke_search
    _, text = run_report(work, "smoke", "report", timeout=300)
    assert "## Leaderboard" in text and "## TRAINING TABLE" in text and "best_band_gap.png" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and ln.split("|")[1].strip().isdigit()]
    assert len(rows) >= 4
    assert (work / "report" / "best_band_gap.png").stat().st_size > 1000
    best = list(csv.DictReader(open(work / "out" / "leaderboard.csv")))[0]
    assert f"{float(best['test_mae']):.4f}" in text  # numbers come from the store, not typed
    import re

    assert re.search(r"(\d+) trials: \1 finished, 0 interrupted, 0 failed", text), text[:600]


def test_the_results_line_tells_interrupted_trials_from_finished_ones():
    """An interrupted trial ranks with the epochs it ran, but the README does not call it finished."""
    from crystaltune.readme import _outcomes

    assert _outcomes({"finished": 4}) == "4 finished"  # sections rendered before the counts existed
    stopped = {"finished": 29, "interrupted": 1, "failed": 0, "search_status": "interrupted"}
    assert _outcomes(stopped) == "29 finished, 1 interrupted; the search was stopped before its budget ended"
    assert _outcomes({"finished": 3, "interrupted": 0, "failed": 1, "search_status": "finished"}) == (
        "3 finished, 1 failed"
    )


def test_trial_slots_end_at_a_trials_last_epoch_not_when_its_run_is_closed(tmp_path):
    """Tune starts the next trial in a slot while the driver is still closing the last one's MLflow run:
    that overlap is not a third slot on a machine with two, so the overhead is not inflated."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from crystaltune.report import search_timing

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("slots")
    t0 = 1_700_000_000_000  # ms; MLflow takes a start time of 0 as "now"
    parent = client.create_run(exp, start_time=t0)
    client.log_metric(parent.info.run_id, "search_time_s", 100.0, timestamp=t0 + 100_000)
    spans = [(0, 50_000, 55_000), (0, 90_000, 95_000), (52_000, 98_000, 99_000)]  # start, last epoch, end
    for start, last, end in ((t0 + a, t0 + b, t0 + c) for a, b, c in spans):
        run = client.create_run(exp, start_time=start).info.run_id
        metrics = [Metric("epoch_time_s", 10.0, t, i) for i, t in enumerate((start + 10_000, last))]
        client.log_batch(run, metrics=metrics)
        client.set_terminated(run, end_time=end)
    children = [client.get_run(r.info.run_id) for r in client.search_runs([exp]) if r.info.run_id != parent.info.run_id]
    timing = search_timing(client, client.get_run(parent.info.run_id), children)
    assert timing["concurrent_trials"] == 2  # the run ends (55 s) overlap the third trial's start (52 s)
    assert timing["overhead_fraction"] == pytest.approx(1 - 60 / 200)


@pytest.mark.slow
def test_report_retrains_best_and_baseline_and_writes_the_readme_section(smoke_search):
    """--retrain-seeds trains the search's best config and a baseline on the same split, logs each run
    to MLflow under the search, and the README section shows the numbers read back from there."""
    work, _, _ = smoke_search
    base = {
        "data": {"dataset": "perovskites", "targets": ["band_gap"], "split_seed": 0, "limit": 240},
        "model": {"name": "cgcnn", "hidden": 16, "head_hidden": 16, "layers": 1},
        "train": {"epochs": 2, "batch_size": 32},
    }
    (work / "baseline.yaml").write_text(yaml.safe_dump(base))
    bad = {**base, "data": {**base["data"], "limit": 200}}
    (work / "bad_baseline.yaml").write_text(yaml.safe_dump(bad))
    readme = work / "README.md"
    readme.write_text("# r\n\n<!-- crystaltune:results-smoke -->\n<!-- /crystaltune:results-smoke -->\n")
    cmd = [
        sys.executable,
        "-m",
        "crystaltune.report",
        "smoke",
        "--output",
        str(work / "report2"),
        "--retrain-seeds",
        "0",
        "1",
    ]
    out = subprocess.run(
        cmd + ["--baseline", "bad_baseline.yaml"], cwd=work, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2 and "data.limit is 200 but the search used 240" in out.stderr
    out = subprocess.run(
        cmd + ["--baseline", "baseline.yaml", "--readme", str(readme), "--target-mae", "0.01"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    client, runs = _runs(work)
    retrains = [r for r in runs if r.data.tags.get("crystaltune.kind") == "retrain"]
    assert sorted((r.data.tags["crystaltune.role"], r.data.tags["crystaltune.seed"]) for r in retrains) == [
        ("baseline", "0"),
        ("baseline", "1"),
        ("candidate", "0"),
        ("candidate", "1"),
    ]
    base_mae = {
        r.data.tags["crystaltune.seed"]: r.data.metrics["test_mae"]
        for r in retrains
        if r.data.tags["crystaltune.role"] == "baseline"
    }
    section = readme.read_text()
    assert (
        f"{base_mae['0']:.4f} / {base_mae['1']:.4f}" in section
        and "than the well-trained default's on the same split" in section
    )
    assert (
        "overhead" in section
        and "executor `direct`" in section
        and "against the target <= 0.01: **misses it by" in section
    )
    assert "## Retrained per seed" in (work / "report2" / "report.md").read_text()
    # a second run reads the runs back instead of training again
    out = subprocess.run(cmd + ["--baseline", "baseline.yaml"], cwd=work, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.count("already in MLflow, not retrained") == 4
    _, runs = _runs(work)
    assert len([r for r in runs if r.data.tags.get("crystaltune.kind") == "retrain"]) == 4
    # the best config retrained longer than the search's budget: a new config, so new runs, and the README
    # states the retrained mean against the target; the well-trained default gets the same horizon
    out = subprocess.run(cmd[:-3] + ["--retrain-epochs", "5"], cwd=work, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--retrain-epochs needs --retrain-seeds or --cv" in out.stderr
    out = subprocess.run(
        cmd[:-1]
        + ["--retrain-epochs", "5", "--baseline", "baseline.yaml", "--readme", str(readme), "--target-mae", "0.01"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    _, runs = _runs(work)
    longer = [
        r for r in runs if r.data.tags.get("crystaltune.kind") == "retrain" and r.data.params["train.epochs"] == "5"
    ]
    assert sorted(r.data.tags["crystaltune.role"] for r in longer) == ["baseline", "candidate"]
    cand = next(r for r in longer if r.data.tags["crystaltune.role"] == "candidate")
    assert int(cand.data.tags["crystaltune.epochs_run"]) == 5 and "candidate seed 0: epoch 5/5, val MAE" in out.stdout
    history = client.get_metric_history(cand.info.run_id, "val_mae")
    assert [m.step for m in history] == [1, 2, 3, 4, 5]
    section = readme.read_text()
    assert f"retrained (5 epochs, 1 seed(s)): mean test MAE {cand.data.metrics['test_mae']:.4f}" in section


def test_report_top_k_candidates_are_chosen_by_val_on_cross_validation_folds(smoke_search):
    """--top-k 2 --cv 2: both top trials trained on each fold (test folds disjoint), the chosen one is the
    candidate with the lower mean val MAE, and the report says per fold."""
    work, _, _ = smoke_search
    _, report = run_report(work, "smoke", "report-cv", "--top-k", "2", "--cv", "2")
    _, runs = _runs(work)
    folds = [
        r for r in runs if r.data.tags.get("crystaltune.kind") == "retrain" and r.data.tags.get("crystaltune.fold")
    ]
    assert sorted((r.data.tags["crystaltune.trial"], r.data.tags["crystaltune.fold"]) for r in folds) == sorted(
        (t, f) for t in {r.data.tags["crystaltune.trial"] for r in folds} for f in ("0", "1")
    )
    assert len({r.data.tags["crystaltune.trial"] for r in folds}) == 2
    val = {}
    for r in folds:
        val.setdefault(r.data.tags["crystaltune.trial"], []).append(r.data.metrics["best_val_mae"])
    chosen = min(val, key=lambda t: sum(val[t]) / len(val[t]))
    assert "## Retrained per fold" in report and f"candidate {chosen} (chosen)" in report


def test_ensemble_of_the_top_trials_is_measured_logged_registered_and_predicts(smoke_search):
    import json

    work, _, _ = smoke_search
    out = subprocess.run(
        [sys.executable, "-m", "crystaltune.ensemble", "smoke", "--top-k", "3", "--output", str(work / "ens")],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    res = json.loads(out.stdout[out.stdout.index("{") :])
    assert len(res["trials"]) == 3 and math.isfinite(res["test_mae_ensemble"]) and 0 <= res["within_2_std"] <= 1
    assert res["test_mae_best_single"] > 0 and res["test_crystals"] > 10
    client, runs = _runs(work)
    assert any(r.data.tags.get("crystaltune.kind") == "ensemble" for r in runs)
    assert client.search_model_versions("name='crystaltune-smoke-ensemble'")
    cif = str(ROOT / "tests/data/reference_cgcnn/sample-regression/1000041.cif")
    pred = subprocess.run(
        [
            sys.executable,
            "-m",
            "crystaltune.predict",
            "--checkpoint",
            str(work / "ens" / "ensemble.pt"),
            "--input",
            cif,
            "--output",
            str(work / "ens.csv"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pred.returncode == 0, pred.stderr[-2000:]
    rows = list(csv.DictReader(open(work / "ens.csv")))
    assert float(rows[0]["band_gap"]) > -10 and float(rows[0]["band_gap_std"]) >= 0
