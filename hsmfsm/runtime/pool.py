"""An HA pool: several HSM members behind one virtual session.

Callers hold no member handles. Each call goes to a member chosen by the
balancing rule among the members that serve; an idempotent call that fails
on a member with a code whose class allows re-issue (transport, session,
timeout) goes again to another member, within one deadline. Members are
:class:`SlotConnection` objects, each with its own module instance, so one
member's hang, reinitialisation or crash never touches another's sessions.

Recovery of members:

- ``background`` (default): each member's own supervisor retries every X
  seconds (``recovery.interval``) up to N times (``recovery.max_attempts``),
  probing while idle, with no caller needed; then the member stays ``failed``
  until :meth:`Pool.recover`.
- ``in_call``: the vendor HA library's semantics, for comparison: recovery
  is attempted only inside a caller's call, at most every X seconds, at most
  N times; a failure counts an attempt, a success brings the member back and
  resets its count. The counting is the same :class:`ReconnectSchedule` the
  background mode uses, kept per member under the pool's lock.

Which failures may go to another member is the rule-book's decision
(:func:`hsmfsm.core.rules.pool_may_reissue`); the pool only carries it out.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..audit.record import AuditLog
from ..core import rules
from ..core.errors import AllMembersDown, HSMError
from ..core.policy import Backoff, ConnectPolicy, Policy, member_policy
from ..core.records import Listener, TransitionRecord
from ..core.recovery import ReconnectSchedule
from ..core.states import SERVING, State
from .clock import SYSTEM
from .connection import SlotConnection
from .edge import Clock, Module

BALANCES = ("round_robin", "least_busy", "primary")


@dataclass(frozen=True, slots=True)
class MemberStatus:
    """One line of ``hsmfsm status``: what an operator wants to know about a member."""

    name: str
    role: str  # "active" or "standby"
    state: str
    last_code: str | None
    last_code_value: int | None
    recovery_attempts: int
    max_attempts: int | None
    next_attempt_in: float | None
    inflight: int
    isolation: str = "none"  # "process": the module runs in a host process (hsmfsm.p11.host)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Member:
    __slots__ = ("conn", "schedule", "standby")

    def __init__(self, conn: SlotConnection, standby: bool, schedule: ReconnectSchedule) -> None:
        self.conn, self.standby = conn, standby
        #: In-call recovery: when the pool may next ask this member to try (at most every X
        #: seconds); the member's own schedule counts the attempts. Under the pool's lock.
        self.schedule = schedule


class Pool:
    """One virtual session over several members. Build it with :meth:`from_yaml` or directly."""

    def __init__(self, name: str, members: Iterable[tuple[SlotConnection, bool]], policy: Policy, *,
                 balance: str = "round_robin", recovery_mode: str = "background",
                 recovery_interval: float = 10.0, recovery_max_attempts: int | None = 6,
                 audit: AuditLog | None = None, clock: Clock | None = None) -> None:
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}")
        if recovery_mode not in ("background", "in_call"):
            raise ValueError("recovery mode must be background or in_call")
        self.name, self.policy, self.balance = name, policy, balance
        self.recovery_mode = recovery_mode
        self.interval, self.max_attempts = recovery_interval, recovery_max_attempts
        self._clock = clock = clock or SYSTEM
        self._now = clock.monotonic
        # In-call mode: ask a member at most every X seconds, no growth, no jitter. The member's
        # own schedule counts the N attempts (member_policy), so it gives up on its own machine.
        every = ConnectPolicy(backoff=Backoff(initial=recovery_interval, multiplier=1.0, max=recovery_interval,
                                              jitter=0.0), max_attempts=None)
        self._members = [_Member(conn, standby, ReconnectSchedule(every, lambda: 0.5))
                         for conn, standby in members]
        if not any(not m.standby for m in self._members):
            raise ValueError("a pool needs at least one active (non-standby) member")
        self._by_name = {m.conn.name: m for m in self._members}
        self._rr = itertools.count()
        self._lock = self._clock.lock()
        self._changed = clock.condition(self._lock)
        self._forked = False
        _LIVE_POOLS.add(self)
        self._deadline = policy.operations.deadline
        for m in self._members:
            m.conn.add_listener(self._on_transition)
        #: The pool's audit record (closed with the pool), if the pool file asks for one.
        self.audit = audit
        if audit is not None:
            self.add_listener(audit)

    # -- construction ---------------------------------------------------------

    #: The pool's recovery settings, written into each member's connect policy.
    member_policy = staticmethod(member_policy)

    @classmethod
    def from_spec(cls, spec: Any, *, clock: Clock | None = None, modules: dict[str, Module] | None = None) -> Pool:
        """Build a pool from a loaded pool file (``hsmfsm.config.pool_file.PoolSpec``).

        ``modules`` maps member names to module objects to use instead of the file's
        module paths (:class:`hsmfsm.testing.ScriptedModule`, for tests and the
        simulator); ``clock`` is given to the pool and every member.
        """
        r = spec.recovery
        policy = cls.member_policy(spec.policy, r.mode, r.interval, r.max_attempts)
        background = r.mode == "background"
        given = modules or {}
        members = [
            (SlotConnection(module=given.get(m.name, m.module), token_label=m.token_label, pin=m.pin,
                            policy=policy, name=m.name, env=dict(m.env), probe=background,
                            wait_for_recovery=False, auto_recover=background,
                            isolation="none" if m.name in given else m.isolation, clock=clock), m.standby)
            for m in spec.members
        ]
        audit = None
        if spec.audit is not None:
            a = spec.audit
            audit = AuditLog(a.path, pool=spec.name, rotate_bytes=a.rotate_bytes, keep=a.keep, fsync=a.fsync)
        return cls(spec.name, members, spec.policy, balance=spec.balance, recovery_mode=r.mode,
                   recovery_interval=r.interval, recovery_max_attempts=r.max_attempts, audit=audit, clock=clock)

    @classmethod
    def from_yaml(cls, path: str, *, clock: Clock | None = None, modules: dict[str, Module] | None = None) -> Pool:
        """Load a pool file (raises :class:`hsmfsm.PolicyError` naming file, line and field)."""
        from ..config.pool_file import load_pool

        return cls.from_spec(load_pool(path), clock=clock, modules=modules)

    # -- lifecycle ------------------------------------------------------------

    def open(self, wait: float | None = None) -> Pool:
        """Start every member; wait up to ``wait`` (default: the deadline) until all active members serve.

        A member that is down does not make this fail; a rejected PIN leaves that
        member ``failed`` and is reported by :meth:`status`, not raised, so that
        the others serve.
        """
        for m in self._members:
            try:
                m.conn.open(wait=0)
            except HSMError:
                pass
        limit = self._now() + (self._deadline if wait is None else wait)
        with self._changed:
            self._changed.wait_for(lambda: all(m.conn.serving or m.conn.state is State.FAILED
                                               for m in self._members if not m.standby),
                                   timeout=max(0.0, limit - self._now()))
        return self

    def close(self) -> None:
        """Close every member, then the audit record (so that the closes are on it)."""
        for m in self._members:
            m.conn.close()
        if self.audit is not None:
            self.audit.close()

    def __enter__(self) -> Pool:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_listener(self, listener: Listener) -> None:
        """Receive the transition records of every member."""
        for m in self._members:
            m.conn.add_listener(listener)

    def recover(self, name: str) -> None:
        """Bring a member that gave up back into recovery (the hand in "recovered by hand")."""
        m = self._by_name[name]
        with self._lock:
            m.schedule.reset()
        if m.conn.state is State.FAILED:
            m.conn.reset()
        if self.recovery_mode == "in_call":
            m.conn.request_recovery()

    def member(self, name: str) -> SlotConnection:
        return self._by_name[name].conn

    # -- status ---------------------------------------------------------------

    def status(self) -> list[MemberStatus]:
        out = []
        for m in self._members:
            c = m.conn
            attempts, next_in = c.recovery_status()  # the member's own schedule counts, in both modes
            if self.recovery_mode == "in_call":
                with self._lock:
                    next_at = m.schedule.next_at  # when the pool will next ask
                next_in = None if c.serving or c.state is State.FAILED else max(0.0, (next_at or 0.0) - self._now())
            state = c.state
            code = c.last_code
            out.append(MemberStatus(c.name, "standby" if m.standby else "active", state,
                                    code.name if code else None, code.value if code else None, attempts,
                                    self.max_attempts, None if c.serving else next_in, c.inflight,
                                    c.isolation))
        return out

    def __repr__(self) -> str:
        serving = sum(1 for m in self._members if m.conn.serving)
        return f"<Pool {self.name} serving on {serving} of {len(self._members)} members, {self.balance}>"

    # -- operations -----------------------------------------------------------

    def sign(self, key_label: str, data: bytes, mechanism: Any = None, mechanism_param: Any = None) -> bytes:
        result: bytes = self._call("sign", lambda c: c.sign(key_label, data, mechanism, mechanism_param))
        return result

    def verify(self, key_label: str, data: bytes, signature: bytes, mechanism: Any = None,
               mechanism_param: Any = None) -> bool:
        result: bool = self._call("verify", lambda c: c.verify(key_label, data, signature, mechanism,
                                                               mechanism_param))
        return result

    def decrypt(self, key_label: str, data: bytes, mechanism: Any = None, mechanism_param: Any = None) -> bytes:
        result: bytes = self._call("decrypt", lambda c: c.decrypt(key_label, data, mechanism, mechanism_param))
        return result

    def generate_random(self, nbytes: int) -> bytes:
        result: bytes = self._call("generate_random", lambda c: c.generate_random(nbytes))
        return result

    def generate_keypair(self, key_type: Any, bits: int, label: str) -> Any:
        """Not idempotent: re-issued elsewhere only when the first member never received it."""
        return self._call("generate_keypair", lambda c: c.generate_keypair(key_type, bits, label))

    def _call(self, op: str, invoke: Callable[[SlotConnection], Any]) -> Any:
        if self._forked:
            self._after_fork()
        deadline = self._now() + self._deadline
        idempotent = self.policy.is_idempotent(op)
        tried: set[str] = set()
        reissues = 0  # as one connection counts them: operations.max_reissues bounds a pool's call too
        while True:
            if self.recovery_mode == "in_call":
                self._recover_in_call()
            member = self._choose(tried)
            if member is None:
                if tried and any(m.conn.serving for m in self._members):
                    tried.clear()  # everyone serving was tried once: go round again, within the deadline
                    continue
                if not self._wait_for_a_member(deadline):
                    raise AllMembersDown(self.name, {m.conn.name: (m.conn.state, m.conn.last_code)
                                                     for m in self._members})
                continue
            try:
                return invoke(member.conn)
            except HSMError as exc:
                if not rules.pool_may_reissue(exc, idempotent):
                    raise
                tried.add(member.conn.name)
                if self._now() >= deadline or reissues >= self.policy.operations.max_reissues:
                    raise
                reissues += 1

    def _choose(self, tried: set[str]) -> _Member | None:
        """The member for the next call: healthy actives first, degraded ones, then standbys."""
        for group in self._groups(tried):
            if group:
                return self._pick(group)
        return None

    def _groups(self, tried: set[str]) -> tuple[list[_Member], list[_Member], list[_Member]]:
        healthy, degraded, standby = [], [], []
        for m in self._members:
            c = m.conn
            if c.name in tried or not c.serving:
                continue
            if m.standby:
                standby.append(m)
            elif c.state is State.DEGRADED:
                degraded.append(m)
            else:
                healthy.append(m)
        return healthy, degraded, standby

    def _pick(self, group: list[_Member]) -> _Member:
        if len(group) == 1 or self.balance == "primary":
            return group[0]
        if self.balance == "least_busy":
            return min(group, key=lambda m: m.conn.inflight)
        return group[next(self._rr) % len(group)]

    def _wait_for_a_member(self, deadline: float) -> bool:
        """Wait, within the deadline, for any member to serve; False when the deadline has passed.

        In-call mode wakes every 50 ms to look again: there a member comes back
        only when a call asks it to, so waiting for the notification alone would
        wait for nothing.
        """
        remaining = deadline - self._now()
        if remaining <= 0:
            return False
        step = min(remaining, 0.05) if self.recovery_mode == "in_call" else remaining
        with self._changed:
            self._changed.wait_for(lambda: any(m.conn.serving for m in self._members), timeout=step)
        return True

    def _recover_in_call(self) -> None:
        """The vendor's passive recovery, made correct: inside a call, at most every X seconds,
        at most N times; a failure counts an attempt, a success resets the count.

        Decided under the pool's lock (which member is due), asked for outside it.
        """
        now = self._now()
        due = []
        with self._lock:
            for m in self._members:
                c = m.conn
                if c.serving or c.state is State.FAILED or not m.schedule.due(now):
                    continue
                m.schedule.failed(now)  # not before X seconds from now
                due.append(c)
        for c in due:
            c.request_recovery()

    def _on_transition(self, record: TransitionRecord) -> None:
        m = self._by_name.get(record.member)
        with self._changed:
            if m is not None and record.dest in SERVING:
                m.schedule.succeeded()
            self._changed.notify_all()


    def _after_fork(self) -> None:
        """In a forked child, on the first call: every member drops what it inherited and
        reconnects (``SlotConnection._check_fork``); until then none of them serves."""
        self._forked = False
        for m in self._members:
            m.conn._check_fork()

    def _after_fork_in_child(self) -> None:
        self._lock = self._clock.lock()
        self._changed = self._clock.condition(self._lock)  # another thread may have held it at the fork
        self._forked = True


_LIVE_POOLS: weakref.WeakSet[Pool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_LIVE_POOLS):
        pool._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def format_status(pool: Pool) -> str:
    """The vendor-style HA group display of ``hsmfsm status``."""
    rows = pool.status()
    width = max(len(r.name) for r in rows)
    lines = [f"HA group {pool.name}:"]
    for r in rows:
        code = r.last_code or "CKR_OK"
        extra = ""
        if r.state not in SERVING:
            cap = "unlimited" if r.max_attempts is None else r.max_attempts
            nxt = "" if r.next_attempt_in is None else f", next in {r.next_attempt_in:.0f}s"
            extra = f"   recovery {r.recovery_attempts}/{cap}{nxt}"
        role = ("  (standby)" if r.role == "standby" else "") + \
            ("  (host process)" if r.isolation == "process" else "")
        lines.append(f"  {r.name:<{width}}   {r.state:<12} {code}{extra}{role}")
    serving = sum(1 for r in rows if r.state in SERVING)
    lines.append(f"Status: serving on {serving} of {len(rows)} members")
    return "\n".join(lines)
