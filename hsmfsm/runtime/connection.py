"""A slot connection: one application's link to one token, kept alive by its policy.

Three kinds of thread touch a connection, and each has one job:

- **Callers** (``sign`` and friends) run the PKCS#11 call in their own thread
  on a leased session. The success path takes no lock and fires no event: it
  pops a lease, stamps the start time for the watchdog, signs, and pushes the
  lease back. On an error, the caller classifies the return code and fires the
  policy's event, then waits (within the call's deadline) for recovery and
  re-issues if the operation is idempotent.
- **The supervisor** (one thread per connection) does all recovery I/O:
  reinitialising the module, opening sessions, logging in, and the health
  probe that brings an *idle* connection back without waiting for a caller.
- **The watchdog** (one per process) cuts off calls that overran the call
  timeout, so a hung HSM yields an error instead of a hang.

Decisions are made under ``_lock``; PKCS#11 calls are made outside it.

Stale handles (docs/FACTS.md): after a reinitialise, old Session and key objects may
alias new handles. Every session belongs to a :class:`_Generation`; a loss
retires the generation, the supervisor waits until every lease of retired
generations is back (drain) before it reinitialises, and a lease whose
generation is not current is never used again, nor closed.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import pkcs11
from pkcs11 import ObjectClass
from pkcs11._pkcs11 import SearchIter
from pkcs11.exceptions import PKCS11Error

from ..config.pin import PinError, PinSource, PinSpec
from ..core import states
from ..core.codes import CALL_TIMEOUT, CKR_OK, Code
from ..core.errors import CallTimeout, LoginRejected, MemberUnavailable, OperationFailed, OutcomeUnknown
from ..core.policy import Policy
from ..core.records import Listener, TransitionRecord
from ..core.recovery import HealthTracker, ReconnectSchedule, Verdict
from ..core.states import Event, SlotMachine, State
from ..p11.codes import code_of
from ..p11.host import HostError, ModuleHost, client_module
from ..p11.module import CKR_USER_ALREADY_LOGGED_IN, USER_SESSION_STATES, ModuleError, ModuleInstance
from .listeners import Listeners
from .watchdog import WATCHDOG

log = logging.getLogger("hsmfsm.connection")

#: Where a connection runs its module: ``none`` in this process, ``process`` behind a private host.
ISOLATION = ("none", "process")
_now = time.monotonic

#: Events after which no session of the current generation may be used again.
_ENDS_GENERATION = frozenset({Event.CONNECTION_LOST, Event.CALL_TIMEOUT, Event.SESSION_LOST,
                              Event.FATAL, Event.CLOSE, Event.FORKED})
#: Events that end one recovery attempt (in-call recovery waits for the next request after them).
_ENDS_ATTEMPT = frozenset({Event.CONNECT_FAILED, Event.GIVE_UP, Event.LOGIN_OK, Event.FATAL,
                           Event.CALL_TIMEOUT, Event.CONNECTION_LOST})
_MECHANISMS: dict[str, pkcs11.Mechanism] = {}
#: Every connection of this process, for the fork hook.
_LIVE: weakref.WeakSet[SlotConnection] = weakref.WeakSet()
#: In a forked child: the generations and module instances inherited from the parent, kept
#: here for good on purpose. Their python-pkcs11 objects (lib, sessions, keys) belong to the
#: parent's server-side state: closing them, or letting a finaliser run (python-pkcs11's lib
#: deallocator calls C_Finalize), would act on the parent's sessions. A leak, bounded by one
#: set per connection per fork.
_INHERITED: list[Any] = []


def _mechanism(mechanism: str | pkcs11.Mechanism | None) -> pkcs11.Mechanism | None:
    if mechanism is None or isinstance(mechanism, pkcs11.Mechanism):
        return mechanism
    try:
        return _MECHANISMS[mechanism]
    except KeyError:
        try:
            mech = _MECHANISMS[mechanism] = pkcs11.Mechanism[mechanism]
        except KeyError:
            raise ValueError(f"unknown mechanism {mechanism!r} (a python-pkcs11 Mechanism name, e.g. SHA256_RSA_PKCS)") from None
        return mech


class _CallSlot:
    """Where a thread stamps the start of a PKCS#11 call, for the watchdog."""

    __slots__ = ("started", "timed_out")

    def __init__(self) -> None:
        self.started = 0.0
        self.timed_out = False


