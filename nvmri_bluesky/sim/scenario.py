"""The simulator's scenario: sample, sensor, tip, stage and injected faults.

A scenario is a JSON or YAML file (or a built-in name, see
:func:`list_scenarios`).  Every field is optional; the defaults are those of
``reference/physics.md`` (:class:`nvmri_bluesky.physics.Instrument`).  The
sections are pydantic dataclasses (:mod:`nvmri_bluesky.schema`): unknown keys,
wrong types and unphysical values (each section's ``_physical`` validator, the
cross-section ones on :class:`Scenario`) raise :class:`NvmriError` with one
line naming the key.  Example (every key shown)::

    {"name": "single-spin", "seed": 7, "b0_tesla": 0.12, "z_min_nm": 5.0,
     "nv": {"depth_nm": 10.0, "axis_deg": [54.74, 0.0], "t2_star_us": 2.0,
            "t2_us": 20.0, "t2_exponent": 1.5, "photons_per_shot": 0.03,
            "contrast": 0.30},
     "tip": {"radius_nm": 30.0, "moment_am2": 4.3e-17,
             "drift_nm_per_s": [0.0, 0.0, 0.0]},
     "dark_spins": {"t2_star_ns": 150.0,
                    "points": [{"x_nm": 4.0, "y_nm": 5.1, "z_nm": -13.65}],
                    "layers": [{"z_nm": 0.0, "density_per_nm2": 0.5, "radius_nm": 40.0}]},
     "stage": {"x_range_nm": [-1000, 1000], "y_range_nm": [-1000, 1000],
               "z_max_nm": 1000, "velocity_nm_per_s": 1000, "start_nm": [0, 0, 100]},
     "faults": [{"kind": "frequency_jump", "after_acquisitions": 50, "hz": 2e7}]}

Positions are lab-frame nm (surface z = 0, diamond below, NV at
(0, 0, -depth_nm)); dark spins must be at or below the surface.  Layer spins
are drawn from ``seed``: round(density * pi * radius^2) of them, uniform in a
disc of ``radius_nm`` centred above the NV at the layer's ``z_nm``.  The tip
apex drifts away from the stage readback by ``drift_nm_per_s`` times the
simulated time.

Faults (``after_acquisitions`` N counts acquisitions from 0: the fault starts
with acquisition number N):

``frequency_jump``, ``hz``
    A step of the bias field along the NV axis by hz / gamma_e (the NV line
    and the dark-spin line both jump by about ``hz``): a lock-loss test.
``counter_dropout``, ``count``
    ``count`` acquisitions return all-zero counts.
``ioc_pause``, ``seconds``
    Acquisition N stalls for ``seconds`` of wall time before completing (the
    IOC keeps serving other PVs).
``laser_off``, ``seconds``
    From acquisition N the laser is off for ``seconds`` of wall time:
    ``HEALTH:LASER_OK`` reads Fault and the counts are zero (suspender tests).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from numpy.typing import NDArray
from pydantic import TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.schema import (
    CONFIG,
    Finite,
    Integer,
    Text,
    dotted,
    first_error,
    problem,
    sequence,
    short,
)
from nvmri_bluesky.sim.scenario_files import read_document

__all__ = [
    "NV", "Tip", "SpinPoint", "Layer", "DarkSpins", "Stage", "Fault", "Scenario",
    "FAULT_KINDS", "load_scenario", "list_scenarios",
]

_DEFAULT = physics.Instrument()

FAULT_KINDS: dict[str, tuple[str, ...]] = {
    "frequency_jump": ("hz",),
    "counter_dropout": ("count",),
    "ioc_pause": ("seconds",),
    "laser_off": ("seconds",),
}
"""Fault kind -> its keys besides ``kind`` and ``after_acquisitions``."""

_ALIASES = {"default": "paper-fig4"}

MAX_SPINS = 100_000
"""Most dark spins (points plus every layer's draw)."""
UPPER_BOUNDS = {"b0_tesla": 5.0, "nv.depth_nm": 1e4, "z_min_nm": 1e4, "tip.radius_nm": 1e5,
                "tip.moment_am2": 1e-10, "nv.t2_star_us": 1e7, "nv.t2_us": 1e7,
                "nv.t2_exponent": 10.0, "nv.photons_per_shot": 100.0,
                "dark_spins.t2_star_ns": 1e10, "stage.velocity_nm_per_s": 1e7}
"""Largest accepted value of a key (beyond them the simulated instrument breaks)."""

_Pair = Annotated[tuple[Finite, Finite], sequence(2)]
_Triple = Annotated[tuple[Finite, Finite, Finite], sequence(3)]


def _positive(model: Any, section: str, *names: str) -> None:
    """Refuse a key of ``model`` that is not > 0 or above its :data:`UPPER_BOUNDS` entry."""
    for name in names:
        value, bound = getattr(model, name), UPPER_BOUNDS.get(dotted((section, name)))
        if value <= 0:
            raise problem(f"must be > 0, got {short(value)}", name)
        if bound is not None and value > bound:
            raise problem(f"must be <= {bound:g}, got {short(value)}", name)


def _below_surface(z_nm: float) -> None:
    if z_nm > 0:
        raise problem(f"{short(z_nm)} is above the surface (dark spins need z_nm <= 0)", "z_nm")


@dataclass(config=CONFIG)
class NV:
    """The NV sensor: depth below the surface, axis, coherence, optical readout."""

    depth_nm: Finite = _DEFAULT.nv_depth_nm
    axis_deg: _Pair = _DEFAULT.nv_axis_deg
    t2_star_us: Finite = round(_DEFAULT.nv_t2_star_s * 1e6, 9)
    t2_us: Finite = round(_DEFAULT.nv_t2_s * 1e6, 9)
    t2_exponent: Finite = _DEFAULT.nv_t2_exponent
    photons_per_shot: Finite = _DEFAULT.photons_per_shot
    contrast: Finite = _DEFAULT.contrast

    @model_validator(mode="after")
    def _physical(self) -> NV:
        _positive(self, "nv", "depth_nm", "t2_star_us", "t2_us", "t2_exponent",
                  "photons_per_shot")
        if not 0 < self.contrast < 1:
            raise problem(f"must be between 0 and 1, got {short(self.contrast)}", "contrast")
        return self


@dataclass(config=CONFIG)
class Tip:
    """The magnetic tip: sphere radius, moment (along +z) and apex drift."""

    radius_nm: Finite = _DEFAULT.tip_radius_nm
    moment_am2: Finite = _DEFAULT.tip_moment_am2
    drift_nm_per_s: _Triple = (0.0, 0.0, 0.0)

    @model_validator(mode="after")
    def _physical(self) -> Tip:
        _positive(self, "tip", "radius_nm", "moment_am2")
        return self


@dataclass(config=CONFIG)
class SpinPoint:
    """One dark spin at a lab-frame position, nm."""

    x_nm: Finite
    y_nm: Finite
    z_nm: Finite

    @model_validator(mode="after")
    def _physical(self) -> SpinPoint:
        _below_surface(self.z_nm)
        return self


@dataclass(config=CONFIG)
class Layer:
    """A disc of randomly placed dark spins at height ``z_nm``."""

    z_nm: Finite = 0.0
    density_per_nm2: Finite = 0.5
    radius_nm: Finite = 40.0

    @model_validator(mode="after")
    def _physical(self) -> Layer:
        _positive(self, "dark_spins.layers", "radius_nm")
        _below_surface(self.z_nm)
        if self.density_per_nm2 < 0:
            raise problem(f"must be >= 0, got {short(self.density_per_nm2)}", "density_per_nm2")
        return self


@dataclass(config=CONFIG)
class DarkSpins:
    """The dark-spin bath: linewidth, single spins and layers."""

    t2_star_ns: Finite = round(_DEFAULT.dark_t2_star_s * 1e9, 9)
    points: Annotated[tuple[SpinPoint, ...], sequence()] = ()
    layers: Annotated[tuple[Layer, ...], sequence()] = ()

    @model_validator(mode="after")
    def _physical(self) -> DarkSpins:
        _positive(self, "dark_spins", "t2_star_ns")
        spins = len(self.points) + sum(layer.density_per_nm2 * math.pi * layer.radius_nm**2
                                       for layer in self.layers)
        if spins > MAX_SPINS:
            raise problem(f"{spins:.3g} spins; the simulator takes at most {MAX_SPINS}")
        return self


@dataclass(config=CONFIG)
class Stage:
    """Stage travel (x, y ranges and the top of z; the bottom is ``z_min_nm``), nm."""

    x_range_nm: _Pair = (-1000.0, 1000.0)
    y_range_nm: _Pair = (-1000.0, 1000.0)
    z_max_nm: Finite = 1000.0
    velocity_nm_per_s: Finite = 1000.0
    start_nm: _Triple = (0.0, 0.0, 100.0)

    @model_validator(mode="after")
    def _physical(self) -> Stage:
        _positive(self, "stage", "velocity_nm_per_s")
        for key in ("x_range_nm", "y_range_nm"):
            lo, hi = getattr(self, key)
            if not lo < hi:
                raise problem(f"needs low < high, got [{short(lo)}, {short(hi)}]", key)
        return self


@dataclass(config=CONFIG)
class Fault:
    """An injected failure; which of ``hz``, ``count``, ``seconds`` applies depends on kind."""

    kind: Text
    after_acquisitions: Integer = 0
    hz: Finite = 0.0
    count: Integer = 1
    seconds: Finite = 0.0

    @model_validator(mode="before")
    @classmethod
    def _keys_of_kind(cls, data: Any) -> Any:
        """A fault document holds only the keys of its kind."""
        if isinstance(data, Mapping):
            kind = data.get("kind")
            if kind not in FAULT_KINDS:
                raise problem(f"unknown fault kind {short(kind)} "
                              f"(known: {', '.join(FAULT_KINDS)})", "kind")
            for key in data:
                if key not in ("kind", "after_acquisitions", *FAULT_KINDS[kind]):
                    raise problem(f"unknown key for fault kind {kind!r}", str(key))
        return data

    @model_validator(mode="after")
    def _physical(self) -> Fault:
        if self.kind not in FAULT_KINDS:
            raise problem(f"unknown fault kind {short(self.kind)} "
                          f"(known: {', '.join(FAULT_KINDS)})", "kind")
        for key, low in (("after_acquisitions", 0), ("count", 1), ("seconds", 0)):
            if getattr(self, key) < low:
                raise problem(f"must be >= {low}, got {getattr(self, key)}", key)
        return self

    def to_dict(self) -> dict[str, Any]:
        d = {"kind": self.kind, "after_acquisitions": self.after_acquisitions}
        d.update({k: getattr(self, k) for k in FAULT_KINDS[self.kind]})
        return d


@dataclass(config=CONFIG)
class Scenario:
    """A validated scenario; build it with :func:`load_scenario` or :meth:`from_dict`."""

    name: Text = "scenario"
    seed: Integer = 0
    b0_tesla: Finite = _DEFAULT.b0_tesla
    z_min_nm: Finite = _DEFAULT.z_min_nm
    nv: NV = field(default_factory=NV)
    tip: Tip = field(default_factory=Tip)
    dark_spins: DarkSpins = field(default_factory=DarkSpins)
    stage: Stage = field(default_factory=Stage)
    faults: Annotated[tuple[Fault, ...], sequence()] = ()

    @model_validator(mode="after")
    def _physical(self) -> Scenario:
        _positive(self, "", "b0_tesla", "z_min_nm")
        if self.seed < 0:
            raise problem(f"must be >= 0, got {short(self.seed)}", "seed")
        _clear_of_the_nv(self)
        _inside_the_travel(self)
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "scenario") -> Scenario:
        """Parse and validate a scenario dict (the JSON/YAML document).

        Raises
        ------
        NvmriError
            One line: ``<source>: <key path>: <why>``.
        """
        try:
            return _DOCUMENT.validate_python(dict(data) if isinstance(data, Mapping) else data)
        except ValidationError as exc:
            keys, _, why, _ = first_error(exc)
            raise NvmriError(f"{source}: {dotted(keys) or 'scenario'}: {why}") from None
        except RecursionError:
            raise NvmriError(f"{source}: nested too deeply to be a scenario") from None

    def to_dict(self) -> dict[str, Any]:
        """The scenario as a JSON-ready dict with every field (defaults filled in)."""
        d = _plain(dataclasses.asdict(self))
        d["faults"] = [f.to_dict() for f in self.faults]
        return d

    def instrument(self) -> physics.Instrument:
        """The :class:`physics.Instrument` this scenario describes."""
        return physics.Instrument(
            b0_tesla=self.b0_tesla, nv_depth_nm=self.nv.depth_nm,
            nv_axis_deg=tuple(self.nv.axis_deg), nv_t2_star_s=self.nv.t2_star_us / 1e6,
            nv_t2_s=self.nv.t2_us / 1e6, nv_t2_exponent=self.nv.t2_exponent,
            photons_per_shot=self.nv.photons_per_shot, contrast=self.nv.contrast,
            tip_radius_nm=self.tip.radius_nm, tip_moment_am2=self.tip.moment_am2,
            dark_t2_star_s=self.dark_spins.t2_star_ns / 1e9, z_min_nm=self.z_min_nm)

    def spin_positions(self) -> NDArray:
        """Every dark spin, points first then each layer's draw from ``seed``.

        Returns
        -------
        ndarray, shape (n, 3)
            Lab-frame positions, nm.
        """
        rng = np.random.default_rng(self.seed)
        parts = [np.array([[p.x_nm, p.y_nm, p.z_nm] for p in self.dark_spins.points],
                          float).reshape(-1, 3)]
        for layer in self.dark_spins.layers:
            n = round(layer.density_per_nm2 * math.pi * layer.radius_nm**2)
            r = layer.radius_nm * np.sqrt(rng.random(n))
            phi = 2.0 * math.pi * rng.random(n)
            parts.append(np.column_stack([r * np.cos(phi), r * np.sin(phi),
                                          np.full(n, float(layer.z_nm))]))
        return np.concatenate(parts)


