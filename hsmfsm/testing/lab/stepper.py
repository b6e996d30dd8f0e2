"""A real PKCS#11 application that a test drives one C call at a time, in a process of its own.

Why it exists: the interesting failures of a network HSM happen *between* the calls of one
operation: C_SignInit succeeded, the length query (C_Sign with a NULL buffer) answered, and
then the HSM dies before the real C_Sign. python-pkcs11 runs such a sequence inside one Python
call, so a test cannot stop in the middle of it, count exactly which calls a wrong PIN costs,
or time a single call while every HSM is down. This module calls the module's own
CK_FUNCTION_LIST (from ``C_GetFunctionList``) through ctypes, one command per call, and so can
play any application we care to imitate over ANY PKCS#11 module; in practice the stock
``p11-kit-client.so`` with ``P11_KIT_SERVER_ADDRESS=unix:path=SOCKET`` in its environment.

Why a process of its own: p11-kit-client reads its server address when it is loaded, a hung
C call cannot be interrupted from inside a process, and a test wants to kill the application
outright. So the child (``python -m hsmfsm.testing.lab.stepper --module PATH``) reads one JSON
command per line on stdin and writes one JSON answer per line on stdout, and the parent-side
:class:`Stepper` enforces every timeout. ctypes releases the GIL during each C call, so the
child is never frozen by its own module.

The protocol. A command is an object with ``"op"`` and the op's fields (an optional ``"seq"``
is echoed back). Every answer of an op that calls the module carries ``"rv"`` (the CK_RV),
``"rv_name"`` (its CKR name, :data:`hsmfsm.core.codes.CKR` inverted), ``"seconds"`` (time spent
inside the C calls) and ``"calls"`` (each C call made: ``fn``, ``rv``, ``rv_name``, ``seconds``)
besides the op's own fields; an op that stops at a failing call answers that call's rv. Ops:

===============  ==========================================  ====================================
op               fields                                      answer fields
===============  ==========================================  ====================================
initialize       ``locking`` (default true: OS_LOCKING_OK)
finalize
info                                                         manufacturer, description, version
slots            ``present`` (default true)                  slots
slot_info        slot                                        description, manufacturer, flags
token            slot                                        label, serial, manufacturer, model,
                                                             flags
mechanisms       slot                                        mechanisms
open             slot, ``rw`` (default true)                 session
close            session
close_all        slot
session_info     session                                     slot, state, flags, device_error
login            session, pin (null: protected path),
                 ``user`` (default 1, CKU_USER)
logout           session
find             session, template, ``max`` (default 16)     handles
attribute        session, object, type                       value (hex), length
sign_init        session, mechanism, key, ``pss``
                 [hash, mgf, slen] or ``parameter`` (hex)
sign             session, data (hex), length                 length, signature (hex, on CKR_OK)
sign_update      session, data
sign_final       session, length                             length, signature
verify_init      like sign_init
verify           session, data, signature
decrypt_init     like sign_init
decrypt          session, data, length                       length, plaintext (hex, on CKR_OK)
random           session, length                             data (hex)
sleep            seconds                                     (rv 0, seconds slept)
quit                                                         (rv 0; the child exits)
===============  ==========================================  ====================================

``length`` in sign, sign_final and decrypt is ``null`` for a NULL output buffer (the length
query: the answer's ``length`` is what the module wrote into ``*pulSignatureLen``) or an int,
the size of the buffer offered. A ``template`` may hold ``class``, ``key_type`` (CK_ULONG),
``label`` (UTF-8), ``id`` (hex), ``private`` and ``token`` (CK_BBOOL).

An unknown op or bad arguments get ``{"op", "error"}`` (no rv: no C call was made), never a
traceback, and the child goes on. A C call that hangs simply blocks the child: the commands
behind it wait in the pipe, and the parent's timeout decides. No PIN is ever written anywhere:
not in answers, not in error messages, not on stderr.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any

from ...core.codes import name_of
from ...core.functions import FUNCTION_NAMES

# --------------------------------------------------------------------------------------------
# PKCS#11 2.40 types, as ctypes declares them (Linux: CK_ULONG is unsigned long, no packing)
# --------------------------------------------------------------------------------------------

CK_ULONG = ctypes.c_ulong
CK_RV = CK_ULONG
CK_BBOOL = ctypes.c_ubyte
CK_VOID_P = ctypes.c_void_p
CK_ULONG_P = ctypes.POINTER(CK_ULONG)

CKR_OK = 0x0
CKF_OS_LOCKING_OK = 0x2
CKF_RW_SESSION = 0x2
CKF_SERIAL_SESSION = 0x4
CKU_USER = 1
CKA_CLASS = 0x0
CKA_TOKEN = 0x1
CKA_PRIVATE = 0x2
CKA_LABEL = 0x3
CKA_KEY_TYPE = 0x100
CKA_ID = 0x102
#: CK_UNAVAILABLE_INFORMATION: the ulValueLen a module writes for an attribute it will not give.
CK_UNAVAILABLE_INFORMATION = CK_ULONG(-1).value


class CK_VERSION(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class CK_INFO(ctypes.Structure):
    _fields_ = [("cryptokiVersion", CK_VERSION), ("manufacturerID", ctypes.c_char * 32), ("flags", CK_ULONG),
                ("libraryDescription", ctypes.c_char * 32), ("libraryVersion", CK_VERSION)]


class CK_SLOT_INFO(ctypes.Structure):
    _fields_ = [("slotDescription", ctypes.c_char * 64), ("manufacturerID", ctypes.c_char * 32),
                ("flags", CK_ULONG), ("hardwareVersion", CK_VERSION), ("firmwareVersion", CK_VERSION)]


class CK_TOKEN_INFO(ctypes.Structure):
    _fields_ = [("label", ctypes.c_char * 32), ("manufacturerID", ctypes.c_char * 32),
                ("model", ctypes.c_char * 16), ("serialNumber", ctypes.c_char * 16), ("flags", CK_ULONG),
                ("ulMaxSessionCount", CK_ULONG), ("ulSessionCount", CK_ULONG),
                ("ulMaxRwSessionCount", CK_ULONG), ("ulRwSessionCount", CK_ULONG),
                ("ulMaxPinLen", CK_ULONG), ("ulMinPinLen", CK_ULONG),
                ("ulTotalPublicMemory", CK_ULONG), ("ulFreePublicMemory", CK_ULONG),
                ("ulTotalPrivateMemory", CK_ULONG), ("ulFreePrivateMemory", CK_ULONG),
                ("hardwareVersion", CK_VERSION), ("firmwareVersion", CK_VERSION),
                ("utcTime", ctypes.c_char * 16)]


class CK_SESSION_INFO(ctypes.Structure):
    _fields_ = [("slotID", CK_ULONG), ("state", CK_ULONG), ("flags", CK_ULONG), ("ulDeviceError", CK_ULONG)]


class CK_ATTRIBUTE(ctypes.Structure):
    _fields_ = [("type", CK_ULONG), ("pValue", CK_VOID_P), ("ulValueLen", CK_ULONG)]


class CK_MECHANISM(ctypes.Structure):
    _fields_ = [("mechanism", CK_ULONG), ("pParameter", CK_VOID_P), ("ulParameterLen", CK_ULONG)]


class CK_RSA_PKCS_PSS_PARAMS(ctypes.Structure):
    _fields_ = [("hashAlg", CK_ULONG), ("mgf", CK_ULONG), ("sLen", CK_ULONG)]


class CK_C_INITIALIZE_ARGS(ctypes.Structure):
    _fields_ = [("CreateMutex", CK_VOID_P), ("DestroyMutex", CK_VOID_P), ("LockMutex", CK_VOID_P),
                ("UnlockMutex", CK_VOID_P), ("flags", CK_ULONG), ("pReserved", CK_VOID_P)]




class CK_FUNCTION_LIST(ctypes.Structure):
    _fields_ = [("version", CK_VERSION)] + [(name, CK_VOID_P) for name in FUNCTION_NAMES]


def _proto(*args: Any) -> Any:
    return ctypes.CFUNCTYPE(CK_RV, *args)


_MECH_P = ctypes.POINTER(CK_MECHANISM)
_ATTR_P = ctypes.POINTER(CK_ATTRIBUTE)
_BYTES_P = ctypes.c_char_p  # CK_BYTE_PTR; c_char_p takes a ctypes buffer or None (NULL)

#: Prototypes of the functions this application calls; the others stay bare pointers.
PROTOTYPES: dict[str, Any] = {
    "C_Initialize": _proto(CK_VOID_P),
    "C_Finalize": _proto(CK_VOID_P),
    "C_GetInfo": _proto(ctypes.POINTER(CK_INFO)),
    "C_GetSlotList": _proto(CK_BBOOL, CK_ULONG_P, CK_ULONG_P),
    "C_GetSlotInfo": _proto(CK_ULONG, ctypes.POINTER(CK_SLOT_INFO)),
    "C_GetTokenInfo": _proto(CK_ULONG, ctypes.POINTER(CK_TOKEN_INFO)),
    "C_GetMechanismList": _proto(CK_ULONG, CK_ULONG_P, CK_ULONG_P),
    "C_OpenSession": _proto(CK_ULONG, CK_ULONG, CK_VOID_P, CK_VOID_P, CK_ULONG_P),
    "C_CloseSession": _proto(CK_ULONG),
    "C_CloseAllSessions": _proto(CK_ULONG),
    "C_GetSessionInfo": _proto(CK_ULONG, ctypes.POINTER(CK_SESSION_INFO)),
    "C_Login": _proto(CK_ULONG, CK_ULONG, _BYTES_P, CK_ULONG),
    "C_Logout": _proto(CK_ULONG),
    "C_GetAttributeValue": _proto(CK_ULONG, CK_ULONG, _ATTR_P, CK_ULONG),
    "C_FindObjectsInit": _proto(CK_ULONG, _ATTR_P, CK_ULONG),
    "C_FindObjects": _proto(CK_ULONG, CK_ULONG_P, CK_ULONG, CK_ULONG_P),
    "C_FindObjectsFinal": _proto(CK_ULONG),
    "C_SignInit": _proto(CK_ULONG, _MECH_P, CK_ULONG),
    "C_Sign": _proto(CK_ULONG, _BYTES_P, CK_ULONG, _BYTES_P, CK_ULONG_P),
    "C_SignUpdate": _proto(CK_ULONG, _BYTES_P, CK_ULONG),
    "C_SignFinal": _proto(CK_ULONG, _BYTES_P, CK_ULONG_P),
    "C_VerifyInit": _proto(CK_ULONG, _MECH_P, CK_ULONG),
    "C_Verify": _proto(CK_ULONG, _BYTES_P, CK_ULONG, _BYTES_P, CK_ULONG),
    "C_DecryptInit": _proto(CK_ULONG, _MECH_P, CK_ULONG),
    "C_Decrypt": _proto(CK_ULONG, _BYTES_P, CK_ULONG, _BYTES_P, CK_ULONG_P),
    "C_GenerateRandom": _proto(CK_ULONG, _BYTES_P, CK_ULONG),
}


# --------------------------------------------------------------------------------------------
# The child: one module, one command at a time
# --------------------------------------------------------------------------------------------


class CommandError(Exception):
    """A command this application cannot carry out as written (no C call was made for it).

    Its message names fields and types, never values: a value could be a PIN.
    """


@dataclass
class _Call:
    fn: str
    rv: int
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {"fn": self.fn, "rv": self.rv, "rv_name": name_of(self.rv), "seconds": self.seconds}


class Module:
    """A PKCS#11 module loaded with ctypes, called through its own CK_FUNCTION_LIST.

    The function list, not the exported symbols, because that is what an application is
    supposed to use (and what p11-kit's proxy and RPC layers hand out).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lib = ctypes.CDLL(path)
        get = self._lib.C_GetFunctionList
        get.restype = CK_RV
        get.argtypes = [ctypes.POINTER(ctypes.POINTER(CK_FUNCTION_LIST))]
        pointer = ctypes.POINTER(CK_FUNCTION_LIST)()
        rv = int(get(ctypes.byref(pointer)))
        if rv != CKR_OK or not pointer:
            raise OSError(f"{path}: C_GetFunctionList answered {name_of(rv)}")
        self.functions: CK_FUNCTION_LIST = pointer.contents
        self._bound: dict[str, Callable[..., int]] = {}
        self.calls: list[_Call] = []

    def call(self, fn: str, *args: Any) -> int:
        """Call ``fn`` from the function list, record its rv and duration, return the rv."""
        bound = self._bound.get(fn)
        if bound is None:
            address = getattr(self.functions, fn)
            if not address:
                raise CommandError(f"the module's function list has no {fn}")
            bound = self._bound[fn] = PROTOTYPES[fn](address)
        start = time.perf_counter()
        rv = int(bound(*args))
        self.calls.append(_Call(fn, rv, time.perf_counter() - start))
        return rv


# ---- reading fields: messages name the field and the type wanted, never the value ----------


def _field(cmd: Mapping[str, Any], name: str, default: Any = ...) -> Any:
    if name in cmd:
        return cmd[name]
    if default is ...:
        raise CommandError(f"missing field {name!r}")
    return default


def _ulong(cmd: Mapping[str, Any], name: str, default: Any = ...) -> int:
    value = _field(cmd, name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= CK_UNAVAILABLE_INFORMATION:
        raise CommandError(f"field {name!r} must be an unsigned long")
    return value


def _bool(cmd: Mapping[str, Any], name: str, default: bool) -> bool:
    value = _field(cmd, name, default)
    if not isinstance(value, bool):
        raise CommandError(f"field {name!r} must be true or false")
    return value


def _hex(cmd: Mapping[str, Any], name: str, default: Any = ...) -> bytes:
    value = _field(cmd, name, default)
    if not isinstance(value, str):
        raise CommandError(f"field {name!r} must be a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise CommandError(f"field {name!r} is not valid hex") from None


def _length(cmd: Mapping[str, Any]) -> int | None:
    value = _field(cmd, "length")
    return None if value is None else _ulong(cmd, "length")


def _text(value: bytes) -> str:
    """A blank-padded PKCS#11 char array as text (bytes that are not UTF-8 come out escaped)."""
    return value.decode("utf-8", errors="backslashreplace").rstrip(" \x00")


def _buffer(data: bytes) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(data, max(len(data), 1))


def _template(cmd: Mapping[str, Any]) -> tuple[ctypes.Array[CK_ATTRIBUTE], list[Any]]:
    """A CK_ATTRIBUTE array from a JSON template, and the buffers it points into (keep them alive)."""
    template = _field(cmd, "template", {})
    if not isinstance(template, dict):
        raise CommandError("field 'template' must be an object")
    values: list[tuple[int, Any]] = []
    for key in template:
        if key in ("class", "key_type"):
            values.append((CKA_CLASS if key == "class" else CKA_KEY_TYPE, CK_ULONG(_ulong(template, key))))
        elif key in ("private", "token"):
            flag = _bool(template, key, False)
            values.append((CKA_PRIVATE if key == "private" else CKA_TOKEN, CK_BBOOL(1 if flag else 0)))
        elif key == "label":
            label = template[key]
            if not isinstance(label, str):
                raise CommandError("template 'label' must be a string")
            try:
                encoded = label.encode("utf-8")
            except UnicodeEncodeError:
                raise CommandError("template 'label' is not encodable as UTF-8") from None
            values.append((CKA_LABEL, ctypes.create_string_buffer(encoded, len(encoded))))
        elif key == "id":
            raw = _hex(template, key)
            values.append((CKA_ID, ctypes.create_string_buffer(raw, len(raw))))
        else:
            raise CommandError(f"unknown template key {key!r}")
    array = (CK_ATTRIBUTE * max(len(values), 1))()
    for slot, (kind, value) in zip(array, values):
        slot.type = kind
        slot.pValue = ctypes.addressof(value)
        slot.ulValueLen = ctypes.sizeof(value)
    return array, [value for _, value in values]


def _mechanism(cmd: Mapping[str, Any]) -> tuple[CK_MECHANISM, Any]:
    """A CK_MECHANISM, with its parameter from ``pss`` or ``parameter`` (kept alive by the caller)."""
    mech = CK_MECHANISM(_ulong(cmd, "mechanism"), None, 0)
    param: Any = None
    if cmd.get("pss") is not None:
        pss = cmd["pss"]
        if not isinstance(pss, list) or len(pss) != 3:
            raise CommandError("field 'pss' must be [hash, mgf, slen]")
        fields = dict(zip(("hash", "mgf", "slen"), pss))
        param = CK_RSA_PKCS_PSS_PARAMS(_ulong(fields, "hash"), _ulong(fields, "mgf"), _ulong(fields, "slen"))
        size = ctypes.sizeof(param)
    elif cmd.get("parameter") is not None:
        raw = _hex(cmd, "parameter")
        param, size = ctypes.create_string_buffer(raw, max(len(raw), 1)), len(raw)
    if param is not None:
        mech.pParameter = ctypes.addressof(param)
        mech.ulParameterLen = size
    return mech, param


class Application:
    """The ops of the protocol, each a short run of C calls on one :class:`Module`.

    Each handler returns ``(rv, fields)``: the rv of the call that decided the outcome (the
    first that failed, else the last) and the op's own answer fields.
    """

    def __init__(self, module: Module) -> None:
        self.m = module

    # -- general purpose ---------------------------------------------------------------------

    def op_initialize(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        if not _bool(cmd, "locking", True):
            return self.m.call("C_Initialize", None), {}
        args = CK_C_INITIALIZE_ARGS(None, None, None, None, CKF_OS_LOCKING_OK, None)
        return self.m.call("C_Initialize", ctypes.byref(args)), {}

    def op_finalize(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        return self.m.call("C_Finalize", None), {}

    def op_info(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        info = CK_INFO()
        rv = self.m.call("C_GetInfo", ctypes.byref(info))
        if rv != CKR_OK:
            return rv, {}
        v = info.cryptokiVersion
        return rv, {"manufacturer": _text(info.manufacturerID), "description": _text(info.libraryDescription),
                    "version": f"{v.major}.{v.minor}"}

    # -- slots and tokens --------------------------------------------------------------------

    def op_slots(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        present = CK_BBOOL(1 if _bool(cmd, "present", True) else 0)
        count = CK_ULONG(0)
        rv = self.m.call("C_GetSlotList", present, None, ctypes.byref(count))
        if rv != CKR_OK:
            return rv, {}
        ids = (CK_ULONG * max(count.value, 1))()
        rv = self.m.call("C_GetSlotList", present, ids, ctypes.byref(count))
        return rv, ({"slots": list(ids[: count.value])} if rv == CKR_OK else {"length": count.value})

    def op_slot_info(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        info = CK_SLOT_INFO()
        rv = self.m.call("C_GetSlotInfo", _ulong(cmd, "slot"), ctypes.byref(info))
        if rv != CKR_OK:
            return rv, {}
        return rv, {"description": _text(info.slotDescription), "manufacturer": _text(info.manufacturerID),
                    "flags": info.flags}

    def op_token(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        info = CK_TOKEN_INFO()
        rv = self.m.call("C_GetTokenInfo", _ulong(cmd, "slot"), ctypes.byref(info))
        if rv != CKR_OK:
            return rv, {}
        return rv, {"label": _text(info.label), "serial": _text(info.serialNumber),
                    "manufacturer": _text(info.manufacturerID), "model": _text(info.model), "flags": info.flags}

    def op_mechanisms(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        slot = _ulong(cmd, "slot")
        count = CK_ULONG(0)
        rv = self.m.call("C_GetMechanismList", slot, None, ctypes.byref(count))
        if rv != CKR_OK:
            return rv, {}
        mechs = (CK_ULONG * max(count.value, 1))()
        rv = self.m.call("C_GetMechanismList", slot, mechs, ctypes.byref(count))
        return rv, ({"mechanisms": list(mechs[: count.value])} if rv == CKR_OK else {"length": count.value})

    # -- sessions ----------------------------------------------------------------------------

    def op_open(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        flags = CKF_SERIAL_SESSION | (CKF_RW_SESSION if _bool(cmd, "rw", True) else 0)
        handle = CK_ULONG(0)
        rv = self.m.call("C_OpenSession", _ulong(cmd, "slot"), flags, None, None, ctypes.byref(handle))
        return rv, ({"session": handle.value} if rv == CKR_OK else {})

    def op_close(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        return self.m.call("C_CloseSession", _ulong(cmd, "session")), {}

    def op_close_all(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        return self.m.call("C_CloseAllSessions", _ulong(cmd, "slot")), {}

    def op_session_info(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        info = CK_SESSION_INFO()
        rv = self.m.call("C_GetSessionInfo", _ulong(cmd, "session"), ctypes.byref(info))
        if rv != CKR_OK:
            return rv, {}
        return rv, {"slot": info.slotID, "state": info.state, "flags": info.flags,
                    "device_error": info.ulDeviceError}

    def op_login(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        session, user = _ulong(cmd, "session"), _ulong(cmd, "user", CKU_USER)
        pin = _field(cmd, "pin")
        if pin is None:  # CKF_PROTECTED_AUTHENTICATION_PATH: the token asks for the PIN itself
            return self.m.call("C_Login", session, user, None, 0), {}
        if not isinstance(pin, str):
            raise CommandError("field 'pin' must be a string or null")
        try:
            encoded = pin.encode("utf-8")
        except UnicodeEncodeError:  # its message would quote the offending character
            raise CommandError("field 'pin' is not encodable as UTF-8") from None
        return self.m.call("C_Login", session, user, _buffer(encoded), len(encoded)), {}

    def op_logout(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        return self.m.call("C_Logout", _ulong(cmd, "session")), {}

    # -- objects -----------------------------------------------------------------------------

    def op_find(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """Exactly three calls: FindObjectsInit, one FindObjects for up to ``max`` handles, FindObjectsFinal.

        One FindObjects, not a loop, so that a test knows how many calls a find costs (a module
        may return fewer handles than it has; ask for more with a larger ``max``). Final is
        called even when FindObjects failed, as a careful application would.
        """
        session, most = _ulong(cmd, "session"), _ulong(cmd, "max", 16)
        if not 1 <= most <= 65536:
            raise CommandError("field 'max' must be between 1 and 65536")
        array, keep = _template(cmd)
        count = len(keep)
        rv = self.m.call("C_FindObjectsInit", session, array if count else None, count)
        if rv != CKR_OK:
            return rv, {}
        batch, got = (CK_ULONG * most)(), CK_ULONG(0)
        found = self.m.call("C_FindObjects", session, batch, most, ctypes.byref(got))
        handles = list(batch[: min(got.value, most)]) if found == CKR_OK else []
        final = self.m.call("C_FindObjectsFinal", session)
        return (found if found != CKR_OK else final), {"handles": handles}

    def op_attribute(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """C_GetAttributeValue twice: with a NULL pValue for the length, then for the value."""
        session, obj = _ulong(cmd, "session"), _ulong(cmd, "object")
        attr = CK_ATTRIBUTE(_ulong(cmd, "type"), None, 0)
        rv = self.m.call("C_GetAttributeValue", session, obj, ctypes.byref(attr), 1)
        if rv != CKR_OK:
            return rv, {"length": attr.ulValueLen}
        if attr.ulValueLen == CK_UNAVAILABLE_INFORMATION:
            return rv, {"length": attr.ulValueLen, "value": None}
        value = ctypes.create_string_buffer(max(attr.ulValueLen, 1))
        attr.pValue = ctypes.cast(value, CK_VOID_P).value
        rv = self.m.call("C_GetAttributeValue", session, obj, ctypes.byref(attr), 1)
        if rv != CKR_OK:
            return rv, {"length": attr.ulValueLen}
        return rv, {"length": attr.ulValueLen, "value": value.raw[: attr.ulValueLen].hex()}

    # -- crypto ------------------------------------------------------------------------------

    def _init(self, fn: str, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        mech, param = _mechanism(cmd)
        rv = self.m.call(fn, _ulong(cmd, "session"), ctypes.byref(mech), _ulong(cmd, "key"))
        del param  # alive until the call returned: the module copies the parameter at init
        return rv, {}

    def _output(self, fn: str, cmd: Mapping[str, Any], name: str, *inputs: Any) -> tuple[int, dict[str, Any]]:
        """One call with the PKCS#11 output convention: NULL buffer (length query) or a buffer."""
        size = _length(cmd)
        out = None if size is None else ctypes.create_string_buffer(max(size, 1))
        length = CK_ULONG(size or 0)
        rv = self.m.call(fn, _ulong(cmd, "session"), *inputs, out, ctypes.byref(length))
        fields: dict[str, Any] = {"length": length.value}
        if rv == CKR_OK and out is not None:
            fields[name] = out.raw[: min(length.value, len(out.raw))].hex()
        return rv, fields

    def op_sign_init(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        return self._init("C_SignInit", cmd)

    def op_sign(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        data = _hex(cmd, "data")
        return self._output("C_Sign", cmd, "signature", _buffer(data), len(data))

    def op_sign_update(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        data = _hex(cmd, "data")
        return self.m.call("C_SignUpdate", _ulong(cmd, "session"), _buffer(data), len(data)), {}

    def op_sign_final(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        return self._output("C_SignFinal", cmd, "signature")

    def op_verify_init(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        return self._init("C_VerifyInit", cmd)

    def op_verify(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        data, signature = _hex(cmd, "data"), _hex(cmd, "signature")
        return self.m.call("C_Verify", _ulong(cmd, "session"), _buffer(data), len(data), _buffer(signature),
                           len(signature)), {}

    def op_decrypt_init(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        return self._init("C_DecryptInit", cmd)

    def op_decrypt(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        data = _hex(cmd, "data")
        return self._output("C_Decrypt", cmd, "plaintext", _buffer(data), len(data))

    def op_random(self, cmd: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        size = _ulong(cmd, "length")
        out = ctypes.create_string_buffer(max(size, 1))
        rv = self.m.call("C_GenerateRandom", _ulong(cmd, "session"), out, size)
        return rv, ({"data": out.raw[:size].hex()} if rv == CKR_OK else {})

    # -- dispatch ----------------------------------------------------------------------------

    def handle(self, cmd: Any) -> dict[str, Any]:
        """One command to one answer; never raises (an answer carries the error instead)."""
        if not isinstance(cmd, dict):
            return {"error": "a command must be a JSON object"}
        answer: dict[str, Any] = {"op": cmd.get("op")}
        if "seq" in cmd:
            answer["seq"] = cmd["seq"]
        op = cmd.get("op")
        try:
            if op == "sleep":
                seconds = _field(cmd, "seconds")
                if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds < 1e6:
                    raise CommandError("field 'seconds' must be a non-negative number")
                start = time.perf_counter()
                time.sleep(seconds)
                answer.update(rv=CKR_OK, rv_name=name_of(CKR_OK), seconds=time.perf_counter() - start)
                return answer
            if op == "quit":
                answer.update(rv=CKR_OK, rv_name=name_of(CKR_OK), seconds=0.0)
                return answer
            handler = getattr(self, f"op_{op}", None) if isinstance(op, str) and op.isidentifier() else None
            if handler is None:
                raise CommandError(f"unknown op {op!r}" if isinstance(op, str) else "field 'op' must be a string")
            self.m.calls = []
            rv, fields = handler(cmd)
        except CommandError as e:
            answer["error"] = str(e)
            return answer
        except Exception as e:  # a bug here must not end the session a test is driving
            answer["error"] = f"{op}: {type(e).__name__}: {e}"
            return answer
        calls = self.m.calls
        answer.update(rv=rv, rv_name=name_of(rv), seconds=sum(c.seconds for c in calls),
                      calls=[c.as_json() for c in calls])
        answer.update(fields)
        return answer


def serve(module: Module, stdin: IO[bytes], stdout: IO[bytes]) -> int:
    """The child's loop: a command per line in, an answer per line out, until quit or EOF."""
    app = Application(module)
    for number, line in enumerate(iter(stdin.readline, b""), 1):
        if not line.strip():
            continue
        cmd: Any = None
        try:
            cmd = json.loads(line)
        except ValueError:  # not quoted back: the line may hold a PIN
            answer: dict[str, Any] = {"error": f"line {number} is not JSON"}
        else:
            answer = app.handle(cmd)
        stdout.write(json.dumps(answer).encode() + b"\n")
        stdout.flush()
        if isinstance(cmd, dict) and cmd.get("op") == "quit" and "error" not in answer:
            return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hsmfsm.testing.lab.stepper", description=__doc__.split("\n")[0]
                                     if __doc__ else None)
    parser.add_argument("--module", required=True, help="path of the PKCS#11 module to load")
    args = parser.parse_args(argv)
    # The protocol gets a private copy of fd 1, and fd 1 itself now goes to stderr: whatever a
    # module prints to stdout (some log there) cannot corrupt the answers.
    protocol = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        module = Module(args.module)
    except OSError as e:  # reported on stderr: the parent's answer() quotes it on EOF
        print(f"stepper: cannot load {args.module}: {e}", file=sys.stderr, flush=True)
        os._exit(2)
    try:
        code = serve(module, sys.stdin.buffer, protocol)
    except BrokenPipeError:  # the parent went away; nobody is left to answer
        code = 1
    sys.stderr.flush()
    # No interpreter teardown and no ELF destructors: a module's destructor may talk to a hung
    # HSM (p11-kit-client's does), and "quit" must end the process even then.
    os._exit(code)


# --------------------------------------------------------------------------------------------
# The parent: a test's handle on one child
# --------------------------------------------------------------------------------------------


class StepperError(RuntimeError):
    """The stepper process cannot answer: it exited, or the protocol went out of step."""


class StepperTimeout(TimeoutError):
    """No answer to ``op`` within ``timeout`` seconds. The call is still running in the child:
    its answer will come to the next :meth:`Stepper.answer`."""

    def __init__(self, op: str, timeout: float) -> None:
        super().__init__(f"stepper: no answer to {op!r} within {timeout:g}s")
        self.op = op
        self.timeout = timeout


_EOF = object()


@dataclass
class _Pending:
    seq: int
    op: str
    sent: float = field(default_factory=time.monotonic)


class Stepper:
    """One PKCS#11 application process (``python -m hsmfsm.testing.lab.stepper``) driven by a test.

    ``do`` is a call and its answer; ``send`` and ``answer`` split the two so that a test can
    start a call, break an HSM, then collect. Answers come in order: after a
    :class:`StepperTimeout` the late answer is still owed, and :meth:`do` refuses to run while
    any answer is owed (it would otherwise read the wrong one). Not thread-safe: one test
    thread drives one stepper.

    The child runs in a session (process group) of its own; :meth:`close` and :meth:`kill`
    signal that group by its id, never anything by name.
    """

    def __init__(self, module: str, env: Mapping[str, str] | None = None) -> None:
        self.module = module
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "hsmfsm.testing.lab.stepper", "--module", module],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )
        self._answers: queue.Queue[Any] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=500)
        self._pending: collections.deque[_Pending] = collections.deque()
        self._seq = 0
        self._dead = False
        self._reader = threading.Thread(target=self._read_answers, name=f"stepper-{self.pid}-out", daemon=True)
        self._drainer = threading.Thread(target=self._drain_stderr, name=f"stepper-{self.pid}-err", daemon=True)
        self._reader.start()
        self._drainer.start()

    @property
    def pid(self) -> int:
        """The child's PID, which is also its process group id."""
        return self._proc.pid

    @property
    def stderr(self) -> str:
        """What the child (and the module in it) wrote to stderr so far (the last 500 lines)."""
        return "".join(self._stderr)

    @property
    def pending(self) -> list[str]:
        """Ops sent whose answers have not been collected, oldest first."""
        return [p.op for p in self._pending]

    def _read_answers(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self._answers.put(json.loads(line))
            except ValueError:
                self._stderr.append(f"[stepper: not an answer] {line.decode(errors='replace')}")
        self._answers.put(_EOF)

    def _drain_stderr(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            self._stderr.append(line.decode(errors="replace"))

    def send(self, op: str, **fields: Any) -> int:
        """Send one command without waiting; returns its sequence number."""
        if self._dead or self._proc.poll() is not None:
            raise StepperError(f"stepper {self.pid} has exited; cannot send {op!r}{self._tail()}")
        self._seq += 1
        line = json.dumps({**fields, "op": op, "seq": self._seq}).encode() + b"\n"
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(line)
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise StepperError(f"stepper {self.pid} closed its stdin; cannot send {op!r}{self._tail()}") from None
        self._pending.append(_Pending(self._seq, op))
        return self._seq

    def answer(self, timeout: float = 30.0) -> dict[str, Any]:
        """The answer to the oldest command sent and not yet answered, waiting up to ``timeout``."""
        if not self._pending:
            raise StepperError("no command is waiting for an answer")
        head = self._pending[0]
        try:
            item = self._answers.get(timeout=timeout)
        except queue.Empty:
            raise StepperTimeout(head.op, timeout) from None
        if item is _EOF:
            self._answers.put(_EOF)  # every later caller must see it too
            self._dead = True
            try:
                code: int | None = self._proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                code = None
            raise StepperError(f"stepper {self.pid} exited ({code}) before answering {head.op!r}{self._tail()}")
        self._pending.popleft()
        if not isinstance(item, dict) or item.get("seq") != head.seq:
            raise StepperError(f"stepper answered out of step: wanted seq {head.seq} ({head.op!r}), got {item!r}")
        return item

    def do(self, op: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        """Send one command and wait up to ``timeout`` seconds for its answer."""
        if self._pending:
            raise StepperError(f"answers still owed for {self.pending}; collect them with answer() first")
        self.send(op, **fields)
        return self.answer(timeout)

    def _tail(self) -> str:
        tail = "".join(list(self._stderr)[-20:]).strip()
        return f"; stderr: {tail}" if tail else ""

    def kill(self) -> None:
        """The application dies at once (SIGKILL to its process group), mid-call or not."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._proc.wait()
        self._dead = True

    def close(self, timeout: float = 5.0) -> None:
        """Ask the child to quit; if it has not exited after ``timeout`` seconds (a call hung in
        the module does not read "quit"), kill its process group."""
        if self._proc.poll() is None and not self._dead:
            try:
                self.send("quit")
            except StepperError:
                pass
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._dead = True
        if self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        self._reader.join(timeout=1.0)
        self._drainer.join(timeout=1.0)

    def __enter__(self) -> Stepper:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