class _Busy(PKCS11Error):
    """The module's call lock stayed taken for a whole call timeout (a caller hangs in it)."""


class _OpenFailed(Exception):
    """Opening a session for a caller failed; carries whether the watchdog cut it off."""

    def __init__(self, error: PKCS11Error, timed_out: bool) -> None:
        super().__init__(error)
        self.error, self.timed_out = error, timed_out


class _Lease(_CallSlot):
    """A session of one generation, leased by one caller at a time, with its key cache."""

    __slots__ = ("g", "session", "keys")

    def __init__(self, g: _Generation) -> None:
        super().__init__()
        self.g = g
        self.session: Any = None
        self.keys: dict[tuple[str, ObjectClass], Any] = {}


class _Generation:
    """The sessions valid between two losses. ``ready`` is true while the connection serves."""

    __slots__ = ("number", "token", "anchor", "idle", "leases", "ready", "module", "epoch")

    def __init__(self, number: int) -> None:
        self.number = number
        self.token: Any = None
        self.anchor: Any = None  # the logged-in session, never leased
        self.idle: list[_Lease] = []
        self.leases: list[_Lease] = []
        self.ready = False
        #: The module instance and its initialisation count when the anchor was opened: the
        #: sessions of this generation are valid handles of that instance until it is re-initialised.
        self.module: Any = None
        self.epoch = -1

    def drained(self) -> bool:
        return len(self.idle) == len(self.leases)


