"""The virtual slot: PKCS#11 semantics of one HA token, over a :class:`~hsmfsm.runtime.pool.Pool`.

``hsmfsm serve`` (:mod:`hsmfsm.runtime.server`) reads p11-kit RPC frames and
hands each decoded call to :meth:`VirtualSlot.call`; this module decides the
answer. Why it is built this way (``../shared/P11KIT-RPC.md`` §5, measured):

- **Sessions are the server's.** A virtual session handle belongs to one
  application connection and outlives every member: it holds no member
  session. Operations are *deferred*: C_SignInit checks the key and mechanism
  against the catalog and records them; C_Sign (or C_SignFinal, after
  C_SignUpdate parts buffered up to ``max_operation_bytes``) runs the whole
  operation through the pool's idempotent ``sign``, with its deadline,
  failover and replica check. So a SignInit and a length query on member A,
  A's death, then C_Sign, still end in a good signature: nothing was on A.
  A length query signs at once and keeps the signature for the real call
  (one member call per signature, not two).
- **Objects are the catalog's** (:mod:`hsmfsm.rpc.catalog`): stable virtual
  handles, public attributes cached, so listings work during an outage.
- **Login is per application connection**, checked in constant time against
  the virtual slot's own PIN. Members are logged in by the pool with theirs;
  an application's PIN never reaches a member, and a wrong one costs no
  token's retry counter. Private objects are invisible before login.
- **A member's failure is never the application's problem to repair**: no
  CKR_SESSION_HANDLE_INVALID or CKR_OBJECT_HANDLE_INVALID because a member
  died. With no member serving, the answer is the outage code
  (CKR_DEVICE_ERROR; ``luna``: then CKR_TOKEN_NOT_PRESENT until a member
  serves) within the policy's deadline, and the same sessions work again as
  soon as a member does, with no C_Finalize.
- **Key generation is refused** (``keygen: refuse``): it is not idempotent and
  cannot be replicated by a generic server.

Thread safety: one lock guards the slot's tables (sessions, login flags, the
catalog); member calls run outside it. The server runs one session's
requests in order, different sessions in parallel.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core import attributes as a
from ..core.codes import CKR
from ..core.errors import (
    AllMembersDown,
    HSMError,
    KeyNotFound,
    MechanismNotSupported,
    OutcomeUnknown,
)
from ..core.mechanisms import HASH_BY_CKM, HASH_BY_MGF, OAEPParams, PSSParams, ckm_name
from ..core.policy import Policy
from ..rpc import wire
from ..rpc.catalog import Catalog, CatalogObject
from .clock import SYSTEM
from .edge import Clock

log = logging.getLogger("hsmfsm.serve")

SLOT_ID = 1
#: CK_UNAVAILABLE_INFORMATION on the wire (u64).
UNAVAILABLE = (1 << 64) - 1

CKF_TOKEN_PRESENT, CKF_HW_SLOT = 0x1, 0x4
CKF_RNG, CKF_LOGIN_REQUIRED, CKF_USER_PIN_INITIALIZED, CKF_TOKEN_INITIALIZED = 0x1, 0x4, 0x8, 0x400
CKF_RW_SESSION, CKF_SERIAL_SESSION = 0x2, 0x4
CKU_SO, CKU_USER, CKU_CONTEXT_SPECIFIC = 0, 1, 2
CKS_RO_PUBLIC_SESSION, CKS_RO_USER_FUNCTIONS, CKS_RW_PUBLIC_SESSION, CKS_RW_USER_FUNCTIONS = 0, 1, 2, 3


def _rv(name: str) -> int:
    return CKR[f"CKR_{name}"]


class Refused(Exception):
    """The answer to a call is this CK_RV (an error reply)."""

    def __init__(self, rv: int, why: str = "") -> None:
        super().__init__(f"0x{rv:X}{': ' + why if why else ''}")
        self.rv = rv


@dataclass
class Operation:
    """A deferred sign, verify or decrypt: what C_*Init recorded, the parts so far, and a result
    computed for a length query and kept for the real call."""

    kind: str  # sign, verify, decrypt
    obj: CatalogObject
    mechanism: str
    param: Any
    parts: bytearray = field(default_factory=bytearray)
    multipart: bool = False
    result: bytes | None = None
    result_for: bytes | None = None


@dataclass
class Session:
    handle: int
    flags: int
    found: list[int] | None = None
    operations: dict[str, Operation] = field(default_factory=dict)


@dataclass
class Application:
    """One application connection (one C_Initialize of p11-kit-client)."""

    uid: int
    pid: int
    name: str
    #: The protocol byte the client sent: p11-kit's encodings follow its release (0: 0.24.x).
    client_version: int = 0
    initialized: bool = False
    logged_in: bool = False
    sessions: dict[int, Session] = field(default_factory=dict)
    wrong_pins: int = 0


@dataclass(frozen=True)
class SlotConfig:
    """What the pool file's ``serve`` section says (:class:`hsmfsm.config.pool_file.ServeSpec`)."""

    token_label: str
    pin: Callable[[], str]
    outage_codes: str = "device_error"
    keygen: str = "refuse"
    max_operation_bytes: int = 1024 * 1024
    #: A cached listing older than this is read again at the next C_FindObjectsInit (seconds).
    catalog_max_age: float = 2.0


