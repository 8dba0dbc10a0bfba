"""Shared fixtures: an isolated cache directory, helpers that write small dataset files, and the
session's one smoke search with the helper that reads its MLflow runs."""

from __future__ import annotations

import gzip
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
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


def run_report(
    work: Path, space: str, out: str, *args: str, timeout: float = 600
) -> tuple[subprocess.CompletedProcess, str]:
    """``python -m crystaltune.report SPACE --output WORK/OUT ARGS`` in ``work``, asserted to succeed;
    the process and its report.md text."""
    proc = subprocess.run(
        [sys.executable, "-m", "crystaltune.report", space, "--output", str(work / out), *args],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc, (work / out / "report.md").read_text()


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


def _watch_listeners(proc: subprocess.Popen, seen: dict, timeout: float) -> None:
    """Until ``proc`` ends, record every listening TCP socket of it and its descendants (Ray's GCS,
    raylet, agents, workers) as ``(pid, name, address) -> environment's RAY_AUTH_MODE``."""
    import psutil

    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            pids = {p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            break
        pids[proc.pid] = psutil.Process(proc.pid)
        for c in psutil.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN and c.pid in pids and (c.pid, c.laddr.ip) not in seen:
                try:
                    p = pids[c.pid]
                    seen[(c.pid, c.laddr.ip)] = (p.name(), c.laddr.port, p.environ().get("RAY_AUTH_MODE"))
                except psutil.Error:
                    pass
        time.sleep(0.5)


# One smoke search per test session, shared by test_search_e2e.py and test_report.py.
# A test that adds runs works on a copy of its MLflow store, so every test reads the same search.
@pytest.fixture(scope="session")
def smoke_search(tmp_path_factory):
    """Run `python -m crystaltune.search smoke` once, as a user would, in a scratch directory, and
    record the sockets it listens on while it runs."""
    work = tmp_path_factory.mktemp("smoke")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}  # what a new user has
    proc = subprocess.Popen(
        [sys.executable, "-m", "crystaltune.search", "smoke", "--output", str(work / "out")],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    listeners: dict = {}
    watcher = threading.Thread(target=_watch_listeners, args=(proc, listeners, 900), daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate(timeout=900)
    watcher.join(timeout=10)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return work, stdout, listeners


def _runs(work):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("crystaltune-smoke")
    return client, client.search_runs([exp.experiment_id], max_results=1000)
