"""Graph-building benchmark: crystaltune's neighbour lists vs pymatgen's ``get_all_neighbors``."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..data.catalog import resolve
from ..graphs.build import build_graph
from ..graphs.structure import parse_structure
from ..readers import read_source


def reference_graph(structure, cutoff: float = 8.0, max_neighbors: int = 12):
    """What the reference CGCNN does per crystal: get_all_neighbors, then sort each list by distance."""
    all_nbrs = structure.get_all_neighbors(cutoff, include_index=True)
    return [sorted(nbrs, key=lambda x: x[1])[:max_neighbors] for nbrs in all_nbrs]


def bench_graphs(
    dataset: str, limit: int | None = 200, cutoff: float = 8.0, max_neighbors: int = 12, data: str | None = None
) -> dict[str, Any]:
    """Time both methods on the same crystals (parsing included in both), one process, one run."""
    name, path, _ = resolve(dataset, data)
    records = read_source(path).records[: limit or None]
    build_graph(records[0], cutoff, max_neighbors)  # warm-up: one-time element tables, imports
    reference_graph(parse_structure(records[0]["structure"], records[0].get("fmt")), cutoff, max_neighbors)
    t0 = time.perf_counter()
    ours = [build_graph(r, cutoff, max_neighbors) for r in records]
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = [reference_graph(parse_structure(r["structure"], r.get("fmt")), cutoff, max_neighbors) for r in records]
    t_ref = time.perf_counter() - t0
    same = all(
        np.allclose(np.sort(g["dist"]), np.sort([n[1] for nbrs in rg for n in nbrs]), atol=1e-5)
        for g, rg in zip(ours, ref)
    )
    return {
        "dataset": name,
        "crystals": len(records),
        "cutoff": cutoff,
        "max_neighbors": max_neighbors,
        "ours_structures_per_s": len(records) / t_ours,
        "pymatgen_get_all_neighbors_structures_per_s": len(records) / t_ref,
        "ratio": t_ref / t_ours,
        "same_distances": bool(same),
    }
