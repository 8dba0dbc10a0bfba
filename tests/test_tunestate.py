"""Tune's state files kept resumable: a last-good copy is taken only of files that parse, and a damaged
file (a full disk truncates Tune's writes) is put back from it, or its session set aside, before --resume."""

from __future__ import annotations

import json
import pickle

import pytest

from crystaltune.errors import CrystaltuneError
from crystaltune.search import tunestate

A, B = "2026-12-03_12-39-04", "2026-12-03_13-37-11"


def write_session(folder, session, trials):
    (folder / f"experiment_state-{session}.json").write_text(json.dumps({"trial_data": trials}))
    # Tune's search_gen_state is a pickle despite its name
    (folder / f"search_gen_state-{session}.json").write_bytes(pickle.dumps({"counter": len(trials)}))
    (folder / f"searcher-state-{session}.pkl").write_bytes(pickle.dumps({"trials": trials}))
    (folder / f"callback-states-{session}.pkl").write_bytes(pickle.dumps([None]))
    (folder / "tuner.pkl").write_bytes(pickle.dumps({"name": "smoke"}))


def truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def test_session_names_parse_for_every_state_file():
    assert tunestate.session_of(f"experiment_state-{A}.json") == A
    assert tunestate.session_of(f"search_gen_state-{A}.json") == A
    assert tunestate.session_of(f"searcher-state-{A}.pkl") == A
    assert tunestate.session_of(f"callback-states-{A}.pkl") == A
    assert tunestate.session_of("tuner.pkl") is None and tunestate.session_of("t001_00000") is None


def test_a_truncated_state_is_restored_from_the_last_good_copy(tmp_path):
    write_session(tmp_path, A, ["t1"])
    assert tunestate.snapshot(tmp_path)
    write_session(tmp_path, A, ["t1", "t2"])
    truncate(tmp_path / f"experiment_state-{A}.json")
    assert not tunestate.snapshot(tmp_path)  # a damaged file never replaces the good copy
    done = tunestate.repair(tmp_path)
    assert len(done) == 1 and f"experiment_state-{A}.json damaged" in done[0] and "restored" in done[0]
    # the whole session comes back as one consistent set, the one the copy was taken of
    assert json.loads((tmp_path / f"experiment_state-{A}.json").read_text()) == {"trial_data": ["t1"]}
    assert pickle.loads((tmp_path / f"searcher-state-{A}.pkl").read_bytes()) == {"trials": ["t1"]}
    assert tunestate.repair(tmp_path) == []  # nothing left to do


def test_without_a_copy_the_session_before_resumes_under_the_newest_names(tmp_path):
    write_session(tmp_path, A, ["t1"])
    tunestate.snapshot(tmp_path)
    write_session(tmp_path, B, ["t1", "t2"])  # a resumed session, damaged before any copy of it
    truncate(tmp_path / f"searcher-state-{B}.pkl")
    done = tunestate.repair(tmp_path)
    assert f"resuming from session {A}" in done[0]
    # Tune (and the staging folder a long-lived Ray keeps) take the newest names: they now hold A's state
    assert pickle.loads((tmp_path / f"searcher-state-{B}.pkl").read_bytes()) == {"trials": ["t1"]}
    assert json.loads((tmp_path / f"experiment_state-{B}.json").read_text()) == {"trial_data": ["t1"]}
    (aside,) = (tmp_path / tunestate.DAMAGED).iterdir()
    assert len(list(aside.iterdir())) == 4 and tunestate.repair(tmp_path) == []


def test_a_crash_between_the_copy_folders_renames_keeps_a_usable_copy(tmp_path):
    write_session(tmp_path, A, ["t1"])
    tunestate.snapshot(tmp_path)
    tunestate.snapshot(tmp_path)  # GOOD and OLD
    (tmp_path / tunestate.GOOD).rename(tmp_path / tunestate.NEW)  # as if it crashed before NEW -> GOOD
    write_session(tmp_path, A, ["t1", "t2"])
    assert tunestate.snapshot(tmp_path)  # OLD was the only copy: kept until the new one is in place
    assert (tmp_path / tunestate.OLD / tunestate.COMPLETE).exists()
    truncate(tmp_path / f"experiment_state-{A}.json")
    truncate(tmp_path / "tuner.pkl")
    done = tunestate.repair(tmp_path)
    assert json.loads((tmp_path / f"experiment_state-{A}.json").read_text()) == {"trial_data": ["t1", "t2"]}
    assert "tuner.pkl damaged: restored" in done[-1]


def test_a_state_with_nothing_readable_left_fails_with_the_folder_named(tmp_path):
    assert tunestate.repair(tmp_path) == []  # no search there: Tune's can_restore says so
    write_session(tmp_path, A, ["t1"])
    truncate(tmp_path / f"experiment_state-{A}.json")
    with pytest.raises(CrystaltuneError, match=f"Tune state in {tmp_path} is damaged.*without --resume"):
        tunestate.repair(tmp_path)


def test_the_keeper_copies_only_when_the_state_changed(tmp_path):
    keeper = tunestate.StateKeeper(str(tmp_path), every_s=0.0)

    def step(i):
        keeper.next_at = 0.0  # due now (the keeper waits 50x its own last cost between looks)
        keeper.on_step_begin(i, [])

    step(0)  # nothing written yet
    assert not (tmp_path / tunestate.GOOD).exists()
    write_session(tmp_path, A, ["t1"])
    step(1)
    assert not (tmp_path / tunestate.GOOD).exists()  # seen once: Tune may still be copying it
    step(1)
    stamp = (tmp_path / tunestate.GOOD / tunestate.COMPLETE).stat().st_mtime_ns
    step(2)
    assert (tmp_path / tunestate.GOOD / tunestate.COMPLETE).stat().st_mtime_ns == stamp
    write_session(tmp_path, A, ["t1", "t2"])
    step(3)
    step(4)
    good = tmp_path / tunestate.GOOD / f"experiment_state-{A}.json"
    assert json.loads(good.read_text()) == {"trial_data": ["t1", "t2"]}
    write_session(tmp_path, A, ["t1", "t2", "t3"])
    keeper.on_experiment_end([])  # after Tune's final write: copied at once
    assert json.loads(good.read_text()) == {"trial_data": ["t1", "t2", "t3"]}
    assert pickle.loads(pickle.dumps(keeper)).seen is None  # restored with the Tuner: copies afresh
