"""Edge and node featurizers: formulas, shapes, registries and trainability."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crystaltune.errors import CrystaltuneError
from crystaltune.featurizers import EDGE_FEATURIZERS, NodeFeaturizer, make_edge_featurizer, node_table


def test_gaussian_matches_reference_formula():
    f = make_edge_featurizer("gaussian", cutoff=8.0)
    assert f.out_dim == 41
    d = torch.tensor([0.0, 1.3, 7.9])
    centres = np.arange(0, 8.2, 0.2)
    ref = np.exp(-((d.numpy()[:, None] - centres) ** 2) / 0.2**2)
    np.testing.assert_allclose(f(d).numpy(), ref, rtol=1e-5, atol=1e-6)


def test_rbf_vanishes_at_cutoff_and_is_smooth():
    f = make_edge_featurizer("rbf", cutoff=6.0, num_rbf=16)
    out = f(torch.tensor([1.0, 5.999, 6.0, 7.0]))
    assert out.shape == (4, 16)
    assert out[1:].abs().max() < 1e-3
    k, d = 3, 2.0
    expected = math.sqrt(2 / 6) * math.sin(k * math.pi * d / 6) / d * 0.5 * (math.cos(math.pi * d / 6) + 1)
    assert abs(f(torch.tensor([d]))[0, k - 1].item() - expected) < 1e-5


@pytest.mark.parametrize("name", EDGE_FEATURIZERS.names())
def test_every_edge_featurizer_runs_and_has_gradients(name):
    f = make_edge_featurizer(name, cutoff=8.0)
    d = (torch.rand(50) * 7.5 + 0.5).requires_grad_()
    z = torch.randint(1, 90, (50,))
    out = f(d, z, z.flip(0))
    assert out.shape == (50, f.out_dim) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(d.grad).all()


def test_atom_specific_width_depends_on_elements():
    f = make_edge_featurizer("atom_specific_gaussian")
    d = torch.tensor([2.5, 2.5])
    out = f(d, torch.tensor([1, 82]), torch.tensor([1, 82]))  # H-H vs Pb-Pb at the same distance
    assert not torch.allclose(out[0], out[1])


def test_unknown_featurizer_did_you_mean():
    with pytest.raises(CrystaltuneError, match="did you mean 'gaussian'"):
        make_edge_featurizer("gausian")
    with pytest.raises(CrystaltuneError, match="did you mean 'onehot'"):
        node_table("onehote")


def test_node_tables_and_concatenation():
    assert node_table("cgcnn").shape == (119, 92)
    np.testing.assert_array_equal(node_table("onehot")[26], np.eye(100)[25])
    np.testing.assert_array_equal(node_table("bits")[5], [1, 0, 1, 0, 0, 0, 0])
    ext = node_table("extended")
    ok = np.isfinite(ext).all(axis=1)
    np.testing.assert_allclose(ext[ok].mean(axis=0), 0, atol=1e-5)
    both = node_table("cgcnn+extended")
    assert both.shape == (119, 98) and np.isnan(both[54]).all()  # Xe has no extended features


def test_node_featurizer_trainable_vs_frozen():
    frozen, train = NodeFeaturizer("cgcnn", trainable=False), NodeFeaturizer("cgcnn", trainable=True)
    assert not frozen.embedding.weight.requires_grad and train.embedding.weight.requires_grad
    assert frozen(torch.tensor([8])).shape == (1, 92)
