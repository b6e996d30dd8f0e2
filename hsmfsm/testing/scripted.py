"""A scripted HSM and the client modules attached to it: the runtime's :class:`Module` without PKCS#11.

:class:`ScriptedHSM` is a token behind a network link (label, PIN, keys, and a
link that is up, down or hung); :class:`ScriptedModule` is one client module
instance attached to it, as one loaded ``p11-kit-client`` is. A test (or
``hsmfsm simulate``) scripts the HSM's failures and runs the production
connection on a :class:`~hsmfsm.testing.VirtualClock` against them.

The failures behave as docs/FACTS.md measured p11-kit-client over a killed,
hung or restarted server, because recovery code is only as good as the fake it
was tested against:

* ``down()``: every call on an instance connected before raises
  CKR_DEVICE_ERROR, *and keeps doing so after* ``up()``, until the instance is
  re-initialised. An instance initialised while the HSM is down gets CKR_OK
  and then sees no token (HSMFSM_NO_SUCH_TOKEN, CKR_SLOT_ID_INVALID) until it
  is re-initialised after ``up()``.
* ``hang()``: every call on every connected instance blocks, C_Initialize
  too, until ``resume()`` (the call completes normally), the instance's
  ``cut_off()`` or the HSM going down (CKR_DEVICE_ERROR; the instance is then
  broken until re-initialised).
* ``restart()``: sessions and logins are gone, connected instances are broken
  until re-initialised; a session from before a re-initialisation raises
  CKR_SESSION_HANDLE_INVALID.
* ``fail()``, ``slow()``, ``logout_all()``: injected return codes, latency,
  and a token that logged everyone out.

Failures raise :class:`~hsmfsm.core.errors.ModuleCallError` and nothing else;
the calls whose contract returns a code (``initialize``, ``finalize``,
``close_session``, ``login``, ``session_state``) return it instead. Every call
takes virtual time (``latency``, plus ``slow()``'s extra), is logged in
:attr:`ScriptedHSM.calls` and counted (:meth:`ScriptedHSM.count`).

All waiting goes through the clock's primitives (one condition per HSM), so
the same classes also run on :data:`hsmfsm.runtime.clock.SYSTEM` in real time.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from ..core.codes import Code, code_from_name
from ..core.errors import ModuleCallError
from ..runtime.edge import PRIVATE_KEY, PUBLIC_KEY, Clock, Condition, Thread

__all__ = ["Call", "ScriptedHSM", "ScriptedKey", "ScriptedMechanism", "ScriptedModule", "ScriptedSession",
           "ScriptedToken"]

_T = TypeVar("_T")

OK = code_from_name("CKR_OK")
DEVICE_ERROR = code_from_name("CKR_DEVICE_ERROR")
NOT_INITIALIZED = code_from_name("CKR_CRYPTOKI_NOT_INITIALIZED")
SESSION_HANDLE_INVALID = code_from_name("CKR_SESSION_HANDLE_INVALID")
SLOT_ID_INVALID = code_from_name("CKR_SLOT_ID_INVALID")
NO_SUCH_TOKEN = code_from_name("HSMFSM_NO_SUCH_TOKEN")
NO_SUCH_KEY = code_from_name("HSMFSM_NO_SUCH_KEY")
MULTIPLE_OBJECTS = code_from_name("HSMFSM_MULTIPLE_OBJECTS")
USER_NOT_LOGGED_IN = code_from_name("CKR_USER_NOT_LOGGED_IN")
USER_ALREADY_LOGGED_IN = code_from_name("CKR_USER_ALREADY_LOGGED_IN")
PIN_INCORRECT = code_from_name("CKR_PIN_INCORRECT")
PIN_LOCKED = code_from_name("CKR_PIN_LOCKED")
MECHANISM_INVALID = code_from_name("CKR_MECHANISM_INVALID")
KEY_TYPE_INCONSISTENT = code_from_name("CKR_KEY_TYPE_INCONSISTENT")
KEY_FUNCTION_NOT_PERMITTED = code_from_name("CKR_KEY_FUNCTION_NOT_PERMITTED")
ENCRYPTED_DATA_INVALID = code_from_name("CKR_ENCRYPTED_DATA_INVALID")
SIGNATURE_INVALID = code_from_name("CKR_SIGNATURE_INVALID")

#: CKS_RW_PUBLIC_SESSION and CKS_RW_USER_FUNCTIONS: what session_state reports.
CKS_RW_PUBLIC_SESSION, CKS_RW_USER_FUNCTIONS = 2, 3

#: The Module functions that reach the HSM: the ones ``fail()`` can script and ``count()`` counts.
FUNCTIONS = frozenset({
    "initialize", "finalize", "find_token", "open_session", "close_session", "login", "session_state",
    "token_info", "find_key", "sign", "verify", "decrypt", "generate_random", "generate_keypair",
})


@dataclass(frozen=True)
class ScriptedMechanism:
    """The module's own value for a mechanism (what :meth:`ScriptedModule.mechanism` returns)."""

    name: str
    key_type: str
    uses: frozenset[str]