_DOCUMENT = TypeAdapter(Scenario)


def _clear_of_the_nv(s: Scenario) -> None:
    """Refuse a dark spin (point or layer) within 0.5 nm of the NV."""
    nv = np.array([0.0, 0.0, -s.nv.depth_nm])
    for i, p in enumerate(s.dark_spins.points):
        if np.linalg.norm(np.array([p.x_nm, p.y_nm, p.z_nm]) - nv) < 0.5:
            raise problem("is within 0.5 nm of the NV", f"dark_spins.points[{i}]")
    for i, layer in enumerate(s.dark_spins.layers):
        if abs(layer.z_nm - nv[2]) < 0.5:
            raise problem("is within 0.5 nm of the NV depth", f"dark_spins.layers[{i}].z_nm")


def _inside_the_travel(s: Scenario) -> None:
    """Refuse a z travel that ends below z_min or a start outside the travel."""
    st = s.stage
    if not st.z_max_nm > s.z_min_nm:
        raise problem(f"must exceed z_min_nm ({short(s.z_min_nm)}), got "
                      f"{short(st.z_max_nm)}", "stage.z_max_nm")
    x, y, z = st.start_nm
    if not (st.x_range_nm[0] <= x <= st.x_range_nm[1]
            and st.y_range_nm[0] <= y <= st.y_range_nm[1] and s.z_min_nm <= z <= st.z_max_nm):
        raise problem(f"{short(list(st.start_nm))} is outside the stage travel",
                      "stage.start_nm")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------- loading

