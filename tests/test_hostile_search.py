"""Hostile inputs and situations for the search and training commands, through the real CLI (processes
capped at 3 GiB of address space) or the project's own functions, on real Ray, MLflow and Optuna:
searches sharing one SQLite store, a cluster that goes away, datasets too small to split, targets
float32 cannot hold, a damaged tracker state, a warm start from the wrong file, an epoch count the
budget overrides and a dead --address. Each ends in its one-line answer, never a traceback or a hang."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, random_cell, record, rocksalt, run_cli, write_jsonl

from crystaltune.errors import CrystaltuneError

RAY_BIN = str(Path(sys.executable).with_name("ray"))


def run(args: list[str], cwd: Path, timeout: float = 120, capped: bool = True) -> subprocess.CompletedProcess:
    return run_cli(args, cwd, timeout, capped)


def one_error_line(out: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single ``error:`` line a user error prints (exit ``code``, no traceback)."""
    text = out.stdout + out.stderr
    assert out.returncode == code, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, out.stderr[-3000:]
    if code == 2:
        assert out.stderr.strip().count("\n") == 0, out.stderr
    return errors[0]


def crystals(n: int, scale: float = 1.0) -> list[dict]:
    return [record(f"c{i:02d}", random_cell(i, n=2 + i % 3), band_gap=scale * (1 + i / 4)) for i in range(n)]


def space_file(tmp: Path, data: Path, extra: str = "") -> Path:
    """A small search space over a dataset file: two trials of one epoch."""
    path = tmp / "space.yaml"
    path.write_text(
        f"name: hostile\ndataset: {{name: {data}, targets: [band_gap]}}\n"
        "budget: {num_samples: 2, max_epochs: 1, grace_period: 1}\n"
        "resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0}\n"
        f"fixed: {{train.batch_size: 32, model.hidden: 16, model.head_hidden: 16{extra}}}\n"
        "search:\n  model.layers: {type: int, low: 2, high: 3}\n"
    )
    return path


def mlflow_runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


# 1. concurrent searches on one SQLite store ------------------------------------------------------


OPEN_AT = """
import sys, time
from crystaltune.outputs import prepare_tracking_store
uri, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
prepare_tracking_store(uri)
"""


def test_processes_opening_one_fresh_sqlite_store_at_once_all_succeed(tmp_path):
    """Without the lock, two processes creating a fresh store at the same moment fail with "table ...
    already exists" or an alembic error in most tries; with it every one succeeds, schema made once."""
    stores = [tmp_path / f"s{i}" / "mlflow.db" for i in range(3)]
    start = time.time() + 8  # after every process has imported MLflow
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_AT, f"sqlite:///{db}", str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for db in stores
        for _ in range(2)
    ]
    outs = [(p.wait(timeout=120), p.stdout.read()) for p in procs]
    assert all(rc == 0 for rc, _ in outs), [o[-1500:] for rc, o in outs if rc]
    for db in stores:
        with sqlite3.connect(db) as con:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            assert {"experiments", "runs", "latest_metrics"} <= tables
            assert con.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
            assert con.execute("SELECT count(*) FROM experiments").fetchone() == (1,)  # "Default", once


def test_joining_another_process_private_ray_is_refused_before_any_run(tmp_path):
    """A search's own Ray instance ends with it and kills every driver that joined it: joining one
    (what the second-local-search refusal used to advise) is refused with the reason and the fix."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import ray, sys, time\n"
            "from crystaltune.raysession import start_local_ray\n"
            "start_local_ray(1, address='local', include_dashboard=False)\n"
            "print(ray.get_runtime_context().gcs_address, flush=True)\n"
            "time.sleep(300)\n",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    try:
        address = holder.stdout.readline().strip()
        assert address, "the holder's Ray did not start"
        from crystaltune.search.engine import second_cluster_message

        assert f"the private one of pid {holder.pid}" in second_cluster_message([address])
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        out = run(["crystaltune.search", "smoke", "--address", address, "--tracking-uri", uri], tmp_path)
        line = one_error_line(out)
        assert f"that Ray instance is the private one of pid {holder.pid}" in line, line
        assert "ray start --head" in line
        assert mlflow_runs(uri, "crystaltune-smoke") == []  # refused before any run was created
    finally:
        holder.kill()
        holder.wait()


def _kill_cluster(tag: str) -> None:
    """SIGKILL every process of the cluster whose temp dir is ``tag`` (only that one: `ray stop` would
    stop every Ray instance on the machine)."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        if any(tag in a for a in p.info["cmdline"] or []):
            try:
                p.kill()
            except psutil.Error:
                pass


