"""Shared pieces of the scripted tests: connections and pools on a ScriptedHSM and a VirtualClock.

Nothing here starts SoftHSM or p11-kit: every module is a :class:`ScriptedModule`, every
thread runs on the :class:`VirtualClock` of the test, and every time is virtual.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import hsmfsm
from hsmfsm import Policy, SlotConnection, TransitionRecord
from hsmfsm.runtime.pool import Pool
from hsmfsm.testing import ScriptedHSM, ScriptedModule, VirtualClock

PIN = "1234"
MECH = "SHA256_RSA_PKCS"
#: A transition as the tests compare it: (source, event, dest, code name).
Row = tuple[str, str, str, "str | None"]


@functools.cache
def _network_hsm() -> Policy:
    return hsmfsm.load_policy("network-hsm")


def policy(*, call_timeout: float | None = None, deadline: float | None = None,
           probe_interval: float | None = None, max_attempts: int | None | str = "keep",
           backoff: dict[str, float] | None = None, degraded: dict[str, float] | None = None,
           probe: dict[str, Any] | None = None, max_reissues: int | None = None) -> Policy:
    """The shipped network-hsm policy (call timeout 2 s, deadline 8 s, probe 0.5 s, backoff 0.1 s x2
    up to 3 s, slow call 0.5 s, 3 impaired in, 5 healthy out), with the given fields changed."""
    p = _network_hsm()
    ops = p.operations
    p = dataclasses.replace(p, operations=dataclasses.replace(
        ops, call_timeout=ops.call_timeout if call_timeout is None else call_timeout,
        deadline=ops.deadline if deadline is None else deadline,
        max_reissues=ops.max_reissues if max_reissues is None else max_reissues))
    pr = dataclasses.replace(p.probe, **(probe or {}))
    if probe_interval is not None:
        pr = dataclasses.replace(pr, interval=probe_interval)
    connect = p.connect
    if backoff:
        connect = dataclasses.replace(connect, backoff=dataclasses.replace(connect.backoff, **backoff))
    if max_attempts != "keep":
        connect = dataclasses.replace(connect, max_attempts=max_attempts)
    return dataclasses.replace(p, probe=pr, connect=connect,
                               degraded=dataclasses.replace(p.degraded, **(degraded or {})))


#: Real seconds a test may take before its clock is closed under it (a stuck virtual clock: a thread
#: that spins without ever waiting keeps virtual time from moving, and the test would hang).
REAL_TIME_LIMIT = 5.0


def guarded_clock(seed: int = 1, limit: float = REAL_TIME_LIMIT) -> Iterator[VirtualClock]:
    """A fixture body: a clock that is closed after the test, or after ``limit`` real seconds, whichever
    comes first (then the test's thread gets VirtualClockClosed instead of hanging); no thread may have
    died of an exception meanwhile."""
    with VirtualClock(seed=seed) as clock:
        guard = threading.Timer(limit, clock.close)
        guard.daemon = True
        guard.start()
        try:
            yield clock
        finally:
            guard.cancel()
        assert not clock.errors, clock.errors  # nothing escaped a runtime thread


class Recorder:
    """A transition listener that keeps every record with the virtual time it was emitted at."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.records: list[TransitionRecord] = []
        self.times: list[float] = []

    def __call__(self, record: TransitionRecord) -> None:
        self.records.append(record)
        self.times.append(self.clock.monotonic())

    def rows(self, start: int = 0, member: str | None = None) -> list[Row]:
        """The records from index ``start`` (a :meth:`mark`) on, of ``member`` if given."""
        return [(r.source, r.event, r.dest, r.code_name) for r in self.records[start:]
                if member is None or r.member == member]

    def of(self, member: str) -> list[Row]:
        """Every record of ``member``."""
        return self.rows(member=member)

    def mark(self) -> int:
        """The index of the next record: ``rows(mark)`` is what happened from now on."""
        return len(self.records)

    def when(self, event: str, member: str | None = None, start: int = 0) -> list[float]:
        """Virtual times of every ``event`` (of ``member``)."""
        return [t for r, t in zip(self.records[start:], self.times[start:])
                if r.event == event and (member is None or r.member == member)]

    def attempts(self, event: str, member: str | None = None) -> list[int]:
        return [r.attempt for r in self.records if r.event == event and (member is None or r.member == member)]


#: The three steps from disconnected to logged_in.
UP: list[Row] = [("disconnected", "connect", "connecting", None), ("connecting", "session_opened", "open", None),
                 ("open", "login_ok", "logged_in", "CKR_OK")]
#: One connect attempt that finds no token (the HSM was down at C_Initialize).
NO_TOKEN: list[Row] = [("disconnected", "connect", "connecting", None),
                       ("connecting", "connect_failed", "disconnected", "HSMFSM_NO_SUCH_TOKEN")]


def connection(clock: VirtualClock, hsm: ScriptedHSM, name: str = "hsm-a", pol: Policy | None = None, *,
               pin: str | Callable[[], str] = PIN, recorder: Recorder | None = None,
               can_cut_off: bool = True, jitter: bool = False, **kw: Any) -> SlotConnection:
    """A connection to ``hsm`` through a module instance of its own (not opened).

    ``jitter``: False gives the back-off no jitter (``rand`` 0.5), so its gaps are exact."""
    module = ScriptedModule(hsm, clock, name=name, can_cut_off=can_cut_off)
    source = pin if callable(pin) else (lambda: pin)
    if not jitter:
        kw.setdefault("rand", lambda: 0.5)
    conn = SlotConnection(module, hsm.label, source, pol or policy(), name=name, clock=clock, **kw)
    if recorder is not None:
        conn.add_listener(recorder)
    return conn


def pool(clock: VirtualClock, hsms: dict[str, ScriptedHSM], pol: Policy | None = None, *,
         mode: str = "background", interval: float = 1.0, max_attempts: int | None = 6,
         balance: str = "round_robin", standby: tuple[str, ...] = (), recorder: Recorder | None = None,
         pins: dict[str, str | Callable[[], str]] | None = None, jitter: bool = False) -> Pool:
    """A pool over ``hsms`` (name -> HSM), its members built as ``Pool.from_spec`` builds them."""
    pol = pol or policy()
    member_policy = Pool.member_policy(pol, mode, interval, max_attempts)
    background = mode == "background"
    members = [(connection(clock, hsm, name, member_policy, pin=(pins or {}).get(name, PIN), jitter=jitter,
                           probe=background, wait_for_recovery=False, auto_recover=background), name in standby)
               for name, hsm in hsms.items()]
    p = Pool("signer", members, pol, balance=balance, recovery_mode=mode, recovery_interval=interval,
             recovery_max_attempts=max_attempts, clock=clock)
    if recorder is not None:
        p.add_listener(recorder)
    return p


class Caller:
    """Runs ``fn`` in a thread of the clock; keeps its result or its error and the virtual times."""

    def __init__(self, clock: VirtualClock, fn: Callable[[], Any], name: str = "caller") -> None:
        self.clock = clock
        self.result: Any = None
        self.error: BaseException | None = None
        self.started = clock.monotonic()
        self.ended: float | None = None

        def run() -> None:
            try:
                self.result = fn()
            except Exception as exc:  # kept for the test to look at
                self.error = exc
            finally:
                self.ended = clock.monotonic()

        self.thread = clock.start_thread(run, name)

    def join(self, budget: float) -> bool:
        """Wait up to ``budget`` virtual seconds; True when ``fn`` has returned or raised."""
        self.thread.join(budget)
        return not self.thread.is_alive()

    @property
    def elapsed(self) -> float:
        assert self.ended is not None, "the call has not ended"
        return self.ended - self.started


def signs(hsm: ScriptedHSM, outcome: str = "CKR_OK") -> int:
    """C_Sign calls that reached ``hsm`` with that outcome."""
    return hsm.count("sign", outcome)


def replicas(clock: VirtualClock, *names: str) -> dict[str, ScriptedHSM]:
    """One HSM per name, replicas of one token (same label, same keys, so signatures agree)."""
    return {name: ScriptedHSM(label="signer", pin=PIN, clock=clock) for name in names}


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in zip(times, times[1:])]


__all__ = ["MECH", "NO_TOKEN", "PIN", "REAL_TIME_LIMIT", "UP", "Caller", "Recorder", "connection", "gaps",
           "guarded_clock", "policy", "pool", "replicas", "signs"]
