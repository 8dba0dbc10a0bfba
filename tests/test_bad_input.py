"""Every kind of bad dataset input: one clear reason naming the record, good records kept."""

from __future__ import annotations

import copy
import gzip
import json
import subprocess
import sys

import pytest
from conftest import random_cell, record, rocksalt, write_jsonl

from crystaltune.data import load_dataset
from crystaltune.errors import CrystaltuneError


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "no such file"),
        (b"", "empty"),
        (b"this is not json\n", "not JSON"),
        (b"[1, 2,", "not valid JSON"),
        (b'"just a string"', "not JSON"),
        (b'{"a": 1, "b": 2}', "top-level JSON is a dict"),
    ],
)
def test_file_level_errors(tmp_path, content, match):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CrystaltuneError, match=match):
        load_dataset(path)


def test_truncated_gzip(tmp_path, small_records):
    data = gzip.compress("\n".join(json.dumps(r) for r in small_records).encode())
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CrystaltuneError, match="corrupt or truncated gzip"):
        load_dataset(path)


def _site_dict(s):
    return s.as_dict()


def bad_records():
    """(id, record-or-line, expected reason fragment) for each kind of bad record."""
    partial = rocksalt().as_dict()
    partial["sites"][0]["species"] = [{"element": "Na", "occu": 0.5}, {"element": "K", "occu": 0.5}]
    dummy = rocksalt().as_dict()
    dummy["sites"][1]["species"] = [{"element": "X", "occu": 1.0}]
    overlap = rocksalt().as_dict()
    overlap["sites"][1]["abc"] = [0.01, 0.0, 0.0]
    singular = rocksalt().as_dict()
    singular["lattice"]["matrix"] = [[1, 0, 0], [2, 0, 0], [0, 0, 1]]
    nan_coords = rocksalt().as_dict()
    nan_coords["sites"][0]["abc"] = [float("nan"), 0, 0]
    return [
        ("nostruct", {"id": "nostruct", "band_gap": 1.0}, "no structure"),
        ("notarget", record("notarget", random_cell(1)), "target 'band_gap' is missing"),
        ("nantarget", record("nantarget", random_cell(2), band_gap=float("nan")), "not finite"),
        ("inftarget", record("inftarget", random_cell(3), band_gap=float("inf")), "not finite"),
        ("strtarget", record("strtarget", random_cell(4), band_gap="big"), "not a number"),
        ("nulltarget", record("nulltarget", random_cell(5), band_gap=None), "missing (null)"),
        ("partial", record("partial", partial, band_gap=1.0), "partial occupancy"),
        ("dummy", record("dummy", dummy, band_gap=1.0), "dummy species"),
        ("overlap", record("overlap", overlap, band_gap=1.0), "overlapping atoms"),
        ("singular", record("singular", singular, band_gap=1.0), "singular lattice"),
        ("nancoords", record("nancoords", nan_coords, band_gap=1.0), "NaN"),
        ("garbage", record("garbage", {"lattice": "x"}, band_gap=1.0), "could not be parsed"),
        ("c00", record("c00", random_cell(9), band_gap=9.0), "duplicate id"),
        ("line", "{not json", "not valid JSON"),
        ("line", "[1, 2]", "not an object"),
    ]


def test_each_bad_record_is_skipped_with_a_reason_and_good_ones_kept(tmp_path, small_records):
    bad = bad_records()
    path = write_jsonl(tmp_path / "mixed.jsonl", small_records + [b[1] for b in bad])
    ds = load_dataset(path)
    assert sorted(ds.store.ids) == sorted(r["id"] for r in small_records)
    reasons = [s["reason"] for s in ds.skipped]
    assert len(reasons) == len(bad)
    for rid, _, fragment in bad:
        hits = [r for r in reasons if fragment in r and (rid == "line" or rid in r)]
        assert hits, f"no reason containing {fragment!r} for {rid}: {reasons}"
    # reasons name the record by id or line number, one line each
    assert all("\n" not in r and ("line" in r or any(b[0] in r for b in bad)) for r in reasons)


def test_strict_turns_skips_into_failure(tmp_path, small_records):
    path = write_jsonl(tmp_path / "s.jsonl", small_records + [record("x", random_cell(1))])
    with pytest.raises(CrystaltuneError, match="strict"):
        load_dataset(path, strict=True)


