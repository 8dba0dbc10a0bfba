"""The tracker's state and what it records in MLflow: the settings a run lists, a SIGKILLed search
resumed without duplicates or retraining, trials Tune never snapshotted set apart, the state file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import _runs

from crystaltune.search.space import load_space


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
    averaging = {"train.ema_decay", "train.swa_start"}  # read only with train.averaging ema / swa
    assert set(adam.flat()) - set(adam.used_flat()) == unused | averaging
    ema = TrialConfig.from_dict({"train": {"averaging": "ema"}})
    assert "train.ema_decay" in ema.used_flat() and "train.swa_start" not in ema.used_flat()


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
    assert [r.trial_id for r in build_leaderboard(resumed, space)] == ["x_00000", "x_00001", "x_00002"]


def test_tracker_state_is_one_record_per_trial(tmp_path):
    """The tracker keeps one TrialRecord per trial, saved and read back as it was."""
    from crystaltune.search.tracking import TrialRecord, records_from_state

    rec = TrialRecord(
        "r1",
        "t001 cgcnn gaussian/cgcnn (default)",
        {"model.name": "cgcnn"},
        "FINISHED",
        3,
        {"best_val_mae": 0.5, "epoch": 3},
    )
    assert rec.done and records_from_state({"trials": {"a": rec.__dict__}})["a"] == rec
