"""caproto's asyncio server ``Context`` with a circuit that sends in batches.

caproto sends every monitor update with its own ``send()`` syscall, a
few event-loop passes after it was posted (the context's queue task, then
the circuit's), and a put's completion before the updates the put caused.
This circuit

- sends all subscription updates that are queued in one write (a stage
  move posts DMOV, MOVN, TDIR, RBV, MOVN, DMOV, VAL: one TCP segment
  instead of seven; the client's CA thread then wakes once);
- right after a put has been processed, dispatches the updates it posted
  itself (the same caproto calls the queue tasks make) and sends them;
- sends a put's completion (``WriteNotifyResponse``) in the same write,
  after those updates (so after a completed put the client's monitor
  cache is already fresh: counts, readbacks).

Nothing is delayed: updates that are not caused by a put (timed moves,
status changes during a timed acquisition) go out as soon as the queue
tasks see them.  (caproto's own loop either sends each update alone or,
under load, holds them up to ``CAPROTO_SERVER_HIGH_LOAD_TIMEOUT_SEC``,
10 ms, to batch them.)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import caproto as ca
from caproto.asyncio.server import Context, VirtualCircuit
from caproto.server.common import DisconnectedCircuit

__all__ = ["Circuit", "BatchingContext"]

class Circuit(VirtualCircuit):
    """A put's updates, then its completion, in one write; other updates as soon as queued."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._held: list[bytes] | None = None

    async def _send_buffers(self, *buffers):
        if self._held is not None:
            self._held.extend(buffers)
        else:
            await self.client.send(b"".join(buffers))

    async def send(self, *commands):
        if not commands:            # caproto "sends" the empty reply to every put
            return None
        if (self._held is not None or not self.connected
                or not any(isinstance(c, ca.WriteNotifyResponse) for c in commands)):
            return await super().send(*commands)
        self._held = []
        try:
            await self._settle()
            await super().send(*commands)
        finally:
            held, self._held = self._held, None
            if held:
                try:
                    await self.client.send(b"".join(held))
                except (OSError, ca.CaprotoNetworkError) as ex:
                    raise DisconnectedCircuit(f"Circuit disconnected: {ex}") from ex

    async def _start_write_task(self, handle_write):
        async def write_and_post():
            await handle_write()
            # a put without completion (a motor move): its updates go out now too
            if self.connected:
                with contextlib.suppress(DisconnectedCircuit):
                    await self._settle()

        self.tasks.create(write_and_post())

    async def _settle(self) -> None:
        """Dispatch the updates queued so far to their circuits and send this circuit's.

        Does inline what the context's and this circuit's queue loops would
        do a few event-loop passes later (same caproto calls, same order).
        """
        ctx = self.context
        for _ in range(10_000):
            if ctx.subscription_queue.empty():
                break
            await ctx._subscription_queue_iteration(*ctx.subscription_queue.get_nowait())
        if not self.subscription_queue.empty():
            await self._send_updates([self.subscription_queue.get_nowait()])

    async def _send_updates(self, refs: list) -> None:
        """Send the updates ``refs`` and every other one queued, in one write."""
        queue = self.subscription_queue
        while not queue.empty():
            refs.append(queue.get_nowait())
        commands = [c for c in (ref() for ref in refs) if c is not None]
        if not commands:            # expired (a slow client's backlog)
            return
        # never an update after its subscription was cancelled
        live = {sub.subscriptionid for subs in self.subscriptions.values() for sub in subs}
        commands = [c for c in commands if c.subscriptionid in live]
        if commands:
            await self.send(*commands)

    async def subscription_queue_loop(self):
        self.events_on.set()
        while True:
            try:
                refs = [await self.subscription_queue.get()]
            except asyncio.CancelledError:
                break
            try:
                await self._send_updates(refs)
            except DisconnectedCircuit:
                await self._on_disconnect()
                self.circuit.disconnect()
                await self.context.circuit_disconnected(self)
                break


class BatchingContext(Context):
    """caproto's asyncio server ``Context`` with :class:`Circuit` and TCP_NODELAY."""

    CircuitClass = Circuit

    async def tcp_handler(self, client, addr):
        # caproto's sockets are created with proto 0, so asyncio does not
        # set TCP_NODELAY: Nagle then holds a put's completion behind the
        # monitor update sent just before it until the client's delayed
        # ACK (up to 40 ms per put).
        sock = client.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return await super().tcp_handler(client, addr)
