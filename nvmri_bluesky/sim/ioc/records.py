"""What the PV groups share: refusals that raise no alarm, fields that post changes only."""

from __future__ import annotations

from caproto import AlarmSeverity, AlarmStatus, ChannelAlarm

__all__ = ["NoWriteAlarm", "post"]


class NoWriteAlarm(ChannelAlarm):
    """A PV's alarm that a refused put does not raise.

    caproto puts a record in WRITE/MAJOR alarm whenever a putter refuses a
    value, and leaves it there: the next ophyd move of a motor whose ``.LLM``
    put was refused then fails with "in an alarm state".  A refusal here fails
    the put and changes nothing, as an EPICS record's does.
    """

    async def write(self, *, status=None, severity=None, **kwargs):
        if status == AlarmStatus.WRITE and severity == AlarmSeverity.MAJOR_ALARM:
            return None
        return await super().write(status=status, severity=severity, **kwargs)


async def post(channel, value) -> None:
    """Write an IOC-owned field and post it to monitors, only if its value changes.

    (As a record posts a field only when it changed.)  The value comes from
    the IOC itself, so the put-side checks (limits, putter) are skipped.
    """
    if channel.value != value:
        await channel.write(value, verify_value=False)
