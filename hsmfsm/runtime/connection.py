"""A slot connection: one application's link to one token, kept alive by its policy.

An I/O shell around the rule-book (:mod:`hsmfsm.core.rules`): it makes the
PKCS#11 calls, asks the rule-book what each answer means, and does what it
says. Three kinds of thread touch a connection, and each has one job:

- **Callers** (``sign`` and friends) run the PKCS#11 call in their own thread
  on a leased session. The success path takes no lock and fires no event: it
  pops a lease, stamps the start time for the watchdog, signs, pushes the
  lease back, and appends the call's latency to its operation's window (what a
  pool's suspicion is measured against). A caller that finds every session
  leased (``sessions.max``) waits for one within its deadline; over
  p11-kit-client each session has a link of its own (:class:`.generation.Lane`),
  opened when a call needs one. On an error, the caller asks the rule-book (phase ``call``),
  fires the event it names, then waits (within the call's deadline) for
  recovery and re-issues if the rule-book says so.
- **The supervisor** (one thread per connection, :mod:`.supervisor`) does all
  recovery I/O: reinitialising the module, opening sessions, logging in, and
  the health probe that brings an *idle* connection back without waiting for
  a caller.
- **The watchdog** (one per clock) cuts off calls that overran the call
  timeout, so a hung HSM yields an error instead of a hang. In a pool it also
  reports calls past their suspicion limit to the pool, and cuts off the
  link of each idempotent call of a member the pool suspects
  (:func:`hsmfsm.core.rules.decide_suspicion`).

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

from ..config.pin import PinError, PinSource, PinSpec
from ..core import rules
from ..core.codes import CALL_TIMEOUT, SUSPECTED, UNKNOWN_ERROR, Code
from ..core.errors import (
    HSMError,
    KeyNotFound,
    LoginRejected,
    MechanismNotSupported,
    MemberUnavailable,
    ModuleCallError,
    ModuleError,
    OperationFailed,
)
from ..core.latency import LatencyWindow
from ..core.policy import Policy
from ..core.records import CallListener, Listener, TransitionRecord
from ..core.recovery import HealthTracker, ReconnectSchedule
from ..core.states import ENDS_ATTEMPT, ENDS_GENERATION, SERVING, Event, SlotMachine, State, is_legal
from ..p11.adapter import ISOLATION, P11Module
from .clock import SYSTEM
from .edge import PRIVATE_KEY, PUBLIC_KEY, Clock, Module
from .generation import CallSlot, Generation, Lane, Lease
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
    """Opening a session for a caller failed; carries whether the watchdog cut it off, whether the
    failure's event was already fired (a lane's C_Login, decided as the login phase), and whether it
    was one new link's alone (``link_only``: ``rules.link_failure``)."""

    def __init__(self, error: ModuleCallError, timed_out: bool, fired: bool = False, abandoned: bool = False,
                 link_only: bool = False) -> None:
        super().__init__(error)
        self.error, self.timed_out, self.fired, self.abandoned = error, timed_out, fired, abandoned
        self.link_only = link_only


