"""Edge featurizers: torch modules expanding raw distances (and the two elements) into edge features.

They run inside the model, so choosing one is a hyperparameter and never re-runs preprocessing.
Every featurizer maps ``forward(dist (E,), z_src (E,), z_dst (E,)) -> (E, out_dim)`` and is built as
``cls(cutoff, params)`` from its ``Params`` dataclass, whose typed, ranged fields are the one
declaration of its ``model.edge_params`` options (parsed by :func:`parse_edge_params`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import CrystaltuneError
from ..registry import Registry
from ..schema import OutOfRange, UnknownKey, build, document, option

EDGE_FEATURIZERS: Registry[type[nn.Module]] = Registry("edge featurizer")
#: caps (cutoff - dmin) / step, so a tiny step cannot ask for millions of Gaussians per edge
MAX_EDGE_FEATURES = 1024


def register(name: str):
    """Register an edge featurizer class under ``name`` and append its generated option list to its
    docstring."""

    def deco(cls):
        document(cls, cls.Params, "model.edge_params")
        return EDGE_FEATURIZERS.register(name)(cls)

    return deco


@dataclass
class EdgeParams:
    """No options (the base of every featurizer's Params)."""

    def check(self, cutoff: float) -> None:
        """Combinations with the cutoff; raise CrystaltuneError naming the key."""


@dataclass
class GaussianParams(EdgeParams):
    step: float = option(0.2, lo=1e-3, hi=10.0, doc="spacing of the centres and width of the Gaussians (Å)")
    dmin: float = option(0.0, lo=0.0, hi=100.0, doc="first centre (Å)")

    def check(self, cutoff: float) -> None:
        """At most MAX_EDGE_FEATURES Gaussians between dmin and the cutoff."""
        if (cutoff - self.dmin) / self.step > MAX_EDGE_FEATURES:
            raise CrystaltuneError(
                f"model.edge_params.step {self.step} gives more than {MAX_EDGE_FEATURES} Gaussians "
                f"between dmin and the cutoff ({cutoff} Å); use a larger step"
            )


@dataclass
class RBFParams(EdgeParams):
    num_rbf: int = option(32, lo=1, hi=512, doc="number of Bessel functions")
    trainable: bool = option(False, doc="train the frequencies")


@dataclass
class PeriodicParams(GaussianParams):
    num_fourier: int = option(4, lo=0, hi=64, doc="Fourier harmonics M")


@dataclass
class AtomSpecificParams(GaussianParams):
    trainable: bool = option(True, doc="train the per-element radius scale")


def gaussian_exp(arg: torch.Tensor) -> torch.Tensor:
    """``exp(arg)`` with results below exp(-80) set to exactly 0: far Gaussian tails would otherwise be
    denormal floats, which make the following matrix products ~9x slower on x86 CPUs."""
    return torch.exp(arg.clamp_min(-80.0)) * (arg > -80.0)


@register("gaussian")
class GaussianDistance(nn.Module):
    """CGCNN's expansion: ``e_k(d) = exp(-(d - mu_k)^2 / sigma^2)``, ``mu_k = 0, step, ..., cutoff``,
    ``sigma = step`` (the reference uses 0..8 Å, step 0.2 -> 41 features)."""

    Params = GaussianParams

    def __init__(self, cutoff: float = 8.0, params: GaussianParams | None = None):
        super().__init__()
        self.params = p = params or self.Params()
        centres = np.arange(p.dmin, cutoff + p.step, p.step)  # the reference's np.arange grid, exactly
        self.register_buffer("centres", torch.tensor(centres, dtype=torch.float32))
        self.sigma = float(p.step)
        self.out_dim = len(centres)

    def forward(self, dist, z_src=None, z_dst=None):
        return gaussian_exp(-((dist[:, None] - self.centres) ** 2) / self.sigma**2)


def cosine_cutoff(dist: torch.Tensor, cutoff: float) -> torch.Tensor:
    """``f_c(d) = (cos(pi d / r_c) + 1) / 2`` for d < r_c, else 0: smooth decay to zero at the cutoff."""
    return 0.5 * (torch.cos(math.pi * dist / cutoff) + 1.0) * (dist < cutoff)


@register("rbf")
class BesselRBF(nn.Module):
    """DimeNet's radial basis with a cosine cutoff:
    ``e_k(d) = sqrt(2 / r_c) * sin(k pi d / r_c) / d * f_c(d)``, k = 1..num_rbf (frequencies trainable
    when ``trainable``)."""

    Params = RBFParams

    def __init__(self, cutoff: float = 8.0, params: RBFParams | None = None):
        super().__init__()
        self.params = p = params or self.Params()
        freq = torch.arange(1, p.num_rbf + 1, dtype=torch.float32) * math.pi / cutoff
        self.freq = nn.Parameter(freq, requires_grad=p.trainable)
        self.cutoff = float(cutoff)
        self.out_dim = int(p.num_rbf)

    def forward(self, dist, z_src=None, z_dst=None):
        d = dist.clamp_min(1e-4)[:, None]
        return math.sqrt(2.0 / self.cutoff) * torch.sin(self.freq * d) / d * cosine_cutoff(d, self.cutoff)


@register("weighted_gaussian")
class WeightedGaussian(GaussianDistance):
    """Gaussians with a trainable amplitude and width per centre:
    ``e_k(d) = w_k exp(-(d - mu_k)^2 / s_k^2)``, ``w_k = 1``, ``s_k = step`` initially."""

    def __init__(self, cutoff: float = 8.0, params: GaussianParams | None = None):
        super().__init__(cutoff, params)
        self.weight = nn.Parameter(torch.ones(self.out_dim))
        self.log_sigma = nn.Parameter(torch.full((self.out_dim,), math.log(self.params.step)))

    def forward(self, dist, z_src=None, z_dst=None):
        sigma = self.log_sigma.exp()
        return self.weight * gaussian_exp(-((dist[:, None] - self.centres) ** 2) / sigma**2)


@register("periodic_weighted_gaussian")
class PeriodicWeightedGaussian(WeightedGaussian):
    """Weighted Gaussians, a cosine cutoff envelope and Fourier terms of the distance:
    ``[w_k exp(-(d-mu_k)^2/s_k^2) f_c(d)]_k ++ [sin(2 pi m d / r_c), cos(2 pi m d / r_c)]_{m=1..M}``,
    so features vary smoothly to the cutoff and oscillating shell structure is easy to express."""

    Params = PeriodicParams

    def __init__(self, cutoff: float = 8.0, params: PeriodicParams | None = None):
        super().__init__(cutoff, params)
        m = self.params.num_fourier
        self.cutoff = float(cutoff)
        self.register_buffer("harmonics", torch.arange(1, m + 1, dtype=torch.float32) * 2 * math.pi / cutoff)
        self.out_dim = self.out_dim + 2 * int(m)

    def forward(self, dist, z_src=None, z_dst=None):
        g = super().forward(dist) * cosine_cutoff(dist, self.cutoff)[:, None]
        phase = dist[:, None] * self.harmonics
        return torch.cat([g, torch.sin(phase), torch.cos(phase)], dim=1)


@register("atom_specific_gaussian")
class AtomSpecificGaussian(GaussianDistance):
    """Gaussians whose width depends on the pair of elements:
    ``e_k(d) = exp(-(d - mu_k)^2 / sigma_ij^2)``, ``sigma_ij = step * (r_i + r_j) / (2 r_mean)`` with r the
    covalent-like atomic radius from pymatgen (``r_mean`` its mean over elements); bigger atoms get
    broader shells. A trainable per-element radius scale starts at 1."""

    Params = AtomSpecificParams

    def __init__(self, cutoff: float = 8.0, params: AtomSpecificParams | None = None):
        super().__init__(cutoff, params)
        radii = np.asarray(_atomic_radii(), dtype=np.float32)  # normalised here: no boolean mask on a meta tensor
        self.register_buffer("radii", torch.tensor(radii / radii[radii > 0].mean()))
        self.scale = nn.Parameter(torch.ones(len(radii)), requires_grad=self.params.trainable)

    def forward(self, dist, z_src, z_dst):
        r = self.radii * self.scale
        sigma = self.sigma * 0.5 * (r[z_src] + r[z_dst])
        return gaussian_exp(-((dist[:, None] - self.centres) ** 2) / sigma[:, None].clamp_min(1e-3) ** 2)


def _atomic_radii() -> list[float]:
    """Atomic radius (Å) by Z from pymatgen, 1.5 Å where unknown; index 0 unused."""
    from pymatgen.core import Element

    out = [1.5]
    for z in range(1, 119):
        r = Element.from_Z(z).atomic_radius
        out.append(float(r) if r is not None else 1.5)
    return out


def make_edge_featurizer(name: str, cutoff: float = 8.0, **params) -> nn.Module:
    """Instantiate a registered edge featurizer from YAML-style options (checked: see parse_edge_params)."""
    return EDGE_FEATURIZERS.get(name)(cutoff, parse_edge_params(name, cutoff, params))


def parse_edge_params(name: str, cutoff: float, params: dict | None):
    """``model.edge_params`` -> the ``Params`` of featurizer ``name``: names, types, ranges and the
    Gaussian count, before anything is built; raises CrystaltuneError naming the key."""
    cls = EDGE_FEATURIZERS.get(name).Params
    where = "model.edge_params"
    try:
        parsed = build(cls, params, where)
    except UnknownKey as exc:
        known = ", ".join(exc.known) or "none"
        raise CrystaltuneError(
            f"{where}: unknown parameter {exc.key!r}{exc.hint} for the {name} featurizer (known: {known})"
        ) from None
    except OutOfRange as exc:  # this section's messages read "key must be in": the README and tests quote them
        raise CrystaltuneError(f"{exc.where} must be in {exc.bounds}, got {exc.value}") from None
    parsed.check(cutoff)
    return parsed


def check_edge_params(name: str, cutoff: float, params: dict) -> None:
    """Validate ``model.edge_params`` for featurizer ``name`` (TrialConfig.validate's entry point)."""
    parse_edge_params(name, cutoff, params)
