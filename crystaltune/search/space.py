"""Search-space files: YAML -> a validated SearchSpace, and the Optuna define-by-run function.

```yaml
name: perovskites
dataset: {name: perovskites, targets: [band_gap], split_seed: 0, limit: null}
budget: {num_samples: 40, max_epochs: 30, grace_period: 5, reduction_factor: 3}
resources: {workers: 1, cpus_per_worker: auto, gpus_per_worker: auto, executor: auto}
fixed: {train.batch_size: 64, optim.schedule: cosine}
search:
  model.name: {type: categorical, choices: [cgcnn, csgcnn]}
  optim.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
  loss.kl: {type: categorical, choices: [false, true]}
  loss.kl_weight: {type: float, low: 0.01, high: 0.3, log: true, when: {loss.kl: true}}
```
Keys of ``fixed`` and ``search`` are dotted TrialConfig paths. ``when`` maps earlier parameters to a
value or a list of values; the parameter is sampled only when all match. Everything is checked
before Ray starts: unknown keys, types, ranges, registry names, conditions, and a sample of full
trial configs built from the space.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from ..config import TrialConfig, flatten
from ..errors import CrystaltuneError
from ..registry import did_you_mean

TOP_KEYS = ("name", "description", "dataset", "budget", "resources", "fixed", "search", "default", "finalize")
DATASET_KEYS = ("name", "file", "targets", "split_seed", "split", "limit", "cutoff", "max_neighbors", "folds", "fold")
BUDGET_KEYS = ("num_samples", "max_epochs", "grace_period", "reduction_factor")
RESOURCE_KEYS = ("workers", "cpus_per_worker", "gpus_per_worker", "executor")
#: how a trial trains: "train" = a Ray Train worker group (DDP), "direct" = inside the Tune trial's own
#: (reused) actor, one worker only; "auto" = direct for one worker, train for more
EXECUTORS = ("auto", "train", "direct")
PARAM_KEYS = {
    "categorical": ("type", "choices", "when"),
    "int": ("type", "low", "high", "step", "log", "when"),
    "float": ("type", "low", "high", "step", "log", "when"),
}


@dataclass
class Param:
    """One searched parameter: an Optuna distribution (which validated its own bounds when built) and
    the condition under which it is sampled. A categorical keeps its YAML values (lists included)
    beside the scalar keys Optuna samples (``encode_choice``)."""

    name: str
    dist: BaseDistribution
    when: dict[str, list[Any]] = field(default_factory=dict)
    choices: list[Any] = field(default_factory=list)

    @property
    def categorical(self) -> bool:
        return isinstance(self.dist, CategoricalDistribution)

    def active(self, sampled: dict[str, Any]) -> bool:
        return all(k in sampled and sampled[k] in vals for k, vals in self.when.items())

    def describe(self) -> str:
        d = self.dist
        if self.categorical:
            return f"choices: {self.choices}"
        step = d.step if isinstance(d, FloatDistribution) else (d.step if d.step != 1 else None)
        return f"{d.low}..{d.high}" + (f" step {step}" if step else "") + (" log" if d.log else "")

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this parameter can take (a choice, or on the range and its step)."""
        try:
            return bool(self.dist._contains(self.dist.to_internal_repr(encode_choice(value))))
        except (ValueError, TypeError):
            return False

    def suggest(self, trial) -> Any:
        """Sample this parameter on an Optuna trial (define-by-run), decoded back to its YAML value."""
        d = self.dist
        if self.categorical:
            return decode_choice(trial.suggest_categorical(self.name, d.choices), self.choices)
        suggest = trial.suggest_int if isinstance(d, IntDistribution) else trial.suggest_float
        return suggest(self.name, d.low, d.high, step=d.step, log=d.log)


def encode_choice(c: Any) -> Any:
    """Optuna categoricals must be scalars: lists become 'a+b' ('none' when empty)."""
    if isinstance(c, list):
        return "+".join(map(str, c)) if c else "none"
    return c


def decode_choice(key: Any, choices: list[Any]) -> Any:
    for c in choices:
        if encode_choice(c) == key:
            return copy.deepcopy(c)
    return key