@pytest.mark.slow
def test_two_searches_share_a_fresh_store_and_a_lost_cluster_leaves_nothing_running(tmp_path):
    """Two searches join one standing loopback Ray and share one fresh SQLite store: both record every
    run. Then the cluster is killed under the second (its trial hangs at epoch 2): it stops within
    seconds with one error line, its parent run and trial runs KILLED; no run is left RUNNING."""
    port = free_port()
    tag = f"/tmp/ct-hs-{port}"
    marker = tmp_path / "hang-marker"
    env = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "CRYSTALTUNE_TEST_FAULT": f"hang_epoch2:{marker}",  # the trial workers inherit it from the raylet
    }
    head = [RAY_BIN, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2"]
    head += [f"--temp-dir={tag}", "--include-dashboard=false", "--disable-usage-stats"]
    subprocess.run(head, check=True, env={**os.environ, **env}, capture_output=True, timeout=120)
    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    common = ["crystaltune.search", "smoke", "--address", f"127.0.0.1:{port}", "--tracking-uri", uri]

    def start(name: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", *common, "--output", str(tmp_path / name), *extra],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env, "CUDA_VISIBLE_DEVICES": ""},
        )

    try:
        a = start("a", "--num-samples", "2", "--max-epochs", "1", "--json")  # never reaches epoch 2
        b = start("b", "--num-samples", "2", "--max-epochs", "3", "--grace-period", "3")
        a_out, a_err = a.communicate(timeout=300)
        assert a.returncode == 0, a_err[-3000:]
        deadline = time.time() + 120
        while not marker.exists() and b.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert marker.exists() and b.poll() is None, "the second search should hang in its epoch 2"
        time.sleep(2)  # its epoch-1 report reaches the tracker
        _kill_cluster(tag)
        t0 = time.time()
        _, b_err = b.communicate(timeout=90)
        assert time.time() - t0 < 45
        assert b.returncode == 1, b_err[-3000:]
        errors = [ln for ln in b_err.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in b_err, b_err[-3000:]
        assert f"the Ray cluster at --address 127.0.0.1:{port} stopped answering" in errors[0]
        assert "marked KILLED" in errors[0] and "--resume" in errors[0]
    finally:
        _kill_cluster(tag)
        for p in (a, b):
            if p.poll() is None:
                p.kill()
    summary = json.loads(a_out[a_out.rindex("\n{") :])
    runs = mlflow_runs(uri, "crystaltune-smoke")
    parents = {r.info.run_id: r for r in runs if r.data.tags.get("crystaltune.kind") == "search"}
    trials = [r for r in runs if r.data.tags.get("crystaltune.kind") == "trial"]
    assert len(parents) == 2 and not [r for r in runs if r.info.status == "RUNNING"]
    a_trials = [r for r in trials if r.data.tags["mlflow.parentRunId"] == summary["parent_run_id"]]
    assert len(a_trials) == 2 and all(r.info.status == "FINISHED" for r in a_trials)
    assert parents[summary["parent_run_id"]].info.status == "FINISHED"
    (b_parent,) = [r for rid, r in parents.items() if rid != summary["parent_run_id"]]
    assert b_parent.info.status == "KILLED" and b_parent.data.tags["crystaltune.status"] == "interrupted"
    b_trials = [r for r in trials if r.data.tags["mlflow.parentRunId"] == b_parent.info.run_id]
    assert b_trials and all(r.info.status in ("KILLED", "FINISHED") for r in b_trials)
    assert any(r.info.status == "KILLED" for r in b_trials)
    state = json.loads((tmp_path / "b" / "tracker_state.json").read_text())
    assert "RUNNING" not in {t["status"] for t in state["trials"].values()}  # --resume continues them


# 2. too little data, all trials failed, strict JSON -----------------------------------------------


@pytest.mark.parametrize("n, empty", [(3, "val"), pytest.param(6, "test", marks=pytest.mark.slow)])
def test_a_dataset_too_small_to_split_is_refused_before_ray(tmp_path, n, empty):
    data = write_jsonl(tmp_path / "small.jsonl", crystals(n))
    out = run(["crystaltune.search", str(space_file(tmp_path, data))], tmp_path)
    line = one_error_line(out)
    assert f"{n} usable crystal(s)" in line and f"the {empty} set is empty" in line, line
    assert "use a dataset of at least 8 crystals" in line
    assert not (tmp_path / "crystaltune-results" / "hostile" / "ray" / "hostile").exists()  # Ray never ran
    out = run(["crystaltune.train", "--dataset", str(data), "--epochs", "1", "--output", "x.pt", "--json"], tmp_path)
    assert f"the {empty} set is empty" in one_error_line(out)


def test_a_search_whose_every_trial_failed_exits_1_with_one_line(tmp_path):
    """SGD at lr 1e30 makes every prediction NaN after the first step: both trials fail (not retried)."""
    data = write_jsonl(tmp_path / "d.jsonl", crystals(12))
    space = space_file(tmp_path, data, ", optim.name: sgd, optim.momentum: 0.0, optim.lr: 1.0e+30")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run(["crystaltune.search", str(space), "--tracking-uri", uri, "--json"], tmp_path, 300, capped=False)
    line = one_error_line(out, code=1)
    assert line.startswith("error: all 2 trials failed, so no best configuration was written; first, t00"), line
    assert "validation MAE is nan" in line
    assert not (tmp_path / "crystaltune-results" / "hostile" / "best_config.yaml").exists()
    summary = json.loads(out.stdout[out.stdout.rindex("\n{") :], parse_constant=pytest.fail)
    assert summary["failed"] == 2 and summary["error"] == line.removeprefix("error: ")
    runs = mlflow_runs(uri, "crystaltune-hostile")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED", "FAILED"]  # the parent too


def test_train_json_is_strict_json_with_null_for_undefined_metrics(tmp_path):
    """One test crystal: R² and uniformity are undefined; --json says null, never a bare NaN."""
    data = write_jsonl(tmp_path / "d.jsonl", crystals(12))
    out = run(["crystaltune.train", "--dataset", str(data), "--epochs", "1", "--output", "x.pt", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout[out.stdout.index("\n{") :]
    assert "NaN" not in text and "Infinity" not in text
    summary = json.loads(text, parse_constant=pytest.fail)
    assert summary["test_size"] == 1 and summary["test_r2"] is None and summary["uniformity"] is None


# 3. every record skipped ---------------------------------------------------------------------------


def test_a_dataset_of_crystals_without_edges_reports_why_every_record_was_skipped(tmp_path):
    data = write_jsonl(tmp_path / "far.jsonl", [record(f"f{i}", rocksalt(30.0 + i), band_gap=1.0) for i in range(4)])
    out = run(["crystaltune.train", "--dataset", str(data), "--targets", "band_gap", "--output", "x.pt"], tmp_path)
    line = one_error_line(out)
    assert "no record has target 'band_gap': every record was skipped (4 skipped; first: f0 (line 1)" in line
    assert "site 0 has no neighbour within 8.0 Å" in line


# 4. targets float32 cannot hold ------------------------------------------------------------------


def test_targets_near_1e30_and_1e_minus_30_train_as_well_as_ordinary_ones(tmp_path):
    """The same crystals with targets scaled by 1e29, 1 and 1e-30 give the same relative MAE: the
    normaliser works in float64 and scales by the real std (it clamped a std below 1e-8 to 1)."""
    from crystaltune.config import TrialConfig
    from crystaltune.train.loop import fit

    relative = {}
    for scale in (1e29, 1.0, 1e-30):
        data = write_jsonl(tmp_path / f"s{scale:g}.jsonl", crystals(12, scale))
        cfg = TrialConfig.from_dict({"data": {"dataset": str(data)}, "train": {"epochs": 2, "num_threads": 1}})
        summary = fit(cfg)
        assert all(np.isfinite(summary[k]) for k in ("val_mae", "test_mae", "test_rmse")), summary
        relative[scale] = (summary["val_mae"] / scale, summary["test_rmse"] / scale)
    assert np.allclose(relative[1e29], relative[1.0], rtol=1e-3), relative
    assert np.allclose(relative[1e-30], relative[1.0], rtol=1e-3), relative


def test_the_normaliser_scales_tiny_and_constant_targets_by_their_magnitude():
    import torch

    from crystaltune.normalizer import Normalizer

    y = torch.tensor([[1e-30], [2e-30], [3e-30]])
    n = Normalizer.fit(y)
    assert float(n.std) == pytest.approx(1e-30, rel=1e-5) and float(n.mean) == pytest.approx(2e-30, rel=1e-5)
    assert float(Normalizer.fit(torch.tensor([[5e-30], [5e-30]])).std) == pytest.approx(5e-30, rel=1e-5)
    assert float(Normalizer.fit(torch.tensor([[0.0], [0.0]])).std) == 1.0
    big = Normalizer.fit(torch.tensor([[1e30], [3e30]], dtype=torch.float32))
    assert torch.isfinite(big.std).all() and float(big.std) == pytest.approx(np.std([1e30, 3e30], ddof=1), rel=1e-5)


@pytest.mark.parametrize(
    "scale, message",
    [
        (1e35, "c00: target 'band_gap' is 1e+35, beyond the +-1e+30 that float32 training holds"),
        (1e-35, "target 'band_gap' is at most 3.75e-35 in magnitude (e.g. c11), below the 1e-30"),
    ],
)
def test_targets_beyond_float32_are_refused_naming_the_key_and_the_record(tmp_path, scale, message):
    data = write_jsonl(tmp_path / "d.jsonl", crystals(12, scale))
    out = run(["crystaltune.train", "--dataset", str(data), "--epochs", "1", "--output", "x.pt"], tmp_path)
    assert message in one_error_line(out)


# 5. a damaged tracker state ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"parent_run_id": "abc", "trials": {"t1": {"run_id": "r1", "na', "not valid JSON (Unterminated string"),
        (
            '{"parent_run_id": "abc", "trials": {"t1": {"run_id": "r1", "name": "t001", "last_epoch": "x"}}}',
            'trials.t1.last_epoch must be an integer, got str "x"',
        ),
        ("[1, 2]", "expected a JSON object, got list"),
    ],
    ids=["truncated", "mistyped", "not-an-object"],
)
def test_a_damaged_tracker_state_is_refused_on_resume_before_ray(tmp_path, content, message):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "tracker_state.json").write_text(content)
    t0 = time.time()
    out = run(["crystaltune.search", "smoke", "--resume", "--output", str(out_dir)], tmp_path)
    line = one_error_line(out)
    assert f"--resume: {out_dir / 'tracker_state.json'}: " in line and message in line, line
    assert "without --resume" in line and time.time() - t0 < 60
    assert not (out_dir / "ray" / "smoke").exists()  # no Tune experiment: Ray never ran


# 6. warm start from the wrong file ---------------------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_warm_start_from_a_file_that_is_not_an_optuna_study_writes_nothing(tmp_path):
    from crystaltune.outputs import prepare_tracking_store

    mlflow_db = tmp_path / "mlflow.db"
    prepare_tracking_store(f"sqlite:///{mlflow_db}")
    plain = tmp_path / "plain.db"
    with sqlite3.connect(plain) as con:
        con.execute("CREATE TABLE notes (x TEXT)")
    text = tmp_path / "notes.db"
    text.write_text("just text\n" * 20)
    cases = [
        (str(mlflow_db), "an MLflow tracking store, not an Optuna study (it has no 'studies' table)"),
        (f"sqlite:///{plain}", "an SQLite file, not an Optuna study (it has no 'studies' table)"),
        (str(text), "not an SQLite database (file is not a database)"),
        (f"sqlite:///{tmp_path / 'new.db'}", "no such file"),
    ]
    before = {p: _digest(p) for p in (mlflow_db, plain, text)}
    for source, message in cases:
        out = run(["crystaltune.search", "smoke", "--warm-start", source, "--output", "out"], tmp_path)
        assert message in one_error_line(out), (source, out.stderr)
    assert {p: _digest(p) for p in before} == before  # not a byte written
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".db") == ["mlflow.db", "notes.db", "plain.db"]


