"""The data of one trial: graphs, targets and a split that is the same whatever the featurizers."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..config import TrialConfig
from ..data.dataset import Dataset, load_dataset
from ..featurizers import unsupported_crystals
from ..graphs.cache import GraphParams
from ..graphs.store import GraphStore
from ..graphs.trim import trim_neighbors


@dataclass
class TrialData:
    """Graph store plus train/val/test indices; crystals the node featurizer cannot describe are
    removed from the split after it is made, so every featurizer sees the same split otherwise."""

    store: GraphStore
    targets: list[str]
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    name: str
    dropped: list[dict[str, str]]


def load_trial_dataset(cfg: TrialConfig, progress: bool | None = None) -> Dataset:
    """The dataset (cached graphs) for a config, limited to a seeded subset when ``data.limit`` is set."""
    d = cfg.data
    ds = load_dataset(
        d.dataset, d.targets, data=d.file, params=GraphParams(d.cutoff, d.max_neighbors), progress=progress
    )
    if d.limit and d.limit < len(ds):
        keep = np.sort(np.random.default_rng(d.split_seed).permutation(len(ds))[: d.limit])
        ds = Dataset(
            f"{ds.name}-limit{d.limit}", ds.source, ds.targets, ds.store.subset(keep), ds.skipped, ds.key, ds.params
        )
    return ds


def prepare_trial_data(cfg: TrialConfig, dataset: Dataset | None = None) -> TrialData:
    """The trial's graphs and split. ``dataset`` may hold graphs built with more neighbours than the
    config asks for (a search over ``data.max_neighbors`` builds them once, with its largest k)."""
    ds = dataset if dataset is not None else load_trial_dataset(cfg)
    if ds.params.max_neighbors is None or ds.params.max_neighbors > cfg.data.max_neighbors:
        ds = replace(ds, store=trim_neighbors(ds.store, cfg.data.max_neighbors))
    d = cfg.data
    split = ds.split(d.split_seed, tuple(d.split), folds=d.folds, fold=d.fold)
    bad = unsupported_crystals(ds.store.arrays["z"], ds.store.node_ptr, cfg.model.node_featurizer)
    dropped = [{"id": str(ds.store.ids[g]), "reason": reason} for g, reason in bad.items()]
    ok = np.ones(len(ds.store), bool)
    ok[list(bad)] = False
    idx = [s[ok[s]] for s in (split.train, split.val, split.test)]
    return TrialData(ds.store, ds.targets, *idx, name=ds.name, dropped=dropped)
