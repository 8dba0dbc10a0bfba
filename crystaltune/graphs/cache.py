"""Preprocess once: build every crystal graph in parallel, cache on disk keyed by content + params."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
import stat
import tempfile
import threading
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..errors import CrystaltuneError
from ..readers import RawDataset, check_source, path_kind, read_bytes, read_source
from .build import build_graph
from .store import GraphStore
from .structure import RecordError

#: Bump when the stored arrays change meaning; old cache files are then ignored.
#: 4: ties at the k-th neighbour broken by element; 5: reduced cell, cell-invariant lattice features, near-tie shells
CACHE_FORMAT = 5


@dataclass(frozen=True)
class GraphParams:
    """What a crystal graph depends on (featurizers do not: they run inside the model)."""

    cutoff: float = 8.0
    max_neighbors: int | None = 12
    #: "crystaltune" (deterministic, invariant tie-break) or "reference" (the reference CGCNN code's
    #: choice, for predicting with its checkpoints exactly)
    neighbors: str = "crystaltune"

    def __post_init__(self):
        if not (self.cutoff > 0):
            raise ValueError(f"cutoff must be > 0, got {self.cutoff}")
        if self.max_neighbors is not None and self.max_neighbors < 1:
            raise ValueError(f"max_neighbors must be >= 1 or None, got {self.max_neighbors}")


@dataclass
class GraphSet:
    """Graphs of one source plus the records that were skipped and why."""

    store: GraphStore
    skipped: list[dict[str, str]]
    bad_props: list[dict[str, str]]
    source: str
    key: str
    from_cache: bool = False
    params: GraphParams = field(default_factory=GraphParams)


def cache_dir() -> Path:
    return Path(os.environ.get("CRYSTALTUNE_CACHE_DIR", Path.home() / ".cache" / "crystaltune"))


def content_hash(path: Path, raw: bytes | None = None) -> str:
    """sha256 of a file, of every regular file (name and bytes) in a folder, or of ``raw``, the bytes
    already read from a pipe (it can be read once only). Special files are never opened (a FIFO or a
    device would hang or never end the hash); an unreadable file in a folder counts by its name."""
    h = hashlib.sha256()
    if raw is not None:
        h.update(raw)
        return h.hexdigest()
    if not path.is_dir():
        h.update(os.fsencode(path.name))
        problem = _hash_file(h, path)
        if problem:
            raise CrystaltuneError(f"{path}: {problem}")
        return h.hexdigest()
    for f in sorted(path.rglob("*")):
        if f.is_file():  # links followed; FIFOs, devices, sockets, loops and dangling links left out
            h.update(os.fsencode(f.relative_to(path)))  # names that are not UTF-8 too
            _hash_file(h, f)
    return h.hexdigest()


def _hash_file(h, file: Path) -> str | None:
    """Feed a regular file's bytes to ``h``; why not (nothing fed) when it cannot be read as one."""
    try:  # O_NONBLOCK: a FIFO put in the file's place since it was listed cannot block the open
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb", buffering=0) as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return "not a regular file"
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        return f"cannot read ({exc.strerror})"
    return None


def load_graphs(
    path: str | Path,
    params: GraphParams = GraphParams(),
    *,
    use_cache: bool = True,
    workers: int | None = None,
    progress: bool | None = None,
) -> GraphSet:
    """Graphs for a dataset file or folder, from the cache when its key matches, else built and cached."""
    path = Path(path)
    check_source(path)
    # a pipe (``<(zcat data.jsonl.gz)``) is read once: those bytes are hashed and parsed, and never cached
    raw = read_bytes(path, pipe_ok=True) if path_kind(path) == "pipe" else None
    use_cache = use_cache and raw is None
    key = hashlib.sha256(
        json.dumps({"content": content_hash(path, raw), "params": _key_params(params), "format": CACHE_FORMAT}).encode()
    ).hexdigest()[:20]
    file = cache_dir() / "graphs" / f"{path.name.split('.')[0]}-{key}.npz"
    if use_cache and file.exists():
        cached = _read_cache(file)
        if cached is not None:
            store, skipped, bad = cached
            return GraphSet(store, skipped, bad, str(path), key, from_cache=True, params=params)
    records = read_source(path, raw)
    store, skipped, bad = build_store(records, params, workers=workers, progress=progress)
    if use_cache:
        _write_cache(file, store, skipped, bad)
    return GraphSet(store, skipped, bad, str(path), key, params=params)


