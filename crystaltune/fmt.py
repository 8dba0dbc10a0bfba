"""Formatting shared by reports, leaderboards and the README: numbers in tables, headless plots."""

from __future__ import annotations

import math
from typing import Any


def num(x: Any, nd: int = 4, missing: str = "-") -> str:
    """A finite number with ``nd`` decimals; ``missing`` for NaN/inf/None and anything not a number."""
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return f"{x:.{nd}f}" if ok else missing


def lower_or_higher(fraction: float) -> str:
    """``1 - new / old`` as words: '12.9% lower', or '12.9% higher' when the new value is worse."""
    return f"{100 * abs(fraction):.1f}% {'lower' if fraction >= 0 else 'higher'}"


def pyplot():
    """matplotlib.pyplot on the Agg backend: plots go to files (servers, Ray workers and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
