"""Dataset readers, the dataset registry, target selection, splits and the `data info` CLI."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REF_DIR, random_cell, record, rocksalt, write_jsonl

from crystaltune.data import load_dataset, read_source
from crystaltune.data.info import dataset_info
from crystaltune.errors import CrystaltuneError


def test_jsonl_plain_and_gzip_and_json_list_agree(tmp_path, small_records):
    a = load_dataset(write_jsonl(tmp_path / "a.jsonl", small_records))
    b = load_dataset(write_jsonl(tmp_path / "b.jsonl.gz", small_records, gz=True))
    (tmp_path / "c.json").write_text(json.dumps(small_records))
    c = load_dataset(tmp_path / "c.json")
    for ds in (a, b, c):
        assert len(ds) == 12 and ds.targets == ["band_gap"] and not ds.skipped
    np.testing.assert_array_equal(a.store.arrays["dist"], c.store.arrays["dist"])


def test_material_id_and_crystal_structure_keys(tmp_path):
    recs = [
        {"material_id": f"m{i}", "band_gap": 1.0 + i, "crystal_structure": random_cell(i).as_dict()} for i in range(3)
    ]
    (tmp_path / "inorganic_SUNMAT_10k.json").write_text(json.dumps(recs))
    ds = load_dataset("sunmat", data=tmp_path / "inorganic_SUNMAT_10k.json")
    assert sorted(ds.store.ids) == ["m0", "m1", "m2"] and ds.name == "sunmat"


def test_snumat_schema_list_and_folder(tmp_path, monkeypatch):
    recs = [
        {
            "SNUMAT_id": 100 + i,
            "Band_gap_HSE": 2.0 + i,
            "Band_gap_GGA": 1.0 + i,
            "Structure_rlx": random_cell(i).as_dict(),
        }
        for i in range(3)
    ]
    (tmp_path / "snumat.json").write_text(json.dumps(recs))
    monkeypatch.setenv("CRYSTALTUNE_DATA_DIR", str(tmp_path))
    ds = load_dataset("sunmat")
    assert len(ds) == 3 and ds.targets == ["band_gap"]
    assert sorted(ds.store.props["band_gap"]) == [2.0, 3.0, 4.0]
    folder = tmp_path / "per_material"
    folder.mkdir()
    for r in recs:
        (folder / f"{r['SNUMAT_id']}.json").write_text(json.dumps(r))
    ds2 = load_dataset(folder, ["band_gap", "band_gap_gga"])
    assert len(ds2) == 3 and ds2.targets == ["band_gap", "band_gap_gga"]


def test_snumat_structure_as_cif_text(tmp_path):
    cif = (REF_DIR / "sample-regression" / "1000041.cif").read_text()
    (tmp_path / "s.json").write_text(json.dumps([{"SNUMAT_id": 1, "Band_gap_HSE": 1.5, "Structure_rlx": cif}]))
    assert len(load_dataset(tmp_path / "s.json")) == 1


def test_cif_folder_with_id_prop():
    ds = load_dataset(REF_DIR / "sample-regression")
    assert len(ds) == 10 and ds.targets == ["target"]
    assert dict(zip(ds.store.ids, ds.store.props["target"]))["9012304"] == 10.0


def test_sunmat_missing_says_where_to_put_it(monkeypatch, tmp_path):
    monkeypatch.setenv("CRYSTALTUNE_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CrystaltuneError) as e:
        load_dataset("sunmat")
    msg = str(e.value)
    assert (
        "inorganic_SUNMAT_10k.json" in msg and "CRYSTALTUNE_DATA_DIR" in msg and "--data" in msg and "JSON lines" in msg
    )


def test_unknown_dataset_name_suggests_and_names_cannot_escape(tmp_path):
    with pytest.raises(CrystaltuneError, match="did you mean 'perovskites'"):
        load_dataset("perovskite")
    with pytest.raises(CrystaltuneError, match="no such file"):
        load_dataset("../../etc/passwd_nonexistent")


def test_multi_target_keeps_crystals_with_any_target(tmp_path):
    recs = [
        record("a", rocksalt(), band_gap=1.0, e_form=-1.0),
        record("b", random_cell(1), band_gap=2.0),
        record("c", random_cell(2), e_form=0.5),
        record("d", random_cell(3)),
    ]
    ds = load_dataset(write_jsonl(tmp_path / "m.jsonl", recs), ["band_gap", "e_form"])
    assert sorted(ds.store.ids) == ["a", "b", "c"]
    assert [s["id"] for s in ds.skipped] == ["d"]
    b = ds.store.batch(np.arange(3), ds.targets)
    assert np.isnan(b.y.numpy()).sum() == 2


def test_split_is_seeded_stored_and_reused(tmp_path, small_records):
    ds = load_dataset(write_jsonl(tmp_path / "s.jsonl", small_records))
    s1, s2, s3 = ds.split(0), ds.split(0), ds.split(1)
    assert s1.ids == s2.ids and s1.ids != s3.ids
    assert sorted(s1.ids["train"] + s1.ids["val"] + s1.ids["test"]) == sorted(ds.store.ids)
    assert len(s1.train) == 10 and len(s1.val) == 1 and len(s1.test) == 1


def test_validation_folds_partition_train_and_val_and_never_touch_test(tmp_path, small_records):
    """data.val_folds (the search's final choice among its top configs): the test set stays the plain
    split's, and the k validation folds are disjoint and together are the plain train + val."""
    ds = load_dataset(write_jsonl(tmp_path / "s.jsonl", small_records))
    plain = ds.split(0)
    folds = [ds.split(0, val_folds=3, fold=f) for f in range(3)]
    assert all(f.ids["test"] == plain.ids["test"] for f in folds)
    vals = [set(f.ids["val"]) for f in folds]
    assert sum(map(len, vals)) == len(set().union(*vals)) == len(plain.ids["train"]) + len(plain.ids["val"])
    assert set().union(*vals) == set(plain.ids["train"]) | set(plain.ids["val"])
    for f in folds:
        assert set(f.ids["train"]).isdisjoint(f.ids["val"]) and not set(f.ids["train"]) & set(plain.ids["test"])


def test_shipped_datasets_load_with_expected_sizes():
    ds = load_dataset("perovskites")
    info = dataset_info(ds)
    assert info["crystals"] == 1346 and info["skipped"] == []
    assert info["atoms_per_crystal"]["max"] == 21 and len(info["elements"]) == 11
    assert abs(info["targets"]["band_gap"]["median"] - 3.69) < 0.01


def test_data_info_cli_json():
    out = subprocess.run(
        [sys.executable, "-m", "crystaltune.data", "info", "perovskites", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    info = json.loads(out.stdout)
    assert info["crystals"] == 1346 and info["skipped"] == []


def test_perov5_cache_loads_fast():
    import time

    load_dataset("perov5")  # build (or reuse) the cache
    t0 = time.perf_counter()
    ds = load_dataset("perov5")
    assert len(ds) == 7572
    assert time.perf_counter() - t0 < 2.0


def test_reader_keeps_raw_record_order_and_line_numbers(tmp_path, small_records):
    raw = read_source(write_jsonl(tmp_path / "o.jsonl", small_records))
    assert [r["id"] for r in raw.records] == [r["id"] for r in small_records]
    assert [r["line"] for r in raw.records] == list(range(1, 13))


def test_gzip_json_list(tmp_path, small_records):
    p = tmp_path / "l.json.gz"
    p.write_bytes(gzip.compress(json.dumps(small_records).encode()))
    assert len(load_dataset(p)) == 12


def test_cross_validation_folds_are_disjoint_and_cover_the_set(small_records, tmp_path):
    """k-fold splits: the test folds partition the set; each fold's train/val/test are disjoint."""
    path = write_jsonl(tmp_path / "d.jsonl", small_records)
    ds = load_dataset(path, "band_gap")
    k = 5
    tests = []
    for fold in range(k):
        s = ds.split(seed=3, folds=k, fold=fold)
        parts = [set(ds.store.ids[i]) for i in (s.train, s.val, s.test)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert set().union(*parts) == set(ds.store.ids)
        assert len(parts[1]) >= 1 and len(parts[0]) > len(parts[1])
        tests.append(parts[2])
    assert set().union(*tests) == set(ds.store.ids) and sum(map(len, tests)) == len(ds)
    assert ds.split(seed=3, folds=k, fold=0).ids == ds.split(seed=3, folds=k, fold=0, cache=False).ids


def test_a_number_too_long_to_convert_skips_its_record_with_the_reason(tmp_path, small_records):
    rec = json.dumps(small_records[0]).replace('"band_gap": 0.0', '"band_gap": ' + "9" * 5000)
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([rec] + [json.dumps(r) for r in small_records[1:]]) + "\n")
    raw = read_source(path)
    assert len(raw.records) == 11 and "integer string conversion" in raw.skipped[0]["reason"]
