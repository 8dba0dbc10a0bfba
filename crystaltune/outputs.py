"""Where results go, checked before any work: output files and folders, storage and tracking URIs.
A run that cannot write its result, or a tracking server that does not answer, fails in seconds with
one line (credentials redacted), not after hours of training."""

from __future__ import annotations

import math
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .errors import CrystaltuneError

STORAGE_SCHEMES = ("s3", "gs", "gcs", "abfs", "file", "hdfs")  # Ray Tune's pyarrow filesystems
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "file", "databricks")


def is_uri(location: str) -> bool:
    """A URI (s3://..., sqlite:///..., http://...) rather than a local path."""
    return "://" in location


def redact(value: object) -> str:
    """Strip credentials from URIs (s3://KEY:SECRET@bucket -> s3://***@bucket)."""
    import re

    return re.sub(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@", r"\1***@", str(value))


def check_writable(path: Path, what: str, min_free: int = 200 * 2**20) -> None:
    """A folder that exists (or can be made), takes a write, and has ``min_free`` bytes free."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".crystaltune-write-test-{os.getpid()}"
        probe.write_bytes(b"\0" * 65536)
        probe.unlink()
    except OSError as exc:
        raise CrystaltuneError(f"{what} {path} is not writable ({exc.strerror or exc})") from None
    free = shutil.disk_usage(path).free
    if free < min_free:
        raise CrystaltuneError(
            f"{what} {path}: only {free / 2**20:.0f} MiB free; need at least {min_free / 2**20:.0f} MiB"
        )


def check_output_file(path: str | Path, what: str) -> None:
    """A file to write at the end of a run: not a folder, its folder writable."""
    p = Path(path)
    if p.is_dir():
        raise CrystaltuneError(f"{what} {p} is a folder; give a file name")
    check_writable(p.parent if str(p.parent) else Path("."), what, min_free=10 * 2**20)


def check_storage(storage: str) -> None:
    scheme = storage.split("://", 1)[0] if is_uri(storage) else ""
    if scheme and scheme not in STORAGE_SCHEMES:
        raise CrystaltuneError(
            f"--storage {redact(storage)}: unknown scheme {scheme!r} "
            f"(a path, or one of {', '.join(s + '://' for s in STORAGE_SCHEMES)})"
        )


def _head(path: Path, n: int = 16) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Known scheme; a plain path is refused with the sqlite:/// form; an HTTP server must answer."""
    if not is_uri(uri):
        raise CrystaltuneError(
            f"--tracking-uri {redact(uri)}: not a URI; for a local store use sqlite:///{Path(uri).resolve()}"
        )
    scheme = uri.split("://", 1)[0].split("+", 1)[0]
    if scheme not in TRACKING_SCHEMES:
        raise CrystaltuneError(f"--tracking-uri {redact(uri)}: unknown scheme {scheme!r}")
    if scheme == "sqlite":
        db = Path(uri.removeprefix("sqlite:///"))
        if db.is_file() and db.stat().st_size and _head(db) != b"SQLite format 3\x00":
            raise CrystaltuneError(f"--tracking-uri {redact(uri)}: {db} is not an SQLite database")
        check_writable(db.parent if str(db.parent) else Path("."), "--tracking-uri folder", min_free=10 * 2**20)
    if scheme in ("http", "https"):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout)  # noqa: S310 (the user's server)
        except urllib.error.HTTPError:
            pass  # it answered; MLflow reports what it dislikes
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CrystaltuneError(
                f"--tracking-uri {redact(uri)}: the tracking server does not answer within "
                f"{timeout:g} s ({redact(reason)})"
            ) from None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URI (None for other schemes)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def prepare_tracking_store(uri: str) -> None:
    """Open the MLflow store once before any other MLflow use in this process. For a local SQLite file
    this happens under an OS lock on ``PATH.lock``: MLflow creates a fresh store's tables without one,
    so two searches starting on the same new file raced ("table ... already exists") and lost runs.
    An outdated or unreadable store becomes one line here instead of a traceback later."""
    import fcntl
    import logging

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    lock = open(db.with_name(db.name + ".lock"), "a") if db is not None else None  # noqa: SIM115
    quiet = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic")]  # "Creating tables..."
    levels = [q.level for q in quiet]
    try:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed, or when this process ends
        for q in quiet:
            q.setLevel(logging.WARNING)
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except MlflowException as exc:
        raise CrystaltuneError(f"--tracking-uri {redact(uri)}: {redact(str(exc).splitlines()[0])[:300]}") from None
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
        if lock is not None:
            lock.close()


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None, so the JSON printed is strict JSON
    (``json.dumps`` writes a bare ``NaN`` that strict parsers reject)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps_json(value: Any) -> str:
    """Strict JSON of a summary: non-finite numbers as null, other objects as their string."""
    import json

    return json.dumps(json_safe(value), indent=1, default=str, allow_nan=False)


def lock_output(folder: Path):
    """Hold ``folder/.crystaltune.lock`` for this process's lifetime (the OS drops it when the process
    ends, however it ends): a second search writing to the same output folder, which would move the
    first one's Tune state and tracker file away, is refused instead."""
    import fcntl

    fh = open(folder / ".crystaltune.lock", "a+")  # noqa: SIM115 (kept open: the lock lives with it)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise CrystaltuneError(
            f"--output {folder}: another search is writing there ({holder}); give this one its own "
            "--output (or wait for it to end)"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}")
    fh.flush()
    return fh
