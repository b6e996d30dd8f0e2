"""The production :class:`~hsmfsm.runtime.edge.Module`: python-pkcs11, our ctypes calls, and the host.

Everything python-pkcs11 raises is turned into :class:`ModuleCallError` with
its return code here, so the runtime sees codes only. The success path adds
one Python frame to a sign (a ``try`` costs nothing until it catches).
"""

from __future__ import annotations

import ctypes
import logging
import sys
from typing import Any

import pkcs11
from pkcs11 import MGF, Attribute, KeyType, ObjectClass
from pkcs11._pkcs11 import SearchIter  # type: ignore[attr-defined]  # python-pkcs11 has no stubs
from pkcs11.defaults import DEFAULT_MECHANISM_PARAMS
from pkcs11.exceptions import (
    AttributeSensitive,
    AttributeTypeInvalid,
    MultipleObjectsReturned,
    NoSuchKey,
    PKCS11Error,
)

from ..core import attributes
from ..core.codes import Code, code_from_name, code_from_value
from ..core.errors import ModuleCallError
from ..core.mechanisms import OAEPParams, PSSParams, signature_length
from . import module as _ck
from .codes import code_of
from .host import HostError, ModuleHost, client_module
from .module import ModuleInstance, SessionInfo

log = logging.getLogger("hsmfsm.connection")

_KINDS = {"private": ObjectClass.PRIVATE_KEY, "public": ObjectClass.PUBLIC_KEY}
_MECHANISMS: dict[str, pkcs11.Mechanism] = {}
#: Hashes as hsmfsm.core.mechanisms names them, as python-pkcs11's mechanism and MGF values.
_HASH_MECHANISMS = {"SHA1": pkcs11.Mechanism.SHA_1, "SHA224": pkcs11.Mechanism.SHA224,
                    "SHA256": pkcs11.Mechanism.SHA256, "SHA384": pkcs11.Mechanism.SHA384,
                    "SHA512": pkcs11.Mechanism.SHA512}
_MGFS = {"SHA1": MGF.SHA1, "SHA224": MGF.SHA224, "SHA256": MGF.SHA256, "SHA384": MGF.SHA384, "SHA512": MGF.SHA512}
_PARAM_INVALID = code_from_name("CKR_MECHANISM_PARAM_INVALID")
_mechanism_names: dict[int, str] = {int(m): m.name for m in pkcs11.Mechanism}
#: Attributes a token may refuse to give (a sensitive or absent attribute): then look elsewhere.
_UNREADABLE = (AttributeSensitive, AttributeTypeInvalid)
#: Where a connection runs its module: ``none`` in this process, ``process`` behind a private host.
ISOLATION = ("none", "process")


def _failed(exc: PKCS11Error) -> ModuleCallError:
    return ModuleCallError(code_of(exc), str(exc.args[0]) if exc.args else "")


#: CKK values as :func:`hsmfsm.core.mechanisms.signature_length` names them.
_KEY_TYPE_NAMES = {attributes.CKK_RSA: "RSA", attributes.CKK_EC: "EC", attributes.CKK_EC_EDWARDS: "EC_EDWARDS"}
#: Mechanisms whose parameter is CK_RSA_PKCS_PSS_PARAMS.
_PSS = frozenset({pkcs11.Mechanism.RSA_PKCS_PSS, pkcs11.Mechanism.SHA1_RSA_PKCS_PSS,
                  pkcs11.Mechanism.SHA224_RSA_PKCS_PSS, pkcs11.Mechanism.SHA256_RSA_PKCS_PSS,
                  pkcs11.Mechanism.SHA384_RSA_PKCS_PSS, pkcs11.Mechanism.SHA512_RSA_PKCS_PSS})
#: The RSA decryption mechanisms whose plaintext fits in the modulus length.
_RSA_DECRYPT = frozenset({pkcs11.Mechanism.RSA_PKCS, pkcs11.Mechanism.RSA_PKCS_OAEP, pkcs11.Mechanism.RSA_X_509})
#: CK_MECHANISMs built so far, by (mechanism, parameter): read-only once built, so shared by every
#: thread and instance (the module reads the structure during C_SignInit only), and kept for good
#: with the parameter structures and labels they point at.
_CK_MECHANISMS: dict[tuple[Any, Any], tuple[Any, ...] | None] = {}
_CK_MECHANISMS_MAX = 1024