#: Suspicion hooks a pool gives its members: (connection, (operation, elapsed, limit) or None) ->
#: cut the member's idempotent calls in flight now?; and (connection) -> None when it answered.
Overran = Callable[["SlotConnection", "tuple[str, float, float] | None"], bool]
Answered = Callable[["SlotConnection"], None]


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
        primary: Module
        if isinstance(module, str):
            primary = P11Module(module, env, token_label, self.name, isolation)
        else:
            if isolation != "none":
                raise ValueError("isolation applies to a module path; a module object runs as it is")
            primary = module
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
        #: The module instances of this connection (lane 0: the one given, which the supervisor
        #: reinitialises and logs in). Each has a call lock when the module is unsafe for concurrent
        #: callers. p11-kit-client is one: when a call fails, it closes its socket while another
        #: thread may be about to read that fd number, which a new socket may reuse (measured: a
        #: probe thread wedged for good). It serves one request at a time per link anyway
        #: (docs/FACTS.md), which is why, over such a module, each session gets a lane of its own.
        self._lanes: list[Lane] = [Lane(0, primary, clock.lock() if primary.can_cut_off else None)]
        #: A link per session: the module is one of those, and can open more instances of itself.
        self._links = primary.can_cut_off and callable(getattr(primary, "new_link", None))
        self._max_sessions = policy.sessions.max
        #: One latency window per operation: the p99 a pool's suspicion is measured against.
        self._latency: dict[str, LatencyWindow] = {}
        #: The same windows' sample deques, which the call path appends to.
        self._samples: dict[str, Any] = {}
        #: Callers waiting for a lease (every session leased): a lease given back wakes them.
        self._waiting = 0
        #: Set by a pool (:meth:`_watch_suspicion`): its verdicts on this member's slow calls.
        self._overran: Overran | None = None
        self._answered: Answered | None = None
        #: The pool suspects this member (its mark, mirrored here for the call path and the watchdog).
        self._suspected = False
        #: A probe is asked for now (the member became suspected: does it answer?).
        self._probe_now = False
        #: Serialises the C_Login of lanes set up by callers, so that a PIN the token refuses is
        #: tried once, not once per caller.
        self._login_lock = clock.lock()
        self._failure: HSMError | None = None
        self.last_code: Code | None = None
        #: C_Login calls of the connection's own login, ever (one per connect attempt that reaches it):
        #: auditors and tests count them (a wrong PIN is tried once).
        self.login_attempts = 0
        #: C_Login calls of the links opened for more sessions (each is an application of its own to the
        #: HSM, docs/FACTS.md): made only in a generation whose own login succeeded, one at a time, and
        #: never once a PIN was refused. The C_Login calls made in all are the two counts together.
        self.link_logins = 0
        #: New links whose set-up failed, each that link's failure alone (``rules.link_failure``): the
        #: member kept its state.
        self.link_failures = 0
        #: Those failures since the member last answered (a call, a probe, a link set up).
        self._link_streak = 0
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

    # Lane 0, under the names the supervisor, the fork hooks and the lab's tools use.

    @property
    def _module(self) -> Module:
        module: Module = self._lanes[0].module
        return module

    @_module.setter
    def _module(self, module: Module) -> None:
        self._lanes[0].module = module

    @property
    def _call_lock(self) -> Any:
        return self._lanes[0].lock

    @_call_lock.setter
    def _call_lock(self, lock: Any) -> None:
        self._lanes[0].lock = lock

    @property
    def _epoch(self) -> int:
        """C_Initialize calls made on lane 0's module instance (see ``Generation.epoch``)."""
        return self._lanes[0].epoch

    @_epoch.setter
    def _epoch(self, epoch: int) -> None:
        self._lanes[0].epoch = epoch

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
        """Sessions open in the current generation, the logged-in one included: never more than
        ``sessions.max``."""
        return len(self._g.leases)

    @property
    def links(self) -> int:
        """Module instances (links to the HSM) this connection has opened: 1, or up to ``sessions.max``
        over a module that serves one request at a time per link."""
        return len(self._lanes)

    @property
    def suspected(self) -> bool:
        """Whether the pool this connection is a member of suspects it (see ``operations.suspicion``)."""
        return self._suspected

    def latency_p99(self, operation: str, now: float | None = None) -> float | None:
        """The 99th percentile of ``operation``'s recent latency here (None: too few answers yet)."""
        window = self._latency.get(operation)
        return None if window is None else window.recent_p99(self._now() if now is None else now)

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
            for lane in list(self._lanes):
                try:
                    self._steps.watched(lane.module.finalize, lock=lane.lock)
                except Busy:
                    log.warning("%s: closed without C_Finalize: a call is still stuck in the module", self.name)
        self._watchdog.unregister(self)
        self._module.stop()  # the lanes share whatever lane 0's module started (a host process)

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
                f"sessions={len(g.leases) - len(g.idle)} busy/{len(g.idle)} idle of {self._max_sessions} "
                f"links={len(self._lanes)}{' suspected' if self._suspected else ''} last={self.last_code}>")

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
        result: bytes = self._perform("sign", (key_label, PRIVATE_KEY, key_id),
                                      lambda lease, key: lease.module.sign(key, data, mech, mechanism_param),
                                      deadline, check)
        return result

    def verify(self, key_label: str | None, data: bytes, signature: bytes, mechanism: Any = None,
               mechanism_param: Any = None, *, key_id: bytes | None = None, deadline: float | None = None) -> bool:
        mech = self._g.mech_values.get(mechanism, _UNCHECKED)
        if mech is _UNCHECKED:
            mech = self._mechanism_value(mechanism, "verify")
        result: bool = self._perform("verify", (key_label, PUBLIC_KEY, key_id),
                                     lambda lease, key: lease.module.verify(key, data, signature, mech,
                                                                            mechanism_param), deadline)
        return result

    def decrypt(self, key_label: str | None, data: bytes, mechanism: Any = None, mechanism_param: Any = None, *,
                key_id: bytes | None = None, deadline: float | None = None) -> bytes:
        mech = self._g.mech_values.get(mechanism, _UNCHECKED)
        if mech is _UNCHECKED:
            mech = self._mechanism_value(mechanism, "decrypt")
        result: bytes = self._perform("decrypt", (key_label, PRIVATE_KEY, key_id),
                                      lambda lease, key: lease.module.decrypt(key, data, mech, mechanism_param),
                                      deadline)
        return result

    def generate_random(self, nbytes: int, *, deadline: float | None = None) -> bytes:
        result: bytes = self._perform("generate_random", None,
                                      lambda lease, s: lease.module.generate_random(s, nbytes), deadline)
        return result

    def generate_keypair(self, key_type: Any, bits: int, label: str, *, deadline: float | None = None) -> Any:
        """Not idempotent: never re-issued once it may have reached the HSM."""
        return self._perform("generate_keypair", None,
                             lambda lease, s: lease.module.generate_keypair(s, key_type, bits, label), deadline)

    def objects(self, *, deadline: float | None = None) -> list[dict[int, Any]]:
        """Every object the token shows the logged-in session, with its public, immutable
        attributes (:meth:`Module.list_objects`): what a virtual slot lists to its applications."""
        result: list[dict[int, Any]] = self._perform("list_objects", None,
                                                     lambda lease, s: lease.module.list_objects(s), deadline)
        return result

    def mechanism_infos(self, *, deadline: float | None = None) -> dict[int, tuple[int, int, int]]:
        """{CKM value: (min key size, max key size, flags)} of the token (:meth:`Module.mechanism_infos`)."""
        result: dict[int, tuple[int, int, int]] = self._perform(
            "mechanism_infos", None, lambda lease, _session: lease.module.mechanism_infos(lease.token), deadline)
        return result

    def generate_keypair_raw(self, mechanism: int, parameter: bytes | None, public: dict[int, Any],
                             private: dict[int, Any], *, deadline: float | None = None
                             ) -> tuple[dict[int, Any], dict[int, Any]]:
        """C_GenerateKeyPair with an application's templates (:meth:`Module.generate_keypair_raw`):
        the virtual slot's ``keygen: primary``. Not idempotent: never re-issued once it may have
        reached the HSM (:class:`~hsmfsm.core.errors.OutcomeUnknown`)."""
        result: tuple[dict[int, Any], dict[int, Any]] = self._perform(
            "generate_keypair", None,
            lambda lease, s: lease.module.generate_keypair_raw(s, mechanism, parameter, public, private), deadline)
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
        def read(lease: Lease, session: Any) -> dict[str, Any]:
            m = lease.module
            try:
                key = self._lookup_key(m, session, ref.label, PRIVATE_KEY, ref.key_id)
            except ModuleCallError as exc:
                if exc.code.name != "HSMFSM_NO_SUCH_KEY":
                    raise
                try:  # no private key: a public key object alone will do
                    key = self._lookup_key(m, session, ref.label, PUBLIC_KEY, ref.key_id)
                except ModuleCallError:
                    raise exc from None
            found: dict[str, Any] = m.key_attributes(session, key)
            return found

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

    @staticmethod
    def _lookup_key(module: Module, session: Any, label: str | None, kind: str, key_id: bytes | None) -> Any:
        if key_id is None:  # the Module shape before CKA_ID lookups took three arguments
            return module.find_key(session, label, kind)
        return module.find_key(session, label, kind, key_id)

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

    def _perform(self, op: str, lookup: tuple[str | None, str, bytes | None] | None,
                 call: Callable[[Lease, Any], Any], deadline: float | None = None,
                 accept: Callable[[Any], bool] | None = None, attempts: Attempts | None = None) -> Any:
        """One operation: ``call(lease, target)`` with ``target`` the lease's session, or the key
        ``lookup`` names (found once per lease and cached), made on the lease's module instance."""
        if attempts is None and self._call_listeners.items:
            return self._perform_recorded(op, lookup, call, deadline, accept)
        started = self._now()
        reissues = 0
        window = self._samples.get(op)
        if window is None:
            window = self._latency_window(op)
        while True:
            g = self._g
            if not g.ready:
                self._await_ready(op, started, deadline)
                continue
            try:
                lease = g.idle.pop()
            except IndexError:
                try:
                    new = self._new_lease(g, op, started, deadline)
                except _OpenFailed as failure:  # nothing of ``op`` was sent: even a non-idempotent call may go again
                    if failure.fired and (g is not self._g or not g.ready):
                        continue  # a lane's login failed, and its event ended the generation: as any loss
                    reissues = self._after_error(op, g, failure.error.code, failure.timed_out, reissues, started,
                                                 sent=False, cause=failure.error, deadline=deadline,
                                                 attempts=attempts, fired=failure.fired,
                                                 abandoned=failure.abandoned, link_only=failure.link_only)
                    continue
                if new is None:
                    continue
                lease = new
            if g is not self._g:  # retired between the read and the pop: never use it
                g.idle.append(lease)
                continue
            lock = lease.lock
            if lock is not None:
                lock.acquire()  # the watchdog's clock starts inside: waiting here is not the HSM's fault
            lease.op = op
            lease.started = t0 = self._now()
            try:
                if lookup is None:
                    target = lease.session
                else:
                    target = lease.keys.get(lookup) or self._find_key(lease, lookup)
                result = call(lease, target)
            except ModuleCallError as exc:
                timed_out, abandoned, drop = lease.timed_out, lease.abandoned, lease.drop
                lease.started, lease.timed_out = 0.0, False
                if lock is not None:
                    lock.release()
                self._give_back(g, lease, drop)
                reissues = self._after_error(op, g, exc.code, timed_out, reissues, started, cause=exc,
                                             deadline=deadline, attempts=attempts, abandoned=abandoned,
                                             relogin=drop)
                continue
            except BaseException:
                lease.started = 0.0
                if lock is not None:
                    lock.release()
                self._give_back(g, lease, lease.drop)
                raise
            elapsed = self._now() - t0
            lease.started, lease.timed_out = 0.0, False
            if lock is not None:
                lock.release()
            if lease.drop:  # answered just as its link was cut (or its lane's login lost): not used again
                self._give_back(g, lease, True)
            else:
                g.idle.append(lease)
                if self._waiting:
                    self._lease_returned()
            window.append(elapsed)
            if self._link_streak:
                self._link_streak = 0  # the member answered
            if accept is not None and not accept(result):
                reissues = self._rejected(op, g, reissues, started, deadline, attempts)
                continue
            if elapsed > self._slow or not self._health.quiet or self._suspected:
                self._after_success(g, elapsed)
            return result

    def _latency_window(self, op: str) -> Any:
        """The samples deque of ``op``'s latency window (made on its first call)."""
        with self._lock:
            window = self._latency.get(op)
            if window is None:
                window = self._latency[op] = LatencyWindow(self.policy.operations.suspicion)
                self._samples[op] = window.samples
        return window.samples

    def _give_back(self, g: Generation, lease: Lease, drop: bool) -> None:
        """A lease whose call has ended goes back to its generation's idle list, or, when its link was
        cut (a suspected member's call) or its lane's login is gone, is dropped with its lane marked
        stale: the lane is set up afresh for its next session."""
        if not drop:
            g.idle.append(lease)
            if self._waiting:
                self._lease_returned()
            return
        with self._lock:
            if lease in g.leases:
                g.leases.remove(lease)
            lane = lease.lane
            if lane.lease is lease:
                lane.lease = None
            lane.stale = True
            self._changed.notify_all()  # a session's room is free again

    def _lease_returned(self) -> None:
        with self._lock:
            self._changed.notify_all()

    def _perform_recorded(self, op: str, lookup: tuple[str | None, str, bytes | None] | None,
                          call: Callable[[Lease, Any], Any], deadline: float | None,
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
        key = lease.keys[lookup] = self._lookup_key(lease.module, lease.session, label, kind, key_id)
        return key

    def _new_lease(self, g: Generation, op: str, started: float, deadline: float | None) -> Lease | None:
        """A lease for a caller that found none idle: a new session while the generation holds fewer
        than ``sessions.max`` (on a lane of its own over a module with a link per session), else a
        wait, within the call's deadline, for one to be given back. None: look again (one came back,
        or the generation changed)."""
        limit = self._deadline if deadline is None else deadline
        with self._lock:
            if g is not self._g or not g.ready or g.idle:
                return None
            lane = self._claim_lane(g)
            if lane is None:
                remaining = started + limit - self._now()
                if remaining > 0:
                    self._waiting += 1
                    try:
                        self._changed.wait_for(lambda: g is not self._g or not g.ready or bool(g.idle)
                                               or self._closing or self._has_room(g), remaining)
                    finally:
                        self._waiting -= 1
                    return None
                state, last = self._machine.current, self.last_code
            else:
                lease = Lease(g, lane)
                g.leases.append(lease)  # counted before the open, so a drain waits for it
                if self._links:
                    lane.lease = lease
        if lane is None:
            raise MemberUnavailable(self.name, f"{op}: no session was free within the deadline of {limit:g}s "
                                    f"(all {self._max_sessions} of sessions.max leased)", last, state,
                                    may_have_acted=False)
        lease.op = op  # a suspected member's session being set up for a call is cut off too (nothing was sent)
        try:
            self._set_up(g, lease)
        except _OpenFailed as failure:
            link_only = self._abandon(g, lease, lane)
            failure.link_only = failure.link_only or (link_only and not failure.fired)
            raise
        return lease

    def _abandon(self, g: Generation, lease: Lease, lane: Lane) -> bool:
        """A lease whose session could not be set up: out of the generation, its lane free (and, over
        links of their own, to be opened afresh). Returns whether that failure is the link's alone
        (:meth:`_failure_is_link_only`), read under the same lock."""
        with self._lock:
            if lease in g.leases:
                g.leases.remove(lease)
            if lane.lease is lease:
                lane.lease = None
            lane.stale = self._links
            self._changed.notify_all()
            return self._failure_is_link_only(g)

    def _failure_is_link_only(self, g: Generation) -> bool:
        """Whether a failure of a new link is that link's alone (``rules.is_link_failure``):
        over links of their own, in the current generation, while the member answered since the
        last few such failures (caller holds ``_lock``)."""
        if not self._links or g is not self._g or not g.ready:
            return False
        return rules.is_link_failure(failures_before=self._link_streak)

    def _has_room(self, g: Generation) -> bool:
        """Whether :meth:`_claim_lane` could find a lane now (caller holds ``_lock``)."""
        if len(g.leases) >= self._max_sessions:
            return False
        lanes = self._lanes
        if not self._links or len(lanes) < self._max_sessions:
            return True
        return any(lane.lease is None or (lane.lease.g is not g and lane.lease in lane.lease.g.idle)
                   for lane in lanes)

    def _claim_lane(self, g: Generation, *, new: bool = True) -> Lane | None:
        """The lane a new session of ``g`` goes on, or None when ``sessions.max`` are open (caller holds
        ``_lock``). With a link per session: a free lane (a retired generation's idle lease on it is
        taken out of that generation: its session dies with the lane's next C_Initialize), else (if
        ``new``) a new one while there are fewer than ``sessions.max``; otherwise every session is on
        lane 0."""
        if len(g.leases) >= self._max_sessions:
            return None
        lanes = self._lanes
        if not self._links:
            return lanes[0]
        for lane in lanes:
            old = lane.lease
            if old is None:
                return lane
            if old.g is g:
                continue
            try:
                old.g.idle.remove(old)  # back in its (retired) generation's idle list: no call holds it
            except ValueError:
                continue  # a call of that generation still holds it
            if old in old.g.leases:
                old.g.leases.remove(old)
            lane.lease = None
            return lane
        if not new or len(lanes) >= self._max_sessions:
            return None
        module = lanes[0].module.new_link()
        if module is None:
            return None
        lane = Lane(len(lanes), module, self._clock.lock() if module.can_cut_off else None)
        lanes.append(lane)
        return lane

    def _set_up(self, g: Generation, lease: Lease) -> None:
        """Open the lease's session, under the watchdog (``lease.started``) and its lane's lock. With a
        link per session the lane is set up afresh: C_Initialize (the first loads the module), the
        token, the session, and the lane's own C_Login (:meth:`_lane_login`); otherwise one more
        session on lane 0 (no PIN: login is per application, docs/FACTS.md)."""
        lane = lease.lane
        lock = lane.lock
        if lock is not None:
            lock.acquire()
        lease.started = self._now()
        try:
            module = lane.module
            if not self._links:
                lease.token = g.token
                lease.session = module.open_session(g.token)
                lease.opened = True
                return
            code = module.initialize()
            lane.epoch += 1
            if code.value != 0:
                raise ModuleCallError(code, "C_Initialize of a session's link failed")
            token = module.find_token(self.token_label)
            lane.token = lease.token = token
            lease.epoch = lane.epoch
            lease.session = module.open_session(token)
            self._lane_login(g, lease)
            lease.opened = True
            self._link_streak = 0
            lane.stale, lane.generation = False, g.number
            if lane.number == 0:
                with self._lock:
                    if g is self._g:
                        g.token = token  # lane 0 was set up again within the generation
        except ModuleCallError as exc:
            raise _OpenFailed(exc, lease.timed_out, abandoned=lease.abandoned) from exc
        except ModuleError as exc:  # a link's module refused (its layout): this session fails, the member goes on
            log.warning("%s: could not open a link for one more session: %s", self.name, exc)
            raise _OpenFailed(ModuleCallError(Code(UNKNOWN_ERROR, None), str(exc)), lease.timed_out) from exc
        finally:
            lease.started = 0.0
            if lock is not None:
                lock.release()

    def _lane_login(self, g: Generation, lease: Lease) -> None:
        """A lane's one C_Login, decided as the login phase (:func:`rules.decide_login`). Lane logins
        are serialised and none is tried once the connection is ``failed`` or its generation over:
        a PIN the token refuses is tried once, whichever caller tries it. A refused login fires its
        event here, and raises :class:`_OpenFailed` marked as fired."""
        with self._login_lock:
            with self._lock:
                usable = g is self._g and g.ready and self._machine.current is not State.FAILED
                last = self.last_code or CALL_TIMEOUT
                link_only = self._failure_is_link_only(g)
                if usable:
                    self.link_logins += 1
            if not usable:
                raise _OpenFailed(ModuleCallError(last, "the connection stopped serving"), False, fired=True)
            try:
                pin = self._pin.read()
            except PinError as exc:
                with self._lock:
                    self._failure = LoginRejected(self.name, str(exc))
                    self._fire_if_legal(Event.FATAL, None)
                self._flush()
                raise _OpenFailed(ModuleCallError(last, str(exc)), False, fired=True) from None
            try:
                code = lease.module.login(lease.session, pin)
            finally:
                del pin
            d = rules.decide_login(self.policy, code, timed_out=lease.timed_out, link_only=link_only)
            if d.event is Event.LOGIN_OK:
                return
            if lease.abandoned and not lease.timed_out:  # its link was cut: the member is suspected, no news
                raise _OpenFailed(ModuleCallError(code, "C_Login of a session's link was cut off"), False,
                                  abandoned=True)
            if d.link_only:  # this link's alone: no event, the call goes again (_after_error)
                raise _OpenFailed(ModuleCallError(code, "C_Login of a session's link failed"), False,
                                  link_only=True)
            with self._lock:
                if g is self._g:
                    self.last_code = d.code
                    if d.event is Event.FATAL:
                        self._failure = LoginRejected(self.name, d.reason, d.code, State.FAILED)
                        self._fire_if_legal(Event.FATAL, d.code)
                    elif d.event is not None:
                        self._fire_if_legal(d.event, d.code)
            self._flush()
            raise _OpenFailed(ModuleCallError(d.code, "C_Login of a session's link failed"), lease.timed_out,
                              fired=True)

    def _after_error(self, op: str, g: Generation, code: Code, timed_out: bool, reissues: int, started: float,
                     sent: bool = True, cause: BaseException | None = None, deadline: float | None = None,
                     attempts: Attempts | None = None, abandoned: bool = False, fired: bool = False,
                     relogin: bool = False, link_only: bool = False) -> int:
        """Ask the rule-book, fire its event, and do as it says: re-issue (returns the count) or raise.

        ``abandoned``: the watchdog cut the call off on suspicion (no news about the member: no
        event, and its last code stays the HSM's). ``fired``: the failure's event was fired already
        (a lane's login, decided as the login phase). ``relogin``: the call ran on a lane whose login
        a ``login_lost`` already took away, so a login loss it reports is on the record already.
        ``link_only``: a new link's set-up failed, and it is that link's
        failure alone (``rules.link_failure``)."""
        if timed_out:
            code = CALL_TIMEOUT
        limit = self._deadline if deadline is None else deadline
        d = rules.decide_call(self._policy_for(deadline), code, operation=RULE_OPERATION.get(op, op),
                              timed_out=timed_out, sent=sent, in_pool=not self._wait_for_recovery,
                              reissues=reissues, deadline_passed=self._now() - started > limit,
                              abandoned=abandoned, link_only=link_only)
        code = d.code
        if d.link_only:
            self._link_failed(op, code, cause)
        if relogin and d.event is Event.LOGIN_LOST:
            fired = True
        with self._lock:
            if g is self._g and code is not SUSPECTED and not fired and not d.link_only:
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
            return reissues if d.link_only else reissues + 1  # a link's failure sent nothing
        error = d.error(self.name, f"{op} {d.reason}", code, state, reissue=d.reissue,
                        may_have_acted=d.may_have_acted)
        if not rules.counts_as_reissue(d):
            error.counts_as_reissue = False
        raise error from (None if timed_out else cause)

    def _link_failed(self, op: str, code: Code, cause: BaseException | None) -> None:
        """One new link failed its set-up, and the failure is that link's alone: counted and logged
        (the member's other calls, or the next failures in a row, say how the member is)."""
        with self._lock:
            self.link_failures += 1
            self._link_streak += 1
            streak = self._link_streak
        log.warning("%s: %s: a new link's set-up failed with %s (%s): that link alone is dropped and the call goes "
                    "again (%d in a row; %d in a row with no answer between are the member's)", self.name, op, code,
                    cause if cause is not None else "no detail", streak, rules.LINK_FAILURES_IN_A_ROW)

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
        self._answer()

    def _answer(self) -> None:
        """The member answered (a call, or a probe): a pool that suspects it takes the mark away."""
        self._link_streak = 0
        answered = self._answered
        if self._suspected and answered is not None:
            answered(self)

    def _watch_suspicion(self, overran: Overran, answered: Answered) -> None:
        """A pool's hooks (:class:`~hsmfsm.runtime.pool.Pool` registers them on each member): the
        watchdog reports calls past their suspicion limit to ``overran``, which says whether to cut
        this member's idempotent calls in flight; answers are reported to ``answered``."""
        self._overran, self._answered = overran, answered

    def request_probe(self) -> None:
        """Probe now, whatever the probe interval (a suspected member: does it still answer?)."""
        self._probe_now = True
        self._wake.set()

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
            if event is Event.LOGIN_LOST and self._links:
                self._drop_lane_logins(self._g)
        self._outbox.append(TransitionRecord(
            self._clock.time(), self.name, before, after, event,
            code.name if code else None, code.value if code else None,
            self._schedule.attempts, self._g.number))
        if after is not before:
            self._since = self._outbox[-1].time
        self._changed.notify_all()
        self._wake.set()

    def _drop_lane_logins(self, g: Generation) -> None:
        """``login_lost`` keeps the generation, and the supervisor logs lane 0 in again; every other lane
        is its own application to the HSM, whose login is gone too. Their idle leases are dropped now,
        the ones in use when their call ends: each such lane is set up afresh (with its own C_Login)
        for its next session. (Caller holds ``_lock``.)"""
        for lease in list(g.leases):
            if lease.lane.number == 0:
                continue
            lease.drop = True
            try:
                g.idle.remove(lease)
            except ValueError:
                continue  # a call holds it: dropped when that call ends
            g.leases.remove(lease)
            if lease.lane.lease is lease:
                lease.lane.lease = None
            lease.lane.stale = True

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
            # Cutting the member cuts every call in flight on it, over every link (p11-kit-client's
            # lane 0 cuts every socket to its server): each records what the watchdog did, call_timeout,
            # whichever thread gets there first, not the CKR_DEVICE_ERROR the cut makes it return.
            for slot in slots[:mine]:
                if slot.started:
                    slot.timed_out = True
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
        elif self._overran is not None and current.ready:
            self._suspicion_tick(now, current)

    def _suspicion_tick(self, now: float, current: Generation) -> None:
        """The watchdog's suspicion check (a pool member's): report the call furthest past its limit
        (``hsmfsm.core.latency``) to the pool, and when the pool answers that this member is suspected
        while another serves, cut off the link of every idempotent call in flight here (each lease on
        a lane of its own; a lane whose link was cut is set up afresh before its next session). The
        callers get ``HSMFSM_SUSPECTED`` and the pool re-issues their calls elsewhere. Calls of other
        operations, and calls over a module without a link per session, run on."""
        policy = self.policy
        suspicion = policy.operations.suspicion
        worst: tuple[str, float, float] | None = None
        busy: list[tuple[Lease, float, str]] = []
        for lease in list(current.leases):
            started, op = lease.started, lease.op
            if not started or op is None or lease.timed_out or lease.abandoned:
                continue
            busy.append((lease, started, op))
            elapsed = now - started
            if elapsed <= suspicion.floor:
                continue
            window = self._latency.get(op)
            limit = window.limit(now) if window is not None else suspicion.ceiling
            if elapsed > limit and rules.may_cut_on_suspicion(policy, op) and (
                    worst is None or elapsed - limit > worst[1] - worst[2]):
                worst = (op, elapsed, limit)
        if worst is None and not (self._suspected and busy):
            return
        overran = self._overran
        if overran is None or not overran(self, worst) or not self._links:
            return
        cut = 0
        for lease, started, op in busy:
            if not rules.may_cut_on_suspicion(policy, op, sent=lease.opened):
                continue  # a key generation sent is never cut early: the call timeout applies, as without suspicion
            lease.abandoned = lease.drop = True
            if lease.started != started or lease.op != op or not lease.module.cut_link():
                lease.abandoned = lease.drop = False  # that call ended (another began), or no link to cut
                continue
            cut += 1
        if cut:
            log.info("%s: suspected; cut off %d call(s) in flight, re-issued on another member", self.name, cut)

    def _cut_off(self) -> tuple[int, int]:
        """Make every call stuck in the module return: (host processes killed, sockets cut). Lane 0's
        module cuts what it can reach (p11-kit-client: every socket to its server, so the other lanes'
        too); each other lane's own link is cut as well, for modules whose instances are cut apart."""
        lanes = list(self._lanes)
        killed, cut = lanes[0].module.cut_off()
        extra = 0
        for lane in lanes[1:]:
            cut_link = getattr(lane.module, "cut_link", None)
            if cut_link is not None and cut_link():
                extra += 1
        return killed, max(cut, extra + bool(cut))  # lane 0's count may include the others' sockets already

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
        self._login_lock = self._clock.lock()
        for lane in self._lanes:
            if lane.lock is not None:
                lane.lock = self._clock.lock()
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
            _INHERITED.append((self._g, self._retired, self._lanes))
            self._retired = []
            old = self._lanes[0]
            module = old.module.for_child()
            self._lanes = [Lane(0, module, self._clock.lock() if module.can_cut_off or old.lock is not None
                                else None)]  # the other lanes stay with what was inherited: opened anew here
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
