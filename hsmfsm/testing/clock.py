"""A virtual clock: the runtime's real threads, run one at a time on virtual time.

:class:`VirtualClock` has the shape of :class:`hsmfsm.runtime.edge.Clock`, so a
``SlotConnection`` or a ``Pool`` runs on it unchanged: its supervisor, its
watchdog and its callers stay real ``threading.Thread`` objects, but they run
only while they hold a *baton*, and exactly one of them holds it at any moment.
That buys two things real threads cannot give:

* **Speed.** Time only moves when every thread waits. Then the clock jumps to
  the earliest deadline at once, so ten minutes of a 20 ms watchdog cost a few
  seconds of real time, and a test of a 30 s back-off takes milliseconds.
* **Determinism.** Who runs next is decided by rules, never by the OS: threads
  that become runnable run in FIFO order, and of the threads waiting with a
  deadline the earliest wakes first, ties broken by the order in which they
  started waiting (a sequence number, never thread identity or real timing).
  The same program and seed give the same interleaving and the same virtual
  timestamps however loaded the machine is.

The rules, in short:

* Every thread that uses the clock is a *participant*: the thread that made the
  clock, and the threads made by :meth:`VirtualClock.start_thread`. Any other
  thread that calls in gets :class:`VirtualClockError` (it would run outside
  the schedule and break determinism).
* Blocking operations pass the baton on: ``Lock.acquire`` of a held lock,
  ``Condition.wait``/``wait_for``, ``Signal.wait``, ``sleep``, ``Thread.join``,
  and the end of a thread. Everything else (``monotonic``, ``release``,
  ``notify_all``, ``set``...) runs to completion and only makes waiters
  runnable. ``sleep(0)`` lets the runnable threads go first.
* Nothing runnable and nothing with a deadline is a deadlock: the creating
  thread gets :class:`VirtualDeadlock` naming every blocked thread and what it
  waits on, and the clock closes (a deadlocked program cannot go on).
* :meth:`VirtualClock.close` makes every blocked participant raise
  :class:`VirtualClockClosed` (a ``BaseException``: ``except Exception`` in
  production code does not swallow it), so they unwind and their real threads
  end. After it, what can complete without waiting still works (taking a free
  lock, releasing) and whatever would have to wait raises. Use the clock as a
  context manager, or call ``close()`` in teardown.

A blocked participant waits on a ``threading.Condition`` of its own (never a
busy loop); the scheduler's state sits behind one real mutex, taken briefly.
"""

from __future__ import annotations

import heapq
import random
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from ..runtime.edge import Condition, Lock, Signal, Thread

__all__ = [
    "ThreadFailure", "VirtualClock", "VirtualClockClosed", "VirtualClockError", "VirtualCondition",
    "VirtualDeadlock", "VirtualLock", "VirtualSignal", "VirtualThread",
]


class VirtualClockError(RuntimeError):
    """The clock was used in a way that would break its schedule (a thread it does not know called in)."""


class VirtualDeadlock(Exception):
    """No participant can run and none waits with a deadline: time can never move again.

    Raised in the thread that created the clock; the message names every blocked
    thread and what it waits on."""


class VirtualClockClosed(BaseException):
    """The clock was closed (or deadlocked) while this thread waited on it.

    A ``BaseException`` on purpose: production code's ``except Exception`` must
    let it through, so the thread unwinds and ends."""


class ThreadFailure(NamedTuple):
    """An exception that escaped a started thread's target (kept in :attr:`VirtualClock.errors`)."""

    thread: str
    error: BaseException
    at: float


# Participant states.
_RUNNING, _READY, _BLOCKED, _FINISHED = "running", "ready", "blocked", "finished"
# Why a blocked participant woke.
_NOTIFIED, _TIMEOUT, _DEADLOCK = "notified", "timeout", "deadlock"


