"""Keep Tune's experiment state resumable: a driver-side callback copies the state files, once each
parses, into a last-good folder beside them, and ``repair`` puts that copy back before ``--resume``
when a file on disk is damaged (a full disk truncates Tune's own non-atomic writes; Tune would then
silently start the experiment over instead of resuming it).
"""

from __future__ import annotations

import fnmatch
import json
import pickletools
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


def newest_session(folder: Path) -> tuple[str, list[Path]] | None:
    """(session, its files) of the latest session in ``folder``, the one Tune resumes from."""
    sessions = state_files(folder)
    return list(sessions.items())[-1] if sessions else None


def _has_experiment_state(files) -> bool:
    return any(p.name.startswith("experiment_state") for p in files)


def _pickle_whole(data: bytes) -> None:
    """Walk a pickle's opcodes to its STOP without running any of them (a truncated one raises)."""
    for _ in pickletools.genops(data):
        pass


def readable(data: bytes, name: str) -> bool:
    """Whether a state file's bytes parse whole (a truncated JSON or pickle does not); nothing in them is
    executed. Tune's search_gen_state ``.json`` is a pickle, so a JSON name gets both tries."""
    checks = (json.loads, _pickle_whole) if name.endswith(".json") else (_pickle_whole,)
    for check in checks:
        try:
            check(data)
        except Exception:  # noqa: BLE001, S112 - any failure to parse means damaged
            continue
        return True
    return False


def _file_ok(path: Path) -> bool:
    try:
        return readable(path.read_bytes(), path.name)
    except OSError:
        return False


def stamp(files: list[Path]) -> tuple:
    """What changes when Tune rewrites a file: name, mtime and size of each."""
    return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files))


def snapshot(folder: Path) -> bool:
    """Copy the newest session's state files (and tuner.pkl) into the last-good folder, if every one
    parses and none changed while read. The new copy is whole before it replaces the old one, and the
    old one is kept until then, so a full disk or a crash at any point leaves a usable copy."""
    newest = newest_session(folder)
    files = [*newest[1], folder / TUNER_FILE] if newest else []
    if not _has_experiment_state(files) or not files[-1].exists():
        return False
    new, good, old = folder / NEW, folder / GOOD, folder / OLD
    try:
        before = stamp(files)
        blobs = {p.name: p.read_bytes() for p in files}
        if stamp(files) != before or not all(readable(data, name) for name, data in blobs.items()):
            return False  # Tune is writing (a later look copies it whole)
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir()
        for name, data in blobs.items():
            (new / name).write_bytes(data)
        (new / COMPLETE).write_text(time.strftime("%Y-%m-%d %H:%M:%S"))
        if good.exists():  # without GOOD (a crash between the renames), OLD is the copy to keep
            shutil.rmtree(old, ignore_errors=True)
            good.rename(old)
        new.rename(good)
    except OSError:  # a full disk: the previous copy stays
        shutil.rmtree(new, ignore_errors=True)
        return False
    return True


def _last_good(folder: Path) -> Path | None:
    for name in (GOOD, OLD):
        if (folder / name / COMPLETE).exists():
            return folder / name
    return None


def _set_aside(paths: list[Path], folder: Path) -> Path:
    """Move damaged files into a folder of their own (one per repair), never over earlier ones."""
    dest = folder / DAMAGED / time.strftime("%Y%m%d-%H%M%S")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for path in paths:
            path.replace(dest / path.name)
    except OSError as exc:
        raise CrystaltuneError(f"--resume: could not set the damaged Tune state aside in {dest}: {exc}") from exc
    return dest


def _restore_session(good: Path | None, session: str, folder: Path) -> bool:
    """The last good copy of ``session`` put back over its files; False when there is none."""
    copy = [p for p in good.iterdir() if session_of(p.name) == session] if good else []
    if not _has_experiment_state(copy):
        return False
    for path in copy:
        shutil.copyfile(path, folder / path.name)
    return True


def _damaged(files: list[Path]) -> list[str]:
    return [p.name for p in files if not _file_ok(p)]


def repair(folder: Path) -> list[str]:
    """Before a resume: a damaged file of the newest session is put back, with its whole session, from
    the last good copy. Without one, the newest earlier session that parses is written under the newest
    session's names (Tune also reads the searcher's state from a staging folder that a long-lived Ray
    keeps, which takes the newest names), the damaged files set aside. Returns what was done."""
    sessions = state_files(folder)
    if not sessions:
        return []
    good, done = _last_good(folder), []
    newest, files = list(sessions.items())[-1]
    damaged = _damaged(files)
    if damaged and _restore_session(good, newest, folder):
        done.append(
            f"{', '.join(damaged)} damaged (a full disk?): restored the copy of {(good / COMPLETE).read_text()}"
        )
        damaged = _damaged(state_files(folder)[newest])
    if damaged:
        earlier = next((s for s in reversed(list(sessions)[:-1]) if not _damaged(sessions[s])), None)
        if earlier is None:
            raise CrystaltuneError(
                f"--resume: the search's Tune state in {folder} is damaged ({', '.join(damaged)}) and no good "
                "copy is left; run the search again without --resume (MLflow keeps the finished trials)"
            )
        dest = _set_aside(files, folder)
        for path in sessions[earlier]:
            shutil.copyfile(path, folder / path.name.replace(earlier, newest))
        done.append(
            f"{', '.join(damaged)} damaged and no good copy: resuming from session {earlier} (set aside in {dest})"
        )
    if not _file_ok(folder / TUNER_FILE):
        if not (good and (good / TUNER_FILE).exists()):
            raise CrystaltuneError(f"--resume: {folder / TUNER_FILE} is damaged and no good copy is left")
        shutil.copyfile(good / TUNER_FILE, folder / TUNER_FILE)
        done.append(f"{TUNER_FILE} damaged: restored the copy of {(good / COMPLETE).read_text()}")
    return done


class StateKeeper(tune.Callback):
    """Snapshot the experiment state when it has changed, at most once per ``every_s`` and never more
    than about 2% of the driver's time (the copy is parsed first, and a big state costs more)."""

    def __init__(self, folder: str, every_s: float = 1.0):
        self.folder, self.every_s = Path(folder), every_s
        self.next_at, self.seen, self.last = 0.0, None, None

    def __getstate__(self):
        return {**self.__dict__, "next_at": 0.0, "seen": None, "last": None}

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if now < self.next_at:
            return
        try:
            newest = newest_session(self.folder)
            now_stamp = stamp(newest[1]) if newest else None
        except OSError:
            return
        # a state seen unchanged twice: Tune's copy of it into the folder (a background sync) is done
        if now_stamp and now_stamp == self.last and now_stamp != self.seen and snapshot(self.folder):
            self.seen = now_stamp
        self.last = now_stamp
        self.next_at = time.monotonic() + max(self.every_s, 50 * (time.monotonic() - now))

    def on_experiment_end(self, trials, **info):
        """Tune has just written its final state (after Ctrl-C too): keep that, if it is whole."""
        snapshot(self.folder)
