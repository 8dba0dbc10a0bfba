"""Checkpoints: everything needed to predict (model weights, full config, normaliser, featurizer
spec) in a plain dict that ``torch.load(weights_only=True)`` reads; reference CGCNN files import too.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TrialConfig
from .errors import CrystaltuneError
from .models import CrystalModel, build_model
from .normalizer import Normalizer

FORMAT = "crystaltune-checkpoint"
#: 2: ``lattice`` global features from the Niggli-reduced primitive cell (1: from the cell as written)
VERSION = 2


@dataclass
class LoadedModel:
    model: CrystalModel
    normalizer: Normalizer
    targets: list[str]
    config: TrialConfig
    cutoff: float
    max_neighbors: int
    metrics: dict[str, Any]
    kind: str  # crystaltune | reference-cgcnn
    domain: dict[str, Any] | None = None  # training elements, target ranges and units (crystaltune.domain)
    std_scale: float = 1.0  # an ensemble member: the calibration factor of the members' std


def save_checkpoint(
    path: str | Path,
    model: CrystalModel,
    config: TrialConfig,
    normalizer: Normalizer,
    targets: list[str],
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write atomically (temp file + rename): an interrupted write never leaves a half checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "targets": list(targets),
        "normalizer": normalizer.to_dict(),
        "featurizers": {
            "node": config.model.node_featurizer,
            "edge": config.model.edge_featurizer,
            "edge_params": dict(config.model.edge_params),
            "cutoff": config.data.cutoff,
            "max_neighbors": config.data.max_neighbors,
        },
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str, bool))},
    }
    if extra:
        payload.update(extra)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw dict, loaded without unpickling arbitrary objects; one clear error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CrystaltuneError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to decode a user file (struct.error, UnpicklingError, ...)
        msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CrystaltuneError(f"{path}: not a readable checkpoint (truncated, or not a torch file: {msg})") from None
    if not isinstance(obj, dict):
        raise CrystaltuneError(f"{path}: not a checkpoint (a {type(obj).__name__}, expected a dict)")
    return obj


ENSEMBLE_FORMAT = "crystaltune-ensemble"


def load_members(path: str | Path) -> list[LoadedModel]:
    """The models of a checkpoint file: one, or every member of an ensemble (crystaltune.ensemble)."""
    ck = read_checkpoint(path)
    if ck.get("format") != ENSEMBLE_FORMAT:
        return [load_checkpoint_dict(ck, path)]
    members = ck.get("members")
    if not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members):
        raise CrystaltuneError(f"{path}: an ensemble checkpoint without members")
    loaded = [load_checkpoint_dict(m, f"{path} (member {i + 1})") for i, m in enumerate(members)]
    scale = ck.get("std_scale", 1.0)
    if isinstance(scale, bool) or not (isinstance(scale, (int, float)) and 0 < scale < 1e6):
        raise CrystaltuneError(f"{path}: std_scale must be a positive number, got {scale!r}")
    for m in loaded:
        m.std_scale = float(scale)
    if len({tuple(m.targets) for m in loaded}) != 1:
        raise CrystaltuneError(f"{path}: the ensemble's members predict different targets")
    return loaded


def load_checkpoint(path: str | Path) -> LoadedModel:
    """A model in eval mode from a crystaltune checkpoint or a reference CGCNN ``.pth.tar``."""
    return load_checkpoint_dict(read_checkpoint(path), path)


def load_checkpoint_dict(ck: dict[str, Any], path) -> LoadedModel:
    """A model in eval mode from a checkpoint's dict (``path`` names it in errors)."""
    if ck.get("format") == FORMAT:
        cfg, targets = _checked_header(ck, path)
        model = _build_checked(cfg, len(targets), ck["model_state"], path)
        _load_state(model, ck["model_state"], path)
        kind = "crystaltune"
    elif {"state_dict", "normalizer", "args"} <= set(ck):
        from .models.reference import reference_config, reference_state_dict

        cfg = reference_config(ck, path)
        targets = ["prediction"]
        model = build_model(cfg.model, 1, cfg.data.cutoff)
        # our frozen node table and featurizer buffers are not part of the reference weights
        _load_state(
            model, {**model.state_dict(), **reference_state_dict(ck["state_dict"], cfg.model.head_layers)}, path
        )
        kind = "reference-cgcnn"
    else:
        raise CrystaltuneError(
            f"{path}: not a crystaltune or reference CGCNN checkpoint (keys: {', '.join(sorted(map(str, ck))[:8])})"
        )
    model.eval()
    return LoadedModel(
        model,
        _checked_normalizer(ck["normalizer"], len(targets), path),
        targets,
        cfg,
        cfg.data.cutoff,
        cfg.data.max_neighbors,
        {k: v for k, v in ck.get("metrics", {}).items() if isinstance(k, str)}
        if isinstance(ck.get("metrics"), dict)
        else {},
        kind,
        _checked_domain(ck.get("domain"), path),
    )


