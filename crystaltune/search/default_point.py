"""The default configuration as a point of a search space: every search evaluates it as trial 0
(Optuna's enqueued trial), so the search can only improve on it and the user sees by how much.

A space names its default with ``default:``: a TrialConfig YAML (e.g. ``baselines/cgcnn_default_
perovskites.yaml``, resolved beside the space file, then among the built-in spaces), or a mapping
of searched parameters to values; without it the default is what the space's own ``dataset`` and
``fixed`` entries and crystaltune's TrialConfig defaults say.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import TrialConfig, flatten
from ..errors import CrystaltuneError

#: keys a default file may differ on from the space: the space decides data, horizon, seed, output
FREE_KEYS = ("data.", "train.epochs", "train.seed", "output")


def _open_key_default(key: str, flat: dict[str, Any]) -> Any:
    """Default of an open ``model.edge_params.X`` / ``model.params.X`` key: the field default of the
    featurizer's or the model's typed Params."""
    import dataclasses

    from ..featurizers import EDGE_FEATURIZERS
    from ..models import MODELS

    section, name = key.rsplit(".", 1)
    owner = (
        MODELS.get(flat["model.name"])
        if section == "model.params"
        else EDGE_FEATURIZERS.get(flat["model.edge_featurizer"])
    )
    return {f.name: f.default for f in dataclasses.fields(owner.Params)}.get(name)


def _value(key: str, flat: dict[str, Any]) -> Any:
    if key in flat:
        return flat[key]
    if key.startswith(("model.edge_params.", "model.params.")):
        return _open_key_default(key, flat)
    return None


def _load_file(ref: str, source: str) -> tuple[dict[str, Any], str]:
    """A default TrialConfig file: relative paths beside the space file, then in the built-in spaces."""
    from .space import builtin_spaces_dir

    here = Path(source).parent if Path(source).is_file() else Path.cwd()
    candidates = [Path(ref)] if Path(ref).is_absolute() else [here / ref, builtin_spaces_dir() / ref]
    for path in candidates:
        if path.is_file():
            return TrialConfig.from_yaml(path).to_dict(), str(path)
    raise CrystaltuneError(
        f"{source}: default: no such config file {ref!r} (looked in {', '.join(map(str, candidates))})"
    )


def _check_consistent(space, point: dict[str, Any], default_flat: dict[str, Any], where: str) -> None:
    """The trial built from the point must be the default file's config (up to FREE_KEYS)."""
    trial = flatten(space.trial_config(point).to_dict())
    bad = [k for k, v in default_flat.items() if not k.startswith(FREE_KEYS) and k in trial and trial[k] != v]
    if bad:
        diffs = ", ".join(f"{k} = {default_flat[k]!r} but the space gives {trial[k]!r}" for k in bad[:4])
        raise CrystaltuneError(
            f"{where}: the default is not a point of this space ({diffs}): search or fix those keys "
            "to the default's values"
        )


def resolve_default(spec: Any, space, source: str) -> tuple[dict[str, Any], str]:
    """(values of the searched parameters for the default trial, where the default came from)."""
    where = f"{source}: default"
    overrides: dict[str, Any] = {}
    file_flat: dict[str, Any] | None = None
    origin = "the space's fixed values and crystaltune's defaults"
    if isinstance(spec, str):
        cfg, origin = _load_file(spec, source)
        file_flat = flatten(cfg)
    elif isinstance(spec, dict):
        overrides = flatten(spec)
        known = {p.name for p in space.params}
        for k in overrides:
            if k not in known:
                raise CrystaltuneError(
                    f"{where}: {k!r} is not a searched parameter (searched: {', '.join(sorted(known))})"
                )
        origin = "the space's default entry"
    elif spec is not None:
        raise CrystaltuneError(
            f"{where}: expected a config file name or a mapping of searched parameters, got {spec!r}"
        )
    flat = file_flat if file_flat is not None else flatten(space.trial_config({}).to_dict())
    point: dict[str, Any] = {}
    for p in space.params:
        if not p.active(point):
            continue
        value = overrides[p.name] if p.name in overrides else _value(p.name, {**flat, **point})
        if not p.contains(value):
            raise CrystaltuneError(
                f"{where}: the default trial (trial 0) has {p.name} = {value!r}, which the search cannot take "
                f"({p.describe()}); widen the search or add `default: {{{p.name}: VALUE}}` to the space file"
            )
        point[p.name] = value
    if file_flat is not None:
        _check_consistent(space, point, file_flat, where)
    return point, origin