class P11Key:
    """A key found through a session of one module instance: python-pkcs11's object, the handles,
    and the length of what it signs (or decrypts, for RSA) when its attributes say.

    That length is what lets :meth:`P11Module.sign` take two round trips (C_SignInit, C_Sign
    into a buffer of that size) where python-pkcs11's ``sign`` takes three: it asks the length of
    every signature first (docs/FACTS.md).
    """

    __slots__ = ("handle", "key_type", "obj", "out_len", "session")

    def __init__(self, obj: Any, session_handle: int, key_type: str | None, out_len: int | None) -> None:
        self.obj, self.handle, self.session = obj, int(obj.handle), session_handle
        self.key_type, self.out_len = key_type, out_len

    def __repr__(self) -> str:
        return f"<P11Key {self.key_type} handle={self.handle} session={self.session} out_len={self.out_len}>"


def _unwrap(key: Any) -> Any:
    return key.obj if isinstance(key, P11Key) else key


def _ck_mechanism(mechanism: Any, param: Any) -> Any:
    """The CK_MECHANISM for ``mechanism`` with ``param`` (None, PSSParams or OAEPParams, or
    python-pkcs11's tuple for PSS and OAEP), or None when this path does not build that one
    (python-pkcs11 then makes the call)."""
    try:
        cache_key = (mechanism, param)
        found = _CK_MECHANISMS.get(cache_key)
    except TypeError:  # an unhashable parameter: not ours to build
        return None
    if found is None and cache_key not in _CK_MECHANISMS:
        found = _build_mechanism(mechanism, param)
        if len(_CK_MECHANISMS) < _CK_MECHANISMS_MAX:
            _CK_MECHANISMS[cache_key] = found
    return None if found is None else found[0]


