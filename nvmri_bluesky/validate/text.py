"""``nvmri validate``'s table: the graded samples, the pooled numbers and the causes as text."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["table", "number_text"]



def number_text(x: float | None, fmt: str = ".0f") -> str:
    """``x`` formatted, "n/a" if None."""
    return "n/a" if x is None else format(x, fmt)


def _s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f} s"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f} %"


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def table(samples: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> str:
    """The per-sample table, the pooled numbers, the criteria and every failure's cause."""
    rows = [("seed", "kind", "result", "spins f/m/s", "layers f/m/s", "wall s", "instr s",
             "truth")]
    for s in samples:
        rows.append((str(s["seed"]), s["kind"], s["status"].upper(),
                     f"{s['spins_found']}/{s['spins_missed']}/{s['spins_spurious']}",
                     f"{s['layers_found']}/{s['layers_missed']}/{s['layers_spurious']}",
                     number_text(s.get("wall_s")), number_text(s.get("instrument_time_s")),
                     s["truth"]))
    lines = _columns(rows)
    t = summary
    lines += ["", f"samples {t['samples']}: {t['passed']} passed, "
                  f"{t['samples'] - t['passed'] - t['errors']} failed, {t['errors']} errors",
              f"spins  true {t['spins_true']}: found {t['spins_found']} "
              f"({_pct(t['spins_found_fraction'])}), missed {t['spins_missed']}, "
              f"spurious {t['spins_spurious']}",
              f"layers true {t['layers_true']}: found {t['layers_found']}, missed "
              f"{t['layers_missed']}, spurious {t['layers_spurious']}",
              f"wall time total {_s(t['wall_s']['total'])}, median "
              f"{_s(t['wall_s']['median'])} per sample; instrument time total "
              f"{_s(t['instrument_time_s']['total'])}, median "
              f"{_s(t['instrument_time_s']['median'])} per sample", ""]
    axis_rows = [("axis", "matched", "median |err| nm", "max |err| nm", "cov 1s", "cov 2s",
                  "cov 3s")]
    for axis, a in t["axes"].items():
        c = a["coverage"]
        axis_rows.append((axis, f"{a['n']} ({a['n_with_sigma']} with sigma)",
                          number_text(a["median_abs_error_nm"], ".3f"),
                          number_text(a["max_abs_error_nm"], ".3f"),
                          _pct(c["1sigma"]), _pct(c["2sigma"]), _pct(c["3sigma"])))
    lines += _columns(axis_rows) + [""]
    lines += [f"[{'x' if ok else ' '}] {name}" for name, ok in t["criteria"].items()]
    failures = [(s["seed"], s["kind"], c) for s in samples for c in s["causes"]]
    if failures:
        lines += ["", "failures:"] + [f"  seed {seed} ({kind}): {c}" for seed, kind, c in failures]
    return "\n".join(lines)
