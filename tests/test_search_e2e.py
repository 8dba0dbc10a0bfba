"""The search end to end on real Ray, Optuna and MLflow (no mocks): the session's smoke search
(conftest.py) listens on loopback only, records every trial in MLflow, ranks them as MLflow does, and its
best_config.yaml retrains to the same MAE; the pyfunc and registered model, the Optuna history, the
default trial, warm start, the review in a browser; sunmat as shipped on two cores."""

from __future__ import annotations

import csv
import ipaddress
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from browser import CHROMIUM, page_text, serving
from conftest import _runs, free_port

from crystaltune.search.space import load_space

ROOT = Path(__file__).resolve().parents[1]


def test_local_search_listens_on_loopback_only_with_token_auth(smoke_search):
    """Ray's GCS, raylet, agents and workers of a local search: every listening socket on 127.0.0.1,
    and every Ray process started with token authentication."""
    listeners = smoke_search[2]
    names = {name for name, _, _ in listeners.values()}
    assert {"gcs_server", "raylet"} <= names, listeners  # the watcher saw Ray's servers
    exposed = {k: v for k, v in listeners.items() if not ipaddress.ip_address(k[1].removeprefix("::ffff:")).is_loopback}
    assert not exposed, f"listening beyond loopback: {exposed}"
    ray_procs = {v[0]: v[2] for v in listeners.values() if v[0] in ("gcs_server", "raylet")}
    assert set(ray_procs.values()) == {"token"}, ray_procs


