"""The production :class:`~hsmfsm.runtime.edge.Module`: python-pkcs11, our ctypes calls, and the host.

Everything python-pkcs11 raises is turned into :class:`ModuleCallError` with
its return code here, so the runtime sees codes only. The success path adds
one Python frame to a sign (a ``try`` costs nothing until it catches).
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import pkcs11
from pkcs11 import ObjectClass
from pkcs11._pkcs11 import SearchIter  # type: ignore[attr-defined]  # python-pkcs11 has no stubs
from pkcs11.exceptions import MultipleObjectsReturned, NoSuchKey, PKCS11Error

from ..core.codes import Code
from ..core.errors import ModuleCallError
from .codes import code_of
from .host import HostError, ModuleHost, client_module
from .module import ModuleInstance, SessionInfo

log = logging.getLogger("hsmfsm.connection")

_KINDS = {"private": ObjectClass.PRIVATE_KEY, "public": ObjectClass.PUBLIC_KEY}
_MECHANISMS: dict[str, pkcs11.Mechanism] = {}
#: Where a connection runs its module: ``none`` in this process, ``process`` behind a private host.
ISOLATION = ("none", "process")


def _failed(exc: PKCS11Error) -> ModuleCallError:
    return ModuleCallError(code_of(exc), str(exc.args[0]) if exc.args else "")


class P11Module:
    """A PKCS#11 module loaded through python-pkcs11, one instance per connection.

    ``isolation="process"`` runs the module in a process of its own behind a
    private ``p11-kit server`` (:mod:`hsmfsm.p11.host`) and loads
    ``p11-kit-client`` here, pointed at it.
    """

    def __init__(self, path: str, env: dict[str, str] | None, token_label: str, name: str,
                 isolation: str = "none", *, host: ModuleHost | None = None,
                 instance: ModuleInstance | None = None) -> None:
        if isolation not in ISOLATION:
            raise ValueError(f"isolation must be one of {', '.join(ISOLATION)}, not {isolation!r}")
        self.name, self.path, self.isolation = name, path, isolation
        if instance is not None:
            self.host, self.instance = host, instance
        elif isolation == "process":
            self.host = ModuleHost(path, env, token_label, name)
            self.instance = ModuleInstance(client_module(), self.host.client_env, name)
        else:
            self.host = None
            self.instance = ModuleInstance(path, env, name)

    # -- state ------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        return self.instance.initialized

    @property
    def parallel(self) -> bool:
        return self.instance.parallel

    @property
    def can_cut_off(self) -> bool:
        return self.instance.can_cut_off

    # -- lifecycle ----------------------------------------------------------------

    def prepare(self, timeout: float) -> None:
        if self.host is not None:
            try:
                self.host.ensure_running(timeout)
            except HostError as exc:  # the attempt goes on and fails with the client's code
                log.warning("%s", exc)  # the message names the member

    def initialize(self) -> Code:
        try:
            return self.instance.initialize()
        except PKCS11Error as exc:  # the first load: pkcs11.lib() initialises with NULL
            raise _failed(exc) from exc

    def finalize(self) -> Code:
        return self.instance.finalize()

    def find_token(self, label: str) -> Any:
        try:
            return self.instance.lib.get_token(token_label=label)  # type: ignore[attr-defined]
        except PKCS11Error as exc:
            raise _failed(exc) from exc

    def open_session(self, token: Any) -> Any:
        try:
            return token.open(rw=True)
        except PKCS11Error as exc:
            raise _failed(exc) from exc

    def close_session(self, session: Any) -> Code:
        return self.instance.close_session(session.handle)

    def login(self, session: Any, pin: str) -> Code:
        return self.instance.login(session.handle, pin)

    def session_state(self, session: Any) -> tuple[Code, int]:
        return self.instance.session_state(session.handle)

    def token_info(self, token: Any) -> None:
        try:
            token.slot.get_token()
        except PKCS11Error as exc:
            raise _failed(exc) from exc

    # -- operations -------------------------------------------------------------

    def find_key(self, session: Any, label: str, kind: str) -> Any:
        try:
            return find_one(session, label, _KINDS[kind])
        except PKCS11Error as exc:
            raise _failed(exc) from exc

    def mechanism(self, mechanism: Any) -> Any:
        if mechanism is None or isinstance(mechanism, pkcs11.Mechanism):
            return mechanism
        try:
            return _MECHANISMS[mechanism]
        except KeyError:
            try:
                mech = _MECHANISMS[mechanism] = pkcs11.Mechanism[mechanism]
            except KeyError:
                raise ValueError(f"unknown mechanism {mechanism!r} "
                                 "(a python-pkcs11 Mechanism name, e.g. SHA256_RSA_PKCS)") from None
            return mech

    def sign(self, key: Any, data: bytes, mechanism: Any, param: Any) -> bytes:
        try:
            return key.sign(data, mechanism=mechanism, mechanism_param=param)  # type: ignore[no-any-return]
        except PKCS11Error as exc:
            raise _failed(exc) from exc

    def verify(self, key: Any, data: bytes, signature: bytes, mechanism: Any, param: Any) -> bool:
        try:
            return key.verify(data, signature, mechanism=mechanism, mechanism_param=param)  # type: ignore[no-any-return]
        except PKCS11Error as exc:
            raise _failed(exc) from exc

    def decrypt(self, key: Any, data: bytes, mechanism: Any, param: Any) -> bytes:
        try:
            return key.decrypt(data, mechanism=mechanism, mechanism_param=param)  # type: ignore[no-any-return]
        except PKCS11Error as exc:
            raise _failed(exc) from exc

    def generate_random(self, session: Any, nbytes: int) -> bytes:
        try:
            return session.generate_random(nbytes * 8)  # type: ignore[no-any-return]
        except PKCS11Error as exc:
            raise _failed(exc) from exc

    def generate_keypair(self, session: Any, key_type: Any, bits: int, label: str) -> Any:
        try:
            return session.generate_keypair(key_type, bits, label=label, store=True)
        except PKCS11Error as exc:
            raise _failed(exc) from exc

    # -- cutting off, stopping, forking ------------------------------------------

    def cut_off(self) -> tuple[int, int]:
        """With a host, its stuck processes die first: a reconnect (which needs a fresh
        one) can only start after the cut has made the stuck call return."""
        killed = self.host.kill_stuck() if self.host is not None else 0
        return killed, self.instance.cut_off()

    def stop(self) -> None:
        if self.host is not None:
            self.host.stop()

    def for_child(self) -> P11Module:
        """A socket module gets a fresh instance in a forked child; an in-process one is the same.
        A host is shared: the child reaches it through a socket of its own."""
        fresh = self.instance.for_child()
        if fresh is self.instance:
            return self
        return P11Module(self.path, None, "", self.name, self.isolation, host=self.host, instance=fresh)

    def live_sessions(self, upto: int = 1024) -> int | None:
        """Session handles 1..``upto`` that C_GetSessionInfo calls live (the soak's session count):
        SoftHSM answers ``ulSessionCount`` with CK_UNAVAILABLE_INFORMATION. The caller holds the
        connection's call lock."""
        fn = self.instance.function("C_GetSessionInfo") if self.instance.initialized else None
        if fn is None:
            return None
        info = SessionInfo()
        return sum(1 for handle in range(1, upto + 1) if fn(handle, ctypes.byref(info)) == 0)

    def __repr__(self) -> str:
        return f"<P11Module {self.name} {self.path} isolation={self.isolation} {self.instance!r}>"


def find_one(session: Any, label: str, klass: ObjectClass) -> Any:
    """Find exactly one key, finishing the search whatever happens.

    python-pkcs11's ``get_key`` can leave its search operation active (when
    C_FindObjectsInit fails, or when the generator is dropped half-way); its
    finaliser then calls C_FindObjectsFinal at garbage collection and, on a
    dead link, raises into the void (docs/FACTS.md). This runs the same
    SearchIter by hand and always finishes it here, while the caller's lease
    (and so its generation) is still held: the drain waits for it, so the
    handle cannot be stale yet.
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
        raise NoSuchKey(f"no {klass.name} labelled {label!r}")
    if len(found) > 1:
        raise MultipleObjectsReturned(f"more than one {klass.name} labelled {label!r}")
    return found[0]