def _mechanisms() -> dict[str, ScriptedMechanism]:
    sign, decrypt, both = frozenset({"sign"}), frozenset({"decrypt"}), frozenset({"sign", "decrypt"})
    table = {"RSA_PKCS": ("RSA", both), "RSA_X_509": ("RSA", both), "RSA_PKCS_OAEP": ("RSA", decrypt),
             "RSA_PKCS_PSS": ("RSA", sign), "ECDSA": ("EC", sign)}
    for h in ("SHA1", "SHA224", "SHA256", "SHA384", "SHA512"):
        table[f"{h}_RSA_PKCS"] = ("RSA", sign)
        table[f"{h}_RSA_PKCS_PSS"] = ("RSA", sign)
        table[f"ECDSA_{h}"] = ("EC", sign)
    return {name: ScriptedMechanism(name, kt, uses) for name, (kt, uses) in table.items()}


MECHANISMS: dict[str, ScriptedMechanism] = _mechanisms()
#: What a ``None`` mechanism means, as python-pkcs11's defaults.
_DEFAULT_SIGN = {"RSA": MECHANISMS["SHA512_RSA_PKCS"], "EC": MECHANISMS["ECDSA_SHA512"]}
_DEFAULT_DECRYPT = {"RSA": MECHANISMS["RSA_PKCS_OAEP"]}
_CIPHERTEXT_MAGIC = b"SCRIPTED1"


class Call(NamedTuple):
    """One module call, as :attr:`ScriptedHSM.calls` logs it (at the virtual time it completed)."""

    at: float
    instance: str
    function: str
    outcome: str


@dataclass
class _KeyPair:
    label: str
    key_type: str
    bits: int
    secret: bytes = field(repr=False)


@dataclass(frozen=True)
class ScriptedToken:
    """A token as ``find_token`` returns it (the slot id stays stable across reconnects, as measured)."""

    label: str
    slot: int
    hsm: ScriptedHSM = field(repr=False, compare=False)


@dataclass(eq=False)
class ScriptedSession:
    """An open session of one module instance, valid for that instance's current initialisation only."""

    handle: int
    module: ScriptedModule = field(repr=False)
    epoch: int = field(repr=False)
    closed: bool = False


@dataclass(eq=False)
class ScriptedKey:
    """A key handle found (or generated) through ``session``: using it needs that session alive."""

    label: str
    kind: str
    key_type: str
    session: ScriptedSession = field(repr=False)
    pair: _KeyPair = field(repr=False)


@dataclass
class _Fault:
    code: Code
    remaining: int | None


def _secret(seed: int, label: str, serial: int) -> bytes:
    return hashlib.sha256(f"hsmfsm-scripted/{seed}/{label}/{serial}".encode()).digest()


def _signature(secret: bytes, mechanism: str, data: bytes) -> bytes:
    return hmac.new(secret, mechanism.encode() + b"\0" + data, hashlib.sha256).digest()