class VirtualSlot:
    """One virtual slot with one token over ``pool``. ``note(kind, **fields)``: the audit hook."""

    def __init__(self, pool: Any, config: SlotConfig, *, note: Callable[..., None] | None = None,
                 clock: Clock | None = None) -> None:
        self.pool = pool
        self.config = config
        self.policy: Policy = pool.policy
        self._note = note or (lambda kind, **fields: None)
        self._clock = clock or SYSTEM
        self._lock = threading.Lock()
        self._catalog = Catalog()
        self._catalog_at = -1e18
        self._catalog_lock = self._clock.lock()  # one listing at a time; held across the member call
        self._mechanisms: dict[int, tuple[int, int, int]] | None = None
        self._next_session = 1
        self._outage = False  # luna mode: a loss was reported; TOKEN_NOT_PRESENT until a member serves
        self._known_keys: set[tuple[str | None, bytes | None]] = set()
        serial = f"{abs(hash(pool.name)) & 0xFFFFFFFFFFFF:012x}"
        self._serial = wire.pad(serial, 16)
        self.counters: dict[str, int] = {"logins": 0, "logins_refused": 0, "outage_replies": 0,
                                         "signatures": 0, "calls": 0}

    # -- lifecycle ------------------------------------------------------------------------------

    def warm(self, deadline: float | None = None) -> None:
        """Read the catalog and the mechanism list from a member (at start; errors are logged, the
        slot then starts empty and reads them at first use)."""
        try:
            self._refresh_catalog(deadline)
            self._load_mechanisms(deadline)
        except HSMError as exc:
            log.warning("virtual slot: could not read the token's objects and mechanisms yet: %s", exc)

    def application(self, uid: int, pid: int, client_version: int = 0) -> Application:
        app = Application(uid, pid, f"uid={uid} pid={pid}", client_version)
        self._note("application_connected", uid=uid, peer_pid=pid, protocol=client_version)
        return app

    def disconnected(self, app: Application) -> None:
        with self._lock:
            app.sessions.clear()
            app.logged_in = False
        self._note("application_disconnected", uid=app.uid, peer_pid=app.pid)

    # -- dispatch -------------------------------------------------------------------------------

    def call(self, app: Application, name: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """The reply values of one call, or :class:`Refused` with the CK_RV."""
        handler = _HANDLERS.get(name)
        if handler is None:
            raise Refused(_rv("FUNCTION_NOT_SUPPORTED"), name)
        if name != "C_Initialize" and not app.initialized:
            raise Refused(_rv("CRYPTOKI_NOT_INITIALIZED"))
        self.counters["calls"] += 1
        return handler(self, app, *args)

    def is_quick(self, app: Application, name: str, args: tuple[Any, ...]) -> bool:
        """Whether a call is answered from the slot's own state, without a member call: the server
        then answers it at once instead of handing it to a worker (a thread hand-off costs more
        than the answer). C_Sign/C_SignFinal are quick when the length query's result is kept."""
        if name in _QUICK:
            return name not in _NEEDS_MECHANISMS or self._mechanisms is not None
        if name in ("C_Sign", "C_Decrypt") and len(args) >= 2:
            session = app.sessions.get(args[0])
            op = session.operations.get("sign" if name == "C_Sign" else "decrypt") if session else None
            return op is not None and op.result is not None and op.result_for == (args[1] or b"")
        return False

    @staticmethod
    def session_of(name: str, args: tuple[Any, ...]) -> int | None:
        """The session a call runs on (its first ``u`` argument), for per-session ordering; None for
        the slot-wide calls."""
        return args[0] if name in _SESSION_CALLS and args else None

    # -- slot and token -----------------------------------------------------------------------

    def _initialize(self, app: Application, handshake: bytes | None, reserved_set: int,
                    reserved: bytes | None) -> tuple[Any, ...]:
        if handshake != wire.HANDSHAKE:
            raise Refused(_rv("DEVICE_ERROR"), "not the p11-kit RPC handshake")
        with self._lock:
            app.initialized = True
        return ()

    def _finalize(self, app: Application) -> tuple[Any, ...]:
        with self._lock:
            app.sessions.clear()
            app.logged_in = False
            app.initialized = False
        return ()

    def _get_info(self, app: Application) -> tuple[Any, ...]:
        return ((2, 40), wire.pad("hsmfsm", 32), 0, wire.pad("hsmfsm HA virtual slot", 32), (0, 1))

    def _token_present(self) -> bool:
        if self.config.outage_codes != "luna" or not self._outage:
            return True
        if self.pool.serving_members:
            self._outage = False
            return True
        return False

    def _slot_list(self, app: Application, token_present: int, count: int | None) -> tuple[Any, ...]:
        slots = [SLOT_ID] if not token_present or self._token_present() else []
        if count is None or count < len(slots):
            return (wire.Length(len(slots)),)
        return (slots,)

    def _check_slot(self, slot: int) -> None:
        if slot != SLOT_ID:
            raise Refused(_rv("SLOT_ID_INVALID"))

    def _slot_info(self, app: Application, slot: int) -> tuple[Any, ...]:
        self._check_slot(slot)
        flags = CKF_HW_SLOT | (CKF_TOKEN_PRESENT if self._token_present() else 0)
        return (wire.pad(f"hsmfsm virtual slot: pool {self.pool.name}", 64), wire.pad("hsmfsm", 32), flags,
                (0, 1), (0, 1))

    def _token_info(self, app: Application, slot: int) -> tuple[Any, ...]:
        self._check_slot(slot)
        if not self._token_present():
            raise Refused(_rv("TOKEN_NOT_PRESENT"))
        flags = CKF_RNG | CKF_LOGIN_REQUIRED | CKF_USER_PIN_INITIALIZED | CKF_TOKEN_INITIALIZED
        # Session limits: none of the server's own (0 = CK_EFFECTIVELY_INFINITE); counts unavailable.
        return (wire.pad(self.config.token_label, 32), wire.pad("hsmfsm", 32), wire.pad("HA virtual slot", 16),
                self._serial, flags, 0, UNAVAILABLE, 0, UNAVAILABLE, 255, 1,
                UNAVAILABLE, UNAVAILABLE, UNAVAILABLE, UNAVAILABLE, (0, 1), (0, 1), wire.pad("", 16))

    def _mechanism_list(self, app: Application, slot: int, count: int | None) -> tuple[Any, ...]:
        self._check_slot(slot)
        mechanisms = sorted(self._need_mechanisms())
        if count is None or count < len(mechanisms):
            return (wire.Length(len(mechanisms)),)
        return (mechanisms,)

    def _mechanism_info(self, app: Application, slot: int, mechanism: int) -> tuple[Any, ...]:
        self._check_slot(slot)
        info = self._need_mechanisms().get(mechanism)
        if info is None:
            raise Refused(_rv("MECHANISM_INVALID"))
        return info

    def _need_mechanisms(self) -> dict[int, tuple[int, int, int]]:
        mechanisms = self._mechanisms
        if mechanisms is None:
            try:
                mechanisms = self._load_mechanisms(None)
            except HSMError as exc:
                raise self._refusal(exc, "C_GetMechanismList") from None
        return mechanisms

    def _load_mechanisms(self, deadline: float | None) -> dict[int, tuple[int, int, int]]:
        member, token = self.pool.mechanism_infos(deadline=deadline)
        assert isinstance(token, dict)
        mechanisms = served_mechanisms(token, keygen=self.config.keygen == "primary")
        self._mechanisms = mechanisms
        log.info("virtual slot: %d of the token's %d mechanisms served, read from %s", len(mechanisms),
                 len(token), member)
        return mechanisms

    # -- sessions and login ---------------------------------------------------------------------

    def _open_session(self, app: Application, slot: int, flags: int) -> tuple[Any, ...]:
        self._check_slot(slot)
        if not flags & CKF_SERIAL_SESSION:
            raise Refused(_rv("SESSION_PARALLEL_NOT_SUPPORTED"))
        if not self._token_present():
            raise Refused(_rv("TOKEN_NOT_PRESENT"))
        with self._lock:
            handle = self._next_session
            self._next_session += 1
            app.sessions[handle] = Session(handle, flags)
        return (handle,)

    def _session(self, app: Application, handle: int) -> Session:
        session = app.sessions.get(handle)
        if session is None:
            raise Refused(_rv("SESSION_HANDLE_INVALID"))
        return session

    def _close_session(self, app: Application, handle: int) -> tuple[Any, ...]:
        with self._lock:
            self._session(app, handle)
            del app.sessions[handle]
        return ()

    def _close_all_sessions(self, app: Application, slot: int) -> tuple[Any, ...]:
        self._check_slot(slot)
        with self._lock:
            app.sessions.clear()
        return ()

    def _session_info(self, app: Application, handle: int) -> tuple[Any, ...]:
        with self._lock:
            session = self._session(app, handle)
            rw = bool(session.flags & CKF_RW_SESSION)
            if app.logged_in:
                state = CKS_RW_USER_FUNCTIONS if rw else CKS_RO_USER_FUNCTIONS
            else:
                state = CKS_RW_PUBLIC_SESSION if rw else CKS_RO_PUBLIC_SESSION
            return (SLOT_ID, state, session.flags, 0)

    def _login(self, app: Application, handle: int, user_type: int, pin: bytes | None) -> tuple[Any, ...]:
        with self._lock:
            self._session(app, handle)
            already = app.logged_in
        if user_type == CKU_SO:
            raise Refused(_rv("USER_TYPE_INVALID"), "the security officer administers the members directly")
        if user_type not in (CKU_USER, CKU_CONTEXT_SPECIFIC):
            raise Refused(_rv("USER_TYPE_INVALID"))
        if already and user_type == CKU_USER:
            raise Refused(_rv("USER_ALREADY_LOGGED_IN"))
        try:
            expected = self.config.pin().encode("utf-8")
        except Exception as exc:  # the PIN source cannot be read: say so, never which PIN
            log.error("virtual slot: the application PIN cannot be read: %s", type(exc).__name__)
            raise Refused(_rv("DEVICE_ERROR"), "the application PIN source cannot be read") from None
        if not hmac.compare_digest(pin or b"", expected):
            with self._lock:
                app.wrong_pins += 1
            self.counters["logins_refused"] += 1
            self._note("login_refused", uid=app.uid, peer_pid=app.pid, wrong_pins=app.wrong_pins)
            log.warning("virtual slot: wrong PIN from %s (%d so far); no member was asked", app.name,
                        app.wrong_pins)
            raise Refused(_rv("PIN_INCORRECT"))
        with self._lock:
            app.logged_in = True
            app.wrong_pins = 0
        self.counters["logins"] += 1
        self._note("login", uid=app.uid, peer_pid=app.pid)
        return ()

    def _logout(self, app: Application, handle: int) -> tuple[Any, ...]:
        with self._lock:
            self._session(app, handle)
            if not app.logged_in:
                raise Refused(_rv("USER_NOT_LOGGED_IN"))
            app.logged_in = False
            for session in app.sessions.values():
                session.operations.clear()
        return ()

    # -- objects --------------------------------------------------------------------------------

    def _refresh_catalog(self, deadline: float | None) -> None:
        with self._catalog_lock:
            member, listing = self.pool.objects(deadline=deadline)
            with self._lock:
                added, removed = self._catalog.update(listing, member)
                self._catalog_at = self._clock.monotonic()
                problems = self._catalog.problems
                # A key only one member has (keygen: primary) is not the pool's reference yet: the
                # replica check would keep every other member out for lacking it.
                keys = [(o.label, o.key_id) for o in self._catalog.objects()
                        if o.object_class == a.CKO_PRIVATE_KEY and (o.label or o.key_id)
                        and o.handle not in self._catalog.pinned]
            for problem in problems:
                log.error("virtual slot: %s", problem)
            if added or removed:
                log.info("virtual slot: %d objects from %s (%d new, %d gone)", len(listing), member, added, removed)
            self._check_replicas(keys)

    def _check_replicas(self, keys: list[tuple[str | None, bytes | None]]) -> None:
        """Make each private key's public half the pool's reference, so that a member whose copy
        differs is kept out before it serves the key (the replica check)."""
        for label, key_id in keys:
            if (label, key_id) in self._known_keys:
                continue
            try:
                self.pool.public_key(label, key_id=key_id)
            except HSMError as exc:
                log.warning("virtual slot: key %r id %s: no public half to check replicas against: %s",
                            label, key_id.hex() if key_id else "(none)", exc)
            else:
                self._known_keys.add((label, key_id))

    def _catalog_for_find(self) -> Catalog:
        stale = self._clock.monotonic() - self._catalog_at >= self.config.catalog_max_age
        if stale or not self._catalog.loaded:
            try:
                self._refresh_catalog(None)
            except HSMError as exc:
                if not self._catalog.loaded:
                    raise self._refusal(exc, "C_FindObjectsInit") from None
                log.info("virtual slot: listing from the cache (%s)", exc)
        return self._catalog

    def _object(self, app: Application, handle: int) -> CatalogObject:
        obj = self._catalog.get(handle, logged_in=app.logged_in)
        if obj is None:
            raise Refused(_rv("OBJECT_HANDLE_INVALID"))
        return obj

    def _find_init(self, app: Application, handle: int, template: list[wire.Attribute]) -> tuple[Any, ...]:
        with self._lock:
            session = self._session(app, handle)
            if session.found is not None:
                raise Refused(_rv("OPERATION_ACTIVE"))
        catalog = self._catalog_for_find()
        with self._lock:
            session = self._session(app, handle)
            session.found = catalog.find(template, logged_in=app.logged_in)
        return ()

    def _find(self, app: Application, handle: int, count: int | None) -> tuple[Any, ...]:
        with self._lock:
            session = self._session(app, handle)
            if session.found is None:
                raise Refused(_rv("OPERATION_NOT_INITIALIZED"))
            n = count or 0
            out, session.found = session.found[:n], session.found[n:]
        return (out,)

    def _find_final(self, app: Application, handle: int) -> tuple[Any, ...]:
        with self._lock:
            session = self._session(app, handle)
            if session.found is None:
                raise Refused(_rv("OPERATION_NOT_INITIALIZED"))
            session.found = None
        return ()

    def _get_attributes(self, app: Application, handle: int, obj_handle: int,
                        template: list[tuple[int, int]]) -> tuple[Any, ...]:
        with self._lock:
            self._session(app, handle)
            obj = self._object(app, obj_handle)
        version = app.client_version
        if version == 0 and any(a.kind_of(t) == "template" for t, _ in template):
            # 0.24.1's client fails the whole reply on any entry for these, even an invalid one.
            raise Refused(_rv("ATTRIBUTE_TYPE_INVALID"), "attribute templates are not served to 0.24 clients")
        out: list[wire.Attribute] = []
        rv = 0
        for attribute_type, length in template:
            entry, code = obj.attribute(attribute_type, length, client_version=version)
            out.append(entry)
            if code and not rv:
                rv = code
        return (out, rv)

    # -- operations -----------------------------------------------------------------------------

    def _init(self, kind: str, usage: int, classes: tuple[int, ...], app: Application, handle: int,
              mechanism: wire.Mechanism | None, key: int) -> tuple[Any, ...]:
        with self._lock:
            session = self._session(app, handle)
            if mechanism is None:  # 0.25.3+ clients cancel an operation with a NULL mechanism
                session.operations.pop(kind, None)
                return ()
            if kind in session.operations:
                raise Refused(_rv("OPERATION_ACTIVE"))
            obj = self._catalog.get(key, logged_in=app.logged_in)
            if obj is None:
                known = self._catalog.get(key, logged_in=True)
                raise Refused(_rv("USER_NOT_LOGGED_IN" if known is not None else "KEY_HANDLE_INVALID"))
        if obj.object_class not in classes:
            raise Refused(_rv("KEY_TYPE_INCONSISTENT"))
        if not obj.allows(usage):
            raise Refused(_rv("KEY_FUNCTION_NOT_PERMITTED"))
        mechanisms = self._need_mechanisms()
        if mechanism.type not in mechanisms:
            raise Refused(_rv("MECHANISM_INVALID"))
        name = ckm_name(mechanism.type)
        if not _fits(name, obj.key_type):
            raise Refused(_rv("KEY_TYPE_INCONSISTENT"))
        param = _param(mechanism)
        with self._lock:
            session = self._session(app, handle)
            if kind in session.operations:
                raise Refused(_rv("OPERATION_ACTIVE"))
            session.operations[kind] = Operation(kind, obj, name, param)
        return ()

    def _operation(self, app: Application, handle: int, kind: str) -> Operation:
        with self._lock:
            session = self._session(app, handle)
            op = session.operations.get(kind)
            if op is None:
                raise Refused(_rv("OPERATION_NOT_INITIALIZED"))
            if op.obj.private and not app.logged_in:
                session.operations.pop(kind, None)
                raise Refused(_rv("USER_NOT_LOGGED_IN"))
            return op

    def _end(self, app: Application, handle: int, kind: str) -> None:
        with self._lock:
            session = app.sessions.get(handle)
            if session is not None:
                session.operations.pop(kind, None)

    def _update(self, kind: str, app: Application, handle: int, part: bytes | None) -> tuple[Any, ...]:
        op = self._operation(app, handle, kind)
        data = part or b""
        if len(op.parts) + len(data) > self.config.max_operation_bytes:
            self._end(app, handle, kind)
            raise Refused(_rv("DATA_LEN_RANGE"), f"multi-part input beyond {self.config.max_operation_bytes} bytes")
        with self._lock:
            op.parts += data
            op.multipart = True
        return ()

    def _output(self, kind: str, app: Application, handle: int, data: bytes, length: int | None,
                run: Callable[[Operation, bytes], bytes]) -> tuple[Any, ...]:
        """A one-shot or final call with an output buffer: run it (or reuse the result of the length
        query for the same input), then answer the size (``fy`` NULL or too small: the operation
        stays active, as PKCS#11 says) or the bytes (the operation ends)."""
        op = self._operation(app, handle, kind)
        if op.result is None or op.result_for != data:
            try:
                result = run(op, data)
            except Refused:
                self._end(app, handle, kind)
                raise
            except HSMError as exc:
                self._end(app, handle, kind)
                raise self._refusal(exc, f"C_{kind.capitalize()}") from None
            with self._lock:
                op.result, op.result_for = result, data
        assert op.result is not None
        if length is None or length < len(op.result):
            return (wire.Length(len(op.result)),)
        self._end(app, handle, kind)
        return (op.result,)

    def _sign_with(self, op: Operation, data: bytes) -> bytes:
        o = op.obj
        signature: bytes = self._on_member(
            o, lambda: self.pool.sign(o.label, data, op.mechanism, op.param, key_id=o.key_id),
            lambda c: c.sign(o.label, data, op.mechanism, op.param, key_id=o.key_id))
        self.counters["signatures"] += 1
        self._outage = False
        return signature

    def _decrypt_with(self, op: Operation, data: bytes) -> bytes:
        o = op.obj
        plain: bytes = self._on_member(
            o, lambda: self.pool.decrypt(o.label, data, op.mechanism, op.param, key_id=o.key_id),
            lambda c: c.decrypt(o.label, data, op.mechanism, op.param, key_id=o.key_id))
        self._outage = False
        return plain

    def _sign(self, app: Application, handle: int, data: bytes | None, length: int | None) -> tuple[Any, ...]:
        op = self._operation(app, handle, "sign")
        if op.multipart:
            self._end(app, handle, "sign")
            raise Refused(_rv("OPERATION_ACTIVE"), "C_Sign after C_SignUpdate")
        return self._output("sign", app, handle, data or b"", length, self._sign_with)

    def _sign_final(self, app: Application, handle: int, length: int | None) -> tuple[Any, ...]:
        op = self._operation(app, handle, "sign")
        return self._output("sign", app, handle, bytes(op.parts), length, self._sign_with)

    def _decrypt(self, app: Application, handle: int, data: bytes | None, length: int | None) -> tuple[Any, ...]:
        return self._output("decrypt", app, handle, data or b"", length, self._decrypt_with)

    def _verify_run(self, app: Application, handle: int, data: bytes, signature: bytes) -> tuple[Any, ...]:
        op = self._operation(app, handle, "verify")
        self._end(app, handle, "verify")
        try:
            o = op.obj
            ok = self._on_member(
                o, lambda: self.pool.verify(o.label, data, signature, op.mechanism, op.param, key_id=o.key_id),
                lambda c: c.verify(o.label, data, signature, op.mechanism, op.param, key_id=o.key_id))
        except HSMError as exc:
            raise self._refusal(exc, "C_Verify") from None
        self._outage = False
        if not ok:
            raise Refused(_rv("SIGNATURE_INVALID"))
        return ()

    def _verify(self, app: Application, handle: int, data: bytes | None, signature: bytes | None) -> tuple[Any, ...]:
        return self._verify_run(app, handle, data or b"", signature or b"")

    def _verify_final(self, app: Application, handle: int, signature: bytes | None) -> tuple[Any, ...]:
        op = self._operation(app, handle, "verify")
        return self._verify_run(app, handle, bytes(op.parts), signature or b"")

    def _random(self, app: Application, handle: int, length: int | None) -> tuple[Any, ...]:
        with self._lock:
            self._session(app, handle)
        if not length:
            return (b"",)
        if length > wire.MAX_BYTES:
            raise Refused(_rv("ARGUMENTS_BAD"))
        try:
            data: bytes = self.pool.generate_random(length)
        except HSMError as exc:
            raise self._refusal(exc, "C_GenerateRandom") from None
        self._outage = False
        return (data,)

    def _seed_random(self, app: Application, handle: int, seed: bytes | None) -> tuple[Any, ...]:
        with self._lock:
            self._session(app, handle)
        raise Refused(_rv("RANDOM_SEED_NOT_SUPPORTED"))

    def _keygen(self, app: Application, handle: int, *args: Any) -> tuple[Any, ...]:
        with self._lock:
            self._session(app, handle)
        raise Refused(_rv("FUNCTION_NOT_SUPPORTED"), "key generation is not replicated: generate keys on the "
                                                     "members (or replicate the token), see the README")

    def _generate_keypair(self, app: Application, handle: int, mechanism: wire.Mechanism | None,
                          public: list[wire.Attribute], private: list[wire.Attribute]) -> tuple[Any, ...]:
        """``keygen: primary``: to the first serving member only, never re-sent; the new key is
        served by that member alone until a listing from another member shows its replica."""
        if self.config.keygen != "primary":
            return self._keygen(app, handle)
        with self._lock:
            self._session(app, handle)
            if not app.logged_in:
                raise Refused(_rv("USER_NOT_LOGGED_IN"))
        if mechanism is None:
            raise Refused(_rv("MECHANISM_INVALID"))
        if mechanism.type not in self._need_mechanisms():
            raise Refused(_rv("MECHANISM_INVALID"))
        parameter = mechanism.param if isinstance(mechanism.param, bytes) else None
        if mechanism.param is not None and parameter is None:
            raise Refused(_rv("MECHANISM_PARAM_INVALID"))
        serving = self.pool.serving_members
        if not serving:
            raise self._refusal(AllMembersDown(self.pool.name, {}), "C_GenerateKeyPair")
        primary = serving[0]
        templates = [{x.type: x.value for x in template if x.valid} for template in (public, private)]
        try:
            pub, priv = self.pool.member(primary).generate_keypair_raw(mechanism.type, parameter, *templates)
        except HSMError as exc:
            if isinstance(exc, OutcomeUnknown) or exc.may_have_acted:
                self._note("outcome_unknown", member=primary, call="C_GenerateKeyPair", detail=str(exc)[:300])
                log.error("virtual slot: C_GenerateKeyPair on %s may or may not have made a key; not re-sent: %s",
                          primary, exc)
                raise Refused(_rv("DEVICE_ERROR"), str(exc)) from None
            raise self._refusal(exc, "C_GenerateKeyPair") from None
        with self._lock:
            pub_obj = self._catalog.add(pub, pinned=primary)
            priv_obj = self._catalog.add(priv, pinned=primary)
        self._note("key_generated", member=primary, label=priv_obj.label,
                   key_id=priv_obj.key_id.hex() if priv_obj.key_id else None)
        return (pub_obj.handle, priv_obj.handle)

    def _on_member(self, obj: CatalogObject, pooled: Callable[[], Any], direct: Callable[[Any], Any]) -> Any:
        """An operation on ``obj``: through the pool, or, while the key is only on the member that
        generated it, on that member first (the pool's other members would answer "no such key")."""
        owner = self._catalog.pinned.get(obj.handle)
        if owner is None:
            return pooled()
        try:
            return direct(self.pool.member(owner))
        except HSMError as exc:
            if not exc.reissue:
                raise
            return pooled()  # the owner is down: a replica may have appeared meanwhile

    # -- errors -----------------------------------------------------------------------------------

    def _refusal(self, exc: HSMError, call: str) -> Refused:
        """What an application gets for a pool error. The token's verdict on the request (the
        policy's ``caller`` class: bad data, a bad parameter) is passed on; a missing key or
        mechanism becomes the PKCS#11 code for it; anything that is a member's failure is the
        outage code, never a handle error."""
        if isinstance(exc, KeyNotFound):
            return Refused(_rv("KEY_HANDLE_INVALID"), str(exc))
        if isinstance(exc, MechanismNotSupported):
            return Refused(_rv("MECHANISM_INVALID"), str(exc))
        code = exc.code
        value = code.value if code is not None else None
        if code is not None and value is not None and not isinstance(exc, AllMembersDown) \
                and 0 < value < 0x80000000 and self.policy.class_of(code).name == "caller":
            return Refused(value, str(exc))
        self.counters["outage_replies"] += 1
        luna = self.config.outage_codes == "luna"
        if luna and self._outage and not self.pool.serving_members:
            return Refused(_rv("TOKEN_NOT_PRESENT"), str(exc))
        first = not self._outage
        self._outage = True
        if first:
            self._note("outage", call=call, error=type(exc).__name__, detail=str(exc)[:300])
        log.warning("virtual slot: %s failed on every member: %s", call, exc)
        return Refused(_rv("DEVICE_ERROR"), str(exc))


CKF_ENCRYPT, CKF_DECRYPT, CKF_SIGN, CKF_VERIFY = 0x100, 0x200, 0x800, 0x2000


def served_mechanisms(token: dict[int, tuple[int, int, int]], *, keygen: bool = False
                      ) -> dict[int, tuple[int, int, int]]:
    """The token's mechanisms the virtual slot serves, with the flags it serves them for: the
    asymmetric sign, verify and decrypt families (what the pool's idempotent paths carry).
    Key generation, digests, HMAC and symmetric ciphers are left out: advertising them would only
    move the refusal from C_GetMechanismList to the call."""
    out: dict[int, tuple[int, int, int]] = {}
    for value, (low, high, flags) in token.items():
        name = ckm_name(value)
        if keygen and name in _KEYGEN_MECHANISMS and flags & CKF_GENERATE_KEY_PAIR:
            out[value] = (low, high, CKF_GENERATE_KEY_PAIR)
            continue
        if not any(name == f or name.endswith("_" + f) for f in _SERVED_FAMILIES):
            continue
        served = flags & (CKF_SIGN | CKF_VERIFY | CKF_DECRYPT)
        if served:
            out[value] = (low, high, served)
    return out


CKF_GENERATE_KEY_PAIR = 0x10000
#: The key-pair generation mechanisms ``keygen: primary`` passes to the primary.
_KEYGEN_MECHANISMS = frozenset({"RSA_PKCS_KEY_PAIR_GEN", "EC_KEY_PAIR_GEN"})
#: Mechanism names (or their ``_``-suffix) the virtual slot serves.
_SERVED_FAMILIES = ("RSA_PKCS", "RSA_X_509", "RSA_PKCS_PSS", "RSA_PKCS_OAEP", "ECDSA", "EDDSA")


def _fits(mechanism: str, key_type: int | None) -> bool:
    """Whether a mechanism's family matches the key type (CKR_KEY_TYPE_INCONSISTENT otherwise)."""
    if "EDDSA" in mechanism:
        return key_type == a.CKK_EC_EDWARDS
    if "ECDSA" in mechanism:
        return key_type == a.CKK_EC
    if "RSA" in mechanism:
        return key_type == a.CKK_RSA
    return True


def _param(mechanism: wire.Mechanism) -> Any:
    """The pool's parameter value for a mechanism's wire parameter."""
    p = mechanism.param
    if p is None or p == b"":
        return None
    if isinstance(p, wire.PSS):
        h, mgf = HASH_BY_CKM.get(p.hash), HASH_BY_MGF.get(p.mgf)
        if h is None or mgf is None:
            raise Refused(_rv("MECHANISM_PARAM_INVALID"))
        return PSSParams(h, mgf, p.salt_length)
    if isinstance(p, wire.OAEP):
        h, mgf = HASH_BY_CKM.get(p.hash), HASH_BY_MGF.get(p.mgf)
        if h is None or mgf is None:
            raise Refused(_rv("MECHANISM_PARAM_INVALID"))
        return OAEPParams(h, mgf, p.source_data or None)
    raise Refused(_rv("MECHANISM_PARAM_INVALID"), "mechanism parameters other than PSS and OAEP are not served")


_SIGN_CLASSES = (a.CKO_PRIVATE_KEY,)
_VERIFY_CLASSES = (a.CKO_PUBLIC_KEY,)


def _handler_table() -> dict[str, Callable[..., tuple[Any, ...]]]:
    v = VirtualSlot

    def init(kind: str, usage: int, classes: tuple[int, ...]) -> Callable[..., tuple[Any, ...]]:
        def run(self: VirtualSlot, app: Application, handle: int, mechanism: wire.Mechanism | None,
                key: int) -> tuple[Any, ...]:
            return self._init(kind, usage, classes, app, handle, mechanism, key)
        return run

    def update(kind: str) -> Callable[..., tuple[Any, ...]]:
        def run(self: VirtualSlot, app: Application, handle: int, part: bytes | None) -> tuple[Any, ...]:
            return self._update(kind, app, handle, part)
        return run

    return {
        "C_Initialize": v._initialize, "C_Finalize": v._finalize, "C_GetInfo": v._get_info,
        "C_GetSlotList": v._slot_list, "C_GetSlotInfo": v._slot_info, "C_GetTokenInfo": v._token_info,
        "C_GetMechanismList": v._mechanism_list, "C_GetMechanismInfo": v._mechanism_info,
        "C_OpenSession": v._open_session, "C_CloseSession": v._close_session,
        "C_CloseAllSessions": v._close_all_sessions, "C_GetSessionInfo": v._session_info,
        "C_Login": v._login, "C_Logout": v._logout,
        "C_FindObjectsInit": v._find_init, "C_FindObjects": v._find, "C_FindObjectsFinal": v._find_final,
        "C_GetAttributeValue": v._get_attributes,
        "C_SignInit": init("sign", a.CKA_SIGN, _SIGN_CLASSES), "C_Sign": v._sign,
        "C_SignUpdate": update("sign"), "C_SignFinal": v._sign_final,
        "C_VerifyInit": init("verify", a.CKA_VERIFY, _VERIFY_CLASSES), "C_Verify": v._verify,
        "C_VerifyUpdate": update("verify"), "C_VerifyFinal": v._verify_final,
        "C_DecryptInit": init("decrypt", a.CKA_DECRYPT, _SIGN_CLASSES), "C_Decrypt": v._decrypt,
        "C_GenerateRandom": v._random, "C_SeedRandom": v._seed_random,
        "C_GenerateKeyPair": v._generate_keypair, "C_GenerateKey": v._keygen,
    }


_HANDLERS = _handler_table()
#: The calls whose first argument is a session handle (run in order per session).
_SESSION_CALLS = frozenset({
    "C_CloseSession", "C_GetSessionInfo", "C_Login", "C_Logout", "C_FindObjectsInit", "C_FindObjects",
    "C_FindObjectsFinal", "C_GetAttributeValue", "C_SignInit", "C_Sign", "C_SignUpdate", "C_SignFinal",
    "C_VerifyInit", "C_Verify", "C_VerifyUpdate", "C_VerifyFinal", "C_DecryptInit", "C_Decrypt",
    "C_GenerateRandom", "C_SeedRandom", "C_GenerateKeyPair", "C_GenerateKey", "C_DigestInit", "C_Digest",
})
#: Calls answered from the slot's own state (no member call), and those of them that need the
#: mechanism list (read from a member the first time).
_QUICK = frozenset({
    "C_Initialize", "C_Finalize", "C_GetInfo", "C_GetSlotList", "C_GetSlotInfo", "C_GetTokenInfo",
    "C_GetMechanismList", "C_GetMechanismInfo", "C_OpenSession", "C_CloseSession", "C_CloseAllSessions",
    "C_GetSessionInfo", "C_Login", "C_Logout", "C_FindObjects", "C_FindObjectsFinal", "C_GetAttributeValue",
    "C_SignInit", "C_SignUpdate", "C_VerifyInit", "C_VerifyUpdate", "C_DecryptInit", "C_SeedRandom",
    "C_GenerateKeyPair", "C_GenerateKey",
})
_NEEDS_MECHANISMS = frozenset({"C_GetMechanismList", "C_GetMechanismInfo", "C_SignInit", "C_VerifyInit",
                               "C_DecryptInit"})
#: Every call the virtual slot serves (the others: CKR_FUNCTION_NOT_SUPPORTED).
SERVED = frozenset(_HANDLERS)
