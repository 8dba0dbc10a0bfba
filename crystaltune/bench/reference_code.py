"""The speed baseline as the real thing: run the reference CGCNN code itself (txie-93/cgcnn's
``main.py``, given by its folder; MIT, never copied here) on the same crystals and read its per-batch
times.

The crystals are written as the reference expects them: ``ID.cif`` files, ``id_prop.csv`` and the
reference ``atom_init.json``. It trains with its defaults' algorithm (SGD, 64/128/3, Gaussian step
0.2, 12 neighbours within 8 Å, ``-j 0`` so its ``lru_cache`` keeps the graphs after epoch 0) and
prints ``Epoch: [e][i/n]  Time t (avg)`` per batch (data loading included). Throughput counts epochs
after the first, which also builds the graphs with pymatgen, as crystaltune's figure does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import CrystaltuneError
from .recipe import BenchRecipe

BATCH_LINE = re.compile(r"^Epoch: \[(\d+)\]\[(\d+)/(\d+)\]\s+Time ([0-9.]+)")
TRAIN_RATIO = 0.8  # main.py's split: 80 / 10 / 10


def write_reference_folder(records: list[dict[str, Any]], target: str, folder: Path) -> int:
    """CIFs, id_prop.csv and atom_init.json for ``records`` (crystaltune raw records); returns how many."""
    from pymatgen.io.cif import CifWriter

    from ..graphs.structure import parse_structure

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, rec in enumerate(records):
        name = f"c{i:05d}"  # ids may hold characters a file name cannot
        CifWriter(parse_structure(rec["structure"], rec.get("fmt"))).write_file(folder / f"{name}.cif")
        rows.append(f"{name},{rec['props'][target]}")
    (folder / "id_prop.csv").write_text("\n".join(rows) + "\n")
    shutil.copy(
        Path(__file__).resolve().parents[1] / "featurizers" / "data" / "atom_init.json", folder / "atom_init.json"
    )
    return len(rows)


def parse_batch_times(log: str, n_crystals: int, batch_size: int) -> dict[int, tuple[int, float]]:
    """epoch -> (graphs trained, seconds) from the reference's per-batch lines (``--print-freq 1``)."""
    n_train = int(TRAIN_RATIO * n_crystals)
    out: dict[int, tuple[int, float]] = {}
    for line in log.splitlines():
        m = BATCH_LINE.match(line.strip())
        if m:
            epoch, i, n, t = int(m[1]), int(m[2]), int(m[3]), float(m[4])
            size = batch_size if i < n - 1 else n_train - batch_size * (n - 1)
            graphs, secs = out.get(epoch, (0, 0.0))
            out[epoch] = (graphs + size, secs + t)
    return out


def reference_throughput(
    code_dir: str | Path, records: list[dict[str, Any]], target: str, recipe: BenchRecipe, timeout: float = 3600
) -> dict[str, Any]:
    """Run the reference code on ``records`` and return its graphs/s (epochs after the first); on the
    GPU when the recipe's device is cuda (its default when one is present), else with ``--disable-cuda``."""
    code = Path(code_dir).resolve()
    if not (code / "main.py").is_file():
        raise CrystaltuneError(f"--reference-code {code_dir}: no main.py there (the reference CGCNN code's folder)")
    if recipe.epochs < 2:
        raise CrystaltuneError("--reference-code needs --epochs >= 2 (the first epoch builds the graphs)")
    with tempfile.TemporaryDirectory(prefix="ct-ref-") as tmp:
        folder = Path(tmp) / "data"
        n = write_reference_folder(records, target, folder)
        cmd = [
            sys.executable,
            str(code / "main.py"),
            str(folder),
            "--epochs",
            str(recipe.epochs),
            "-b",
            str(recipe.batch_size),
            "-j",
            "0",
            *([] if recipe.device == "cuda" else ["--disable-cuda"]),
            "--print-freq",
            "1",
            "--train-ratio",
            str(TRAIN_RATIO),
            "--val-ratio",
            "0.1",
            "--test-ratio",
            "0.1",
            "--atom-fea-len",
            str(recipe.hidden),
            "--h-fea-len",
            str(recipe.head_hidden),
            "--n-conv",
            str(recipe.layers),
        ]
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(recipe.threads),
            "MKL_NUM_THREADS": str(recipe.threads),
            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
        }  # its final test reloads an argparse object
        out = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise CrystaltuneError(f"the reference code failed (exit {out.returncode}): {out.stderr.strip()[-300:]}")
    per_epoch = parse_batch_times(out.stdout, n, recipe.batch_size)
    later = [per_epoch[e] for e in sorted(per_epoch) if e >= 1]
    if not later:
        raise CrystaltuneError("the reference code printed no batch times after its first epoch")
    graphs, secs = sum(g for g, _ in later), sum(s for _, s in later)
    return {
        "reference_code": str(code),
        "crystals": n,
        "train_crystals": int(TRAIN_RATIO * n),
        "threads": recipe.threads,
        "graphs_per_s": graphs / secs,
        "graphs_per_s_by_epoch": [g / s for g, s in (per_epoch[e] for e in sorted(per_epoch))],
        "command": " ".join(cmd[1:2] + ["DIR"] + cmd[3:]),
    }