def _build_mechanism(mechanism: Any, param: Any) -> tuple[Any, ...] | None:
    if not isinstance(mechanism, pkcs11.Mechanism):
        return None
    if isinstance(param, PSSParams | OAEPParams):
        param = _pkcs11_param(param)
    if mechanism in _PSS:
        h, mgf, salt = param if param is not None else DEFAULT_MECHANISM_PARAMS[pkcs11.Mechanism.RSA_PKCS_PSS]
        pss = _ck.PSSParams(int(h), int(mgf), int(salt))  # type: ignore[arg-type]  # a tuple of ints
        return (_ck.Mechanism(int(mechanism), ctypes.cast(ctypes.pointer(pss), ctypes.c_void_p),
                              ctypes.sizeof(pss)), pss)
    if mechanism == pkcs11.Mechanism.RSA_PKCS_OAEP:
        h, mgf, label = param if param is not None else DEFAULT_MECHANISM_PARAMS[mechanism]
        text: bytes | None = None if label is None else bytes(label)
        data = None if text is None else ctypes.create_string_buffer(text, len(text))
        oaep = _ck.OAEPParams(int(h), int(mgf), 1, None if data is None else ctypes.cast(data, ctypes.c_void_p),
                              0 if text is None else len(text))  # source 1: CKZ_DATA_SPECIFIED
        return (_ck.Mechanism(int(mechanism), ctypes.cast(ctypes.pointer(oaep), ctypes.c_void_p),
                              ctypes.sizeof(oaep)), oaep, data)
    if param is not None:
        return None
    return (_ck.Mechanism(int(mechanism), None, 0),)


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

    def find_key(self, session: Any, label: str | None, kind: str, key_id: bytes | None = None) -> Any:
        """A :class:`P11Key`: for a private key, with the length of its signatures read from its
        attributes (CKA_KEY_TYPE, CKA_MODULUS, CKA_EC_PARAMS: two round trips, once per key and session)."""
        try:
            obj = find_one(session, label, _KINDS[kind], key_id)
        except PKCS11Error as exc:
            raise _failed(exc) from exc
        key_type = out_len = None
        if kind == "private":
            raw_type, modulus, params = self.instance.key_info(session.handle, obj.handle)
            key_type = _KEY_TYPE_NAMES.get(raw_type) if raw_type is not None else None
            if key_type is not None:
                out_len = signature_length(key_type, modulus_bytes=modulus, ec_params=params)
        return P11Key(obj, session.handle, key_type, out_len)

    def key_attributes(self, session: Any, key: Any) -> dict[str, Any]:
        try:
            return key_attributes(session, _unwrap(key))
        except PKCS11Error as exc:
            raise _failed(exc) from exc

    def mechanisms(self, token: Any) -> frozenset[str]:
        """C_GetMechanismList (ours: :meth:`ModuleInstance.mechanism_list`), as names without CKM_;
        a mechanism python-pkcs11 does not name reads ``0x%08X``."""
        code, found = self.instance.mechanism_list(token.slot.slot_id)
        if code.value != 0:
            raise ModuleCallError(code, "C_GetMechanismList failed")
        return frozenset(_mechanism_names.get(m) or f"0x{m:08X}" for m in found)

    def mechanism_infos(self, token: Any) -> dict[int, tuple[int, int, int]]:
        """C_GetMechanismList, then C_GetMechanismInfo of each: {CKM value: (min, max, flags)}."""
        slot = token.slot.slot_id
        code, found = self.instance.mechanism_list(slot)
        if code.value == 0:
            code, infos = self.instance.mechanism_infos(slot, found)
        if code.value != 0:
            raise ModuleCallError(code, "C_GetMechanismList/C_GetMechanismInfo failed")
        return infos

    def list_objects(self, session: Any) -> list[dict[int, Any]]:
        """Every object the session sees: {CKA value: bool, int, bytes or a tuple of CKM values}, None
        for an attribute the token calls sensitive (:meth:`ModuleInstance.list_objects`). The secret
        parts of private and secret keys (:data:`hsmfsm.core.attributes.SECRET`) are never read."""
        code, raw = self.instance.list_objects(session.handle, attributes.CATALOG, _secret_parts)
        if code.value != 0:
            raise ModuleCallError(code, "listing the token's objects failed")
        size = ctypes.sizeof(ctypes.c_ulong)
        return [{t: None if v is None else attributes.decode_native(t, v, ulong_size=size, byteorder=sys.byteorder)
                 for t, v in obj.items()} for obj in raw]

    def generate_keypair_raw(self, session: Any, mechanism: int, parameter: bytes | None,
                             public: dict[int, Any], private: dict[int, Any]) -> tuple[dict[int, Any], dict[int, Any]]:
        """C_GenerateKeyPair with an application's templates ({CKA value: bool, int or bytes}); returns
        the new public and private key's attributes as :meth:`list_objects` gives them."""
        size = ctypes.sizeof(ctypes.c_ulong)

        def native(template: dict[int, Any]) -> dict[int, bytes]:
            return {t: attributes.encode_native(t, v, ulong_size=size, byteorder=sys.byteorder)
                    for t, v in template.items()}

        code, pub, priv = self.instance.generate_keypair(session.handle, mechanism, parameter, native(public),
                                                         native(private))
        if code.value != 0:
            raise ModuleCallError(code, "C_GenerateKeyPair failed")
        out = []
        for handle, klass in ((pub, attributes.CKO_PUBLIC_KEY), (priv, attributes.CKO_PRIVATE_KEY)):
            wanted = tuple(t for t in attributes.CATALOG if t not in _secret_parts(
                klass.to_bytes(size, sys.byteorder)))
            code, raw = self.instance.object_attributes(session.handle, handle, wanted)
            if code.value != 0:
                raise ModuleCallError(code, "reading the generated key's attributes failed")
            out.append({t: None if v is None else attributes.decode_native(t, v, ulong_size=size,
                                                                            byteorder=sys.byteorder)
                        for t, v in raw.items()})
        return out[0], out[1]

    def mechanism(self, mechanism: Any) -> Any:
        if isinstance(mechanism, int) and not isinstance(mechanism, pkcs11.Mechanism):
            try:
                return pkcs11.Mechanism(mechanism)
            except ValueError:
                raise ValueError(f"mechanism 0x{mechanism:08X} is not one python-pkcs11 can call") from None
        if isinstance(mechanism, str) and mechanism.startswith("0x"):
            return self.mechanism(int(mechanism, 16))
        if mechanism is None or isinstance(mechanism, pkcs11.Mechanism):
            return mechanism
        try:
            return _MECHANISMS[mechanism]
        except KeyError:
            try:
                name = mechanism.removeprefix("CKM_") if isinstance(mechanism, str) else mechanism
                mech = _MECHANISMS[mechanism] = pkcs11.Mechanism[name]
            except KeyError:
                raise ValueError(f"unknown mechanism {mechanism!r} "
                                 "(a python-pkcs11 Mechanism name, e.g. SHA256_RSA_PKCS)") from None
            return mech

    def sign(self, key: Any, data: bytes, mechanism: Any, param: Any) -> bytes:
        """``mechanism``: python-pkcs11's value (what :meth:`mechanism` returns) or a name;
        ``param``: python-pkcs11's tuple, or a :class:`~hsmfsm.core.mechanisms.PSSParams`.

        Two round trips when the signature's length is known from the key (:class:`P11Key`) and the
        mechanism's parameter is one this path builds (none, PSS): C_SignInit and C_Sign through
        ctypes (:meth:`ModuleInstance.sign`); python-pkcs11 otherwise (three: it asks the length)."""
        if isinstance(mechanism, str):
            mechanism = self.mechanism(mechanism)
        if isinstance(key, P11Key):
            size = key.out_len
            if size is not None and mechanism is not None:
                ck = _ck_mechanism(mechanism, param)
                if ck is not None:
                    rv, signature = self.instance.sign(key.session, key.handle, ck, bytes(data), size)
                    if rv != 0:
                        raise ModuleCallError(code_from_value(rv), "C_Sign failed")
                    return signature
            key = key.obj
        if param is not None and isinstance(param, PSSParams):
            param = _pkcs11_param(param)
        try:
            return key.sign(data, mechanism=mechanism, mechanism_param=param)  # type: ignore[no-any-return]
        except PKCS11Error as exc:
            raise _failed(exc) from exc

    def verify(self, key: Any, data: bytes, signature: bytes, mechanism: Any, param: Any) -> bool:
        """python-pkcs11's verify: C_VerifyInit and C_Verify, two round trips already (no length to ask)."""
        if isinstance(mechanism, str):
            mechanism = self.mechanism(mechanism)
        if param is not None and isinstance(param, PSSParams):
            param = _pkcs11_param(param)
        try:
            return _unwrap(key).verify(data, signature, mechanism=mechanism,  # type: ignore[no-any-return]
                                       mechanism_param=param)
        except PKCS11Error as exc:
            raise _failed(exc) from exc

    def decrypt(self, key: Any, data: bytes, mechanism: Any, param: Any) -> bytes:
        """``param``: python-pkcs11's tuple, or a :class:`~hsmfsm.core.mechanisms.OAEPParams`.

        RSA (PKCS#1 v1.5, OAEP, raw) in two round trips, the plaintext into a buffer of the modulus
        length; python-pkcs11 otherwise (C_DecryptInit, a length query, C_Decrypt)."""
        if isinstance(mechanism, str):
            mechanism = self.mechanism(mechanism)
        if isinstance(key, P11Key):
            if key.key_type == "RSA" and key.out_len and mechanism in _RSA_DECRYPT:
                ck = _ck_mechanism(mechanism, param)
                if ck is not None:
                    rv, plain = self.instance.decrypt(key.session, key.handle, ck, bytes(data), key.out_len)
                    if rv != 0:
                        raise ModuleCallError(code_from_value(rv), "C_Decrypt failed")
                    return plain
            key = key.obj
        if param is not None and isinstance(param, OAEPParams):
            param = _pkcs11_param(param)
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

    def cut_link(self) -> bool:
        """Shut this instance's own socket alone (:meth:`ModuleInstance.cut_link`): a suspected
        member's call returns, and the connection's other links go on."""
        return self.instance.cut_link()

    def new_link(self) -> P11Module | None:
        """Another instance with a socket of its own to the same server (p11-kit-client, or the host
        of ``isolation: process``), loaded at its first ``initialize``; None for an in-process module
        (one instance per process, and its sessions run in parallel on it)."""
        if not self.instance.can_cut_off:
            return None
        instance = ModuleInstance(self.instance.module, self.instance.env, self.name)
        return P11Module(self.path, None, "", self.name, self.isolation, host=self.host, instance=instance)

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


