"""Listeners of one connection's transitions and calls, and the ``hsmfsm.transitions`` logger.

Both kinds share one contract: a listener is called with no lock of hsmfsm
held, and one that raises is logged, never propagated, so recording a
transition or a call cannot break recovery or a sign call.

Call records (:class:`~hsmfsm.core.records.CallRecord`) are made only while a
call listener is registered: with none, the call path makes no record and
reads no clock for them.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ..core.codes import Code
from ..core.errors import HSMError
from ..core.records import CallListener, CallRecord, Listener, TransitionRecord, log_fields

log = logging.getLogger("hsmfsm.transitions")
call_log = logging.getLogger("hsmfsm.calls")


class Listeners:
    """Listeners of one connection. A failing listener is logged, never propagated:
    recording a transition must not break recovery or a sign call."""

    def __init__(self) -> None:
        self._items: tuple[Listener, ...] = ()
        self._lock = threading.Lock()
        #: The pool the connection is a member of (set by the pool): its name goes into the log fields.
        self.pool: str | None = None

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
        if log.isEnabledFor(level):
            log.log(level, "%s", record, extra=log_fields(record, self.pool))
        for listener in self._items:
            try:
                listener(record)
            except Exception:
                log.exception("transition listener %r failed", listener)


class CallListeners:
    """Listeners of call records (of a connection, or of a pool). Registered and removed under a
    lock of their own; called from a tuple, in the caller's thread, with no lock held."""

    __slots__ = ("_lock", "items")

    def __init__(self) -> None:
        #: The listeners; the call path tests this tuple (cheaper than a method) to skip records.
        self.items: tuple[CallListener, ...] = ()
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.items)

    def add(self, listener: CallListener) -> bool:
        """Add ``listener``; True if it is the first."""
        with self._lock:
            first = not self.items
            self.items = (*self.items, listener)
        return first

    def remove(self, listener: CallListener) -> None:
        with self._lock:
            self.items = tuple(x for x in self.items if x is not listener)

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    def emit(self, record: CallRecord) -> None:
        for listener in self.items:
            try:
                listener(record)
            except Exception:
                call_log.exception("call listener %r failed", listener)


def outcome_of(exc: BaseException) -> tuple[str, Code | None]:
    """A failed call's outcome (its error class's name) and return code."""
    return type(exc).__name__, exc.code if isinstance(exc, HSMError) else None


class Attempts:
    """The attempts of one call on one connection, while call listeners are registered.

    An attempt runs from the call's start (or the end of the attempt before) to the moment
    the connection knows its outcome; :meth:`end` emits its record, in the caller's thread.
    """

    __slots__ = ("clock", "count", "listeners", "mark", "member", "op")

    def __init__(self, listeners: CallListeners, clock: Any, member: str, op: str) -> None:
        self.listeners, self.clock, self.member, self.op = listeners, clock, member, op
        self.mark: float = clock.monotonic()
        self.count = 0

    def end(self, outcome: str, code: Code | None) -> None:
        now = self.clock.monotonic()
        seconds, self.mark = now - self.mark, now
        self.count += 1
        self.listeners.emit(CallRecord(self.clock.time() - seconds, None, self.member, self.op, outcome,
                                       code.name if code else None, code.value if code else None, seconds,
                                       self.count, self.count > 1))

    def failed(self, exc: BaseException) -> None:
        self.end(*outcome_of(exc))


class PoolCall:
    """One call of a pool, while call listeners are registered: the attempts it made and the
    member that took the last one. Kept per thread (:func:`current_pool_call`), so that the
    pool can number its members' attempt records within the call they belong to."""

    __slots__ = ("attempts", "member", "op", "pool", "started")

    def __init__(self, pool: object, op: str, started: float) -> None:
        self.pool, self.op, self.started = pool, op, started
        self.attempts = 0
        self.member: str | None = None


_local = threading.local()


def push_pool_call(call: PoolCall) -> None:
    stack: list[PoolCall] | None = getattr(_local, "calls", None)
    if stack is None:
        stack = _local.calls = []
    stack.append(call)


def pop_pool_call(call: PoolCall) -> None:
    stack: list[PoolCall] = _local.calls
    stack.remove(call)


def current_pool_call(pool: object) -> PoolCall | None:
    """The innermost call of ``pool`` this thread is making, if any."""
    stack: list[PoolCall] = getattr(_local, "calls", [])
    for call in reversed(stack):
        if call.pool is pool:
            return call
    return None
