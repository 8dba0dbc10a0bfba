"""One way for the driver to stop its own search: Ctrl-C's path. Tune then marks running trials
interrupted and saves its experiment state, so ``--resume`` continues where it stopped."""

from __future__ import annotations

import os
import signal


def stop_like_ctrl_c(*_signal_args) -> None:
    """Send this process SIGINT (usable as a signal handler too: SIGTERM takes the same path)."""
    os.kill(os.getpid(), signal.SIGINT)
