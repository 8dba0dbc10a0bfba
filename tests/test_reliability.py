"""Faults injected for real (real processes, Ray, MLflow): a DDP rank dies, trials diverge, Ctrl-C,
8 concurrent trials on one SQLite store, unwritable outputs. (SIGKILL + --resume: test_tracking.py.)"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SPACES = Path(__file__).parent / "data" / "spaces"
ENV = dict(os.environ)


def search(args, cwd, env=ENV, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "crystaltune.search", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def mlflow_runs(work: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return (
        client,
        [r for r in runs if r.data.tags.get("crystaltune.kind") == "trial"],
        [r for r in runs if r.data.tags.get("crystaltune.kind") == "search"],
    )


@pytest.mark.parametrize(
    "executor_args, fault",
    [
        # Ray Train: DDP rank 1 dies, the worker group restarts
        pytest.param(["--workers-per-trial", "2"], "rank1_exit_epoch2", marks=pytest.mark.slow),
        ([], "rank0_exit_epoch2"),  # direct: the Tune trial's own process dies, Tune restarts the trial
    ],
    ids=["ray-train-ddp", "direct"],
)
def test_dead_rank_resumes_and_diverged_trials_fail_without_stopping_the_search(tmp_path, executor_args, fault):
    marker = tmp_path / "fault-fired"
    env = {**ENV, "CRYSTALTUNE_TEST_FAULT": f"{fault}:{marker}"}
    # 3 trials (sampler seed 0): t001 the default (its rank dies at epoch 2), t002 diverges, t003 healthy
    args = [str(SPACES / "faults.yaml"), "--num-samples", "3", *executor_args, "--output", str(tmp_path / "out")]
    out = search(args, tmp_path, env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert marker.exists(), "the fault hook never fired"
    client, trials, _ = mlflow_runs(tmp_path, "crystaltune-faults")
    assert len(trials) == 3
    ok = [r for r in trials if r.info.status == "FINISHED"]
    failed = [r for r in trials if r.info.status == "FAILED"]
    assert ok and failed
    for r in failed:  # recorded with the reason, no metrics
        assert r.data.tags["crystaltune.error"].startswith("TrialDiverged: loss became")
        assert r.data.params["optim.lr"] == "1000000000000.0"
    for r in ok:  # the process died at epoch 2 of the first healthy trial: each epoch still logged once
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_mae")]
        assert steps == [1, 2, 3], steps
    rows = list(csv.DictReader(open(tmp_path / "out" / "leaderboard.csv")))
    assert rows[0]["status"] == "FINISHED" and all(r["status"] == "FAILED" for r in rows[len(ok) :])
    assert "FAILED (TrialDiverged" in out.stdout


@pytest.mark.slow
def test_sigterm_stops_cleanly_like_ctrl_c_and_resume_finishes(tmp_path):
    """Direct executor (the default for one worker): 6 trials, up to 30 epochs, so some are still
    running when the first one ends and SIGTERM arrives (what a scheduler or `kill` sends; the driver
    turns it into Ctrl-C's path: the SIGINT the disk guard and the stall timeout send themselves).
    Before the resume, Tune's newest experiment state is cut in half, as a full disk leaves it: the
    resume puts back the last good copy instead of Tune quietly starting over."""
    cmd = [
        sys.executable,
        "-m",
        "crystaltune.search",
        "smoke",
        "--output",
        str(tmp_path / "out"),
        "--num-samples",
        "6",
        "--max-epochs",
        "30",
    ]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and "epoch(s)" not in (tmp_path / "first.log").read_text():
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=300)
    text = (tmp_path / "first.log").read_text()
    assert rc == 130, text[-3000:]
    assert "continue with the same command plus --resume" in text and "Traceback" not in text
    client, trials, parents = mlflow_runs(tmp_path, "crystaltune-smoke")
    assert parents[0].info.status == "KILLED" and parents[0].data.tags["crystaltune.status"] == "interrupted"
    assert all(r.info.status in ("FINISHED", "KILLED") for r in trials)  # nothing left RUNNING
    state = max((tmp_path / "out" / "ray" / "smoke").glob("experiment_state-*.json"))
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    out = subprocess.run(cmd + ["--resume"], cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"{state.name} damaged (a full disk?): restored the copy" in out.stdout + out.stderr
    assert "Restarting experiment" not in out.stdout + out.stderr
    client, trials, parents = mlflow_runs(tmp_path, "crystaltune-smoke")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 6 and all(r.info.status == "FINISHED" for r in trials)
    for r in trials:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_mae")]
        assert steps == sorted(set(steps)) and steps
    # the closing line's time covers both sessions, not only the resumed one's
    first_s = client.get_metric_history(parents[0].info.run_id, "search_time_s")[0].value
    said = re.search(r"6 trials \(\d+ failed\) in (\d+)s \((\d+)s of it in this session", out.stdout + out.stderr)
    assert said, (out.stdout + out.stderr)[-3000:]
    assert int(said.group(1)) >= int(first_s) + int(said.group(2)) - 1


@pytest.mark.slow
def test_eight_concurrent_trials_lose_no_metric_rows(tmp_path):
    out = search([str(SPACES / "concurrent.yaml"), "--num-cpus", "17", "--output", str(tmp_path / "out")], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "database is locked" not in out.stdout + out.stderr
    client, trials, _ = mlflow_runs(tmp_path, "crystaltune-concurrent")
    assert len(trials) == 8
    events = sorted([(r.info.start_time, 1) for r in trials] + [(r.info.end_time, -1) for r in trials])
    running = peak = 0
    for _, d in events:
        running += d
        peak = max(peak, running)
    assert peak >= 4, f"only {peak} trials overlapped"
    rows = sum(
        len(client.get_metric_history(r.info.run_id, k))
        for r in trials
        for k in ("train_mae", "val_mae", "lr", "graphs_per_s")
    )
    assert rows == 8 * 2 * 4  # 8 trials x 2 epochs x 4 per-epoch metrics, none lost or doubled


def test_unwritable_output_or_storage_fails_before_any_trial(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for flag in ("--output", "--storage"):
        t0 = time.time()
        out = search(["smoke", flag, str(blocker / "sub")], tmp_path, timeout=120)
        assert out.returncode == 2 and "is not writable" in out.stderr and flag in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and time.time() - t0 < 60
        assert not (tmp_path / "mlflow.db").exists()  # nothing started


@pytest.mark.slow
def test_watchdog_stops_a_hung_trial_and_the_search_finishes(tmp_path):
    """A trial that stops reporting (it sleeps at epoch 2, on every retry) is stopped by the driver's
    watchdog after max(floor, factor x its slowest epoch), retried, and finally recorded FAILED with the
    watchdog's reason; the other trials finish and the search exits normally."""
    marker = tmp_path / "hung-trial"
    env = {**ENV, "CRYSTALTUNE_TEST_FAULT": f"hang_epoch2:{marker}"}
    out = search(
        [
            str(SPACES / "faults.yaml"),
            "--output",
            str(tmp_path / "out"),
            "--watchdog-floor",
            "8",
            "--watchdog-factor",
            "3",
        ],
        tmp_path,
        env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    hung = marker.read_text()
    client, trials, _ = mlflow_runs(tmp_path, "crystaltune-faults")
    assert len(trials) == 4
    by_id = {r.data.tags["crystaltune.trial_id"]: r for r in trials}
    assert by_id[hung].info.status == "FAILED"
    assert by_id[hung].data.tags["crystaltune.error"].startswith("watchdog: no report for")
    assert "(limit 8 s: 3 x its slowest epoch, at least 8 s)" in by_id[hung].data.tags["crystaltune.error"]
    assert any(r.info.status == "FINISHED" for r in trials)
    assert out.stdout.count("watchdog: no report for") >= 1


def _mount_tmpfs(path: Path, size_mb: int) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def _fill(path: Path) -> None:
    """Write zeros until the file system says it is full."""
    import errno

    with open(path, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 2**20)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


@pytest.mark.slow
def test_a_full_disk_stops_the_search_clearly_and_resume_finishes_once_space_is_freed(tmp_path):
    """--output and --storage on a 260 MiB tmpfs, filled to the last byte after the first epoch
    checkpoint: the search stops with one `error: disk full` line naming the folder, the MLflow store
    and the leaderboard stay intact, and --resume completes the budget once the filler is gone."""
    import sqlite3

    small = tmp_path / "small"
    if not _mount_tmpfs(small, 260):
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    args = ["smoke", "--output", str(small / "out"), "--storage", str(small / "storage")]
    try:
        with open(tmp_path / "search.log", "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "crystaltune.search", *args], cwd=tmp_path, stdout=log, stderr=log, env=ENV
            )
            deadline = time.time() + 600
            while proc.poll() is None and time.time() < deadline and not list(small.rglob("checkpoint_0*")):
                time.sleep(0.2)
            assert proc.poll() is None, (tmp_path / "search.log").read_text()[-3000:]
            _fill(small / "filler")
            rc = proc.wait(timeout=600)
        text = (tmp_path / "search.log").read_text()
        assert rc == 1, text[-3000:]
        assert text.strip().splitlines()[-1].startswith("error: disk full: --"), text[-3000:]
        db = sqlite3.connect(tmp_path / "mlflow.db")
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
        db.close()
        board = small / "out" / "leaderboard.csv"
        if board.exists():  # complete or absent, never truncated
            rows = list(csv.DictReader(board.open()))
            assert all(r["status"] for r in rows)
        (small / "filler").unlink()
        out = search([*args, "--resume"], tmp_path)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        _, trials, _ = mlflow_runs(tmp_path, "crystaltune-smoke")
        names = [r.info.run_name for r in trials if r.data.tags.get("crystaltune.kind") == "trial"]
        assert len(names) == len(set(names)) == 4, names
        assert all(r.info.status == "FINISHED" for r in trials)
        assert len(list(csv.DictReader(board.open()))) == 4
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


def test_stall_timeout_stops_a_search_in_which_nothing_can_run():
    """Trials that wait for resources the cluster no longer has (PENDING, nothing RUNNING) for longer
    than stall_s: the watchdog stops the search through the Ctrl-C path (SIGINT to the driver itself)."""
    from types import SimpleNamespace

    from crystaltune.search.watchdog import Watchdog

    got = []
    old = signal.signal(signal.SIGINT, lambda *_: got.append("SIGINT"))
    try:
        dog = Watchdog(SimpleNamespace(), stall_s=0.2, verbose=False)
        waiting = [SimpleNamespace(trial_id="a", status="PENDING"), SimpleNamespace(trial_id="b", status="PENDING")]
        dog.on_step_begin(0, waiting)
        assert not got
        time.sleep(0.3)
        dog.on_step_begin(1, [*waiting[:1], SimpleNamespace(trial_id="c", status="RUNNING")])  # progress resets
        time.sleep(0.3)
        dog.on_step_begin(2, waiting)
        assert not got
        time.sleep(0.3)
        dog.on_step_begin(3, waiting)
        assert got == ["SIGINT"]
    finally:
        signal.signal(signal.SIGINT, old)
