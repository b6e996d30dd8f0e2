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

Suspicion (``operations.suspicion``): a member whose idempotent call runs past
its own recent p99 for that operation (times a multiple, between a floor and a
ceiling) while another member serves that answers sooner is *suspected*: a
mark of the pool's, not a state (:func:`hsmfsm.core.rules.decide_suspicion`).
Each member's watchdog tick reports such a call here (:meth:`Pool._overran`);
the pool decides under its lock, and the member cuts off the links of its
idempotent calls in flight, which the callers' pool calls re-issue at once on
another member. A suspected member gets no new calls while another member
serves (it comes after the standbys); it is probed at once, and its first
answer (that probe, or a call) takes the mark away. One that stays silent
meets the call timeout as any other. With no other member serving, nothing is
suspected and nothing cut: the pool behaves as without suspicion.

Balancing counts sessions: a member whose ``sessions.max`` are all leased is
passed over while another has one free (``round_robin``), and ``least_busy``
picks the member with the most free sessions.

Keys and mechanisms:

- A call goes only to members whose token offers its mechanism (each member's
  mechanism list is read at connect); where none does, it fails at once with
  :class:`~hsmfsm.core.errors.MechanismNotSupported` naming the mechanism.
- ``sign(..., check=)``: a member's signature that fails the check counts as an
  impaired call for that member and the call goes to another member, within
  the deadline; a signature that failed is never returned.
- The replica check. The pool keeps every public key it has read
  (:meth:`Pool.public_key`, :meth:`Pool.private_key`) as the reference for that
  key. A member serves only once its copy of each of those keys has been
  compared with the reference in its current generation; a member whose copy
  differs (or is missing) is kept out of service, shown in :meth:`Pool.status`
  with an error naming it and the key, until a later check matches.
  The check runs on the member's ``login_ok`` transition, in the listener the
  pool registers on each member: that runs with no lock held, normally in the
  member's own supervisor thread right after its login, so the I/O (one
  C_FindObjects and C_GetAttributeValue per key) is off every caller's path
  and an idle pool verifies a member that comes back before any call needs
  it. Calls never reach a member whose check has not completed, because
  eligibility is keyed on the generation the check was made in, not on the
  transition having been seen. The first call that finds no eligible member
  but a serving, unchecked one (a check cut short, or one that raced a key
  the pool had just learned) runs that member's check itself, also outside
  the pool's lock.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..audit.record import AuditLog
from ..core import rules
from ..core.errors import AllMembersDown, HSMError, KeyNotFound, MechanismNotSupported
from ..core.policy import Backoff, ConnectPolicy, Policy, member_policy
from ..core.records import (
    CallListener,
    CallRecord,
    Listener,
    SuspicionListener,
    SuspicionRecord,
    TransitionRecord,
)
from ..core.recovery import ReconnectSchedule
from ..core.states import SERVING, Event, State
from .clock import SYSTEM
from .connection import SlotConnection
from .edge import Clock, Module
from .health import HealthWatch, PoolHealth
from .keyops import RULE_OPERATION, key_ref, mechanism_name, public_der, signature_rejected
from .listeners import CallListeners, PoolCall, current_pool_call, outcome_of, pop_pool_call, push_pool_call

if TYPE_CHECKING:
    from ..keys.backend import KeyRef, SignatureCheck
    from .aio import AsyncPool

