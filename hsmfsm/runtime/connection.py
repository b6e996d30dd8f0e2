"""A slot connection: one application's link to one token, kept alive by its policy.

An I/O shell around the rule-book (:mod:`hsmfsm.core.rules`): it makes the
PKCS#11 calls, asks the rule-book what each answer means, and does what it
says. Three kinds of thread touch a connection, and each has one job:

- **Callers** (``sign`` and friends) run the PKCS#11 call in their own thread
  on a leased session. The success path takes no lock and fires no event: it
  pops a lease, stamps the start time for the watchdog, signs, and pushes the
  lease back. On an error, the caller asks the rule-book (phase ``call``),
  fires the event it names, then waits (within the call's deadline) for
  recovery and re-issues if the rule-book says so.
- **The supervisor** (one thread per connection, :mod:`.supervisor`) does all
  recovery I/O: reinitialising the module, opening sessions, logging in, and
  the health probe that brings an *idle* connection back without waiting for
  a caller.
- **The watchdog** (one per clock) cuts off calls that overran the call
  timeout, so a hung HSM yields an error instead of a hang.

Decisions are made under ``_lock``; PKCS#11 calls are made, and listeners
called, outside it (records wait in an outbox until the lock is released).
The module and the clock are given (:mod:`.edge`): production passes
python-pkcs11 (:class:`hsmfsm.p11.P11Module`) and the system clock; tests and
the simulator pass :mod:`hsmfsm.testing`'s scripted module and virtual clock.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config.pin import PinSource, PinSpec
from ..core import rules
from ..core.codes import CALL_TIMEOUT, Code
from ..core.errors import (
    HSMError,
    KeyNotFound,
    LoginRejected,
    MechanismNotSupported,
    MemberUnavailable,
    ModuleCallError,
    OperationFailed,
)
from ..core.policy import Policy
from ..core.records import CallListener, Listener, TransitionRecord
from ..core.recovery import HealthTracker, ReconnectSchedule
from ..core.states import ENDS_ATTEMPT, ENDS_GENERATION, SERVING, Event, SlotMachine, State, is_legal
from ..p11.adapter import ISOLATION, P11Module
from .clock import SYSTEM
from .edge import PRIVATE_KEY, PUBLIC_KEY, Clock, Module
from .generation import CallSlot, Generation, Lease
from .keyops import RULE_OPERATION, key_ref, mechanism_name, public_key_of, signature_rejected
from .listeners import Attempts, CallListeners, Listeners
from .supervisor import Supervisor
from .watchdog import watchdog_for

if TYPE_CHECKING:
    from ..keys.backend import KeyRef, SignatureCheck

log = logging.getLogger("hsmfsm.connection")

#: Every connection of this process, for the fork hook.
_LIVE: weakref.WeakSet[SlotConnection] = weakref.WeakSet()
#: In a forked child: the generations and module instances inherited from the parent, kept
#: here for good on purpose. Their python-pkcs11 objects (lib, sessions, keys) belong to the
#: parent's server-side state: closing them, or letting a finaliser run (python-pkcs11's lib
#: deallocator calls C_Finalize), would act on the parent's sessions. A leak, bounded by one
#: set per connection per fork.
_INHERITED: list[Any] = []
#: A mechanism argument not yet checked against the current generation's mechanism list.
_UNCHECKED = object()
#: The codes a key lookup answers when the key is not there (or not there once).
_NOT_FOUND = frozenset({"HSMFSM_NO_SUCH_KEY", "HSMFSM_MULTIPLE_OBJECTS"})


class Busy(ModuleCallError):
    """The module's call lock stayed taken for a whole call timeout (a caller hangs in it)."""

    def __init__(self) -> None:
        super().__init__(CALL_TIMEOUT, "the module's call lock stayed taken for the call timeout")


class _OpenFailed(Exception):
    """Opening a session for a caller failed; carries whether the watchdog cut it off."""

    def __init__(self, error: ModuleCallError, timed_out: bool) -> None:
        super().__init__(error)
        self.error, self.timed_out = error, timed_out


