"""Registered models: shapes and finiteness under every option, learning, invariances, the flow layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crystaltune.config import ModelConfig
from crystaltune.errors import CrystaltuneError
from crystaltune.featurizers import EDGE_FEATURIZERS
from crystaltune.featurizers.node import NODE_TABLES
from crystaltune.graphs.store import Batch
from crystaltune.models import MODELS, build_model
from crystaltune.models.flowgnn import AffineCoupling

MODEL_NAMES = ["cgcnn", "csgcnn", "csgann", "csginn", "egcnn", "flowgnn"]

# (config overrides, n_targets)
OPTIONS = {
    "default": ({}, 1),
    "pool-sum": ({"pooling": "sum"}, 1),
    "pool-max": ({"pooling": "max"}, 1),
    "pool-set2set": ({"pooling": "set2set"}, 1),
    "pool-attention": ({"pooling": "attention"}, 1),
    "globals-2targets": ({"global_features": ["lattice", "symmetry"]}, 2),
    "learnable-edge": ({"learnable_edge": True, "edge_dim": 16}, 1),
    "norm-layer": ({"norm": "layer"}, 1),
    "norm-none-noresidual": ({"norm": "none", "residual": False}, 1),
    "edge-rbf": ({"edge_featurizer": "rbf"}, 1),
    "edge-atom-specific": ({"edge_featurizer": "atom_specific_gaussian"}, 1),
    "node-extended": ({"node_featurizer": "extended"}, 1),
    "node-cgcnn+extended-dropout": ({"node_featurizer": "cgcnn+extended", "dropout": 0.2, "head_layers": 2}, 1),
}

# model-specific kwargs (model.params) worth exercising besides the defaults
PARAMS = [
    ("csgcnn", {"edge_update": False}),
    ("csgann", {"attention": "gatv2"}),
    ("csgann", {"heads": 3, "activation": "silu"}),  # 32 channels not divisible by 3 heads
    ("csgann", {"heads": 1}),
    ("csginn", {"train_eps": False, "aggr": "mean", "mlp_layers": 1}),
    ("csginn", {"aggr": "max", "mlp_layers": 3}),
    ("flowgnn", {"flow_layers": 0}),
    ("flowgnn", {"flow_layers": 2, "flow_hidden": 8, "s_max": 1.0}),
    ("egcnn", {"angles": True, "angle_bins": 4, "activation": "softplus"}),
    ("egcnn", {"angles": True, "angle_layers": 1}),
]


@pytest.fixture(scope="module")
def ds():
    from crystaltune.data import load_dataset

    return load_dataset("perovskites")


@pytest.fixture(scope="module")
def batch16(ds):
    return ds.store.batch(np.arange(16), ds.targets)


def config(name: str, hidden: int = 32, layers: int = 2, **kw) -> ModelConfig:
    return ModelConfig(name=name, hidden=hidden, head_hidden=32, layers=layers, **kw)


def check_forward(model, batch: Batch, n_targets: int) -> None:
    model.train()
    out = model(batch)
    assert out.shape == (batch.num_graphs, n_targets)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        out = model(batch)
    assert out.shape == (batch.num_graphs, n_targets) and torch.isfinite(out).all()


META_CASES = [(n, OPTIONS[o][0], OPTIONS[o][1]) for n in MODEL_NAMES for o in OPTIONS] + [
    (n, {"params": kw}, 1) for n, kw in PARAMS
]
META_CASES += [("cgcnn", {"edge_featurizer": e}, 1) for e in EDGE_FEATURIZERS.names()]
META_CASES += [("cgcnn", {"node_featurizer": f, "node_trainable": True}, 1) for f in NODE_TABLES.names()]


@pytest.mark.parametrize("name,overrides,n_targets", META_CASES)
def test_every_option_builds_on_the_meta_device_as_loading_a_checkpoint_does(name, overrides, n_targets):
    """load_checkpoint builds the model on the meta device first (shapes only, no memory): an option
    whose constructor needs real values (a boolean mask) made its checkpoints unloadable."""
    from crystaltune.checkpoint import _build_checked
    from crystaltune.config import TrialConfig

    cfg = TrialConfig(model=config(name, **overrides))
    real = build_model(cfg.model, n_targets, cfg.data.cutoff)
    loaded = _build_checked(cfg, n_targets, real.state_dict(), "model.pt")
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}


def test_all_variants_registered():
    assert set(MODEL_NAMES) <= set(MODELS.names())


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shapes_and_finite(name, option, batch16):
    overrides, n_targets = OPTIONS[option]
    torch.manual_seed(0)
    model = build_model(config(name, **overrides), n_targets)
    check_forward(model, batch16, n_targets)


@pytest.mark.parametrize(
    "name,params", PARAMS, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items())}" for n, p in PARAMS]
)
def test_model_specific_params(name, params, batch16):
    torch.manual_seed(0)
    model = build_model(config(name, params=params))
    for key, value in params.items():
        if key == "heads":  # model.heads holds the output heads
            assert model.num_heads == value and model.blocks[0].conv.heads == value
        else:
            assert getattr(model, key) == value
    check_forward(model, batch16, 1)


@pytest.mark.parametrize(
    "name,params",
    [
        ("csgann", {"heads": 0}),
        ("csgann", {"attention": "dot"}),
        ("csgann", {"activation": "relu6"}),
        ("csginn", {"aggr": "median"}),
        ("csginn", {"mlp_layers": 0}),
        ("flowgnn", {"flow_layers": -1}),
        ("flowgnn", {"s_max": 0.0}),
        ("egcnn", {"angle_bins": 1}),
        ("egcnn", {"angles": "yes"}),
    ],
)
def test_bad_params_raise(name, params):
    with pytest.raises(CrystaltuneError):
        build_model(config(name, params=params))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_loss_falls_when_training(name, ds):
    torch.manual_seed(0)
    batch = ds.store.batch(np.arange(64), ds.targets)
    y = batch.y[:, 0]
    y = (y - y.mean()) / y.std()
    model = build_model(config(name, node_featurizer="cgcnn+extended"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    with torch.no_grad():
        initial = (model(batch)[:, 0] - y).abs().mean().item()
    for _ in range(30):
        opt.zero_grad()
        loss = (model(batch)[:, 0] - y).abs().mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = (model(batch)[:, 0] - y).abs().mean().item()
    assert np.isfinite(final) and final < 0.7 * initial, (initial, final)


@pytest.mark.parametrize("pooling", ["mean", "set2set"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_crystal_order_permutes_outputs(name, pooling, ds):
    torch.manual_seed(0)
    model = build_model(config(name, pooling=pooling, global_features=["lattice", "symmetry"]), 2).eval()
    index = np.arange(0, 240, 20)  # 12 crystals of different sizes
    perm = np.random.default_rng(1).permutation(len(index))
    with torch.no_grad():
        out = model(ds.store.batch(index, ds.targets))
        out_perm = model(ds.store.batch(index[perm], ds.targets))
    torch.testing.assert_close(out_perm, out[torch.from_numpy(perm)], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_atom_and_edge_order_do_not_matter(name, batch16):
    """Relabelling atoms and reordering edges inside the batch leaves every prediction unchanged."""
    torch.manual_seed(0)
    model = build_model(config(name)).eval()
    b = batch16
    g = torch.Generator().manual_seed(2)
    node_perm = torch.randperm(len(b.z), generator=g)  # new atom k is old atom node_perm[k]
    new_label = torch.empty_like(node_perm)
    new_label[node_perm] = torch.arange(len(node_perm))
    edge_perm = torch.randperm(b.edge_index.shape[1], generator=g)
    shuffled = Batch(
        z=b.z[node_perm],
        edge_index=new_label[b.edge_index[:, edge_perm]],
        dist=b.dist[edge_perm],
        batch=b.batch[node_perm],
        cell=b.cell,
        spacegroup=b.spacegroup,
        y=b.y,
        num_graphs=b.num_graphs,
    )
    with torch.no_grad():
        torch.testing.assert_close(model(shuffled), model(b), rtol=1e-4, atol=1e-5)


# CSGCNN / FlowGNN reduce to CGCNN ------------------------------------------------------------------
def test_csgcnn_without_edge_update_is_cgcnn(batch16):
    torch.manual_seed(0)
    ref = build_model(config("cgcnn")).eval()
    plain = build_model(config("csgcnn", params={"edge_update": False})).eval()
    plain.load_state_dict(ref.state_dict())  # same parameters, strictly
    updated = build_model(config("csgcnn", layers=3)).eval()
    assert len(updated.edge_updates) == 2  # between consecutive convolutions only
    with torch.no_grad():
        torch.testing.assert_close(plain(batch16), ref(batch16))


def test_untrained_flowgnn_equals_cgcnn(batch16):
    torch.manual_seed(0)
    ref = build_model(config("cgcnn")).eval()
    flow = build_model(config("flowgnn", params={"flow_layers": 2})).eval()
    missing, unexpected = flow.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("flows.") for k in missing)
    with torch.no_grad():
        torch.testing.assert_close(flow(batch16), ref(batch16))
    assert flow.log_det.shape == (batch16.num_graphs,)
    assert torch.all(flow.log_det == 0)  # couplings start as the identity


# the affine coupling layer -------------------------------------------------------------------------
def _random_coupling(dim: int, flip: bool, s_max: float = 2.0) -> AffineCoupling:
    torch.manual_seed(3)
    layer = AffineCoupling(dim, hidden=7, flip=flip, s_max=s_max).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.7)  # undo the identity initialisation
    return layer


@pytest.mark.parametrize("dim", [4, 5])
@pytest.mark.parametrize("flip", [False, True])
def test_affine_coupling_inverts(dim, flip):
    layer = _random_coupling(dim, flip)
    x = torch.randn(6, dim, dtype=torch.float64)
    y, _ = layer(x)
    assert not torch.allclose(y, x)
    torch.testing.assert_close(layer.inverse(y), x, rtol=1e-10, atol=1e-10)
    # only one half changes
    cond = slice(dim // 2, dim) if flip else slice(0, dim // 2)
    torch.testing.assert_close(y[:, cond], x[:, cond])


@pytest.mark.parametrize("dim", [4, 5])
@pytest.mark.parametrize("flip", [False, True])
def test_affine_coupling_log_det_matches_jacobian(dim, flip):
    layer = _random_coupling(dim, flip)
    x = torch.randn(3, dim, dtype=torch.float64)
    _, log_det = layer(x)
    assert log_det.shape == (3,)
    for r in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: layer(v)[0], x[r])
        assert jac.shape == (dim, dim)
        torch.testing.assert_close(log_det[r], torch.linalg.slogdet(jac).logabsdet, rtol=1e-9, atol=1e-9)


def test_affine_coupling_scale_is_bounded():
    layer = _random_coupling(6, False, s_max=0.5)
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(100.0)
        _, log_det = layer(torch.randn(20, 6, dtype=torch.float64) * 10)
    assert log_det.abs().max() <= 3 * 0.5
