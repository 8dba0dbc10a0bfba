"""MLflow metric rows from a result dict: the finite numbers among the chosen keys (MLflow rejects NaN
steps in charts and a diverged value is recorded as an error instead)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any


def finite_metrics(values: Mapping[str, Any], keys: Iterable[str], step: int) -> list:
    """One ``mlflow.entities.Metric`` per key whose value is a finite number, stamped now at ``step``."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [
        Metric(k, float(values[k]), now, step)
        for k in keys
        if isinstance(values.get(k), (int, float)) and math.isfinite(values[k])
    ]