class _Participant:
    """A thread under the clock's control, and the real condition it sleeps on."""

    __slots__ = ("cv", "joiners", "name", "reason", "state", "token", "what")

    def __init__(self, name: str, mutex: threading.Lock) -> None:
        self.name = name
        self.cv = threading.Condition(mutex)
        self.state = _READY
        self.reason = ""
        #: The sequence number of the current wait: a timer entry or a wake-up is valid only with it.
        self.token = 0
        self.what: object = None
        self.joiners: deque[_Participant] = deque()


class VirtualClock:
    """A :class:`~hsmfsm.runtime.edge.Clock` on virtual time with a deterministic baton-passing scheduler.

    ``seed`` seeds :meth:`random`; ``start`` is the first :meth:`monotonic` value;
    ``epoch`` is the UNIX time at monotonic 0 (:meth:`time` is ``epoch + monotonic()``).
    """

    def __init__(self, seed: int = 0, start: float = 0.0, epoch: float = 1_700_000_000.0) -> None:
        self._mutex = threading.Lock()
        self._now = float(start)
        self._epoch = float(epoch)
        self._rng = random.Random(seed)
        self._ready: deque[_Participant] = deque()
        #: (deadline, sequence number, participant); stale entries are skipped (their token moved on).
        self._timers: list[tuple[float, int, _Participant]] = []
        self._seq = 0
        self._serial = 0
        self._closed = False
        self._deadlock = ""
        #: Exceptions that escaped started threads, in the order they happened.
        self.errors: list[ThreadFailure] = []
        main = _Participant(threading.current_thread().name, self._mutex)
        main.state = _RUNNING
        self._main = main
        self._running = main
        self._live: list[_Participant] = [main]
        self._by_ident: dict[int, _Participant] = {threading.get_ident(): main}
        self._threads: list[threading.Thread] = []

    # -- the Clock shape ----------------------------------------------------------

    def monotonic(self) -> float:
        self._me()
        return self._now

    def time(self) -> float:
        self._me()
        return self._epoch + self._now

    def random(self) -> float:
        self._me()
        return self._rng.random()

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of virtual time; ``sleep(0)`` lets every runnable thread go first."""
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        me = self._me()
        with self._mutex:
            if seconds > 0:
                deadline = self._now + seconds
                self._suspend(me, f"sleep (until t={deadline:.6f})", deadline, None)
            elif not self._closed:
                me.state = _READY
                self._ready.append(me)
                self._switch(me)

    def lock(self, name: str | None = None) -> VirtualLock:
        self._me()
        return VirtualLock(self, name or self._name("Lock"))

    def condition(self, lock: Lock | None = None, name: str | None = None) -> VirtualCondition:
        """A condition on ``lock``, which must be a lock of this clock (a new one if omitted)."""
        self._me()
        if lock is None:
            lock = self.lock()
        if not isinstance(lock, VirtualLock) or lock._clock is not self:
            raise TypeError(f"a VirtualClock condition needs a lock made by the same clock, not {lock!r}")
        return VirtualCondition(self, lock, name or self._name("Condition"))

    def signal(self, name: str | None = None) -> VirtualSignal:
        self._me()
        return VirtualSignal(self, name or self._name("Signal"))

    def start_thread(self, target: Callable[[], None], name: str) -> VirtualThread:
        """A real daemon thread that runs ``target`` when it gets the baton (it is queued as runnable;
        the caller goes on running)."""
        self._me()
        with self._mutex:
            if self._closed:
                raise VirtualClockClosed(f"start_thread({name!r}) on a closed VirtualClock")
            p = _Participant(name, self._mutex)
            self._ready.append(p)
            self._live.append(p)
            real = threading.Thread(target=self._bootstrap, args=(p, target), name=name, daemon=True)
            if len(self._threads) > 64:
                self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(real)
        real.start()
        return VirtualThread(self, p, real)

    # -- lifetime -----------------------------------------------------------------

    def close(self) -> None:
        """Make every blocked participant raise :class:`VirtualClockClosed`, and wait (in real time,
        a few seconds at most) for their real threads to end. Idempotent; callable from any thread."""
        with self._mutex:
            self._closed = True
            for p in self._live:
                p.cv.notify_all()
            current = threading.current_thread()
            threads = [t for t in self._threads if t is not current]
        for t in threads:
            t.join(timeout=5.0)
        with self._mutex:
            self._threads = [t for t in self._threads if t.is_alive()]

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> VirtualClock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<VirtualClock t={self._now:.6f} threads={len(self._live)}{' closed' if self._closed else ''}>"

    # -- the scheduler ------------------------------------------------------------

    def _name(self, kind: str) -> str:
        self._serial += 1  # only the baton holder creates: no race
        return f"{kind}#{self._serial}"

    def _me(self) -> _Participant:
        """The calling participant; refuses threads the clock does not schedule."""
        p = self._by_ident.get(threading.get_ident())
        if p is None:
            raise VirtualClockError(
                f"thread {threading.current_thread().name!r} is not a participant of this VirtualClock: "
                "only the thread that created it and threads made by its start_thread() may use it")
        if p is not self._running and not self._closed:
            raise VirtualClockError(f"thread {p.name!r} called the clock without holding the baton")
        return p

    def _suspend(self, me: _Participant, what: object, deadline: float | None,
                 waiters: deque[_Participant] | None) -> str:
        """(Mutex held.) Block ``me`` on ``waiters`` until woken or ``deadline``; returns why it woke.

        Whoever wakes a participant takes it off ``waiters`` itself; a timed-out one takes itself off."""
        if self._closed:
            raise VirtualClockClosed(f"{me.name}: the VirtualClock is closed")
        self._seq += 1
        me.state, me.reason, me.token, me.what = _BLOCKED, "", self._seq, what
        if waiters is not None:
            waiters.append(me)
        if deadline is not None:
            heapq.heappush(self._timers, (deadline, self._seq, me))
            if len(self._timers) > 64 + 4 * len(self._live):
                self._compact_timers()
        self._switch(me)
        reason = me.reason
        if reason != _NOTIFIED and waiters is not None:
            try:
                waiters.remove(me)
            except ValueError:
                pass
        if reason == _DEADLOCK:
            raise VirtualDeadlock(self._deadlock)
        return reason

    def _wake(self, p: _Participant) -> None:
        """(Mutex held.) A blocked participant becomes runnable (its timer, if any, goes stale)."""
        p.state, p.reason, p.token = _READY, _NOTIFIED, 0
        self._ready.append(p)

    def _switch(self, me: _Participant) -> None:
        """(Mutex held.) ``me`` gives the baton up; return when it has it again.

        ``me`` is blocked, queued as runnable (``sleep(0)``) or finished (then this returns at once)."""
        nxt = self._pick()
        nxt.state = _RUNNING
        self._running = nxt
        if nxt is me:
            return
        nxt.cv.notify()
        if me.state == _FINISHED:
            return
        while self._running is not me and not self._closed:
            me.cv.wait()
        if self._running is not me:
            raise VirtualClockClosed(f"{me.name}: the VirtualClock was closed while it waited")

    def _pick(self) -> _Participant:
        """(Mutex held.) Who runs next: the oldest runnable, else the earliest deadline (time jumps to it),
        else a deadlock, reported to the creating thread."""
        if self._ready:
            return self._ready.popleft()
        timers = self._timers
        while timers:
            deadline, seq, p = heapq.heappop(timers)
            if p.token == seq and p.state == _BLOCKED:
                if deadline > self._now:
                    self._now = deadline
                p.reason, p.token = _TIMEOUT, 0
                return p
        blocked = [f"{p.name} waits on {p.what}" for p in self._live if p.state == _BLOCKED]
        self._deadlock = (f"virtual deadlock at t={self._now:.6f}: no thread can run and none waits "
                          f"with a timeout: {'; '.join(blocked)}")
        self._closed = True
        for p in self._live:
            p.cv.notify_all()
        main = self._main
        main.reason, main.token = _DEADLOCK, 0
        return main

    def _compact_timers(self) -> None:
        self._timers = [e for e in self._timers if e[2].token == e[1] and e[2].state == _BLOCKED]
        heapq.heapify(self._timers)

    def _bootstrap(self, p: _Participant, target: Callable[[], None]) -> None:
        """The real thread's body: wait for the baton, run ``target``, record what escapes, hand on."""
        ident = threading.get_ident()
        with self._mutex:
            self._by_ident[ident] = p
            while self._running is not p and not self._closed:
                p.cv.wait()
            start = not self._closed
        try:
            if start:
                target()
        except VirtualClockClosed:
            pass
        except BaseException as exc:  # recorded, never allowed to kill the scheduler
            with self._mutex:
                self.errors.append(ThreadFailure(p.name, exc, self._now))
        finally:
            with self._mutex:
                p.state = _FINISHED
                del self._by_ident[ident]
                self._live.remove(p)
                if not self._closed:  # once closed, the joiners unwind by themselves
                    while p.joiners:
                        self._wake(p.joiners.popleft())
                    if self._running is p:
                        self._switch(p)


