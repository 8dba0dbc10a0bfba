"""Training one trial: determinism, metrics, checkpoints, the train and predict CLIs, reference import."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REF_DIR

from crystaltune.checkpoint import load_checkpoint, read_checkpoint
from crystaltune.config import TrialConfig
from crystaltune.errors import CrystaltuneError
from crystaltune.predict import predict
from crystaltune.train import TrialDiverged, fit


def small_cfg(**over) -> TrialConfig:
    d = {
        "data": {"limit": 160},
        "model": {"hidden": 32, "head_hidden": 32, "layers": 2},
        "train": {"epochs": 3, "batch_size": 32, "num_threads": 1},
    }
    for k, v in over.items():
        d.setdefault(k, {}).update(v) if isinstance(v, dict) else d.__setitem__(k, v)
    return TrialConfig.from_dict(d)


def test_reference_checkpoint_reproduces_reference_predictions():
    header, rows, _ = predict(str(REF_DIR / "band-gap.pth.tar"), [str(REF_DIR / "sample-regression")])
    ours = {r["id"]: r["prediction"] for r in rows}
    with open(REF_DIR / "sample-regression" / "reference_band_gap_predictions.csv") as fh:
        ref = {row[0]: float(row[2]) for row in csv.reader(fh)}
    assert len(ref) == 10 and set(ours) == set(ref)
    for k, v in ref.items():
        assert abs(ours[k] - v) < 1e-3, (k, ours[k], v)


def test_reference_checkpoint_reproduces_the_reference_code_on_tied_neighbours():
    """Cubic perovskites and other high-symmetry crystals tie at the 12th neighbour: predicting with a
    reference checkpoint uses the reference code's own neighbour choice, so every crystal matches its
    output (before, Rb3BrO was 0.65 eV off and SrTiO3 0.10 eV)."""
    folder = REF_DIR / "high-symmetry"
    header, rows, _ = predict(str(REF_DIR / "band-gap.pth.tar"), [str(folder)])
    with open(folder / "reference_band_gap_predictions.csv") as fh:
        ref = {row[0]: float(row[2]) for row in csv.reader(fh)}
    ours = {r["id"]: r["prediction"] for r in rows}
    assert len(ref) == 8 and set(ours) == set(ref)
    for k, v in ref.items():
        assert abs(ours[k] - v) < 1e-3, (k, ours[k], v)


def test_fit_reports_metrics_each_epoch_and_is_deterministic(tmp_path):
    seen = []
    s1 = fit(small_cfg(), report=lambda m, c: seen.append(m))
    s2 = fit(small_cfg())
    assert [m["epoch"] for m in seen] == [1, 2, 3]
    for key in (
        "train_mae",
        "val_mae",
        "lr",
        "epoch_time_s",
        "graphs_per_s",
        "test_mae",
        "test_rmse",
        "test_r2",
        "alignment",
        "uniformity",
    ):
        assert np.isfinite(seen[-1][key]), key
    assert s1["test_mae"] == s2["test_mae"] and s1["val_mae"] == s2["val_mae"]
    assert -1 <= seen[-1]["alignment"] <= 1 and 0 <= seen[-1]["uniformity"] <= 2


def test_checkpoint_round_trip_predicts_the_same(tmp_path):
    cfg = small_cfg(output=str(tmp_path / "m.pt"), model={"global_features": ["lattice", "symmetry"]})
    summary = fit(cfg)
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.kind == "crystaltune" and loaded.targets == ["band_gap"]
    assert loaded.config.to_dict() == cfg.to_dict()
    assert loaded.metrics["test_mae"] == pytest.approx(summary["test_mae"])
    # the checkpoint alone (no training data) reproduces the test MAE
    from crystaltune.train.metrics import predict_indices, regression_metrics
    from crystaltune.train.trial_data import prepare_trial_data

    data = prepare_trial_data(loaded.config)
    p, y = predict_indices(loaded.model, data.store, data.test, data.targets, loaded.normalizer, "cpu")
    assert regression_metrics(p, y, data.targets, "test")["test_mae"] == pytest.approx(summary["test_mae"], rel=1e-5)
    assert isinstance(read_checkpoint(tmp_path / "m.pt")["model_state"], dict)  # weights_only load


def test_multi_target_training(tmp_path):
    cfg = small_cfg(data={"targets": ["band_gap", "band_gap_gga"]}, output=str(tmp_path / "mt.pt"))
    s = fit(cfg)
    assert "test_mae_band_gap" in s and "test_mae_band_gap_gga" in s
    header, rows, _ = predict(str(tmp_path / "mt.pt"), [str(REF_DIR / "sample-regression" / "1000041.cif")])
    assert header == ["id", "band_gap", "band_gap_gga", "flags", "error"] and rows[0]["id"] == "1000041"


def test_nan_loss_is_reported_as_diverged():
    cfg = small_cfg(optim={"lr": 1e12, "name": "sgd", "schedule": "none"}, loss={"name": "mse"})
    with pytest.raises(TrialDiverged, match="loss became"):
        fit(cfg)


def test_bad_checkpoints_are_refused(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"hello": 1}, tmp_path / "dict.pt")
    good = REF_DIR / "band-gap.pth.tar"
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:5000])
    ck = torch.load(good, weights_only=True, map_location="cpu")
    ck["state_dict"]["conv_to_fc.weight"] = torch.zeros(7, 5)
    torch.save(ck, tmp_path / "arch.pt")
    for name, match in (
        ("junk.pt", "not a readable checkpoint"),
        ("dict.pt", "not a crystaltune or reference"),
        ("trunc.pt", "not a readable checkpoint"),
        ("arch.pt", "do not fit the architecture"),
        ("missing.pt", "no such checkpoint"),
    ):
        with pytest.raises(CrystaltuneError, match=match):
            load_checkpoint(tmp_path / name)


def test_train_and_predict_cli(tmp_path):
    ck = tmp_path / "cli.pt"
    cfg = tmp_path / "c.yaml"
    small_cfg().to_yaml(cfg)
    out = subprocess.run(
        [sys.executable, "-m", "crystaltune.train", "--config", str(cfg), "--epochs", "2", "--output", str(ck)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("epoch ") >= 2 and "test_mae" in out.stdout and ck.exists()
    bad = tmp_path / "bad.cif"
    bad.write_text("data_x\n_cell_length_a 3\nnot a cif\n")
    csv_out = tmp_path / "p.csv"
    cifs = [str(REF_DIR / "sample-regression" / "1000041.cif"), str(bad)]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "crystaltune.predict",
            "--checkpoint",
            str(ck),
            "--input",
            *cifs,
            "--output",
            str(csv_out),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(open(csv_out)))
    assert [r["id"] for r in rows] == ["1000041", "bad"]
    assert float(rows[0]["band_gap"]) > 0 and rows[0]["error"] == ""  # the column is the target's name
    assert rows[1]["band_gap"] == "" and "could not be parsed" in rows[1]["error"]
    # units and the training domain beside the CSV; a crystal of elements never trained on is flagged
    side = json.loads((tmp_path / "p.csv.json").read_text())
    assert side["units"] == {"band_gap": "eV"} and 6 in side["domain"]["elements"]  # the HOIP set has carbon
    assert "elements never seen in training:" in rows[0]["flags"]  # 1000041 holds elements HOIP lacks


def test_domain_flags_fire_on_unseen_elements_negative_gaps_and_out_of_range_values():
    from crystaltune.domain import flags

    domain = {"elements": [6, 8], "range": {"band_gap": [1.5, 6.6]}}
    assert flags({6, 8}, {"band_gap": 3.0}, domain) == ""
    assert flags({6, 30}, {"band_gap": 3.0}, domain) == "elements never seen in training: Zn"
    assert "band_gap -0.2 < 0" in flags({6}, {"band_gap": -0.2}, domain)
    assert "band_gap -0.2 < 0" in flags({6}, {"band_gap": -0.2}, None)  # a negative gap even without a domain
    assert "outside the training range [1.5, 6.6]" in flags({6}, {"band_gap": 21.3}, domain)


def test_train_cli_bad_config_is_one_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  nam: cgcnn\n")
    out = subprocess.run(
        [sys.executable, "-m", "crystaltune.train", "--config", str(cfg)], capture_output=True, text=True
    )
    assert out.returncode == 2 and "did you mean 'name'" in out.stderr and "Traceback" not in out.stderr


def test_trial_resumed_from_its_final_checkpoint_still_reports_once(tmp_path):
    """A trial restored after its last epoch was checkpointed (the driver died before it saw the end)
    has nothing left to train; it must still give Tune one result with the metric, not none."""
    import shutil

    import ray.train

    from crystaltune.search.trainable import run_trial

    cfg = TrialConfig.from_dict(
        {
            "data": {"limit": 120},
            "model": {"hidden": 16, "head_hidden": 16, "layers": 1},
            "train": {"epochs": 2, "batch_size": 32},
        }
    )
    last = tmp_path / "last"

    def keep(metrics, checkpoint_dir):
        if checkpoint_dir and metrics["epoch"] == 2:
            shutil.copytree(checkpoint_dir, last)

    first = fit(TrialConfig.from_dict(cfg.to_dict()), report=keep, checkpoint_every_epoch=True)
    sent = []
    run_trial(
        TrialConfig.from_dict(cfg.to_dict()),
        {"cpus_per_worker": 1},
        ray.train.Checkpoint.from_directory(str(last)),
        lambda m, ck: sent.append((m, ck)),
    )
    assert len(sent) == 1
    metrics, ck = sent[0]
    assert ck is None and metrics["done"] and metrics["epoch"] == 2
    assert metrics["best_val_mae"] == pytest.approx(first["val_mae"]) and metrics["test_mae"] == pytest.approx(
        first["test_mae"]
    )


def test_training_from_the_device_store_gives_the_same_losses():
    """fit with batches from the device-resident store (forced on the CPU) matches the host path."""
    cfg = small_cfg()
    seen_host, seen_dev = [], []
    host = fit(cfg, report=lambda m, c: seen_host.append(m), device_store=False)
    dev = fit(cfg, report=lambda m, c: seen_dev.append(m), device_store=True)
    for a, b in zip(seen_host, seen_dev):
        assert a["train_mae"] == pytest.approx(b["train_mae"], rel=1e-5)
        assert a["val_mae"] == pytest.approx(b["val_mae"], rel=1e-5)
    assert host["test_mae"] == pytest.approx(dev["test_mae"], rel=1e-5)


def test_ensemble_prediction_is_the_members_mean_with_their_std(tmp_path):
    """An ensemble checkpoint of two identical members has std 0 and the member's prediction; of two
    different members, the mean and (population) std of their own predictions."""
    from crystaltune.checkpoint import ENSEMBLE_FORMAT, read_checkpoint

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    fit(small_cfg(output=str(a)))
    fit(small_cfg(output=str(b), train={"seed": 1}))
    cif = [str(REF_DIR / "sample-regression")]
    single = {p: {r["id"]: r["band_gap"] for r in predict(str(p), cif)[1]} for p in (a, b)}
    for members, name in (([a, a], "same.pt"), ([a, b], "pair.pt")):
        torch.save(
            {"format": ENSEMBLE_FORMAT, "version": 1, "members": [read_checkpoint(m) for m in members]}, tmp_path / name
        )
        header, rows, _ = predict(str(tmp_path / name), cif)
        assert header == ["id", "band_gap", "band_gap_std", "flags", "error"]
        for r in rows:
            values = [single[m][r["id"]] for m in members]
            assert r["band_gap"] == pytest.approx(np.mean(values), abs=1e-5)
            assert r["band_gap_std"] == pytest.approx(np.std(values), abs=1e-5)
            if members[0] == members[1]:
                assert r["band_gap_std"] == 0.0


class _Crash(Exception):
    """Stands in for the worker dying after an epoch's checkpoint was written."""