def _checked_header(ck: dict[str, Any], path) -> tuple[TrialConfig, list[str]]:
    """The config and target names of a crystaltune checkpoint, or a one-line error naming what is
    missing or malformed; a version-1 checkpoint with ``lattice`` features is refused: its features came
    from the cell as written, so one crystal written in two cells would get two answers."""
    for key, kind in (("config", dict), ("targets", list), ("model_state", dict), ("normalizer", dict)):
        if not isinstance(ck.get(key), kind):
            got = "missing" if key not in ck else f"a {type(ck[key]).__name__}"
            raise CrystaltuneError(f"{path}: checkpoint entry '{key}' is {got}, expected a {kind.__name__}")
    targets = ck["targets"]
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise CrystaltuneError(f"{path}: checkpoint entry 'targets' must be a non-empty list of names")
    cfg = TrialConfig.from_dict(ck["config"])
    version = ck.get("version", 1)
    if "lattice" in cfg.model.global_features and not (isinstance(version, int) and version >= 2):
        raise CrystaltuneError(
            f"{path}: a version-{version} checkpoint with 'lattice' global features, computed from the cell as "
            "written (a crystal in another cell got another answer); retrain it with this crystaltune, which "
            "computes them from the reduced primitive cell"
        )
    return cfg, list(targets)


def _checked_domain(d: Any, path) -> dict[str, Any] | None:
    """The training domain (crystaltune.domain) if well formed: elements as atomic numbers, one
    [min, max] pair of numbers per target; a malformed one is a one-line error, not a traceback later."""
    if d is None:
        return None
    elements, ranges = (d.get("elements", []), d.get("range", {})) if isinstance(d, dict) else (None, None)
    ok = isinstance(elements, list) and all(type(z) is int and 1 <= z <= 118 for z in elements)
    ok = ok and isinstance(ranges, dict)
    ok = ok and all(
        isinstance(v, (list, tuple))
        and len(v) == 2
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        for v in ranges.values()
    )
    if not ok:
        raise CrystaltuneError(
            f"{path}: malformed 'domain' entry (expected elements: [atomic numbers], range: {{target: [min, max]}})"
        )
    return d


def _checked_normalizer(d: Any, n_targets: int, path) -> Normalizer:
    """The target normaliser, one finite mean and positive std per target, or a one-line error
    (a wrong one would turn every prediction into garbage without a word)."""
    try:
        norm = Normalizer.from_dict(d)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CrystaltuneError(f"{path}: unreadable target normaliser ({type(exc).__name__})") from None
    if norm.mean.numel() != n_targets or norm.std.numel() != n_targets:
        raise CrystaltuneError(
            f"{path}: the normaliser has {norm.mean.numel()} mean(s) / {norm.std.numel()} std(s) for "
            f"{n_targets} target(s)"
        )
    if not (torch.isfinite(norm.mean).all() and torch.isfinite(norm.std).all() and (norm.std > 0).all()):
        raise CrystaltuneError(f"{path}: the normaliser has non-finite values or a std <= 0")
    return norm


def _build_checked(cfg: TrialConfig, n_targets: int, state: dict[str, torch.Tensor], path) -> torch.nn.Module:
    """The model of ``cfg``, built only after its shapes (on PyTorch's meta device: no memory) match the
    checkpoint's weights: a few-KB checkpoint cannot make us allocate a model of gigabytes."""
    with torch.device("meta"):
        meta = build_model(cfg.model, n_targets, cfg.data.cutoff)
    _check_state(meta.state_dict(), state, path)
    return build_model(cfg.model, n_targets, cfg.data.cutoff)


def _check_state(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path) -> None:
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {unexpected[:3]}"
            if unexpected
            else f"shape mismatch {wrong[0]}: {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}"
        )
        raise CrystaltuneError(f"{path}: weights do not fit the architecture in its config ({detail})")


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path) -> None:
    _check_state(model.state_dict(), state, path)
    model.load_state_dict(state, strict=False)
