"""Graph pooling: atom embeddings -> one vector per crystal."""

from __future__ import annotations

from torch import nn
from torch_geometric.nn.aggr import AttentionalAggregation, Set2Set
from torch_geometric.utils import scatter

from ..registry import Registry

POOLINGS: Registry = Registry("pooling")


class _Scatter(nn.Module):
    def __init__(self, dim: int, reduce: str):
        super().__init__()
        self.reduce = reduce
        self.out_dim = dim

    def forward(self, x, batch, num_graphs):
        return scatter(x, batch, dim=0, dim_size=num_graphs, reduce=self.reduce)


@POOLINGS.register("mean")
def mean_pool(dim: int) -> nn.Module:
    """Mean over a crystal's atoms (CGCNN)."""
    return _Scatter(dim, "mean")


@POOLINGS.register("sum")
def sum_pool(dim: int) -> nn.Module:
    """Sum over atoms: extensive properties."""
    return _Scatter(dim, "sum")


@POOLINGS.register("max")
def max_pool(dim: int) -> nn.Module:
    return _Scatter(dim, "max")


class _PyGAggr(nn.Module):
    def __init__(self, aggr: nn.Module, out_dim: int):
        super().__init__()
        self.aggr = aggr
        self.out_dim = out_dim

    def forward(self, x, batch, num_graphs):
        return self.aggr(x, batch, dim_size=num_graphs)


@POOLINGS.register("set2set")
def set2set_pool(dim: int) -> nn.Module:
    """Set2Set (Vinyals et al.), 3 processing steps; output 2 x dim."""
    return _PyGAggr(Set2Set(dim, processing_steps=3), 2 * dim)


@POOLINGS.register("attention")
def attention_pool(dim: int) -> nn.Module:
    """Gated attention pooling: softmax(gate(x)) weighted sum of nn(x)."""
    gate = nn.Sequential(nn.Linear(dim, dim), nn.Softplus(), nn.Linear(dim, 1))
    return _PyGAggr(AttentionalAggregation(gate), dim)


def make_pooling(name: str, dim: int) -> nn.Module:
    return POOLINGS.get(name)(dim)
