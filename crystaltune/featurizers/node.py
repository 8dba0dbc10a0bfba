"""Node featurizers: per-element feature tables looked up by atomic number inside the model.

Each is an embedding initialised from a table (trainable or frozen). ``supported`` lists the atomic
numbers that have features; crystals with other elements are skipped with a reason.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import numpy as np
import torch
from torch import nn

from ..errors import CrystaltuneError
from ..registry import Registry

MAX_Z = 118
NODE_TABLES: Registry = Registry("node featurizer")


@NODE_TABLES.register("cgcnn")
@functools.lru_cache
def cgcnn_table() -> np.ndarray:
    """The reference CGCNN ``atom_init.json``: 92 binary features (group, period, electronegativity,
    radius, valence electrons, ... one-hot binned), Z = 1..100."""
    raw = json.loads((resources.files("crystaltune.featurizers") / "data" / "atom_init.json").read_text())
    dim = len(next(iter(raw.values())))
    table = np.full((MAX_Z + 1, dim), np.nan, dtype=np.float32)
    for z, vec in raw.items():
        table[int(z)] = vec
    return table


@NODE_TABLES.register("onehot")
@functools.lru_cache
def onehot_table() -> np.ndarray:
    """One-hot atomic number, Z = 1..100."""
    table = np.full((MAX_Z + 1, 100), np.nan, dtype=np.float32)
    table[1:101] = np.eye(100, dtype=np.float32)
    return table


@NODE_TABLES.register("bits")
@functools.lru_cache
def bits_table() -> np.ndarray:
    """Binary code of the atomic number (7 bits), Z = 1..118: a compact, ordered identity."""
    table = np.full((MAX_Z + 1, 7), np.nan, dtype=np.float32)
    for z in range(1, MAX_Z + 1):
        table[z] = [(z >> b) & 1 for b in range(7)]
    return table


@NODE_TABLES.register("extended")
@functools.lru_cache
def extended_table() -> np.ndarray:
    """Standardised element properties from pymatgen: atomic number, Pauling electronegativity,
    atomic radius, first ionization energy, electron affinity (0 where none is bound), valence
    electrons. Elements lacking one of the first four (e.g. noble gases) have no features."""
    import warnings

    from pymatgen.core import Element

    rows = np.full((MAX_Z + 1, 6), np.nan, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for z in range(1, 104):
            el = Element.from_Z(z)
            try:
                x, r, ie = float(el.X), el.atomic_radius, el.ionization_energy
                ea = el.electron_affinity
            except Exception:
                continue
            if r is None or ie is None or not np.isfinite(x):
                continue
            rows[z] = [z, x, float(r), float(ie), float(ea) if ea is not None else 0.0, _valence(el)]
    ok = np.isfinite(rows).all(axis=1)
    mean, std = rows[ok].mean(axis=0), rows[ok].std(axis=0)
    rows[ok] = (rows[ok] - mean) / std
    rows[~ok] = np.nan
    return rows.astype(np.float32)


def _valence(el) -> float:
    """Valence electrons from the group: 1-12 for groups 1-12, group-10 for 13-18, 3 for f-block."""
    g = el.group
    if el.is_lanthanoid or el.is_actinoid:
        return 3.0
    return float(g if g <= 12 else g - 10)


def node_table(name: str) -> np.ndarray:
    """Feature table (119 x F, NaN rows = unsupported) for a name or a ``+``-joined concatenation."""
    parts = name.split("+")
    tables = []
    for part in parts:
        if part not in NODE_TABLES:
            raise CrystaltuneError(NODE_TABLES.unknown_message(part))
        tables.append(NODE_TABLES.get(part)())
    table = np.concatenate(tables, axis=1)
    table[~np.isfinite(table).all(axis=1)] = np.nan
    return table


def supported_elements(name: str) -> set[int]:
    table = node_table(name)
    return {int(z) for z in np.flatnonzero(np.isfinite(table).all(axis=1))}


def unsupported_crystals(z: np.ndarray, node_ptr: np.ndarray, featurizer: str) -> dict[int, str]:
    """Crystal index -> reason, for crystals with elements the node featurizer has no features for:
    the one filter training, prediction and dataset checks use."""
    supported = supported_elements(featurizer)
    bad_atom = ~np.isin(z, np.array(sorted(supported)))
    if not bad_atom.any():
        return {}
    from pymatgen.core import Element

    out = {}
    for g in np.unique(np.repeat(np.arange(len(node_ptr) - 1), np.diff(node_ptr))[bad_atom]):
        zs = sorted({int(v) for v in z[node_ptr[g] : node_ptr[g + 1]]} - supported)
        names = ", ".join(Element.from_Z(v).symbol if 0 < v < 119 else str(v) for v in zs)
        out[int(g)] = f"element(s) {names} have no features in node featurizer {featurizer!r}"
    return out


class NodeFeaturizer(nn.Module):
    """Embedding of atomic numbers initialised from a feature table; frozen unless ``trainable``."""

    def __init__(self, name: str = "cgcnn", trainable: bool = False):
        super().__init__()
        table = torch.from_numpy(np.nan_to_num(node_table(name), nan=0.0))
        self.name = name
        self.out_dim = table.shape[1]
        self.embedding = nn.Embedding.from_pretrained(table, freeze=not trainable)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.embedding(z)
