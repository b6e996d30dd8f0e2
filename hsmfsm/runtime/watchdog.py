"""One thread per clock that notices PKCS#11 calls overrunning their timeout.

Handing every call to a worker thread to enforce a timeout costs tens of
microseconds on a ~45 us sign (docs/FACTS.md). Instead the caller stays in
its own thread and only writes the monotonic time it started into its call
slot; this watchdog looks at the slots a few times per timeout and acts on
the ones that overran (``SlotConnection._watchdog_tick``: cut the member's
socket, leave ``logged_in``). The hot path pays two attribute writes.

The thread runs while connections are registered and ends when the last one
unregisters (a virtual clock then has nothing left to wake every period).
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Protocol

from .clock import SYSTEM
from .edge import Clock

log = logging.getLogger("hsmfsm.watchdog")


class Watched(Protocol):
    def _watchdog_tick(self, now: float) -> None: ...


class Watchdog:
    """Calls ``_watchdog_tick(now)`` on every registered connection every ``period`` seconds."""

    def __init__(self, clock: Clock = SYSTEM, period: float = 0.02) -> None:
        self.clock = clock
        self.period = period
        #: Registered connections, in registration order (weakly: a dropped connection leaves),
        #: so that on a virtual clock two overruns in one tick are handled in the same order every run.
        self._members: dict[int, weakref.ref[Any]] = {}
        self._lock = clock.lock()
        self._running = False

    def register(self, member: Watched) -> None:
        with self._lock:
            self._members.setdefault(id(member), weakref.ref(member))
            start = not self._running
            self._running = True
        if start:
            self.clock.start_thread(self._run, "hsmfsm-watchdog")

    def unregister(self, member: Watched) -> None:
        with self._lock:
            ref = self._members.get(id(member))
            if ref is not None and ref() is member:
                del self._members[id(member)]

    def _run(self) -> None:
        while True:
            self.clock.sleep(self.period)
            with self._lock:
                members = [m for m in (ref() for ref in self._members.values()) if m is not None]
                self._members = {k: r for k, r in self._members.items() if r() is not None}
                if not members:
                    self._running = False
                    return
            now = self.clock.monotonic()
            for member in members:
                try:
                    member._watchdog_tick(now)
                except Exception:  # a watchdog must outlive any one member's bug
                    log.exception("watchdog tick failed for %r", member)

    def _after_fork_in_child(self) -> None:
        """The watchdog thread does not exist in a forked child, and it may have held the lock
        at the fork: a fresh lock, and the next :meth:`register` starts a thread of the child's own."""
        self._lock = self.clock.lock()
        self._running = False


#: The watchdog of the system clock.
WATCHDOG = Watchdog()
os.register_at_fork(after_in_child=WATCHDOG._after_fork_in_child)
_BY_CLOCK: dict[int, tuple[Clock, Watchdog]] = {}


def watchdog_for(clock: Clock) -> Watchdog:
    """The watchdog of ``clock``: one per clock, so a virtual clock's calls are watched in virtual time."""
    if clock is SYSTEM:
        return WATCHDOG
    entry = _BY_CLOCK.get(id(clock))
    if entry is None or entry[0] is not clock:
        for key in [k for k, (c, _) in _BY_CLOCK.items() if c is not clock and getattr(c, "closed", False)]:
            del _BY_CLOCK[key]  # forget watchdogs of closed virtual clocks
        entry = _BY_CLOCK[id(clock)] = (clock, Watchdog(clock))
    return entry[1]
