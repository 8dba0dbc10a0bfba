"""One crystal, one answer: the graph, the lattice/symmetry descriptors and every model's prediction are
the same for every way of writing the crystal down (skewed or permuted bases, 1000 Å vectors, origin
shifts, site order, supercells), for every shipped featurizer and global feature."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from conftest import REF_DIR, random_cell, rocksalt
from pymatgen.core import Lattice, Structure

from crystaltune.config import ModelConfig
from crystaltune.data.catalog import resolve
from crystaltune.featurizers import EDGE_FEATURIZERS
from crystaltune.featurizers.node import NODE_TABLES
from crystaltune.graphs.build import graph_from_structure
from crystaltune.graphs.neighbors import neighbor_list
from crystaltune.graphs.store import GraphStore
from crystaltune.models import build_model
from crystaltune.models.base import GLOBAL_FEATURES


def hoip(i: int = 0) -> Structure:
    with gzip.open(resolve("perovskites")[1], "rt") as fh:
        for k, line in enumerate(fh):
            if k == i:
                return Structure.from_dict(json.loads(line)["structure"])
    raise IndexError(i)


def in2b2o6() -> Structure:
    """Calcite-type InBO3 (R-3c) in its 10-atom primitive cell: many equal distances across elements."""
    s = Structure.from_spacegroup(
        "R-3c", Lattice.hexagonal(4.82, 15.45), ["In", "B", "O"], [[0, 0, 0], [0, 0, 0.25], [0.28, 0, 0.25]]
    )
    return s.get_primitive_structure()


def monoclinic() -> Structure:
    lat = Lattice.monoclinic(5.1, 6.3, 7.2, 104.0)
    return Structure(lat, ["Zn", "O", "S", "O"], [[0, 0, 0], [0.31, 0.22, 0.13], [0.5, 0.5, 0.4], [0.7, 0.1, 0.8]])


CRYSTALS = {
    "hoip": lambda: hoip(0),
    "triclinic": lambda: random_cell(5, n=4),
    "rocksalt": rocksalt,
    "SrTiO3": lambda: Structure.from_file(str(REF_DIR / "high-symmetry" / "SrTiO3.cif")),
    "In2B2O6": in2b2o6,
    "monoclinic": monoclinic,
}


def rebased(s: Structure, t) -> Structure:
    """The same crystal on the lattice basis ``t @ basis`` (t unimodular), same Cartesian positions."""
    lat = np.asarray(t, dtype=float) @ s.lattice.matrix
    return Structure(Lattice(lat), s.species, s.cart_coords, coords_are_cartesian=True)


def permuted(s: Structure, seed: int) -> Structure:
    idx = np.random.default_rng(seed).permutation(len(s))
    return Structure(s.lattice, [s[i].specie for i in idx], [s[i].frac_coords for i in idx])


def shifted(s: Structure) -> Structure:
    t = s.copy()
    t.translate_sites(list(range(len(t))), [0.13, 0.27, 0.41], to_unit_cell=True)
    return t


REWRITES = {
    "skewed": lambda s: rebased(s, [[1, 0, 0], [20, 1, 0], [0, 20, 1]]),
    "axes-cycled": lambda s: rebased(s, [[0, 1, 0], [0, 0, 1], [1, 0, 0]]),
    "left-handed": lambda s: rebased(s, [[0, 1, 0], [1, 0, 0], [0, 0, 1]]),
    "1000A-vectors": lambda s: rebased(s, [[1, 0, 0], [0, 1, 0], [150, 150, 1]]),
    "skewed-1e6": lambda s: rebased(s, [[1, 0, 0], [10**6, 1, 0], [0, 0, 1]]),  # moyopy alone aborted on 1e8
    "origin-shift": shifted,
    "site-order": lambda s: permuted(s, 3),
    "supercell-2x1x1": lambda s: s * (2, 1, 1),
    "supercell-skewed": lambda s: s * [[1, 1, 0], [-1, 1, 0], [0, 0, 1]],
}


def graph(s: Structure) -> dict:
    return graph_from_structure(s, 8.0, 12)


@pytest.mark.parametrize("name", list(CRYSTALS))
def test_lattice_and_symmetry_descriptors_do_not_depend_on_the_cell(name):
    s = CRYSTALS[name]()
    ref = graph(s)
    for how, rewrite in REWRITES.items():
        g = graph(rewrite(s))
        np.testing.assert_allclose(g["cell"], ref["cell"], rtol=1e-8, atol=1e-8, err_msg=how)
        assert g["spacegroup"] == ref["spacegroup"], how
    strained = s.copy()
    strained.apply_strain([0.03, 0.0, 0.0])
    assert not np.allclose(graph(strained)["cell"], ref["cell"], rtol=1e-4)  # the comparison can fail


def _predict(model, structures: list[Structure]) -> torch.Tensor:
    graphs = [graph(s) for s in structures]
    store = GraphStore.from_graphs([f"s{i}" for i in range(len(graphs))], graphs, [{}] * len(graphs))
    with torch.no_grad():
        return model(store.batch(np.arange(len(graphs)), [])).squeeze(-1)


MODEL_CASES = (
    [("cgcnn", {"edge_featurizer": e}) for e in EDGE_FEATURIZERS.names()]
    + [("cgcnn", {"node_featurizer": n}) for n in NODE_TABLES.names()]
    + [(m, {}) for m in ("csgcnn", "csgann", "csginn", "flowgnn")]
    + [("egcnn", {"params": {"angles": True}})]
)


@pytest.mark.parametrize(
    "name, options", MODEL_CASES, ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o in MODEL_CASES]
)
def test_every_featurizer_and_global_feature_predicts_the_same_for_every_cell(name, options):
    """Predictions within 1e-6 for each rewrite of each crystal (mean pooling: supercells included)."""
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, hidden=16, head_hidden=16, layers=2, global_features=list(GLOBAL_FEATURES), **options)
    model = build_model(cfg, 1, 8.0).eval()
    crystals = [CRYSTALS[k]() for k in ("hoip", "In2B2O6", "monoclinic", "rocksalt")]
    ref = _predict(model, crystals)
    for how, rewrite in REWRITES.items():
        torch.testing.assert_close(_predict(model, [rewrite(s) for s in crystals]), ref, rtol=0, atol=1e-6, msg=how)
    strained = [s.copy() for s in crystals]
    for s in strained:
        s.apply_strain([0.03, 0.0, 0.0])
    assert (_predict(model, strained) - ref).abs().max() > 1e-5  # the comparison can fail


def _near_tie(d_o: float, d_f: float, order=(0, 1, 2)) -> tuple[np.ndarray, np.ndarray]:
    """A centre (Na) with an O and an F neighbour at the given distances, in a 12 Å cubic cell."""
    cart = np.array([[0.0, 0.0, 0.0], [d_o, 0.0, 0.0], [0.0, d_f, 0.0]])[list(order)]
    z = np.array([11, 8, 9])[list(order)]
    return cart, z


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 0, 2)])
def test_a_near_tie_at_the_kth_neighbour_is_broken_by_element_as_an_exact_tie_is(order):
    """O at 3.0000006 Å and F at 3.0000004 Å straddle a 1e-6 rounding boundary: one shell all the same,
    so the O (lower Z) is kept as in an exact tie, whatever the site order (before: the F, by 2e-7 Å)."""
    lattice = np.eye(3) * 12.0
    kept = []
    for d_o, d_f in ((3.0000006, 3.0000004), (3.0000005, 3.0000005), (3.0000004, 3.0000006)):
        cart, z = _near_tie(d_o, d_f, order)
        centre, neighbour, _, dist = neighbor_list(cart, lattice, 8.0, 1, z)
        na = int(np.flatnonzero(z == 11)[0])
        kept.append(int(z[neighbour[centre == na][0]]))
    assert kept == [8, 8, 8]
    cart, z = _near_tie(3.0, 3.01, order)  # 0.01 Å apart is no tie: the nearest is kept
    centre, neighbour, _, _ = neighbor_list(cart, lattice, 8.0, 1, z)
    assert int(z[neighbour[centre == int(np.flatnonzero(z == 11)[0])][0]]) == 8
    cart, z = _near_tie(3.01, 3.0, order)
    centre, neighbour, _, _ = neighbor_list(cart, lattice, 8.0, 1, z)
    assert int(z[neighbour[centre == int(np.flatnonzero(z == 11)[0])][0]]) == 9


def test_sparse_cells_are_searched_without_a_grid_and_match_it():
    """A cell far larger than the cutoff takes the k-d tree search; on a cell both can search, the two
    give the same pairs."""
    from crystaltune.graphs import neighbors

    s = random_cell(4, n=5)
    cart, lat = np.ascontiguousarray(s.cart_coords), np.ascontiguousarray(s.lattice.matrix)
    grid = neighbors._pairs(cart, lat, 8.0)
    tree = neighbors._tree_pairs(cart, lat, 8.0)

    def rows(p):
        c, n, im, d = p
        return sorted(zip(c.tolist(), n.tolist(), map(tuple, np.asarray(im).tolist()), np.round(d, 9).tolist()))

    assert rows(grid) == rows(tree) and len(grid[0]) > 100
    assert neighbors.grid_cubes(np.eye(3) * 2000.0, 8.0) > neighbors.MAX_GRID_CUBES
