"""``--warm-start PATH|URI``: seed a search with the best configurations of an earlier one.

The earlier search's Optuna study (``OUTPUT/optuna.db``, written by every search) is read, its best
completed trials (by best_val_mae) become points Optuna evaluates first, right after the default.
A trial is *compatible* with the new space when every parameter it set is searched here, with a value
this space can take, and it sets exactly the parameters this space's ``when`` conditions make active
for those values. Incompatible trials are left out with the reason; if none is compatible the search
stops before Ray starts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import CrystaltuneError
from ..outputs import is_uri
from . import runs
from .space import SearchSpace, decode_sampled

_log = logging.getLogger(__name__)


#: tables every Optuna RDB storage has; a file without them is not a study (and is never opened for writing)
OPTUNA_TABLES = ("studies", "trials", "trial_params", "trial_values", "version_info")


def study_storage(source: str) -> str:
    """The Optuna storage URI of ``source``; a local file is checked read-only first (check_study_file)."""
    if is_uri(source) and not source.startswith("sqlite:///"):
        return source  # a database server: Optuna reports what it dislikes
    path = Path(source.removeprefix("sqlite:///").split("?", 1)[0])
    if not path.is_file():
        raise CrystaltuneError(
            f"--warm-start {source}: no such file (an optuna.db a search wrote, OUTPUT/optuna.db, or a storage URI)"
        )
    check_study_file(path, source)
    return f"sqlite:///{path.resolve()}"


def check_study_file(path: Path, source: str) -> None:
    """Refuse, without writing a byte, an SQLite file that holds no Optuna study: Optuna's storage
    creates its 13 tables in any file it opens, so an ``mlflow.db`` given by mistake used to get them."""
    import sqlite3

    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise CrystaltuneError(f"--warm-start {source}: not an SQLite database ({exc})") from None
    missing = [t for t in OPTUNA_TABLES if t not in tables]
    if missing:
        kind = "an MLflow tracking store" if {"experiments", "runs"} <= tables else "an SQLite file"
        raise CrystaltuneError(
            f"--warm-start {source}: {kind}, not an Optuna study (it has no {missing[0]!r} table); give the "
            "optuna.db an earlier search wrote (OUTPUT/optuna.db)"
        )


def _study(source: str, space: SearchSpace):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = study_storage(source)
    try:
        names = optuna.get_all_study_names(storage)
    except Exception as exc:
        raise CrystaltuneError(f"--warm-start {source}: not an Optuna storage ({type(exc).__name__})") from None
    if not names:
        raise CrystaltuneError(f"--warm-start {source}: holds no Optuna study")
    own = runs.experiment_name(space.name)  # the study a search of this space saved
    if len(names) > 1 and own not in names:
        raise CrystaltuneError(f"--warm-start {source}: several studies ({', '.join(names)}) and none is {own!r}")
    name = own if own in names else names[0]
    return optuna.load_study(study_name=name, storage=storage)


def why_incompatible(point: dict[str, Any], space: SearchSpace) -> str | None:
    """None when ``point`` is a configuration this space can sample, else the reason."""
    params = {p.name: p for p in space.params}
    for key, value in point.items():
        if key not in params:
            return f"{key} is not searched in this space"
        if not params[key].contains(value):
            return f"{key} = {value!r} is outside this space ({params[key].describe()})"
    active: dict[str, Any] = {}
    for p in space.params:
        if p.active(active) and p.name in point:
            active[p.name] = point[p.name]
    missing = [p.name for p in space.params if p.active(active) and p.name not in point]
    if missing or set(active) != set(point):
        return f"it leaves {', '.join(missing) or 'conditional parameters'} unset"
    return None


def warm_points(source: str, space: SearchSpace, k: int = 5) -> list[dict[str, Any]]:
    """The best ``k`` compatible configurations of the study at ``source``, as parameter values."""
    import optuna

    study = _study(source, space)
    done = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value)
    points, reasons = [], []
    for t in done:
        point = decode_sampled(t.params, space) if set(t.params) <= {p.name for p in space.params} else dict(t.params)
        reason = why_incompatible(point, space)
        if reason:
            reasons.append(f"trial {t.user_attrs.get('trial', t.number)}: {reason}")
        elif point not in points and point != space.default_point:
            points.append(point)
        if len(points) == k:
            break
    if not points:
        first = reasons[0] if reasons else "it has no completed trial"
        raise CrystaltuneError(f"--warm-start {source}: no configuration of that study fits this space ({first})")
    for r in reasons[:3]:
        _log.info(f"--warm-start: left out {r}")
    _log.info(f"--warm-start: {len(points)} configuration(s) from {source} run first, after the default")
    return points
