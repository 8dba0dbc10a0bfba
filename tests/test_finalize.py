"""A search that ends in its final model: the top configurations compared by cross-validation on
train + val (never test), the chosen one's seed models registered as one ensemble beside the default
retrained the same way, and the report reading those runs instead of retraining."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_report

from crystaltune.search.space import builtin_spaces_dir


@pytest.fixture(scope="module")
def finalized(tmp_path_factory):
    work = tmp_path_factory.mktemp("final")
    space = (builtin_spaces_dir() / "smoke.yaml").read_text().replace("name: smoke", "name: smoke_final")
    (work / "space.yaml").write_text(space + "finalize: {top_k: 2, seeds: [0, 1], cv_folds: 2}\n")
    out = subprocess.run(
        [sys.executable, "-m", "crystaltune.search", "space.yaml", "--num-samples", "3", "--json"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout[out.stdout.index("\n{") :])
    return work, out.stdout, summary


def _retrains(work: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("crystaltune-smoke_final")
    runs = client.search_runs([exp.experiment_id], "tags.`crystaltune.kind` = 'retrain'", max_results=100)
    return client, runs


def _reference_and_readme(work: Path, name: str) -> Path:
    """A tiny reference recipe as WORK/ref.yaml (2 epochs on the search's 240 crystals, its split) and a
    README with the search's empty results section; the README's path."""
    ref = {
        "data": {"dataset": "perovskites", "targets": ["band_gap"], "split_seed": 0, "limit": 240},
        "model": {"name": "cgcnn", "hidden": 16, "head_hidden": 16, "layers": 1},
        "optim": {"name": "sgd", "lr": 0.01},
        "train": {"epochs": 2, "batch_size": 32},
    }
    (work / "ref.yaml").write_text(yaml.safe_dump(ref))
    readme = work / "README.md"
    readme.write_text(f"<!-- crystaltune:results-{name} -->\n<!-- /crystaltune:results-{name} -->\n")
    return readme


def test_the_choice_is_cross_validated_on_train_and_val_only(finalized):
    work, stdout, summary = finalized
    _, runs = _retrains(work)
    cv = [r for r in runs if r.data.tags["crystaltune.role"] == "cv"]
    trials = {r.data.tags["crystaltune.trial"] for r in cv}
    assert len(trials) == 2 and sorted(r.data.tags["crystaltune.fold"] for r in cv) == ["val0", "val0", "val1", "val1"]
    for r in cv:  # validation folds of the search's train + val; the test split is the search's own
        assert r.data.params["data.val_folds"] == "2" and r.data.params["data.folds"] == "None"
    mean_val = {
        t: sum(r.data.metrics["best_val_mae"] for r in cv if r.data.tags["crystaltune.trial"] == t) / 2 for t in trials
    }
    assert summary["final_trial"] == min(mean_val, key=mean_val.get)
    assert summary["final_chosen_by"] == "2-fold cross-validation on train + val"
    assert f"final model: {summary['final_trial']} (chosen by 2-fold cross-validation" in stdout
    assert "well-trained default retrained the same way" in stdout
    if len(os.sched_getaffinity(0)) > 1:  # the folds train side by side, one process per core
        assert "training 4 replicates, 2 at a time (1 thread(s) each)" in stdout, stdout[-3000:]


def test_the_registered_model_is_the_chosen_configurations_seed_ensemble(finalized):
    import mlflow

    from crystaltune.checkpoint import ENSEMBLE_FORMAT, read_checkpoint
    from crystaltune.config import TrialConfig
    from crystaltune.retraining import config_digest

    work, _, summary = finalized
    client, runs = _retrains(work)
    final = [r for r in runs if r.data.tags["crystaltune.role"] == "candidate"]
    base = [r for r in runs if r.data.tags["crystaltune.role"] == "baseline"]
    assert (
        sorted(r.data.tags["crystaltune.seed"] for r in final)
        == ["0", "1"]
        == sorted(r.data.tags["crystaltune.seed"] for r in base)
    )
    assert {r.data.tags["crystaltune.trial"] for r in final} == {summary["final_trial"]}
    assert sorted(summary["final_test_mae"]) == sorted(r.data.metrics["test_mae"] for r in final)
    version = client.get_model_version_by_alias("crystaltune-smoke_final", "best")
    assert summary["final_model_uri"] == "models:/crystaltune-smoke_final@best"
    assert version.tags["kind"] == "final ensemble" and version.tags["trial"] == summary["final_trial"]
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    folder = Path(mlflow.artifacts.download_artifacts(summary["final_model_uri"], dst_path=str(work / "dl")))
    (path,) = folder.glob("artifacts/*.pt")
    ck = read_checkpoint(path)
    assert ck["format"] == ENSEMBLE_FORMAT and len(ck["members"]) == 2
    digests = {config_digest(TrialConfig.from_dict(m["config"])) for m in ck["members"]}
    assert digests == {final[0].data.tags["crystaltune.config_digest"]}  # the chosen config, seeds apart
    import pandas as pd

    cif = (Path(__file__).parent / "data/reference_cgcnn/sample-regression/1000041.cif").read_text()
    inputs = {c.name: c.required for c in mlflow.models.get_model_info(summary["final_model_uri"]).signature.inputs}
    assert inputs == {"id": False, "structure": True}  # a signature, with id optional, as the single models have
    out = mlflow.pyfunc.load_model(summary["final_model_uri"]).predict(pd.DataFrame({"structure": [cif]}))
    assert out.iloc[0]["band_gap"] == out.iloc[0]["band_gap"] and out.iloc[0]["band_gap_std"] >= 0
    parent = client.get_run(final[0].data.tags["crystaltune.search_run"])
    assert parent.data.metrics["final.ensemble_test_mae"] == pytest.approx(summary["final_ensemble_test_mae"])
    assert parent.data.tags["crystaltune.final_trial"] == summary["final_trial"]
    assert "final model:" in parent.data.tags["mlflow.note.content"]


def test_the_report_reads_the_final_runs_instead_of_retraining(finalized):
    work, _, summary = finalized
    out, text = run_report(work, "space.yaml", "report", timeout=300)
    assert "## Retrained per seed" in text and f"candidate {summary['final_trial']} (chosen)" in text
    assert "baseline (the search's default (final))" in text and "seed 0: epoch" not in out.stdout


def test_the_reference_trains_over_the_final_seeds_beside_the_final_model_in_the_readme(finalized):
    """``report --reference`` alone on a finalized search: only the reference is trained, over the final
    model's seeds on its split; the README section states the final model against the default."""
    work, _, summary = finalized
    readme = _reference_and_readme(work, "smoke_final")
    args = ("--reference", "ref.yaml", "--readme", str(readme), "--target-mae", "0.01")
    out, _ = run_report(work, "space.yaml", "report-ref", *args)
    _, runs = _retrains(work)
    roles = [r.data.tags["crystaltune.role"] for r in runs]
    assert (roles.count("candidate"), roles.count("baseline")) == (2, 2) and "candidate seed 0: epoch" not in out.stdout
    refs = [r for r in runs if r.data.tags["crystaltune.role"] == "reference"]
    assert sorted(r.data.tags["crystaltune.seed"] for r in refs) == ["0", "1"]
    assert all(r.data.params["data.limit"] == "240" and r.data.params["optim.name"] == "sgd" for r in refs)
    section = readme.read_text()
    trial = summary["final_trial"]
    assert f"**Final model** (the search's final step): trial {trial}, chosen by 2-fold cross-validation" in section
    assert f"test MAE **{summary['final_ensemble_test_mae']:.4f}**" in section
    assert f"{summary['final_default_ensemble_test_mae']:.4f} for the well-trained default" in section
    assert f"searched, trial {trial} (the final model)" in section and "| reference recipe: `cgcnn` 16/16/1" in section
    assert f"The final model's test MAE {summary['final_ensemble_test_mae']:.4f} against the target" in section


def test_a_retraining_that_raises_is_closed_failed_with_its_error_not_left_running(tmp_path):
    """A retraining that cannot train (here its data file is gone) ends its MLflow run FAILED with the
    error as a tag, so neither the UI nor a later report sees a run still RUNNING."""
    from mlflow.tracking import MlflowClient

    from crystaltune.config import TrialConfig
    from crystaltune.errors import CrystaltuneError
    from crystaltune.retrain_jobs import Job, train_job

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("retrain")
    gone = tmp_path / "gone.jsonl.gz"
    cfg = TrialConfig.from_dict({"data": {"file": str(gone), "targets": ["band_gap"]}, "train": {"epochs": 1}})
    with pytest.raises(CrystaltuneError, match="gone.jsonl.gz"):
        train_job(client, exp, Job(cfg, "final seed 0", "final seed 0", {}), False, print)
    (run,) = client.search_runs([exp])
    assert run.info.status == "FAILED"
    assert "gone.jsonl.gz" in run.data.tags["crystaltune.error"]


@pytest.mark.slow
def test_sigterm_in_the_final_step_stops_its_side_by_side_trainings_and_closes_every_run(tmp_path):
    """SIGTERM to the driver alone (a scheduler's stop) while the final step trains replicates in
    worker processes: the workers are interrupted too, the command ends with 130 well before those
    trainings would, and no run (parent, trial or retraining) is left RUNNING."""
    import signal
    import time

    from mlflow.tracking import MlflowClient

    space = (builtin_spaces_dir() / "smoke.yaml").read_text().replace("name: smoke", "name: smoke_stop")
    (tmp_path / "space.yaml").write_text(space + "finalize: {top_k: 2, seeds: [0, 1], cv_folds: 2}\n")
    cmd = [sys.executable, "-m", "crystaltune.search", "space.yaml", "--num-samples", "2", "--max-epochs", "60"]
    log = tmp_path / "search.log"
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and "test MAE" not in log.read_text():
        time.sleep(0.5)
    assert proc.poll() is None, log.read_text()[-3000:]  # the final step's first retraining has finished
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    rc = proc.wait(timeout=120)
    text = log.read_text()
    assert rc == 130 and time.time() - t0 < 60, text[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("crystaltune-smoke_stop")
    every = client.search_runs([exp.experiment_id], max_results=1000)
    assert [r.info.status for r in every if r.info.status == "RUNNING"] == []
    (parent,) = [r for r in every if r.data.tags.get("crystaltune.kind") == "search"]
    assert parent.info.status == "KILLED" and "final step" in parent.data.tags["crystaltune.final_error"]
    killed = [r for r in every if r.data.tags.get("crystaltune.kind") == "retrain" and r.info.status == "KILLED"]
    assert killed, [(r.info.run_name, r.info.status) for r in every]  # the side-by-side ones were stopped
    assert "Traceback" not in text and "--resume runs the final step again" in text
    again = subprocess.run(cmd + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "already in MLflow, not retrained" in again.stdout + again.stderr  # what finished is kept
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags.get("crystaltune.final_trial")
    assert "crystaltune.final_error" not in parent.data.tags


def test_pick_keeps_the_default_unless_the_best_is_lower_by_more_than_one_standard_error():
    from crystaltune.search.finalize import pick

    clear = {"t001": [0.30, 0.31, 0.29], "t004": [0.20, 0.22, 0.21]}
    assert pick(clear, "t001") == ("t004", "")
    noisy = {"t001": [0.1053, 0.1050, 0.1056], "t019": [0.1100, 0.1050, 0.1000]}  # the hoip atomization CV
    trial, why = pick(noisy, "t001")
    assert trial == "t001" and "t019's lower mean is within one standard error (0.0029)" in why
    assert pick(noisy, None) == ("t019", "")  # the default not among the candidates: the lowest mean
    assert pick({"t001": [0.2], "t002": [0.3]}, "t001") == ("t001", "")
    assert pick({"t001": [0.3], "t002": [0.2]}, "t001") == ("t002", "")  # one value: no error to allow


@pytest.mark.slow  # a whole search and its final step (95 s): kept out of the default run's 18 min
def test_a_search_whose_only_candidate_is_the_default_registers_the_default_trained_once(tmp_path):
    """The default wins the choice: its seed models, trained once as the well-trained default, are the
    registered final model, and the gain is zero rather than a duplicate training's noise."""
    from mlflow.tracking import MlflowClient

    space = (builtin_spaces_dir() / "smoke.yaml").read_text().replace("name: smoke", "name: smoke_one")
    (tmp_path / "space.yaml").write_text(space + "finalize: {top_k: 2, seeds: [0, 1], cv_folds: 2}\n")
    cmd = [sys.executable, "-m", "crystaltune.search", "space.yaml", "--num-samples", "1", "--json"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout[out.stdout.index("\n{") :])
    assert summary["final_trial"] == "t001" and summary["default_trial"].startswith("t001 ")
    assert summary["final_test_mae"] == summary["final_default_test_mae"] and summary["final_gain"] == 0.0
    assert "the final model is 0.0% lower" in out.stdout
    assert summary["final_chosen_by"] == "mean val MAE over 2 seeds"  # one candidate: no cross-validation ran
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("crystaltune-smoke_one")
    retrains = client.search_runs([exp.experiment_id], "tags.`crystaltune.kind` = 'retrain'")
    assert sorted(r.data.tags["crystaltune.role"] for r in retrains) == ["baseline", "baseline"]
    version = client.get_model_version_by_alias("crystaltune-smoke_one", "best")
    assert version.tags["trial"] == "t001"
    readme = _reference_and_readme(tmp_path, "smoke_one")
    _, text = run_report(tmp_path, "space.yaml", "report", "--reference", "ref.yaml", "--readme", str(readme))
    assert "The searched configuration is the final step's trial t001" in text
    section = readme.read_text()
    assert "trial t001, chosen by mean val MAE over the seeds: the well-trained default itself" in section
    assert "**0.0% lower**" in section and "reference recipe: `cgcnn` 16/16/1" in section
