"""Hostile files and names: special files given as datasets (a FIFO nobody writes to, /dev/zero, a
socket, a process substitution), JSON nested too deeply, folder entries that are not readable files,
ids that look like formulas or differ only past a cut or an escape, tiny values, and a bad row in an
MLflow batch. Each CLI case runs the real CLI in a process capped at 3 GiB of address space, with a
timeout, and must end in its one-line answer without a traceback; a bad record is skipped with its
reason and the good ones are kept."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REF_DIR, record, rocksalt, run_cli, write_jsonl

GOOD_CIF = REF_DIR / "sample-regression" / "1000041.cif"
CHECKPOINT = REF_DIR / "band-gap.pth.tar"


def run(
    args: list[str], cwd: Path, timeout: float = 60, shell: str | None = None, **env
) -> subprocess.CompletedProcess:
    return run_cli(args, cwd, timeout, shell=shell, **env)


def answered(out: subprocess.CompletedProcess, code: int, *messages: str) -> str:
    """Assert the exit code, the messages and no traceback; a user error is exactly one `error:` line."""
    text = out.stdout + out.stderr
    assert out.returncode == code, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    for m in messages:
        assert m in text, text[-3000:]
    if code == 2:
        assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: "), out.stderr
    return text


def two_crystals(path: Path) -> Path:
    return write_jsonl(path, [record("a", rocksalt(), band_gap=1.0), record("b", rocksalt(5.0), band_gap=2.0)])


# special files as datasets ------------------------------------------------------------------------
def test_fifo_nobody_writes_to_is_refused_in_seconds(tmp_path):
    os.mkfifo(tmp_path / "data.jsonl")
    t0 = time.time()
    out = run(["crystaltune.data", "info", str(tmp_path / "data.jsonl")], tmp_path, timeout=30)
    answered(out, 2, f"error: {tmp_path / 'data.jsonl'}: not a regular file or folder (a FIFO); give a dataset file")
    assert time.time() - t0 < 20


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_character_device_is_refused(tmp_path, device):
    out = run(["crystaltune.data", "info", device], tmp_path, timeout=30)
    answered(out, 2, f"error: {device}: not a regular file or folder (a character device); give a dataset file")


def test_socket_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative name: a socket's path is limited to ~100 bytes
    with socket.socket(socket.AF_UNIX) as s:
        s.bind("data.jsonl")
        out = run(["crystaltune.data", "info", str(tmp_path / "data.jsonl")], tmp_path, timeout=30)
    answered(out, 2, "data.jsonl: not a regular file or folder (a socket); give a dataset file")


def test_process_substitution_is_read_once_and_not_cached(tmp_path):
    """``<(cat file)`` is a pipe: its bytes are read once, hashed and parsed (not "file is empty")."""
    two_crystals(tmp_path / "d.jsonl")
    cache = tmp_path / "cache"
    out = run([], tmp_path, shell='"$PY" -m crystaltune.data info <(cat d.jsonl)', CRYSTALTUNE_CACHE_DIR=str(cache))
    answered(out, 0, ": 2 crystals (/dev/fd/", "skipped: 0")
    assert not list(cache.rglob("*.npz"))  # a pipe is never cached


def test_endless_pipe_stops_at_the_byte_limit(tmp_path):
    out = run([], tmp_path, shell='"$PY" -m crystaltune.data info <(cat /dev/zero)', CRYSTALTUNE_MAX_BYTES="1000000")
    answered(out, 2, ": a pipe giving more than 1000000 bytes (CRYSTALTUNE_MAX_BYTES raises the limit)")


# JSON nested too deeply ---------------------------------------------------------------------------
def test_deeply_nested_json_line_is_a_skipped_record(tmp_path):
    lines = [
        json.dumps(record("a", rocksalt(), band_gap=1.0)),
        "[" * 100_000,
        json.dumps(record("b", rocksalt(5.0), band_gap=2.0)),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    out = run(["crystaltune.data", "info", str(tmp_path / "d.jsonl"), "--json"], tmp_path)
    answered(out, 0)
    info = json.loads(out.stdout)
    assert info["crystals"] == 2, info  # the lines around it are kept
    assert [s["reason"] for s in info["skipped"]] == [
        f"line 2: nested too deeply (over about {sys.getrecursionlimit()} levels of JSON arrays and objects)"
    ]


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":\n' + '{"a": ' * 100_000], ids=["list", "object"])
def test_deeply_nested_json_document_is_one_error_line(tmp_path, text):
    (tmp_path / "deep.json").write_text(text)
    out = run(["crystaltune.data", "info", str(tmp_path / "deep.json")], tmp_path)
    answered(out, 2, f"error: {tmp_path / 'deep.json'}: nested too deeply (over about")


# folder entries that are not readable files ------------------------------------------------------
def bad_entries(folder: Path, ext: str) -> None:
    """A folder named x.EXT, a link loop, a dangling link and a FIFO, each named EXT."""
    (folder / f"dir{ext}").mkdir()
    (folder / f"loop{ext}").symlink_to(f"loop{ext}")
    (folder / f"dang{ext}").symlink_to(f"nowhere{ext}")
    os.mkfifo(folder / f"fifo{ext}")


def test_cif_folder_skips_entries_that_are_not_files(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "ok.cif").write_text(GOOD_CIF.read_text())
    bad_entries(folder, ".cif")
    (folder / "sub").symlink_to(".")  # a link back to the folder: the content hash must not loop
    (folder / "id_prop.csv").write_text("ok,1\ndir,2\nloop,3\ndang,4\nfifo,5\n")
    out = run(["crystaltune.data", "info", str(folder), "--json"], tmp_path, timeout=30)
    answered(out, 0)
    info = json.loads(out.stdout)
    assert info["crystals"] == 1, info
    assert [s["reason"] for s in info["skipped"]] == [
        "id_prop.csv line 2 (dir): dir.cif: a folder, not a file",
        "id_prop.csv line 3 (loop): loop.cif: a symbolic link loop",
        "id_prop.csv line 4 (dang): dang.cif: a dangling symbolic link (to nowhere.cif)",
        "id_prop.csv line 5 (fifo): fifo.cif: not a regular file (a FIFO)",
    ]


def test_json_folder_skips_entries_that_are_not_files(tmp_path):
    folder = tmp_path / "j"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps(record("a", rocksalt(), band_gap=1.0)))
    (folder / "deep.json").write_text("[" * 100_000)
    bad_entries(folder, ".json")
    os.close(os.open(os.fsencode(folder) + b"/\xff.json", os.O_CREAT | os.O_WRONLY))  # a name that is not UTF-8
    out = run(["crystaltune.data", "info", str(folder)], tmp_path, timeout=30)
    answered(
        out,
        0,
        "deep.json: nested too deeply",
        "dang.json: a dangling symbolic link (to nowhere.json)",
        "dir.json: a folder, not a file",
        "fifo.json: not a regular file (a FIFO)",
        "loop.json: a symbolic link loop",
        "\\xff.json: not valid JSON",
        "skipped: 6",
    )


def predict(tmp: Path, inputs: list[str], checkpoint: Path = CHECKPOINT) -> subprocess.CompletedProcess:
    return run(
        ["crystaltune.predict", "--checkpoint", str(checkpoint), "--input", *inputs, "--output", str(tmp / "p.csv")],
        tmp,
    )


def read_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_bytes().decode("utf-8"), newline="")))  # strict UTF-8


def test_predict_folder_skips_bad_entries_and_predicts_the_good_ones(tmp_path):
    folder = tmp_path / "cifs"
    folder.mkdir()
    (folder / "good.cif").write_text(GOOD_CIF.read_text())
    bad_entries(folder, ".cif")
    fd = os.open(os.fsencode(folder) + b"/\xff\xfe.cif", os.O_CREAT | os.O_WRONLY)  # a name that is not UTF-8
    os.write(fd, GOOD_CIF.read_bytes())
    os.close(fd)
    out = predict(tmp_path, [str(folder)])
    answered(out, 0, "predicted 2 crystal(s), 4 error row(s)")
    rows = {r["id"]: r for r in read_rows(tmp_path / "p.csv")}
    assert set(rows) == {"good", "\\xff\\xfe", "dir", "loop", "dang", "fifo"}
    assert float(rows["good"]["prediction"]) > 0 and rows["good"]["error"] == ""
    assert rows["\\xff\\xfe"]["prediction"] == rows["good"]["prediction"]  # the same crystal, its name escaped
    assert rows["dir"]["error"] == f"{folder}/dir.cif: a folder, not a file"
    assert rows["loop"]["error"] == f"{folder}/loop.cif: a symbolic link loop"
    assert rows["dang"]["error"] == f"{folder}/dang.cif: a dangling symbolic link (to nowhere.cif)"
    assert rows["fifo"]["error"] == f"{folder}/fifo.cif: not a regular file (a FIFO)"
    assert all(r["prediction"] == "" for k, r in rows.items() if k not in ("good", "\\xff\\xfe"))


# the prediction CSV ---------------------------------------------------------------------------------
def test_predict_csv_escapes_formulas_keeps_ids_apart_and_small_values(tmp_path):
    """Formula-like ids get a leading ', an id "line 2" stays apart from the error row of line 2, ids that
    differ past 200 characters or by an escape stay distinct, and values near 1e-7 keep their digits."""
    from crystaltune.checkpoint import read_checkpoint

    ck = read_checkpoint(CHECKPOINT)
    ck["normalizer"] = {"mean": 1e-7, "std": 1e-13}  # every prediction is 1e-7 within 1e-12
    torch.save(ck, tmp_path / "tiny.pth.tar")
    cif = GOOD_CIF.read_text()
    long = "x" * 300
    ids = [
        "line 2",
        "=HYPERLINK(1)",
        "+1",
        "-1",
        "@SUM(1)",
        "'quoted",
        "\tTAB",
        long + "a",
        long + "b",
        "a\nb",
        "a\\nb",
    ]
    lines = [json.dumps({"id": ids[0], "structure": cif}), "{not json"]
    lines += [json.dumps({"id": rid, "structure": cif}) for rid in ids[1:]]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = predict(tmp_path, [str(tmp_path / "in.jsonl")], checkpoint=tmp_path / "tiny.pth.tar")
    answered(out, 0, f"predicted {len(ids)} crystal(s), 1 error row(s)")
    rows = read_rows(tmp_path / "p.csv")
    assert [r["id"] for r in rows] == [
        "line 2",
        "'=HYPERLINK(1)",
        "'+1",
        "'-1",
        "'@SUM(1)",
        "''quoted",
        "\\tTAB",
        long + "a",
        long + "b",
        "a\\nb",
        "a\\\\nb",
        "line 2",  # the error row of line 2, apart from the crystal whose id is "line 2"
    ]
    assert rows[-1]["prediction"] == "" and rows[-1]["error"].startswith("line 2: not valid JSON")
    for r in rows[:-1]:
        assert r["error"] == "" and r["prediction"] != "0.000000", r
        assert float(r["prediction"]) == pytest.approx(1e-7, rel=1e-3)


def test_csv_cells_keep_ordinary_values_and_small_magnitudes():
    from crystaltune.predict import csv_cell

    assert [csv_cell(v) for v in (4.774056, -2.5, 0.0, 1234.5)] == ["4.774056", "-2.500000", "0.000000", "1234.500000"]
    assert [csv_cell(v) for v in (1.234567e-7, -5e-4, math.nan)] == ["1.23457e-07", "-0.0005", "nan"]
    assert csv_cell("-x") == "'-x" and csv_cell("x\udcff") == "x\\udcff"  # a lone surrogate: still UTF-8


def test_predict_side_file_that_is_a_folder_is_refused_before_any_work(tmp_path):
    (tmp_path / "p.csv.json").mkdir()
    out = predict(tmp_path, [str(GOOD_CIF)])
    answered(
        out,
        2,
        f"error: {tmp_path}/p.csv.json is a folder; predict writes the units and model domain there beside "
        f"--output {tmp_path}/p.csv: remove it or give another --output",
    )
    assert not (tmp_path / "p.csv").exists()


# the MLflow pyfunc ----------------------------------------------------------------------------------
def test_mlflow_pyfunc_bad_row_gets_nan_and_its_error_and_the_others_are_predicted():
    import pandas as pd

    from crystaltune.search.mlflow_model import CrystaltunePyfunc

    model = CrystaltunePyfunc()
    model.load_context(SimpleNamespace(artifacts={"checkpoint": str(CHECKPOINT)}))
    cif = GOOD_CIF.read_text()
    ids = ["a", "bad-json", "not-structure", "deep", "a"]  # the same id twice: two rows, both predicted
    structures = [cif, "{not json", json.dumps({"lattice": 1}), "[" * 100_000, cif]
    out = model.predict(None, pd.DataFrame({"id": ids, "structure": structures}))
    assert list(out.index) == ids and "error" in out.columns
    p = out["prediction"].tolist()
    assert math.isfinite(p[0]) and p[0] == p[4] and all(math.isnan(v) for v in p[1:4])
    assert out["error"].tolist()[0] == "" and out["error"].tolist()[4] == ""
    assert out["error"].iloc[1].startswith("row 2 (bad-json): structure is not valid JSON")
    assert "structure could not be parsed" in out["error"].iloc[2]
    assert out["error"].iloc[3] == "row 4 (deep): structure is not valid JSON (nested too deeply)"
    assert (out["flags"].iloc[1:4] == out["error"].iloc[1:4]).all()  # a row without a prediction says why
