"""A Dataset: the graphs of one source restricted to crystals with the chosen targets, plus splits."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CrystaltuneError
from ..graphs.cache import GraphParams, cache_dir, load_graphs
from ..graphs.store import GraphStore
from .catalog import resolve


@dataclass
class Split:
    """Train/val/test index arrays into a Dataset's store, and the id lists they came from."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    ids: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Dataset:
    name: str
    source: str
    targets: list[str]
    store: GraphStore
    skipped: list[dict[str, str]]
    key: str
    params: GraphParams

    def __len__(self) -> int:
        return len(self.store)

    def split(
        self,
        seed: int = 0,
        fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        cache: bool = True,
        folds: int | None = None,
        fold: int = 0,
        val_folds: int | None = None,
    ) -> Split:
        """Seeded random split, made once per (dataset content, targets, seed, fractions) and stored as
        id lists so every trial of a search sees the same crystals. With ``folds`` the test set is
        fold ``fold`` of a seeded k-fold partition and train/val share the rest as fractions[0:2] do.
        With ``val_folds`` the test set is the plain split's and the validation set is fold ``fold`` of
        the rest (cross-validation for choosing a model that never sees the test crystals)."""
        if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6 or fractions[0] == 0:
            raise CrystaltuneError(f"split fractions must be 3 non-negative numbers summing to 1, got {fractions}")
        tag = f"{self.name}-{self.key}-{'+'.join(self.targets)}-s{seed}-{'-'.join(f'{f:g}' for f in fractions)}"
        if folds:
            tag += f"-cv{folds}.{fold}"
        if val_folds:
            tag += f"-valcv{val_folds}.{fold}"
        file = cache_dir() / "splits" / f"{tag}.json"
        ids = None
        if cache and file.exists():
            try:
                ids = json.loads(file.read_text())
                if set(ids) != {"train", "val", "test"} or sum(map(len, ids.values())) != len(self):
                    ids = None
            except (OSError, ValueError):
                ids = None
        if ids is None:
            order = np.random.default_rng(seed).permutation(np.sort(self.store.ids))
            ids = _split_ids(order, fractions, folds, fold, val_folds)
            if cache:
                file.parent.mkdir(parents=True, exist_ok=True)
                tmp = file.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(ids))
                os.replace(tmp, file)
        pos = {rid: i for i, rid in enumerate(self.store.ids)}
        return Split(*(np.array([pos[r] for r in ids[k]], dtype=np.int64) for k in ("train", "val", "test")), ids=ids)


def _split_ids(
    order: np.ndarray, fractions, folds: int | None, fold: int, val_folds: int | None = None
) -> dict[str, list[str]]:
    """train/val/test id lists from a shuffled id order (see Dataset.split)."""
    if folds:
        parts = np.array_split(order, folds)
        test, rest = parts[fold], np.concatenate([p for i, p in enumerate(parts) if i != fold])
        n_val = int(round(fractions[1] / (fractions[0] + fractions[1]) * len(rest)))
        return {"train": rest[n_val:].tolist(), "val": rest[:n_val].tolist(), "test": test.tolist()}
    n_train = int(round(fractions[0] * len(order)))
    n_val = int(round(fractions[1] * len(order)))
    if val_folds:
        parts = np.array_split(order[: n_train + n_val], val_folds)
        train = np.concatenate([p for i, p in enumerate(parts) if i != fold])
        return {"train": train.tolist(), "val": parts[fold].tolist(), "test": order[n_train + n_val :].tolist()}
    return {
        "train": order[:n_train].tolist(),
        "val": order[n_train : n_train + n_val].tolist(),
        "test": order[n_train + n_val :].tolist(),
    }


