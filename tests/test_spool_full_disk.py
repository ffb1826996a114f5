"""The spool on a full disk (a 64 KiB tmpfs): reported once, the gap recorded, no leak.

A unit test of the spool (``SpoolWriter``): the documents come from a RunEngine
scanning ophyd's simulated detector.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from bluesky import RunEngine
from bluesky import plan_stubs as bps
from bluesky.plans import scan
from ophyd.sim import det, motor

from nvmri_bluesky.catalog import import_spool
from nvmri_bluesky.catalog._spool import SpoolWriter, read_spool, spool_gaps


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (we are root in the test machine); skipped where mounting is refused."""
    where = tmp_path / "disk"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte; return the filler file."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh:
        block = b"x" * 4096
        try:
            while True:
                fh.write(block)
        except OSError:
            pass
        try:
            while True:
                fh.write(b"x")
        except OSError:
            pass
    return filler


def _open_fds(path: Path) -> list[str]:
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(path)):
                fds.append(fd)
        except OSError:
            pass
    return fds


def _scan(RE: RunEngine, n: int, actions: dict[int, object]) -> str:
    steps = []

    def per_step(detectors, step, pos_cache):
        steps.append(step)
        if len(steps) in actions:
            actions[len(steps)]()
        yield from bps.one_nd_step(detectors, step, pos_cache)

    (uid,) = RE(scan([det], motor, 0, 1, n, per_step=per_step))
    return uid


def test_a_full_disk_is_reported_once_the_gap_recorded_and_import_names_it(
        small_disk: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    RE = RunEngine({})
    spool = SpoolWriter(small_disk / "spool")
    RE.subscribe(spool)
    filler: list[Path] = []
    caplog.set_level(logging.ERROR, logger="nvmri_bluesky.catalog._spool")
    uid = _scan(RE, 60, {10: lambda: filler.append(_fill(small_disk)),
                         40: lambda: filler[0].unlink()})
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]
    assert "No space left on device" in caplog.records[0].getMessage()
    docs = list(read_spool(spool.paths[uid]))
    seqs = [d["seq_num"] for n, d in docs if n == "event"]
    missing = sorted(set(range(1, 61)) - set(seqs))
    assert missing and all(11 <= m <= 41 for m in missing)    # while the disk was full
    # every missing event in a recorded gap: usually one; more when a short line fitted
    # into the spool file's last page between failures
    gaps = spool_gaps(spool.paths[uid])
    covered = []
    for gap in gaps:
        spans = re.fullmatch(r"primary events ([0-9, -]+) not spooled \(No space left on "
                             r"device\)", gap)
        assert spans, gap
        for span in spans.group(1).split(", "):
            first, _, last = span.partition("-")
            covered += range(int(first), int(last or first) + 1)
    assert sorted(covered) == missing
    assert all(gap in docs[-1][1]["reason"] for gap in gaps) and docs[-1][0] == "stop"
    assert not _open_fds(small_disk)
    (result,) = import_spool(spool.paths[uid], tmp_path / "cat")
    assert result.action == "imported" and result.events == 60 - len(missing)
    assert result.detail == "; ".join(f"missing: {gap}" for gap in gaps)


def test_a_stop_that_cannot_be_written_leaks_nothing_and_the_next_run_spools(
        small_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    RE = RunEngine({})
    spool = SpoolWriter(small_disk / "spool")
    RE.subscribe(spool)
    caplog.set_level(logging.ERROR, logger="nvmri_bluesky.catalog._spool")
    filler: list[Path] = []
    first = _scan(RE, 20, {5: lambda: filler.append(_fill(small_disk))})
    assert not _open_fds(small_disk)                  # closed although the stop failed
    assert len(caplog.records) == 2                   # the first failure, then the lost stop
    assert "the stop document was not spooled" in caplog.records[1].getMessage()
    filler[0].unlink()
    second = _scan(RE, 5, {})
    docs = list(read_spool(spool.paths[second]))
    assert [n for n, _ in docs].count("event") == 5 and docs[-1][0] == "stop"
    assert spool.paths[first] != spool.paths[second]
    assert not _open_fds(small_disk)


def test_a_run_with_two_gaps_is_logged_once_and_both_are_recorded(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk full twice in one run (as when a short line fits into the file's last
    page between failures): one log line, two gap records."""
    from nvmri_bluesky.catalog._spool import _SpoolFile

    RE = RunEngine({})
    spool = SpoolWriter(tmp_path / "spool")
    RE.subscribe(spool)
    caplog.set_level(logging.ERROR, logger="nvmri_bluesky.catalog._spool")
    full = [False]
    write = _SpoolFile.write_line

    def write_line(self: _SpoolFile, line: str) -> None:
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, line)

    monkeypatch.setattr(_SpoolFile, "write_line", write_line)
    actions = {n: (lambda on=on: full.__setitem__(0, on))
               for n, on in ((5, True), (8, False), (12, True), (15, False))}
    uid = _scan(RE, 20, actions)
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]
    gaps = spool_gaps(spool.paths[uid])
    assert len(gaps) == 2 and all("No space left on device" in g for g in gaps), gaps
