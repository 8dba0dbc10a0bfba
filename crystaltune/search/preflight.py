"""Checks a search makes before any graph is built or Ray starts, each failing with one line: the
``--warm-start`` file is an Optuna study (checked read-only), on ``--resume`` the tracker's state file
(``OUTPUT/tracker_state.json``, which maps the trials to their MLflow runs) is complete and well
typed, ``--address`` answers and is not another search's private Ray, and the MLflow store opens (a
fresh SQLite file gets its tables under a lock). Otherwise the search died with a traceback, wrote
into the wrong file, or hung, once Ray and the trials were up."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..errors import CrystaltuneError

#: TrialRecord's fields and the JSON types they hold
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "run_id": (str,),
    "name": (str,),
    "config": (dict,),
    "status": (str,),
    "last_epoch": (int,),
    "last_result": (dict,),
    "error": (str,),
    "watchdog": (str,),
}
_TOP_TYPES: dict[str, tuple[type, ...]] = {
    "parent_run_id": (str, type(None)),
    "experiment_id": (str, type(None)),
    "stop_reason": (str,),
    "trials": (dict,),
}
_STATUSES = ("PENDING", "RUNNING", "FINISHED", "FAILED", "INTERRUPTED", "LOST")
_FIX = "restore it, or run the search again without --resume (a new search; the old runs stay in MLflow)"


def preflight(address: str | None, tracking_uri: str, resume: bool, output: Path, warm_start: str | None) -> None:
    """The checks above, in the order a user would fix them."""
    from ..outputs import prepare_tracking_store
    from ..raysession import check_address
    from .warm_start import study_storage

    if warm_start and not resume:
        study_storage(warm_start)  # an existing Optuna study, checked read-only
    if resume:
        check_resume_state(output / "tracker_state.json")
    if address:
        check_address(address)
    prepare_tracking_store(tracking_uri)  # last: a search refused above creates no store


def check_resume_state(path: Path) -> None:
    """Refuse a truncated or mistyped tracker state with one line naming the file and the key."""
    if not path.exists():
        return  # Tune's own snapshot of the tracker is used instead
    try:
        state = json.loads(path.read_text())
    except OSError as exc:
        raise CrystaltuneError(f"--resume: {path}: cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:
        decode = isinstance(exc, json.JSONDecodeError)
        where = f" ({exc.msg} at line {exc.lineno}, column {exc.colno})" if decode else ""
        raise CrystaltuneError(f"--resume: {path}: not valid JSON{where}, truncated?; {_FIX}") from None
    problem = state_problem(state)
    if problem:
        raise CrystaltuneError(f"--resume: {path}: {problem}; {_FIX}")


def state_problem(state: Any) -> str:
    """What is wrong with a parsed tracker state ('' when nothing): the first key of a wrong type."""
    if not isinstance(state, dict):
        return f"expected a JSON object, got {_kind(state)}"
    for key, types in _TOP_TYPES.items():
        if key in state and not isinstance(state[key], types):
            return f"{key} must be {_names(types)}, got {_kind(state[key])}"
    from .tracking import TrialRecord  # imports Ray Tune: only when there is a state to check

    names = {f.name for f in dataclasses.fields(TrialRecord)}
    for tid, rec in (state.get("trials") or {}).items():
        if not isinstance(rec, dict):
            return f"trials.{tid} must be an object, got {_kind(rec)}"
        unknown = sorted(set(rec) - names)
        if unknown:
            return f"trials.{tid}: unknown key {unknown[0]!r}"
        for key in ("run_id", "name"):
            if key not in rec:
                return f"trials.{tid}: {key} is missing"
        for key, value in rec.items():
            types = _FIELD_TYPES[key]
            if not isinstance(value, types) or (types == (int,) and isinstance(value, bool)):
                return f"trials.{tid}.{key} must be {_names(types)}, got {_kind(value)}"
        if rec.get("status", "PENDING") not in _STATUSES:
            return f"trials.{tid}.status must be one of {', '.join(_STATUSES)}, got {rec['status']!r}"
    return ""


def _names(types: tuple[type, ...]) -> str:
    words = {str: "a string", int: "an integer", dict: "an object", type(None): "null"}
    return " or ".join(words[t] for t in types)


def _kind(value: Any) -> str:
    text = json.dumps(value, default=str)
    return f"{type(value).__name__} {text[:40]}"
