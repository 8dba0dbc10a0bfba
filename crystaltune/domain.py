"""What a model was trained on, so its predictions can say when they leave it: the elements of the
training crystals, each target's range, and the target's unit. Saved in every checkpoint; ``flags``
turns one prediction into a short warning (empty when the crystal is inside the domain)."""

from __future__ import annotations

from typing import Any

import numpy as np

#: units of the shipped datasets' properties (others: unknown, left blank)
UNITS = {
    "band_gap": "eV",
    "band_gap_gga": "eV",
    "band_gap_direct": "eV",
    "heat_of_formation": "eV/cell",
    "heat_of_formation_all": "eV/cell",
    "atomization_energy_per_atom": "eV/atom",
    "formation_energy_per_atom": "eV/atom",
    "volume_A3": "Å^3",
    "density_g_cm3": "g/cm^3",
}
#: targets that cannot be negative, whatever the training range
NON_NEGATIVE = ("band_gap", "gap")


def domain_of(data) -> dict[str, Any]:
    """The training split's elements and per-target [min, max] (a TrialData)."""
    store, train = data.store, data.train
    starts, ends = store.node_ptr[train], store.node_ptr[train + 1]
    z = np.concatenate([store.arrays["z"][a:b] for a, b in zip(starts, ends)]) if len(train) else np.zeros(0)
    ranges = {}
    for t in data.targets:
        y = store.props[t][train]
        y = y[np.isfinite(y)]
        ranges[t] = [float(y.min()), float(y.max())] if len(y) else [float("nan"), float("nan")]
    return {
        "elements": sorted({int(v) for v in z}),
        "range": ranges,
        "units": {t: UNITS.get(t, "") for t in data.targets},
    }


def flags(elements: set[int], prediction: dict[str, float], domain: dict[str, Any] | None) -> str:
    """'' inside the domain, else why not: unseen elements, a negative gap, a value outside the
    training targets' range."""
    from pymatgen.core import Element

    out = []
    if domain and domain.get("elements"):
        unseen = sorted(elements - set(domain["elements"]))
        if unseen:
            out.append("elements never seen in training: " + " ".join(Element.from_Z(z).symbol for z in unseen))
    for target, value in prediction.items():
        if any(key in target for key in NON_NEGATIVE) and value < 0:
            out.append(f"{target} {value:.3g} < 0")
        lo, hi = ((domain or {}).get("range") or {}).get(target, (float("nan"), float("nan")))
        if np.isfinite(lo) and not lo <= value <= hi:
            out.append(f"{target} {value:.3g} outside the training range [{lo:.3g}, {hi:.3g}]")
    return "; ".join(out)