def _ignore_ctrl_c() -> None:
    """In a pool worker: Ctrl-C is the parent's to handle (it then terminates the pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def graph_pool(workers: int):
    """A fork pool for building graphs whose workers die on SIGTERM, the signal ``Pool.terminate`` sends.
    The search turns SIGTERM into Ctrl-C; a worker forked with that Python handler (the pool also forks
    replacements, at any time) once ran it instead of dying and hung the build. So SIGTERM keeps its
    default action in this process while the pool lives (main thread only: elsewhere handlers stay)."""
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, signal.SIG_DFL) if main else None
    try:
        with mp.get_context("fork").Pool(workers, initializer=_ignore_ctrl_c) as pool:
            yield pool
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)


def build_store(
    raw: RawDataset, params: GraphParams, workers: int | None = None, progress: bool | None = None
) -> tuple[GraphStore, list[dict[str, str]], list[dict[str, str]]]:
    """Build graphs for all records (in parallel over CPU cores); bad records go to ``skipped``."""
    skipped = list(raw.skipped)
    seen: dict[str, int] = {}
    todo = []
    for rec in raw.records:
        if rec["id"] in seen:
            skipped.append(
                {
                    "id": rec["id"],
                    "reason": f"duplicate id {rec['id']!r} (line {rec['line']}; first at line {seen[rec['id']]})",
                }
            )
            continue
        seen[rec["id"]] = rec["line"]
        todo.append(rec)
    jobs = [(rec, params.cutoff, params.max_neighbors, params.neighbors) for rec in todo]
    workers = workers or min(os.cpu_count() or 1, 8)
    # tqdm's disable=None: a bar only when stderr is a terminal
    bar = dict(
        total=len(jobs),
        desc=f"crystal graphs ({raw.source.name})",
        unit="crystal",
        disable=None if progress is None else not progress,
    )
    if workers > 1 and len(jobs) >= 200 and "fork" in mp.get_all_start_methods():
        with graph_pool(workers) as pool:
            results = list(tqdm(pool.imap(_build_one, jobs, chunksize=32), **bar))
            pool.close()  # workers leave on their own; the exit's terminate() then has nothing to kill
            pool.join()
    else:
        results = [_build_one(j) for j in tqdm(jobs, **bar)]
    ids, graphs, props, bad = [], [], [], []
    for rec, (graph, reason) in zip(todo, results):
        if graph is None:
            skipped.append({"id": rec["id"], "reason": f"{rec['id']} (line {rec['line']}): {reason}"})
            continue
        ids.append(rec["id"])
        graphs.append(graph)
        props.append(rec["props"])
        bad.append(rec.get("bad_props", {}))
    return GraphStore.from_graphs(ids, graphs, props), skipped, bad


def _key_params(params: GraphParams) -> dict[str, Any]:
    """GraphParams as the cache key sees them (the default neighbour mode keeps earlier keys valid)."""
    d = asdict(params)
    if d["neighbors"] == "crystaltune":
        del d["neighbors"]
    return d


def _build_one(job: tuple[dict[str, Any], float, int | None, str]) -> tuple[dict[str, Any] | None, str | None]:
    rec, cutoff, max_neighbors, neighbors = job
    try:
        return build_graph(rec, cutoff, max_neighbors, neighbors), None
    except RecordError as exc:
        return None, str(exc)
    except Exception as exc:  # never let one crystal kill a 10k-crystal run
        return None, f"graph construction failed ({type(exc).__name__}: {str(exc)[:160]})"


def _write_cache(file: Path, store: GraphStore, skipped, bad) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    payload = store.to_npz_dict()
    payload["meta:skipped"] = np.array(json.dumps(skipped))
    payload["meta:bad_props"] = np.array(json.dumps(bad))
    fd, tmp = tempfile.mkstemp(dir=file.parent, suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **payload)
        os.replace(tmp, file)  # atomic: readers never see a half-written cache
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_cache(file: Path):
    """The cached store, or None when the file is damaged in any way (it is then rebuilt)."""
    try:
        with np.load(file, allow_pickle=False) as npz:
            d = {k: npz[k] for k in npz.files}  # zip CRCs are checked as members are read
        skipped = json.loads(str(d.pop("meta:skipped")))
        bad = json.loads(str(d.pop("meta:bad_props")))
        store = GraphStore.from_npz_dict(d)
        if len(bad) != len(store):
            raise ValueError("bad_props length")
        return store, skipped, bad
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, json.JSONDecodeError):
        return None
