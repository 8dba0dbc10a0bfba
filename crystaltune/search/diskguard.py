"""Stop a search before a full disk breaks it: a driver-side Tune callback that watches the free space
of ``--output`` and a local ``--storage``. Each watched folder holds a ballast file; below a reserve the
guard deletes the ballast (room for Tune's experiment state, the tracker's state and the leaderboard)
and stops the search as Ctrl-C does (runs marked interrupted), so ``--resume`` continues once space
is freed.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from ray import tune

from .interrupt import stop_like_ctrl_c

log = logging.getLogger(__name__)
#: free bytes below which the search stops
RESERVE = int(os.environ.get("CRYSTALTUNE_MIN_FREE_MB", "64")) * 2**20
#: bytes set aside in each watched folder and released when the guard fires
BALLAST = 32 * 2**20
BALLAST_NAME = ".crystaltune-ballast"
#: why a guard of this (driver) process stopped the search; read by the engine after ``tuner.fit``,
#: because the full disk may also hold the tracker's state file
stop_reason = ""


class DiskGuard(tune.Callback):
    def __init__(self, tracker, paths: dict[str, str], reserve: int = RESERVE, every_s: float = 0.1):
        self.tracker, self.paths, self.reserve, self.every_s = tracker, paths, reserve, every_s
        self.checked, self.fired, self.armed = 0.0, False, False

    def __getstate__(self):
        return {**self.__dict__, "checked": 0.0, "fired": False, "armed": False}

    def _ballasts(self) -> list[Path]:
        return [Path(p) / BALLAST_NAME for p in dict.fromkeys(self.paths.values())]

    def arm(self) -> None:
        """Set the ballast aside (once per session; a folder without room for it goes without)."""
        self.armed = True
        for path in self._ballasts():
            try:
                with open(path, "wb") as fh:
                    os.posix_fallocate(fh.fileno(), 0, BALLAST)
            except OSError:
                path.unlink(missing_ok=True)

    def release(self) -> None:
        for path in self._ballasts():
            path.unlink(missing_ok=True)

    def low(self) -> tuple[str, str, int] | None:
        """(flag, path, free bytes) of the first watched folder under the reserve."""
        for flag, path in self.paths.items():
            try:
                free = shutil.disk_usage(path).free
            except OSError:
                continue
            if free < self.reserve:
                return flag, path, free
        return None

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if self.fired or now - self.checked < self.every_s:
            return
        if not self.armed:
            self.arm()
        self.checked = now
        found = self.low()
        if found is not None:
            self.stop(*found)

    def stop(self, flag: str, path: str, free: int) -> None:
        global stop_reason
        self.fired = True
        self.release()
        stop_reason = self.tracker.stop_reason = (
            f"disk full: {flag} {path} has {free / 2**20:.0f} MiB free (the search keeps "
            f"{self.reserve / 2**20:.0f} MiB); stopped the search: free space, then run the same command "
            "with --resume"
        )
        self.tracker.save()
        log.error(stop_reason)
        stop_like_ctrl_c()

    def on_experiment_end(self, trials, **info):
        self.release()
