"""The simulator's scenario: sample, sensor, tip, stage and injected faults.

A scenario is a JSON or YAML file (or a built-in name, see
:func:`list_scenarios`).  Every field is optional; the defaults are those of
``reference/physics.md`` (:class:`nvmri_bluesky.physics.Instrument`).  Unknown
keys, wrong types and unphysical values raise :class:`NvmriError` with one
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
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from nvmri_bluesky import physics
from nvmri_bluesky.errors import NvmriError

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


@dataclass(frozen=True)
class NV:
    """The NV sensor: depth below the surface, axis, coherence, optical readout."""

    depth_nm: float = _DEFAULT.nv_depth_nm
    axis_deg: tuple[float, float] = _DEFAULT.nv_axis_deg
    t2_star_us: float = round(_DEFAULT.nv_t2_star_s * 1e6, 9)
    t2_us: float = round(_DEFAULT.nv_t2_s * 1e6, 9)
    t2_exponent: float = _DEFAULT.nv_t2_exponent
    photons_per_shot: float = _DEFAULT.photons_per_shot
    contrast: float = _DEFAULT.contrast


@dataclass(frozen=True)
class Tip:
    """The magnetic tip: sphere radius, moment (along +z) and apex drift."""

    radius_nm: float = _DEFAULT.tip_radius_nm
    moment_am2: float = _DEFAULT.tip_moment_am2
    drift_nm_per_s: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class SpinPoint:
    """One dark spin at a lab-frame position, nm."""

    x_nm: float
    y_nm: float
    z_nm: float


@dataclass(frozen=True)
class Layer:
    """A disc of randomly placed dark spins at height ``z_nm``."""

    z_nm: float = 0.0
    density_per_nm2: float = 0.5
    radius_nm: float = 40.0


@dataclass(frozen=True)
class DarkSpins:
    """The dark-spin bath: linewidth, single spins and layers."""

    t2_star_ns: float = round(_DEFAULT.dark_t2_star_s * 1e9, 9)
    points: tuple[SpinPoint, ...] = ()
    layers: tuple[Layer, ...] = ()


@dataclass(frozen=True)
class Stage:
    """Stage travel (x, y ranges and the top of z; the bottom is ``z_min_nm``), nm."""

    x_range_nm: tuple[float, float] = (-1000.0, 1000.0)
    y_range_nm: tuple[float, float] = (-1000.0, 1000.0)
    z_max_nm: float = 1000.0
    velocity_nm_per_s: float = 1000.0
    start_nm: tuple[float, float, float] = (0.0, 0.0, 100.0)


@dataclass(frozen=True)
class Fault:
    """An injected failure; which of ``hz``, ``count``, ``seconds`` applies depends on kind."""

    kind: str
    after_acquisitions: int = 0
    hz: float = 0.0
    count: int = 1
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {"kind": self.kind, "after_acquisitions": self.after_acquisitions}
        d.update({k: getattr(self, k) for k in FAULT_KINDS[self.kind]})
        return d


@dataclass(frozen=True)
class Scenario:
    """A validated scenario; build it with :func:`load_scenario` or :meth:`from_dict`."""

    name: str = "scenario"
    seed: int = 0
    b0_tesla: float = _DEFAULT.b0_tesla
    z_min_nm: float = _DEFAULT.z_min_nm
    nv: NV = field(default_factory=NV)
    tip: Tip = field(default_factory=Tip)
    dark_spins: DarkSpins = field(default_factory=DarkSpins)
    stage: Stage = field(default_factory=Stage)
    faults: tuple[Fault, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "scenario") -> Scenario:
        """Parse and validate a scenario dict (the JSON/YAML document).

        Raises
        ------
        NvmriError
            One line: ``<source>: <key path>: <why>``.
        """
        try:
            scenario = _parse(cls, data, "")
            _validate(scenario)
        except _Bad as bad:
            raise NvmriError(f"{source}: {bad.path}: {bad.why}") from None
        return scenario

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


# ---------------------------------------------------------------- parsing

MAX_FILE_BYTES = 1_000_000
"""Largest scenario file read, bytes."""
MAX_VALUES = 100_000
"""Most values (numbers, strings, list items, keys) a scenario document may hold,
counted as YAML aliases expand them (a 'billion laughs' file is refused)."""
MAX_ALIASES = 100
"""Most YAML aliases (``*name``) in a scenario file."""
MAX_SPINS = 100_000
"""Most dark spins (points plus every layer's draw)."""
UPPER_BOUNDS = {"b0_tesla": 5.0, "nv.depth_nm": 1e4, "z_min_nm": 1e4, "tip.radius_nm": 1e5,
                "tip.moment_am2": 1e-10, "nv.t2_star_us": 1e7, "nv.t2_us": 1e7,
                "nv.t2_exponent": 10.0, "nv.photons_per_shot": 100.0,
                "dark_spins.t2_star_ns": 1e10, "stage.velocity_nm_per_s": 1e7}
"""Largest accepted value of a key (beyond them the simulated instrument breaks)."""


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for one-line refusals."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class _Bad(Exception):
    def __init__(self, path: str, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = path or "scenario", why


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _value(tp: Any, value: Any, path: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise :class:`_Bad`."""
    if dataclasses.is_dataclass(tp):
        return _parse(tp, value, path)
    if tp is float or tp is int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Bad(path, f"expected a number, got {_type_name(value)} {_short(value)}")
        if tp is int and not float(value).is_integer():
            raise _Bad(path, f"expected an integer, got {_short(value)}")
        if not math.isfinite(value):
            raise _Bad(path, f"expected a finite number, got {_short(value)}")
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise _Bad(path, f"expected a string, got {_type_name(value)} {_short(value)}")
        return value
    args = typing.get_args(tp)            # tuple[X, ...] or tuple[X, Y, Z]
    if not isinstance(value, list | tuple):
        raise _Bad(path, f"expected a list, got {_type_name(value)} {_short(value)}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_value(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise _Bad(path, f"expected {len(args)} numbers, got {len(value)}")
    return tuple(_value(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value,
                                                                                strict=True)))


def _parse(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, Mapping):
        raise _Bad(path, f"expected an object, got {_type_name(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if cls is Fault:
        kind = data.get("kind")
        if kind not in FAULT_KINDS:
            raise _Bad(_join(path, "kind"), f"unknown fault kind {_short(kind)} "
                       f"(known: {', '.join(FAULT_KINDS)})")
        names = {"kind", "after_acquisitions", *FAULT_KINDS[kind]}
    for key in data:
        if key not in names:
            hint = f" for fault kind {data['kind']!r}" if cls is Fault else ""
            raise _Bad(_join(path, str(key)), f"unknown key{hint}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for key in required:
        if key not in data:
            raise _Bad(_join(path, key), "missing")
    return cls(**{k: _value(hints[k], v, _join(path, k)) for k, v in data.items()})


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _validate(s: Scenario) -> None:
    """Physical checks; raise :class:`_Bad` at the first violation."""
    positive = [("b0_tesla", s.b0_tesla), ("z_min_nm", s.z_min_nm),
                ("nv.depth_nm", s.nv.depth_nm), ("nv.t2_star_us", s.nv.t2_star_us),
                ("nv.t2_us", s.nv.t2_us), ("nv.t2_exponent", s.nv.t2_exponent),
                ("nv.photons_per_shot", s.nv.photons_per_shot),
                ("tip.radius_nm", s.tip.radius_nm), ("tip.moment_am2", s.tip.moment_am2),
                ("dark_spins.t2_star_ns", s.dark_spins.t2_star_ns),
                ("stage.velocity_nm_per_s", s.stage.velocity_nm_per_s)]
    positive += [(f"dark_spins.layers[{i}].radius_nm", layer.radius_nm)
                 for i, layer in enumerate(s.dark_spins.layers)]
    for path, value in positive:
        if value <= 0:
            raise _Bad(path, f"must be > 0, got {_short(value)}")
        if path in UPPER_BOUNDS and value > UPPER_BOUNDS[path]:
            raise _Bad(path, f"must be <= {UPPER_BOUNDS[path]:g}, got {_short(value)}")
    spins = len(s.dark_spins.points) + sum(
        layer.density_per_nm2 * math.pi * layer.radius_nm**2 for layer in s.dark_spins.layers)
    if spins > MAX_SPINS:
        raise _Bad("dark_spins", f"{spins:.3g} spins; the simulator takes at most {MAX_SPINS}")
    if not 0 < s.nv.contrast < 1:
        raise _Bad("nv.contrast", f"must be between 0 and 1, got {_short(s.nv.contrast)}")
    if s.seed < 0:
        raise _Bad("seed", f"must be >= 0, got {_short(s.seed)}")
    nv = np.array([0.0, 0.0, -s.nv.depth_nm])
    for i, p in enumerate(s.dark_spins.points):
        if p.z_nm > 0:
            raise _Bad(f"dark_spins.points[{i}].z_nm",
                       f"{_short(p.z_nm)} is above the surface (dark spins need z_nm <= 0)")
        if np.linalg.norm(np.array([p.x_nm, p.y_nm, p.z_nm]) - nv) < 0.5:
            raise _Bad(f"dark_spins.points[{i}]", "is within 0.5 nm of the NV")
    for i, layer in enumerate(s.dark_spins.layers):
        at = f"dark_spins.layers[{i}]"
        if layer.z_nm > 0:
            raise _Bad(f"{at}.z_nm",
                       f"{_short(layer.z_nm)} is above the surface (dark spins need z_nm <= 0)")
        if layer.density_per_nm2 < 0:
            raise _Bad(f"{at}.density_per_nm2",
                       f"must be >= 0, got {_short(layer.density_per_nm2)}")
        if abs(layer.z_nm - nv[2]) < 0.5:
            raise _Bad(f"{at}.z_nm", "is within 0.5 nm of the NV depth")
    st = s.stage
    for key, (lo, hi) in (("x_range_nm", st.x_range_nm), ("y_range_nm", st.y_range_nm)):
        if not lo < hi:
            raise _Bad(f"stage.{key}", f"needs low < high, got [{_short(lo)}, {_short(hi)}]")
    if not st.z_max_nm > s.z_min_nm:
        raise _Bad("stage.z_max_nm", f"must exceed z_min_nm ({_short(s.z_min_nm)}), got "
                   f"{_short(st.z_max_nm)}")
    x, y, z = st.start_nm
    if not (st.x_range_nm[0] <= x <= st.x_range_nm[1]
            and st.y_range_nm[0] <= y <= st.y_range_nm[1] and s.z_min_nm <= z <= st.z_max_nm):
        raise _Bad("stage.start_nm", f"{_short(list(st.start_nm))} is outside the stage travel")
    for i, f in enumerate(s.faults):
        at = f"faults[{i}]"
        if f.after_acquisitions < 0:
            raise _Bad(f"{at}.after_acquisitions", f"must be >= 0, got {f.after_acquisitions}")
        if f.count < 1:
            raise _Bad(f"{at}.count", f"must be >= 1, got {f.count}")
        if f.seconds < 0:
            raise _Bad(f"{at}.seconds", f"must be >= 0, got {f.seconds}")


# ---------------------------------------------------------------- loading

def _builtin_dir():
    return resources.files("nvmri_bluesky.sim").joinpath("scenarios")


def list_scenarios() -> list[str]:
    """Names of the built-in scenarios (``default`` is an alias of ``paper-fig4``)."""
    names = [p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".json")]
    return sorted([*names, *_ALIASES])


def _read(path: Path) -> Any:
    """The parsed document of a scenario file, within the size, alias and value limits."""
    text = _read_text(path)
    try:
        data = _parse_yaml(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except json.JSONDecodeError as exc:
        raise NvmriError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise NvmriError(f"{path}: nested too deeply to be a scenario") from None
    except _TooBig as exc:
        raise NvmriError(f"{path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - yaml.YAMLError and its kin: one line
        reason = " ".join(str(exc).split())[:300]
        raise NvmriError(f"{path}: not valid YAML: {reason}") from None
    try:
        _count_values(data, [MAX_VALUES])
    except RecursionError:
        raise NvmriError(f"{path}: nested too deeply to be a scenario") from None
    except _TooBig as exc:
        raise NvmriError(f"{path}: {exc}") from None
    return data


class _TooBig(Exception):
    """A scenario document beyond the limits."""


def _read_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise NvmriError(f"{path}: {size} bytes; a scenario file has at most "
                             f"{MAX_FILE_BYTES}")
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise NvmriError(f"cannot read scenario file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise NvmriError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def _parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` with at most :data:`MAX_ALIASES` aliases."""
    import yaml

    class Loader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                Loader.aliases += 1
                if Loader.aliases > MAX_ALIASES:
                    raise _TooBig(f"more than {MAX_ALIASES} YAML aliases")
            return super().compose_node(parent, index)

    loader = Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _count_values(data: Any, budget: list[int]) -> None:
    """Count the values of ``data`` as if aliases were copies; raise past the budget."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooBig(f"more than {MAX_VALUES} values (YAML aliases expanding?)")
    if isinstance(data, Mapping):
        for key, value in data.items():
            _count_values(key, budget)
            _count_values(value, budget)
    elif isinstance(data, list | tuple):
        for value in data:
            _count_values(value, budget)


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
        data, source = _read(path), str(path)
        default_name = path.stem
    else:
        name = _ALIASES.get(spec, spec)
        builtin = _builtin_dir().joinpath(f"{name}.json")
        if not builtin.is_file():
            raise NvmriError(f"unknown scenario {_short(spec)} (built-in: "
                             f"{', '.join(list_scenarios())}; or a .json/.yaml file)")
        data, source, default_name = json.loads(builtin.read_text()), name, name
    if isinstance(data, Mapping) and "name" not in data:
        data = {"name": default_name, **data}
    return Scenario.from_dict(data if data is not None else {}, source=source)
