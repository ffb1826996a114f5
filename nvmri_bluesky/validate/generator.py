"""``nvmri validate``'s generator: seed -> the sample's truth and its scenario file.

:func:`draw_sample` is a pure function (same seed, same :class:`Truth`); the
distribution (the envelope below) is documented in ``docs/validation.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError

__all__ = ["KINDS", "Truth", "draw_sample", "xyz_text"]

# ---------------------------------------------------------------- the envelope

KINDS = ("single", "layer", "spin+layer", "shallow", "pair", "weak+strong", "empty",
         "triple", "random")
"""Sample kinds; seed s draws kind ``KINDS[s % len(KINDS)]`` (every kind in any 9 seeds)."""
AXES = ("dx", "dy", "dz")
DEPTH_NM = (6.0, 16.0)
"""NV depth below the surface, uniform, nm."""
SHALLOW_DEPTH_NM = (6.0, 7.0)
"""NV depth of the ``shallow`` kind, uniform, nm."""
LATERAL_NM = 8.0
"""|dx|, |dy| <= this (spin minus NV), nm."""
DZ_NM = (-6.0, 2.0)
"""dz range (spin minus NV, + is towards the surface), nm."""
MIN_COUPLING_HZ = 50e3
"""|nu| of every point spin >= this, Hz."""
MIN_SEPARATION_NM = 3.0
"""Point spins are >= this far from each other and from the NV, nm."""
WEAK_RATIO = (0.09, 0.11)
"""``weak+strong``: |nu_weak| / |nu_strong| in this range (1/10 +/- 10 %)."""
DENSITY_PER_NM2 = (0.1, 1.0)
"""Layer density, uniform, spins/nm^2."""
LAYER_RADIUS_NM = 40.0
"""Radius of the layer disc (centred above the NV at z = 0), nm."""
_MAX_TRIES = 200_000
_GENERATOR_TAG = 0x5EED


# ---------------------------------------------------------------- generator

@dataclass(frozen=True)
class Truth:
    """What the generator put in one sample (nothing else knows it).

    Attributes
    ----------
    seed : int
        The sample's seed (also the scenario's seed: noise, layer spins).
    kind : str
        One of :data:`KINDS`.
    depth_nm : float
        NV depth below the surface, nm.
    spins : tuple of (dx, dy, dz)
        Point spins, offsets spin minus NV, nm.
    couplings_hz : tuple of float
        Their secular couplings to the NV (``physics.dipolar_coupling``), Hz.
    layer_density_per_nm2 : float or None
        Density of the surface layer (z = 0), None if there is none.
    """

    seed: int
    kind: str
    depth_nm: float
    spins: tuple[tuple[float, float, float], ...] = ()
    couplings_hz: tuple[float, ...] = ()
    layer_density_per_nm2: float | None = None

    @property
    def name(self) -> str:
        """The scenario's name."""
        return f"validate-{self.seed:04d}"

    @property
    def layer_height_nm(self) -> float | None:
        """Height of the layer above the NV (it sits at the surface), nm."""
        return None if self.layer_density_per_nm2 is None else self.depth_nm

    def scenario(self) -> dict[str, Any]:
        """The scenario file's content (schema of :mod:`nvmri_bluesky.sim.scenario`)."""
        points = [{"x_nm": dx, "y_nm": dy, "z_nm": dz - self.depth_nm}
                  for dx, dy, dz in self.spins]
        layers = ([] if self.layer_density_per_nm2 is None else
                  [{"z_nm": 0.0, "density_per_nm2": self.layer_density_per_nm2,
                    "radius_nm": LAYER_RADIUS_NM}])
        return {"name": self.name, "seed": self.seed, "nv": {"depth_nm": self.depth_nm},
                "dark_spins": {"points": points, "layers": layers}}

    def describe(self) -> str:
        """One line: depth, spins with couplings, layer."""
        parts = [f"NV {self.depth_nm:.1f} nm"]
        parts += [f"spin ({xyz_text(s)}) {abs(nu) / 1e3:.0f} kHz"
                  for s, nu in zip(self.spins, self.couplings_hz, strict=True)]
        if self.layer_density_per_nm2 is not None:
            parts.append(f"layer {self.layer_density_per_nm2:.2f}/nm^2")
        return ", ".join(parts) if len(parts) > 1 else parts[0] + ", nothing"