def _builtin_dir():
    return resources.files("nvmri_bluesky.sim").joinpath("scenarios")


def list_scenarios() -> list[str]:
    """Names of the built-in scenarios (``default`` is an alias of ``paper-fig4``)."""
    names = [p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".json")]
    return sorted([*names, *_ALIASES])


def load_scenario(name_or_path: str | Path | Mapping[str, Any] | Scenario | None = None
                  ) -> Scenario:
    """Load a built-in scenario by name, or a ``.json`` / ``.yaml`` / ``.yml`` file.

    Parameters
    ----------
    name_or_path : str, Path, dict, Scenario or None
        A name from :func:`list_scenarios`, a file path, an already parsed
        dict, or a Scenario (returned as is).  None means ``default``.

    Raises
    ------
    NvmriError
        Unknown name, unreadable file, or an invalid scenario (one line).
    """
    if isinstance(name_or_path, Scenario):
        return name_or_path
    if isinstance(name_or_path, Mapping):
        return Scenario.from_dict(name_or_path)
    spec = "default" if name_or_path is None else str(name_or_path)
    path = Path(spec)
    if path.suffix.lower() in (".json", ".yaml", ".yml") or path.exists():
        data, source = read_document(path), str(path)
        default_name = path.stem
    else:
        name = _ALIASES.get(spec, spec)
        builtin = _builtin_dir().joinpath(f"{name}.json")
        if not builtin.is_file():
            raise NvmriError(f"unknown scenario {short(spec)} (built-in: "
                             f"{', '.join(list_scenarios())}; or a .json/.yaml file)")
        data, source, default_name = json.loads(builtin.read_text()), name, name
    if isinstance(data, Mapping) and "name" not in data:
        data = {"name": default_name, **data}
    return Scenario.from_dict(data if data is not None else {}, source=source)
