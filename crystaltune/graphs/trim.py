"""Fewer neighbours from a cached graph: the k nearest of a graph built with K >= k neighbours.

Edges are stored per centre atom in (distance shell, element, bond vector) order, so the first k edges of each
centre are exactly what building with ``max_neighbors = k`` gives. A search over the number of
neighbours therefore builds (and caches) its graphs once, with the largest k it searches.
"""

from __future__ import annotations

import numpy as np

from .store import EDGE_KEYS, GraphStore


def trim_neighbors(store: GraphStore, k: int) -> GraphStore:
    """A store keeping each atom's ``k`` nearest neighbours (the same store when none has more)."""
    n_edges = np.diff(store.edge_ptr)
    graph_of_edge = np.repeat(np.arange(len(store)), n_edges)
    centre = store.arrays["dst"].astype(np.int64) + store.node_ptr[graph_of_edge]  # global centre index
    if len(centre) == 0:
        return store
    start = np.flatnonzero(np.r_[True, centre[1:] != centre[:-1]])  # first edge of each centre's run
    rank = np.arange(len(centre)) - np.repeat(start, np.diff(np.r_[start, len(centre)]))
    keep = rank < k
    if keep.all():
        return store
    arrays = dict(store.arrays)
    arrays.update({key: store.arrays[key][keep] for key in EDGE_KEYS})
    counts = np.bincount(graph_of_edge[keep], minlength=len(store))
    edge_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(store.edge_ptr.dtype)
    return GraphStore(store.ids, store.node_ptr, edge_ptr, arrays, store.props)
