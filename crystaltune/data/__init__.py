"""Datasets: readers for crystal files, the registry of named datasets, target selection and splits."""

from __future__ import annotations

import importlib

_LAZY = {
    "Dataset": "dataset",
    "Split": "dataset",
    "load_dataset": "dataset",
    "read_source": "readers",
    "DATASETS": "registry",
    "resolve": "registry",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    # lazy so that crystaltune.graphs can import the readers without a cycle through dataset.py
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
