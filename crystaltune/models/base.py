"""CrystalModel: featurizers -> backbone -> pooling (+ global features) -> one head per target.

Subclasses implement only the message-passing backbone (``build_backbone`` / ``message_passing``);
featurizers, pooling, global features and heads are shared so every model takes the same options.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..featurizers import NodeFeaturizer, make_edge_featurizer
from ..graphs.store import Batch
from ..registry import Registry
from ..schema import document
from .params import ModelParams, parse_params
from .pooling import make_pooling

if TYPE_CHECKING:  # config imports the registries (lazily), never the reverse
    from ..config import ModelConfig

N_CRYSTAL_SYSTEMS = 7
#: crystal-level descriptors a model can append to its pooled vector (``model.global_features``)
GLOBAL_FEATURES = ("lattice", "symmetry")


def crystal_system(spacegroup: torch.Tensor) -> torch.Tensor:
    """Crystal-system index 0..6 (triclinic..cubic) from the space-group number; unknown -> 0."""
    bounds = torch.tensor([2, 15, 74, 142, 167, 194, 230], device=spacegroup.device)
    return torch.bucketize(spacegroup.clamp(1, 230), bounds, right=False)


class GlobalFeatures(nn.Module):
    """Crystal-level descriptors concatenated to the pooled vector: ``lattice`` (a, b, c / 10 Å,
    cosines of the angles, volume per atom / 20 Å^3, density / 5 g cm^-3) and ``symmetry`` (crystal
    system one-hot, space group / 230)."""

    def __init__(self, kinds: list[str]):
        super().__init__()
        self.kinds = list(kinds)
        self.out_dim = 8 * ("lattice" in self.kinds) + (N_CRYSTAL_SYSTEMS + 1) * ("symmetry" in self.kinds)

    def forward(self, batch: Batch) -> torch.Tensor | None:
        parts = []
        if "lattice" in self.kinds:
            c = batch.cell
            parts.append(
                torch.cat([c[:, :3] / 10.0, torch.cos(torch.deg2rad(c[:, 3:6])), c[:, 6:7] / 20.0, c[:, 7:8] / 5.0], 1)
            )
        if "symmetry" in self.kinds:
            sg = batch.spacegroup
            onehot = nn.functional.one_hot(crystal_system(sg), N_CRYSTAL_SYSTEMS).float()
            parts.append(torch.cat([onehot, (sg.float() / 230.0)[:, None]], 1))
        return torch.cat(parts, 1) if parts else None


NORMS: Registry = Registry("norm")
NORMS.register("batch")(nn.BatchNorm1d)
NORMS.register("layer")(nn.LayerNorm)
NORMS.register("none")(lambda dim: nn.Identity())


def make_norm(kind: str, dim: int) -> nn.Module:
    """A normalisation layer by name (``model.norm``); unknown names raise, they never mean none."""
    return NORMS.get(kind)(dim)


class CrystalModel(nn.Module):
    """Base class of every registered model. ``Params``: the dataclass of its ``model.params``
    options, passed to the constructor as one object (``params``, checked there: None gives the
    defaults). Each option also reads as an attribute of the model (``model.angles``) unless the
    model already uses the name; the class docstring's option list is generated from ``Params``."""

    Params: type[ModelParams] = ModelParams

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "Params" in vars(cls):
            document(cls, cls.Params, "model.params")

    def __init__(self, config: ModelConfig, n_targets: int = 1, cutoff: float = 8.0, params: ModelParams | None = None):
        super().__init__()
        self.config = config
        # build_model has parsed them already; checked again for direct construction (types included)
        self.params = parse_params(self.Params, params, config)
        self.n_targets = n_targets
        self.node = NodeFeaturizer(config.node_featurizer, trainable=config.node_trainable)
        self.edge = make_edge_featurizer(config.edge_featurizer, cutoff=cutoff, **config.edge_params)
        self.edge_proj = (
            nn.Sequential(nn.Linear(self.edge.out_dim, config.edge_dim), nn.Softplus())
            if config.learnable_edge
            else None
        )
        self.edge_dim = config.edge_dim if config.learnable_edge else self.edge.out_dim
        self.embedding = nn.Linear(self.node.out_dim, config.hidden)
        self.build_backbone()
        self.pool = make_pooling(config.pooling, config.hidden)
        self.globals = GlobalFeatures(config.global_features)
        self.dropout = nn.Dropout(config.dropout)
        pooled = self.pool.out_dim + self.globals.out_dim
        self.conv_to_fc = nn.Linear(pooled, config.head_hidden)
        self.act = nn.Softplus()
        self.heads = nn.ModuleList(self._head(config) for _ in range(n_targets))
        for f in dataclasses.fields(self.params):
            if not hasattr(self, f.name):
                setattr(self, f.name, getattr(self.params, f.name))

    def _head(self, config: ModelConfig) -> nn.Module:
        layers: list[nn.Module] = []
        for _ in range(config.head_layers - 1):
            layers += [nn.Linear(config.head_hidden, config.head_hidden), nn.Softplus(), nn.Dropout(config.dropout)]
        layers.append(nn.Linear(config.head_hidden, 1))
        return nn.Sequential(*layers)

    # to implement ----------------------------------------------------------------------------------
    def build_backbone(self) -> None:
        raise NotImplementedError

    def message_passing(self, x: torch.Tensor, edge_index: torch.Tensor, e: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Default: apply ``self.blocks`` (modules called as ``block(x, edge_index, e)``) in order."""
        for block in self.blocks:
            x = block(x, edge_index, e)
        return x

    # shared ---------------------------------------------------------------------------------------
    def edge_features(self, batch: Batch) -> torch.Tensor:
        z = batch.z
        e = self.edge(batch.dist, z[batch.edge_index[0]], z[batch.edge_index[1]])
        return self.edge_proj(e) if self.edge_proj is not None else e

    def embed(self, batch: Batch) -> torch.Tensor:
        """Pooled crystal embedding (before global features and heads): what the contrastive
        alignment/uniformity metrics look at."""
        x = self.embedding(self.node(batch.z))
        x = self.message_passing(x, batch.edge_index, self.edge_features(batch), batch)
        return self.pool(x, batch.batch, batch.num_graphs)

    def readout(self, pooled: torch.Tensor, batch: Batch) -> torch.Tensor:
        g = self.globals(batch)
        h = pooled if g is None else torch.cat([pooled, g], 1)
        h = self.act(self.conv_to_fc(self.act(h)))
        h = self.dropout(h)
        return torch.cat([head(h) for head in self.heads], 1)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Normalised predictions, (num_graphs, n_targets)."""
        return self.readout(self.embed(batch), batch)