class SlotConnection:
    """A PKCS#11 slot connection driven by a recovery policy.

    ``module`` is the PKCS#11 module path; ``env`` is applied while it loads
    (``P11_KIT_SERVER_ADDRESS`` for p11-kit-client). ``pin`` is ``env:NAME``,
    ``file:PATH`` or a callable. Use as a context manager, or call
    :meth:`open` and :meth:`close`.

    ``isolation="process"`` runs the module in a process of its own behind a
    private ``p11-kit server`` (:mod:`hsmfsm.p11.host`): a call hung inside a vendor
    module can then be cut off at the call timeout, which no in-process module
    allows. ``"none"`` (the default) loads the module here.
    """

    def __init__(self, module: str, token_label: str, pin: PinSpec, policy: Policy | None = None,
                 name: str | None = None, env: dict[str, str] | None = None, *,
                 probe: bool = True, rand: Callable[[], float] | None = None,
                 wait_for_recovery: bool = True, auto_recover: bool = True,
                 isolation: str = "none") -> None:
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
        self._host: ModuleHost | None = None
        if isolation == "process":
            self._host = ModuleHost(module, env, token_label, self.name)
            self._module = ModuleInstance(client_module(), self._host.client_env, self.name)
        else:
            self._module = ModuleInstance(module, env, self.name)
        self._machine = SlotMachine(self.name)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._g = _Generation(1)
        self._retired: list[_Generation] = []
        self._schedule = ReconnectSchedule(policy.connect, rand or random.random)
        self._health = HealthTracker(policy.degraded, policy.probe)
        self._listeners = Listeners()
        self._supervisor_slot = _CallSlot()
        self._supervisor: threading.Thread | None = None
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
        self._call_lock: threading.Lock | None = threading.Lock() if self._module.can_cut_off else None
        self._failure: Exception | None = None
        #: C_Initialize calls made on the module instance (see ``_Generation.epoch``).
        self._epoch = 0
        self.last_code: Code | None = None
        #: C_Login calls made, ever: auditors and tests count them (a wrong PIN is tried once).
        self.login_attempts = 0
        ops = policy.operations
        self._timeout, self._deadline, self._max_reissues = ops.call_timeout, ops.deadline, ops.max_reissues
        self._slow = policy.degraded.slow_call
        self._pid = os.getpid()
        self._fork_restart = False
        _LIVE.add(self)

    # -- public surface -----------------------------------------------------

    @property
    def state(self) -> str:
        return self._machine.state

    @property
    def generation(self) -> int:
        return self._g.number

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(record)`` on every transition, in order, from the thread that caused it."""
        self._listeners.add(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def open(self, wait: float | None = None) -> SlotConnection:
        """Start the supervisor and wait up to ``wait`` seconds (default: the policy's deadline)
        for ``logged_in``. An HSM that is down does not make this fail: the supervisor keeps
        trying per the policy. A rejected PIN does: it raises :class:`LoginRejected`."""
        self._check_fork(restart=False)
        with self._lock:
            if self._supervisor is None:
                self._start_supervisor()
            self._changed.wait_for(lambda: self._g.ready or self._machine.current is State.FAILED,
                                   timeout=self._deadline if wait is None else wait)
            if self._machine.current is State.FAILED and self._failure is not None:
                raise self._failure
        return self

    def _start_supervisor(self) -> None:
        """(Caller holds ``_lock``.)"""
        self._closing = False
        self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                            name=f"hsmfsm-supervisor-{self.name}")
        self._supervisor.start()
        WATCHDOG.register(self)

    def close(self) -> None:
        """Stop recovery, drain the calls in flight, and finalise the module."""
        self._check_fork(restart=False)
        with self._lock:
            self._closing = True
            if (self._machine.current, Event.CLOSE) in states.TRANSITIONS:
                self._fire(Event.CLOSE)
            supervisor, self._supervisor = self._supervisor, None
            self._changed.notify_all()
        self._wake.set()
        if supervisor is not None:
            supervisor.join(self._timeout + 1.0)
        if self._drain(self._timeout) or self._cut_off()[1]:
            try:
                self._watched(self._module.finalize)
            except _Busy:
                log.warning("%s: closed without C_Finalize: a call is still stuck in the module", self.name)
        WATCHDOG.unregister(self)
        if self._host is not None:
            self._host.stop()

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
        return self._schedule.attempts, (None if next_at is None else max(0.0, next_at - _now()))

    def reset(self) -> None:
        """Leave ``failed`` (after the PIN or the token was fixed) and start recovering again."""
        self._check_fork()
        with self._lock:
            self._fire(Event.RESET)
            self._failure = None
            self._schedule.reset()
        self._wake.set()

    def __repr__(self) -> str:
        g = self._g
        return (f"<SlotConnection {self.name} {self.state} generation={g.number} "
                f"sessions={len(g.leases) - len(g.idle)} busy/{len(g.idle)} idle last={self.last_code}>")

    # -- operations ---------------------------------------------------------

    def sign(self, key_label: str, data: bytes, mechanism: str | pkcs11.Mechanism | None = None,
             mechanism_param: Any = None) -> bytes:
        """Sign ``data`` with the private key labelled ``key_label``."""
        return self._perform("sign", key_label, ObjectClass.PRIVATE_KEY, _sign,
                             (data, _mechanism(mechanism), mechanism_param))

    def verify(self, key_label: str, data: bytes, signature: bytes,
               mechanism: str | pkcs11.Mechanism | None = None, mechanism_param: Any = None) -> bool:
        return self._perform("verify", key_label, ObjectClass.PUBLIC_KEY, _verify,
                             (data, signature, _mechanism(mechanism), mechanism_param))

    def decrypt(self, key_label: str, data: bytes, mechanism: str | pkcs11.Mechanism | None = None,
                mechanism_param: Any = None) -> bytes:
        return self._perform("decrypt", key_label, ObjectClass.PRIVATE_KEY, _decrypt,
                             (data, _mechanism(mechanism), mechanism_param))

    def generate_random(self, nbytes: int) -> bytes:
        return self._perform("generate_random", None, None, _random, (nbytes,))

    def generate_keypair(self, key_type: pkcs11.KeyType, bits: int, label: str) -> Any:
        """Not idempotent: never re-issued once it may have reached the HSM."""
        return self._perform("generate_keypair", None, None, _keypair, (key_type, bits, label))

    # -- the call path ------------------------------------------------------

    def _perform(self, op: str, label: str | None, klass: ObjectClass | None,
                 call: Callable[..., Any], args: tuple) -> Any:
        started = _now()
        reissues = 0
        while True:
            g = self._g
            if not g.ready:
                self._await_ready(op, started)
                continue
            try:
                lease = g.idle.pop()
            except IndexError:
                try:
                    lease = self._new_lease(g)
                except _OpenFailed as failure:  # nothing of ``op`` was sent: even a non-idempotent call may go again
                    reissues = self._after_error(op, g, failure.error, failure.timed_out, reissues, started, sent=False)
                    continue
                if lease is None:
                    continue
            if g is not self._g:  # retired between the read and the pop: never use it
                g.idle.append(lease)
                continue
            lock = self._call_lock
            if lock is not None:
                lock.acquire()  # the watchdog's clock starts inside: waiting here is not the HSM's fault
            lease.started = t0 = _now()
            try:
                target = lease.session if label is None else (
                    lease.keys.get((label, klass)) or self._find_key(lease, label, klass))
                result = call(target, *args)
            except PKCS11Error as exc:
                timed_out = lease.timed_out
                lease.started, lease.timed_out = 0.0, False
                if lock is not None:
                    lock.release()
                g.idle.append(lease)
                reissues = self._after_error(op, g, exc, timed_out, reissues, started)
                continue
            except BaseException:
                lease.started = 0.0
                if lock is not None:
                    lock.release()
                g.idle.append(lease)
                raise
            elapsed = _now() - t0
            lease.started, lease.timed_out = 0.0, False
            if lock is not None:
                lock.release()
            g.idle.append(lease)
            if elapsed > self._slow or not self._health.quiet:
                self._after_success(g, elapsed)
            return result

    def _find_key(self, lease: _Lease, label: str, klass: ObjectClass) -> Any:
        """Called inside the call path (and its module lock, if any)."""
        key = lease.keys[(label, klass)] = _find_one(lease.session, label, klass)
        return key

    def _new_lease(self, g: _Generation) -> _Lease | None:
        """Open one more session (no PIN: login is per application, docs/FACTS.md) for a caller."""
        lease = _Lease(g)
        with self._lock:
            if g is not self._g or not g.ready:
                return None
            g.leases.append(lease)  # counted before the open, so a drain waits for it
        try:
            if self._call_lock is None:
                lease.started = _now()
                lease.session = g.token.open(rw=True)
            else:
                with self._call_lock:
                    lease.started = _now()
                    lease.session = g.token.open(rw=True)
        except PKCS11Error as exc:
            with self._lock:
                g.leases.remove(lease)
            raise _OpenFailed(exc, lease.timed_out) from exc
        finally:
            lease.started = 0.0
        return lease

    def _after_error(self, op: str, g: _Generation, exc: PKCS11Error, timed_out: bool,
                     reissues: int, started: float, sent: bool = True) -> int:
        """Classify, fire the policy's event, and decide: re-issue (returns the count) or raise."""
        code = CALL_TIMEOUT if timed_out else code_of(exc)
        klass = self.policy.class_of(code)
        with self._lock:
            if g is self._g:
                self.last_code = code
                if timed_out:
                    # The watchdog cut this call off and fires call_timeout; this thread may
                    # get here first, and the record must say the same thing either way.
                    self._fire_if_legal(Event.CALL_TIMEOUT, code)
                elif klass.event is Event.IMPAIRED:
                    if self._health.call_impaired() is Verdict.IMPAIRED:
                        self._fire_if_legal(Event.IMPAIRED, code)
                elif klass.event is not None:
                    self._fire_if_legal(klass.event, code)
        # A non-idempotent call that may have reached the HSM is never re-issued, here or (in a
        # pool) on another member: the caller learns that the outcome is unknown, and where.
        unknown = sent and not self.policy.is_idempotent(op)
        if timed_out:
            if unknown:
                raise OutcomeUnknown(self.name, f"{op} overran the call timeout of {self._timeout:g}s and was "
                                     "cut off after it may have reached the HSM; not re-issued: the outcome "
                                     "is unknown", code, self.state) from None
            raise CallTimeout(self.name, f"{op} overran the call timeout of {self._timeout:g}s and was cut off",
                              code, self.state, may_have_acted=sent) from None
        if klass.event is None or not klass.reissue:
            raise OperationFailed(self.name, f"{op} failed", code, self.state) from exc
        if unknown and klass.may_have_acted:
            raise OutcomeUnknown(self.name, f"{op} failed after it may have reached the HSM; "
                                 "not re-issued: the outcome is unknown", code, self.state) from exc
        if not self._wait_for_recovery:  # in a pool: the pool re-issues elsewhere, if it may
            raise MemberUnavailable(self.name, f"{op} failed", code, self.state, reissue=True,
                                    may_have_acted=sent and klass.may_have_acted) from exc
        if reissues >= self._max_reissues:
            raise OperationFailed(self.name, f"{op} failed after {reissues} re-issues", code, self.state) from exc
        if _now() - started > self._deadline:
            raise MemberUnavailable(self.name, f"{op}: deadline of {self._deadline:g}s passed", code, self.state)
        return reissues + 1

    def _after_success(self, g: _Generation, elapsed: float) -> None:
        with self._lock:
            if g is not self._g:
                return
            verdict = self._health.call_ok(elapsed)
            if verdict is Verdict.IMPAIRED:
                self._fire_if_legal(Event.IMPAIRED, None)
            elif verdict is Verdict.HEALTHY:
                self._fire_if_legal(Event.HEALTHY, None)

    def _await_ready(self, op: str, started: float) -> None:
        self._check_fork()
        remaining = started + self._deadline - _now() if self._wait_for_recovery else 0.0
        with self._lock:
            ok = remaining > 0 and self._changed.wait_for(
                lambda: self._g.ready or self._closing or self._machine.current is State.FAILED, remaining)
            state = self._machine.current
            if state is State.FAILED:
                if isinstance(self._failure, LoginRejected):
                    raise self._failure
                raise MemberUnavailable(self.name, f"{op}: connection has failed and waits for reset()",
                                        self.last_code, state, may_have_acted=False)  # nothing was sent
            if self._closing:
                raise MemberUnavailable(self.name, f"{op}: connection is closed", self.last_code, state,
                                        may_have_acted=False)
            if not ok:
                raise MemberUnavailable(self.name, f"{op}: not serving within the deadline of "
                                        f"{self._deadline:g}s" if self._wait_for_recovery else f"{op}: not serving",
                                        self.last_code, state, may_have_acted=False)

    # -- transitions --------------------------------------------------------

    def _fire(self, event: Event, code: Code | None = None) -> None:
        """Apply an event (caller holds ``_lock``): retire sessions, record, wake everyone."""
        before, after = self._machine.fire(event)
        if event in _ENDS_ATTEMPT:
            self._recovery_requested = False
        if event in _ENDS_GENERATION:
            old = self._g
            old.ready = False
            self._retired.append(old)
            self._g = _Generation(old.number + 1)
        else:
            self._g.ready = after in states.SERVING
        self._listeners.emit(TransitionRecord(
            time.time(), self.name, before.value, after.value, event.value,
            code.name if code else None, code.value if code else None,
            self._schedule.attempts, self._g.number))
        self._changed.notify_all()
        self._wake.set()

    def _fire_if_legal(self, event: Event, code: Code | None) -> bool:
        if (self._machine.current, event) not in states.TRANSITIONS:
            return False
        self._fire(event, code)
        return True

    # -- the watchdog's view ------------------------------------------------

    def _watchdog_tick(self, now: float) -> None:
        if self._pid != os.getpid():
            return  # a forked child's watchdog, before this connection dropped what it inherited
        limit = self._timeout
        overran = False
        current = self._g
        slots: list[_CallSlot] = [self._supervisor_slot, *current.leases]
        for g in list(self._retired):
            slots.extend(g.leases)
        for slot in slots:
            started = slot.started
            if started and now - started > limit and not slot.timed_out and slot.started == started:
                slot.timed_out = True
                overran = True
        if overran:
            killed, cut = self._cut_off()
            log.warning("%s: a call overran %gs; cut %d socket(s) to the HSM%s", self.name, limit, cut,
                        f", killed {killed} stuck module process(es)" if self._host is not None else "")
            with self._lock:
                if self._g is not current:
                    return  # the cut-off caller recorded the loss first, and a new attempt may have begun
                self.last_code = CALL_TIMEOUT
                self._fire_if_legal(Event.CALL_TIMEOUT, CALL_TIMEOUT)

    def _cut_off(self) -> tuple[int, int]:
        """Make every call stuck in the module return: (host processes killed, sockets cut).

        With a host, its stuck processes die first: a reconnect (which needs a fresh
        one) can only start after the cut has made the stuck call return.
        """
        killed = self._host.kill_stuck() if self._host is not None else 0
        return killed, self._module.cut_off()

    # -- fork ------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        """In a forked child, before anything else runs (``os.register_at_fork``). No I/O here.

        Only the forking thread exists in the child: the supervisor, the watchdog and
        every other caller are gone, and a lock one of them held stays held for good.
        So: fresh locks, no supervisor, and the generation stops serving, which sends
        the child's first call down the slow path to :meth:`_check_fork`.
        """
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._wake = threading.Event()
        if self._call_lock is not None:
            self._call_lock = threading.Lock()
        self._listeners._lock = threading.Lock()
        self._supervisor_slot = _CallSlot()
        self._fork_restart = self._supervisor is not None and not self._closing
        self._supervisor = None
        self._g.ready = False

    def _check_fork(self, restart: bool = True) -> None:
        """In a forked child, on first use: drop what was inherited and connect afresh.

        Every inherited session is abandoned, never closed: over p11-kit-client the
        child's copy of the socket reaches the parent's server-side sessions, and a
        C_CloseSession, C_Logout or C_Finalize from here would log the parent out.
        The module gets a fresh instance (``ModuleInstance.for_child``), the
        ``forked`` event moves the connection to ``disconnected`` with a new
        generation, and the supervisor (if it ran in the parent) starts again here.
        A ``failed`` connection stays failed: no child retries a rejected PIN.
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
                self._g = _Generation(self._g.number + 1)
            if restart and self._fork_restart and self._supervisor is None:
                self._start_supervisor()

    # -- the supervisor -----------------------------------------------------

    def _supervise(self) -> None:
        next_probe = 0.0
        while True:
            with self._lock:
                if self._closing:
                    return
                state = self._machine.current
            now = _now()
            if state is State.FAILED:
                self._sleep(None)
            elif state in states.SERVING:
                if self._probe_enabled and now >= next_probe:
                    self._probe()
                    next_probe = _now() + self.policy.probe.interval
                self._sleep(max(0.0, next_probe - _now()) if self._probe_enabled else None)
            elif not self._auto_recover and not self._recovery_requested:
                self._sleep(None)  # in-call recovery: wait for a caller to ask
            elif self._auto_recover and not self._schedule.due(now):
                self._sleep(max(0.0, (self._schedule.next_at or now) - now))
            else:
                self._step(state)

    def _sleep(self, seconds: float | None) -> None:
        if self._wake.wait(seconds):
            self._wake.clear()

    def _step(self, state: State) -> None:
        if state is State.DISCONNECTED:
            with self._lock:
                if not self._fire_if_legal(Event.CONNECT, None):
                    return
                if self._schedule.gave_up:
                    self._fire(Event.GIVE_UP, self.last_code)
                    return
            self._establish(reinitialize=True)
        elif state is State.CONNECTING:
            self._establish(reinitialize=False)
        elif state is State.OPEN:
            self._login()

    def _watched(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one supervisor PKCS#11 call under the watchdog and the module's call lock.

        The lock is taken with the call timeout: a caller stuck in a hung call holds it
        until the watchdog cuts that call off, and the supervisor must not hang behind it.
        """
        slot = self._supervisor_slot
        lock = self._call_lock
        if lock is not None and not lock.acquire(timeout=self._timeout):
            slot.timed_out = True
            raise _Busy()
        slot.started, slot.timed_out = _now(), False
        try:
            return fn(*args)
        finally:
            slot.started = 0.0
            if lock is not None:
                lock.release()

    def _drain(self, timeout: float, forgotten: list[_Generation] | None = None) -> bool:
        """Wait until no lease of a retired generation is in use; then they can be forgotten.

        Only the generations seen at the start are forgotten: one retired meanwhile
        (the watchdog may fire during an attempt) waits for the next drain. The
        forgotten ones are appended to ``forgotten``, if given.
        """
        with self._lock:
            pending = list(self._retired)
        deadline = _now() + timeout
        while not all(g.drained() for g in pending):
            if _now() > deadline:
                return False
            time.sleep(0.002)
        with self._lock:
            self._retired = [g for g in self._retired if g not in pending]
        if forgotten is not None:
            forgotten.extend(pending)
        return True

    def _close_lost_sessions(self, generations: list[_Generation]) -> bool:
        """Close the sessions of drained generations when no C_Initialize came since they were opened.

        After ``session_lost`` the connection opens a new anchor without re-initialising
        the module, so the lost generation's sessions (its anchor and every lease) are
        still open on the token: without this, every ``session_lost`` leaked them until
        the next reinitialisation (the soak counted 15 live sessions where 5 were in
        use). Closing them here is safe: they are drained (no caller holds one), they
        are handles of this very module initialisation (``epoch``), and no session of
        the new generation exists yet, so no handle can alias a new session. C_CloseSession
        without C_Logout (``ModuleInstance.close_session``). False when a close overran
        the call timeout: the attempt has then failed.
        """
        handles = []
        for g in generations:
            if g.module is not self._module or g.epoch != self._epoch:
                continue  # re-initialised since: the handles are stale, and may alias new ones
            handles += [lease.session.handle for lease in g.leases if lease.session is not None]
            if g.anchor is not None:
                handles.append(g.anchor.handle)
        for handle in handles:
            try:
                self._watched(self._module.close_session, handle)
            except _Busy:
                self._attempt_failed(CALL_TIMEOUT, "could not close the lost sessions: a call is stuck")
                return False
            if self._supervisor_slot.timed_out:
                self._attempt_failed(CALL_TIMEOUT, "closing the lost sessions overran the call timeout")
                return False
        return True

    def _establish(self, reinitialize: bool) -> None:
        """connecting -> open: (re)initialise the module if asked, find the token, open the anchor session."""
        forgotten: list[_Generation] = []
        if not self._drain(self._timeout, forgotten):
            self._cut_off()
            if not self._drain(self._timeout, forgotten):
                self._attempt_failed(CALL_TIMEOUT, "calls of the old generation did not return")
                return
        if not reinitialize and self._module.initialized and not self._close_lost_sessions(forgotten):
            return
        if self._host is not None and (reinitialize or not self._module.initialized):
            try:
                self._host.ensure_running(self._timeout)
            except HostError as exc:  # the attempt goes on and fails with the client's code
                log.warning("%s", exc)  # the message names the member
        try:
            if reinitialize or not self._module.initialized:
                self._epoch += 1
                code = self._watched(self._module.initialize)
                if not self._module.parallel and self._call_lock is None:
                    self._call_lock = threading.Lock()  # refused OS locking: no session exists yet
                if code != CKR_OK:
                    self._attempt_failed(code, "C_Initialize failed")
                    return
            token = self._watched(lambda: self._module.lib.get_token(token_label=self.token_label))
            anchor = self._watched(token.open, True)
        except ModuleError as exc:
            with self._lock:
                self._failure = MemberUnavailable(self.name, str(exc))
                self._fire_if_legal(Event.FATAL, None)
            return
        except PKCS11Error as exc:
            timed_out = self._supervisor_slot.timed_out
            self._attempt_failed(CALL_TIMEOUT if timed_out else code_of(exc), "could not open a session")
            return
        with self._lock:
            g = self._g
            g.token, g.anchor = token, anchor
            g.module, g.epoch = self._module, self._epoch
            self._fire_if_legal(Event.SESSION_OPENED, None)

    def _attempt_failed(self, code: Code, why: str) -> None:
        log.info("%s: connect attempt failed: %s [%s]", self.name, why, code)
        with self._lock:
            self.last_code = code
            klass = self.policy.class_of(code)
            if klass.event is Event.FATAL:
                self._failure = MemberUnavailable(self.name, f"{why}; the policy treats this as fatal", code)
                self._fire_if_legal(Event.FATAL, code)
                return
            give_up = self._schedule.failed(_now()) is None
            self._fire_if_legal(Event.GIVE_UP if give_up else Event.CONNECT_FAILED, code)
            if give_up:
                self._failure = MemberUnavailable(
                    self.name, f"gave up after {self._schedule.attempts} connect attempts", code)

    def _login(self) -> None:
        """open -> logged_in with exactly one C_Login; a rejected PIN is never tried again."""
        g = self._g
        try:
            pin = self._pin.read()
        except PinError as exc:
            with self._lock:
                self._failure = LoginRejected(self.name, str(exc))
                self._fire_if_legal(Event.FATAL, None)
            return
        self.login_attempts += 1
        try:
            code = self._watched(self._module.login, g.anchor.handle, pin)
        except _Busy:
            code = CALL_TIMEOUT
        finally:
            del pin
        if self._supervisor_slot.timed_out:
            code = CALL_TIMEOUT
        with self._lock:
            if g is not self._g:
                return
            self.last_code = code
            if code.value in (0, CKR_USER_ALREADY_LOGGED_IN):
                self._schedule.succeeded()
                self._health.reset()
                self._fire_if_legal(Event.LOGIN_OK, code)
                return
            klass = self.policy.class_of(code)
            if klass.event is Event.FATAL:
                self._failure = LoginRejected(
                    self.name, "the HSM rejected the login; hsmfsm will not try this PIN again "
                    "(a retry can lock the token). Fix the PIN, then call reset()", code, State.FAILED.value)
                self._fire(Event.FATAL, code)
                return
            self._schedule.failed(_now())
            if code is CALL_TIMEOUT:
                event = Event.CALL_TIMEOUT  # as the watchdog records it, whichever thread comes first
            elif klass.event in (Event.SESSION_LOST, Event.CONNECTION_LOST):
                event = klass.event
            else:
                event = Event.CONNECTION_LOST
            self._fire_if_legal(event, code)

    def _probe(self) -> None:
        """One health probe on the anchor session: proves the link, the session and the login."""
        g = self._g
        if not g.ready:
            return
        try:
            code, session_state = self._probe_call(g)
        except PKCS11Error as exc:
            code, session_state = code_of(exc), None
        if self._supervisor_slot.timed_out:
            return  # the watchdog already fired call_timeout
        with self._lock:
            if g is not self._g:
                return
            if code == CKR_OK and (session_state is None or session_state in USER_SESSION_STATES):
                if self._health.probe_ok() is Verdict.HEALTHY:
                    self._fire_if_legal(Event.HEALTHY, None)
                return
            if code == CKR_OK:  # the session lives but nobody is logged in any more
                code = Code("CKR_USER_NOT_LOGGED_IN", 0x101)
            self.last_code = code
            klass = self.policy.class_of(code)
            if klass.event in (Event.CONNECTION_LOST, Event.SESSION_LOST, Event.LOGIN_LOST, Event.FATAL):
                self._fire_if_legal(klass.event, code)
                return
            verdict = self._health.probe_failed()
            if verdict is Verdict.UNHEALTHY:
                self._fire_if_legal(Event.CONNECTION_LOST, code)
            elif verdict is Verdict.IMPAIRED:
                self._fire_if_legal(Event.IMPAIRED, code)

    def _probe_call(self, g: _Generation) -> tuple[Code, int | None]:
        operation = self.policy.probe.operation
        if operation == "generate_random":
            self._watched(g.anchor.generate_random, 128)
            return CKR_OK, None
        if operation == "token_info":
            self._watched(lambda: g.token.slot.get_token())
            return CKR_OK, None
        return self._watched(self._module.session_state, g.anchor.handle)


def _find_one(session: Any, label: str, klass: ObjectClass) -> Any:
    """Find exactly one key, finishing the search whatever happens.

    python-pkcs11's ``get_key`` can leave its search operation active (when
    C_FindObjectsInit fails, or when the generator is dropped half-way); its
    finaliser then calls C_FindObjectsFinal at garbage collection and, on a
    dead link, raises into the void (docs/FACTS.md). This runs the same SearchIter by
    hand and always finishes it here, while the lease (and so its generation)
    is still held: the drain waits for us, so the handle cannot be stale yet.
    """
    search = SearchIter(session, {pkcs11.Attribute.CLASS: klass, pkcs11.Attribute.LABEL: label}, 2)
    found: list[Any] = []
    try:
        search.__enter__()  # C_FindObjectsInit
        for batch in search:
            found.extend(batch)
            if len(found) > 1:
                break
    finally:
        try:
            search._finalize()  # C_FindObjectsFinal, if still active; marks the search finished
        except PKCS11Error:
            pass
    if not found:
        raise pkcs11.exceptions.NoSuchKey(f"no {klass.name} labelled {label!r}")
    if len(found) > 1:
        raise pkcs11.exceptions.MultipleObjectsReturned(f"more than one {klass.name} labelled {label!r}")
    return found[0]


def _sign(key: Any, data: bytes, mechanism: Any, param: Any) -> bytes:
    return key.sign(data, mechanism=mechanism, mechanism_param=param)


def _verify(key: Any, data: bytes, signature: bytes, mechanism: Any, param: Any) -> bool:
    return key.verify(data, signature, mechanism=mechanism, mechanism_param=param)


def _decrypt(key: Any, data: bytes, mechanism: Any, param: Any) -> bytes:
    return key.decrypt(data, mechanism=mechanism, mechanism_param=param)


def _random(session: Any, nbytes: int) -> bytes:
    return session.generate_random(nbytes * 8)


def _keypair(session: Any, key_type: Any, bits: int, label: str) -> Any:
    return session.generate_keypair(key_type, bits, label=label, store=True)


def _after_fork_in_child() -> None:
    for conn in list(_LIVE):
        conn._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
