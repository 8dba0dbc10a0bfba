"""crystaltune's console: the ``crystaltune`` logger, printed as ``[crystaltune] message`` on stdout."""

from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger("crystaltune")


class _Stdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (a test's capture, a redirected console)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def console(quiet: bool = False) -> logging.Logger:
    """Show crystaltune's INFO messages on stdout (WARNING and up only when ``quiet``). A handler the
    user attached to the ``crystaltune`` logger is kept instead of ours."""
    if not LOGGER.handlers:
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("[crystaltune] %(message)s"))
        LOGGER.addHandler(handler)
        LOGGER.propagate = False
    LOGGER.setLevel(logging.WARNING if quiet else logging.INFO)
    return LOGGER