def _secret_parts(klass: bytes | None) -> frozenset[int]:
    """The attributes never read from an object of this class (raw CKA_CLASS bytes)."""
    value = int.from_bytes(klass, sys.byteorder) if klass else None
    return attributes.SECRET if value in (attributes.CKO_PRIVATE_KEY, attributes.CKO_SECRET_KEY) else frozenset()


def _pkcs11_param(param: PSSParams | OAEPParams) -> tuple[Any, Any, Any]:
    """hsmfsm's mechanism parameters as python-pkcs11's tuples: (hash mechanism, MGF, salt length)
    for PSS, (hash mechanism, MGF, label or None) for OAEP."""
    try:
        hash_mech, mgf = _HASH_MECHANISMS[param.hash.upper()], _MGFS[param.mgf.upper()]
    except KeyError:
        raise ModuleCallError(_PARAM_INVALID, f"{param!r}: hashes are {', '.join(_HASH_MECHANISMS)}") from None
    if isinstance(param, PSSParams):
        return hash_mech, mgf, param.salt_length
    return hash_mech, mgf, param.label


def describe_lookup(label: str | None, key_id: bytes | None) -> str:
    """A key lookup as messages name it (the spelling of hsmfsm.keys.KeyRef)."""
    parts = ([f"label {label!r}"] if label is not None else []) + ([f"id {key_id.hex()}"] if key_id is not None else [])
    return " and ".join(parts) or "any key"


