"""Parse one raw record's structure into arrays and refuse what a crystal graph cannot represent.

pymatgen ``Structure.as_dict()`` records are read directly into numpy arrays (the hot path: no
Site objects); CIF/POSCAR text goes through pymatgen.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Atoms closer than this (Å) are treated as overlapping: a broken structure, not a crystal.
MIN_DISTANCE = 0.5
#: the densest real solids have ~5 Å^3 per atom (diamond 5.7); below this a record is corrupt, and the
#: atoms within 8 Å of each (the neighbour search's work) would exceed ~2000
MIN_VOLUME_PER_ATOM = 1.0
MAX_LATTICE_VECTOR = 1e8  # Å: longer is no crystal's basis (and overflows the cell volume near 1e100)
MAX_SITES = 5000  # per structure: larger cells are not what a crystal-graph model is trained on


class RecordError(ValueError):
    """A problem with one record; its message is the reason shown in ``skipped``."""


@dataclass
class Crystal:
    """An ordered periodic crystal as arrays: lattice rows (Å), fractional coordinates, atomic numbers."""

    lattice: np.ndarray
    frac: np.ndarray
    z: np.ndarray

    @property
    def cart(self) -> np.ndarray:
        return self.frac @ self.lattice

    def reduced(self) -> Crystal:
        """The same crystal in its Niggli-reduced cell, coordinates wrapped into it, sites in order: the
        cell is then a property of the lattice, not of how the file wrote it, and the neighbour search
        scans the fewest periodic images (a skewed 1000 Å basis of a 5 Å crystal becomes the 5 Å cell)."""
        basis = reduce_basis(self.lattice)
        if basis is None:
            return self
        frac = np.linalg.solve(basis.T, self.cart.T).T
        frac -= np.floor(frac)
        frac[frac >= 1.0] = 0.0  # -1e-17 wraps to 1.0 in floating point
        return Crystal(basis, frac, self.z)

    @classmethod
    def from_structure(cls, structure) -> Crystal:
        check_pymatgen(structure)
        return cls(
            structure.lattice.matrix.copy(),
            structure.frac_coords.copy(),
            np.asarray(structure.atomic_numbers, dtype=np.int64),
        )


@functools.lru_cache
def _symbol_to_z() -> dict[str, int]:
    from pymatgen.core import Element

    return {Element.from_Z(z).symbol: z for z in range(1, 119)}


def reduce_basis(lattice: np.ndarray) -> np.ndarray | None:
    """The Niggli-reduced basis of a lattice (None if it cannot be reduced). LLL first (pymatgen,
    polynomial in the skew): moyopy's Niggli reduction alone on a basis skewed by 1e8 allocated
    gigabytes and aborted the process."""
    import moyopy
    from pymatgen.core import Lattice

    try:
        lll = Lattice(lattice).get_lll_reduced_lattice().matrix
        return np.asarray(moyopy.niggli_reduce(lll.tolist())[0], dtype=float)
    except (ValueError, RuntimeError, np.linalg.LinAlgError):
        return None


def parse_crystal(obj: Any, fmt: str | None = None) -> Crystal:
    """A validated Crystal from a pymatgen Structure dict or CIF/POSCAR text."""
    if isinstance(obj, dict):
        crystal = _from_dict(obj)
    elif isinstance(obj, str):
        crystal = Crystal.from_structure(_pymatgen_from_text(obj, fmt))
    else:
        raise RecordError(f"structure is a {type(obj).__name__}, expected a pymatgen dict or CIF text")
    check_arrays(crystal)
    return crystal


def parse_structure(obj: Any, fmt: str | None = None):
    """A validated pymatgen Structure (for callers that need one, e.g. the reference benchmark)."""
    from pymatgen.core import Structure

    if isinstance(obj, str):
        structure = _pymatgen_from_text(obj, fmt)
    else:
        parse_crystal(obj)
        structure = Structure.from_dict(obj)
    check_pymatgen(structure)
    return structure


def _from_dict(d: dict) -> Crystal:
    table = _symbol_to_z()
    try:
        lattice = np.asarray(d["lattice"]["matrix"], dtype=float)
        sites = d["sites"]
        if not isinstance(sites, list):
            raise TypeError("sites is not a list")
        z = np.empty(len(sites), dtype=np.int64)
        frac = np.empty((len(sites), 3), dtype=float)
        for i, site in enumerate(sites):
            species = site["species"]
            if len(species) != 1 or abs(float(species[0].get("occu", 1.0)) - 1.0) > 1e-6:
                occ = ", ".join(f"{s.get('element')}:{s.get('occu')}" for s in species)
                raise RecordError(f"partial occupancy at site {i} ({occ}); disordered structures are not supported")
            symbol = species[0]["element"]
            if symbol not in table:
                raise RecordError(f"dummy species {symbol!r} at site {i} is not a chemical element")
            z[i] = table[symbol]
            frac[i] = site["abc"] if "abc" in site else np.linalg.solve(lattice.T, np.asarray(site["xyz"], dtype=float))
    except RecordError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, np.linalg.LinAlgError) as exc:
        raise RecordError(f"structure could not be parsed ({type(exc).__name__}: {str(exc)[:120]})") from None
    if lattice.shape != (3, 3):
        raise RecordError(f"lattice matrix has shape {lattice.shape}, expected (3, 3)")
    return Crystal(lattice, frac, z)


def _pymatgen_from_text(text: str, fmt: str | None):
    from pymatgen.core import Structure

    fmt = fmt or ("cif" if "_cell_length_a" in text or text.lstrip().startswith("data_") else "poscar")
    if fmt == "cif":
        check_cif_size(text)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fmt == "cif":
                return Structure.from_str(text, fmt="cif", primitive=False)
            return Structure.from_str(text, fmt=fmt)
    except Exception as exc:  # pymatgen raises many types for malformed input
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RecordError(f"structure could not be parsed ({msg[:160]})") from None


#: loops that list a CIF's symmetry operations, and the keys naming its space group instead
CIF_SYMOP_KEYS = (
    "_symmetry_equiv_pos_as_xyz",
    "_symmetry_equiv_pos_as_xyz_",
    "_space_group_symop_operation_xyz",
    "_space_group_symop_operation_xyz_",
    "_space_group_symop.operation_xyz",
)
CIF_GROUP_KEYS = (
    "_symmetry_space_group_name_H-M",
    "_space_group_name_H-M_alt",
    "_symmetry_Int_Tables_number",
    "_space_group_IT_number",
)
CIF_SITE_KEYS = ("_atom_site_label", "_atom_site_type_symbol", "_atom_site_fract_x", "_atom_site_Cartn_x")


def check_cif_size(text: str) -> None:
    """Refuse a CIF whose sites x symmetry operations exceed MAX_SITES before pymatgen expands it: the
    expansion is quadratic (600 sites x 192 operations, 24 KB, ran for minutes)."""
    from pymatgen.io.cif import CifFile

    try:
        blocks = list(CifFile.from_str(text).data.values())
    except Exception:
        return  # pymatgen's own parse reports what is wrong with it
    total = 0
    for block in blocks:
        sites = next((len(_as_list(block.data[k])) for k in CIF_SITE_KEYS if k in block.data), 0)
        total += sites * _cif_operations(block.data)
    if total > MAX_SITES:
        raise RecordError(
            f"CIF expands to up to {total} sites (atom sites x symmetry operations); at most {MAX_SITES} are accepted"
        )


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _cif_operations(data: dict) -> int:
    """The number of symmetry operations a CIF block will be expanded by (192, the most, if its space
    group is named but not recognised; 1 when it gives none, as pymatgen then reads it as P1)."""
    for key in CIF_SYMOP_KEYS:
        if key in data:
            return len(_as_list(data[key]))
    named = [str(_as_list(data[k])[0]).strip("'\" ") for k in CIF_GROUP_KEYS if k in data]
    if not named:
        return 1
    from pymatgen.symmetry.groups import SpaceGroup

    for name in named:
        try:
            return len(SpaceGroup.from_int_number(int(name)) if name.isdigit() else SpaceGroup(name))
        except Exception:
            continue
    return 192


def check_pymatgen(structure) -> None:
    """Raise RecordError for disordered or dummy-species pymatgen structures."""
    from pymatgen.core import Element

    if not structure.is_ordered:
        site = next(s for s in structure if not s.is_ordered)
        raise RecordError(f"partial occupancy ({site.species.formula}); disordered structures are not supported")
    for site in structure:
        sp = site.specie
        if not isinstance(sp, Element) and not isinstance(getattr(sp, "element", None), Element):
            raise RecordError(f"dummy species {sp} is not a chemical element")


def check_arrays(c: Crystal) -> None:
    """Raise RecordError for empty, oversized or implausibly dense structures, NaN coordinates or a
    singular lattice: checked before any neighbour search, whose cost grows with the atoms per volume
    (a few hundred bytes of record could otherwise ask for gigabytes of neighbour pairs)."""
    if len(c.z) == 0:
        raise RecordError("structure has no sites")
    if len(c.z) > MAX_SITES:
        raise RecordError(f"structure has {len(c.z)} sites; at most {MAX_SITES} are accepted")
    if not np.isfinite(c.lattice).all():
        raise RecordError("lattice has NaN or infinite entries")
    longest = float(np.linalg.norm(c.lattice, axis=1).max())
    if longest > MAX_LATTICE_VECTOR:
        raise RecordError(f"lattice vector of {longest:.3g} Å; at most {MAX_LATTICE_VECTOR:.0e} Å are accepted")
    volume = abs(float(np.linalg.det(c.lattice)))
    if volume < 1e-3 * len(c.z):
        raise RecordError(f"singular lattice (cell volume {volume:.3g} Å^3)")
    if volume / len(c.z) < MIN_VOLUME_PER_ATOM:
        raise RecordError(
            f"{volume / len(c.z):.3g} Å^3 per atom: denser than any real crystal "
            f"(at least {MIN_VOLUME_PER_ATOM} Å^3 per atom are accepted)"
        )
    if not np.isfinite(c.frac).all():
        raise RecordError("NaN or infinite atomic coordinates")
