"""GraphStore: all crystal graphs of a dataset in flat arrays, sliced into batches without Python loops.

Per-graph Python objects make the collate step dominate a CPU epoch on small crystals, so graphs
live in concatenated arrays with offset pointers and a batch is assembled with vectorised indexing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

NODE_KEYS = ("z", "pos")
EDGE_KEYS = ("src", "dst", "image", "dist")
GRAPH_KEYS = ("lattice", "cell", "spacegroup")


@dataclass
class Batch:
    """A mini-batch of crystal graphs as torch tensors (PyG conventions: edge_index[0] = source)."""

    z: torch.Tensor  # (N,) atomic numbers
    edge_index: torch.Tensor  # (2, E) source (neighbour) -> target (centre)
    dist: torch.Tensor  # (E,) distances in Å
    batch: torch.Tensor  # (N,) graph index of each atom
    cell: torch.Tensor  # (B, 8) a, b, c, alpha, beta, gamma, volume/atom, density
    spacegroup: torch.Tensor  # (B,) international number, 0 = unknown
    y: torch.Tensor  # (B, T) targets, NaN where missing
    num_graphs: int
    degree: int = 0  # k when edges are sorted by target and every atom has exactly k (fast paths); else 0
    vec: torch.Tensor | None = None  # (E, 3) bond vectors in Å, centre (target) -> neighbour image (source)

    def to(self, device: torch.device | str) -> Batch:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                kw[k] = v.to(device, non_blocking=True)
        return Batch(**kw)


class GraphStore:
    """Concatenated per-node, per-edge and per-graph arrays with ``node_ptr``/``edge_ptr`` offsets."""

    def __init__(
        self,
        ids: np.ndarray,
        node_ptr: np.ndarray,
        edge_ptr: np.ndarray,
        arrays: dict[str, np.ndarray],
        props: dict[str, np.ndarray],
    ):
        self.ids = np.asarray(ids, dtype=str)
        self.node_ptr = node_ptr
        self.edge_ptr = edge_ptr
        self.arrays = arrays
        self.props = props

    # construction ---------------------------------------------------------------------------------
    @classmethod
    def from_graphs(cls, ids: list[str], graphs: list[dict[str, Any]], props: list[dict[str, float]]) -> GraphStore:
        n_nodes = np.array([len(g["z"]) for g in graphs], dtype=np.int64)
        n_edges = np.array([len(g["dist"]) for g in graphs], dtype=np.int64)
        node_ptr = np.concatenate([[0], np.cumsum(n_nodes)])
        edge_ptr = np.concatenate([[0], np.cumsum(n_edges)])
        arrays: dict[str, np.ndarray] = {}
        for key in NODE_KEYS + EDGE_KEYS:
            arrays[key] = np.concatenate([g[key] for g in graphs]) if graphs else np.zeros((0,))
        for key in GRAPH_KEYS:
            arrays[key] = np.stack([np.asarray(g[key]) for g in graphs]) if graphs else np.zeros((0,))
        arrays["src"] = arrays["src"].astype(np.int32)
        arrays["dst"] = arrays["dst"].astype(np.int32)
        arrays["z"] = arrays["z"].astype(np.int16)
        arrays["dist"] = arrays["dist"].astype(np.float32)
        names = sorted({k for p in props for k in p})
        table = {k: np.array([p.get(k, np.nan) for p in props], dtype=np.float64) for k in names}
        return cls(np.array(ids, dtype=str), node_ptr, edge_ptr, arrays, table)

    def to_npz_dict(self) -> dict[str, np.ndarray]:
        out = {"ids": self.ids, "node_ptr": self.node_ptr, "edge_ptr": self.edge_ptr}
        out.update({f"a:{k}": v for k, v in self.arrays.items()})
        out.update({f"p:{k}": v for k, v in self.props.items()})
        return out

    @classmethod
    def from_npz_dict(cls, d: dict[str, np.ndarray]) -> GraphStore:
        arrays = {k[2:]: d[k] for k in d if k.startswith("a:")}
        props = {k[2:]: d[k] for k in d if k.startswith("p:")}
        store = cls(d["ids"], d["node_ptr"], d["edge_ptr"], arrays, props)
        store.check()
        return store

    def check(self) -> None:
        """Raise ValueError if the arrays are inconsistent (e.g. a damaged cache file)."""
        g = len(self.ids)
        ok = (
            len(self.node_ptr) == g + 1
            and len(self.edge_ptr) == g + 1
            and self.node_ptr[-1] == len(self.arrays["z"]) == len(self.arrays["pos"])
            and self.edge_ptr[-1] == len(self.arrays["dist"]) == len(self.arrays["src"]) == len(self.arrays["dst"])
            and all(len(self.arrays[k]) == g for k in GRAPH_KEYS)
            and all(len(v) == g for v in self.props.values())
        )
        if not ok:
            raise ValueError("inconsistent graph store arrays")

    # views ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_nodes(self) -> np.ndarray:
        return np.diff(self.node_ptr)

    @property
    def num_edges(self) -> np.ndarray:
        return np.diff(self.edge_ptr)

    def graph(self, i: int) -> dict[str, np.ndarray]:
        """One graph's arrays (local node indices), for inspection and tests."""
        ns, ne = slice(self.node_ptr[i], self.node_ptr[i + 1]), slice(self.edge_ptr[i], self.edge_ptr[i + 1])
        out = {k: self.arrays[k][ns] for k in NODE_KEYS}
        out.update({k: self.arrays[k][ne] for k in EDGE_KEYS})
        out.update({k: self.arrays[k][i] for k in GRAPH_KEYS})
        return out

    def elements(self) -> np.ndarray:
        return np.unique(self.arrays["z"]).astype(np.int64)

    def subset(self, index: np.ndarray) -> GraphStore:
        """A new store holding graphs ``index`` (in that order)."""
        index = np.asarray(index, dtype=np.int64)
        node_idx, node_ptr = _ranges(self.node_ptr, index)
        edge_idx, edge_ptr = _ranges(self.edge_ptr, index)
        arrays = {k: self.arrays[k][node_idx] for k in NODE_KEYS}
        arrays.update({k: self.arrays[k][edge_idx] for k in EDGE_KEYS})
        arrays.update({k: self.arrays[k][index] for k in GRAPH_KEYS})
        props = {k: v[index] for k, v in self.props.items()}
        return GraphStore(self.ids[index], node_ptr, edge_ptr, arrays, props)

    def batch(
        self, index: np.ndarray, targets: list[str], noise: float = 0.0, rng: np.random.Generator | None = None
    ) -> Batch:
        """Assemble graphs ``index`` into one Batch; ``noise`` > 0 perturbs positions (Å, Gaussian)
        and recomputes distances over the same edges, for the embedding alignment metric."""
        index = np.asarray(index, dtype=np.int64)
        node_idx, node_ptr = _ranges(self.node_ptr, index)
        edge_idx, edge_ptr = _ranges(self.edge_ptr, index)
        n_edges = np.diff(edge_ptr)
        shift = np.repeat(node_ptr[:-1], n_edges)
        src = self.arrays["src"][edge_idx].astype(np.int64) + shift
        dst = self.arrays["dst"][edge_idx].astype(np.int64) + shift
        pos = self.arrays["pos"][node_idx]
        if noise > 0:
            rng = rng or np.random.default_rng(0)
            pos = pos + rng.normal(0.0, noise, size=(len(node_idx), 3))
        # bond vectors pos[src] + image @ lattice - pos[dst] (centre -> neighbour image; angle features use them)
        lattice = np.repeat(self.arrays["lattice"][index], n_edges, axis=0)
        offset = np.einsum("ei,eij->ej", self.arrays["image"][edge_idx].astype(np.float64), lattice)
        vec = np.take(pos, src, axis=0) + offset - np.take(pos, dst, axis=0)
        if noise > 0:
            dist = np.linalg.norm(vec, axis=1).astype(np.float32)
        else:
            dist = self.arrays["dist"][edge_idx]
        y = np.stack([self.props[t][index] for t in targets], axis=1) if targets else np.zeros((len(index), 0))
        n_nodes = len(node_idx)
        degree = 0
        if n_nodes and len(dst) % n_nodes == 0:
            k = len(dst) // n_nodes
            if k and np.array_equal(dst, np.repeat(np.arange(n_nodes), k)):
                degree = k
        return Batch(
            z=torch.from_numpy(self.arrays["z"][node_idx].astype(np.int64)),
            edge_index=torch.from_numpy(np.stack([src, dst])),
            dist=torch.from_numpy(np.ascontiguousarray(dist)),
            batch=torch.from_numpy(np.repeat(np.arange(len(index), dtype=np.int64), np.diff(node_ptr))),
            cell=torch.from_numpy(self.arrays["cell"][index].astype(np.float32)),
            spacegroup=torch.from_numpy(self.arrays["spacegroup"][index].astype(np.int64)),
            y=torch.from_numpy(y.astype(np.float32)),
            num_graphs=len(index),
            degree=degree,
            vec=torch.from_numpy(vec.astype(np.float32)),
        )


def _ranges(ptr: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat element indices of the ranges ``ptr[i]:ptr[i+1]`` for i in index, and their new ptr."""
    starts, counts = ptr[index], ptr[index + 1] - ptr[index]
    new_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    flat = np.arange(new_ptr[-1], dtype=np.int64) + np.repeat(starts - new_ptr[:-1], counts)
    return flat, new_ptr
