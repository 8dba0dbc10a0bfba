"""Leaderboard of a finished search: its trials as rows, ranked by val MAE, and the CSV of them."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ..fmt import num
from .runs import TrialRow, rank

#: the CSV's columns before the searched parameters
CSV_HEAD = ["rank", "trial", "default", "status", "best_val_mae", "test_mae", "test_rmse", "test_r2", "epochs"]


def build_leaderboard(tracker, space) -> list[TrialRow]:
    """One row per trial from the tracker's state (works after --resume too), ranked ones first by
    best_val_mae, then failed ones; lost trials (never resumed by Tune, their slot sampled again) out."""
    from .space import decode_sampled

    rows = []
    for tid, rec in tracker.trials.items():
        if rec.status == "LOST":
            continue
        sampled = decode_sampled(rec.config, space)
        rows.append(TrialRow.from_record(tid, rec, sampled, sampled == space.default_point))
    ok, failed = rank(rows)
    return ok + failed


def write_csv(rows: list[TrialRow], path: Path) -> None:
    """The leaderboard CSV, written beside and then moved over the old one: a full disk leaves the
    previous complete file, never a truncated one."""
    keys = sorted({k for r in rows for k in r.params})
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*CSV_HEAD, "run_id", "name", *keys, "error"])
        for i, r in enumerate(rows, start=1):
            metrics = [num(getattr(r, k), missing="") for k in ("best_val_mae", "test_mae", "test_rmse", "test_r2")]
            w.writerow(
                [i, r.trial, r.default, r.status, *metrics, r.epochs, r.run_id, r.name]
                + [r.params.get(k, "") for k in keys]
                + [r.error]
            )
    os.replace(tmp, path)
