"""One thread per process that notices PKCS#11 calls overrunning their timeout.

Handing every call to a worker thread to enforce a timeout costs tens of
microseconds on a ~45 us sign (docs/FACTS.md). Instead the caller stays in its own
thread and only writes the monotonic time it started into its call slot; this
watchdog looks at the slots a few times per timeout and acts on the ones that
overran (``SlotConnection._overran``: cut the member's socket, leave
``logged_in``). The hot path pays two attribute writes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Protocol

log = logging.getLogger("hsmfsm.watchdog")


class Watched(Protocol):
    def _watchdog_tick(self, now: float) -> None: ...


class Watchdog:
    """Calls ``_watchdog_tick(now)`` on every registered connection every ``period`` seconds."""

    def __init__(self, period: float = 0.02) -> None:
        self.period = period
        self._members: weakref.WeakSet[Watched] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def register(self, member: Watched) -> None:
        with self._lock:
            self._members.add(member)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="hsmfsm-watchdog", daemon=True)
                self._thread.start()

    def unregister(self, member: Watched) -> None:
        with self._lock:
            self._members.discard(member)

    def _run(self) -> None:
        while True:
            time.sleep(self.period)
            with self._lock:
                members = list(self._members)
            now = time.monotonic()
            for member in members:
                try:
                    member._watchdog_tick(now)
                except Exception:
                    log.exception("watchdog tick failed for %r", member)


    def _after_fork_in_child(self) -> None:
        """The watchdog thread does not exist in a forked child, and it may have held the lock
        at the fork: a fresh lock, and the next :meth:`register` starts a thread of the child's own."""
        self._lock = threading.Lock()
        self._thread = None


WATCHDOG = Watchdog()
os.register_at_fork(after_in_child=WATCHDOG._after_fork_in_child)