def test_smoke_search_records_every_trial_in_mlflow(smoke_search):
    work, stdout, _ = smoke_search
    client, runs = _runs(work)
    parents = [r for r in runs if r.data.tags.get("crystaltune.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("crystaltune.kind") == "trial"]
    assert len(parents) == 1 and len(children) >= 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.run_name.startswith("t0") and r.info.status == "FINISHED"
        assert math.isfinite(r.data.metrics["val_mae"]) and math.isfinite(r.data.metrics["test_mae"])
        for k in ("train_mae", "lr", "graphs_per_s", "test_rmse", "test_r2", "alignment", "uniformity"):
            assert k in r.data.metrics, k
        assert "model.name" in r.data.params and "optim.lr" in r.data.params
        history = client.get_metric_history(r.info.run_id, "val_mae")
        steps = [m.step for m in history]
        assert steps == sorted(set(steps)) and len(steps) >= 1  # each epoch once
        assert any(a.path == "checkpoint" for a in client.list_artifacts(r.info.run_id))
    assert len({r.info.run_name for r in children}) == len(children)
    search_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    for name in (
        "leaderboard.csv",
        "search_space.yaml",
        "optuna_history.png",
        "parity_band_gap.png",
        "best_config.yaml",
    ):
        assert f"search/{name}" in search_artifacts, search_artifacts
    versions = client.search_model_versions("name='crystaltune-smoke'")
    best_row = next(csv.DictReader(open(work / "out" / "leaderboard.csv")))
    assert versions and versions[0].run_id == best_row["run_id"]  # logged in the best trial's own run
    assert "mlflow ui --backend-store-uri" in stdout


def test_leaderboard_and_best_config_retrain_to_the_same_mae(smoke_search):
    work, stdout, _ = smoke_search
    rows = list(csv.DictReader(open(work / "out" / "leaderboard.csv")))
    assert len(rows) >= 4
    vals = [float(r["best_val_mae"]) for r in rows if r["best_val_mae"]]
    assert vals == sorted(vals)
    best_test = float(rows[0]["test_mae"])
    cfg = yaml.safe_load((work / "out" / "best_config.yaml").read_text())
    assert cfg["data"]["limit"] == 240 and cfg["output"].endswith("best_model.pt")
    out = subprocess.run(
        [sys.executable, "-m", "crystaltune.train", "--config", str(work / "out" / "best_config.yaml"), "--json"],
        capture_output=True,
        text=True,
        cwd=work,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    summary = json.loads(out.stdout[out.stdout.index("{") :])
    assert summary["test_mae"] == pytest.approx(best_test, rel=0.02, abs=0.01)


def test_mlflow_pyfunc_model_predicts(smoke_search):
    work, _, _ = smoke_search
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/crystaltune-smoke/1")
    cif = (ROOT / "tests/data/reference_cgcnn/sample-regression/1000041.cif").read_text()
    out = model.predict(pd.DataFrame({"id": ["a", "bad"], "structure": [cif, "garbage"]}))
    assert math.isfinite(out.loc["a", "band_gap"]) and math.isnan(out.loc["bad", "band_gap"])
    assert "elements never seen in training" in out.loc["a", "flags"] and out.loc["bad", "flags"]
    alone = model.predict(pd.DataFrame({"structure": [cif]}))  # the signature keeps `id` optional
    assert alone.iloc[0]["band_gap"] == pytest.approx(out.loc["a", "band_gap"])


def test_mlflow_sorted_by_the_selection_metric_is_the_leaderboard_and_the_readme_filter_works(smoke_search):
    """metrics.best_val_mae (best val MAE so far, logged every epoch) orders the MLflow runs exactly as
    the leaderboard; the README's example filter returns runs of the default search."""
    import re

    work, _, _ = smoke_search
    client, runs = _runs(work)
    exp = client.get_experiment_by_name("crystaltune-smoke")
    by_mlflow = client.search_runs(
        [exp.experiment_id],
        "tags.`crystaltune.kind` = 'trial' and attributes.status = 'FINISHED'",
        order_by=["metrics.best_val_mae ASC"],
    )
    rows = [r for r in csv.DictReader(open(work / "out" / "leaderboard.csv")) if r["status"] == "FINISHED"]
    assert [r.info.run_name.split()[0] for r in by_mlflow] == [r["trial"] for r in rows]
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"Filter with e\.g\.\s+`([^`]+)`", readme).group(1)
    assert client.search_runs([exp.experiment_id], example), example


def test_registered_model_describes_the_best_trial(smoke_search):
    """The registered version: alias `best`, description and tags naming the trial and its MAEs, the
    best trial's own parameters on the logged model, a signature from an input example; the trial run
    links to it; the parent lists as fixed only what no trial varied; no parameter is logged twice."""
    work, _, _ = smoke_search
    client, runs = _runs(work)
    version = client.get_model_version_by_alias("crystaltune-smoke", "best")
    best_row = next(csv.DictReader(open(work / "out" / "leaderboard.csv")))
    best_run = client.get_run(best_row["run_id"])
    assert best_row["trial"] in version.description and version.tags["trial_run_id"] == best_run.info.run_id
    assert abs(float(version.tags["best_val_mae"]) - float(best_row["best_val_mae"])) < 1e-4
    logged = client.get_logged_model(version.model_id or version.source.removeprefix("models:/"))
    for key in ("model.name", "model.layers", "optim.lr", "model.node_featurizer"):
        assert logged.params[key] == best_run.data.params[key], key
    from mlflow.models import get_model_info

    assert get_model_info(logged.model_uri).signature is not None
    assert "models:/crystaltune-smoke@best" in best_run.data.tags["crystaltune.registered_model"]
    parent = next(r for r in runs if r.data.tags.get("crystaltune.kind") == "search")
    searched = {p.name for p in load_space("smoke").params}
    assert not any(k.removeprefix("fixed.") in searched for k in parent.data.params if k.startswith("fixed."))
    assert parent.data.params["fixed.train.epochs"] == str(load_space("smoke").max_epochs)  # the horizon run
    assert not any(k.startswith("searched.") for r in runs for k in r.data.params)
    # the parent's summary metrics have names of their own: it never sorts among the trials
    assert "best_val_mae" not in parent.data.metrics
    assert parent.data.metrics["search.best_val_mae"] == pytest.approx(float(best_row["best_val_mae"]), abs=1e-4)


def test_optuna_history_is_in_run_order(smoke_search):
    """optuna_history (JSON and PNG) lists trials in the order they ran, not ranked."""
    import json

    work, _, _ = smoke_search
    history = json.loads((work / "out" / "artifacts" / "optuna_history.json").read_text())
    rows = sorted(
        (r for r in csv.DictReader(open(work / "out" / "leaderboard.csv")) if r["status"] == "FINISHED"),
        key=lambda r: r["trial"],
    )
    assert [round(h["value"], 4) for h in history] == [float(r["best_val_mae"]) for r in rows]
    assert [h["number"] for h in history] == list(range(len(rows)))
    assert [h["trial"] for h in history] == [r["trial"] for r in rows]  # the plot's ticks: the run names


def test_the_default_configuration_is_the_first_trial_and_recorded_as_such(smoke_search):
    work, stdout, _ = smoke_search
    client, runs = _runs(work)
    children = sorted(
        (r for r in runs if r.data.tags.get("crystaltune.kind") == "trial"), key=lambda r: r.info.run_name
    )
    space = load_space("smoke")
    first = children[0]
    assert first.info.run_name.startswith("t001") and first.info.run_name.endswith("(default)")
    assert first.data.tags["crystaltune.default"] == "true"
    assert all(r.data.tags["crystaltune.default"] == "false" for r in children[1:])
    for key, value in space.default_point.items():  # the run trained exactly the default's values
        assert first.data.params[key] == str(value), key
    rows = list(csv.DictReader(open(work / "out" / "leaderboard.csv")))
    assert [r["trial"] for r in rows if r["default"] == "True"] == ["t001"]
    assert "* the default configuration" in stdout and "the best is" in stdout


@pytest.mark.slow
def test_sunmat_on_a_two_core_machine_runs_as_shipped_and_refuses_what_cannot_fit(tmp_path, small_records):
    """sunmat's resources are `auto`: on a machine without GPUs its trials become CPU trials and the
    search runs; explicit requests that can never fit stop with one error line before any graph is
    built or Ray starts, instead of waiting for resources forever."""
    import time

    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "sunmat.jsonl", small_records)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    base = [
        sys.executable,
        "-m",
        "crystaltune.search",
        "sunmat",
        "--data",
        str(data),
        "--output",
        str(tmp_path / "out"),
    ]
    for extra, match in (
        (["--gpus-per-worker", "1"], "each trial needs 1 GPU(s)"),
        (["--workers-per-trial", "2", "--gpus-per-worker", "1"], "each trial needs 2 GPU(s)"),
        (
            ["--cpus-per-worker", "4", "--num-cpus", "2"],
            "each trial needs 4 CPUs (1 worker(s) x 4 CPU); the cluster has 2",
        ),
    ):
        t0 = time.time()
        out = subprocess.run(base + extra, capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
        assert out.returncode == 2 and match in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert time.time() - t0 < 60
    out = subprocess.run(
        base + ["--num-samples", "1", "--max-epochs", "1", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert '"trials": 1' in out.stdout and '"failed": 0' in out.stdout


def test_optuna_study_persisted_and_a_warm_started_search_runs_its_configs_first(smoke_search, tmp_path):
    """OUTPUT/optuna.db opens with optuna.load_study and holds every trial once (scored by best_val_mae);
    --warm-start seeds a new search with its best configurations, run right after the default."""
    import optuna

    from crystaltune.search.warm_start import warm_points

    work, stdout, _ = smoke_search
    db = work / "out" / "optuna.db"
    study = optuna.load_study(study_name="crystaltune-smoke", storage=f"sqlite:///{db}")
    rows = list(csv.DictReader(open(work / "out" / "leaderboard.csv")))
    assert sorted(t.user_attrs["trial"] for t in study.trials) == sorted(r["trial"] for r in rows)
    assert min(t.value for t in study.trials if t.value is not None) == pytest.approx(
        float(rows[0]["best_val_mae"]), abs=1e-4
    )
    assert f"optuna-dashboard sqlite:///{db}" in stdout and "#/experiments/" in stdout
    assert "/runs?orderByKey=metrics.%60best_val_mae%60&orderByAsc=true" in stdout  # opens sorted
    expected = warm_points(str(db), load_space("smoke"))
    # the second search writes into a copy of the store, so the shared smoke search stays as it was
    shutil.copy(work / "mlflow.db", tmp_path / "mlflow.db")
    work = tmp_path
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "crystaltune.search",
            "smoke",
            "--num-samples",
            "3",
            "--warm-start",
            str(db),
            "--output",
            str(work / "out2"),
            "--json",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "run first, after the default" in out.stdout
    client, runs = _runs(work)
    parent = sorted(
        (r for r in runs if r.data.tags.get("crystaltune.kind") == "search"), key=lambda r: r.info.start_time
    )[-1]
    second = {
        r.info.run_name.split()[0]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert second["t001"].data.tags["crystaltune.default"] == "true"
    for key, value in expected[0].items():
        assert second["t002"].data.params[key] == str(value), key
    exp = client.get_experiment_by_name("crystaltune-smoke")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "crystaltune search `smoke`" in parent.data.tags["mlflow.note.content"]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (Debian's chromium package): .ci/run installs it")
def test_the_review_in_a_real_browser_needs_no_hand_work(smoke_search):
    """In headless Chromium: optuna-dashboard (installed with crystaltune) shows the persisted study
    with every trial, its history and importances; the runs URL the search printed opens MLflow's
    runs table sorted by best_val_mae, best trial first, the parent run after every trial."""
    import optuna

    work, stdout, _ = smoke_search
    rows = list(csv.DictReader(open(work / "out" / "leaderboard.csv")))
    finished = [r for r in rows if r["status"] == "FINISHED"]
    rows_in_run_order = sorted(rows, key=lambda r: r["trial"])
    db = work / "out" / "optuna.db"
    study_id = optuna.load_study(study_name="crystaltune-smoke", storage=f"sqlite:///{db}")._study_id
    port, bin_dir = free_port(), Path(sys.executable).parent
    board = [str(bin_dir / "optuna-dashboard"), f"sqlite:///{db}", "--host", "127.0.0.1", "--port", str(port)]
    base = f"http://127.0.0.1:{port}/dashboard/studies/{study_id}"
    with serving(board, f"http://127.0.0.1:{port}/api/studies", work):
        study_page, trials_page = page_text(base), page_text(base + "/trials")
    assert "crystaltune-smoke" in study_page and "History" in study_page, study_page[:2000]
    assert "Hyperparameter Importance" in study_page, study_page[:2000]
    assert f"{len(rows)} Trials" in trials_page and all(f"Trial {i} " in trials_page for i in range(len(rows)))
    assert f"trial {rows_in_run_order[0]['trial']}" in trials_page  # the first trial, open: its MLflow name

    printed = next(w for w in stdout.split() if "/#/experiments/" in w)
    port = free_port()
    server = [str(bin_dir / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}"]
    server += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with serving(server, f"http://127.0.0.1:{port}/health", work):
        table = page_text(printed.replace("http://127.0.0.1:5000", f"http://127.0.0.1:{port}"))
    assert "Sort: best_val_mae" in table, table[:3000]
    names = [f"{r['trial']} " for r in sorted(finished, key=lambda r: float(r["best_val_mae"]))] + ["search smoke"]
    where = [table.find(n) for n in names]
    assert -1 not in where and where == sorted(where), (names, table[:3000])


def test_a_best_checkpoint_that_will_not_load_is_tagged_and_the_rest_is_still_logged(smoke_search, tmp_path):
    """The best trial's checkpoint fails to load (as atom_specific_gaussian ones once did): the parent run
    gets the reason as a tag, and the leaderboard and Optuna artifacts are logged all the same, so the
    search goes on to its final step instead of dying with a traceback. Works on a copy of the store."""
    import dataclasses
    import sqlite3

    from mlflow.tracking import MlflowClient

    from crystaltune.search import runs
    from crystaltune.search.leaderboard import build_leaderboard
    from crystaltune.search.report_artifacts import log_search_artifacts
    from crystaltune.search.tracking import MLflowTracker

    work = smoke_search[0]
    shutil.copytree(work / "out", tmp_path / "out", ignore=shutil.ignore_patterns("ray"))
    shutil.copytree(work / "mlruns", tmp_path / "mlruns")
    shutil.copy(work / "mlflow.db", tmp_path / "mlflow.db")
    db = sqlite3.connect(tmp_path / "mlflow.db")
    for table, col in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
        db.execute(f"update {table} set {col} = replace({col}, ?, ?)", (str(work), str(tmp_path)))
    db.commit()
    db.close()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = load_space("smoke")
    tracker = MLflowTracker.from_state_file(
        str(tmp_path / "out" / "tracker_state.json"), uri, space, "crystaltune-smoke"
    )
    rows = build_leaderboard(tracker, space)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "best.pt").write_bytes(b"not a checkpoint")
    rows[0] = dataclasses.replace(rows[0], checkpoint=str(tmp_path / "broken"))
    cfg = space.trial_config({}, output=str(tmp_path / "best_model.pt"))
    made = log_search_artifacts(tracker, rows, cfg, None, tmp_path / "out")
    assert "model_uri" not in made and "parity" not in made
    client = MlflowClient(uri)
    tags = client.get_run(tracker.parent_run_id).data.tags
    assert (
        tags[runs.MODEL_LOG_ERROR].startswith("CrystaltuneError: ")
        and "not a readable checkpoint" in tags[runs.MODEL_LOG_ERROR]
    )
    logged = {a.path for a in client.list_artifacts(tracker.parent_run_id, runs.SEARCH_DIR)}
    assert f"{runs.SEARCH_DIR}/leaderboard.csv" in logged and f"{runs.SEARCH_DIR}/optuna_history.png" in logged
    assert str(tmp_path) in client.get_run(tracker.parent_run_id).info.artifact_uri  # the copy, not the shared one
