"""The discrete-event core: a heap of (virtual_time, seq) entries and nothing else.

Every action in the simulated network (a delivery, a detection, a driver's timer) is one
entry. ``seq`` comes from one global counter, so two entries due at the same instant run in
the order they were scheduled: together with a seeded rng this makes a run a pure
function of its inputs (same seed, same calls -> same event order, bit for bit).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from p2pfl.errors import LocalProtocolError


@dataclass(slots=True, eq=False)
class TimerHandle:
    """What ``call_at`` returns; pass it to ``cancel``. Cancelling a fired timer is a no-op."""

    when: float
    cancelled: bool = False


class EventLoop:
    """Virtual time and the event heap. ``SimHub`` builds the network on top of it."""

    def __init__(self) -> None:
        self._now = 0.0
        self._seq = 0
        # (time, seq, fn, args): seq is unique, so fn/args are never compared.
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self.events_processed = 0

    @property
    def now(self) -> float:
        """Virtual seconds since the hub was made."""
        return self._now

    def _push(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        # Internal scheduling: `when` is never in the past (callers add delays to now).
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, fn, args))

    def reserve_seq(self) -> int:
        """Take the next sequence number now, for an entry pushed later with `call_at(seq=)`.

        A job that runs elsewhere (p2pfl.sim.io) reserves its place in the order when it is
        submitted, so its outcome lands where a job run on the spot would have put it."""
        self._seq += 1
        return self._seq

    def call_at(
        self, when: float, callback: Callable[[], None], *, seq: int | None = None
    ) -> TimerHandle:
        """Run ``callback()`` at virtual time ``when`` (a past time means now).

        ``seq`` (from `reserve_seq`) orders it among entries due at the same instant as if
        it had been scheduled when the number was reserved."""
        if math.isnan(when):
            raise LocalProtocolError("call_at: when is NaN")
        when = max(when, self._now)
        handle = TimerHandle(when)
        if seq is None:
            self._push(when, _fire, handle, callback)
        else:
            if not 0 < seq <= self._seq:
                raise LocalProtocolError(f"call_at: seq {seq} was never reserved")
            heapq.heappush(self._heap, (when, seq, _fire, (handle, callback)))
        return handle

    def call_soon(self, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback()`` at the current time, after everything already due now."""
        return self.call_at(self._now, callback)

    def cancel(self, handle: TimerHandle) -> None:
        handle.cancelled = True

    def run(
        self,
        until: float | None = None,
        stop: Callable[[], bool] | None = None,
        max_events: int | None = None,
    ) -> str:
        """Process events in (time, seq) order.

        Returns ``"stop"`` as soon as ``stop()`` is true (checked before the first event and
        after each), ``"max_events"`` after that many events, ``"until"`` when the next event
        lies beyond ``until`` (time is then advanced to ``until``), or ``"idle"`` when the
        heap is empty (time advances to ``until`` if one was given: time passes even when
        nothing happens). Exceptions raised by sinks and callbacks propagate: a bug must
        not be hidden.
        """
        if stop is not None and stop():
            return "stop"
        heap = self._heap
        pop = heapq.heappop
        done = 0
        while heap:
            if until is not None and heap[0][0] > until:
                self._now = max(self._now, until)
                return "until"
            when, _, fn, args = pop(heap)
            self._now = when
            self.events_processed += 1
            fn(*args)
            if stop is not None and stop():
                return "stop"
            done += 1
            if max_events is not None and done >= max_events:
                return "max_events"
        if until is not None:
            self._now = max(self._now, until)
        return "idle"

    def pending(self) -> int:
        """Entries still on the heap (cancelled timers included)."""
        return len(self._heap)


def _fire(handle: TimerHandle, callback: Callable[[], None]) -> None:
    if not handle.cancelled:
        handle.cancelled = True  # a handle fires at most once
        callback()
