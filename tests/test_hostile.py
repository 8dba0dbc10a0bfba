"""Hostile inputs as a table: each is given to the real CLI in a process capped at 3 GiB of address
space (a regression cannot take the machine down), and must end in its one-line error or skip reason,
quickly, without a traceback."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REF_DIR, limit_memory, record, rocksalt, run_cli, write_jsonl

_limit = limit_memory


def run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli(args, cwd, timeout)


def dense_record(tmp: Path) -> list[str]:
    """A few hundred bytes: 2 atoms in a 0.03 Å^3 cell (tens of millions of neighbours within 8 Å)."""
    s = rocksalt(0.5).as_dict()
    write_jsonl(tmp / "d.jsonl", [record("dense", s, band_gap=1.0), record("ok", rocksalt(), band_gap=2.0)])
    return ["crystaltune.data", "info", str(tmp / "d.jsonl")]


def ids_outside(tmp: Path) -> list[str]:
    (tmp / "f").mkdir()
    cif = (REF_DIR / "sample-regression" / "1000041.cif").read_text()
    (tmp / "secret.cif").write_text(cif)
    (tmp / "f" / "ok.cif").write_text(cif)
    (tmp / "f" / "id_prop.csv").write_text("ok,1\n../secret,2\n")
    return ["crystaltune.data", "info", str(tmp / "f")]


def anchor_bomb(tmp: Path) -> list[str]:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    (tmp / "bomb.yaml").write_text("\n".join(lines) + "\nsearch: {optim.lr: {type: float, low: 0.001, high: 0.01}}\n")
    return ["crystaltune.search", str(tmp / "bomb.yaml")]


def deep_yaml(tmp: Path) -> list[str]:
    (tmp / "deep.yaml").write_text("search: " + "[" * 50_000)
    return ["crystaltune.search", str(tmp / "deep.yaml")]


def not_utf8(tmp: Path) -> list[str]:
    (tmp / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    return ["crystaltune.search", str(tmp / "latin1.yaml")]


def folder_as_space(tmp: Path) -> list[str]:
    (tmp / "space.yaml").mkdir()
    return ["crystaltune.search", str(tmp / "space.yaml")]


def gzip_of_many_records(tmp: Path) -> list[str]:
    """A small gzip that expands to more records than the reader accepts."""
    line = json.dumps(record("x", rocksalt(), band_gap=1.0)) + "\n"
    with gzip.open(tmp / "many.jsonl.gz", "wt") as fh:
        for i in range(2_000):
            fh.write(line.replace('"x"', f'"x{i}"'))
    return ["crystaltune.data", "info", str(tmp / "many.jsonl.gz"), "--max-records", "1000"]


def checkpoint_bigger_than_its_weights(tmp: Path) -> list[str]:
    """A small file whose config asks for a 4096-wide, 64-layer model: refused before it is built."""
    from crystaltune.checkpoint import FORMAT
    from crystaltune.config import TrialConfig

    cfg = TrialConfig.from_dict({"model": {"hidden": 4096, "layers": 64, "head_hidden": 8192}}).to_dict()
    torch.save(
        {
            "format": FORMAT,
            "config": cfg,
            "targets": ["band_gap"],
            "model_state": {},
            "normalizer": {"mean": [0.0], "std": [1.0]},
        },
        tmp / "big.pt",
    )
    return [
        "crystaltune.predict",
        "--checkpoint",
        str(tmp / "big.pt"),
        "--input",
        str(REF_DIR / "sample-regression"),
        "--output",
        str(tmp / "out.csv"),
    ]


def nan_normalizer(tmp: Path) -> list[str]:
    from crystaltune.checkpoint import read_checkpoint

    ck = read_checkpoint(REF_DIR / "band-gap.pth.tar")
    ck["normalizer"] = {"mean": float("nan"), "std": 1.0}
    torch.save(ck, tmp / "nan.pth.tar")
    return [
        "crystaltune.predict",
        "--checkpoint",
        str(tmp / "nan.pth.tar"),
        "--input",
        str(REF_DIR / "sample-regression"),
        "--output",
        str(tmp / "out.csv"),
    ]


def duplicate_stems(tmp: Path) -> list[str]:
    for d in ("a", "b"):
        (tmp / d).mkdir()
        (tmp / d / "x.cif").write_text(
            (REF_DIR / "sample-regression" / f"{'1000041' if d == 'a' else '1000050'}.cif").read_text()
        )
    return [
        "crystaltune.predict",
        "--checkpoint",
        str(REF_DIR / "band-gap.pth.tar"),
        "--input",
        str(tmp / "a" / "x.cif"),
        str(tmp / "b" / "x.cif"),
        "--output",
        str(tmp / "out.csv"),
    ]


def negative_seed(tmp: Path) -> list[str]:
    return ["crystaltune.search", "smoke", "--seed", "-1"]


def tiny_featurizer_step(tmp: Path) -> list[str]:
    (tmp / "s.yaml").write_text(
        "fixed: {model.edge_params.step: 1.0e-9}\nsearch: {optim.lr: {type: float, low: 0.001, high: 0.01}}\n"
    )
    return ["crystaltune.search", str(tmp / "s.yaml")]


def zero_threads(tmp: Path) -> list[str]:
    (tmp / "c.yaml").write_text("train: {num_threads: 0}\n")
    return ["crystaltune.train", "--config", str(tmp / "c.yaml")]


def plain_path_tracking_uri(tmp: Path) -> list[str]:
    return ["crystaltune.search", "smoke", "--tracking-uri", str(tmp / "store")]


def bogus_storage(tmp: Path) -> list[str]:
    return ["crystaltune.search", "smoke", "--storage", "bogus://x/y"]


def corrupt_mlflow_db(tmp: Path) -> list[str]:
    (tmp / "mlflow.db").write_bytes(b"this is not a database" * 10)
    return ["crystaltune.search", "smoke", "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"]


def unreachable_tracking_server_with_password(tmp: Path) -> list[str]:
    return ["crystaltune.search", "smoke", "--tracking-uri", "http://alice:s3cret@127.0.0.1:9"]


def train_output_is_a_folder(tmp: Path) -> list[str]:
    (tmp / "out.pt").mkdir()
    return ["crystaltune.train", "--limit", "40", "--epochs", "1", "--output", str(tmp / "out.pt")]


def negative_cutoff(tmp: Path) -> list[str]:
    return ["crystaltune.data", "info", "perovskites", "--cutoff", "-1"]


def huge_number(tmp: Path) -> list[str]:
    """A 5000-digit number: more than Python converts to an int by default."""
    rec = json.dumps(record("x", rocksalt(), band_gap=1.0)).replace('"band_gap": 1.0', '"band_gap": ' + "9" * 5000)
    (tmp / "big.jsonl").write_text(rec + "\n")
    return ["crystaltune.data", "info", str(tmp / "big.jsonl")]


def overlong_csv_field(tmp: Path) -> list[str]:
    (tmp / "f").mkdir()
    (tmp / "f" / "id_prop.csv").write_text("a," + "x" * 200_000 + "\n")
    return ["crystaltune.data", "info", str(tmp / "f")]


def negative_threads(tmp: Path) -> list[str]:
    return ["crystaltune.bench", "train", "--threads", "-1", "--limit", "20", "--epochs", "1"]


def sparse_cells(tmp: Path) -> list[str]:
    """12 atoms in 2000 Å and 4000 Å boxes (3.7 KB of JSON; pymatgen's grid would ask for 3-19 GB)."""
    from pymatgen.core import Lattice, Structure

    rng = np.random.default_rng(0)
    recs = [
        record(f"box{a:.0f}", Structure(Lattice.cubic(a), ["Na"] * 12, rng.random((12, 3))), band_gap=1.0)
        for a in (2000.0, 4000.0)
    ]
    write_jsonl(tmp / "sparse.jsonl", recs + [record("ok", rocksalt(), band_gap=2.0)])
    return ["crystaltune.data", "info", str(tmp / "sparse.jsonl")]


def absurd_lattices(tmp: Path) -> list[str]:
    """A basis skewed by 1e8 (moyopy's Niggli reduction alone allocated 2.5 GB and aborted), a 1e300 Å cell."""
    recs = []
    for rid, matrix in (("skew", [[5.64, 0, 0], [5.64e8, 5.64, 0], [0, 0, 5.64]]), ("huge", np.eye(3) * 1e300)):
        s = rocksalt().as_dict()
        s["lattice"]["matrix"] = np.asarray(matrix, float).tolist()
        recs.append(record(rid, s, band_gap=1.0))
    write_jsonl(tmp / "absurd.jsonl", recs + [record("ok", rocksalt(), band_gap=2.0)])
    return ["crystaltune.data", "info", str(tmp / "absurd.jsonl")]


def skewed_real_crystal(tmp: Path) -> list[str]:
    """A real crystal on a basis with ~1000 Å vectors: read in its reduced cell, predicted as usual."""
    from pymatgen.core import Lattice, Structure

    s = Structure.from_file(str(REF_DIR / "sample-regression" / "1000041.cif"))
    lat = np.array([[1, 0, 0], [0, 1, 0], [150, 150, 1]]) @ s.lattice.matrix
    Structure(Lattice(lat), s.species, s.cart_coords, coords_are_cartesian=True).to(str(tmp / "skewed.cif"))
    return predict_args(tmp, REF_DIR / "band-gap.pth.tar", tmp / "skewed.cif")


def cif_expansion_bomb(tmp: Path) -> list[str]:
    """24 KB: 600 sites x the 192 operations of Fm-3m (~115k sites; pymatgen expanded it for minutes)."""
    from pymatgen.symmetry.groups import SpaceGroup

    ops = [f"{i + 1} '{op.as_xyz_str()}'" for i, op in enumerate(SpaceGroup("Fm-3m").symmetry_ops)]
    rng = np.random.default_rng(0)
    sites = [f"Na{i} Na {x:.5f} {y:.5f} {z:.5f} 1" for i, (x, y, z) in enumerate(rng.random((600, 3)) * 0.25)]
    head = [
        "data_bomb",
        *(f"_cell_length_{k} 40" for k in "abc"),
        *(f"_cell_angle_{k} 90" for k in ("alpha", "beta", "gamma")),
    ]
    loops = ["loop_", "_symmetry_equiv_pos_site_id", "_symmetry_equiv_pos_as_xyz", *ops, "loop_"]
    loops += [f"_atom_site_{k}" for k in ("label", "type_symbol", "fract_x", "fract_y", "fract_z", "occupancy")]
    (tmp / "f").mkdir()
    (tmp / "f" / "bomb.cif").write_text("\n".join(head + loops + sites) + "\n")
    (tmp / "f" / "ok.cif").write_text((REF_DIR / "sample-regression" / "1000041.cif").read_text())
    (tmp / "f" / "id_prop.csv").write_text("bomb,1\nok,2\n")
    return ["crystaltune.data", "info", str(tmp / "f")]


def predict_args(tmp: Path, checkpoint: Path, inputs: Path) -> list[str]:
    return [
        "crystaltune.predict",
        "--checkpoint",
        str(checkpoint),
        "--input",
        str(inputs),
        "--output",
        str(tmp / "o.csv"),
    ]


def _small_checkpoint(tmp: Path, **edit) -> Path:
    """A crystaltune checkpoint of a tiny cgcnn with lattice features, then ``edit`` applied to its dict."""
    from crystaltune.checkpoint import read_checkpoint, save_checkpoint
    from crystaltune.config import TrialConfig
    from crystaltune.models import build_model
    from crystaltune.normalizer import Normalizer

    cfg = TrialConfig.from_dict({"model": {"hidden": 8, "head_hidden": 8, "global_features": ["lattice"]}})
    model = build_model(cfg.model, 1, cfg.data.cutoff)
    norm = Normalizer(torch.zeros(1), torch.ones(1))
    path = save_checkpoint(tmp / "ck.pt", model, cfg, norm, ["band_gap"])
    ck = read_checkpoint(path)
    for key, value in edit.items():
        if value is None:
            ck.pop(key)
        else:
            ck[key] = value
    torch.save(ck, path)
    return path


def lattice_checkpoint_v1(tmp: Path) -> list[str]:
    return predict_args(tmp, _small_checkpoint(tmp, version=1), REF_DIR / "sample-regression")


def checkpoint_without_config(tmp: Path) -> list[str]:
    return predict_args(tmp, _small_checkpoint(tmp, config=None), REF_DIR / "sample-regression")


def checkpoint_with_bad_targets(tmp: Path) -> list[str]:
    return predict_args(tmp, _small_checkpoint(tmp, targets=[3]), REF_DIR / "sample-regression")


def checkpoint_with_bad_domain(tmp: Path) -> list[str]:
    return predict_args(tmp, _small_checkpoint(tmp, domain={"elements": "all"}), REF_DIR / "sample-regression")


CASES = [  # (input, exit code, what the output must say)
    (dense_record, 0, "denser than any real crystal (at least 1.0 Å^3 per atom are accepted)"),
    (ids_outside, 0, "the id names a file outside"),
    (anchor_bomb, 2, "YAML nodes once aliases are expanded"),
    (deep_yaml, 2, "nested too deeply"),
    (not_utf8, 2, "not UTF-8 text"),
    (folder_as_space, 2, "no such search-space file"),
    (gzip_of_many_records, 2, "more than 1000 records (--max-records"),
    (checkpoint_bigger_than_its_weights, 2, "weights do not fit the architecture in its config"),
    (nan_normalizer, 2, "the normaliser has non-finite values"),
    (duplicate_stems, 2, "two inputs have the id 'x'"),
    (negative_seed, 2, "--seed must be >= 0"),
    (tiny_featurizer_step, 2, "model.edge_params.step must be in [0.001, 10.0]"),
    (zero_threads, 2, "train.num_threads must be in [1, 1024]"),
    (plain_path_tracking_uri, 2, "not a URI; for a local store use sqlite:///"),
    (bogus_storage, 2, "--storage bogus://x/y: unknown scheme 'bogus'"),
    (corrupt_mlflow_db, 2, "is not an SQLite database"),
    (unreachable_tracking_server_with_password, 2, "http://***@127.0.0.1:9: the tracking server does not answer"),
    (train_output_is_a_folder, 2, "is a folder; give a file name"),
    (negative_cutoff, 2, "--cutoff must be in [0.5, 20] Å, got -1.0"),
    (huge_number, 2, "no numeric property to use as a target"),  # its only record skipped: not valid JSON
    (overlong_csv_field, 2, "id_prop.csv: not a readable CSV of id,target rows (field larger than field limit"),
    (negative_threads, 2, "--threads must be >= 1, got -1"),
    (sparse_cells, 0, "box2000 (line 1): site 0 has no neighbour within 8.0 Å"),
    (skewed_real_crystal, 0, "1 crystal"),
    (absurd_lattices, 0, "skew (line 1): lattice vector of 5.64e+08 Å; at most 1e+08 Å are accepted"),
    (cif_expansion_bomb, 0, "CIF expands to up to 115200 sites (atom sites x symmetry operations)"),
    (lattice_checkpoint_v1, 2, "a version-1 checkpoint with 'lattice' global features"),
    (checkpoint_without_config, 2, "checkpoint entry 'config' is missing, expected a dict"),
    (checkpoint_with_bad_targets, 2, "checkpoint entry 'targets' must be a non-empty list of names"),
    (checkpoint_with_bad_domain, 2, "malformed 'domain' entry"),
]


@pytest.mark.parametrize("make, code, message", CASES, ids=[c[0].__name__ for c in CASES])
def test_hostile_input_gets_its_one_line_answer(tmp_path, make, code, message):
    args = make(tmp_path)
    t0 = time.time()
    out = run(args, tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == code, text[-2000:]
    assert message in text and "Traceback" not in text, text[-2000:]
    if code == 2:
        assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: "), out.stderr
    assert "s3cret" not in text  # secrets never printed
    assert time.time() - t0 < 60


PEAK = (
    "import atexit, resource, runpy, sys\n"
    "atexit.register(lambda: print('peak_rss_kb', max(resource.getrusage(w).ru_maxrss for w in "
    "(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)), file=sys.stderr))\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


@pytest.mark.parametrize("make", [sparse_cells, skewed_real_crystal, cif_expansion_bomb])
def test_small_hostile_inputs_cost_under_1_gb_and_seconds(tmp_path, make):
    """Under 1 MB in, under 1 GB and a few seconds of work: measured as the CLI's peak resident memory."""
    args = make(tmp_path)
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-c", PEAK, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limit,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    peak_kb = int(out.stderr.rsplit("peak_rss_kb", 1)[1].split()[0])
    assert peak_kb < 1 << 20, f"peak {peak_kb / 1024:.0f} MB"
    assert time.time() - t0 < 30
