"""Build one crystal graph (atomic numbers, edges, distances, global descriptors) from a record."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import numpy as np

os.environ.setdefault("SPGLIB_WARNING", "OFF")  # spglib prints C-level warnings for near-symmetric cells
import moyopy  # noqa: E402

# moyopy logs (through Python logging) a warning per conventional cubic cell about omitted primitive-cell
# operations: nothing a user can act on, and it would otherwise go to stderr for every such crystal
logging.getLogger("moyo").setLevel(logging.ERROR)
import spglib  # noqa: E402

from .neighbors import neighbor_list, reference_neighbor_list  # noqa: E402
from .structure import MIN_DISTANCE, Crystal, RecordError, parse_crystal, reduce_basis  # noqa: E402


def build_graph(
    record: dict[str, Any], cutoff: float, max_neighbors: int | None, neighbors: str = "crystaltune"
) -> dict[str, Any]:
    """Parse, validate and turn a raw record into arrays; raises RecordError with a reason."""
    return graph_from_crystal(parse_crystal(record["structure"], record.get("fmt")), cutoff, max_neighbors, neighbors)


def graph_from_structure(structure, cutoff: float = 8.0, max_neighbors: int | None = 12) -> dict[str, Any]:
    """Arrays for a pymatgen Structure (same result as for its dict)."""
    return graph_from_crystal(Crystal.from_structure(structure), cutoff, max_neighbors)


def graph_from_crystal(
    crystal: Crystal, cutoff: float, max_neighbors: int | None, neighbors: str = "crystaltune"
) -> dict[str, Any]:
    """Arrays for one crystal, in its reduced cell. Edges run from ``src`` (neighbour) to ``dst`` (centre
    atom). ``neighbors="reference"``: the reference CGCNN code's neighbour choice on the cell as written
    (see reference_neighbor_list)."""
    z = crystal.z
    if neighbors == "reference":
        dst, src, image, dist = reference_neighbor_list(crystal.frac, crystal.lattice, z, cutoff, max_neighbors or 12)
    else:
        crystal = crystal.reduced()
        dst, src, image, dist = neighbor_list(crystal.cart, crystal.lattice, cutoff, max_neighbors, z)
    n = len(z)
    if len(dist) and dist.min() < MIN_DISTANCE:
        k = int(np.argmin(dist))
        raise RecordError(f"overlapping atoms: sites {dst[k]} and {src[k]} are {dist[k]:.3f} Å apart")
    counts = np.bincount(dst, minlength=n)
    if counts.min() == 0:
        raise RecordError(f"site {int(np.argmin(counts))} has no neighbour within {cutoff} Å")
    spacegroup, primitive = _symmetry(crystal)
    return {
        "z": z,
        "pos": crystal.cart.astype(np.float64),
        "lattice": crystal.lattice.astype(np.float64),
        "src": src,
        "dst": dst,
        "image": image.astype(np.int8),
        "dist": dist,
        "cell": cell_descriptors(crystal, primitive),
        "spacegroup": spacegroup,
    }


def cell_descriptors(crystal: Crystal, primitive: np.ndarray | None) -> np.ndarray:
    """a, b, c (Å), alpha, beta, gamma (degrees) of the Niggli-reduced primitive cell, volume per atom
    (Å^3) and density (g/cm^3): the same for every basis, origin, site order and supercell of a crystal.
    Without a primitive cell (symmetry not found) the Niggli cell of the given one is used."""
    lat = _niggli(primitive if primitive is not None else crystal.lattice)
    lengths = np.linalg.norm(lat, axis=1)
    angles = [_angle(lat[1], lat[2]), _angle(lat[0], lat[2]), _angle(lat[0], lat[1])]
    volume = abs(float(np.linalg.det(crystal.lattice)))
    n = len(crystal.z)
    density = _atomic_masses()[crystal.z].sum() * AMU_G / (volume * 1e-24)  # g/cm^3
    return np.array([*lengths, *angles, volume / n, density], dtype=np.float64)


def _niggli(lattice: np.ndarray) -> np.ndarray:
    reduced = reduce_basis(np.asarray(lattice, float))
    return reduced if reduced is not None else np.asarray(lattice, float)


def _angle(u: np.ndarray, v: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)), -1, 1))))


AMU_G = 1.66053906660e-24  # grams per atomic mass unit


@functools.lru_cache
def _atomic_masses() -> np.ndarray:
    """Atomic mass (u) by Z; pymatgen's Structure.density is slow (unit objects per site)."""
    from pymatgen.core import Element

    return np.array([0.0] + [float(Element.from_Z(z).atomic_mass) for z in range(1, 119)])


def _symmetry(c: Crystal) -> tuple[int, np.ndarray | None]:
    """International space-group number (0 when symmetry cannot be determined) and the primitive
    lattice (None then).

    moyopy (Rust, by spglib's maintainer) is ~4x faster than spglib and agrees with it on the shipped
    datasets; spglib is the fallback."""
    try:
        cell = moyopy.Cell(c.lattice.tolist(), c.frac.tolist(), c.z.tolist())
        ds = moyopy.MoyoDataset(cell, symprec=0.01)
        return int(ds.number), np.asarray(ds.prim_std_cell.basis, dtype=float)
    except Exception:
        pass
    try:
        ds = spglib.get_symmetry_dataset((c.lattice, c.frac, c.z), symprec=0.01)
    except Exception:
        return 0, None
    if ds is None:
        return 0, None
    return int(ds.number), np.asarray(ds.primitive_lattice, dtype=float)