class VirtualLock:
    """``threading.Lock`` on the virtual clock: not re-entrant, releasable by any thread.

    A release hands the lock straight to the oldest waiter (FIFO, so no waiter
    starves and the order is deterministic); the releasing thread runs on."""

    def __init__(self, clock: VirtualClock, name: str) -> None:
        self._clock = clock
        self.name = name
        self._owner: _Participant | None = None
        self._waiters: deque[_Participant] = deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not blocking and timeout != -1:
            raise ValueError("can't specify a timeout for a non-blocking call")
        if timeout < 0 and timeout != -1:
            raise ValueError("timeout value must be a non-negative number")
        clock = self._clock
        me = clock._me()
        with clock._mutex:
            if self._owner is None:
                self._owner = me
                return True
            if not blocking or timeout == 0:
                return False
            deadline = None if timeout == -1 else clock._now + timeout
            return clock._suspend(me, self, deadline, self._waiters) == _NOTIFIED

    def release(self) -> None:
        clock = self._clock
        me = clock._me()
        with clock._mutex:
            if clock._closed:  # unwinding: never hand on, never fail a release
                if self._owner is me:
                    self._owner = None
                return
            if self._owner is None:
                raise RuntimeError("release unlocked lock")
            self._hand_on()

    def _hand_on(self) -> None:
        """(Mutex held.) Release: the oldest waiter owns the lock now, or nobody does."""
        if self._waiters:
            nxt = self._waiters.popleft()
            self._owner = nxt
            self._clock._wake(nxt)
        else:
            self._owner = None

    def locked(self) -> bool:
        return self._owner is not None

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"{self.name} (held by {self._owner.name})" if self._owner else f"{self.name} (free)"


