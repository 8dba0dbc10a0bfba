"""A GraphStore whose arrays live on the training device: batches are gathered there by index, with no
per-batch collate on the CPU and no host-to-device copy of the graphs (only a few per-graph numbers).

The offsets (node_ptr / edge_ptr, a few KB) stay on the host, so batch sizes are known without a
device sync; the flat node and edge indices are built on the device from per-graph starts and counts.
Stores larger than a memory budget stay on the host (pinned, when the device is a GPU) and go through
GraphStore.batch as before (see ``on_device``).
"""

from __future__ import annotations

import numpy as np
import torch

from .store import EDGE_KEYS, GRAPH_KEYS, NODE_KEYS, Batch, GraphStore

#: stores up to this size (bytes) are moved to a GPU whole; larger ones are batched from host memory
DEVICE_BUDGET = 4 * 2**30


class DeviceGraphStore:
    """The arrays of ``store`` as tensors on ``device``; ``batch`` returns the same Batch as
    ``GraphStore.batch`` (without position noise), assembled on the device."""

    def __init__(self, store: GraphStore, device: torch.device | str):
        self.store = store
        self.device = torch.device(device)
        dtypes = {
            "z": torch.int64,
            "src": torch.int64,
            "dst": torch.int64,
            "dist": torch.float32,
            "cell": torch.float32,
            "spacegroup": torch.int64,
            "image": torch.float64,
            "pos": torch.float64,
            "lattice": torch.float64,
        }  # vec in float64 then float32, as on the host
        self.arrays = {
            k: torch.as_tensor(np.ascontiguousarray(store.arrays[k])).to(self.device, dtypes[k])
            for k in NODE_KEYS + EDGE_KEYS + GRAPH_KEYS
        }
        self.props = {k: torch.as_tensor(v, dtype=torch.float32).to(self.device) for k, v in store.props.items()}
        self._uniform = _uniform_degree(store)

    def __len__(self) -> int:
        return len(self.store)

    def _flat(self, ptr: np.ndarray, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Device flat indices of ranges ptr[i]:ptr[i+1] for i in index, the new offsets (device and host)."""
        starts, counts = ptr[index], ptr[index + 1] - ptr[index]
        new_ptr = np.concatenate([[0], np.cumsum(counts)])
        total = int(new_ptr[-1])
        shift = torch.as_tensor(starts - new_ptr[:-1], device=self.device)
        counts_t = torch.as_tensor(counts, device=self.device)
        flat = torch.arange(total, device=self.device) + torch.repeat_interleave(shift, counts_t, output_size=total)
        return flat, torch.as_tensor(new_ptr, device=self.device), new_ptr

    def batch(self, index: np.ndarray, targets: list[str]) -> Batch:
        index = np.asarray(index, dtype=np.int64)
        node_idx, node_ptr_t, node_ptr = self._flat(self.store.node_ptr, index)
        edge_idx, _, edge_ptr = self._flat(self.store.edge_ptr, index)
        n_edges = torch.as_tensor(np.diff(edge_ptr), device=self.device)
        shift = torch.repeat_interleave(node_ptr_t[:-1], n_edges, output_size=int(edge_ptr[-1]))
        a = self.arrays
        src = a["src"].index_select(0, edge_idx) + shift
        dst = a["dst"].index_select(0, edge_idx) + shift
        graph = torch.as_tensor(index, device=self.device)
        y = (
            torch.stack([self.props[t].index_select(0, graph) for t in targets], 1)
            if targets
            else torch.zeros(len(index), 0, device=self.device)
        )
        ks = self._uniform[index]
        degree = int(ks[0]) if len(ks) and ks[0] > 0 and (ks == ks[0]).all() else 0
        pos = a["pos"]
        lattice = a["lattice"].index_select(0, graph)
        n_nodes = torch.as_tensor(np.diff(node_ptr), device=self.device)
        graph_of_edge = torch.repeat_interleave(
            torch.arange(len(index), device=self.device), n_edges, output_size=int(edge_ptr[-1])
        )
        offset = torch.einsum(
            "ei,eij->ej", a["image"].index_select(0, edge_idx), lattice.index_select(0, graph_of_edge)
        )
        node_pos = pos.index_select(0, node_idx)
        return Batch(
            z=a["z"].index_select(0, node_idx),
            edge_index=torch.stack([src, dst]),
            dist=a["dist"].index_select(0, edge_idx),
            batch=torch.repeat_interleave(
                torch.arange(len(index), device=self.device), n_nodes, output_size=int(node_ptr[-1])
            ),
            cell=a["cell"].index_select(0, graph),
            spacegroup=a["spacegroup"].index_select(0, graph),
            y=y,
            num_graphs=len(index),
            degree=degree,
            vec=(node_pos.index_select(0, src) + offset - node_pos.index_select(0, dst)).float(),
        )


def _uniform_degree(store: GraphStore) -> np.ndarray:
    """Per graph: k when its edges are sorted by centre atom and every atom has exactly k, else 0 (the
    condition GraphStore.batch tests per batch; a batch of graphs that all have the same k has it)."""
    out = np.zeros(len(store), dtype=np.int64)
    n_nodes, n_edges = np.diff(store.node_ptr), np.diff(store.edge_ptr)
    dst = store.arrays["dst"]
    for g in np.flatnonzero((n_nodes > 0) & (n_edges % np.maximum(n_nodes, 1) == 0)):
        k = n_edges[g] // n_nodes[g]
        if k and np.array_equal(dst[store.edge_ptr[g] : store.edge_ptr[g + 1]], np.repeat(np.arange(n_nodes[g]), k)):
            out[g] = k
    return out


def on_device(store: GraphStore, device: torch.device, budget: int = DEVICE_BUDGET) -> DeviceGraphStore | None:
    """A device copy of ``store`` for a GPU when it fits the budget, else None (batch on the host)."""
    size = sum(v.nbytes for v in store.arrays.values())
    if device.type != "cuda" or size > budget:
        return None
    return DeviceGraphStore(store, device)
