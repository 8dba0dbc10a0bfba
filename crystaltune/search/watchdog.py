"""A search never hangs: a driver-side Tune callback that watches every trial's reports.

* A running trial silent for longer than ``factor`` x its slowest epoch so far (at least ``floor_s``;
  before its first epoch, ``floor_s``) is stopped: its actor is killed, the tracker records why, and
  Tune retries it from its last epoch checkpoint as for any dead process (``--max-failures``); a trial
  that hangs on every try ends FAILED with the watchdog's reason.
* When no trial can run for ``stall_s`` (all waiting for resources that never come, e.g. after a
  node is lost), the search stops as on Ctrl-C: runs are marked interrupted and ``--resume`` continues.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray import tune

from .interrupt import stop_like_ctrl_c

log = logging.getLogger(__name__)
DEFAULT_FACTOR, DEFAULT_FLOOR_S, DEFAULT_STALL_S = 10.0, 600.0, 1800.0  # SearchOptions' defaults too


class Watchdog(tune.Callback):
    def __init__(
        self,
        tracker,
        factor: float = DEFAULT_FACTOR,
        floor_s: float = DEFAULT_FLOOR_S,
        stall_s: float = DEFAULT_STALL_S,
        verbose: bool = True,
    ):
        self.tracker, self.factor, self.floor_s, self.stall_s, self.verbose = tracker, factor, floor_s, stall_s, verbose
        self.last_seen: dict[str, float] = {}
        self.slowest: dict[str, float] = {}
        self.idle_since: float | None = None

    def __getstate__(self):
        """Tune pickles its callbacks with the experiment; a resumed search starts its clocks afresh."""
        return {**self.__dict__, "last_seen": {}, "idle_since": None}

    def log(self, message: str) -> None:
        if self.verbose:
            log.info(message)

    def limit(self, trial_id: str) -> float:
        """Seconds a trial may stay silent."""
        return max(self.floor_s, self.factor * self.slowest.get(trial_id, 0.0))

    def on_trial_start(self, iteration, trials, trial, **info):
        self.last_seen[trial.trial_id] = time.monotonic()

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.last_seen.pop(trial.trial_id, None)

    def on_trial_result(self, iteration, trials, trial, result: dict[str, Any], **info):
        self.last_seen[trial.trial_id] = time.monotonic()
        if result.get("epoch_time_s"):
            self.slowest[trial.trial_id] = max(self.slowest.get(trial.trial_id, 0.0), float(result["epoch_time_s"]))

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        running = [t for t in trials if t.status == "RUNNING"]
        for t in running:
            seen = self.last_seen.setdefault(t.trial_id, now)
            if now - seen > self.limit(t.trial_id):
                self._stop(t, now - seen)
        waiting = any(t.status == "PENDING" for t in trials)
        if running or not waiting:
            self.idle_since = None
        elif self.idle_since is None:
            self.idle_since = now
        elif now - self.idle_since > self.stall_s:
            self.log(
                f"no trial could start for {self.stall_s:.0f} s (resources the cluster no longer has?); "
                "stopping the search: continue it with the same command plus --resume"
            )
            self.idle_since = None
            stop_like_ctrl_c()

    def _stop(self, trial, silent_s: float) -> None:
        import ray

        reason = (
            f"watchdog: no report for {silent_s:.0f} s (limit {self.limit(trial.trial_id):.0f} s: "
            f"{self.factor:g} x its slowest epoch, at least {self.floor_s:.0f} s); stopped"
        )
        self.tracker.note_watchdog(trial.trial_id, reason)
        self.log(f"{self.tracker.name(trial.trial_id)}: {reason}")
        self.last_seen[trial.trial_id] = time.monotonic()  # one kill per limit; the retry starts afresh
        actor = trial.temporary_state.ray_actor
        if actor is not None:
            ray.kill(actor, no_restart=True)
