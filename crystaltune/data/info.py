"""Summary statistics of a dataset: what ``python -m crystaltune.data info`` prints."""

from __future__ import annotations

from typing import Any

import numpy as np
from pymatgen.core import Element

from .dataset import Dataset


def dataset_info(ds: Dataset) -> dict[str, Any]:
    store = ds.store
    n_atoms = store.num_nodes
    targets = {}
    for t in sorted(store.props):
        v = store.props[t]
        v = v[np.isfinite(v)]
        if len(v):
            targets[t] = {
                "count": int(len(v)),
                "mean": float(v.mean()),
                "std": float(v.std()),
                "min": float(v.min()),
                "median": float(np.median(v)),
                "max": float(v.max()),
            }
    return {
        "name": ds.name,
        "source": ds.source,
        "crystals": len(store),
        "targets_selected": ds.targets,
        "targets": targets,
        "elements": [Element.from_Z(int(z)).symbol for z in store.elements()],
        "atoms_per_crystal": {
            "min": int(n_atoms.min()),
            "median": float(np.median(n_atoms)),
            "max": int(n_atoms.max()),
            "mean": float(n_atoms.mean()),
        },
        "edges_per_atom": float(store.num_edges.sum() / max(n_atoms.sum(), 1)),
        "graph_params": {"cutoff": ds.params.cutoff, "max_neighbors": ds.params.max_neighbors},
        "skipped": ds.skipped,
    }


def format_info(info: dict[str, Any]) -> str:
    lines = [
        f"{info['name']}: {info['crystals']} crystals ({info['source']})",
        f"  atoms per crystal: min {info['atoms_per_crystal']['min']}, median {info['atoms_per_crystal']['median']:g}, "
        f"max {info['atoms_per_crystal']['max']}; {info['edges_per_atom']:.1f} edges per atom",
        f"  elements ({len(info['elements'])}): {' '.join(info['elements'])}",
        "  targets (* = selected):",
    ]
    for t, s in info["targets"].items():
        mark = "*" if t in info["targets_selected"] else " "
        lines.append(
            f"   {mark} {t:<28} n={s['count']:<6} mean {s['mean']:.4g}  std {s['std']:.4g}  "
            f"min {s['min']:.4g}  median {s['median']:.4g}  max {s['max']:.4g}"
        )
    lines.append(f"  skipped: {len(info['skipped'])}")
    lines += [f"    - {s['reason']}" for s in info["skipped"][:20]]
    if len(info["skipped"]) > 20:
        lines.append(f"    ... {len(info['skipped']) - 20} more (use --json for all)")
    return "\n".join(lines)
