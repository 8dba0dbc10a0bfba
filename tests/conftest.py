"""Shared fixtures: an isolated cache directory and helpers that write small dataset files."""

from __future__ import annotations

import gzip
import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

REF_DIR = Path(__file__).parent / "data" / "reference_cgcnn"
os.environ.setdefault("RAY_AUTH_MODE", "token")  # before any test imports Ray (it reads this once)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every test session gets its own graph/split cache, so tests never see a user's cache."""
    path = tmp_path_factory.mktemp("ct-cache")
    old = os.environ.get("CRYSTALTUNE_CACHE_DIR")
    os.environ["CRYSTALTUNE_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("CRYSTALTUNE_CACHE_DIR", None)
    else:
        os.environ["CRYSTALTUNE_CACHE_DIR"] = old


#: address space of a capped CLI process: a hostile-input regression cannot take the machine down
MEMORY = 3 << 30


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def run_cli(
    args: list[str], cwd: Path, timeout: float = 120, capped: bool = True, shell: str | None = None, **env
) -> subprocess.CompletedProcess:
    """``python -m ARGS`` (or, with ``shell``, a bash command line given ``$PY``) capped at 3 GiB of address
    space (``capped=False`` for a search that starts Ray, whose raylet reserves more), no CUDA."""
    cmd = ["bash", "-c", shell] if shell else [sys.executable, "-m", *args]
    return subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit_memory if capped else None,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PY": sys.executable, **env},
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rocksalt(a: float = 5.64, species=("Na", "Cl")) -> Structure:
    """The 2-atom primitive rock-salt cell."""
    lat = Lattice([[0, a / 2, a / 2], [a / 2, 0, a / 2], [a / 2, a / 2, 0]])
    return Structure(lat, list(species), [[0, 0, 0], [0.5, 0.5, 0.5]])


def random_cell(seed: int, n: int = 4, elements=("Si", "O", "Mg", "Fe")) -> Structure:
    """A small triclinic cell with atoms kept >= 1 Å apart."""
    rng = np.random.default_rng(seed)
    lat = Lattice.from_parameters(*(rng.uniform(3.5, 6.0, 3)), *(rng.uniform(65, 115, 3)))
    coords: list[np.ndarray] = []
    while len(coords) < n:
        c = rng.random(3)
        s = Structure(lat, ["H"] * (len(coords) + 1), coords + [c])
        if len(coords) == 0 or min(s.get_distance(len(coords), j) for j in range(len(coords))) > 1.0:
            coords.append(c)
    return Structure(lat, [elements[i % len(elements)] for i in range(n)], coords)


def record(rid: str, structure: Structure | dict, **props) -> dict:
    s = structure.as_dict() if isinstance(structure, Structure) else structure
    return {"id": rid, "structure": s, **props}


def write_jsonl(path: Path, records: list, gz: bool = False) -> Path:
    lines = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n"
    if gz:
        path.write_bytes(gzip.compress(lines.encode()))
    else:
        path.write_text(lines)
    return path


@pytest.fixture
def small_records():
    """12 valid crystals with a band_gap target."""
    return [record(f"c{i:02d}", random_cell(i, n=2 + i % 3), band_gap=float(i) / 4) for i in range(12)]
