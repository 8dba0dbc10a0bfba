"""Named datasets: the shipped perovskite sets and SNUMAT, which is read from the user's file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import CrystaltuneError
from ..readers import FORMATS_HELP
from ..registry import Registry

SNUMAT_FILES = ("inorganic_SUNMAT_10k.json", "inorganic_SUNMAT_10k.json.gz", "sunmat.json", "snumat.json", "SNUMAT")


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset known by name: where its file is and which target to use by default."""

    name: str
    default_targets: tuple[str, ...]
    description: str
    package_file: str | None = None  # shipped inside crystaltune/data/files
    user_files: tuple[str, ...] = ()  # looked up in --data / CRYSTALTUNE_DATA_DIR

    def locate(self, data: str | Path | None = None) -> Path:
        if data is not None:
            return Path(data)
        if self.package_file:
            return Path(str(resources.files("crystaltune.data") / "files" / self.package_file))
        where = data_dirs()
        for d in where:
            for f in self.user_files:
                if (d / f).exists():
                    return d / f
        places = ", ".join(str(d) for d in where)
        raise CrystaltuneError(
            f"dataset {self.name!r} is not shipped (license); put one of {', '.join(self.user_files)} in "
            f"$CRYSTALTUNE_DATA_DIR (searched: {places}) or pass --data PATH. Formats: {FORMATS_HELP}"
        )


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def data_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("CRYSTALTUNE_DATA_DIR", "").split(os.pathsep) if p]
    return dirs + [Path.cwd() / "data", Path.home() / ".crystaltune" / "data"]


for _spec in (
    DatasetSpec(
        "perovskites",
        ("band_gap",),
        "HOIP, 1346 hybrid halide perovskites, HSE06 band gap (Kim et al. 2017)",
        package_file="hoip_kim2017_bandgap.jsonl.gz",
    ),
    DatasetSpec(
        "perov5",
        ("heat_of_formation_all",),
        "7572 ABX3 perovskites, heat of formation (Castelli et al. 2012)",
        package_file="perov5_castelli2012.jsonl.gz",
    ),
    DatasetSpec(
        "sunmat",
        ("band_gap",),
        "SNUMAT 10k HSE band gaps (the notes' 'SUNMAT'); user-supplied file",
        user_files=SNUMAT_FILES,
    ),
):
    DATASETS.register(_spec.name)(_spec)


def resolve(name_or_path: str | Path, data: str | Path | None = None) -> tuple[str, Path, tuple[str, ...]]:
    """(display name, path, default targets) for a registry name or a path."""
    text = str(name_or_path)
    if text in DATASETS:
        spec = DATASETS.get(text)
        return spec.name, spec.locate(data), spec.default_targets
    path = Path(text)
    if path.exists() or os.sep in text or "." in text:
        if not path.exists():
            raise CrystaltuneError(f"{path}: no such file or folder (formats: {FORMATS_HELP})")
        return path.name.split(".")[0], path, ()
    raise CrystaltuneError(DATASETS.unknown_message(text) + "; or give a path to a dataset file")