class VirtualCondition:
    """``threading.Condition`` on a :class:`VirtualLock`: waiting releases the lock and reacquires it after."""

    def __init__(self, clock: VirtualClock, lock: VirtualLock, name: str) -> None:
        self._clock = clock
        self._lock = lock
        self.name = name
        self._waiters: deque[_Participant] = deque()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        """False if it timed out (``timeout <= 0`` returns False at once, without yielding)."""
        clock = self._clock
        me = clock._me()
        with clock._mutex:
            self._check_owned(me)
            if timeout is not None and timeout <= 0:
                return False
            return self._wait(me, None if timeout is None else clock._now + timeout)

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Like ``threading.Condition.wait_for``: the predicate's last value. One deadline for the whole
        wait, so a timeout expires at exactly ``now + timeout``."""
        clock = self._clock
        me = clock._me()
        deadline = None if timeout is None else clock._now + timeout
        result = predicate()
        while not result:
            if deadline is not None and clock._now >= deadline:
                break
            with clock._mutex:
                self._check_owned(me)
                self._wait(me, deadline)
            result = predicate()
        return result

    def _wait(self, me: _Participant, deadline: float | None) -> bool:
        """(Mutex held, lock owned.) Release, wait, reacquire (untimed, like threading)."""
        clock, lock = self._clock, self._lock
        if clock._closed:
            raise VirtualClockClosed(f"{me.name}: the VirtualClock is closed")
        lock._hand_on()
        notified = clock._suspend(me, self, deadline, self._waiters) == _NOTIFIED
        if lock._owner is None:
            lock._owner = me
        else:  # ownership is handed to us by the release
            clock._suspend(me, lock, None, lock._waiters)
        return notified

    def _check_owned(self, me: _Participant) -> None:
        if self._lock._owner is not me:
            raise RuntimeError(f"{self.name}: cannot wait on or notify with an un-acquired lock")

    def notify(self, n: int = 1) -> None:
        clock = self._clock
        me = clock._me()
        with clock._mutex:
            if clock._closed:
                return
            self._check_owned(me)
            for _ in range(min(n, len(self._waiters))):
                clock._wake(self._waiters.popleft())

    def notify_all(self) -> None:
        self.notify(len(self._waiters))

    def __repr__(self) -> str:
        return f"{self.name} (lock {self._lock!r})"


class VirtualSignal:
    """``threading.Event`` on the virtual clock (the runtime's wake-up flag)."""

    def __init__(self, clock: VirtualClock, name: str) -> None:
        self._clock = clock
        self.name = name
        self._flag = False
        self._waiters: deque[_Participant] = deque()

    def set(self) -> None:
        clock = self._clock
        clock._me()
        with clock._mutex:
            self._flag = True
            if not clock._closed:
                while self._waiters:
                    clock._wake(self._waiters.popleft())

    def clear(self) -> None:
        self._clock._me()
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout: float | None = None) -> bool:
        """True if the flag is set or got set while waiting; False on a timeout."""
        clock = self._clock
        me = clock._me()
        with clock._mutex:
            if self._flag:
                return True
            if timeout is not None and timeout <= 0:
                return False
            deadline = None if timeout is None else clock._now + timeout
            return clock._suspend(me, self, deadline, self._waiters) == _NOTIFIED

    def __repr__(self) -> str:
        return f"{self.name} ({'set' if self._flag else 'clear'})"


