"""How many crystals of the shipped datasets get other lattice features from the Niggli-reduced primitive
cell (today) than from the cell as written (before): the numbers in the README's Results notes.
Usage: .venv/bin/python scripts/compare_lattice_features.py"""

import gzip
import json

import numpy as np

from crystaltune.data.catalog import resolve
from crystaltune.graphs.build import build_graph
from crystaltune.graphs.structure import RecordError, parse_crystal


def scaled(lengths_angles: np.ndarray) -> np.ndarray:
    """The model's lattice inputs: lengths / 10 Å and the angles' cosines (models/base.py GlobalFeatures)."""
    return np.r_[lengths_angles[:3] / 10, np.cos(np.radians(lengths_angles[3:6]))]


def as_written(lattice: np.ndarray) -> np.ndarray:
    """a, b, c and alpha, beta, gamma of the basis as the file wrote it (the definition before)."""

    def angle(u, v):
        return np.degrees(np.arccos(np.clip(u @ v / np.linalg.norm(u) / np.linalg.norm(v), -1, 1)))

    a, b, c = lattice
    return np.r_[np.linalg.norm(lattice, axis=1), angle(b, c), angle(a, c), angle(a, b)]


for name in ("perovskites", "perov5"):
    change = []
    with gzip.open(resolve(name)[1], "rt") as fh:
        for line in fh:
            rec = json.loads(line)
            try:
                graph = build_graph(rec, 8.0, 12)
            except RecordError:
                continue
            before = as_written(parse_crystal(rec["structure"]).lattice)
            change.append(np.abs(scaled(before) - scaled(graph["cell"])).max())
    change = np.array(change)
    moved = change >= 1e-6
    median = float(np.median(change[moved])) if moved.any() else 0.0
    print(f"{name}: {len(change)} crystals, {(~moved).sum()} unchanged within 1e-6, median change {median:.3g}")