def test_a_trial_retried_mid_run_ends_like_one_that_ran_straight_through(tmp_path):
    """Ray Train retries a trial from its last epoch checkpoint: the early-stopping patience already
    used (bad_epochs), the schedule and the dropout RNG carry over, so it draws the same batches, reports
    the same epochs and stops at the same one. Here val is best at epoch 3 and worse at 4-6, so
    patience 3 ends the run after epoch 6; a retry after epoch 5 that restarted the patience would train
    on to epoch 10 (val improves at 7). A retry from the checkpoint of the stopping epoch trains nothing."""
    import shutil

    from crystaltune.train.loop import load_epoch_checkpoint

    cfg = small_cfg(train={"epochs": 10, "early_stopping": 3}, optim={"lr": 0.03}, model={"dropout": 0.1})
    straight, kept = [], {}

    def keep(metrics, checkpoint_dir):
        straight.append(metrics)
        shutil.copytree(checkpoint_dir, tmp_path / str(metrics["epoch"]))
        kept[metrics["epoch"]] = load_epoch_checkpoint(tmp_path / str(metrics["epoch"]))

    whole = fit(cfg, report=keep, checkpoint_every_epoch=True)
    assert whole["best_epoch"] == 3 and whole["epochs_run"] == 6  # patience ended it
    assert kept[5]["bad_epochs"] == 2 and kept[5]["scaler"] == {}  # disabled on the CPU

    def crash_after_5(metrics, checkpoint_dir):
        if metrics["epoch"] == 5:
            shutil.copytree(checkpoint_dir, tmp_path / "crashed")
            raise _Crash

    with pytest.raises(_Crash):
        fit(cfg, report=crash_after_5, checkpoint_every_epoch=True)
    retried = []
    again = fit(
        cfg,
        report=lambda m, c: retried.append(m),
        resume=load_epoch_checkpoint(tmp_path / "crashed"),
        checkpoint_every_epoch=True,
    )
    assert [m["epoch"] for m in retried] == [6] and retried[0]["done"]
    for a, b in zip(straight[5:], retried):
        for key in ("train_mae", "val_mae", "lr", "best_val_mae"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    assert again["best_epoch"] == whole["best_epoch"] and again["epochs_run"] == whole["epochs_run"]
    assert again["test_mae"] == pytest.approx(whole["test_mae"], abs=1e-6)
    # resumed from the stopping epoch's checkpoint (the driver died before it saw the end): no more epochs
    after_end = []
    last = fit(cfg, report=lambda m, c: after_end.append(m), resume=kept[6])
    assert after_end == [] and last["epochs_run"] == 6 and last["best_epoch"] == 3


def test_the_grad_scaler_state_is_saved_and_restored():
    """A retried fp16 trial keeps its loss scale instead of starting again from 2**16 (and skipping
    steps until it backs off to the scale it had found)."""
    from crystaltune.train.loop import setup

    run, state = setup(small_cfg(), None, None)
    state.scaler = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=7)
    saved = state.state_dict(run.model)
    _, fresh = setup(small_cfg(), None, None)
    fresh.scaler = torch.amp.GradScaler("cpu")
    fresh.load_state_dict(run.model, saved)
    assert fresh.scaler.get_scale() == 512.0 and fresh.scaler.get_growth_interval() == 7


