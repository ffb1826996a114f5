"""The report as text: the paper's values (Figs. 2-4) beside the measured ones."""

from __future__ import annotations

from typing import Any

PAPER = {
    "gradient_gauss_per_nm": (2.4, 0.2, "G/nm"),
    "ramsey_fringe_period_nm": (0.33, 0.03, "nm"),
    "esr_slice_fwhm_nm": (0.25, None, "nm"),
    "layer height nv1": (10.0, None, "nm"),
    "layer height nv2": (14.0, None, "nm"),
    "layer density": (0.5, None, "/nm^2"),
    "layer coupling": (100.0, None, "kHz"),
    "spin dx": (4.0, 0.4, "nm"), "spin dy": (5.1, 0.3, "nm"), "spin dz": (-3.65, 0.05, "nm"),
    "snr gain": (1.9, None, ""),
    "resolution lateral": (0.8, 0.4, "nm"), "resolution vertical": (1.5, 0.6, "nm"),
}
"""The paper's values (Figs. 2-4) the table compares with: (value, sigma, unit)."""

def _fmt(q: dict | None, scale: float = 1.0) -> str:
    if not q or q.get("value") is None:
        return "n/a"
    sigma = q.get("sigma")
    return (f"{q['value'] * scale:.3g} +/- {sigma * scale:.2g}" if sigma is not None
            else f"{q['value'] * scale:.3g}")


def table(report: dict[str, Any]) -> str:
    """The paper's values beside the measured ones, as text."""
    rows = [("quantity", "paper", "measured")]

    def paper(key: str) -> str:
        v, s, unit = PAPER[key]
        return f"{v:g}{'' if s is None else f' +/- {s:g}'} {unit}"

    rows.append(("Fig.2a fringe period (nm)", paper("ramsey_fringe_period_nm"),
                 _fmt(report["ramsey_fringe_period_nm"])))
    rows.append(("Fig.2a gradient, linear Zeeman from the fringes (G/nm)",
                 paper("gradient_gauss_per_nm"), _fmt(report["gradient_gauss_per_nm"])))
    if "field_gradient_gauss_per_nm" in report:
        rows.append(("  exact gradient of B_par, both transitions (G/nm)", "-",
                     _fmt(report["field_gradient_gauss_per_nm"])))
    rows.append(("Fig.2b CW slice FWHM (nm)", paper("esr_slice_fwhm_nm"),
                 _fmt(report["esr_slice_fwhm_nm"])))
    for i, layer in enumerate(report["layers"]):
        key = "layer height nv2" if "nv2" in layer.get("sample", "") else "layer height nv1"
        rows.append((f"Fig.3 layer height above NV ({layer.get('sample', i)})", paper(key),
                     _fmt(layer["height_above_nv_nm"])))
        rows.append((f"Fig.3 layer density ({layer.get('sample', i)})", paper("layer density"),
                     _fmt(layer["density_per_nm2"])))
        if "coupling_rate_hz" in layer:
            rows.append((f"Fig.3d NV-layer coupling, rms (kHz) ({layer.get('sample', i)})",
                         paper("layer coupling"), _fmt(layer["coupling_rate_hz"], 1e-3)))
    for spin in report["spins"]:
        for axis in ("dx", "dy", "dz"):
            rows.append((f"Fig.4 spin {axis} ({spin.get('sample', '')})",
                         paper(f"spin {axis}"), _fmt(spin[f"{axis}_nm"])))
        rows.append(("Fig.4 spin coupling (kHz)", "-", _fmt(spin["coupling_hz"], 1e-3)))
    for axis in ("lateral", "vertical"):
        rows.append((f"resolution {axis} (nm)", paper(f"resolution {axis}"),
                     _fmt(report["resolution_nm"][axis])))
    if "snr_gain_quantum_over_classical" in report:
        rows.append(("Fig.4a SNR gain, quantum over classical spin", paper("snr gain"),
                     _fmt(report["snr_gain_quantum_over_classical"])))
    rows += _time_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _hours(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 3600:.2f} h ({seconds:.0f} s)"


def _time_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Instrument time (shots x program + travel) beside this run's wall time, per sample."""
    times = report.get("instrument_time_s") or {}
    walls = report.get("sample_wall_s") or {}
    rows = [(f"instrument time, {sample} (wall {walls[sample]:.0f} s)" if sample in walls
             else f"instrument time, {sample}", "-", _hours(t))
            for sample, t in (times.get("samples") or {}).items()]
    if times.get("samples"):
        wall = report.get("elapsed_s")
        rows.append(("instrument time, total" + (f" (wall {wall:.0f} s)" if wall else ""), "-",
                     _hours(times.get("total"))))
    return rows
