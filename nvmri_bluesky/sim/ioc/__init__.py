"""The simulated instrument as one caproto (asyncio) IOC on 127.0.0.1.

``python -m nvmri_bluesky.sim.ioc --scenario NAME|FILE --prefix P --time-scale S --port N``
serves the PVs of ``docs/architecture.md`` over one :class:`~.engine.Engine`:

- ``STAGE:X``, ``STAGE:Y``, ``STAGE:Z``: motor records (nm) that ``ophyd.EpicsMotor``
  drives.  A put to ``.VAL`` posts DMOV 0, the new RBV, then DMOV 1 (even for an
  instant move); with a time scale S > 0 the move takes S * distance / VELO
  wall seconds.  ``.VAL``'s control limits are ``.LLM``/``.HLM`` (ophyd refuses
  out-of-range moves client-side); the IOC refuses them too (the put fails and
  nothing moves), and ``STAGE:Z.LLM`` cannot go below the scenario's z_min.
- ``MW:`` and ``RF:``: ``FREQ``, ``POWER``, ``OUTPUT`` with ``_RBV`` readbacks.
- ``PG:PROGRAM`` (JSON, validated on put: a bad program is refused, with the
  reason in ``PG:MESSAGE`` and ``PG:STATUS`` = Error), ``PG:GATES``,
  ``PG:SHOTS``, ``PG:STATUS``, ``PG:MESSAGE``, ``PG:ACQUIRE`` (put 1 with
  completion: the counts are on the wire before the put completes).
- ``CNT:COUNTS``, ``CNT:ACQ_ID``; ``HEALTH:LASER_OK``, ``HEALTH:STAGE_OK``.

On startup the process prints ``NVMRI IOC ready prefix=<P> port=<N> pvs=<n>``
on stdout.

Modules: :mod:`~.instrument` (:class:`NvmriIOC`, the root PV group: pulser,
counter, health), :mod:`~.motor` (a stage axis as a motor record),
:mod:`~.source` (MW/RF generators), :mod:`~.records` (what the groups share),
:mod:`~.autosave`, :mod:`~.circuit` (the batching caproto circuit) and
:mod:`~.server` (:func:`serve`, the command line).
"""

from nvmri_bluesky.sim.engine import MAX_SHOTS
from nvmri_bluesky.sim.ioc.autosave import Autosave
from nvmri_bluesky.sim.ioc.instrument import (
    MAX_GATES,
    MAX_PROGRAM_CHARS,
    NvmriIOC,
    program_checksum,
)
from nvmri_bluesky.sim.ioc.motor import VELOCITY_RANGE_NM_PER_S
from nvmri_bluesky.sim.ioc.server import (
    add_arguments,
    main,
    make_ioc,
    pv_names,
    run_from_args,
    serve,
)

__all__ = ["NvmriIOC", "Autosave", "make_ioc", "serve", "main", "pv_names",
           "program_checksum", "MAX_PROGRAM_CHARS", "MAX_GATES", "MAX_SHOTS",
           "VELOCITY_RANGE_NM_PER_S", "add_arguments", "run_from_args"]
