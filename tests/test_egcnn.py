"""EGCNN: the edge-gated model, its bond-angle features and its invariances."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import random_cell
from pymatgen.core import Lattice, Structure

from crystaltune.config import ModelConfig
from crystaltune.errors import CrystaltuneError
from crystaltune.graphs import GraphStore, graph_from_structure
from crystaltune.graphs.store import Batch
from crystaltune.models import build_model
from crystaltune.models.egcnn import EGCNN, AngleBasis, EGCNNParams, bond_cosines, bond_pairs

ANGLES = [pytest.param({}, id="plain"), pytest.param({"angles": True, "angle_bins": 8}, id="angles")]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tests run small tensors: one thread is as fast, and far faster when other processes keep
    the cores busy (OpenMP threads then wait on each other)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def ds():
    from crystaltune.data import load_dataset

    return load_dataset("perovskites")


@pytest.fixture(scope="module")
def batch16(ds):
    return ds.store.batch(np.arange(16), ds.targets)


def config(hidden: int = 16, layers: int = 3, params: dict | None = None, **kw) -> ModelConfig:
    return ModelConfig(name="egcnn", hidden=hidden, head_hidden=16, layers=layers, params=params or {}, **kw)


def batch_of(structures, cutoff: float = 8.0, max_neighbors: int | None = 12) -> Batch:
    graphs = [graph_from_structure(s, cutoff, max_neighbors) for s in structures]
    store = GraphStore.from_graphs([f"s{i}" for i in range(len(graphs))], graphs, [{} for _ in graphs])
    return store.batch(np.arange(len(graphs)), [])


def shuffled(b: Batch, seed: int = 2) -> Batch:
    """The same crystals with atoms relabelled and edges reordered (so no uniform-degree fast path)."""
    g = torch.Generator().manual_seed(seed)
    node_perm = torch.randperm(len(b.z), generator=g)  # new atom k is old atom node_perm[k]
    new_label = torch.empty_like(node_perm)
    new_label[node_perm] = torch.arange(len(node_perm))
    edge_perm = torch.randperm(b.edge_index.shape[1], generator=g)
    return Batch(
        z=b.z[node_perm],
        edge_index=new_label[b.edge_index[:, edge_perm]],
        dist=b.dist[edge_perm],
        batch=b.batch[node_perm],
        cell=b.cell,
        spacegroup=b.spacegroup,
        y=b.y,
        num_graphs=b.num_graphs,
        vec=b.vec[edge_perm],
    )


def _randomise_norms(model: torch.nn.Module) -> None:
    """Give batch norms non-trivial running statistics so eval-mode outputs differ between crystals."""
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def model_for(params: dict, seed: int = 0, **kw):
    """An eval-mode model whose outputs depend visibly on geometry: at initialisation the gates are
    near 0.5 and a 4% strain moves the embedding by ~1e-5 only, too little to tell an invariance from
    insensitivity; weights scaled by 3 make it ~1e-2."""
    torch.manual_seed(seed)
    model = build_model(config(params=params, **kw)).eval()
    with torch.no_grad():
        _randomise_norms(model)
        for name, p in model.named_parameters():
            if name.startswith(("convs.", "angle_updates.", "edge_embedding.")) and p.dim() == 2:
                p.mul_(3.0)
    return model


# forward, learning, depth ------------------------------------------------------------------------------
@pytest.mark.parametrize("params", ANGLES)
def test_forward_shapes_and_finite(params, batch16):
    torch.manual_seed(0)
    model = build_model(config(params=params, global_features=["lattice"]), 2)
    assert len(model.angle_updates) == (3 if params else 0)
    model.train()
    out = model(batch16)
    assert out.shape == (16, 2) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing  # every parameter is used (DDP runs without find_unused_parameters)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        out = model(batch16)
    assert out.shape == (16, 2) and torch.isfinite(out).all()


@pytest.mark.parametrize("params", ANGLES)
def test_loss_falls_when_training(params, ds):
    torch.manual_seed(0)
    batch = ds.store.batch(np.arange(48), ds.targets)
    y = batch.y[:, 0]
    y = (y - y.mean()) / y.std()
    model = build_model(config(hidden=24, params=params, node_featurizer="cgcnn+extended"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    with torch.no_grad():
        initial = (model(batch)[:, 0] - y).abs().mean().item()
    for _ in range(25):
        opt.zero_grad()
        loss = (model(batch)[:, 0] - y).abs().mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = (model(batch)[:, 0] - y).abs().mean().item()
    assert np.isfinite(final) and final < 0.7 * initial, (initial, final)


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_twelve_layers_stay_finite(norm, ds):
    batch = ds.store.batch(np.arange(6), ds.targets)
    torch.manual_seed(0)
    model = build_model(config(layers=12, norm=norm, params={"angles": True, "angle_bins": 4}))
    assert len(model.convs) == 12 and len(model.angle_updates) == 12
    model.train()
    out = model(batch)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        emb = model.eval().embed(batch)
    assert torch.isfinite(emb).all() and emb.abs().max() < 1e4


def test_angle_layers_limits_the_angle_updates(batch16):
    assert len(build_model(config(params={"angles": True, "angle_layers": 2})).angle_updates) == 2
    assert len(build_model(config(params={"angles": True, "angle_layers": 40})).angle_updates) == 3
    # no angle layer: exactly the plain model (same parameters, same numbers)
    torch.manual_seed(0)
    plain = build_model(config()).eval()
    none = build_model(config(params={"angles": True, "angle_layers": 0})).eval()
    none.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(none(batch16), plain(batch16))


# the two code paths -------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", ANGLES)
def test_uniform_degree_fast_path_equals_general_path(params, batch16):
    assert batch16.degree == 12
    general = dataclasses.replace(batch16, degree=0)
    model = model_for(params, hidden=24)
    with torch.no_grad():
        torch.testing.assert_close(model.embed(general), model.embed(batch16), rtol=1e-5, atol=1e-5)
    # training mode (batch statistics) and gradients too
    model.train()
    grads = []
    for b in (batch16, general):
        model.zero_grad()
        model(b).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for fast, slow in zip(*grads):
        torch.testing.assert_close(slow, fast, rtol=1e-4, atol=1e-5)


def test_angle_update_paths_agree_directly(batch16):
    model = model_for({"angles": True}, hidden=8)
    n = len(batch16.z)
    e = torch.randn(batch16.edge_index.shape[1], 8, generator=torch.Generator().manual_seed(0))
    fast = model.angle_graph(batch16.edge_index, batch16, n)
    slow = model.angle_graph(batch16.edge_index, dataclasses.replace(batch16, degree=0), n)
    assert fast.degree == 12 and slow.degree == 0 and len(slow.a) == n * 12 * 11
    with torch.no_grad():
        update = model.angle_updates[0]
        torch.testing.assert_close(update(e, slow), update(e, fast), rtol=1e-5, atol=1e-5)


# angle features ---------------------------------------------------------------------------------------
def test_simple_cubic_bond_angles():
    """One atom, six bonds to its own periodic images: pairs at 90 degrees (cos 0) or 180 (cos -1)."""
    b = batch_of([Structure(Lattice.cubic(3.0), ["Po"], [[0, 0, 0]])], cutoff=3.5, max_neighbors=None)
    assert b.degree == 6 and (b.edge_index == 0).all()  # every bond joins the atom to an image of itself
    torch.testing.assert_close(b.vec.norm(dim=1), b.dist)
    cos = bond_cosines(b.vec, b.edge_index[1], 1, 6)[0]
    torch.testing.assert_close(cos.diagonal(), torch.ones(6))
    opposite = (b.vec @ b.vec.t()) < 0  # bond pairs pointing opposite ways
    off = ~torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(cos[opposite], -torch.ones(6))
    torch.testing.assert_close(cos[off & ~opposite], torch.zeros(24), atol=1e-6, rtol=0)
    a, pair_b, cos_g = bond_cosines(b.vec, b.edge_index[1], 1)
    assert len(a) == 30 and (a != pair_b).all()  # 6 x 5 ordered pairs of distinct bonds
    torch.testing.assert_close(cos_g, cos[a, pair_b])


def test_triangle_bond_angles():
    """Three atoms at the corners of a right isosceles triangle in a big box (no bond leaves it)."""
    s = Structure(Lattice.cubic(20.0), ["O", "H", "H"], [[0, 0, 0], [2, 0, 0], [0, 2, 0]], coords_are_cartesian=True)
    b = batch_of([s], cutoff=3.0, max_neighbors=None)
    assert b.degree == 2
    cos = bond_cosines(b.vec, b.edge_index[1], 3, 2)
    expected = torch.tensor([0.0, 2**-0.5, 2**-0.5])  # the right angle at atom 0, 45 degrees elsewhere
    torch.testing.assert_close(cos[:, 0, 1], expected)
    torch.testing.assert_close(cos[:, 1, 0], expected)
    perm = torch.tensor([5, 2, 0, 3, 1, 4])  # any edge order: the general path lists the same pairs
    a, pb, cos_g = bond_cosines(b.vec[perm], b.edge_index[1][perm], 3)
    centre = b.edge_index[1][perm][a]
    assert len(a) == 6 and (centre == b.edge_index[1][perm][pb]).all()
    torch.testing.assert_close(cos_g, expected[centre])


def test_bond_pairs_general_order_and_degrees():
    dst = torch.tensor([2, 0, 2, 1, 2, 0, 3])  # atom 2 has 3 bonds, 0 two, 1 and 3 one, 4 none
    a, b = bond_pairs(dst, 5)
    pairs = sorted(zip(a.tolist(), b.tolist()))
    assert pairs == sorted([(0, 2), (0, 4), (2, 0), (2, 4), (4, 0), (4, 2), (1, 5), (5, 1)])


def test_angle_basis_peaks_at_its_centres():
    basis = AngleBasis(5)
    rbf = basis(torch.tensor([-1.0, 0.0, 0.5, 1.0]))
    assert rbf.shape == (4, 5)
    torch.testing.assert_close(rbf.argmax(1), torch.tensor([0, 2, 3, 4]))
    torch.testing.assert_close(rbf.max(1).values, torch.ones(4))
    torch.testing.assert_close(rbf[1, 1], torch.tensor(np.exp(-1.0), dtype=torch.float32))  # one spacing away


def test_bond_vectors_in_the_batch(ds):
    b = ds.store.batch(np.arange(20), ds.targets)
    assert b.vec.shape == (b.edge_index.shape[1], 3) and b.vec.dtype == torch.float32
    torch.testing.assert_close(b.vec.norm(dim=1), b.dist, rtol=1e-5, atol=1e-5)
    noisy = ds.store.batch(np.arange(20), ds.targets, noise=0.05, rng=np.random.default_rng(0))
    torch.testing.assert_close(noisy.vec.norm(dim=1), noisy.dist, rtol=1e-5, atol=1e-5)
    assert (noisy.vec - b.vec).abs().max() > 1e-3
    assert b.to("cpu").vec is not None and Batch(**{**vars(b), "vec": None}).to("cpu").vec is None


# invariances ------------------------------------------------------------------------------------------
def _assert_same_and_sensitive(model, b_ref: Batch, b_other: Batch, b_distorted: Batch) -> None:
    with torch.no_grad():
        ref, other, distorted = model.embed(b_ref), model.embed(b_other), model.embed(b_distorted)
        torch.testing.assert_close(other, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(b_other), model(b_ref), rtol=1e-4, atol=1e-4)
    assert (distorted - ref).abs().max() > 1e-3  # the comparison can fail


def _strained(s: Structure) -> Structure:
    t = s.copy()
    t.apply_strain([0.04, -0.02, 0.03])
    return t


@pytest.mark.parametrize("max_neighbors", [12, None])
@pytest.mark.parametrize("params", ANGLES)
def test_site_permutation_and_origin_shift(params, max_neighbors):
    cutoff = 8.0 if max_neighbors else 5.0
    model = model_for(params, hidden=24)
    s = random_cell(3, n=4)
    perm = [2, 0, 3, 1]
    permuted = Structure.from_sites([s[i] for i in perm])
    shifted = s.copy()
    shifted.translate_sites(list(range(len(s))), [0.31, -0.17, 0.58], frac_coords=True, to_unit_cell=True)
    ref = batch_of([s], cutoff, max_neighbors)
    assert bool(ref.degree) == bool(max_neighbors)  # the fast path with a neighbour cap, the general one without
    distorted = batch_of([_strained(s)], cutoff, max_neighbors)
    _assert_same_and_sensitive(model, ref, batch_of([permuted], cutoff, max_neighbors), distorted)
    _assert_same_and_sensitive(model, ref, batch_of([shifted], cutoff, max_neighbors), distorted)


@pytest.mark.parametrize("params", ANGLES)
def test_supercell(params):
    """A 2x1x1 supercell has the same atom environments: the same mean-pooled embedding. All neighbours
    within the cutoff (a neighbour cap would break ties between equally distant images differently)."""
    model = model_for(params, hidden=24)  # mean pooling is the default
    s = random_cell(1, n=3)
    ref = batch_of([s], 5.0, None)
    _assert_same_and_sensitive(model, ref, batch_of([s * (2, 1, 1)], 5.0, None), batch_of([_strained(s)], 5.0, None))


@pytest.mark.parametrize("params", ANGLES)
def test_atom_and_edge_order_do_not_matter(params, batch16):
    model = model_for(params, hidden=24)
    with torch.no_grad():
        torch.testing.assert_close(model(shuffled(batch16)), model(batch16), rtol=1e-4, atol=1e-5)


# options --------------------------------------------------------------------------------------------------
def test_options_are_kept(batch16):
    model = build_model(config(params={"angles": True, "angle_bins": 5, "activation": "softplus"}))
    assert model.angles is True and model.angle_bins == 5 and model.activation == "softplus"
    assert isinstance(model.convs[0].act, torch.nn.Softplus)
    assert model.angle_updates[0].angle.in_features == 5
    # bond features are hidden-wide whatever the featurizer gives
    assert model.edge_embedding[0].in_features == model.edge_dim and model.edge_embedding[0].out_features == 16


@pytest.mark.parametrize(
    "params,key",
    [
        ({"angles": "yes"}, "angles"),
        ({"angles": 1}, "angles"),
        ({"angle_bins": 1}, "angle_bins"),
        ({"angle_bins": 2.5}, "angle_bins"),
        ({"angle_bins": "16"}, "angle_bins"),
        ({"angle_bins": True}, "angle_bins"),
        ({"angle_bins": 1000}, "angle_bins"),
        ({"angle_layers": -1}, "angle_layers"),
        ({"angle_layers": 65}, "angle_layers"),
        ({"angle_layers": 1.5}, "angle_layers"),
        ({"activation": "relu"}, "activation"),
        ({"activation": None}, "activation"),
    ],
)
def test_bad_params_raise(params, key):
    with pytest.raises(CrystaltuneError, match=f"model.params.{key}: "):
        build_model(config(params=params))
    with pytest.raises(CrystaltuneError, match=key):  # also when the class is built directly
        EGCNN(config(), params=EGCNNParams(**params))


def test_unknown_param_is_a_config_error():
    from crystaltune.config import TrialConfig

    with pytest.raises(CrystaltuneError, match="angle_binz"):
        TrialConfig.from_dict({"model": {"name": "egcnn", "params": {"angle_binz": 8}}})


def test_angles_without_bond_vectors_is_a_clear_error(batch16):
    model = build_model(config(params={"angles": True}))
    with pytest.raises(CrystaltuneError, match="bond vectors"):
        model(dataclasses.replace(batch16, vec=None))


def test_gated_pair_sum_gradients():
    """The hand-written backward of the fast path against numerical derivatives (float64)."""
    from crystaltune.models.egcnn import GatedPairSum

    g = torch.Generator().manual_seed(0)
    n, k, d, bins = 2, 4, 3, 5
    args = [
        torch.randn(n, k, k, bins, generator=g),
        torch.randn(d, bins, generator=g),
        torch.randn(d, generator=g),
        torch.randn(n, k, d, generator=g),
        torch.randn(n, k, d, generator=g),
        torch.randn(n, k, d, generator=g),
    ]
    args = [a.double().requires_grad_() for a in args]
    assert torch.autograd.gradcheck(GatedPairSum.apply, args)


@pytest.mark.parametrize("degree", [12, 0])
def test_bfloat16_autocast_runs(degree, batch16):
    """Mixed precision (as AMP does on CUDA, here bfloat16 on CPU) through both paths."""
    torch.manual_seed(0)
    model = build_model(config(params={"angles": True})).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(dataclasses.replace(batch16, degree=degree))
    assert torch.isfinite(out.float()).all()
    out.float().square().mean().backward()
    assert all(
        torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None
    )
