"""Typed configs for one trial, validated before anything runs; YAML/dict round trip.

A config that validated once never fails later for a reason validation could have caught: registry
names, ranges and unknown keys are all checked here.

Dependencies run one way: ``schema`` (parsing) <- the registries (models, featurizers, losses,
optimisers: they name these classes only in type hints) <- ``config`` <- what builds configs (e.g.
``models.reference``). ``TrialConfig.validate`` imports the registries inside the function so that
importing ``config`` stays light (no torch) for code that only reads a config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import CrystaltuneError
from .registry import did_you_mean
from .schema import build, option


@dataclass
class DataConfig:
    dataset: str = "perovskites"
    file: str | None = None  # the file behind a dataset name (e.g. the user's SNUMAT file)
    targets: list[str] | None = None  # None: the dataset's default
    split_seed: int = 0
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    cutoff: float = 8.0
    max_neighbors: int = 12
    limit: int | None = None  # use only the first N crystals (seeded subset), for smoke runs
    folds: int | None = None  # k-fold cross-validation: the test set is fold ``fold`` of ``folds``
    fold: int = 0
    # cross-validation for choosing a model: the test set is the plain split's, val is fold ``fold`` of
    # ``val_folds`` of the rest (so the choice never sees a test crystal)
    val_folds: int | None = None


@dataclass
class ModelConfig:
    name: str = "cgcnn"
    hidden: int = 64  # atom embedding size (CGCNN atom_fea_len)
    head_hidden: int = 128  # CGCNN h_fea_len
    layers: int = 3  # message-passing layers (CGCNN n_conv)
    head_layers: int = 1  # CGCNN n_h
    pooling: str = "mean"
    dropout: float = 0.0
    norm: str = "batch"  # batch | layer | none
    residual: bool = True
    global_features: list[str] = field(default_factory=list)  # lattice, symmetry
    node_featurizer: str = "cgcnn"
    node_trainable: bool = False
    edge_featurizer: str = "gaussian"
    edge_params: dict[str, Any] = field(default_factory=dict)
    learnable_edge: bool = False
    edge_dim: int = 64  # size of the learnable edge projection
    params: dict[str, Any] = field(default_factory=dict)  # model-specific (heads, flow_layers, ...)


@dataclass
class LossConfig:
    name: str = "l1"
    kl: bool = False  # add kl_weight x Gaussian KL regulariser
    kl_weight: float = 0.1
    huber_delta: float = 1.0


@dataclass
class OptimConfig:
    name: str = "adamw"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"  # cosine | plateau | onecycle | step | none
    milestones: list[int] = field(default_factory=lambda: [100])  # for step
    grad_clip: float | None = None


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    seed: int = 0
    early_stopping: int | None = None  # patience in epochs
    amp: bool = True  # only on CUDA
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int | None = None
    eval_batch_size: int = 512
    averaging: Literal["none", "ema", "swa"] = option(
        "none", doc="evaluate and keep averaged weights: an EMA over steps, or SWA over the last epochs"
    )
    ema_decay: float = option(0.99, lo=0.5, hi=0.99999, doc="EMA: weight of the running average per step")
    swa_start: float = option(0.75, lo=0.0, hi=0.99, doc="SWA: average the epochs after this fraction of them")


@dataclass
class TrialConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: str | None = None  # checkpoint file to write

    # conversion ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> TrialConfig:
        cfg = build(cls, d or {}, where)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrialConfig:
        from .yamlfile import load_yaml

        path = Path(path)
        data = load_yaml(path, "config file")
        if data is not None and not isinstance(data, dict):
            raise CrystaltuneError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        return cls.from_dict(data or {}, where=str(path))

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def flat(self) -> dict[str, Any]:
        """``section.key`` -> value, for logging parameters."""
        return flatten(self.to_dict())

    def used_flat(self) -> dict[str, Any]:
        """``flat()`` without the settings this config never reads (SGD's momentum under Adam, the step
        schedule's milestones under cosine, ...): what a trial's MLflow run lists as its parameters."""
        unused = {
            "optim.momentum": self.optim.name != "sgd",
            "optim.milestones": self.optim.schedule != "step",
            "loss.kl_weight": not self.loss.kl,
            "loss.huber_delta": self.loss.name not in ("huber", "weighted"),
            "train.ema_decay": self.train.averaging != "ema",
            "train.swa_start": self.train.averaging != "swa",
        }
        return {k: v for k, v in self.flat().items() if not unused.get(k, False)}

    # validation -----------------------------------------------------------------------------------
    def validate(self) -> None:
        """Registry names, sizes and the components' own options; raises CrystaltuneError naming the key."""
        self._check_names()
        self._check_sizes()
        self._check_components()

    def _check_names(self) -> None:
        """Every name resolves in the registry that builds it (so a name is valid exactly when usable)."""
        from .featurizers import EDGE_FEATURIZERS, NODE_TABLES
        from .losses import LOSSES
        from .models import MODELS, POOLINGS
        from .models.base import GLOBAL_FEATURES, NORMS
        from .train.optim import OPTIMIZERS, SCHEDULES

        m, o = self.model, self.optim
        MODELS.get(m.name)
        POOLINGS.get(m.pooling)
        EDGE_FEATURIZERS.get(m.edge_featurizer)
        for part in m.node_featurizer.split("+"):
            NODE_TABLES.get(part)
        LOSSES.get(self.loss.name)
        for name, registry, value in (
            ("model.norm", NORMS, m.norm),
            ("optim.name", OPTIMIZERS, o.name),
            ("optim.schedule", SCHEDULES, o.schedule),
        ):
            if value not in registry:
                raise CrystaltuneError(f"{name}: {registry.unknown_message(value)}")
        for g in m.global_features:
            _choice("model.global_features", g, GLOBAL_FEATURES)
        _choice("train.device", self.train.device, ("auto", "cpu", "cuda"))

    def _check_sizes(self) -> None:
        """Ranges; the upper bounds keep a few bytes of config from asking for gigabytes of model."""
        m, t, o, d = self.model, self.train, self.optim, self.data
        _range("model.hidden", m.hidden, 1, 4096)
        _range("model.head_hidden", m.head_hidden, 1, 8192)
        _range("model.layers", m.layers, 1, 64)
        _range("model.head_layers", m.head_layers, 1, 16)
        _range("model.edge_dim", m.edge_dim, 1, 4096)
        _range("model.dropout", m.dropout, 0.0, 0.95)
        _positive("optim.lr", o.lr)
        _range("optim.weight_decay", o.weight_decay, 0.0, 10.0)
        _range("loss.kl_weight", self.loss.kl_weight, 0.0, 1e3)
        _positive("loss.huber_delta", self.loss.huber_delta)
        _range("train.epochs", t.epochs, 1, 100_000)
        _range("train.batch_size", t.batch_size, 1, 65_536)
        _range("train.eval_batch_size", t.eval_batch_size, 1, 65_536)
        if t.num_threads is not None:
            _range("train.num_threads", t.num_threads, 1, 1024)
        _range("data.cutoff", d.cutoff, 0.5, 20.0)
        _range("data.max_neighbors", d.max_neighbors, 1, 64)
        if d.limit is not None:
            _positive("data.limit", d.limit)
        if t.early_stopping is not None:
            _positive("train.early_stopping", t.early_stopping)
        if o.grad_clip is not None:
            _positive("optim.grad_clip", o.grad_clip)
        if d.folds is not None and d.val_folds is not None:
            raise CrystaltuneError("data.folds and data.val_folds: one kind of cross-validation at a time")
        for key, k in (("data.folds", d.folds), ("data.val_folds", d.val_folds)):
            if k is not None:
                _range(key, k, 2, 100)
                _range("data.fold", d.fold, 0, k - 1)
        if len(d.split) != 3 or min(d.split) < 0 or abs(sum(d.split) - 1) > 1e-6 or d.split[0] == 0:
            raise CrystaltuneError(f"data.split must be 3 non-negative fractions summing to 1, got {d.split}")

    def _check_components(self) -> None:
        """``model.edge_params`` and ``model.params``, parsed by the featurizer's and model's Params."""
        from .featurizers.edge import check_edge_params
        from .models import MODELS
        from .models.params import parse_params

        m = self.model
        check_edge_params(m.edge_featurizer, self.data.cutoff, m.edge_params)
        parse_params(MODELS.get(m.name).Params, m.params, m)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        hint = did_you_mean(str(value), choices)
        raise CrystaltuneError(f"{name}: unknown value {value!r}{hint} (choices: {', '.join(choices)})")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise CrystaltuneError(f"{name} must be > 0, got {value}")


def _range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise CrystaltuneError(f"{name} must be in [{lo}, {hi}], got {value}")