@dataclass
class SearchSpace:
    name: str
    base: dict[str, Any]  # TrialConfig dict with dataset + fixed values applied
    params: list[Param]
    num_samples: int = 20
    max_epochs: int = 20
    grace_period: int = 3
    reduction_factor: int = 3
    workers: int = 1
    cpus_per_worker: float | None = 1.0  # None: "auto", planned from the cluster at launch (plan.py)
    gpus_per_worker: float | None = 0.0  # None: "auto"; a fraction packs several trials on one GPU
    executor: str = "auto"
    source: str = ""
    #: the well-trained default as values of the searched parameters: every search evaluates it first
    default_point: dict[str, Any] = field(default_factory=dict)
    default_source: str = ""
    #: the final step after the trials (search/finalize.py), or None: the best trial is the result
    finalize: Any = None

    @property
    def uses_ray_train(self) -> bool:
        """Whether trials run as Ray Train worker groups (else directly in the Tune trial's actor)."""
        return self.executor == "train" or (self.executor == "auto" and self.workers > 1)

    def trial_config(self, sampled: dict[str, Any], output: str | None = None) -> TrialConfig:
        """The full, validated TrialConfig for one set of sampled values."""
        d = copy.deepcopy(self.base)
        for key, value in sampled.items():
            set_dotted(d, key, value)
        d["train"]["epochs"] = self.max_epochs
        if output:
            d["output"] = output
        return TrialConfig.from_dict(d, where=f"{self.source} (trial)")

    def graph_config(self) -> TrialConfig:
        """The config the search's shared graphs are built with: the largest ``data.max_neighbors``
        any trial can ask for (each trial keeps its own k nearest of them)."""
        k = next((p for p in self.params if p.name == "data.max_neighbors"), None)
        if k is None:
            return self.trial_config({})
        return self.trial_config({"data.max_neighbors": int(max(k.choices) if k.categorical else k.dist.high)})


class DefineByRun:
    """A picklable callable for OptunaSearch (it saves its state with plain pickle)."""

    def __init__(self, space: SearchSpace):
        self.params = space.params

    def __call__(self, trial):
        sampled: dict[str, Any] = {}
        for p in self.params:
            if p.active(sampled):
                sampled[p.name] = p.suggest(trial)
        return None


