"""Periodic neighbour lists with pymatgen's Cython ``find_points_in_spheres`` (all periodic images).

The search runs on a reduced cell (``structure.reduce_cell``). A cell so large against the cutoff that
pymatgen's cell grid would cost gigabytes (a few atoms in a 2000 Å box) is searched with a k-d tree
over the periodic images the cutoff can reach instead: its memory grows with the atoms, not the box.
"""

from __future__ import annotations

import math

import numpy as np
from pymatgen.optimization.neighbors import find_points_in_spheres

from .structure import RecordError

PBC = np.ones(3, dtype=np.int64)
#: a distance within this many Å of the previous one in a centre's sorted list ties with it (float
#: noise of symmetric cells, coordinates rounded in files): the tie is broken by element, not site order
TIE = 1e-5
#: pymatgen's grid has a cube of side ``radius`` per ~200 bytes over the searched box; above this many
#: cubes the k-d tree search is used
MAX_GRID_CUBES = 200_000
#: atom images the k-d tree search may hold (~100 bytes each); beyond it a record is skipped
MAX_IMAGE_POINTS = 20_000_000


def neighbor_list(
    cart: np.ndarray,
    lattice: np.ndarray,
    cutoff: float = 8.0,
    max_neighbors: int | None = 12,
    z: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(centre, neighbour, image, distance)`` for every atom's nearest neighbours.

    Every periodic image within ``cutoff`` counts. With ``max_neighbors`` only the nearest are kept,
    ordered by (centre, distance shell, the neighbour's atomic number ``z``, bond vector): distances
    within ``TIE`` of the previous one form one shell, and a tie at the k-th distance is broken by
    element, then by the Cartesian bond vector (rounded to 1e-4 Å), never by site order, image index or
    basis: the kept neighbours are the same for every cell, origin, site order and supercell.
    A first search with a smaller radius (enough for ~2x max_neighbors atoms at this density) is
    widened to ``cutoff`` only when some atom has fewer than ``max_neighbors`` neighbours in it: the
    kept edges are the same, the number of pairs searched is a fraction.
    """
    cart = np.ascontiguousarray(cart, dtype=float)
    lattice = np.ascontiguousarray(lattice, dtype=float)
    n = len(cart)
    if max_neighbors:
        density = n / abs(np.linalg.det(lattice))
        r0 = (3.0 * 2.0 * max_neighbors / (4.0 * math.pi * density)) ** (1.0 / 3.0)
        if r0 < cutoff:
            result, shell_end = _search(cart, lattice, r0, max_neighbors, z)
            counts = np.bincount(result[0], minlength=n)
            # the k-th nearest's whole shell must lie inside r0, so nothing beyond it can tie with it
            if counts.min() >= max_neighbors and shell_end.max() < r0 - TIE:
                return result
    return _search(cart, lattice, cutoff, max_neighbors, z)[0]


def _search(cart, lattice, radius: float, max_neighbors: int | None, z: np.ndarray | None = None):
    """The ordered (with ``max_neighbors``: truncated) pairs within ``radius``, and per centre the largest
    distance in the shell of its last kept neighbour (what a wider search could still tie with)."""
    centre, neighbour, image, dist = _pairs(cart, lattice, radius)
    not_self = ~((centre == neighbour) & (image == 0).all(axis=1))  # a duplicate atom at d=0 stays (overlap check)
    centre, neighbour, image, dist = centre[not_self], neighbour[not_self], image[not_self], dist[not_self]
    shell = _shells(centre, dist)
    species = np.asarray(z)[neighbour] if z is not None else np.zeros_like(neighbour)
    vec = np.round(cart[neighbour] + image @ lattice - cart[centre], 4)
    order = np.lexsort((neighbour, vec[:, 2], vec[:, 1], vec[:, 0], species, shell, centre))
    centre, neighbour, image, dist, shell = (a[order] for a in (centre, neighbour, image, dist, shell))
    shell_end = np.zeros(len(cart))
    if max_neighbors:
        first = np.searchsorted(centre, centre, side="left")
        keep = (np.arange(len(centre)) - first) < max_neighbors
        shell_max = np.zeros(int(shell.max()) + 1 if len(shell) else 0)
        np.maximum.at(shell_max, shell, dist)
        last = np.flatnonzero(keep & ~np.r_[keep[1:] & (centre[1:] == centre[:-1]), False])
        shell_end[centre[last]] = shell_max[shell[last]]
        centre, neighbour, image, dist = centre[keep], neighbour[keep], image[keep], dist[keep]
    return (centre.astype(np.int64), neighbour.astype(np.int64), image, dist.astype(np.float64)), shell_end


def _shells(centre: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Shell ids, increasing with centre then distance: a new shell starts where a centre's sorted
    distances jump by more than ``TIE`` (chained, so no rounding boundary splits a tie)."""
    order = np.lexsort((dist, centre))
    c, d = centre[order], dist[order]
    new = np.ones(len(d), dtype=bool)
    new[1:] = (c[1:] != c[:-1]) | (np.diff(d) > TIE)
    shell = np.empty(len(d), dtype=np.int64)
    shell[order] = np.cumsum(new) - 1
    return shell


def grid_cubes(lattice: np.ndarray, radius: float) -> float:
    """How many cubes of side ``radius`` pymatgen's grid lays over the cell's bounding box (+ radius)."""
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float) @ lattice
    extent = corners.max(axis=0) - corners.min(axis=0)
    return float(np.prod((extent + 2 * radius) / radius))


def _pairs(cart: np.ndarray, lattice: np.ndarray, radius: float):
    """All (centre, neighbour, image, distance) within ``radius``, by whichever search is cheaper."""
    if grid_cubes(lattice, radius) <= MAX_GRID_CUBES:
        centre, neighbour, image, dist = find_points_in_spheres(
            cart, cart, r=radius, pbc=PBC, lattice=lattice, tol=1e-8
        )
        return centre, neighbour, np.rint(image).astype(np.int64), dist
    return _tree_pairs(cart, lattice, radius)


def _tree_pairs(cart: np.ndarray, lattice: np.ndarray, radius: float):
    """The pairs of a sparse cell from a k-d tree over the atom images within reach of the cell."""
    from scipy.spatial import cKDTree

    reach = np.ceil(radius * np.linalg.norm(np.linalg.inv(lattice), axis=0)).astype(int) + 1
    n_images = int(np.prod(2 * reach + 1))
    if n_images * len(cart) > MAX_IMAGE_POINTS:
        raise RecordError(
            f"the neighbour search would scan {n_images * len(cart):,} atom images "
            f"(at most {MAX_IMAGE_POINTS:,}): the cell is too thin for the cutoff"
        )
    images = np.stack(np.meshgrid(*(np.arange(-r, r + 1) for r in reach), indexing="ij"), -1).reshape(-1, 3)
    points = (cart[None, :, :] + (images @ lattice)[:, None, :]).reshape(-1, 3)
    found = cKDTree(cart).sparse_distance_matrix(cKDTree(points), radius, output_type="ndarray")
    centre = found["i"].astype(np.int64)
    image_idx, neighbour = np.divmod(found["j"].astype(np.int64), len(cart))
    return centre, neighbour, images[image_idx], found["v"].astype(np.float64)


def reference_neighbor_list(
    frac: np.ndarray, lattice: np.ndarray, z: np.ndarray, cutoff: float = 8.0, max_neighbors: int = 12
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The reference CGCNN code's neighbours, for importing its checkpoints exactly: pymatgen's
    ``get_all_neighbors`` order, a stable sort by distance (its ties kept in that order), the first
    ``max_neighbors``, and atoms with fewer padded with neighbour 0 at ``cutoff + 1`` Å as it does.
    Slow (a Python loop per atom): only prediction with reference checkpoints uses it. A cell whose
    pymatgen grid would cost gigabytes is refused (its neighbours depend on the cell as written)."""
    from pymatgen.core import Lattice, Structure

    if grid_cubes(lattice, cutoff) > MAX_GRID_CUBES:
        raise RecordError(
            "cell too large for the reference CGCNN's neighbour search (pymatgen's grid would cost "
            "gigabytes); use a crystaltune checkpoint, whose search handles it"
        )
    structure = Structure(Lattice(lattice), [int(x) for x in z], frac)
    rows: list[tuple[int, int, tuple, float]] = []
    for centre, nbrs in enumerate(structure.get_all_neighbors(cutoff, include_index=True)):
        nbrs = sorted(nbrs, key=lambda nb: nb[1])[:max_neighbors]
        rows += [(centre, int(nb[2]), tuple(np.rint(nb[3]).astype(int)), float(nb[1])) for nb in nbrs]
        rows += [(centre, 0, (0, 0, 0), cutoff + 1.0)] * (max_neighbors - len(nbrs))
    centre, neighbour, image, dist = zip(*rows) if rows else ((), (), (), ())
    return (
        np.asarray(centre, np.int64),
        np.asarray(neighbour, np.int64),
        np.asarray(image, np.int64).reshape(-1, 3),
        np.asarray(dist, np.float64),
    )
