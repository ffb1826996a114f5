"""The pulse generator: the loaded pulse program, shots per gate, gate names, status.

``PG:PROGRAM`` holds the program as JSON (``docs/architecture.md``); the IOC
validates it on the put and says why in ``PG:MESSAGE`` ("OK" when loaded).
:meth:`Pulser.set` (for plans: ``yield from bps.mv(pulser, program)``) and
:meth:`Pulser.load` (blocking, for an IPython session) put it with
completion and fail with :class:`NvmriError` carrying that message if the IOC
refused it.

The pulser confirms that the IOC loaded the very program sent: the IOC posts
the SHA-256 of the loaded JSON text in ``PG:CHECKSUM``, and a load whose
checksum differs (refused, cut, or never applied) fails.  ``shots`` is a
:class:`~nvmri_bluesky.devices.setpoints.VerifiedSetpoint`: a refused value
(0, -1, 2**31) fails the ``set()`` with the IOC's ``PG:MESSAGE``.

``program``, ``gates``, ``shots`` and ``message`` are not monitored: each read
is a CA get, so it is fresh right after a put completes (``bps.rd(pulser.
message)`` after ``bps.abs_set(pulser.program, ..., wait=True)`` sees the
verdict on that program).  The acquisition itself is the counter's trigger.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from typing import Any

from ophyd import Component as Cpt
from ophyd import Device
from ophyd.status import Status

from nvmri_bluesky.devices.ca_plumbing import lost_connection, put_checked, watch_disconnect
from nvmri_bluesky.devices.setpoints import VerifiedSetpoint
from nvmri_bluesky.devices.signals import EpicsSignalROU, EpicsSignalU
from nvmri_bluesky.errors import NvmriError

__all__ = ["Pulser", "program_json"]

_ACCEPTED = ("OK", "")


def program_json(program: Any) -> str:
    """The JSON text of a pulse program given as a Program, a dict or JSON text."""
    if hasattr(program, "to_json"):
        return str(program.to_json())
    if isinstance(program, Mapping):
        return json.dumps(program, separators=(",", ":"))
    if isinstance(program, bytes | bytearray):
        return program.decode()
    if isinstance(program, str):
        return program
    raise NvmriError(f"a pulse program must be a Program, a dict or JSON text, "
                     f"got {type(program).__name__}")


class Pulser(Device):
    """Pulse generator ``<prefix>PROGRAM``, ``SHOTS``, ``GATES``, ``STATUS``, ``MESSAGE``.

    Build it as ``Pulser("NVMRI:PG:", name="pulser")``.  ``set(program)``
    loads a program (a plan's ``mv``); ``shots`` is set with ``mv`` too.
    """

    program = Cpt(EpicsSignalU, "PROGRAM", string=True, put_complete=True, kind="config",
                  units="")
    gates = Cpt(EpicsSignalROU, "GATES", string=True, kind="config", units="")
    shots = Cpt(VerifiedSetpoint, "SHOTS", kind="config", units="shots", limits=True,
                reason_attr="message")
    state = Cpt(EpicsSignalROU, "STATUS", string=True, auto_monitor=True, kind="omitted",
                 units="")
    message = Cpt(EpicsSignalROU, "MESSAGE", string=True, kind="omitted", units="")
    checksum = Cpt(EpicsSignalROU, "CHECKSUM", string=True, kind="omitted", units="")

    def set(self, program: Any, *, timeout: float | None = 10.0) -> Status:
        """Load ``program`` (Program, dict or JSON); the status fails if the IOC refuses it.

        Parameters
        ----------
        program : Program, dict or str
            The pulse program.
        timeout : float, optional
            Longest wait for the IOC, s.

        Returns
        -------
        Status
            Finished when the IOC accepted the program and ``PG:CHECKSUM``
            is the checksum of the text sent; failed with :class:`NvmriError`
            ``pulser refused program '<name>': <PG:MESSAGE>`` otherwise.

        Raises
        ------
        NvmriError
            The program does not fit ``PG:PROGRAM`` (nothing is sent), or the
            pulser is not connected.
        """
        text = program_json(program)
        name = _program_name(program, text)
        self._check_fits(name, text)
        expected = hashlib.sha256(text.encode("utf-8")).hexdigest()
        status = Status(self, timeout=timeout)
        watch_disconnect(self.program, status, "loading the pulse program")

        def verdict() -> None:
            try:
                message = str(self.message.get(use_monitor=False)).strip()
                loaded = str(self.checksum.get(use_monitor=False)).strip()
            except Exception as exc:  # noqa: BLE001 - report any CA failure on the status
                status.set_exception(NvmriError(f"pulser: cannot read {self.message.pvname} "
                                                f"after loading {name!r}: {exc}"))
                return
            if message in _ACCEPTED and loaded == expected:
                status.set_finished()
                return
            reason = message
            for lead in ("program refused:", "refused:"):
                if reason.lower().startswith(lead):
                    reason = reason[len(lead):].strip()
                    break
            if message in _ACCEPTED:
                reason = (f"the IOC did not load it ({self.checksum.pvname} is not the checksum "
                          "of the program sent)")
            status.set_exception(NvmriError(f"pulser refused program {name!r}: {reason}"))

        def on_put(**_: Any) -> None:
            # a CA get must not run on the put-callback thread: hand it over
            threading.Thread(target=verdict, name="pulser-verdict", daemon=True).start()

        if not self.connected:
            raise lost_connection(self.program.pvname, "loading the pulse program")
        put_checked(self.program, status, "loading the pulse program", text,
                    use_complete=True, callback=on_put)
        return status

    def _check_fits(self, name: str, text: str) -> None:
        """Refuse a program longer than ``PG:PROGRAM`` holds (the IOC would get it cut)."""
        capacity = getattr(getattr(self.program, "_write_pv", None), "nelm", None)
        size = len(text.encode("utf-8"))
        if isinstance(capacity, int) and capacity > 1 and size >= capacity:
            raise NvmriError(f"pulser: program {name!r} has {size} characters of JSON; "
                             f"{self.program.pvname} holds fewer than {capacity}; not sent")

    def load(self, program: Any, timeout: float = 10.0) -> list[str]:
        """Load ``program`` and wait; return the gate names in count order.

        Raises
        ------
        NvmriError
            With the IOC's ``PG:MESSAGE`` if it refused the program.
        """
        status = self.set(program, timeout=timeout)
        try:
            status.wait()
        except NvmriError:
            raise
        except Exception as exc:
            cause = status.exception() or exc
            if isinstance(cause, NvmriError):
                raise cause from None
            raise NvmriError(f"pulser: loading the program failed: {cause}") from None
        return self.gate_names()

    def gate_names(self) -> list[str]:
        """Gate names of the loaded program, in count order (``PG:GATES``)."""
        text = str(self.gates.get(use_monitor=False) or "").strip()
        if not text:
            return []
        try:
            names = json.loads(text)
        except json.JSONDecodeError:
            raise NvmriError(f"pulser: {self.gates.pvname} is not a JSON list: {text!r}") from None
        return [str(n) for n in names]


def _program_name(program: Any, text: str) -> str:
    name = getattr(program, "name", None)
    if isinstance(name, str):
        return name
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return "<not JSON>"
    return str(data.get("name", "program")) if isinstance(data, dict) else "<not an object>"
