"""The real clock: ``time`` and ``threading``, behind the :class:`~hsmfsm.runtime.edge.Clock` shape.

Nothing here adds a layer on the hot path: the connection reads
``clock.monotonic`` once into an attribute (it is ``time.monotonic`` itself),
and the locks it makes are plain ``threading`` locks.
"""

from __future__ import annotations

import random as _random
import threading
import time as _time
from collections.abc import Callable

from .edge import Condition, Lock, Signal, Thread


class SystemClock:
    """Wall time, monotonic time, real threads and locks."""

    monotonic = staticmethod(_time.monotonic)
    time = staticmethod(_time.time)
    sleep = staticmethod(_time.sleep)
    random = staticmethod(_random.random)

    def lock(self) -> Lock:
        return threading.Lock()

    def condition(self, lock: Lock) -> Condition:
        return threading.Condition(lock)  # type: ignore[arg-type]  # any lock of ours is a threading lock

    def signal(self) -> Signal:
        return threading.Event()

    def start_thread(self, target: Callable[[], None], name: str) -> Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        return thread

    def __repr__(self) -> str:
        return "<SystemClock>"


#: The clock every connection uses unless given another.
SYSTEM = SystemClock()
