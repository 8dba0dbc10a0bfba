"""Keep Tune's experiment state resumable: a driver-side callback copies the state files, once each
parses, into a last-good folder beside them, and ``repair`` puts that copy back before ``--resume``
when a file on disk is damaged (a full disk truncates Tune's own non-atomic writes; Tune would then
silently start the experiment over instead of resuming it).
"""

from __future__ import annotations

import fnmatch
import json
import pickle
import shutil
import time
from pathlib import Path

from ray import tune

from ..errors import CrystaltuneError

#: Tune's per-session state files (``*`` is the session's start time) and its one session-less file
SESSION_PATTERNS = (
    "experiment_state-*.json",
    "search_gen_state-*.json",
    "searcher-state-*.pkl",
    "callback-states-*.pkl",
)
TUNER_FILE = "tuner.pkl"
GOOD, OLD, NEW = ".crystaltune-last-good", ".crystaltune-last-good.old", ".crystaltune-last-good.new"
DAMAGED = ".crystaltune-damaged"
COMPLETE = "COMPLETE"


def session_of(name: str) -> str | None:
    """The session part of a state file's name (``2026-12-03_12-39-04``), or None for other files."""
    for pattern in SESSION_PATTERNS:
        if fnmatch.fnmatch(name, pattern):
            return name[len(pattern.split("*")[0]) :].rsplit(".", 1)[0]
    return None


def state_files(folder: Path) -> dict[str, list[Path]]:
    """session -> its state files in ``folder``, sorted by session (oldest first)."""
    sessions: dict[str, list[Path]] = {}
    for path in folder.iterdir() if folder.is_dir() else ():
        session = session_of(path.name)
        if session is not None and path.is_file():
            sessions.setdefault(session, []).append(path)
    return dict(sorted(sessions.items()))


def readable(data: bytes, name: str) -> bool:
    """Whether a state file's bytes parse whole (a truncated JSON or pickle does not). Tune's
    search_gen_state ``.json`` is a pickle, so a JSON name gets both tries."""
    loaders = (json.loads, pickle.loads) if name.endswith(".json") else (pickle.loads,)
    for load in loaders:
        try:
            load(data)  # noqa: S301 - Tune's own files, in the folder the user pointed at
        except Exception:  # noqa: BLE001, S112 - any failure to parse means damaged
            continue
        return True
    return False


def _file_ok(path: Path) -> bool:
    try:
        return readable(path.read_bytes(), path.name)
    except OSError:
        return False


def snapshot(folder: Path) -> bool:
    """Copy the newest session's state files (and tuner.pkl) into the last-good folder, if every one
    parses. The new copy is complete before it replaces the old one, so a full disk keeps the old."""
    sessions = state_files(folder)
    if not sessions:
        return False
    files = [*list(sessions.values())[-1], folder / TUNER_FILE]
    new = folder / NEW
    try:
        blobs = {p.name: p.read_bytes() for p in files if p.exists()}
        if not all(readable(data, name) for name, data in blobs.items()):
            return False
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir()
        for name, data in blobs.items():
            (new / name).write_bytes(data)
        (new / COMPLETE).write_text(time.strftime("%Y-%m-%d %H:%M:%S"))
        shutil.rmtree(folder / OLD, ignore_errors=True)
        if (folder / GOOD).exists():
            (folder / GOOD).rename(folder / OLD)
        new.rename(folder / GOOD)
    except OSError:  # a full disk: the previous copy stays (GOOD, or OLD until the next success)
        shutil.rmtree(new, ignore_errors=True)
        return False
    return True


def _last_good(folder: Path) -> Path | None:
    for name in (GOOD, OLD):
        if (folder / name / COMPLETE).exists():
            return folder / name
    return None


def _set_aside(paths: list[Path], folder: Path) -> None:
    (folder / DAMAGED).mkdir(exist_ok=True)
    for path in paths:
        path.replace(folder / DAMAGED / path.name)


def repair(folder: Path) -> list[str]:
    """Before a resume: a damaged file of the newest session is replaced, with its whole session, by the
    last good copy; without one, that session is set aside so Tune resumes from the one before it.
    Returns what was done, one line each; raises when no readable experiment state is left."""
    done, restored = [], set()
    good = _last_good(folder)
    while sessions := state_files(folder):
        session, files = list(sessions.items())[-1]
        damaged = [p.name for p in files if not _file_ok(p)]
        if not damaged:
            break
        copy = [p for p in good.iterdir() if session_of(p.name) == session] if good else []
        if session not in restored and any(p.name.startswith("experiment_state") for p in copy):
            restored.add(session)
            for path in copy:
                shutil.copyfile(path, folder / path.name)
            stamp = (good / COMPLETE).read_text()
            done.append(f"{', '.join(damaged)} damaged (a full disk?): restored the copy of {stamp}")
            continue
        _set_aside(files, folder)
        done.append(f"{', '.join(damaged)} damaged and no good copy: set aside in {folder / DAMAGED}")
    if not _file_ok(folder / TUNER_FILE) and good and (good / TUNER_FILE).exists():
        shutil.copyfile(good / TUNER_FILE, folder / TUNER_FILE)
        done.append(f"{TUNER_FILE} damaged: restored the copy of {(good / COMPLETE).read_text()}")
    if not state_files(folder) or not _file_ok(folder / TUNER_FILE):
        raise CrystaltuneError(
            f"--resume: the search's Tune state in {folder} is damaged and no good copy is left "
            f"({'; '.join(done) or TUNER_FILE + ' unreadable'}); run the search again without --resume "
            "(MLflow keeps the finished trials)"
        )
    return done


class StateKeeper(tune.Callback):
    """Snapshot the experiment state when it has changed, at most once per ``every_s`` and never more
    than about 2% of the driver's time (the copy is parsed first, and a big state costs more)."""

    def __init__(self, folder: str, every_s: float = 1.0):
        self.folder, self.every_s = Path(folder), every_s
        self.next_at, self.seen = 0.0, None

    def __getstate__(self):
        return {**self.__dict__, "next_at": 0.0, "seen": None}

    def _stamp(self):
        sessions = state_files(self.folder)
        files = list(sessions.values())[-1] if sessions else []
        return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files))

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if now < self.next_at:
            return
        try:
            stamp = self._stamp()
        except OSError:
            return
        if stamp and stamp != self.seen and snapshot(self.folder):
            self.seen = stamp
        self.next_at = time.monotonic() + max(self.every_s, 50 * (time.monotonic() - now))

    def on_experiment_end(self, trials, **info):
        """Tune has just written its final state (after Ctrl-C too): keep that, if it is whole."""
        snapshot(self.folder)