# 7. an epoch count the budget overrides ----------------------------------------------------------


def test_epochs_the_budget_would_override_are_refused_with_one_line(tmp_path):
    from crystaltune.search.space import load_space

    base = "search: {optim.lr: {type: float, low: 0.001, high: 0.01}}\n"
    cases = [
        ("budget: {max_epochs: 3}\nfixed: {train.epochs: 123456789}\n", "fixed train.epochs (123456789) would be"),
        ("budget: {max_epochs: 123456789}\n", "budget.max_epochs must be an integer in [1, 100000], got 123456789"),
        (
            "search: {train.epochs: {type: int, low: 5, high: 50}}\n",
            "search.train.epochs: epochs cannot be searched; budget.max_epochs (20)",
        ),
    ]
    for i, (text, message) in enumerate(cases):
        path = tmp_path / f"s{i}.yaml"
        path.write_text(text + (base if "search:" not in text else ""))
        with pytest.raises(CrystaltuneError, match=None) as err:
            load_space(path)
        assert message in str(err.value), str(err.value)
    assert load_space(_write(tmp_path / "ok.yaml", "budget: {max_epochs: 3}\nfixed: {train.epochs: 3}\n" + base))
    out = run(["crystaltune.search", str(tmp_path / "s0.yaml")], tmp_path)
    assert "every trial trains budget.max_epochs (3) epochs; set budget.max_epochs instead" in one_error_line(out)
    out = run(["crystaltune.search", "smoke", "--max-epochs", "123456789"], tmp_path)
    assert "--max-epochs must be <= 100000, got 123456789" in one_error_line(out)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# 8. a dead --address ----------------------------------------------------------------------------


def test_an_address_where_no_ray_answers_fails_in_seconds(tmp_path):
    """Nothing listening (ray.init retried for minutes without a word), or a server that is not Ray's
    GCS (here a plain TCP server that answers with HTTP/1.0, like the dashboard port)."""
    t0 = time.time()
    out = run(["crystaltune.search", "smoke", "--address", "127.0.0.1:1"], tmp_path, timeout=60)
    line = one_error_line(out)
    assert "--address 127.0.0.1:1: no Ray cluster at 127.0.0.1:1 (Connection refused)" in line, line
    assert time.time() - t0 < 45
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    import threading

    def answer():
        conn, _ = server.accept()
        conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    try:
        out = run(["crystaltune.search", "smoke", "--address", f"127.0.0.1:{port}"], tmp_path, timeout=60)
    finally:
        server.close()
    assert "something answers, but not a Ray GCS" in one_error_line(out)