def encode_point(point: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    """Parameter values -> Optuna's values (for ``points_to_evaluate``); the inverse of decode_sampled."""
    categorical = {p.name: p.categorical for p in space.params}
    return {k: encode_choice(v) if categorical[k] else v for k, v in point.items()}


def decode_sampled(config: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    """Tune's config (Optuna's raw values) -> parameter values (lists restored)."""
    by_name = {p.name: p for p in space.params}
    out = {}
    for k, v in config.items():
        if k in by_name:
            p = by_name[k]
            out[k] = decode_choice(v, p.choices) if p.categorical else v
    return out


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise CrystaltuneError(f"{key}: {p} is not a section")
    cur[parts[-1]] = value


def _check_keys(where: str, d: Any, allowed: tuple) -> dict:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise CrystaltuneError(f"{where}: expected a mapping, got {type(d).__name__}")
    for k in d:
        if k not in allowed:
            hint = did_you_mean(str(k), allowed)
            raise CrystaltuneError(f"{where}: unknown key {k!r}{hint} (known: {', '.join(allowed)})")
    return d


def _int(where: str, v: Any, lo: int = 1, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise CrystaltuneError(f"{where} must be an integer >= {lo}, got {v!r}")
    if hi is not None and v > hi:
        raise CrystaltuneError(f"{where} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


#: the most epochs a trial may train (TrialConfig's own bound on train.epochs)
MAX_EPOCHS = 100_000


def check_epochs_not_set(source: str, fixed: dict[str, Any], search: dict[str, Any], max_epochs: int) -> None:
    """``train.epochs`` is the budget's (every trial trains budget.max_epochs epochs, ASHA stops some
    early): a fixed value that differs, or a searched one, would be silently overridden; refused."""
    if "train.epochs" in search:
        raise CrystaltuneError(
            f"{source}: search.train.epochs: epochs cannot be searched; budget.max_epochs ({max_epochs}) sets "
            "every trial's horizon and ASHA stops the weaker trials early"
        )
    epochs = fixed.get("train.epochs")
    if epochs is not None and epochs != max_epochs:
        raise CrystaltuneError(
            f"{source}: fixed train.epochs ({epochs!r}) would be overridden: every trial trains "
            f"budget.max_epochs ({max_epochs}) epochs; set budget.max_epochs instead and remove train.epochs"
        )


def _num(where: str, v: Any, lo: float = 0.0) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
        raise CrystaltuneError(f"{where} must be a number >= {lo}, got {v!r}")
    return float(v)


def _auto_num(where: str, v: Any, lo: float) -> float | None:
    """A resource amount, or ``auto`` (None: planned from the cluster's resources at launch)."""
    return None if v == "auto" else _num(where, v, lo)


def config_paths() -> set[str]:
    """Every dotted path a search may set (edge_params.* and params.* are open)."""
    return set(flatten(TrialConfig().to_dict()))


def _check_path(where: str, key: str) -> None:
    if key.startswith(("model.edge_params.", "model.params.")):
        return
    paths = config_paths()
    if key not in paths:
        hint = did_you_mean(key, sorted(paths))
        raise CrystaltuneError(f"{where}: unknown parameter {key!r}{hint}")


def parse_param(where: str, name: str, spec: Any, earlier: dict[str, Param]) -> Param:
    _check_path(where, name)
    if not isinstance(spec, dict) or "type" not in spec:
        raise CrystaltuneError(f"{where}: expected a mapping with 'type' (categorical, int, float), got {spec!r}")
    kind = spec["type"]
    if kind not in PARAM_KEYS:
        hint = did_you_mean(str(kind), list(PARAM_KEYS))
        raise CrystaltuneError(f"{where}.type: unknown distribution {kind!r}{hint} (categorical, int, float)")
    _check_keys(where, spec, PARAM_KEYS[kind])
    when = {}
    for k, v in (_check_keys(f"{where}.when", spec.get("when"), tuple(spec.get("when") or ())) or {}).items():
        if k not in earlier:
            raise CrystaltuneError(
                f"{where}.when: condition on {k!r}, which is not a parameter searched before {name!r}"
            )
        vals = v if isinstance(v, list) and not (earlier[k].categorical and v in earlier[k].choices) else [v]
        if earlier[k].categorical:
            for x in vals:
                if x not in earlier[k].choices:
                    raise CrystaltuneError(f"{where}.when: {k} can never be {x!r} (choices: {earlier[k].choices})")
        when[k] = vals
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise CrystaltuneError(f"{where}.choices: expected a non-empty list, got {choices!r}")
        keys = [encode_choice(c) for c in choices]
        if len(set(map(repr, keys))) != len(keys):
            raise CrystaltuneError(f"{where}.choices: duplicate choices {choices!r}")
        return Param(name, CategoricalDistribution(keys), when=when, choices=choices)
    return Param(name, _numeric_distribution(where, kind, spec), when=when)


def _numeric_distribution(where: str, kind: str, spec: dict[str, Any]) -> BaseDistribution:
    """An Int/FloatDistribution from a YAML spec: types checked here, bounds/log/step by Optuna's own
    constructor (its ValueError becomes the usual one-line error naming the key)."""
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    for b, v in (("low", low), ("high", high), ("step", step)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise CrystaltuneError(f"{where}.{b}: expected a number, got {v!r}")
    if low is None or high is None:
        raise CrystaltuneError(f"{where}: needs both low and high")
    if not isinstance(log, bool):
        raise CrystaltuneError(f"{where}.log: expected true/false, got {log!r}")
    if kind == "int" and not all(float(v).is_integer() for v in (low, high, step or 1)):
        raise CrystaltuneError(f"{where}: int bounds and step must be integers, got {low}..{high} step {step}")
    try:
        if kind == "int":
            return IntDistribution(int(low), int(high), log=log, step=1 if step is None else int(step))
        return FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step))
    except ValueError as e:  # Optuna's reason, led by the short form users read in our other errors
        short = f"low ({low}) > high ({high})" if low > high else "log scale needs low > 0" if log and low <= 0 else ""
        raise CrystaltuneError(f"{where}: {short + ': ' if short else ''}{e}") from None


def load_space(name_or_path: str | Path) -> SearchSpace:
    """A SearchSpace from search_spaces/NAME.yaml or a path; raises one clear CrystaltuneError."""
    from ..yamlfile import load_yaml

    path = resolve_space(name_or_path)
    raw = load_yaml(path, "search-space file")
    return parse_space(raw, str(path), default_name=path.stem)


def experiment_space(name_or_path: str) -> tuple[str, str]:
    """(space name, space source) for the commands that read a finished search (report, ensemble): a
    built-in name, or the space file the search was started with (its ``name:`` names the experiment)."""
    if Path(name_or_path).is_file():
        space = load_space(name_or_path)
        return space.name, str(Path(name_or_path).resolve())
    return name_or_path, name_or_path


def builtin_spaces_dir() -> Path:
    """The shipped spaces and baselines: package data (a checkout's search_spaces/ links here), so an
    installed wheel or a cluster image built from one runs them too."""
    return Path(__file__).resolve().parent / "spaces"


def resolve_space(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    p = Path(text)
    if p.suffix in (".yaml", ".yml") or "/" in text:
        if not p.is_file():
            raise CrystaltuneError(f"{p}: no such search-space file")
        return p
    builtin = {f.stem: f for f in builtin_spaces_dir().glob("*.yaml")}
    if text in builtin:
        return builtin[text]
    hint = did_you_mean(text, list(builtin))
    raise CrystaltuneError(
        f"unknown search space {text!r}{hint} (built in: {', '.join(sorted(builtin))}; or a path to a .yaml file)"
    )


def check_executor(where: str, executor: Any, workers: Any) -> str:
    if executor not in EXECUTORS:
        raise CrystaltuneError(
            f"{where}: expected one of {', '.join(EXECUTORS)}, got {executor!r}"
            + did_you_mean(str(executor), EXECUTORS)
        )
    if executor == "direct" and isinstance(workers, int) and workers > 1:
        raise CrystaltuneError(
            f"{where}: 'direct' trains one worker per trial; {workers} workers need 'train' (or 'auto')"
        )
    return executor


def parse_space(raw: Any, source: str = "<space>", default_name: str = "search") -> SearchSpace:
    if not isinstance(raw, dict):
        raise CrystaltuneError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    _check_keys(source, raw, TOP_KEYS)
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise CrystaltuneError(f"{source}: name must be letters, digits, '-' or '_', got {name!r}")
    ds = _check_keys(f"{source}: dataset", raw.get("dataset") or {}, DATASET_KEYS)
    budget = _check_keys(f"{source}: budget", raw.get("budget") or {}, BUDGET_KEYS)
    res = _check_keys(f"{source}: resources", raw.get("resources") or {}, RESOURCE_KEYS)
    base = TrialConfig().to_dict()
    for k, v in ds.items():
        set_dotted(base, "data.dataset" if k == "name" else f"data.{k}", v)
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise CrystaltuneError(f"{source}: fixed: expected a mapping of dotted keys, got {type(fixed).__name__}")
    for k, v in flatten(fixed).items():
        _check_path(f"{source}: fixed", k)
        set_dotted(base, k, v)
    search = raw.get("search") or {}
    if not isinstance(search, dict) or not search:
        raise CrystaltuneError(f"{source}: search: expected a non-empty mapping of parameters")
    params: dict[str, Param] = {}
    for k, spec in search.items():
        if k.startswith("data.") and k != "data.max_neighbors":
            raise CrystaltuneError(
                f"{source}: search.{k}: only data.max_neighbors can be searched (the graphs and the "
                "split are built once and shared by every trial); set the others under dataset:"
            )
        if k in fixed:
            raise CrystaltuneError(f"{source}: {k!r} is both fixed and searched")
        params[k] = parse_param(f"{source}: search.{k}", k, spec, params)
    space = SearchSpace(
        name=name,
        base=base,
        params=list(params.values()),
        num_samples=_int(f"{source}: budget.num_samples", budget.get("num_samples", 20)),
        max_epochs=_int(f"{source}: budget.max_epochs", budget.get("max_epochs", 20), hi=MAX_EPOCHS),
        grace_period=_int(f"{source}: budget.grace_period", budget.get("grace_period", 3)),
        reduction_factor=_int(f"{source}: budget.reduction_factor", budget.get("reduction_factor", 3), lo=2),
        workers=_int(f"{source}: resources.workers", res.get("workers", 1)),
        cpus_per_worker=_auto_num(f"{source}: resources.cpus_per_worker", res.get("cpus_per_worker", 1), 0.1),
        gpus_per_worker=_auto_num(f"{source}: resources.gpus_per_worker", res.get("gpus_per_worker", 0), 0.0),
        executor=check_executor(f"{source}: resources.executor", res.get("executor", "auto"), res.get("workers", 1)),
        source=source,
    )
    if raw.get("finalize") is not None:
        from .finalize import parse_plan

        space.finalize = parse_plan(raw["finalize"], f"{source}: finalize")
    check_epochs_not_set(source, flatten(fixed), search, space.max_epochs)
    if space.grace_period > space.max_epochs:
        raise CrystaltuneError(
            f"{source}: budget.grace_period ({space.grace_period}) > max_epochs ({space.max_epochs})"
        )
    validate_samples(space)
    from .default_point import resolve_default

    space.default_point, space.default_source = resolve_default(raw.get("default"), space, source)
    return space


def validate_samples(space: SearchSpace, n: int = 64) -> None:
    """Build full trial configs from random samples (and every categorical choice) so a value that
    cannot work (unknown model, bad featurizer parameter, ...) fails now, not in trial 17."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    cat = [p for p in space.params if p.categorical]
    forced_list = [(None, None)] * n + [(p.name, c) for p in cat for c in p.choices]
    for forced_name, forced_value in forced_list:  # random samples, then every categorical choice once
        trial = study.ask()
        sampled: dict[str, Any] = {}
        for p in space.params:
            if p.active(sampled):
                sampled[p.name] = copy.deepcopy(forced_value) if p.name == forced_name else p.suggest(trial)
        try:
            space.trial_config(sampled)
        except CrystaltuneError as exc:
            raise CrystaltuneError(f"{space.source}: {exc} (with {sampled})") from None
        except (TypeError, ValueError) as exc:
            raise CrystaltuneError(f"{space.source}: invalid combination {sampled}: {exc}") from None
        study.tell(trial, 0.0)
