"""The search end to end on real Ray, Optuna and MLflow (no mocks): the smoke space, its MLflow
records, the leaderboard, best_config.yaml retraining to the same MAE; and space validation."""

from __future__ import annotations

import csv
import ipaddress
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from browser import CHROMIUM, page_text, serving
from conftest import free_port

from crystaltune.errors import CrystaltuneError
from crystaltune.search.space import load_space, parse_space

ROOT = Path(__file__).resolve().parents[1]


def _watch_listeners(proc: subprocess.Popen, seen: dict, timeout: float) -> None:
    """Until ``proc`` ends, record every listening TCP socket of it and its descendants (Ray's GCS,
    raylet, agents, workers) as ``(pid, name, address) -> environment's RAY_AUTH_MODE``."""
    import psutil

    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            pids = {p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            break
        pids[proc.pid] = psutil.Process(proc.pid)
        for c in psutil.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN and c.pid in pids and (c.pid, c.laddr.ip) not in seen:
                try:
                    p = pids[c.pid]
                    seen[(c.pid, c.laddr.ip)] = (p.name(), c.laddr.port, p.environ().get("RAY_AUTH_MODE"))
                except psutil.Error:
                    pass
        time.sleep(0.5)


@pytest.fixture(scope="module")
def smoke_search(tmp_path_factory):
    """Run `python -m crystaltune.search smoke` once, as a user would, in a scratch directory, and
    record the sockets it listens on while it runs."""
    work = tmp_path_factory.mktemp("smoke")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}  # what a new user has
    proc = subprocess.Popen(
        [sys.executable, "-m", "crystaltune.search", "smoke", "--output", str(work / "out")],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    listeners: dict = {}
    watcher = threading.Thread(target=_watch_listeners, args=(proc, listeners, 900), daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate(timeout=900)
    watcher.join(timeout=10)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return work, stdout, listeners


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


def _runs(work):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("crystaltune-smoke")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


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


# validation before Ray starts -------------------------------------------------------------------
def _space(**over):
    raw = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())
    for k, v in over.items():
        raw[k] = v
    return raw


@pytest.mark.parametrize(
    "raw, match",
    [
        (_space(budgett={}), "unknown key 'budgett'; did you mean 'budget'"),
        (_space(budget={"num_samples": -1}), "num_samples must be an integer >= 1"),
        (_space(budget={"num_samples": "four"}), "num_samples must be an integer"),
        (_space(search={"optim.lr": {"type": "float", "low": 0.1, "high": 0.01}}), r"low \(0.1\) > high \(0.01\)"),
        (_space(search={"model.name": {"type": "categorical", "choices": []}}), "non-empty list"),
        (
            _space(search={"model.name": {"type": "categorical", "choices": ["cgcnn", "csgcn"]}}),
            "did you mean 'csgcnn'",
        ),
        (
            _space(search={"model.edge_featurizer": {"type": "categorical", "choices": ["gausian"]}}),
            "did you mean 'gaussian'",
        ),
        (_space(search={"loss.name": {"type": "categorical", "choices": ["l2"]}}), "unknown loss 'l2'"),
        (_space(search={"model.nam": {"type": "categorical", "choices": ["cgcnn"]}}), "did you mean 'model.name'"),
        (
            _space(search={"loss.kl_weight": {"type": "float", "low": 0.1, "high": 1, "when": {"loss.kll": True}}}),
            "not a parameter searched before",
        ),
        (_space(search={"optim.lr": {"type": "uniform", "low": 0.1, "high": 1}}), "unknown distribution"),
        (_space(search={"optim.lr": {"type": "float", "low": 0, "high": 1, "log": True}}), "log scale needs low > 0"),
        (
            _space(search={"model.edge_params.num_rbf": {"type": "int", "low": 8, "high": 16}}),
            "unknown parameter 'num_rbf'",
        ),
        (_space(search={"model.dropout": {"type": "float", "low": 0, "high": "x"}}), "expected a number"),
        (_space(search={"model.layers": {"type": "int", "low": 1, "high": 5, "step": 0}}), r"step > 0"),
        (_space(search={"optim.lr": {"type": "float", "low": 0.1, "high": 1, "step": 0.1, "log": True}}), "`log`"),
        (_space(resources={"executor": "dirct"}), "did you mean 'direct'"),
        (_space(resources={"workers": 2, "executor": "direct"}), "'direct' trains one worker per trial"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_search_spaces_fail_before_ray(raw, match):
    with pytest.raises(CrystaltuneError, match=match):
        parse_space(raw, "bad.yaml")


def test_runs_list_only_the_settings_a_config_reads():
    """A trial's MLflow parameters leave out what its config never reads (momentum under Adam, step
    milestones under cosine, the KL weight without KL, Huber's delta under MSE), and keep them otherwise."""
    from crystaltune.config import TrialConfig

    adam = TrialConfig.from_dict({"optim": {"name": "adam", "schedule": "cosine"}, "loss": {"name": "mse"}})
    sgd = TrialConfig.from_dict(
        {"optim": {"name": "sgd", "schedule": "step"}, "loss": {"name": "weighted", "kl": True}}
    )
    unused = {"optim.momentum", "optim.milestones", "loss.kl_weight", "loss.huber_delta"}
    assert not unused & set(adam.used_flat()) and unused <= set(sgd.used_flat())
    assert set(adam.flat()) - set(adam.used_flat()) == unused


def test_leaderboard_headers_are_unique_and_say_what_they_are():
    from crystaltune.search.leaderboard import column_names

    keys = ["data.max_neighbors", "loss.name", "model.edge_params.step", "model.name", "optim.lr", "optim.name"]
    assert column_names(keys) == ["max_neighbors", "loss", "step", "model", "lr", "optim"]
    assert column_names(["model.name"]) == ["model"]


def test_search_parameters_are_optuna_distributions():
    """Each searched parameter is the Optuna distribution it samples from (validated by Optuna's own
    constructor); categoricals keep their YAML values (lists) beside the scalar keys Optuna sees."""
    import optuna

    space = load_space("perovskites")
    by_name = {p.name: p for p in space.params}
    assert all(isinstance(p.dist, optuna.distributions.BaseDistribution) for p in space.params)
    lr, feats = by_name["optim.lr"], by_name["model.global_features"]
    assert isinstance(lr.dist, optuna.distributions.FloatDistribution) and lr.dist.log
    assert lr.contains(1e-3) and not lr.contains(1.0)
    assert feats.dist.choices == ("none", "lattice", "lattice+symmetry") and feats.contains(["lattice"])
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    assert feats.suggest(trial) in feats.choices and lr.contains(lr.suggest(trial))


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


def test_default_point_from_a_file_and_its_errors(tmp_path):
    space = load_space("perovskites")  # default: baselines/cgcnn_default_perovskites.yaml
    assert space.default_point["optim.name"] == "adam" and space.default_point["train.batch_size"] == 256
    assert space.default_point["model.edge_params.step"] == 0.2 and "optim.weight_decay" not in space.default_point
    raw = {
        "dataset": {"name": "perovskites"},
        "fixed": {"optim.name": "sgd"},
        "search": {"model.hidden": {"type": "int", "low": 32, "high": 96, "step": 32}},
    }
    with pytest.raises(CrystaltuneError, match="default is not a point of this space .*optim.name = 'adam'"):
        parse_space({**raw, "default": "baselines/cgcnn_default_perovskites.yaml"}, "s.yaml")
    with pytest.raises(CrystaltuneError, match="no such config file 'nope.yaml'"):
        parse_space({**raw, "default": "nope.yaml"}, "s.yaml")
    with pytest.raises(CrystaltuneError, match="'model.layers' is not a searched parameter"):
        parse_space({**raw, "default": {"model.layers": 3}}, "s.yaml")
    narrow = {**raw, "search": {"model.hidden": {"type": "int", "low": 128, "high": 256}}}
    with pytest.raises(CrystaltuneError, match=r"trial 0\) has model.hidden = 64, which the search cannot take"):
        parse_space(narrow, "s.yaml")
    assert parse_space({**narrow, "default": {"model.hidden": 128}}, "s.yaml").default_point == {"model.hidden": 128}


def test_shipped_spaces_validate_and_search_the_required_parameters():
    required = {
        "model.name",
        "model.hidden",
        "model.layers",
        "model.pooling",
        "model.dropout",
        "model.edge_featurizer",
        "model.node_featurizer",
        "model.learnable_edge",
        "model.global_features",
        "loss.name",
        "loss.kl_weight",
        "optim.lr",
        "optim.weight_decay",
        "train.batch_size",
    }
    for name in ("perovskites", "perov5", "sunmat"):
        space = load_space(name)
        names = {p.name for p in space.params}
        assert required <= names, required - names
        assert any(n.startswith("model.edge_params.") for n in names)
    smoke = load_space("smoke")
    assert smoke.num_samples >= 4


def test_cli_errors_are_one_line(tmp_path):
    for args, match in (
        (["perovskitez"], "did you mean 'perovskites'"),
        (["smoke", "--num-samples", "-3"], "must be >= 1"),
        ([str(tmp_path / "none.yaml")], "no such search-space file"),
        (["smoke", "--data", str(tmp_path / "missing.json")], "no such file"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "crystaltune.search", *args], capture_output=True, text=True, cwd=tmp_path
        )
        assert out.returncode == 2 and match in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.slow
def test_sigkilled_search_resumes_without_duplicates_or_retraining(tmp_path):
    """SIGKILL the driver after two trials finished; --resume completes the budget, every trial is in
    MLflow once with each epoch once, and the finished trials' training runs are not touched. Ray Train
    executor: its worker-group checkpoints are what a resume must leave alone."""
    import signal
    import time

    env = dict(os.environ)
    cmd = [
        sys.executable,
        "-m",
        "crystaltune.search",
        "smoke",
        "--output",
        str(tmp_path / "out"),
        "--executor",
        "train",
    ]
    log = open(tmp_path / "first.log", "w+")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "first.log").read_text().count("epoch(s)") >= 2:
            break
        time.sleep(1)
    assert proc.poll() is None, "search ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)
    finished = [ln.split()[1] for ln in (tmp_path / "first.log").read_text().splitlines() if "epoch(s)" in ln]
    assert len(finished) >= 2
    train_dir = tmp_path / "out" / "ray" / "train"
    before = {d.name: sorted(p.name for p in d.glob("checkpoint_*")) for d in train_dir.iterdir()}
    out = subprocess.run(cmd + ["--resume"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client, runs = _runs(tmp_path)
    children = [r for r in runs if r.data.tags.get("crystaltune.kind") == "trial"]
    # Tune snapshots its state every ~10 s: a trial that finished after the last snapshot is kept and Tune
    # samples one more (the resume says so); one that only started then is kept apart as lost
    extra = out.stdout.count("Tune samples one more trial")
    assert len(children) == 4 + extra and len({r.data.tags["crystaltune.trial_id"] for r in children}) == 4 + extra
    assert "interrupted after" not in out.stdout
    for r in runs:
        if r.data.tags.get("crystaltune.kind") == "lost_trial":
            assert r.info.status == "KILLED" and r.info.run_name.split()[0] not in finished
    assert len([r for r in runs if r.data.tags.get("crystaltune.kind") == "search"]) == 1
    for r in children:
        assert r.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_mae")]
        assert steps == sorted(set(steps)) and steps, (r.info.run_name, steps)
        assert len(client.get_metric_history(r.info.run_id, "test_mae")) == 1
    after = {d.name: sorted(p.name for p in d.glob("checkpoint_*")) for d in train_dir.iterdir()}
    done_ids = {r.data.tags["crystaltune.trial_id"] for r in children if r.info.run_name.split()[0] in finished}
    assert len(done_ids) == len(finished)
    for tid in done_ids:  # finished before the kill: no new checkpoints, i.e. not retrained
        assert after[f"train-{tid}"] == before[f"train-{tid}"]


def test_resume_sets_apart_trials_that_tune_never_snapshotted(tmp_path):
    """The race behind a SIGKILL: the tracker saw a trial start (and another finish) after Tune's last
    experiment snapshot. On --resume the unfinished one is tagged lost, left out of the leaderboard,
    and the finished one is kept. Real MLflow store; the Tune trials are stand-ins."""
    from types import SimpleNamespace

    from crystaltune.search.leaderboard import build_leaderboard
    from crystaltune.search.tracking import MLflowTracker

    space = load_space("smoke")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MLflowTracker(
        uri, space, "crystaltune-race", {"space": "smoke"}, state_file=str(tmp_path / "s.json"), verbose=False
    )
    tracker.setup()
    config = {"model.name": "cgcnn"}
    trials = [SimpleNamespace(trial_id=f"x_{i:05d}", config=config) for i in range(4)]
    for i, t in enumerate(trials):
        tracker.on_trial_start(i, trials, t)
        tracker.on_trial_result(
            i, trials, t, {"epoch": 1, "val_mae": 0.5 + i, "best_val_mae": 0.5 + i, "test_mae": 0.6}
        )
    for t in trials[:2]:
        tracker.on_trial_complete(0, trials, t)
    # the driver dies; Tune's snapshot knows trials 0 (finished) and 2 (running) only
    resumed = MLflowTracker(uri, space, "crystaltune-race", {}, state_file=str(tmp_path / "s.json"), verbose=False)
    resumed.set_state({})
    restored = [trials[0], trials[2]]
    resumed.on_step_begin(0, restored)
    resumed.on_step_begin(1, restored)  # reconciles once
    status = {tid: rec.status for tid, rec in resumed.trials.items()}
    assert status == {"x_00000": "FINISHED", "x_00001": "FINISHED", "x_00002": "RUNNING", "x_00003": "LOST"}
    lost = resumed.client.get_run(resumed.trials["x_00003"].run_id)
    assert lost.info.status == "KILLED" and lost.data.tags["crystaltune.kind"] == "lost_trial"
    assert resumed.client.get_run(resumed.trials["x_00002"].run_id).info.status == "RUNNING"
    assert [r["trial_id"] for r in build_leaderboard(resumed, space)] == ["x_00000", "x_00001", "x_00002"]


def test_tracker_state_is_one_record_per_trial_and_reads_the_older_layout(tmp_path):
    """The tracker keeps one TrialRecord per trial; a state file from before (one dict per field, as
    searches of the previous release saved it) still resumes."""
    from crystaltune.search.tracking import TrialRecord, records_from_state

    old = {
        "parent_run_id": "p",
        "runs": {"a": "r1"},
        "names": {"a": "t001 cgcnn gaussian/cgcnn (default)"},
        "status": {"a": "FINISHED"},
        "last_epoch": {"a": 3},
        "last_result": {"a": {"best_val_mae": 0.5, "epoch": 3}},
        "errors": {},
        "configs": {"a": {"model.name": "cgcnn"}},
        "watchdog": {},
    }
    rec = records_from_state(old)["a"]
    assert rec == TrialRecord(
        "r1",
        "t001 cgcnn gaussian/cgcnn (default)",
        {"model.name": "cgcnn"},
        "FINISHED",
        3,
        {"best_val_mae": 0.5, "epoch": 3},
    )
    assert rec.done and records_from_state({"trials": {"a": rec.__dict__}})["a"] == rec


def test_report_from_mlflow(smoke_search):
    work, _, _ = smoke_search
    out = subprocess.run(
        [sys.executable, "-m", "crystaltune.report", "smoke", "--output", str(work / "report")],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = (work / "report" / "report.md").read_text()
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
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "crystaltune.report",
            "smoke",
            "--output",
            str(work / "report-cv"),
            "--top-k",
            "2",
            "--cv",
            "2",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
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
    report = (work / "report-cv" / "report.md").read_text()
    assert "## Retrained per fold" in report and f"candidate {chosen} (chosen)" in report


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


def test_auto_resources_pack_trials_on_gpus_and_fall_back_to_cpus():
    from crystaltune.search.engine import SearchOptions, prepare_space
    from crystaltune.search.plan import plan_concurrency, resolve_auto

    def planned(res, **kw):
        space = prepare_space(SearchOptions("sunmat", data=str(ROOT / "README.md"), **kw))
        resolve_auto(space, res)
        return space.gpus_per_worker, space.cpus_per_worker, plan_concurrency(space, res)

    assert planned({"CPU": 2}) == (0.0, 1.0, 2)  # no GPU: CPU trials
    assert planned({"CPU": 16, "GPU": 1}) == (0.25, 4.0, 4)  # 4 trials share the GPU, 4 cores each
    assert planned({"CPU": 64, "GPU": 8}) == (0.25, 2.0, 32)
    assert planned({"CPU": 16, "GPU": 2}, trials_per_gpu=8) == (0.125, 1.0, 16)


def test_optuna_study_persisted_and_a_warm_started_search_runs_its_configs_first(smoke_search):
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


def test_warm_start_refuses_an_incompatible_study(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name="crystaltune-other", storage=storage)
    study.add_trial(
        optuna.trial.create_trial(
            params={"model.hidden": 48},
            distributions={"model.hidden": optuna.distributions.IntDistribution(16, 64)},
            value=0.5,
        )
    )
    from crystaltune.search.warm_start import warm_points

    with pytest.raises(
        CrystaltuneError, match="no configuration of that study fits this space .*model.hidden is not searched"
    ):
        warm_points(str(tmp_path / "o.db"), load_space("smoke"))
    with pytest.raises(CrystaltuneError, match="no such file"):
        warm_points(str(tmp_path / "none.db"), load_space("smoke"))


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
