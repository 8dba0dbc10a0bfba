"""The data of one trial: graphs, targets and a split that is the same whatever the featurizers."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..config import TrialConfig
from ..data.dataset import Dataset, load_dataset
from ..errors import CrystaltuneError
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
    split = ds.split(d.split_seed, tuple(d.split), folds=d.folds, fold=d.fold, val_folds=d.val_folds)
    bad = unsupported_crystals(ds.store.arrays["z"], ds.store.node_ptr, cfg.model.node_featurizer)
    dropped = [{"id": str(ds.store.ids[g]), "reason": reason} for g, reason in bad.items()]
    ok = np.ones(len(ds.store), bool)
    ok[list(bad)] = False
    idx = [s[ok[s]] for s in (split.train, split.val, split.test)]
    data = TrialData(ds.store, ds.targets, *idx, name=ds.name, dropped=dropped)
    check_split(data, cfg)
    return data


def check_dataset_split(ds: Dataset, cfg: TrialConfig) -> None:
    """check_split for a whole dataset before any trial (a search's driver, before Ray starts)."""
    d = cfg.data
    split = ds.split(d.split_seed, tuple(d.split), folds=d.folds, fold=d.fold, val_folds=d.val_folds)
    check_split(TrialData(ds.store, ds.targets, split.train, split.val, split.test, ds.name, []), cfg)


def check_split(data: TrialData, cfg: TrialConfig) -> None:
    """Every part of the split holds a crystal: an empty validation set fails every epoch, an empty
    test set gives NaN test metrics; both are refused with the smallest dataset that would do."""
    sizes = {"train": len(data.train), "val": len(data.val), "test": len(data.test)}
    empty = [k for k, n in sizes.items() if n == 0]
    if not empty:
        return
    d = cfg.data
    split = "/".join(f"{f:g}" for f in d.split)
    if d.folds or d.val_folds:
        split = f"{'val ' if d.val_folds else ''}fold {d.fold} of {d.folds or d.val_folds}"
    need = smallest_splittable(tuple(d.split), d.folds, d.fold, d.val_folds)
    dropped = f", {len(data.dropped)} dropped by node featurizer {cfg.model.node_featurizer!r}" if data.dropped else ""
    raise CrystaltuneError(
        f"{data.name}: {sum(sizes.values())} usable crystal(s){dropped} split {sizes['train']} train / "
        f"{sizes['val']} val / {sizes['test']} test (data.split {split}): the {' and '.join(empty)} set is empty; "
        + (f"use a dataset of at least {need} crystals" if need else "use a larger dataset")
        + " (or other data.split fractions)"
    )


def smallest_splittable(
    fractions: tuple[float, ...], folds: int | None, fold: int, val_folds: int | None = None, upto: int = 10_000
) -> int | None:
    """The fewest crystals whose split (these fractions or folds) leaves no part empty, or None."""
    from ..data.dataset import _split_ids

    for n in range(3, upto):
        parts = _split_ids(np.arange(n), fractions, folds, fold, val_folds)
        if all(parts.values()):
            return n
    return None