log = logging.getLogger("hsmfsm.pool")

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
    #: Why the member is kept out of service while its state serves (a replica whose key differs).
    error: str | None = None
    #: UNIX time the member entered its state.
    since: float | None = None
    #: Sessions open on the member now (the logged-in one and the callers').
    sessions: int = 0
    #: The pool suspects the member (``operations.suspicion``): it gets no new calls while another serves.
    suspected: bool = False
    #: Links the member has open (a session each over p11-kit-client), and new links whose set-up
    #: failed as that link's failure alone (``rules.link_failure``), ever.
    links: int = 0
    link_failures: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Member:
    __slots__ = ("checked_generation", "checked_version", "conn", "mismatch", "schedule", "standby", "suspected")

    def __init__(self, conn: SlotConnection, standby: bool, schedule: ReconnectSchedule) -> None:
        self.conn, self.standby = conn, standby
        #: In-call recovery: when the pool may next ask this member to try (at most every X
        #: seconds); the member's own schedule counts the attempts. Under the pool's lock.
        self.schedule = schedule
        #: The replica check: the member generation and the pool's key version it was last made
        #: for, and what it found wrong (None: every key matched). Under the pool's lock.
        self.checked_generation, self.checked_version = -1, -1
        self.mismatch: str | None = None
        #: The pool suspects the member (rules.decide_suspicion). Under the pool's lock; mirrored in
        #: the connection (``_suspected``) for its call path and watchdog.
        self.suspected = False