def test_unsupported_elements_for_node_featurizer(tmp_path, small_records):
    """Crystals with elements a node featurizer cannot describe leave that trial's split, with the
    reason; other featurizers keep them."""
    from crystaltune.config import TrialConfig
    from crystaltune.train.trial_data import prepare_trial_data

    recs = small_records + [record("xenon", rocksalt(species=("Xe", "Xe")), band_gap=0.0)]
    path = write_jsonl(tmp_path / "xe.jsonl", recs)
    assert len(load_dataset(path)) == 13
    cfg = {"data": {"dataset": str(path), "split": [0.5, 0.25, 0.25]}}
    data = prepare_trial_data(TrialConfig.from_dict({**cfg, "model": {"node_featurizer": "extended"}}))
    assert [d["id"] for d in data.dropped] == ["xenon"]
    assert "element(s) Xe have no features in node featurizer 'extended'" in data.dropped[0]["reason"]
    assert sum(map(len, (data.train, data.val, data.test))) == 12
    full = prepare_trial_data(TrialConfig.from_dict({**cfg, "model": {"node_featurizer": "cgcnn"}}))
    assert not full.dropped and sum(map(len, (full.train, full.val, full.test))) == 13


def test_cli_user_errors_have_no_traceback(tmp_path, small_records):
    path = write_jsonl(tmp_path / "bad.jsonl", ["nope"])
    for args in (["info", str(tmp_path / "missing.json")], ["info", "perovskitez"], ["info", str(path)]):
        out = subprocess.run([sys.executable, "-m", "crystaltune.data", *args], capture_output=True, text=True)
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr and out.stderr.startswith("error: ")
        assert len(out.stderr.strip().splitlines()) == 1


def test_one_bad_crystal_does_not_stop_a_large_run(tmp_path):
    good = [record(f"g{i}", random_cell(i % 7, n=3), band_gap=1.0) for i in range(300)]
    broken = copy.deepcopy(good[5])
    broken["id"] = "broken"
    broken["structure"]["sites"][0]["abc"] = ["a", "b", "c"]
    ds = load_dataset(write_jsonl(tmp_path / "big.jsonl", good + [broken]))  # parallel path (>= 200)
    assert len(ds) == 300 and [s["id"] for s in ds.skipped] == ["broken"]


@pytest.mark.parametrize(
    "model,key,value,match",
    [
        ("csgann", "params", {"heads": 0}, r"model.params.heads: must be in \[1, model.hidden = 64\], got 0"),
        ("csgann", "params", {"heads": 65}, r"model.params.heads: must be in \[1, model.hidden"),
        ("csgann", "params", {"heads": "four"}, r"model.params.heads: expected an integer, got 'four'"),
        ("csgann", "params", {"attention": "dot"}, r"model.params.attention: must be one of transformer, gatv2"),
        ("csginn", "params", {"mlp_layers": 0}, r"model.params.mlp_layers: must be in \[1, 8\]"),
        ("flowgnn", "params", {"s_max": -1.0}, r"model.params.s_max: must be in \(0, 20\]"),
        ("cgcnn", "params", {"heads": 2}, r"model.params: unknown key 'heads'"),
        ("cgcnn", "edge_params", {"step": 1e-9}, r"model.edge_params.step must be in \[0.001, 10.0\]"),
        ("cgcnn", "edge_params", {"step": 0.001}, r"gives more than 1024 Gaussians"),
        ("cgcnn", "edge_params", {"step": "x"}, r"model.edge_params.step: expected a number"),
        ("cgcnn", "edge_params", {"num_rbf": 8}, r"unknown parameter 'num_rbf' for the gaussian featurizer"),
        ("cgcnn", "hidden", 10**9, r"model.hidden must be in \[1, 4096\]"),
    ],
)
def test_model_values_are_checked_when_the_config_is_validated(model, key, value, match):
    """Typed model parameters, featurizer parameters and sizes fail validation (before Ray starts),
    with the key in the message, not inside a trial."""
    from crystaltune.config import TrialConfig

    with pytest.raises(CrystaltuneError, match=match):
        TrialConfig.from_dict({"model": {"name": model, key: value}})


def test_a_space_fixing_a_bad_model_parameter_fails_before_any_trial():
    from crystaltune.search.space import parse_space

    raw = {
        "fixed": {"model.name": "csgann", "model.params.heads": 0},
        "search": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
    }
    with pytest.raises(CrystaltuneError, match="model.params.heads: must be in"):
        parse_space(raw, "heads.yaml")


@pytest.mark.parametrize(
    "section,key,value,match",
    [
        ("model", "norm", "btach", r"model.norm: unknown norm 'btach'; did you mean 'batch'\?"),
        ("optim", "name", "adamx", r"optim.name: unknown optimizer 'adamx'"),
        ("optim", "schedule", "cos", r"optim.schedule: unknown schedule 'cos'; did you mean 'cosine'\?"),
    ],
)
def test_names_validate_against_the_registries_that_build_them(section, key, value, match):
    """One list per choice: validation reads the registry construction uses, and an unknown norm is an
    error, never a silent Identity."""
    from crystaltune.config import ModelConfig, TrialConfig
    from crystaltune.models.base import make_norm

    with pytest.raises(CrystaltuneError, match=match):
        TrialConfig.from_dict({section: {key: value}})
    with pytest.raises(CrystaltuneError, match="unknown norm"):
        make_norm("btach", 8)
    assert ModelConfig().norm == "batch"
