"""The renderer on plain rows, and the one trial row read the same from a tracker record and from a
real MLflow run."""

from __future__ import annotations

import math

import pytest

from crystaltune import render
from crystaltune.search.runs import TrialRow, rank


def _rows() -> list[TrialRow]:
    params = {"model.name": "cgcnn", "model.edge_featurizer": "gaussian", "model.node_featurizer": "cgcnn"}
    return [
        TrialRow("t002 egcnn rbf/onehot", "FINISHED", "r2", 0.31, 0.35, params={**params, "model.name": "egcnn"}),
        TrialRow("t001 cgcnn gaussian/cgcnn (default)", "FINISHED", "r1", 0.42, 0.44, params=params, default=True),
        TrialRow("t003 cgcnn gaussian/cgcnn", "FAILED", "r3", error="TrialDiverged: loss became nan", params=params),
        TrialRow("t004 cgcnn gaussian/cgcnn", "KILLED", "r4", 0.40, math.nan, epochs=2, params=params),
    ]


def test_rank_puts_failed_trials_last_and_keeps_interrupted_ones():
    ok, failed = rank(_rows())
    assert [r.trial for r in ok] == ["t002", "t004", "t001"] and [r.trial for r in failed] == ["t003"]


def test_trial_table_markdown_lists_ranked_rows_then_failed_ones_with_their_error():
    ok, failed = rank(_rows())
    lines = render.trial_table(ok, render.REPORT_COLUMNS, failed)
    assert lines[0].startswith("| # | trial | val MAE | test MAE |") and lines[1].count("---") == len(
        render.REPORT_COLUMNS
    )
    assert lines[2].startswith("| 1 | t002 | 0.3100 | 0.3500 |") and "| egcnn |" in lines[2]
    assert lines[3].startswith("| 2 | t004 | 0.4000 | - |")  # no test MAE for the interrupted trial
    assert lines[5].startswith("| - | t003 | FAILED |") and lines[5].endswith("TrialDiverged: loss became nan |")
    assert all(ln.count("|") == len(render.REPORT_COLUMNS) + 1 for ln in lines)


def test_console_leaderboard_shows_only_differing_params_and_always_the_default():
    ok, failed = rank(_rows())
    text = render.console_leaderboard(ok + failed, top=1)
    head, _, first, default, note = text.splitlines()
    assert head.split() == ["#", "trial", "status", "best_val_mae", "test_mae", "epochs", "model"]
    assert first.split()[:2] == ["1", "t002"] and default.split()[:2] == ["3", "t001*"]
    assert note.startswith("* the default configuration")


def test_retrained_table_report_and_readme_forms_say_the_same_numbers():
    stats = {"test_mae": {0: 0.1, 1: 0.2}, "test_mae_mean": 0.15, "test_mae_sd": 0.07, "best_val_mae_mean": 0.12}
    cand = {**stats, "source": "trial t002", "params": {"model.name": "egcnn"}, "cv": False}
    base = {**stats, "source": "baseline.yaml", "params": {"model.name": "cgcnn"}, "cv": False}
    retrained = {"candidates": {"t002": cand}, "best": cand, "baseline": base}
    report = render.retrained_table(retrained)
    assert report[2] == "| candidate t002 (chosen) (trial t002) | 0.1000 / 0.2000 | 0.1500 ± 0.0700 | 0.1200 |"
    assert report[3].startswith("| baseline (baseline.yaml) |")
    readme = render.retrained_table(retrained, describe=lambda p: p["model.name"])
    assert readme[2].startswith("| well-trained default: cgcnn | 0.1000 / 0.2000 (seeds 0, 1) |")
    assert readme[3].startswith("| searched, trial t002 (chosen by val): egcnn |")


def test_parity_plot_draws_finite_pairs(tmp_path):
    import numpy as np

    y = np.array([0.0, 1.0, 2.0, np.nan])
    render.parity_plot(y, y + 0.1, "t001", tmp_path / "p.png", "band_gap")
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert render.error_summary("band_gap", y[:3], y[:3] + 0.1).startswith("band_gap: n = 3, MAE 0.1000")


@pytest.fixture
def mlflow_trial(tmp_path):
    """A trial run written to a real MLflow SQLite store with the tags the tracker writes."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from crystaltune.search import runs

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment(runs.experiment_name("x"))
    parent = client.create_run(exp, tags={runs.KIND: runs.SEARCH}).info.run_id
    tags = {runs.PARENT: parent, runs.KIND: runs.TRIAL, runs.TRIAL_ID: "x_00000", runs.DEFAULT: "true"}
    run = client.create_run(exp, run_name="t001 cgcnn gaussian/cgcnn (default)", tags=tags)
    rid = run.info.run_id
    metrics = [Metric("best_val_mae", 0.25, 0, 3), Metric("test_mae", 0.3, 0, 3)]
    client.log_batch(rid, metrics=metrics, params=[Param("model.name", "cgcnn")])
    client.set_tag(rid, runs.EPOCHS_RUN, "3")
    client.set_terminated(rid, "FINISHED")
    return client, exp, parent


def test_a_trial_row_reads_the_same_from_mlflow_as_from_the_tracker(mlflow_trial):
    from crystaltune.search import runs
    from crystaltune.search.tracking import TrialRecord

    client, exp, parent = mlflow_trial
    assert runs.latest_search(client, exp).info.run_id == parent
    (run,) = runs.trial_runs(client, exp, parent)
    from_run = TrialRow.from_run(run)
    rec = TrialRecord(run.info.run_id, run.info.run_name, status="FINISHED", last_result={"best_val_mae": 0.25})
    rec.last_result.update(test_mae=0.3, epoch=3)
    from_record = TrialRow.from_record("x_00000", rec, {"model.name": "cgcnn"}, default=True)
    fields = ("name", "status", "run_id", "best_val_mae", "test_mae", "epochs", "params", "default", "trial_id")
    assert {f: getattr(from_run, f) for f in fields} == {f: getattr(from_record, f) for f in fields}
    with pytest.raises(Exception, match="no MLflow experiment 'crystaltune-y'"):
        runs.find_experiment(client, "y", "here")


def test_a_worse_result_reads_higher_not_a_negative_lower():
    from crystaltune.fmt import lower_or_higher

    assert lower_or_higher(0.129) == "12.9% lower" and lower_or_higher(-0.129) == "12.9% higher"
    assert render.improvement_sentence(-0.05).startswith("The searched config's mean test MAE is **5.0% higher**")
