"""Featurizers computed on the fly inside the model: edge expansions and element feature tables."""

from .edge import EDGE_FEATURIZERS, make_edge_featurizer
from .node import NODE_TABLES, NodeFeaturizer, node_table, supported_elements, unsupported_crystals

__all__ = [
    "EDGE_FEATURIZERS",
    "NODE_TABLES",
    "NodeFeaturizer",
    "make_edge_featurizer",
    "node_table",
    "supported_elements",
    "unsupported_crystals",
]