class VirtualThread:
    """A started participant: ``join`` waits on virtual time, ``is_alive`` is its virtual state."""

    def __init__(self, clock: VirtualClock, participant: _Participant, thread: threading.Thread) -> None:
        self._clock = clock
        self._p = participant
        self._thread = thread
        self.name = participant.name
        self.daemon = True

    def join(self, timeout: float | None = None) -> None:
        """Wait (virtual time) for the thread to end; after :meth:`VirtualClock.close`, wait for it to
        unwind instead (a few real seconds at most), so a teardown may close things in any order."""
        clock = self._clock
        me = clock._me()
        if me is self._p:
            raise RuntimeError("cannot join current thread")
        if clock._closed:  # nothing to schedule any more: wait (briefly, really) for it to unwind
            self._thread.join(timeout=5.0 if timeout is None else min(max(timeout, 0.0), 5.0))
            return
        with clock._mutex:
            if self._p.state != _FINISHED and not (timeout is not None and timeout <= 0):
                deadline = None if timeout is None else clock._now + timeout
                clock._suspend(me, f"join({self.name})", deadline, self._p.joiners)
        if self._p.state == _FINISHED:
            self._thread.join(timeout=5.0)  # it has handed the baton on: only its last bytecodes remain

    def is_alive(self) -> bool:
        return self._p.state != _FINISHED

    def __repr__(self) -> str:
        return f"thread {self.name} ({self._p.state})"


if TYPE_CHECKING:  # mypy checks the virtual primitives against the runtime's shapes
    def _shapes(clock: VirtualClock) -> tuple[Lock, Condition, Signal, Thread]:
        return clock.lock(), clock.condition(clock.lock()), clock.signal(), clock.start_thread(lambda: None, "x")
