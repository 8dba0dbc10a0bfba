"""A search outlives nothing it depends on silently: a driver thread that watches the Ray cluster's GCS.

When the cluster the search runs on goes away (its head stopped with ``ray stop``, or the search it
joined ended and took its private instance with it), Ray's driver retries for a minute and then kills
the process without a word, leaving the search's MLflow runs RUNNING forever. This watch notices
first (the GCS port stops answering for ``lost_after_s``), marks the parent run and every running
trial run KILLED (tag ``crystaltune.status = interrupted``, as Ctrl-C does), records them as
interrupted in the tracker's state file (so ``--resume`` continues them), prints one ``error:`` line
and ends the process with status 1.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from . import runs

#: how long the GCS may stay silent before the cluster counts as lost (Ray itself gives up after 60 s)
LOST_AFTER_S = 15.0


class ClusterWatch(threading.Thread):
    """Probe ``host:port`` (the GCS) every ``every_s``; after ``lost_after_s`` without an answer, stop."""

    def __init__(
        self,
        host: str,
        port: int,
        state_file: str,
        tracking_uri: str,
        what: str,
        every_s: float = 1.0,
        lost_after_s: float = LOST_AFTER_S,
    ):
        super().__init__(name="crystaltune-cluster-watch", daemon=True)
        self.host, self.port, self.state_file, self.tracking_uri, self.what = host, port, state_file, tracking_uri, what
        self.every_s, self.lost_after_s = every_s, lost_after_s
        self.done = threading.Event()

    def stop(self) -> None:
        """The search is ending on its own (before ``ray.shutdown``): stop watching."""
        self.done.set()

    def run(self) -> None:
        from ..raysession import probe

        silent_since = None
        while not self.done.wait(self.every_s):
            if probe(self.host, self.port, timeout=2.0, handshake=False) is None:  # a busy GCS still accepts
                silent_since = None
                continue
            silent_since = silent_since or time.monotonic()
            if time.monotonic() - silent_since >= self.lost_after_s and not self.done.is_set():
                self.lost(time.monotonic() - silent_since)
                return

    def lost(self, silent_s: float) -> None:
        """Mark the runs, say so in one line, and end the process (the Ray driver cannot go on)."""
        try:
            marked = mark_interrupted(self.state_file, self.tracking_uri)
            runs = f"its parent run and {marked} running trial run(s) are marked KILLED"
        except Exception as exc:  # the line below must come out whatever MLflow says
            runs = f"its runs could not be marked ({type(exc).__name__}: {str(exc)[:120]})"
        print(
            f"error: {self.what} stopped answering ({self.host}:{self.port} silent for {silent_s:.0f} s), so the "
            f"search cannot go on; {runs}; continue with the same command plus --resume on a running cluster",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)


def mark_interrupted(state_file: str, tracking_uri: str) -> int:
    """The parent run and every RUNNING trial run of the tracker's state: KILLED in MLflow and
    INTERRUPTED in the state file (as a Ctrl-C leaves them). Returns how many trial runs."""
    from mlflow.tracking import MlflowClient

    path = Path(state_file)
    if not path.exists():
        return 0
    state = json.loads(path.read_text())
    client = MlflowClient(tracking_uri=tracking_uri)
    marked = 0
    for rec in (state.get("trials") or {}).values():
        if rec.get("status") == "RUNNING":
            client.set_tag(rec["run_id"], runs.STATUS, "interrupted")
            client.set_terminated(rec["run_id"], "KILLED")
            rec["status"] = "INTERRUPTED"
            marked += 1
    if state.get("parent_run_id"):
        client.set_tag(state["parent_run_id"], runs.STATUS, "interrupted")
        client.set_terminated(state["parent_run_id"], "KILLED")
    tmp = path.with_name(path.name + ".lost.tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)
    return marked


def watch_cluster(address: str | None, state_file: str, tracking_uri: str) -> ClusterWatch:
    """Start watching the GCS of the cluster this driver is connected to (after ``ray.init``)."""
    import ray

    from ..raysession import resolve_address

    host, port = resolve_address(ray.get_runtime_context().gcs_address)
    what = f"the Ray cluster at --address {address}" if address else "this search's Ray instance"
    watch = ClusterWatch(host, port, state_file, tracking_uri, what)
    watch.start()
    return watch
