"""Listeners of one connection's transitions, and the ``hsmfsm.transitions`` logger."""

from __future__ import annotations

import logging
import threading

from ..core.records import Listener, TransitionRecord

log = logging.getLogger("hsmfsm.transitions")

class Listeners:
    """Listeners of one connection. A failing listener is logged, never propagated:
    recording a transition must not break recovery or a sign call."""

    def __init__(self) -> None:
        self._items: tuple[Listener, ...] = ()
        self._lock = threading.Lock()

    def add(self, listener: Listener) -> None:
        with self._lock:
            self._items = (*self._items, listener)

    def remove(self, listener: Listener) -> None:
        with self._lock:
            self._items = tuple(x for x in self._items if x is not listener)

    def after_fork_in_child(self) -> None:
        """Another thread may have held the lock at the fork."""
        self._lock = threading.Lock()

    def emit(self, record: TransitionRecord) -> None:
        level = logging.WARNING if record.dest in ("disconnected", "failed") and record.event != "close" \
            else logging.INFO
        log.log(level, "%s", record)
        for listener in self._items:
            try:
                listener(record)
            except Exception:
                log.exception("transition listener %r failed", listener)
