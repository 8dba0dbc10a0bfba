"""Crystal graphs: neighbour lists against brute force, the flat store, and the on-disk cache."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from conftest import random_cell, record, rocksalt, write_jsonl

from crystaltune.errors import CrystaltuneError
from crystaltune.graphs import GraphParams, graph_from_structure, load_graphs, neighbor_list
from crystaltune.graphs.cache import cache_dir


def brute_force(structure, cutoff):
    """Every (centre, neighbour, image, distance) within cutoff by enumerating enough images."""
    lat = structure.lattice.matrix
    cart = structure.cart_coords
    # images needed along each axis: cutoff / (distance between opposite faces)
    recip = np.linalg.inv(lat).T
    reach = [int(np.ceil(cutoff * np.linalg.norm(recip[i]))) + 1 for i in range(3)]
    out = []
    for i, j in itertools.product(range(len(cart)), repeat=2):
        for img in itertools.product(*(range(-r, r + 1) for r in reach)):
            d = np.linalg.norm(cart[j] + np.array(img) @ lat - cart[i])
            if 1e-8 < d <= cutoff or (i != j and d <= cutoff):
                out.append((i, j, img, d))
    return out


def test_rocksalt_has_92_neighbours_within_8A():
    s = rocksalt(5.64)
    centre, nbr, image, dist = neighbor_list(s.cart_coords, s.lattice.matrix, 8.0, None)
    assert np.bincount(centre).tolist() == [92, 92]
    assert len(brute_force(s, 8.0)) == 184


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("cutoff", [4.0, 8.0])
def test_all_neighbours_match_brute_force(seed, cutoff):
    s = random_cell(seed, n=3 + seed % 2)
    centre, nbr, image, dist = neighbor_list(s.cart_coords, s.lattice.matrix, cutoff, None)
    ours = sorted(
        (int(c), int(n), tuple(int(v) for v in im), round(float(d), 6)) for c, n, im, d in zip(centre, nbr, image, dist)
    )
    ref = sorted((i, j, img, round(float(d), 6)) for i, j, img, d in brute_force(s, cutoff))
    assert ours == ref


@pytest.mark.parametrize("seed", [0, 4, 5])
def test_top12_are_the_nearest_with_deterministic_ties(seed):
    s = random_cell(seed, n=4)
    centre, nbr, image, dist = neighbor_list(s.cart_coords, s.lattice.matrix, 8.0, 12)
    ref = brute_force(s, 8.0)
    for i in range(len(s)):
        mine = [
            (round(float(d), 6), int(n), tuple(int(v) for v in im))
            for c, n, im, d in zip(centre, nbr, image, dist)
            if c == i
        ]
        theirs = sorted((round(float(d), 6), j, img) for c, j, img, d in ref if c == i)[:12]
        assert mine == theirs


def test_small_first_radius_gives_same_edges_as_full_search():
    """The widened-radius shortcut must not change any edge, including for ties in symmetric cells."""
    for s in (rocksalt(), random_cell(7, n=5), rocksalt(4.0, ("Mg", "O"))):
        fast = neighbor_list(s.cart_coords, s.lattice.matrix, 8.0, 12)
        from crystaltune.graphs.neighbors import _search

        full = _search(np.ascontiguousarray(s.cart_coords), np.ascontiguousarray(s.lattice.matrix), 8.0, 12)[0]
        for a, b in zip(fast, full):
            np.testing.assert_array_equal(a, b)


def test_graph_has_globals_and_spacegroup():
    g = graph_from_structure(rocksalt())
    assert g["spacegroup"] == 225
    assert g["cell"].shape == (8,)
    np.testing.assert_allclose(g["cell"][3:6], [60, 60, 60], atol=1e-6)
    assert abs(g["cell"][7] - rocksalt().density) < 1e-6


def test_spacegroup_agrees_with_spglib_on_shipped_data():
    import spglib

    from crystaltune.data.catalog import resolve
    from crystaltune.graphs.build import _symmetry
    from crystaltune.graphs.structure import parse_crystal
    from crystaltune.readers import read_source

    for rec in read_source(resolve("perovskites")[1]).records[::67]:
        c = parse_crystal(rec["structure"])
        assert _symmetry(c)[0] == spglib.get_symmetry_dataset((c.lattice, c.frac, c.z), symprec=0.01).number


def test_store_batch_offsets_and_perturbation(tmp_path, small_records):
    gs = load_graphs(write_jsonl(tmp_path / "d.jsonl", small_records))
    store = gs.store
    idx = np.array([3, 0, 7])
    b = store.batch(idx, ["band_gap"])
    assert b.num_graphs == 3 and b.y.shape == (3, 1)
    assert b.z.shape[0] == store.num_nodes[idx].sum() and b.dist.shape[0] == store.num_edges[idx].sum()
    # every edge connects atoms of the same graph
    assert (b.batch[b.edge_index[0]] == b.batch[b.edge_index[1]]).all()
    # recomputing distances from positions + images without noise reproduces the stored ones
    p = store.batch(idx, ["band_gap"], noise=1e-9)
    np.testing.assert_allclose(p.dist.numpy(), b.dist.numpy(), atol=1e-5)
    q = store.batch(idx, ["band_gap"], noise=0.05)
    diff = (q.dist - b.dist).abs()
    assert 0.001 < diff.mean() < 0.2
    sub = store.subset(idx)
    np.testing.assert_array_equal(sub.batch(np.arange(3), ["band_gap"]).dist.numpy(), b.dist.numpy())


def test_cache_reuse_rebuild_on_change_and_corruption(tmp_path, small_records):
    small_records = [{**r, "note": "cache-test"} for r in small_records]  # content no other test writes
    path = write_jsonl(tmp_path / "d.jsonl", small_records)
    first = load_graphs(path)
    assert not first.from_cache
    second = load_graphs(path)
    assert second.from_cache
    np.testing.assert_array_equal(first.store.arrays["dist"], second.store.arrays["dist"])
    # a changed graph parameter rebuilds
    assert not load_graphs(path, GraphParams(cutoff=6.0)).from_cache
    # changed input rebuilds
    write_jsonl(path, small_records[:-1])
    changed = load_graphs(path)
    assert not changed.from_cache and len(changed.store) == 11
    # a corrupt cache file is rebuilt, not trusted
    files = sorted((cache_dir() / "graphs").glob("d-*.npz"), key=os.path.getmtime)
    target = files[-1]
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    rebuilt = load_graphs(path)
    assert not rebuilt.from_cache and len(rebuilt.store) == 11
    assert load_graphs(path).from_cache
    # flipped bytes inside an array are caught by the zip CRC
    data = bytearray(target.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(8)
    target.write_bytes(bytes(data))
    assert not load_graphs(path).from_cache


def test_parallel_build_equals_serial(tmp_path):
    recs = [record(f"r{i}", random_cell(i % 9, n=2 + i % 3), band_gap=1.0) for i in range(240)]
    path = write_jsonl(tmp_path / "many.jsonl", recs)
    par = load_graphs(path, use_cache=False, workers=2)
    ser = load_graphs(path, use_cache=False, workers=1)
    for k in ("dist", "src", "dst", "z"):
        np.testing.assert_array_equal(par.store.arrays[k], ser.store.arrays[k])


def test_trimming_a_larger_neighbour_graph_equals_building_with_fewer_neighbours():
    """A search over data.max_neighbors builds its graphs with the largest k; each trial's trimmed copy
    must equal the graph built with its own k, edge for edge (ties included: cubic cells)."""
    from crystaltune.graphs.build import graph_from_structure
    from crystaltune.graphs.store import GraphStore
    from crystaltune.graphs.trim import trim_neighbors

    structures = [rocksalt(), random_cell(1, n=5), random_cell(2, n=3), rocksalt(4.2, ("Cs", "Cl"))]
    ids = [f"s{i}" for i in range(len(structures))]
    props = [{"band_gap": 1.0}] * len(structures)

    def store(k):
        return GraphStore.from_graphs(ids, [graph_from_structure(s, 8.0, k) for s in structures], props)

    wide = store(24)
    for k in (12, 16, 24):
        trimmed, built = trim_neighbors(wide, k), store(k)
        assert np.array_equal(trimmed.edge_ptr, built.edge_ptr)
        for key in ("src", "dst", "image", "dist"):
            assert np.array_equal(trimmed.arrays[key], built.arrays[key]), (k, key)
    assert trim_neighbors(wide, 24) is wide


def test_searching_max_neighbors_builds_the_graphs_once_with_the_largest_k():
    from crystaltune.search.space import parse_space

    raw = {
        "dataset": {"name": "perovskites"},
        "search": {"data.max_neighbors": {"type": "categorical", "choices": [12, 16, 20]}},
    }
    space = parse_space(raw, "k.yaml")
    assert space.graph_config().data.max_neighbors == 20 and space.default_point == {"data.max_neighbors": 12}
    with pytest.raises(CrystaltuneError, match="only data.max_neighbors can be searched"):
        parse_space({**raw, "search": {"data.cutoff": {"type": "float", "low": 5, "high": 8}}}, "k.yaml")


@pytest.mark.parametrize("name", ["RbCaF3", "Rb3BrO", "SrTiO3", "NaCl_conv", "CsCl", "Cu_fcc"])
def test_crystaltune_graphs_are_invariant_on_crystals_with_tied_neighbours(name):
    """Several elements tie at the 12th-neighbour distance in these cubic cells: the kept neighbours
    (broken by element, not by site order) make a CGCNN's prediction the same under site permutation,
    an origin shift and a 2x1x1 supercell (before, RbCaF3 moved 0.14 eV and SrTiO3 0.34 eV under a
    permutation)."""
    import torch
    from conftest import REF_DIR
    from pymatgen.core import Structure

    from crystaltune.checkpoint import load_checkpoint
    from crystaltune.graphs.store import GraphStore

    model = load_checkpoint(str(REF_DIR / "band-gap.pth.tar")).model.eval()

    def predict(s):
        store = GraphStore.from_graphs(["x"], [graph_from_structure(s, 8.0, 12)], [{}])
        with torch.no_grad():
            return float(model(store.batch(np.array([0]), [])).squeeze())

    s = Structure.from_file(str(REF_DIR / "high-symmetry" / f"{name}.cif"))
    base = predict(s)
    for seed in range(3):
        idx = np.random.default_rng(seed).permutation(len(s))
        assert predict(
            Structure(s.lattice, [s[i].specie for i in idx], [s[i].frac_coords for i in idx])
        ) == pytest.approx(base, abs=1e-4)
    shifted = s.copy()
    shifted.translate_sites(list(range(len(s))), [0.13, 0.27, 0.41])
    supercell = s.copy()
    supercell.make_supercell([2, 1, 1])
    assert predict(shifted) == pytest.approx(base, abs=1e-4) and predict(supercell) == pytest.approx(base, abs=1e-4)


def test_device_store_batches_equal_host_batches(tmp_path, small_records):
    """Batches gathered from the device-resident copy (here on the CPU) are the host batches, field by
    field, uniform-degree flag included."""
    import torch

    from crystaltune.graphs.device_store import DeviceGraphStore

    store = load_graphs(write_jsonl(tmp_path / "d.jsonl", small_records), GraphParams(8.0, 12)).store
    dev = DeviceGraphStore(store, "cpu")
    for idx in (np.array([3, 0, 7]), np.arange(len(store)), np.array([5])):
        a, b = store.batch(idx, ["band_gap"]), dev.batch(idx, ["band_gap"])
        assert a.num_graphs == b.num_graphs and a.degree == b.degree
        for key in ("z", "edge_index", "dist", "batch", "cell", "spacegroup", "y", "vec"):
            x, y = getattr(a, key), getattr(b, key)
            assert x.dtype == y.dtype and torch.equal(x, y), key


def test_graph_pool_workers_die_on_sigterm_even_when_the_parent_turned_it_into_ctrl_c():
    """The search turns SIGTERM into Ctrl-C before it builds graphs; forked pool workers inheriting that
    handler once outlived Pool.terminate() and hung a search in its graph build."""
    import signal

    from crystaltune.graphs.cache import graph_pool
    from crystaltune.search.interrupt import stop_like_ctrl_c

    old = signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    try:
        with graph_pool(2) as pool:
            assert pool.apply(signal.getsignal, (signal.SIGTERM,)) == signal.SIG_DFL
            assert pool.apply(signal.getsignal, (signal.SIGINT,)) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is stop_like_ctrl_c  # the search's handling is back
    finally:
        signal.signal(signal.SIGTERM, old)