class SlotConnection:
    """A PKCS#11 slot connection driven by a recovery policy.

    ``module`` is the PKCS#11 module path, or a module object of the
    :class:`~hsmfsm.runtime.edge.Module` shape (such as
    :class:`hsmfsm.testing.ScriptedModule`); ``env`` is applied while a path
    loads (``P11_KIT_SERVER_ADDRESS`` for p11-kit-client). ``pin`` is
    ``env:NAME``, ``file:PATH`` or a callable. ``clock`` (default: the system
    clock) supplies time, threads and locks. Use as a context manager, or
    call :meth:`open` and :meth:`close`.

    ``isolation="process"`` runs the module in a process of its own behind a
    private ``p11-kit server`` (:mod:`hsmfsm.p11.host`): a call hung inside a
    vendor module can then be cut off at the call timeout, which no in-process
    module allows. ``"none"`` (the default) loads the module here.
    """

    def __init__(self, module: str | Module, token_label: str, pin: PinSpec, policy: Policy | None = None,
                 name: str | None = None, env: dict[str, str] | None = None, *,
                 probe: bool = True, rand: Callable[[], float] | None = None,
                 wait_for_recovery: bool = True, auto_recover: bool = True,
                 isolation: str = "none", clock: Clock | None = None) -> None:
        if isolation not in ISOLATION:
            raise ValueError(f"isolation must be one of {', '.join(ISOLATION)}, not {isolation!r}")
        if policy is None:
            from ..config.policy_file import default_policy
            policy = default_policy()
        self.name = name or token_label
        self.token_label = token_label
        self.policy = policy
        self._pin = PinSource(pin)
        self.isolation = isolation
        self._module: Module
        if isinstance(module, str):
            self._module = P11Module(module, env, token_label, self.name, isolation)
        else:
            if isolation != "none":
                raise ValueError("isolation applies to a module path; a module object runs as it is")
            self._module = module
        self._clock = clock = clock or SYSTEM
        self._now = clock.monotonic
        self._watchdog = watchdog_for(clock)
        self._machine = SlotMachine(self.name)
        self._lock = clock.lock()
        self._changed = clock.condition(self._lock)
        self._wake = clock.signal()
        self._g = Generation(1)
        self._retired: list[Generation] = []
        self._schedule = ReconnectSchedule(policy.connect, rand or clock.random)
        self._health = HealthTracker(policy.degraded, policy.probe)
        self._listeners = Listeners()
        #: Records of transitions decided under the lock, emitted once it is released.
        self._outbox: list[TransitionRecord] = []
        self._flushing = False
        self._supervisor_slot = CallSlot()
        self._supervisor: Any = None
        self._supervisor_ident: int | None = None
        self._steps = Supervisor(self)
        self._probe_enabled = probe
        #: False in an HA pool: a failing member raises at once and the pool goes elsewhere.
        self._wait_for_recovery = wait_for_recovery
        #: False for in-call recovery: the supervisor attempts only when :meth:`request_recovery` asks.
        self._auto_recover = auto_recover
        self._recovery_requested = False
        self._closing = False
        #: Serialises calls into modules that are unsafe for concurrent callers. p11-kit-client
        #: is one: when a call fails, it closes its socket while another thread may be about to
        #: read that fd number, which a new socket may reuse (measured: a probe thread wedged
        #: for good). It serves one request at a time per connection anyway (docs/FACTS.md).
        self._call_lock: Any = clock.lock() if self._module.can_cut_off else None
        self._failure: HSMError | None = None
        #: C_Initialize calls made on the module instance (see ``Generation.epoch``).
        self._epoch = 0
        self.last_code: Code | None = None
        #: C_Login calls made, ever: auditors and tests count them (a wrong PIN is tried once).
        self.login_attempts = 0
        #: Events the rule-book asked for that the state did not accept (raced by another
        #: thread's transition): counted per (state, event), and logged at DEBUG, never dropped silently.
        self.ignored_events: collections.Counter[tuple[State, Event]] = collections.Counter()
        ops = policy.operations
        self._timeout, self._deadline = ops.call_timeout, ops.deadline
        self._max_reissues = ops.max_reissues
        #: The policy with another deadline, for the rule-book's messages when a call gave ``deadline=``.
        self._deadline_policies: dict[float, Policy] = {}
        #: The token's mechanism list as last read (kept across reconnects: a pool routes by it while
        #: the member is down), None until one was read.
        self._last_mechanisms: frozenset[str] | None = None
        self._slow = policy.degraded.slow_call
        self._pid = os.getpid()
        self._fork_restart = False
        #: Call listeners (:meth:`add_call_listener`); none: the call path makes no call records.
        self._call_listeners = CallListeners()
        #: UNIX time the connection entered its current state (:attr:`since`).
        self._since = clock.time()
        _LIVE.add(self)

    # -- public surface -----------------------------------------------------

    @property
    def state(self) -> State:
        """The current state (a :class:`State`, equal to its name as a string)."""
        return self._machine.current

    @property
    def generation(self) -> int:
        return self._g.number

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def mechanisms(self) -> frozenset[str] | None:
        """The token's mechanisms (names without CKM_), read at each connect; the last list read while
        the connection is down; None when none was read (yet), or the module could not say."""
        g = self._g
        return g.mechanisms if g.mechanisms is not None else self._last_mechanisms

    @property
    def _host(self) -> Any:
        """The host process of ``isolation: process`` (tests and the soak look at it)."""
        return getattr(self._module, "host", None)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(record)`` on every transition, in order, never under a lock:
        a listener may call :meth:`reset`, :meth:`close` or the pool's ``recover``."""
        self._listeners.add(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def add_call_listener(self, listener: CallListener) -> None:
        """Call ``listener(record)`` with a :class:`~hsmfsm.core.records.CallRecord` for each attempt
        of every operation on this connection (``kind`` ``"attempt"``; a call the connection re-issues
        makes one per try), in the caller's thread once the attempt's outcome is known, never under
        a lock. A listener that raises is logged, never propagated into the call."""
        self._call_listeners.add(listener)

    def remove_call_listener(self, listener: CallListener) -> None:
        self._call_listeners.remove(listener)

    @property
    def since(self) -> float:
        """UNIX time the connection entered its current state."""
        return self._since

    @property
    def sessions(self) -> int:
        """Sessions open in the current generation: the logged-in anchor and the callers' sessions."""
        g = self._g
        return len(g.leases) + (g.anchor is not None)

    def open(self, wait: float | None = None) -> SlotConnection:
        """Start the supervisor and wait up to ``wait`` seconds (default: the policy's deadline)
        for ``logged_in``. An HSM that is down does not make this fail: the supervisor keeps
        trying per the policy. A rejected PIN does: it raises :class:`LoginRejected`."""
        self._check_fork(restart=False)
        with self._lock:
            if self._supervisor is None:
                self._recovery_requested = True  # the first connect is no recovery: made in every mode
                self._start_supervisor()
            self._changed.wait_for(lambda: self._g.ready or self._machine.current is State.FAILED,
                                   timeout=self._deadline if wait is None else wait)
            failure = self._failure if self._machine.current is State.FAILED else None
        self._flush()
        if failure is not None:
            raise failure
        return self

    def _start_supervisor(self) -> None:
        """(Caller holds ``_lock``.)"""
        self._closing = False
        self._supervisor = self._clock.start_thread(self._steps.run, f"hsmfsm-supervisor-{self.name}")
        self._watchdog.register(self)

    def close(self) -> None:
        """Stop recovery, drain the calls in flight, and finalise the module."""
        self._check_fork(restart=False)
        with self._lock:
            self._closing = True
            if is_legal(self._machine.current, Event.CLOSE):
                self._fire(Event.CLOSE)
            supervisor, self._supervisor = self._supervisor, None
            self._changed.notify_all()
        self._flush()
        self._wake.set()
        if supervisor is not None and self._supervisor_ident != threading.get_ident():
            supervisor.join(self._timeout + 1.0)  # not when a listener in the supervisor closes
        if self._steps.drain(self._timeout) or self._cut_off()[1]:
            try:
                self._steps.watched(self._module.finalize)
            except Busy:
                log.warning("%s: closed without C_Finalize: a call is still stuck in the module", self.name)
        self._watchdog.unregister(self)
        self._module.stop()

    def __enter__(self) -> SlotConnection:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def serving(self) -> bool:
        """True while calls are served (``logged_in`` or ``degraded``)."""
        return self._g.ready

    @property
    def inflight(self) -> int:
        """Calls in progress right now (sessions leased)."""
        g = self._g
        return len(g.leases) - len(g.idle)

    def request_recovery(self) -> None:
        """In-call recovery: make one recovery attempt now (the supervisor runs it)."""
        with self._lock:
            self._recovery_requested = True
        self._wake.set()

    def recovery_status(self) -> tuple[int, float | None]:
        """(consecutive failed attempts, seconds until the next one or None)."""
        next_at = self._schedule.next_at
        return self._schedule.attempts, (None if next_at is None else max(0.0, next_at - self._now()))

    def reset(self) -> None:
        """Leave ``failed`` (after the PIN or the token was fixed) and start recovering again."""
        self._check_fork()
        with self._lock:
            self._fire(Event.RESET)
            self._failure = None
            self._schedule.reset()
        self._flush()
        self._wake.set()

    def __repr__(self) -> str:
        g = self._g
        return (f"<SlotConnection {self.name} {self.state} generation={g.number} "
                f"sessions={len(g.leases) - len(g.idle)} busy/{len(g.idle)} idle last={self.last_code}>")

    # -- operations ---------------------------------------------------------
    #
    # Every operation takes ``deadline=`` (seconds, instead of the policy's deadline for this
    # call); the key operations find their key by label, ``key_id=`` (CKA_ID) or both. A
    # mechanism the token lacks (its list read at connect) is refused before anything is sent.

    def sign(self, key_label: str | None, data: bytes, mechanism: Any = None, mechanism_param: Any = None, *,
             key_id: bytes | None = None, deadline: float | None = None,
             check: SignatureCheck | None = None) -> bytes:
        """Sign ``data`` with the private key labelled ``key_label`` (and/or with CKA_ID ``key_id``).

        ``check``: called with the signature before it is returned; a signature that fails it is
        never returned: it counts as an impaired call (not as a good one), and the call is re-issued
        up to ``operations.max_reissues`` times within the deadline, then raises
        :class:`hsmfsm.keys.SignatureMismatch`. A pool member raises at the first, and the pool
        asks another member."""
        mech = self._g.mech_values.get(mechanism, _UNCHECKED)
        if mech is _UNCHECKED:
            mech = self._mechanism_value(mechanism, "sign")
        m = self._module
        result: bytes = self._perform("sign", (key_label, PRIVATE_KEY, key_id),
                                      lambda key: m.sign(key, data, mech, mechanism_param), deadline, check)
        return result

    def verify(self, key_label: str | None, data: bytes, signature: bytes, mechanism: Any = None,
               mechanism_param: Any = None, *, key_id: bytes | None = None, deadline: float | None = None) -> bool:
        mech = self._g.mech_values.get(mechanism, _UNCHECKED)
        if mech is _UNCHECKED:
            mech = self._mechanism_value(mechanism, "verify")
        m = self._module
        result: bool = self._perform("verify", (key_label, PUBLIC_KEY, key_id),
                                     lambda key: m.verify(key, data, signature, mech, mechanism_param), deadline)
        return result

    def decrypt(self, key_label: str | None, data: bytes, mechanism: Any = None, mechanism_param: Any = None, *,
                key_id: bytes | None = None, deadline: float | None = None) -> bytes:
        mech = self._g.mech_values.get(mechanism, _UNCHECKED)
        if mech is _UNCHECKED:
            mech = self._mechanism_value(mechanism, "decrypt")
        m = self._module
        result: bytes = self._perform("decrypt", (key_label, PRIVATE_KEY, key_id),
                                      lambda key: m.decrypt(key, data, mech, mechanism_param), deadline)
        return result

    def generate_random(self, nbytes: int, *, deadline: float | None = None) -> bytes:
        m = self._module
        result: bytes = self._perform("generate_random", None, lambda s: m.generate_random(s, nbytes), deadline)
        return result

    def generate_keypair(self, key_type: Any, bits: int, label: str, *, deadline: float | None = None) -> Any:
        """Not idempotent: never re-issued once it may have reached the HSM."""
        m = self._module
        return self._perform("generate_keypair", None, lambda s: m.generate_keypair(s, key_type, bits, label),
                             deadline)

    def objects(self, *, deadline: float | None = None) -> list[dict[int, Any]]:
        """Every object the token shows the logged-in session, with its public, immutable
        attributes (:meth:`Module.list_objects`): what a virtual slot lists to its applications."""
        m = self._module
        result: list[dict[int, Any]] = self._perform("list_objects", None, m.list_objects, deadline)
        return result

    def mechanism_infos(self, *, deadline: float | None = None) -> dict[int, tuple[int, int, int]]:
        """{CKM value: (min key size, max key size, flags)} of the token (:meth:`Module.mechanism_infos`)."""
        m = self._module
        g = self._g
        result: dict[int, tuple[int, int, int]] = self._perform(
            "mechanism_infos", None, lambda _session: m.mechanism_infos(g.token), deadline)
        return result

    def generate_keypair_raw(self, mechanism: int, parameter: bytes | None, public: dict[int, Any],
                             private: dict[int, Any], *, deadline: float | None = None
                             ) -> tuple[dict[int, Any], dict[int, Any]]:
        """C_GenerateKeyPair with an application's templates (:meth:`Module.generate_keypair_raw`):
        the virtual slot's ``keygen: primary``. Not idempotent: never re-issued once it may have
        reached the HSM (:class:`~hsmfsm.core.errors.OutcomeUnknown`)."""
        m = self._module
        result: tuple[dict[int, Any], dict[int, Any]] = self._perform(
            "generate_keypair", None, lambda s: m.generate_keypair_raw(s, mechanism, parameter, public, private),
            deadline)
        return result

    # -- keys ---------------------------------------------------------------

    def public_key(self, label: str | None = None, *, key_id: bytes | None = None, uri: str | None = None,
                   deadline: float | None = None) -> Any:
        """The public half of a key on the token, as a ``cryptography`` public key: read from the
        token (:meth:`Module.key_attributes`) once per key and generation (a reconnect reads it again).

        By label, ``key_id`` (CKA_ID) or both, or a ``pkcs11:`` URI. No such key, or more than
        one: :class:`~hsmfsm.core.errors.KeyNotFound` naming the lookup and the token's answer."""
        ref = key_ref(label, key_id, uri)
        g = self._g
        found = g.public_keys.get(ref)
        if found is not None:
            return found
        return self._read_public_key(ref, deadline)

    def private_key(self, label: str | None = None, *, key_id: bytes | None = None, uri: str | None = None,
                    public_key: Any = None, verify: bool = False, hash_locally: bool = True) -> Any:
        """A ``cryptography`` private key object whose operations run on this connection's token
        (:func:`hsmfsm.keys.bind_private_key`). ``public_key``: the key's public half if known
        (else read with :meth:`public_key`); ``verify``: check every signature against it before
        returning it; ``hash_locally``: hash in Python and sign the digest (RSA_PKCS, RSA_PKCS_PSS,
        ECDSA) rather than with the hash-and-sign mechanisms."""
        from ..keys import bind_private_key

        ref = key_ref(label, key_id, uri, kinds=("private",))
        if public_key is None:
            public_key = self.public_key(ref.label, key_id=ref.key_id)
        return bind_private_key(self, ref, public_key, verify=verify, hash_locally=hash_locally)

    def _read_public_key(self, ref: KeyRef, deadline: float | None) -> Any:
        m = self._module

        def read(session: Any) -> dict[str, Any]:
            try:
                key = self._lookup_key(session, ref.label, PRIVATE_KEY, ref.key_id)
            except ModuleCallError as exc:
                if exc.code.name != "HSMFSM_NO_SUCH_KEY":
                    raise
                try:  # no private key: a public key object alone will do
                    key = self._lookup_key(session, ref.label, PUBLIC_KEY, ref.key_id)
                except ModuleCallError:
                    raise exc from None
            return m.key_attributes(session, key)

        g = self._g
        try:
            attributes = self._perform("public_key", None, read, deadline)
        except OperationFailed as exc:
            cause = exc.__cause__
            if exc.code is None or exc.code.name not in _NOT_FOUND or not isinstance(cause, ModuleCallError):
                raise
            raise KeyNotFound(self.name, f"public_key: {ref}: {cause.detail or exc.code.name}", exc.code,
                              exc.state) from exc
        key = public_key_of(attributes)
        if self._g is g:  # read in this generation (else it may be an older one's: not kept)
            g.public_keys[ref] = key
        return key

    def _lookup_key(self, session: Any, label: str | None, kind: str, key_id: bytes | None) -> Any:
        if key_id is None:  # the Module shape before CKA_ID lookups took three arguments
            return self._module.find_key(session, label, kind)
        return self._module.find_key(session, label, kind, key_id)

    def _mechanism_value(self, mechanism: Any, op: str) -> Any:
        """The module's value for ``mechanism``, checked against the token's mechanism list
        (the slow path of a call: once per mechanism and generation)."""
        g = self._g
        value = self._module.mechanism(mechanism)
        name = mechanism_name(value)
        known = g.mechanisms if g.mechanisms is not None else self._last_mechanisms
        if name is not None and known is not None and name not in known:
            raise MechanismNotSupported(self.name, f"{op}: the token does not offer mechanism {name}", name,
                                        self._machine.current)
        if g.mechanisms is not None:
            g.mech_values[mechanism] = value
        return value

    def _rejected(self, op: str, g: Generation, reissues: int, started: float, deadline: float | None,
                  attempts: Attempts | None = None) -> int:
        """An answer failed its caller's check: an impaired call for the health tracker (as a capacity
        code is, which can take the connection to ``degraded``), then re-issue (returns the count) or
        raise. A pool member raises at once, marked for the pool to ask another member."""
        log.warning("%s: a %s answer failed the caller's check; counted as an impaired call", self.name, op)
        with self._lock:
            if g is self._g:
                self._fire_verdict(self._health.call_impaired(), None)
        self._flush()
        limit = self._deadline if deadline is None else deadline
        if self._wait_for_recovery and reissues < self._max_reissues and self._now() - started < limit:
            if attempts is not None:
                attempts.end("SignatureMismatch", None)  # hsmfsm.keys' class, not imported for a name
            return reissues + 1
        error = signature_rejected(self.name, f"{op}: {reissues + 1} answer(s) from {self.name} failed the "
                                   f"caller's check (re-issued {reissues} time(s)); none was returned")
        if not self._wait_for_recovery:
            error.reissue, error.may_have_acted = True, False
            error.signature_rejected = True  # type: ignore[attr-defined]  # read by the pool
        raise error

    # -- the call path ------------------------------------------------------

    def _perform(self, op: str, lookup: tuple[str | None, str, bytes | None] | None, call: Callable[[Any], Any],
                 deadline: float | None = None, accept: Callable[[Any], bool] | None = None,
                 attempts: Attempts | None = None) -> Any:
        if attempts is None and self._call_listeners.items:
            return self._perform_recorded(op, lookup, call, deadline, accept)
        started = self._now()
        reissues = 0
        while True:
            g = self._g
            if not g.ready:
                self._await_ready(op, started, deadline)
                continue
            try:
                lease = g.idle.pop()
            except IndexError:
                try:
                    new = self._new_lease(g)
                except _OpenFailed as failure:  # nothing of ``op`` was sent: even a non-idempotent call may go again
                    reissues = self._after_error(op, g, failure.error.code, failure.timed_out, reissues, started,
                                                 sent=False, cause=failure.error, deadline=deadline,
                                                 attempts=attempts)
                    continue
                if new is None:
                    continue
                lease = new
            if g is not self._g:  # retired between the read and the pop: never use it
                g.idle.append(lease)
                continue
            lock = self._call_lock
            if lock is not None:
                lock.acquire()  # the watchdog's clock starts inside: waiting here is not the HSM's fault
            lease.started = t0 = self._now()
            try:
                if lookup is None:
                    target = lease.session
                else:
                    target = lease.keys.get(lookup) or self._find_key(lease, lookup)
                result = call(target)
            except ModuleCallError as exc:
                timed_out = lease.timed_out
                lease.started, lease.timed_out = 0.0, False
                if lock is not None:
                    lock.release()
                g.idle.append(lease)
                reissues = self._after_error(op, g, exc.code, timed_out, reissues, started, cause=exc,
                                             deadline=deadline, attempts=attempts)
                continue
            except BaseException:
                lease.started = 0.0
                if lock is not None:
                    lock.release()
                g.idle.append(lease)
                raise
            elapsed = self._now() - t0
            lease.started, lease.timed_out = 0.0, False
            if lock is not None:
                lock.release()
            g.idle.append(lease)
            if accept is not None and not accept(result):
                reissues = self._rejected(op, g, reissues, started, deadline, attempts)
                continue
            if elapsed > self._slow or not self._health.quiet:
                self._after_success(g, elapsed)
            return result

    def _perform_recorded(self, op: str, lookup: tuple[str | None, str, bytes | None] | None,
                          call: Callable[[Any], Any], deadline: float | None,
                          accept: Callable[[Any], bool] | None) -> Any:
        """:meth:`_perform` while call listeners are registered: the attempts it re-issues are
        recorded where it goes on (:meth:`_after_error`, :meth:`_rejected`), the last one here."""
        attempts = Attempts(self._call_listeners, self._clock, self.name, op)
        try:
            result = self._perform(op, lookup, call, deadline, accept, attempts)
        except BaseException as exc:
            attempts.failed(exc)
            raise
        attempts.end("ok", None)
        return result

    def _find_key(self, lease: Lease, lookup: tuple[str | None, str, bytes | None]) -> Any:
        """Called inside the call path (and its module lock, if any)."""
        label, kind, key_id = lookup
        if label is None and key_id is None:
            raise ValueError("a key is looked up by label or key_id: neither was given")
        key = lease.keys[lookup] = self._lookup_key(lease.session, label, kind, key_id)
        return key

    def _new_lease(self, g: Generation) -> Lease | None:
        """Open one more session (no PIN: login is per application, docs/FACTS.md) for a caller."""
        lease = Lease(g)
        with self._lock:
            if g is not self._g or not g.ready:
                return None
            g.leases.append(lease)  # counted before the open, so a drain waits for it
        try:
            if self._call_lock is None:
                lease.started = self._now()
                lease.session = self._module.open_session(g.token)
            else:
                with self._call_lock:
                    lease.started = self._now()
                    lease.session = self._module.open_session(g.token)
        except ModuleCallError as exc:
            with self._lock:
                g.leases.remove(lease)
            raise _OpenFailed(exc, lease.timed_out) from exc
        finally:
            lease.started = 0.0
        return lease

    def _after_error(self, op: str, g: Generation, code: Code, timed_out: bool, reissues: int, started: float,
                     sent: bool = True, cause: BaseException | None = None, deadline: float | None = None,
                     attempts: Attempts | None = None) -> int:
        """Ask the rule-book, fire its event, and do as it says: re-issue (returns the count) or raise."""
        if timed_out:
            code = CALL_TIMEOUT
        limit = self._deadline if deadline is None else deadline
        d = rules.decide_call(self._policy_for(deadline), code, operation=RULE_OPERATION.get(op, op),
                              timed_out=timed_out, sent=sent, in_pool=not self._wait_for_recovery,
                              reissues=reissues, deadline_passed=self._now() - started > limit)
        with self._lock:
            if g is self._g:
                self.last_code = code
                if d.count is rules.Reaction.IMPAIRED:
                    self._fire_verdict(self._health.call_impaired(), code)
                elif d.event is not None:
                    self._fire_if_legal(d.event, code)
            state = self._machine.current
        self._flush()
        if d.error is None:
            if attempts is not None:  # the connection goes again: a pool member would raise this
                attempts.end(MemberUnavailable.__name__, code)
            return reissues + 1
        error = d.error(self.name, f"{op} {d.reason}", code, state, reissue=d.reissue,
                        may_have_acted=d.may_have_acted)
        raise error from (None if timed_out else cause)

    def _policy_for(self, deadline: float | None) -> Policy:
        """The policy, or (for a call given ``deadline=``) a copy with that deadline, which the
        rule-book's messages then name."""
        if deadline is None or deadline == self._deadline:
            return self.policy
        found = self._deadline_policies.get(deadline)
        if found is None:
            if len(self._deadline_policies) > 64:
                self._deadline_policies.clear()
            found = self._deadline_policies[deadline] = dataclasses.replace(
                self.policy, operations=dataclasses.replace(self.policy.operations, deadline=deadline))
        return found

    def _after_success(self, g: Generation, elapsed: float) -> None:
        with self._lock:
            if g is self._g:
                self._fire_verdict(self._health.call_ok(elapsed), None)
        self._flush()

    def _await_ready(self, op: str, started: float, deadline: float | None = None) -> None:
        self._check_fork()
        limit = self._deadline if deadline is None else deadline
        remaining = started + limit - self._now() if self._wait_for_recovery else 0.0
        with self._lock:
            ok = remaining > 0 and self._changed.wait_for(
                lambda: self._g.ready or self._closing or self._machine.current is State.FAILED, remaining)
            state = self._machine.current
            failure, closing, last = self._failure, self._closing, self.last_code
        self._flush()
        if state is State.FAILED:
            if isinstance(failure, LoginRejected):
                raise failure
            raise MemberUnavailable(self.name, f"{op}: connection has failed and waits for reset()",
                                    last, state, may_have_acted=False)  # nothing was sent
        if closing:
            raise MemberUnavailable(self.name, f"{op}: connection is closed", last, state, may_have_acted=False)
        if not ok:
            raise MemberUnavailable(self.name, f"{op}: not serving within the deadline of "
                                    f"{limit:g}s" if self._wait_for_recovery else f"{op}: not serving",
                                    last, state, may_have_acted=False)

    # -- transitions --------------------------------------------------------

    def _fire(self, event: Event, code: Code | None = None) -> None:
        """Apply an event (caller holds ``_lock``): retire sessions, queue the record, wake everyone."""
        before, after = self._machine.fire(event)
        if event in ENDS_ATTEMPT:
            self._recovery_requested = False
        if event in ENDS_GENERATION:
            old = self._g
            old.ready = False
            self._retired.append(old)
            self._g = Generation(old.number + 1)
        else:
            self._g.ready = after in SERVING
        self._outbox.append(TransitionRecord(
            self._clock.time(), self.name, before, after, event,
            code.name if code else None, code.value if code else None,
            self._schedule.attempts, self._g.number))
        if after is not before:
            self._since = self._outbox[-1].time
        self._changed.notify_all()
        self._wake.set()

    def _fire_if_legal(self, event: Event, code: Code | None) -> bool:
        """Fire ``event`` if the state accepts it (caller holds ``_lock``); otherwise count and log it.

        A rule-book event can be refused when another thread's transition came first
        (the watchdog and a cut-off caller both record the same loss); the refusal is
        kept in :attr:`ignored_events`, never dropped silently.
        """
        state = self._machine.current
        if not is_legal(state, event):
            self.ignored_events[(state, event)] += 1
            log.debug("%s: event %s ignored in state %s (%s)", self.name, event, state, code or "no code")
            return False
        self._fire(event, code)
        return True

    def _fire_verdict(self, verdict: Any, code: Code | None) -> None:
        """A health tracker's verdict, through the rule-book's table (caller holds ``_lock``)."""
        event = rules.VERDICT_EVENT[verdict]
        if event is not None:
            self._fire_if_legal(event, code)

    def _flush(self) -> None:
        """Emit the queued records, in order, with no lock held. One thread emits at a time; a
        listener that causes transitions itself adds to the outbox, which the loop drains."""
        with self._lock:
            if self._flushing or not self._outbox:
                return
            self._flushing = True
        try:
            while True:
                with self._lock:
                    batch, self._outbox = self._outbox, []
                    if not batch:
                        self._flushing = False
                        return
                for record in batch:
                    self._listeners.emit(record)
        except BaseException:
            with self._lock:
                self._flushing = False
            raise

    # -- the watchdog's view ------------------------------------------------

    def _watchdog_tick(self, now: float) -> None:
        if self._pid != os.getpid():
            return  # a forked child's watchdog, before this connection dropped what it inherited
        limit = self._timeout
        overran = ours = False
        current = self._g
        slots: list[CallSlot] = [self._supervisor_slot, *current.leases]
        mine = len(slots)  # the supervisor's and the current generation's; then the retired ones'
        for g in list(self._retired):
            slots.extend(g.leases)
        for i, slot in enumerate(slots):
            started = slot.started
            if started and now - started > limit and not slot.timed_out and slot.started == started:
                slot.timed_out = True
                overran = True
                ours = ours or i < mine
        if overran:
            killed, cut = self._cut_off()
            log.warning("%s: a call overran %gs; cut %d socket(s) to the HSM%s", self.name, limit, cut,
                        f", killed {killed} stuck module process(es)" if self._host is not None else "")
            with self._lock:
                # Else the cut-off caller recorded the loss first, and a new attempt may have begun.
                # A call of a retired generation is cut off, not recorded: its loss is on the record
                # already, and a call_timeout now would knock down the attempt under way.
                if self._g is current and ours:
                    self.last_code = CALL_TIMEOUT
                    self._fire_if_legal(Event.CALL_TIMEOUT, CALL_TIMEOUT)
            self._flush()

    def _cut_off(self) -> tuple[int, int]:
        """Make every call stuck in the module return: (host processes killed, sockets cut)."""
        return self._module.cut_off()

    # -- fork ------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        """In a forked child, before anything else runs (``os.register_at_fork``). No I/O here.

        Only the forking thread exists in the child: the supervisor, the watchdog and
        every other caller are gone, and a lock one of them held stays held for good.
        So: fresh locks, no supervisor, and the generation stops serving, which sends
        the child's first call down the slow path to :meth:`_check_fork`.
        """
        self._lock = self._clock.lock()
        self._changed = self._clock.condition(self._lock)
        self._wake = self._clock.signal()
        if self._call_lock is not None:
            self._call_lock = self._clock.lock()
        self._listeners.after_fork_in_child()
        self._call_listeners.after_fork_in_child()
        self._supervisor_slot = CallSlot()
        self._fork_restart = self._supervisor is not None and not self._closing
        self._supervisor = None
        self._flushing = False
        self._g.ready = False

    def _check_fork(self, restart: bool = True) -> None:
        """In a forked child, on first use: drop what was inherited and connect afresh.

        Every inherited session is abandoned, never closed: over p11-kit-client the
        child's copy of the socket reaches the parent's server-side sessions, and a
        C_CloseSession, C_Logout or C_Finalize from here would log the parent out.
        The module gets a fresh instance (``Module.for_child``), the ``forked``
        event moves the connection to ``disconnected`` with a new generation, and
        the supervisor (if it ran in the parent) starts again here. A ``failed``
        connection stays failed: no child retries a rejected PIN.
        """
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            _INHERITED.append((self._g, self._retired, self._module))
            self._retired = []
            self._module = self._module.for_child()
            self._schedule.reset()
            self._health.reset()
            if self._fire_if_legal(Event.FORKED, None):
                self._retired = []  # the inherited generation: kept in _INHERITED, never drained
                self._recovery_requested = True  # a fork is no failure: connect now, in any recovery mode
            else:
                self._g = Generation(self._g.number + 1)
            if restart and self._fork_restart and self._supervisor is None:
                self._start_supervisor()
        self._flush()


def _after_fork_in_child() -> None:
    for conn in list(_LIVE):
        conn._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
