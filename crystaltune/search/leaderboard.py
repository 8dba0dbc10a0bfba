"""Leaderboard of a finished search: trials ranked by val MAE, with the parameters that differ."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from ..fmt import num


def ranked(status: str, val_mae: float) -> bool:
    """The one rule for "this trial has a result": it did not fail and has a finite selection metric.
    Interrupted trials count with the epochs they ran; failed ones are listed last, unranked."""
    return status != "FAILED" and math.isfinite(val_mae)


def build_leaderboard(tracker, space) -> list[dict[str, Any]]:
    """One row per trial from the tracker's state (works after --resume too); failed trials last, lost ones out."""
    from .space import decode_sampled

    rows = []
    for tid, rec in tracker.trials.items():
        if rec.status == "LOST":  # never resumed by Tune; its slot was sampled again
            continue
        params, last = decode_sampled(rec.config, space), rec.last_result
        rows.append(
            {
                "trial": rec.name.split(" ")[0],
                "trial_id": tid,
                "run_id": rec.run_id,
                "status": rec.status,
                "name": rec.name,
                "val_mae": last.get("best_val_mae", math.nan),
                "test_mae": last.get("test_mae", math.nan),
                "test_rmse": last.get("test_rmse", math.nan),
                "test_r2": last.get("test_r2", math.nan),
                "epochs": last.get("epoch", 0),
                "error": rec.error,
                "checkpoint": last.get("checkpoint_path", ""),
                "params": params,
                "default": params == space.default_point,
            }
        )
    ok = [r for r in rows if ranked(r["status"], r["val_mae"])]
    bad = [r for r in rows if r not in ok]
    return sorted(ok, key=lambda r: r["val_mae"]) + bad


def differing_params(rows: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for r in rows for k in r["params"]})
    return [k for k in keys if len({repr(r["params"].get(k)) for r in rows}) > 1]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """The leaderboard CSV, written beside and then moved over the old one: a full disk leaves the
    previous complete file, never a truncated one."""
    keys = sorted({k for r in rows for k in r["params"]})
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "rank",
                "trial",
                "default",
                "status",
                "best_val_mae",
                "test_mae",
                "test_rmse",
                "test_r2",
                "epochs",
                "run_id",
                "name",
                *keys,
                "error",
            ]
        )
        for i, r in enumerate(rows, start=1):
            w.writerow(
                [
                    i,
                    r["trial"],
                    r["default"],
                    r["status"],
                    _f(r["val_mae"]),
                    _f(r["test_mae"]),
                    _f(r["test_rmse"]),
                    _f(r["test_r2"]),
                    r["epochs"],
                    r["run_id"],
                    r["name"],
                    *[r["params"].get(k, "") for k in keys],
                    r["error"],
                ]
            )
    os.replace(tmp, path)


def column_names(keys: list[str]) -> list[str]:
    """Short unique headers: the last part of a dotted key, or its section where that part repeats or
    says nothing alone (``loss.name`` -> ``loss``, ``model.name`` -> ``model``)."""
    last = [k.split(".")[-1] for k in keys]
    vague = [x == "name" or last.count(x) > 1 for x in last]
    return [k.split(".")[-2] if v and "." in k else k.split(".")[-1] for k, v in zip(keys, vague)]


def format_table(rows: list[dict[str, Any]], top: int = 10) -> str:
    diff = differing_params(rows)
    head = ["#", "trial", "status", "best_val_mae", "test_mae", "epochs", *column_names(diff)]
    body = []
    shown = rows[:top] + [r for r in rows[top:] if r["default"]]  # the default always, to compare with
    for r in shown:
        body.append(
            [
                str(rows.index(r) + 1),
                r["trial"] + ("*" if r["default"] else ""),
                r["status"],
                _f(r["val_mae"]),
                _f(r["test_mae"]),
                str(r["epochs"]),
                *[_short(r["params"].get(k, "-")) for k in diff],
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    note = ["* the default configuration (the search's first trial)"] if any(r["default"] for r in shown) else []
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body), *note])


def _f(x) -> str:
    return num(x, missing="") if isinstance(x, float) else str(x)


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return "+".join(map(str, v)) or "none"
    return str(v)