def xyz_text(v: Sequence[float]) -> str:
    """An offset as text: "+1.00, -2.00, +0.50"."""
    return ", ".join(f"{c:+.2f}" for c in v)


def _nv_axis() -> np.ndarray:
    """The NV axis (and B0 direction) every generated scenario uses (the default)."""
    return physics.Instrument().nv_axis


def _acceptable(offset: np.ndarray, others: Sequence[np.ndarray], nu_min: float) -> bool:
    if np.linalg.norm(offset) < MIN_SEPARATION_NM:
        return False
    if any(np.linalg.norm(offset - o) < MIN_SEPARATION_NM for o in others):
        return False
    return abs(float(physics.dipolar_coupling(offset, _nv_axis()))) >= nu_min


def _draw_spin(rng: np.random.Generator, others: Sequence[np.ndarray],
               accept: Callable[[np.ndarray], bool] = lambda o: True,
               nu_min: float = MIN_COUPLING_HZ) -> np.ndarray:
    """One offset uniform in the box, >= 3 nm from the NV and ``others``, |nu| >= nu_min."""
    for _ in range(_MAX_TRIES):
        offset = np.array([rng.uniform(-LATERAL_NM, LATERAL_NM),
                           rng.uniform(-LATERAL_NM, LATERAL_NM), rng.uniform(*DZ_NM)])
        if _acceptable(offset, others, nu_min) and accept(offset):
            return np.round(offset, 3)
    raise NvmriError("validate generator: no spin position satisfies the constraints")


def _draw_spins(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    spins: list[np.ndarray] = []
    for _ in range(n):
        spins.append(_draw_spin(rng, spins))
    return spins


def _draw_weak_strong(rng: np.random.Generator) -> list[np.ndarray]:
    """A strong spin (|nu| >= 10 x 50 kHz) and one coupled 1/10 as strongly."""
    strong = _draw_spin(rng, [], nu_min=MIN_COUPLING_HZ / WEAK_RATIO[0])
    nu_strong = abs(float(physics.dipolar_coupling(strong, _nv_axis())))

    def tenth(offset: np.ndarray) -> bool:
        ratio = abs(float(physics.dipolar_coupling(offset, _nv_axis()))) / nu_strong
        return WEAK_RATIO[0] <= ratio <= WEAK_RATIO[1]

    return [strong, _draw_spin(rng, [strong], accept=tenth)]


_CONTENT = {  # kind -> (number of point spins or None for random 0-3, layer: True/False/None)
    "single": (1, False), "layer": (0, True), "spin+layer": (1, True),
    "shallow": (1, None), "pair": (2, False), "weak+strong": (2, False),
    "empty": (0, False), "triple": (3, False), "random": (None, None),
}


def draw_sample(seed: int) -> Truth:
    """The sample of ``seed``: a pure function (same seed, same sample).

    Parameters
    ----------
    seed : int
        >= 0.  The kind is ``KINDS[seed % len(KINDS)]``; every continuous
        parameter comes from a generator seeded by (tag, seed).

    Returns
    -------
    Truth
    """
    if seed < 0:
        raise NvmriError(f"seeds must be >= 0, not {seed}")
    kind = KINDS[seed % len(KINDS)]
    rng = np.random.default_rng([_GENERATOR_TAG, seed])
    depth = rng.uniform(*(SHALLOW_DEPTH_NM if kind == "shallow" else DEPTH_NM))
    n_spins, layer = _CONTENT[kind]
    if n_spins is None:
        n_spins = int(rng.integers(0, 4))
    if layer is None:
        layer = bool(rng.random() < 0.5)
    spins = _draw_weak_strong(rng) if kind == "weak+strong" else _draw_spins(rng, n_spins)
    density = round(float(rng.uniform(*DENSITY_PER_NM2)), 3) if layer else None
    couplings = tuple(float(physics.dipolar_coupling(s, _nv_axis())) for s in spins)
    return Truth(seed=seed, kind=kind, depth_nm=round(float(depth), 3),
                 spins=tuple(tuple(float(c) for c in s) for s in spins),
                 couplings_hz=couplings, layer_density_per_nm2=density)
