"""Crystal graphs: periodic neighbour lists, flat graph store, cached parallel preprocessing."""

from .build import graph_from_structure
from .cache import GraphParams, GraphSet, load_graphs
from .neighbors import neighbor_list
from .store import Batch, GraphStore

__all__ = ["Batch", "GraphParams", "GraphSet", "GraphStore", "graph_from_structure", "load_graphs", "neighbor_list"]