@dataclass(frozen=True, slots=True)
class _Known:
    """A public key the pool has read: the reference every member's copy is compared with."""

    key: Any
    der: bytes
    source: str  # the member it was read from, or "the caller"


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
        #: Public keys read so far (the replica check's references), and a version bumped with each.
        self._known: dict[KeyRef, _Known] = {}
        self._key_version = 0
        #: Mechanism arguments by their names (without CKM_), for routing.
        self._mech_names: dict[Any, str | None] = {}
        for m in self._members:
            m.conn.add_listener(self._on_transition)
            m.conn._listeners.pool = name  # the pool's name in the members' log fields
            m.conn._watch_suspicion(self._overran, self._answered)
        self._suspicion_listeners: list[SuspicionListener] = []
        self._call_listeners = CallListeners()
        self._health_watch = HealthWatch(self)
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

    def aio(self, *, workers: int | None = None) -> AsyncPool:
        """An asyncio facade over this pool: an :class:`hsmfsm.runtime.aio.AsyncPool` with a bounded
        thread pool of its own (``workers`` threads; default 4 per member, within 8..32)."""
        from .aio import AsyncPool

        return AsyncPool(self, workers=workers)

    # -- status ---------------------------------------------------------------

    @property
    def serving_members(self) -> list[str]:
        """The names of the active and standby members that serve calls right now."""
        return [m.conn.name for m in self._members if m.conn.serving and not m.mismatch]

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
                                    c.isolation, m.mismatch, c.since, c.sessions, m.suspected, c.links,
                                    c.link_failures))
        return out

    def health(self) -> PoolHealth:
        """Whether every active member serves, since when not, and each member's state and since when
        (:class:`hsmfsm.runtime.health.PoolHealth`; ``.as_dict()`` in Vault's seal-status shape)."""
        return self._health_watch.health()

    def add_call_listener(self, listener: CallListener) -> None:
        """Call ``listener(record)`` with a :class:`~hsmfsm.core.records.CallRecord` for every call of
        this pool (``kind`` ``"call"``: what the application saw, failover included) and, before it,
        for each attempt on a member (``kind`` ``"attempt"``, numbered within the pool call).
        In the caller's thread, never under a lock; a listener that raises is logged, never
        propagated into the call."""
        if self._call_listeners.add(listener):
            for m in self._members:
                m.conn.add_call_listener(self._member_attempt)

    def remove_call_listener(self, listener: CallListener) -> None:
        self._call_listeners.remove(listener)

    def _member_attempt(self, record: CallRecord) -> None:
        """A member's attempt record, passed on to the pool's call listeners with the pool's name
        (and, inside a call of this pool, the call's attempt number)."""
        if not self._call_listeners:
            return
        call = current_pool_call(self)
        if call is None:
            record = dataclasses.replace(record, pool=self.name)
        else:
            record = dataclasses.replace(record, pool=self.name, attempt=max(call.attempts, 1),
                                         reissued=call.attempts > 1)
        self._call_listeners.emit(record)

    def __repr__(self) -> str:
        serving = sum(1 for m in self._members if m.conn.serving)
        return f"<Pool {self.name} serving on {serving} of {len(self._members)} members, {self.balance}>"

    # -- operations -----------------------------------------------------------
    #
    # As on a SlotConnection: ``deadline=`` (seconds, for the whole call across members) instead of
    # the policy's, ``key_id=`` (CKA_ID) beside or instead of the label, and for ``sign`` a ``check=``.

    def sign(self, key_label: str | None, data: bytes, mechanism: Any = None, mechanism_param: Any = None, *,
             key_id: bytes | None = None, deadline: float | None = None,
             check: SignatureCheck | None = None) -> bytes:
        """``check``: called with each member's signature before it is returned; one that fails it
        counts as an impaired call for that member, and the call goes to another member within the
        deadline. A signature that failed is never returned: when no other member signs in time,
        :class:`hsmfsm.keys.SignatureMismatch` names the members tried."""
        if check is None and key_id is None:
            result: bytes = self._call("sign", lambda c: c.sign(key_label, data, mechanism, mechanism_param),
                                       mechanism, deadline)
        else:
            result = self._call("sign", lambda c: c.sign(key_label, data, mechanism, mechanism_param,
                                                         key_id=key_id, check=check), mechanism, deadline)
        return result

    def verify(self, key_label: str | None, data: bytes, signature: bytes, mechanism: Any = None,
               mechanism_param: Any = None, *, key_id: bytes | None = None, deadline: float | None = None) -> bool:
        result: bool = self._call("verify", lambda c: c.verify(key_label, data, signature, mechanism,
                                                               mechanism_param, key_id=key_id),
                                  mechanism, deadline)
        return result

    def decrypt(self, key_label: str | None, data: bytes, mechanism: Any = None, mechanism_param: Any = None, *,
                key_id: bytes | None = None, deadline: float | None = None) -> bytes:
        result: bytes = self._call("decrypt", lambda c: c.decrypt(key_label, data, mechanism, mechanism_param,
                                                                  key_id=key_id),
                                   mechanism, deadline)
        return result

    def generate_random(self, nbytes: int, *, deadline: float | None = None) -> bytes:
        result: bytes = self._call("generate_random", lambda c: c.generate_random(nbytes), None, deadline)
        return result

    def generate_keypair(self, key_type: Any, bits: int, label: str, *, deadline: float | None = None) -> Any:
        """Not idempotent: re-issued elsewhere only when the first member never received it."""
        return self._call("generate_keypair", lambda c: c.generate_keypair(key_type, bits, label), None, deadline)

    def objects(self, *, deadline: float | None = None) -> tuple[str, list[dict[int, Any]]]:
        """The objects of one serving member's token (:meth:`SlotConnection.objects`), and its name:
        replicas hold the same objects (the replica check compares their keys)."""
        result: tuple[str, list[dict[int, Any]]] = self._call_named("list_objects", lambda c: c.objects(), deadline)
        return result

    def mechanism_infos(self, *, deadline: float | None = None) -> tuple[str, dict[int, tuple[int, int, int]]]:
        """One serving member's mechanisms with their sizes and flags, and its name."""
        result: tuple[str, dict[int, tuple[int, int, int]]] = self._call_named(
            "mechanism_infos", lambda c: c.mechanism_infos(), deadline)
        return result

    def _call_named(self, op: str, invoke: Callable[[SlotConnection], Any], deadline: float | None) -> Any:
        def named(c: SlotConnection) -> tuple[str, Any]:
            return c.name, invoke(c)

        return self._call(op, named, None, deadline)

    # -- keys -------------------------------------------------------------------

    def public_key(self, label: str | None = None, *, key_id: bytes | None = None, uri: str | None = None,
                   deadline: float | None = None) -> Any:
        """The public half of a key, as a ``cryptography`` public key, read from a member's token
        (cached per member generation). The first read of a key makes it the pool's reference, and
        every serving member's copy is compared with it (the replica check, module text).

        By label, ``key_id`` or both, or a ``pkcs11:`` URI. A key no member has:
        :class:`~hsmfsm.core.errors.KeyNotFound` naming the lookup and each member's answer."""
        ref = key_ref(label, key_id, uri)
        return self._public_key(ref, deadline)

    def private_key(self, label: str | None = None, *, key_id: bytes | None = None, uri: str | None = None,
                    public_key: Any = None, verify: bool = False, hash_locally: bool = True) -> Any:
        """A ``cryptography`` private key object whose operations run on the pool
        (:func:`hsmfsm.keys.bind_private_key`): a member's loss is failed over as any call.

        ``public_key``: the key's public half (a public key or an ``x509.Certificate``), which
        then becomes the pool's reference for the replica check; else it is read with
        :meth:`public_key`. ``verify``: every signature is checked against it, and one that fails
        goes to another member (``sign(check=)``). ``hash_locally``: hash in Python and sign the
        digest (RSA_PKCS, RSA_PKCS_PSS, ECDSA), as Debian's SoftHSM needs for EC keys."""
        from ..keys import bind_private_key

        ref = key_ref(label, key_id, uri, kinds=("private",))
        if public_key is None:
            public_key = self.public_key(ref.label, key_id=ref.key_id)
        else:
            from cryptography import x509

            self._learn(ref, public_key.public_key() if isinstance(public_key, x509.Certificate) else public_key,
                        "the caller")
        return bind_private_key(self, ref, public_key, verify=verify, hash_locally=hash_locally)

    def recheck(self, name: str | None = None) -> None:
        """Read every known key again from ``name`` (default: every serving member) and compare it
        with the pool's reference now, e.g. after a replica's key was fixed on the token."""
        for m in self._members if name is None else [self._by_name[name]]:
            with self._lock:
                m.checked_generation = -1
            m.conn._g.public_keys.clear()
            self._check_member(m)

    def _public_key(self, ref: KeyRef, deadline: float | None) -> Any:
        if self._forked:
            self._after_fork()
        limit = self._deadline if deadline is None else deadline
        until = self._now() + limit
        answers: dict[str, str] = {}
        tried: set[str] = set()
        checked: set[str] = set()
        while True:
            member = self._choose(tried, None)
            if member is None:
                if self._check_unchecked(tried, checked):
                    continue
                if tried and any(self._eligible(m, None) and m.conn.name not in answers for m in self._members):
                    tried.clear()  # a member that failed in passing: go round again within the deadline
                    tried.update(answers)
                    continue
                if len(answers) == len(self._members) or not self._wait_for_a_member(until, None, answers):
                    raise self._key_not_found(ref, answers) if answers else AllMembersDown(
                        self.name, self._member_states())
                continue
            c = member.conn
            try:
                key = c.public_key(ref.label, key_id=ref.key_id, deadline=max(0.0, until - self._now()))
            except KeyNotFound as exc:
                answers[c.name] = str(exc)
                tried.add(c.name)
                continue
            except HSMError as exc:
                if not rules.pool_may_reissue(exc, True) or self._now() >= until:
                    raise
                tried.add(c.name)
                continue
            known = self._known.get(ref)
            if known is None:
                known = self._learn(ref, key, c.name)
            if public_der(key) != known.der:
                self._set_mismatch(member, c._g.number, f"{c.name}: key {ref} differs from the pool's copy "
                                                        f"(read from {known.source})")
                tried.add(c.name)
                continue
            return known.key

    def _learn(self, ref: KeyRef, key: Any, source: str) -> _Known:
        """Make ``key`` the pool's reference for ``ref`` (unless it has one already, or the caller gives
        one), and compare every serving member's copy with it now, in this thread."""
        der = public_der(key)
        with self._lock:
            known = self._known.get(ref)
            if known is not None and (known.der == der or source != "the caller"):
                return known
            known = self._known[ref] = _Known(key, der, source)
            self._key_version += 1
        log.info("%s: key %s read from %s; checking every member's copy", self.name, ref, source)
        for m in self._members:
            if m.conn.serving:
                self._check_member(m)
        return known

    def _check_unchecked(self, tried: set[str], checked: set[str]) -> bool:
        """The first call's share of the replica check: members that serve but have not been checked
        in their current generation are checked now, outside the pool's lock, once per call (a check
        that cannot conclude is not run again by the same call). True if any was."""
        stale = []
        with self._lock:
            version = self._key_version
            if not version:
                return False
            for m in self._members:
                c = m.conn
                g = c._g
                if c.name in tried or c.name in checked or not g.ready:
                    continue
                if m.checked_generation != g.number or m.checked_version != version:
                    stale.append(m)
        for m in stale:
            checked.add(m.conn.name)
            self._check_member(m)
        return bool(stale)

    def _eligible(self, m: _Member, mech: str | None) -> bool:
        """Whether ``m`` may take a call now (as :meth:`_groups` chooses)."""
        c = m.conn
        if not c.serving:
            return False
        version = self._key_version
        if version and (m.mismatch is not None or m.checked_version != version
                        or m.checked_generation != c._g.number):
            return False
        ms = c._last_mechanisms if mech is not None else None
        return ms is None or mech in ms

    def _check_member(self, m: _Member) -> None:
        """The replica check of one member (module text): compare its copy of every key the pool
        knows with the reference. PKCS#11 I/O on that member: never under the pool's lock."""
        c = m.conn
        while True:
            with self._lock:
                version, known = self._key_version, list(self._known.items())
                g = c._g
                if not known or not g.ready or (m.checked_generation == g.number and m.checked_version == version):
                    return
                generation = g.number
            problem: str | None = None
            for ref, reference in known:
                try:
                    key = c.public_key(ref.label, key_id=ref.key_id)
                except KeyNotFound as exc:
                    problem = f"{c.name}: key {ref} is missing ({exc})"
                    break
                except (HSMError, ValueError) as exc:  # not serving any more, or an answer the key cannot be made of
                    if isinstance(exc, ValueError):
                        problem = f"{c.name}: key {ref} could not be read ({exc})"
                        break
                    log.info("%s: the replica check of %s did not complete: %s", self.name, c.name, exc)
                    return
                if public_der(key) != reference.der:
                    problem = f"{c.name}: key {ref} differs from the pool's copy (read from {reference.source})"
                    break
            if self._set_mismatch(m, generation, problem, version):
                return

    def _set_mismatch(self, m: _Member, generation: int, problem: str | None, version: int | None = None) -> bool:
        """Record a check's outcome for ``generation``; False when the member reconnected or the pool
        learned a key meanwhile (check again)."""
        with self._changed:
            if m.conn._g.number != generation:
                return False
            before = m.mismatch
            if version is None:  # a mismatch seen in passing (a call): keep out until a later check
                m.mismatch = problem
            else:
                m.checked_generation, m.checked_version, m.mismatch = generation, version, problem
            self._changed.notify_all()
            again = version is not None and version != self._key_version
        if problem and problem != before:
            log.warning("%s: %s; the member is kept out of service", self.name, problem)
        elif before and not problem:
            log.warning("%s: %s matches the pool's keys again; back in service", self.name, m.conn.name)
        return not again

    def _key_not_found(self, ref: KeyRef, answers: dict[str, str]) -> KeyNotFound:
        said = [answers.get(m.conn.name) or f"{m.conn.name}: not asked ({m.conn.state}"
                f"{', ' + m.conn.last_code.name if m.conn.last_code else ''})" for m in self._members]
        return KeyNotFound(self.name, f"no key {ref} on any member: " + "; ".join(said))

    def _member_states(self) -> dict[str, tuple[str, Any]]:
        return {m.conn.name: (f"{m.conn.state} (kept out: {m.mismatch})" if m.mismatch else m.conn.state,
                              m.conn.last_code) for m in self._members}

    # -- the call path ----------------------------------------------------------

    def _call(self, op: str, invoke: Callable[[SlotConnection], Any], mechanism: Any = None,
              deadline: float | None = None, recorded: bool = False) -> Any:
        if not recorded and self._call_listeners.items:
            return self._call_recorded(op, invoke, mechanism, deadline)
        if self._forked:
            self._after_fork()
        until = self._now() + (self._deadline if deadline is None else deadline)
        mech: str | None = None
        if mechanism is not None:
            mech = self._mech_names.get(mechanism)
            if mech is None:  # not looked up yet (or a value without a name: looked up each time)
                mech = self._mech_names[mechanism] = mechanism_name(mechanism)
        tried: set[str] = set()
        rejected: list[str] = []  # members whose signature failed the check: not asked again in this call
        checked: set[str] | None = None  # members whose replica check this call ran
        reissues = 0  # as one connection counts them: operations.max_reissues bounds a pool's call too
        while True:
            if self.recovery_mode == "in_call":
                self._recover_in_call()
            member = self._choose(tried, mech)
            if member is None:
                if mech is not None:
                    self._refuse_mechanism(op, mech)
                if checked is None:
                    checked = set()
                if self._check_unchecked(tried, checked):
                    continue
                if tried and any(self._eligible(m, mech) and m.conn.name not in rejected for m in self._members):
                    tried.clear()  # everyone serving was tried once: go round again, within the deadline
                    tried.update(rejected)
                    continue
                if rejected and all(m.conn.name in rejected or m.mismatch is not None for m in self._members):
                    raise self._none_served(op, mech, rejected)  # nobody left who could answer otherwise
                if not self._wait_for_a_member(until, mech, rejected):
                    raise self._none_served(op, mech, rejected)
                continue
            try:
                return invoke(member.conn)
            except HSMError as exc:
                if not rules.pool_may_reissue(exc, self.policy.is_idempotent(RULE_OPERATION.get(op, op))):
                    raise
                tried.add(member.conn.name)
                if getattr(exc, "signature_rejected", False):  # its answer failed the caller's check
                    rejected.append(member.conn.name)
                    if self._now() >= until or reissues >= self.policy.operations.max_reissues:
                        raise self._none_served(op, mech, rejected) from exc
                elif self._now() >= until or (exc.counts_as_reissue
                                              and reissues >= self.policy.operations.max_reissues):
                    raise
                reissues += exc.counts_as_reissue

    def _call_recorded(self, op: str, invoke: Callable[[SlotConnection], Any], mechanism: Any,
                       deadline: float | None) -> Any:
        """:meth:`_call` while call listeners are registered: counts the members it asks, and
        records the call once it has returned or raised (outside every lock)."""
        call = PoolCall(self, op, self._now())

        def attempt(conn: SlotConnection) -> Any:
            call.attempts += 1
            call.member = conn.name
            return invoke(conn)

        push_pool_call(call)
        outcome: tuple[str, Any] = ("ok", None)
        try:
            return self._call(op, attempt, mechanism, deadline, recorded=True)
        except BaseException as exc:
            outcome = outcome_of(exc)
            raise
        finally:
            pop_pool_call(call)
            seconds = self._now() - call.started
            name, code = outcome
            self._call_listeners.emit(CallRecord(
                self._clock.time() - seconds, self.name, call.member, op, name, code.name if code else None,
                code.value if code else None, seconds, call.attempts, call.attempts > 1, "call"))

    def _refuse_mechanism(self, op: str, mech: str) -> None:
        """Raise at once when every member's token is known to lack ``mech``."""
        lists = [m.conn.mechanisms for m in self._members]
        if all(ms is not None and mech not in ms for ms in lists):
            raise MechanismNotSupported(self.name, f"{op}: no member offers mechanism {mech} "
                                        f"({', '.join(m.conn.name for m in self._members)} lack it)", mech)

    def _none_served(self, op: str, mech: str | None, rejected: list[str]) -> HSMError:
        """The error for a call no member could answer within the deadline."""
        states = self._member_states()
        others = ", ".join(f"{name} {state} {code.name if code else 'no code yet'}"
                           for name, (state, code) in states.items() if name not in rejected)
        if rejected:
            return signature_rejected(self.name, f"{op}: the signature from {', '.join(rejected)} failed the "
                                      f"caller's check and was not returned; no other member signed within the "
                                      f"deadline ({others or 'no other member'})")
        if mech is not None:
            lacking = [m.conn.name for m in self._members
                       if m.conn.serving and (ms := m.conn.mechanisms) is not None and mech not in ms]
            if lacking:
                return MechanismNotSupported(self.name, f"{op}: mechanism {mech} is offered by no member that "
                                             f"serves ({', '.join(lacking)} lack it; {others})", mech)
        return AllMembersDown(self.name, states)

    def _choose(self, tried: set[str], mech: str | None = None) -> _Member | None:
        """The member for the next call: healthy actives first, degraded ones, standbys, then suspected ones."""
        for group in self._groups(tried, mech):
            if group:
                return self._pick(group)
        return None

    def _groups(self, tried: set[str], mech: str | None = None
                ) -> tuple[list[_Member], list[_Member], list[_Member], list[_Member]]:
        healthy: list[_Member] = []
        degraded: list[_Member] = []
        standby: list[_Member] = []
        suspected: list[_Member] = []
        version = self._key_version
        for m in self._members:
            c = m.conn
            if c.name in tried or not c.serving:
                continue
            if version and (m.mismatch is not None or m.checked_version != version
                            or m.checked_generation != c._g.number):
                continue  # a replica whose keys differ, or not yet checked in this generation
            if mech is not None and (ms := c._last_mechanisms) is not None and mech not in ms:
                continue  # the member's token lacks the mechanism
            if m.suspected:
                suspected.append(m)  # asked only when no other member serves
            elif m.standby:
                standby.append(m)
            elif c.state is State.DEGRADED:
                degraded.append(m)
            else:
                healthy.append(m)
        return healthy, degraded, standby, suspected

    def _pick(self, group: list[_Member]) -> _Member:
        """By the balancing rule, counting sessions: ``least_busy`` takes the member with the most free
        sessions (``sessions.max`` less those leased); ``round_robin`` passes over a member whose
        sessions are all leased while another in the group has one free."""
        if len(group) == 1 or self.balance == "primary":
            return group[0]
        if self.balance == "least_busy":
            return max(group, key=lambda m: m.conn._max_sessions - m.conn.inflight)
        n = len(group)
        first = next(self._rr)
        for i in range(n):
            m = group[(first + i) % n]
            c = m.conn
            g = c._g
            if g.idle or len(g.leases) < c._max_sessions:
                return m
        return group[first % n]

    def _wait_for_a_member(self, deadline: float, mech: str | None = None, done: Iterable[str] = ()) -> bool:
        """Wait, within the deadline, for a member to serve that may take the call (offers ``mech``,
        passed its replica check, not in ``done``); False when the deadline has passed.

        In-call mode wakes every 50 ms to look again: there a member comes back
        only when a call asks it to, so waiting for the notification alone would
        wait for nothing.
        """
        remaining = deadline - self._now()
        if remaining <= 0:
            return False
        step = min(remaining, 0.05) if self.recovery_mode == "in_call" else remaining
        skip = set(done)
        with self._changed:
            self._changed.wait_for(lambda: any(self._eligible(m, mech) and m.conn.name not in skip
                                               for m in self._members), timeout=step)
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
        cleared = None
        with self._changed:
            if m is not None and record.dest in SERVING:
                m.schedule.succeeded()
            if m is not None and m.suspected and (record.dest not in SERVING or record.event is Event.LOGIN_OK):
                cleared = self._clear(m, "it logged in again" if record.event is Event.LOGIN_OK
                                      else f"it left service ({record.event}); judged afresh when it is back")
            self._changed.notify_all()
            check = m is not None and record.event is Event.LOGIN_OK and bool(self._known)
        if cleared is not None:
            self._emit_suspicion(cleared)
        if check and m is not None:
            self._check_member(m)  # the replica check: here, with no lock held (module text)

    # -- suspicion (module text) -----------------------------------------------------

    def add_suspicion_listener(self, listener: SuspicionListener) -> None:
        """Call ``listener(record)`` with a :class:`~hsmfsm.core.records.SuspicionRecord` each time a
        member becomes suspected or stops being so, never under a lock (in the member's watchdog
        tick, its caller's or its supervisor's thread). A listener that raises is logged."""
        self._suspicion_listeners.append(listener)

    def _serves_unsuspected(self, m: _Member) -> bool:
        """(Under the pool's lock.) Whether ``m`` could take calls in another's place."""
        return m.conn.serving and not m.suspected and m.mismatch is None

    def _overran(self, conn: SlotConnection, overrun: tuple[str, float, float] | None) -> bool:
        """A member's watchdog tick: one of its calls is past its suspicion limit (``overrun``:
        operation, seconds it has run, the limit), or (None) the member is suspected and has calls in
        flight. Decides under the pool's lock (:func:`rules.decide_suspicion`), reports outside it;
        True when the member is suspected and another member serves: the member then cuts off its
        idempotent calls in flight, for their callers to re-issue elsewhere."""
        m = self._by_name.get(conn.name)
        if m is None:
            return False
        record = None
        now = self._now()
        with self._lock:
            others = [o for o in self._members if o is not m and self._serves_unsuspected(o)]
            if not m.suspected:
                if overrun is None or not others or not conn.serving:
                    return False
                op, elapsed, limit = overrun
                alternatives = [o.conn.latency_p99(op, now) for o in others]
                d = rules.decide_suspicion(self.policy, operation=op, elapsed=elapsed, limit=limit,
                                           alternatives=alternatives)
                if not d.suspect:
                    return False
                m.suspected = conn._suspected = True
                record = SuspicionRecord(self._clock.time(), self.name, m.conn.name, "suspected", op, elapsed, limit,
                                         d.reason)
            cut = bool(others)
        if record is not None:
            conn.request_probe()  # does it still answer?
            log.warning("%s: %s is suspected: %s; no new calls go to it while another member serves, and its "
                        "idempotent calls in flight go to another now", self.name, conn.name, record.reason)
            self._emit_suspicion(record)
        return cut

    def _answered(self, conn: SlotConnection) -> None:
        """A suspected member answered (a call, or its probe): the mark goes."""
        m = self._by_name.get(conn.name)
        if m is None:
            return
        with self._lock:
            record = self._clear(m, "it answered") if m.suspected else None
        if record is not None:
            self._emit_suspicion(record)

    def _clear(self, m: _Member, reason: str) -> SuspicionRecord:
        """Take ``m``'s mark away (caller holds the pool's lock); the record to emit once it is released."""
        m.suspected = m.conn._suspected = False
        return SuspicionRecord(self._clock.time(), self.name, m.conn.name, "cleared", None, None, None, reason)

    def _emit_suspicion(self, record: SuspicionRecord) -> None:
        if record.kind == "cleared":
            log.info("%s: %s is no longer suspected: %s", self.name, record.member, record.reason)
        for listener in list(self._suspicion_listeners):
            try:
                listener(record)
            except Exception:
                log.exception("%s: a suspicion listener failed on %s", self.name, record)


    def _after_fork(self) -> None:
        """In a forked child, on the first call: every member drops what it inherited and
        reconnects (``SlotConnection._check_fork``); until then none of them serves."""
        self._forked = False
        for m in self._members:
            m.conn._check_fork()

    def _after_fork_in_child(self) -> None:
        self._lock = self._clock.lock()
        self._changed = self._clock.condition(self._lock)  # another thread may have held it at the fork
        self._call_listeners.after_fork_in_child()
        self._health_watch.after_fork_in_child()
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
            ("  (host process)" if r.isolation == "process" else "") + ("  (suspected)" if r.suspected else "")
        kept_out = f"   kept out: {r.error}" if r.error else ""
        flaky = f"   {r.link_failures} failed link set-up(s)" if r.link_failures else ""
        lines.append(f"  {r.name:<{width}}   {r.state:<12} {code}{extra}{role}{kept_out}{flaky}")
    serving = sum(1 for r in rows if r.state in SERVING and not r.error)
    lines.append(f"Status: serving on {serving} of {len(rows)} members")
    return "\n".join(lines)