def _keystream(secret: bytes, n: int) -> bytes:
    blocks = (hashlib.sha256(secret + b"ct" + i.to_bytes(4, "big")).digest() for i in range(n // 32 + 1))
    return b"".join(blocks)[:n]


class ScriptedHSM:
    """A token behind a network link, with scripted failures.

    ``keys`` maps key labels to key types (``"RSA"`` or ``"EC"``); each label is a
    key pair (a private and a public object). ``pin_retries``: after that many
    wrong PINs in a row the PIN is locked (CKR_PIN_LOCKED); None never locks.
    ``clock`` is needed only for :meth:`at` before any module is attached (a
    module attaches its own clock).
    """

    def __init__(self, label: str = "token", pin: str = "1234", *, keys: Mapping[str, str] | None = None,
                 seed: int = 0, latency: float = 0.0005, slot: int = 1, pin_retries: int | None = None,
                 clock: Clock | None = None) -> None:
        self.label, self.slot, self.seed = label, slot, seed
        self._pin = pin
        #: Virtual seconds every call takes (plus :meth:`slow`'s extra).
        self.latency = latency
        self.pin_retries = pin_retries
        self._wrong_pins = 0
        self._rng = random.Random(seed)
        self._serial = 0
        self._keys: list[_KeyPair] = []
        for key_label, key_type in (keys if keys is not None else {"rsa": "RSA", "ec": "EC"}).items():
            self.add_key(key_label, key_type)
        self._state = "up"
        #: Bumped when the link drops (down, restart): instances connected before are broken.
        self._link = 1
        self._extra = 0.0
        self._faults: dict[str, deque[_Fault]] = {}
        #: (instance serial, instance epoch) of every application logged in.
        self._logins: set[tuple[int, int]] = set()
        self._instances = 0
        #: Every call, in completion order.
        self.calls: list[Call] = []
        #: Calls per function name.
        self.counts: Counter[str] = Counter()
        self._clock: Clock | None = None
        self._cond: Condition | None = None
        if clock is not None:
            self._bind(clock)

    # -- scripting ---------------------------------------------------------------

    @property
    def state(self) -> str:
        """``up``, ``down`` or ``hung``."""
        return self._state

    def down(self) -> None:
        """The server dies: connected instances are broken (hung calls return CKR_DEVICE_ERROR)."""
        self._change(state="down", drop=True)

    def up(self) -> None:
        """The server is back. Broken instances stay broken until re-initialised."""
        if self._state == "down":
            self._change(state="up")

    def hang(self) -> None:
        """Every call (C_Initialize too) blocks until :meth:`resume`, a cut-off, or :meth:`down`."""
        if self._state == "up":
            self._change(state="hung")

    def resume(self) -> None:
        """A hung HSM answers again: blocked calls complete normally."""
        if self._state == "hung":
            self._change(state="up")

    def restart(self) -> None:
        """The HSM restarts (and is up): sessions and logins are gone, connected instances broken."""
        self._change(state="up", drop=True)

    def logout_all(self) -> None:
        """The token logged every application out (sessions stay open)."""
        self._change(logout=True)

    def slow(self, seconds: float) -> None:
        """Extra virtual latency on every call from now on (``slow(0)`` ends it)."""
        if seconds < 0:
            raise ValueError("slow() takes a non-negative number of seconds")
        self._extra = seconds

    def fail(self, function: str, code_name: str, times: int | None = 1) -> None:
        """The next ``times`` calls of ``function`` that reach the HSM fail with ``code_name``
        (``times=None``: until :meth:`clear_faults`). Functions returning a code return it."""
        if function not in FUNCTIONS:
            raise ValueError(f"fail(): {function!r} is not a module call ({', '.join(sorted(FUNCTIONS))})")
        code = code_from_name(code_name)
        if code == OK:
            raise ValueError("fail() needs an error code, not CKR_OK")
        if times is not None and times < 1:
            raise ValueError("fail(): times must be at least 1, or None")
        self._faults.setdefault(function, deque()).append(_Fault(code, times))

    def clear_faults(self) -> None:
        self._faults.clear()

    def at(self, t: float, action: Callable[..., object] | str, *args: Any) -> Thread:
        """Run ``action(*args)`` (or the HSM's method of that name) at virtual time ``t``, from a clock thread."""
        clock = self._clock
        if clock is None:
            raise RuntimeError("ScriptedHSM.at() needs a clock: pass clock= or attach a ScriptedModule first")
        act: Callable[..., object] = getattr(self, action) if isinstance(action, str) else action

        def scheduled() -> None:
            delay = t - clock.monotonic()
            if delay > 0:
                clock.sleep(delay)
            act(*args)

        name = action if isinstance(action, str) else getattr(action, "__name__", "action")
        return clock.start_thread(scheduled, f"{self.label}-at-{t:g}-{name}")

    def add_key(self, label: str, key_type: str = "RSA", bits: int = 2048) -> None:
        """Put a key pair on the token (as provisioning would)."""
        self._keys.append(self._new_pair(label, key_type, bits))

    # -- checking what the token did --------------------------------------------------

    def count(self, function: str, outcome: str | None = None) -> int:
        """Calls of ``function`` made so far (with that outcome code name, if given)."""
        if outcome is None:
            return self.counts[function]
        return sum(1 for c in self.calls if c.function == function and c.outcome == outcome)

    def verify_signature(self, label: str, data: bytes, signature: bytes, mechanism: Any = None) -> bool:
        """Whether ``signature`` is the token's signature of ``data`` by the key labelled ``label``."""
        for pair in self._pairs(label):
            mech = _mechanism_value(mechanism) or _DEFAULT_SIGN.get(pair.key_type)
            if mech is not None and hmac.compare_digest(_signature(pair.secret, mech.name, data), signature):
                return True
        return False

    def encrypt(self, label: str, plaintext: bytes) -> bytes:
        """``plaintext`` encrypted to the key labelled ``label`` (what its ``decrypt`` turns back)."""
        pairs = self._pairs(label)
        if not pairs:
            raise KeyError(f"no key labelled {label!r} on {self.label}")
        secret = pairs[0].secret
        tag = hmac.new(secret, b"tag" + plaintext, hashlib.sha256).digest()[:16]
        return _CIPHERTEXT_MAGIC + tag + bytes(a ^ b for a, b in zip(plaintext, _keystream(secret, len(plaintext))))

    def key_labels(self) -> list[str]:
        return [pair.label for pair in self._keys]

    def __repr__(self) -> str:
        return f"<ScriptedHSM {self.label} {self._state} keys={len(self._keys)} calls={len(self.calls)}>"

    # -- inside --------------------------------------------------------------------------

    def _bind(self, clock: Clock) -> None:
        if self._clock is None:
            self._clock = clock
            self._cond = clock.condition(clock.lock())
        elif clock is not self._clock:
            raise ValueError(f"{self.label}: every module of one ScriptedHSM must use the same clock")

    def _change(self, state: str | None = None, drop: bool = False, logout: bool = False) -> None:
        """Change the HSM under its lock and wake every waiting call to look again."""
        cond = self._cond
        if cond is None:
            self._apply(state, drop, logout)
            return
        with cond:
            self._apply(state, drop, logout)
            cond.notify_all()

    def _apply(self, state: str | None, drop: bool, logout: bool) -> None:
        if state is not None:
            self._state = state
        if drop:
            self._link += 1
        if drop or logout:
            self._logins.clear()

    def _new_pair(self, label: str, key_type: str, bits: int) -> _KeyPair:
        kt = key_type.upper()
        if kt not in ("RSA", "EC"):
            raise ValueError(f"key type {key_type!r}: RSA or EC")
        self._serial += 1
        return _KeyPair(label, kt, bits, _secret(self.seed, label, self._serial))

    def _pairs(self, label: str) -> list[_KeyPair]:
        return [pair for pair in self._keys if pair.label == label]

    def _take_fault(self, function: str) -> Code | None:
        queue = self._faults.get(function)
        if not queue:
            return None
        fault = queue[0]
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining == 0:
                queue.popleft()
        return fault.code

    def _record(self, now: float, instance: str, function: str, outcome: str) -> None:
        self.calls.append(Call(now, instance, function, outcome))
        self.counts[function] += 1


def _mechanism_value(mechanism: Any) -> ScriptedMechanism | None:
    """A mechanism by value, name (``CKM_`` prefix optional) or enum with that ``name``; None stays None."""
    if mechanism is None or isinstance(mechanism, ScriptedMechanism):
        return mechanism
    name = mechanism if isinstance(mechanism, str) else getattr(mechanism, "name", None)
    if isinstance(name, str):
        found = MECHANISMS.get(name.removeprefix("CKM_"))
        if found is not None:
            return found
    raise ValueError(f"unknown mechanism {mechanism!r} (a name such as SHA256_RSA_PKCS; "
                     f"known: {', '.join(sorted(MECHANISMS))})")


class ScriptedModule:
    """One client module instance on a :class:`ScriptedHSM`, with the shape of
    :class:`hsmfsm.runtime.edge.Module`.

    ``can_cut_off``: whether :meth:`cut_off` can make hung calls return (a socket
    module); ``parallel``: what the module reports for CKF_OS_LOCKING_OK.
    """

    def __init__(self, hsm: ScriptedHSM, clock: Clock, name: str = "module", *, can_cut_off: bool = True,
                 parallel: bool = True) -> None:
        hsm._bind(clock)
        if hsm._cond is None:  # pragma: no cover - _bind always makes it
            raise RuntimeError("ScriptedHSM without a condition")
        self.hsm = hsm
        self.name = name
        self.initialized = False
        self.parallel = parallel
        self._can_cut_off = can_cut_off
        self._clock = clock
        self._cond: Condition = hsm._cond
        hsm._instances += 1
        self._serial = hsm._instances
        #: Bumped by every (re)initialisation: sessions of an older epoch are stale.
        self._epoch = 0
        #: The HSM link this instance is connected on; None: initialised while the HSM was down (no token).
        self._link: int | None = None
        #: cut_off() shut the link: broken until re-initialised.
        self._severed = False
        #: Bumped by every cut_off(): calls in flight compare it to notice the cut.
        self._cuts = 0
        self._inflight = 0
        self._handles = 0
        self._sessions: set[int] = set()

    @property
    def can_cut_off(self) -> bool:
        return self._can_cut_off

    @property
    def open_sessions(self) -> int:
        """Sessions open on this instance since its last initialisation."""
        return len(self._sessions)

    @property
    def logged_in(self) -> bool:
        return (self._serial, self._epoch) in self.hsm._logins

    # -- lifecycle ----------------------------------------------------------------------

    def prepare(self, timeout: float) -> None:
        self._note("prepare")

    def stop(self) -> None:
        self._note("stop")

    def for_child(self) -> ScriptedModule:
        self._note("for_child")
        return ScriptedModule(self.hsm, self._clock, self.name, can_cut_off=self._can_cut_off,
                              parallel=self.parallel)

    def initialize(self) -> Code:
        """C_Finalize (if initialised) + C_Initialize: CKR_OK even while the HSM is down (then no token).
        Blocks while the HSM hangs; a cut-off (or the HSM dying) then returns CKR_DEVICE_ERROR and leaves
        the instance uninitialised, as does an injected failure."""
        hsm = self.hsm

        def connect() -> Code:
            self._link = None if hsm._state == "down" else hsm._link
            self.initialized = True
            return OK

        try:
            return self._run("initialize", connect, mode="initialize")
        except ModuleCallError as exc:
            return exc.code

    def finalize(self) -> Code:
        def op() -> Code:
            self._teardown()
            return OK

        try:
            return self._run("finalize", op, mode="finalize")
        except ModuleCallError as exc:
            return exc.code

    def cut_off(self) -> tuple[int, int]:
        """Shut the instance's link: calls in flight (hung, or waiting for their reply) return
        CKR_DEVICE_ERROR and the instance is broken until re-initialised. Returns (0, calls made to return);
        (0, 0) and nothing happens when ``can_cut_off`` is False."""
        cut = 0
        if self._can_cut_off:
            with self._cond:
                cut = self._inflight
                if self.initialized and self._link is not None:
                    self._severed = True
                self._cuts += 1
                self._cond.notify_all()
        self._note("cut_off")
        return 0, cut

    # -- token and session ------------------------------------------------------------------

    def find_token(self, label: str) -> Any:
        hsm = self.hsm

        def op() -> ScriptedToken:
            if self._link is None or label != hsm.label:
                raise ModuleCallError(NO_SUCH_TOKEN, f"{self.name}: no token labelled {label!r}")
            return ScriptedToken(hsm.label, hsm.slot, hsm)

        return self._run("find_token", op)

    def open_session(self, token: Any) -> Any:
        def op() -> ScriptedSession:
            self._check_token(token)
            self._handles += 1
            self._sessions.add(self._handles)
            return ScriptedSession(self._handles, self, self._epoch)

        return self._run("open_session", op)

    def close_session(self, session: Any) -> Code:
        """Closing the instance's last session logs it out, as PKCS#11 says."""
        def op() -> Code:
            s = self._check_session(session)
            s.closed = True
            self._sessions.discard(s.handle)
            if not self._sessions:
                self.hsm._logins.discard((self._serial, self._epoch))
            return OK

        try:
            return self._run("close_session", op)
        except ModuleCallError as exc:
            return exc.code

    def login(self, session: Any, pin: str) -> Code:
        hsm = self.hsm

        def op() -> Code:
            self._check_session(session)
            if self.logged_in:
                return USER_ALREADY_LOGGED_IN
            if hsm.pin_retries is not None and hsm._wrong_pins >= hsm.pin_retries:
                return PIN_LOCKED
            if not hmac.compare_digest(pin.encode(), hsm._pin.encode()):
                hsm._wrong_pins += 1
                return PIN_INCORRECT
            hsm._wrong_pins = 0
            hsm._logins.add((self._serial, self._epoch))
            return OK

        try:
            return self._run("login", op, outcome=lambda code: code.name)
        except ModuleCallError as exc:
            return exc.code

    def session_state(self, session: Any) -> tuple[Code, int]:
        def op() -> tuple[Code, int]:
            self._check_session(session)
            return OK, CKS_RW_USER_FUNCTIONS if self.logged_in else CKS_RW_PUBLIC_SESSION

        try:
            return self._run("session_state", op)
        except ModuleCallError as exc:
            return exc.code, 0

    def token_info(self, token: Any) -> None:
        self._run("token_info", lambda: self._check_token(token))

    # -- keys and operations ---------------------------------------------------------------------

    def find_key(self, session: Any, label: str, kind: str) -> Any:
        if kind not in (PRIVATE_KEY, PUBLIC_KEY):
            raise ValueError(f"key kind {kind!r}: {PRIVATE_KEY!r} or {PUBLIC_KEY!r}")

        def op() -> ScriptedKey:
            s = self._check_session(session)
            # Private objects are invisible to a session that is not logged in.
            pairs = [] if kind == PRIVATE_KEY and not self.logged_in else self.hsm._pairs(label)
            if not pairs:
                raise ModuleCallError(NO_SUCH_KEY, f"{self.name}: no {kind} key labelled {label!r}")
            if len(pairs) > 1:
                raise ModuleCallError(MULTIPLE_OBJECTS, f"{self.name}: {len(pairs)} {kind} keys labelled {label!r}")
            pair = pairs[0]
            return ScriptedKey(pair.label, kind, pair.key_type, s, pair)

        return self._run("find_key", op)

    def mechanism(self, mechanism: Any) -> Any:
        return _mechanism_value(mechanism)

    def sign(self, key: Any, data: bytes, mechanism: Any, param: Any) -> bytes:
        def op() -> bytes:
            k, mech = self._check_key(key, PRIVATE_KEY, mechanism, "sign")
            return _signature(k.pair.secret, mech.name, bytes(data))

        return self._run("sign", op)

    def verify(self, key: Any, data: bytes, signature: bytes, mechanism: Any, param: Any) -> bool:
        def op() -> bool:
            k, mech = self._check_key(key, PUBLIC_KEY, mechanism, "sign")
            return hmac.compare_digest(_signature(k.pair.secret, mech.name, bytes(data)), bytes(signature))

        return self._run("verify", op, outcome=lambda ok: "CKR_OK" if ok else SIGNATURE_INVALID.name)

    def decrypt(self, key: Any, data: bytes, mechanism: Any, param: Any) -> bytes:
        def op() -> bytes:
            k, _ = self._check_key(key, PRIVATE_KEY, mechanism, "decrypt")
            blob = bytes(data)
            head = len(_CIPHERTEXT_MAGIC)
            secret = k.pair.secret
            plain = bytes(a ^ b for a, b in zip(blob[head + 16:], _keystream(secret, len(blob) - head - 16)))
            tag = hmac.new(secret, b"tag" + plain, hashlib.sha256).digest()[:16]
            if not blob.startswith(_CIPHERTEXT_MAGIC) or not hmac.compare_digest(tag, blob[head:head + 16]):
                raise ModuleCallError(ENCRYPTED_DATA_INVALID, f"{self.name}: not a ciphertext of {k.label!r}")
            return plain

        return self._run("decrypt", op)

    def generate_random(self, session: Any, nbytes: int) -> bytes:
        def op() -> bytes:
            self._check_session(session)
            return self.hsm._rng.randbytes(nbytes)

        return self._run("generate_random", op)

    def generate_keypair(self, session: Any, key_type: Any, bits: int, label: str) -> Any:
        """The new pair is on the token at once (other instances find it); returns its public key."""
        def op() -> ScriptedKey:
            s = self._check_session(session)
            if not self.logged_in:
                raise ModuleCallError(USER_NOT_LOGGED_IN, f"{self.name}: generate_keypair needs a login")
            kt = key_type if isinstance(key_type, str) else getattr(key_type, "name", str(key_type))
            if kt.upper() not in ("RSA", "EC"):
                raise ModuleCallError(MECHANISM_INVALID, f"{self.name}: cannot generate {key_type!r} keys")
            pair = self.hsm._new_pair(label, kt, bits)
            self.hsm._keys.append(pair)
            return ScriptedKey(label, PUBLIC_KEY, pair.key_type, s, pair)

        return self._run("generate_keypair", op)

    def __repr__(self) -> str:
        link = "no token" if self._link is None else ("broken" if self._broken(self._cuts) else "connected")
        return (f"<ScriptedModule {self.name} on {self.hsm.label} initialized={self.initialized} "
                f"{link if self.initialized else 'uninitialised'} sessions={len(self._sessions)}>")

    # -- the call path ---------------------------------------------------------------------------

    def _run(self, function: str, op: Callable[[], _T], *, mode: str = "call",
             outcome: Callable[[_T], str] | None = None) -> _T:
        """One call: its latency, the link (broken, hung), an injected fault, then ``op`` on the token.

        Runs under the HSM's condition, released only while waiting; everything the call
        decides is decided in one piece. Logs the call when it completes."""
        hsm, cond, clock = self.hsm, self._cond, self._clock
        with cond:
            my_cut = self._cuts
            self._inflight += 1
            try:
                if mode == "initialize":
                    self._teardown()
                delay = hsm.latency + hsm._extra
                if delay > 0:  # the round trip; a cut-off ends it early
                    cond.wait_for(lambda: self._cuts != my_cut, timeout=delay)
                if mode == "initialize":
                    self._await_initialize(my_cut)
                else:
                    self._await_link(mode, my_cut)
                fault = hsm._take_fault(function)
                if fault is not None:
                    raise ModuleCallError(fault, f"{self.name}: {function} failed (scripted)")
                result = op()
            except ModuleCallError as exc:
                hsm._record(clock.monotonic(), self.name, function, exc.code.name)
                raise
            finally:
                self._inflight -= 1
            hsm._record(clock.monotonic(), self.name, function, "CKR_OK" if outcome is None else outcome(result))
            return result

    def _await_link(self, mode: str, my_cut: int) -> None:
        """(Under the condition.) Raise what a broken link raises; wait while the HSM hangs."""
        if not self.initialized:
            if mode == "finalize":
                return
            raise ModuleCallError(NOT_INITIALIZED, f"{self.name}: not initialised")
        if self._link is None:  # no server was there at C_Initialize: nothing goes over the wire
            return
        if self._broken(my_cut):
            if mode == "finalize":
                return
            raise ModuleCallError(DEVICE_ERROR, f"{self.name}: the link to {self.hsm.label} is gone")
        if self.hsm._state == "hung":
            self._cond.wait_for(lambda: self.hsm._state != "hung" or self._broken(my_cut))
            if self._broken(my_cut):
                if mode == "finalize":
                    self._teardown()
                raise ModuleCallError(DEVICE_ERROR, f"{self.name}: the link to {self.hsm.label} was cut")

    def _await_initialize(self, my_cut: int) -> None:
        """(Under the condition.) C_Initialize connects: it waits while the HSM hangs."""
        hsm = self.hsm
        if hsm._state == "hung" and self._cuts == my_cut:
            link = hsm._link
            self._cond.wait_for(lambda: hsm._state != "hung" or self._cuts != my_cut or hsm._link != link)
            if hsm._state == "down":  # accepted, then the server died under the handshake
                raise ModuleCallError(DEVICE_ERROR, f"{self.name}: C_Initialize lost its connection")
        if self._cuts != my_cut:
            raise ModuleCallError(DEVICE_ERROR, f"{self.name}: C_Initialize was cut off")

    def _broken(self, my_cut: int) -> bool:
        return self._severed or self._cuts != my_cut or self._link != self.hsm._link

    def _teardown(self) -> None:
        """C_Finalize's local part: sessions and this application's login are gone."""
        self.hsm._logins.discard((self._serial, self._epoch))
        self._epoch += 1
        self._sessions.clear()
        self._link = None
        self._severed = False
        self.initialized = False

    def _check_token(self, token: Any) -> None:
        if self._link is None or not isinstance(token, ScriptedToken) or token.hsm is not self.hsm:
            raise ModuleCallError(SLOT_ID_INVALID, f"{self.name}: no such slot")

    def _check_session(self, session: Any) -> ScriptedSession:
        if (not isinstance(session, ScriptedSession) or session.module is not self or session.closed
                or session.epoch != self._epoch):
            raise ModuleCallError(SESSION_HANDLE_INVALID, f"{self.name}: stale or closed session {session!r}")
        return session

    def _check_key(self, key: Any, kind: str, mechanism: Any, use: str) -> tuple[ScriptedKey, ScriptedMechanism]:
        if not isinstance(key, ScriptedKey):
            raise ModuleCallError(code_from_name("CKR_KEY_HANDLE_INVALID"), f"{self.name}: not a key: {key!r}")
        self._check_session(key.session)
        if key.kind != kind:
            raise ModuleCallError(KEY_FUNCTION_NOT_PERMITTED, f"{self.name}: {key.label} is a {key.kind} key")
        if kind == PRIVATE_KEY and not self.logged_in:
            raise ModuleCallError(USER_NOT_LOGGED_IN, f"{self.name}: not logged in")
        try:
            mech = _mechanism_value(mechanism)
        except ValueError:
            raise ModuleCallError(MECHANISM_INVALID, f"{self.name}: {mechanism!r}") from None
        if mech is None:
            mech = (_DEFAULT_SIGN if use == "sign" else _DEFAULT_DECRYPT).get(key.key_type)
            if mech is None:
                raise ModuleCallError(MECHANISM_INVALID, f"{self.name}: no default {use} mechanism")
        if use not in mech.uses:
            raise ModuleCallError(MECHANISM_INVALID, f"{self.name}: {mech.name} cannot {use}")
        if mech.key_type != key.key_type:
            raise ModuleCallError(KEY_TYPE_INCONSISTENT, f"{self.name}: {mech.name} on a {key.key_type} key")
        return key, mech

    def _note(self, function: str) -> None:
        """A local call (no round trip), logged and counted like the others."""
        self.hsm._record(self._clock.monotonic(), self.name, function, "CKR_OK")


if TYPE_CHECKING:  # mypy checks the scripted module against the runtime's shape
    from ..runtime.edge import Module

    def _shape(hsm: ScriptedHSM, clock: Clock) -> Module:
        return ScriptedModule(hsm, clock)
