"""Datasets: the catalog of named datasets, target selection and splits (file readers: crystaltune.readers)."""

from ..readers import read_source
from .catalog import DATASETS, resolve
from .dataset import Dataset, Split, load_dataset

__all__ = ["DATASETS", "Dataset", "Split", "load_dataset", "read_source", "resolve"]