@pytest.mark.parametrize("averaging", ["ema", "swa"])
def test_weight_averaging_is_evaluated_saved_and_restored(tmp_path, averaging):
    """With train.averaging the val and test metrics are those of the averaged weights (the checkpoint
    holds them and reproduces the reported test MAE), and a trial retried mid-run continues the
    average: it ends as one that ran straight through."""
    from crystaltune.checkpoint import load_checkpoint
    from crystaltune.train.loop import load_epoch_checkpoint
    from crystaltune.train.metrics import predict_indices, regression_metrics
    from crystaltune.train.trial_data import prepare_trial_data

    over = {"train": {"epochs": 6, "averaging": averaging, "ema_decay": 0.9, "swa_start": 0.5}}
    cfg = small_cfg(**over, output=str(tmp_path / "best.pt"))
    kept, straight = {}, []

    def keep(m, ck):
        straight.append(m)
        kept[m["epoch"]] = load_epoch_checkpoint(ck)

    whole = fit(cfg, report=keep, checkpoint_every_epoch=True)
    plain = []
    fit(small_cfg(train={"epochs": 6}), report=lambda m, c: plain.append(m["val_mae"]))
    assert straight[-1]["val_mae"] != pytest.approx(plain[-1], abs=1e-6)  # the average, not the last weights
    # EMA: every step (128 training crystals / batch 32 = 4 a epoch); SWA: epochs 4, 5, 6
    assert int(kept[6]["averaged"]["n_averaged"]) == (24 if averaging == "ema" else 3)
    loaded = load_checkpoint(tmp_path / "best.pt")
    data = prepare_trial_data(loaded.config)
    p, y = predict_indices(loaded.model, data.store, data.test, data.targets, loaded.normalizer, "cpu")
    assert regression_metrics(p, y, data.targets, "test")["test_mae"] == pytest.approx(whole["test_mae"], rel=1e-5)
    retried = []
    again = fit(cfg, report=lambda m, c: retried.append(m), resume=kept[4])
    assert [m["epoch"] for m in retried] == [5, 6]
    for a, b in zip(straight[4:], retried):
        assert a["val_mae"] == pytest.approx(b["val_mae"], abs=1e-6)
    assert again["test_mae"] == pytest.approx(whole["test_mae"], abs=1e-6)
