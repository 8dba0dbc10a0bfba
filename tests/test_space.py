"""Search spaces without Ray or MLflow: bad spaces fail before Ray with one clear error, searched
parameters are Optuna distributions, the default point, the shipped spaces, warm-start compatibility
and the auto-resources plan."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from crystaltune.errors import CrystaltuneError
from crystaltune.search.space import load_space, parse_space

ROOT = Path(__file__).resolve().parents[1]


# validation before Ray starts -------------------------------------------------------------------
def _space(**over):
    raw = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())
    for k, v in over.items():
        raw[k] = v
    return raw


@pytest.mark.parametrize(
    "raw, match",
    [
        (_space(budgett={}), "unknown key 'budgett'; did you mean 'budget'"),
        (_space(budget={"num_samples": -1}), "num_samples must be an integer >= 1"),
        (_space(budget={"num_samples": "four"}), "num_samples must be an integer"),
        (_space(search={"optim.lr": {"type": "float", "low": 0.1, "high": 0.01}}), r"low \(0.1\) > high \(0.01\)"),
        (_space(search={"model.name": {"type": "categorical", "choices": []}}), "non-empty list"),
        (
            _space(search={"model.name": {"type": "categorical", "choices": ["cgcnn", "csgcn"]}}),
            "did you mean 'csgcnn'",
        ),
        (
            _space(search={"model.edge_featurizer": {"type": "categorical", "choices": ["gausian"]}}),
            "did you mean 'gaussian'",
        ),
        (_space(search={"loss.name": {"type": "categorical", "choices": ["l2"]}}), "unknown loss 'l2'"),
        (_space(search={"model.nam": {"type": "categorical", "choices": ["cgcnn"]}}), "did you mean 'model.name'"),
        (
            _space(search={"loss.kl_weight": {"type": "float", "low": 0.1, "high": 1, "when": {"loss.kll": True}}}),
            "not a parameter searched before",
        ),
        (_space(search={"optim.lr": {"type": "uniform", "low": 0.1, "high": 1}}), "unknown distribution"),
        (_space(search={"optim.lr": {"type": "float", "low": 0, "high": 1, "log": True}}), "log scale needs low > 0"),
        (
            _space(search={"model.edge_params.num_rbf": {"type": "int", "low": 8, "high": 16}}),
            "unknown parameter 'num_rbf'",
        ),
        (_space(search={"model.dropout": {"type": "float", "low": 0, "high": "x"}}), "expected a number"),
        (_space(search={"model.layers": {"type": "int", "low": 1, "high": 5, "step": 0}}), r"step > 0"),
        (_space(search={"optim.lr": {"type": "float", "low": 0.1, "high": 1, "step": 0.1, "log": True}}), "`log`"),
        (_space(resources={"executor": "dirct"}), "did you mean 'direct'"),
        (_space(resources={"workers": 2, "executor": "direct"}), "'direct' trains one worker per trial"),
        ([1, 2], "expected a mapping"),
        (_space(finalize={"top_kk": 2}), r"finalize: unknown key 'top_kk'.*did you mean 'top_k'"),
        (_space(finalize={"cv_folds": 1}), r"finalize.cv_folds: must be in \[2, 20\], got 1"),
        (_space(finalize={"seeds": [0, 0]}), "finalize.seeds: distinct non-negative integers"),
    ],
)
def test_bad_search_spaces_fail_before_ray(raw, match):
    with pytest.raises(CrystaltuneError, match=match):
        parse_space(raw, "bad.yaml")


def test_search_parameters_are_optuna_distributions():
    """Each searched parameter is the Optuna distribution it samples from (validated by Optuna's own
    constructor); categoricals keep their YAML values (lists) beside the scalar keys Optuna sees."""
    import optuna

    space = load_space("perovskites")
    by_name = {p.name: p for p in space.params}
    assert all(isinstance(p.dist, optuna.distributions.BaseDistribution) for p in space.params)
    lr, feats = by_name["optim.lr"], by_name["model.global_features"]
    assert isinstance(lr.dist, optuna.distributions.FloatDistribution) and lr.dist.log
    assert lr.contains(1e-3) and not lr.contains(1.0)
    assert feats.dist.choices == ("none", "lattice", "lattice+symmetry") and feats.contains(["lattice"])
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    assert feats.suggest(trial) in feats.choices and lr.contains(lr.suggest(trial))


def test_default_point_from_a_file_and_its_errors(tmp_path):
    space = load_space("perovskites")  # default: baselines/cgcnn_default_perovskites.yaml
    assert space.default_point["optim.name"] == "adam" and space.default_point["train.batch_size"] == 256
    assert space.default_point["model.edge_params.step"] == 0.2 and "optim.weight_decay" not in space.default_point
    raw = {
        "dataset": {"name": "perovskites"},
        "fixed": {"optim.name": "sgd"},
        "search": {"model.hidden": {"type": "int", "low": 32, "high": 96, "step": 32}},
    }
    with pytest.raises(CrystaltuneError, match="default is not a point of this space .*optim.name = 'adam'"):
        parse_space({**raw, "default": "baselines/cgcnn_default_perovskites.yaml"}, "s.yaml")
    with pytest.raises(CrystaltuneError, match="no such config file 'nope.yaml'"):
        parse_space({**raw, "default": "nope.yaml"}, "s.yaml")
    with pytest.raises(CrystaltuneError, match="'model.layers' is not a searched parameter"):
        parse_space({**raw, "default": {"model.layers": 3}}, "s.yaml")
    narrow = {**raw, "search": {"model.hidden": {"type": "int", "low": 128, "high": 256}}}
    with pytest.raises(CrystaltuneError, match=r"trial 0\) has model.hidden = 64, which the search cannot take"):
        parse_space(narrow, "s.yaml")
    assert parse_space({**narrow, "default": {"model.hidden": 128}}, "s.yaml").default_point == {"model.hidden": 128}


def test_shipped_spaces_validate_and_search_the_required_parameters():
    required = {
        "model.name",
        "model.hidden",
        "model.layers",
        "model.pooling",
        "model.dropout",
        "model.edge_featurizer",
        "model.node_featurizer",
        "model.learnable_edge",
        "model.global_features",
        "loss.name",
        "loss.kl_weight",
        "optim.lr",
        "optim.weight_decay",
        "train.batch_size",
    }
    for name in ("perovskites", "perov5", "sunmat"):
        space = load_space(name)
        names = {p.name for p in space.params}
        assert required <= names, required - names
        assert any(n.startswith("model.edge_params.") for n in names)
    smoke = load_space("smoke")
    assert smoke.num_samples >= 4


def test_cli_errors_are_one_line(tmp_path):
    for args, match in (
        (["perovskitez"], "did you mean 'perovskites'"),
        (["smoke", "--num-samples", "-3"], "must be >= 1"),
        ([str(tmp_path / "none.yaml")], "no such search-space file"),
        (["smoke", "--data", str(tmp_path / "missing.json")], "no such file"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "crystaltune.search", *args], capture_output=True, text=True, cwd=tmp_path
        )
        assert out.returncode == 2 and match in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_auto_resources_pack_trials_on_gpus_and_fall_back_to_cpus():
    from crystaltune.search.engine import SearchOptions, prepare_space
    from crystaltune.search.plan import plan_concurrency, resolve_auto

    def planned(res, **kw):
        space = prepare_space(SearchOptions("sunmat", data=str(ROOT / "README.md"), **kw))
        resolve_auto(space, res)
        return space.gpus_per_worker, space.cpus_per_worker, plan_concurrency(space, res)

    assert planned({"CPU": 2}) == (0.0, 1.0, 2)  # no GPU: CPU trials
    assert planned({"CPU": 16, "GPU": 1}) == (0.25, 4.0, 4)  # 4 trials share the GPU, 4 cores each
    assert planned({"CPU": 64, "GPU": 8}) == (0.25, 2.0, 32)
    assert planned({"CPU": 16, "GPU": 2}, trials_per_gpu=8) == (0.125, 1.0, 16)


def test_warm_start_refuses_an_incompatible_study(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name="crystaltune-other", storage=storage)
    study.add_trial(
        optuna.trial.create_trial(
            params={"model.hidden": 48},
            distributions={"model.hidden": optuna.distributions.IntDistribution(16, 64)},
            value=0.5,
        )
    )
    from crystaltune.search.warm_start import warm_points

    with pytest.raises(
        CrystaltuneError, match="no configuration of that study fits this space .*model.hidden is not searched"
    ):
        warm_points(str(tmp_path / "o.db"), load_space("smoke"))
    with pytest.raises(CrystaltuneError, match="no such file"):
        warm_points(str(tmp_path / "none.db"), load_space("smoke"))