def _read(obj: Any, attribute: Attribute) -> Any:
    """One attribute, or None when the token will not give it (sensitive, or not one of the object's)."""
    try:
        return obj[attribute]
    except _UNREADABLE:
        return None


def _describe(obj: Any) -> str:
    label, key_id = _read(obj, Attribute.LABEL), _read(obj, Attribute.ID)
    return f"label {label!r} id {bytes(key_id).hex() if key_id else '(none)'}"


def _search(session: Any, template: dict[Any, Any], limit: int = 2) -> list[Any]:
    """Up to ``limit`` objects matching ``template``, finishing the search whatever happens.

    python-pkcs11's ``get_key`` can leave its search operation active (when
    C_FindObjectsInit fails, or when the generator is dropped half-way); its
    finaliser then calls C_FindObjectsFinal at garbage collection and, on a
    dead link, raises into the void (docs/FACTS.md). This runs the same
    SearchIter by hand and always finishes it here, while the caller's lease
    (and so its generation) is still held: the drain waits for it, so the
    handle cannot be stale yet.
    """
    search = SearchIter(session, template, limit)
    found: list[Any] = []
    try:
        search.__enter__()  # C_FindObjectsInit
        for batch in search:
            found.extend(batch)
            if len(found) >= limit:
                break
    finally:
        try:
            search._finalize()  # C_FindObjectsFinal, if still active; marks the search finished
        except PKCS11Error:
            pass
    return found


def find_one(session: Any, label: str | None, klass: ObjectClass, key_id: bytes | None = None) -> Any:
    """Find exactly one object of ``klass`` by label, by CKA_ID or both; the search is always
    finished (:func:`_search`). None: NoSuchKey; two: MultipleObjectsReturned naming both."""
    template: dict[Any, Any] = {Attribute.CLASS: klass}
    if label is not None:
        template[Attribute.LABEL] = label
    if key_id is not None:
        template[Attribute.ID] = bytes(key_id)
    found = _search(session, template)
    lookup = describe_lookup(label, key_id)
    if not found:
        raise NoSuchKey(f"no {klass.name} with {lookup}")
    if len(found) > 1:
        raise MultipleObjectsReturned(f"more than one {klass.name} matches {lookup}: "
                                      f"{_describe(found[0])}, {_describe(found[1])}")
    return found[0]


def key_attributes(session: Any, key: Any) -> dict[str, Any]:
    """The public half of ``key`` as :func:`hsmfsm.keys.public_key_from_attributes` takes it.

    From the public key object with the key's CKA_ID (or, without an id, its label); else from
    the key's own attributes (CKA_MODULUS and CKA_PUBLIC_EXPONENT are readable on an RSA private
    key); else ``{"certificate": der}`` of the certificate with the same CKA_ID. None of those:
    NoSuchKey.
    """
    label, key_id = _read(key, Attribute.LABEL), _read(key, Attribute.ID)
    key_id = bytes(key_id) if key_id else b""
    out: dict[str, Any] = {"label": label, "id": key_id}
    key_type = _read(key, Attribute.KEY_TYPE)
    out["key_type"] = key_type.name if isinstance(key_type, KeyType) else key_type
    if key.object_class == ObjectClass.PUBLIC_KEY:
        public = key
    else:
        match = {Attribute.ID: key_id} if key_id else ({Attribute.LABEL: label} if label is not None else None)
        found = _search(session, {Attribute.CLASS: ObjectClass.PUBLIC_KEY, **match}) if match else []
        if len(found) > 1:
            raise MultipleObjectsReturned(f"more than one public key matches {describe_lookup(label, key_id or None)}: "
                                          f"{_describe(found[0])}, {_describe(found[1])}")
        public = found[0] if found else None
    names = ((Attribute.MODULUS, "modulus"), (Attribute.PUBLIC_EXPONENT, "public_exponent")) \
        if key_type == KeyType.RSA else ((Attribute.EC_PARAMS, "ec_params"), (Attribute.EC_POINT, "ec_point"))
    for source in (public, key):
        if source is None:
            continue
        values = {name: _read(source, attribute) for attribute, name in names}
        if all(v is not None for v in values.values()):
            out.update({name: bytes(v) if isinstance(v, bytes | bytearray) else v for name, v in values.items()})
            return out
    if key_id:
        certificates = _search(session, {Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.ID: key_id}, 1)
        if certificates:
            return {"certificate": bytes(certificates[0][Attribute.VALUE]), "label": label, "id": key_id}
    raise NoSuchKey(f"no public key object, readable key attributes or certificate for "
                    f"{describe_lookup(label, key_id or None)}")