def load_dataset(
    name_or_path: str | Path,
    targets: list[str] | str | None = None,
    *,
    data: str | Path | None = None,
    params: GraphParams | None = None,
    strict: bool = False,
    use_cache: bool = True,
    progress: bool | None = None,
) -> Dataset:
    """Read (or load cached) graphs and keep the crystals that have the chosen targets.

    With several targets a crystal is kept when at least one is present (the loss is masked).
    ``strict`` turns any skipped record into an error.
    """
    name, path, defaults = resolve(name_or_path, data)
    params = params or GraphParams()
    gs = load_graphs(path, params, use_cache=use_cache, progress=progress)
    store = gs.store
    if isinstance(targets, str):
        targets = [targets]
    skipped = list(gs.skipped)
    if len(store) == 0 and skipped:  # say why, not that the (empty) data lacks the target
        what = f"no record has target {targets[0]!r}" if targets else "no numeric property to use as a target"
        raise CrystaltuneError(f"{path}: {what}: every record was skipped ({_first_reasons(skipped)})")
    targets = list(targets or defaults or _guess_targets(store))
    if not targets:
        raise CrystaltuneError(f"{path}: no numeric property to use as a target")
    for t in targets:
        if t not in store.props:
            known = ", ".join(sorted(store.props)) or "none"
            raise CrystaltuneError(f"{path}: no record has target {t!r} (numeric properties: {known})")
    out_of_range = _mask_out_of_range(store, targets)
    present = np.stack([np.isfinite(store.props[t]) for t in targets], axis=1)
    keep = present.any(axis=1)
    for g in np.flatnonzero(~keep):
        rid = str(store.ids[g])
        why = "; ".join(
            f"target {t!r} {out_of_range.get((g, t)) or gs.bad_props[g].get(t, 'is missing')}" for t in targets
        )
        skipped.append({"id": rid, "reason": f"{rid}: {why}"})
    if strict and skipped:
        raise CrystaltuneError(f"{len(skipped)} record(s) skipped (--strict); first: {skipped[0]['reason']}")
    if not keep.any():
        raise CrystaltuneError(f"{path}: no usable crystal ({_first_reasons(skipped)})")
    if not keep.all():
        store = store.subset(np.flatnonzero(keep))
    _check_scale(path, store, targets)
    return Dataset(name, str(path), targets, store, skipped, gs.key, params)


#: target magnitudes trained on: float32 (the training precision) holds 1e-38..3e38, and these bounds
#: keep every sum of errors over a million crystals, and every normalised value, finite and exact enough
MAX_TARGET, MIN_TARGET_SCALE = 1e30, 1e-30


def _first_reasons(skipped: list[dict[str, str]], k: int = 2) -> str:
    """'N skipped; first: reason; reason; ...' for an error line."""
    first = "; ".join(s["reason"][:200] for s in skipped[:k])
    return f"{len(skipped)} skipped; first: {first}"


def _mask_out_of_range(store: GraphStore, targets: list[str]) -> dict[tuple[int, str], str]:
    """Targets beyond +-MAX_TARGET become missing (NaN), like a NaN target; returns their reasons."""
    reasons: dict[tuple[int, str], str] = {}
    for t in targets:
        v = store.props[t]
        huge = np.isfinite(v) & (np.abs(v) > MAX_TARGET)
        for g in np.flatnonzero(huge):
            reasons[(int(g), t)] = (
                f"is {v[g]:.3g}, beyond the +-{MAX_TARGET:.0e} that float32 training holds: rescale it (other units)"
            )
        if huge.any():
            store.props[t] = np.where(huge, np.nan, v)
    return reasons


def _check_scale(path: Path, store: GraphStore, targets: list[str]) -> None:
    """A target whose every value is smaller than MIN_TARGET_SCALE (but not all zero) is refused:
    float32 turns such values into denormals or zeros, and the model would learn nothing."""
    for t in targets:
        v = store.props[t][np.isfinite(store.props[t])]
        scale = float(np.abs(v).max()) if len(v) else 0.0
        if 0 < scale < MIN_TARGET_SCALE:
            g = int(np.flatnonzero(np.isfinite(store.props[t]))[np.argmax(np.abs(v))])
            raise CrystaltuneError(
                f"{path}: target {t!r} is at most {scale:.3g} in magnitude (e.g. {store.ids[g]}), below the "
                f"{MIN_TARGET_SCALE:.0e} that float32 training resolves: rescale it (other units)"
            )


def _guess_targets(store: GraphStore) -> list[str]:
    for cand in ("band_gap", "target", "formation_energy_per_atom", "heat_of_formation"):
        if cand in store.props:
            return [cand]
    return sorted(store.props)[:1]
