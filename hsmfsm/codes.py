"""PKCS#11 return codes: every error python-pkcs11 can raise, named and numbered.

python-pkcs11 raises exceptions that carry no CKR number (``args == ()``), turns
a few codes into a bare ``PKCS11Error`` with a fixed message, and vendor codes
into ``PKCS11Error("Unmapped error code 0x...")`` (FACTS). Recovery is driven by
codes, so this module turns any such exception back into a :class:`Code`.

Pure data and string parsing: no I/O. Which *class* a code belongs to (and so
which event it fires) is policy, not code: see ``policies/default.yaml``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pkcs11.exceptions as _exc

#: Every CKR code of PKCS#11 2.40 (from the p11-kit ``pkcs11.h``), by name.
CKR: dict[str, int] = {
    "CKR_OK": 0x0,
    "CKR_CANCEL": 0x1,
    "CKR_HOST_MEMORY": 0x2,
    "CKR_SLOT_ID_INVALID": 0x3,
    "CKR_GENERAL_ERROR": 0x5,
    "CKR_FUNCTION_FAILED": 0x6,
    "CKR_ARGUMENTS_BAD": 0x7,
    "CKR_NO_EVENT": 0x8,
    "CKR_NEED_TO_CREATE_THREADS": 0x9,
    "CKR_CANT_LOCK": 0xA,
    "CKR_ATTRIBUTE_READ_ONLY": 0x10,
    "CKR_ATTRIBUTE_SENSITIVE": 0x11,
    "CKR_ATTRIBUTE_TYPE_INVALID": 0x12,
    "CKR_ATTRIBUTE_VALUE_INVALID": 0x13,
    "CKR_ACTION_PROHIBITED": 0x1B,
    "CKR_DATA_INVALID": 0x20,
    "CKR_DATA_LEN_RANGE": 0x21,
    "CKR_DEVICE_ERROR": 0x30,
    "CKR_DEVICE_MEMORY": 0x31,
    "CKR_DEVICE_REMOVED": 0x32,
    "CKR_ENCRYPTED_DATA_INVALID": 0x40,
    "CKR_ENCRYPTED_DATA_LEN_RANGE": 0x41,
    "CKR_FUNCTION_CANCELED": 0x50,
    "CKR_FUNCTION_NOT_PARALLEL": 0x51,
    "CKR_FUNCTION_NOT_SUPPORTED": 0x54,
    "CKR_KEY_HANDLE_INVALID": 0x60,
    "CKR_KEY_SIZE_RANGE": 0x62,
    "CKR_KEY_TYPE_INCONSISTENT": 0x63,
    "CKR_KEY_NOT_NEEDED": 0x64,
    "CKR_KEY_CHANGED": 0x65,
    "CKR_KEY_NEEDED": 0x66,
    "CKR_KEY_INDIGESTIBLE": 0x67,
    "CKR_KEY_FUNCTION_NOT_PERMITTED": 0x68,
    "CKR_KEY_NOT_WRAPPABLE": 0x69,
    "CKR_KEY_UNEXTRACTABLE": 0x6A,
    "CKR_MECHANISM_INVALID": 0x70,
    "CKR_MECHANISM_PARAM_INVALID": 0x71,
    "CKR_OBJECT_HANDLE_INVALID": 0x82,
    "CKR_OPERATION_ACTIVE": 0x90,
    "CKR_OPERATION_NOT_INITIALIZED": 0x91,
    "CKR_PIN_INCORRECT": 0xA0,
    "CKR_PIN_INVALID": 0xA1,
    "CKR_PIN_LEN_RANGE": 0xA2,
    "CKR_PIN_EXPIRED": 0xA3,
    "CKR_PIN_LOCKED": 0xA4,
    "CKR_SESSION_CLOSED": 0xB0,
    "CKR_SESSION_COUNT": 0xB1,
    "CKR_SESSION_HANDLE_INVALID": 0xB3,
    "CKR_SESSION_PARALLEL_NOT_SUPPORTED": 0xB4,
    "CKR_SESSION_READ_ONLY": 0xB5,
    "CKR_SESSION_EXISTS": 0xB6,
    "CKR_SESSION_READ_ONLY_EXISTS": 0xB7,
    "CKR_SESSION_READ_WRITE_SO_EXISTS": 0xB8,
    "CKR_SIGNATURE_INVALID": 0xC0,
    "CKR_SIGNATURE_LEN_RANGE": 0xC1,
    "CKR_TEMPLATE_INCOMPLETE": 0xD0,
    "CKR_TEMPLATE_INCONSISTENT": 0xD1,
    "CKR_TOKEN_NOT_PRESENT": 0xE0,
    "CKR_TOKEN_NOT_RECOGNIZED": 0xE1,
    "CKR_TOKEN_WRITE_PROTECTED": 0xE2,
    "CKR_UNWRAPPING_KEY_HANDLE_INVALID": 0xF0,
    "CKR_UNWRAPPING_KEY_SIZE_RANGE": 0xF1,
    "CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT": 0xF2,
    "CKR_USER_ALREADY_LOGGED_IN": 0x100,
    "CKR_USER_NOT_LOGGED_IN": 0x101,
    "CKR_USER_PIN_NOT_INITIALIZED": 0x102,
    "CKR_USER_TYPE_INVALID": 0x103,
    "CKR_USER_ANOTHER_ALREADY_LOGGED_IN": 0x104,
    "CKR_USER_TOO_MANY_TYPES": 0x105,
    "CKR_WRAPPED_KEY_INVALID": 0x110,
    "CKR_WRAPPED_KEY_LEN_RANGE": 0x112,
    "CKR_WRAPPING_KEY_HANDLE_INVALID": 0x113,
    "CKR_WRAPPING_KEY_SIZE_RANGE": 0x114,
    "CKR_WRAPPING_KEY_TYPE_INCONSISTENT": 0x115,
    "CKR_RANDOM_SEED_NOT_SUPPORTED": 0x120,
    "CKR_RANDOM_NO_RNG": 0x121,
    "CKR_DOMAIN_PARAMS_INVALID": 0x130,
    "CKR_CURVE_NOT_SUPPORTED": 0x140,
    "CKR_BUFFER_TOO_SMALL": 0x150,
    "CKR_SAVED_STATE_INVALID": 0x160,
    "CKR_INFORMATION_SENSITIVE": 0x170,
    "CKR_STATE_UNSAVEABLE": 0x180,
    "CKR_CRYPTOKI_NOT_INITIALIZED": 0x190,
    "CKR_CRYPTOKI_ALREADY_INITIALIZED": 0x191,
    "CKR_MUTEX_BAD": 0x1A0,
    "CKR_MUTEX_NOT_LOCKED": 0x1A1,
    "CKR_NEW_PIN_MODE": 0x1B0,
    "CKR_NEXT_OTP": 0x1B1,
    "CKR_EXCEEDED_MAX_ITERATIONS": 0x1C0,
    "CKR_FIPS_SELF_TEST_FAILED": 0x1C1,
    "CKR_LIBRARY_LOAD_FAILED": 0x1C2,
    "CKR_PIN_TOO_WEAK": 0x1C3,
    "CKR_PUBLIC_KEY_INVALID": 0x1C4,
    "CKR_FUNCTION_REJECTED": 0x200,
    "CKR_VENDOR_DEFINED": 0x80000000,
}

CKR_VENDOR_DEFINED = 0x80000000
_NAME_OF: dict[int, str] = {v: k for k, v in CKR.items()}

#: Errors that python-pkcs11 raises from Python, with no CKR behind them.
#: They get names of their own so that a policy can classify them too.
PSEUDO: dict[str, type[Exception]] = {
    "HSMFSM_NO_SUCH_TOKEN": _exc.NoSuchToken,
    "HSMFSM_NO_SUCH_KEY": _exc.NoSuchKey,
    "HSMFSM_MULTIPLE_TOKENS": _exc.MultipleTokensReturned,
    "HSMFSM_MULTIPLE_OBJECTS": _exc.MultipleObjectsReturned,
}

# python-pkcs11's map_rv_to_error (pkcs11/_pkcs11.pxd), inverted: exception
# class -> CKR name. tests/test_codes.py checks it against the installed copy.
_CLASS_TO_NAME: dict[type[Exception], str] = {
    _exc.AttributeTypeInvalid: "CKR_ATTRIBUTE_TYPE_INVALID",
    _exc.AttributeValueInvalid: "CKR_ATTRIBUTE_VALUE_INVALID",
    _exc.AttributeReadOnly: "CKR_ATTRIBUTE_READ_ONLY",
    _exc.AttributeSensitive: "CKR_ATTRIBUTE_SENSITIVE",
    _exc.ArgumentsBad: "CKR_ARGUMENTS_BAD",
    _exc.DataInvalid: "CKR_DATA_INVALID",
    _exc.DataLenRange: "CKR_DATA_LEN_RANGE",
    _exc.DomainParamsInvalid: "CKR_DOMAIN_PARAMS_INVALID",
    _exc.DeviceError: "CKR_DEVICE_ERROR",
    _exc.DeviceMemory: "CKR_DEVICE_MEMORY",
    _exc.DeviceRemoved: "CKR_DEVICE_REMOVED",
    _exc.EncryptedDataInvalid: "CKR_ENCRYPTED_DATA_INVALID",
    _exc.EncryptedDataLenRange: "CKR_ENCRYPTED_DATA_LEN_RANGE",
    _exc.ExceededMaxIterations: "CKR_EXCEEDED_MAX_ITERATIONS",
    _exc.FunctionCancelled: "CKR_FUNCTION_CANCELED",
    _exc.FunctionFailed: "CKR_FUNCTION_FAILED",
    _exc.FunctionRejected: "CKR_FUNCTION_REJECTED",
    _exc.FunctionNotSupported: "CKR_FUNCTION_NOT_SUPPORTED",
    _exc.KeyHandleInvalid: "CKR_KEY_HANDLE_INVALID",
    _exc.KeyIndigestible: "CKR_KEY_INDIGESTIBLE",
    _exc.KeyNeeded: "CKR_KEY_NEEDED",
    _exc.KeyNotNeeded: "CKR_KEY_NOT_NEEDED",
    _exc.KeySizeRange: "CKR_KEY_SIZE_RANGE",
    _exc.KeyNotWrappable: "CKR_KEY_NOT_WRAPPABLE",
    _exc.KeyTypeInconsistent: "CKR_KEY_TYPE_INCONSISTENT",
    _exc.KeyUnextractable: "CKR_KEY_UNEXTRACTABLE",
    _exc.GeneralError: "CKR_GENERAL_ERROR",
    _exc.HostMemory: "CKR_HOST_MEMORY",
    _exc.MechanismInvalid: "CKR_MECHANISM_INVALID",
    _exc.MechanismParamInvalid: "CKR_MECHANISM_PARAM_INVALID",
    _exc.NoEvent: "CKR_NO_EVENT",
    _exc.ObjectHandleInvalid: "CKR_OBJECT_HANDLE_INVALID",
    _exc.OperationActive: "CKR_OPERATION_ACTIVE",
    _exc.OperationNotInitialized: "CKR_OPERATION_NOT_INITIALIZED",
    _exc.PinExpired: "CKR_PIN_EXPIRED",
    _exc.PinIncorrect: "CKR_PIN_INCORRECT",
    _exc.PinInvalid: "CKR_PIN_INVALID",
    _exc.PinLenRange: "CKR_PIN_LEN_RANGE",
    _exc.PinLocked: "CKR_PIN_LOCKED",
    _exc.PinTooWeak: "CKR_PIN_TOO_WEAK",
    _exc.PublicKeyInvalid: "CKR_PUBLIC_KEY_INVALID",
    _exc.RandomNoRNG: "CKR_RANDOM_NO_RNG",
    _exc.RandomSeedNotSupported: "CKR_RANDOM_SEED_NOT_SUPPORTED",
    _exc.SessionClosed: "CKR_SESSION_CLOSED",
    _exc.SessionCount: "CKR_SESSION_COUNT",
    _exc.SessionExists: "CKR_SESSION_EXISTS",
    _exc.SessionHandleInvalid: "CKR_SESSION_HANDLE_INVALID",
    _exc.SessionReadOnly: "CKR_SESSION_READ_ONLY",
    _exc.SessionReadOnlyExists: "CKR_SESSION_READ_ONLY_EXISTS",
    _exc.SessionReadWriteSOExists: "CKR_SESSION_READ_WRITE_SO_EXISTS",
    _exc.SignatureLenRange: "CKR_SIGNATURE_LEN_RANGE",
    _exc.SignatureInvalid: "CKR_SIGNATURE_INVALID",
    _exc.TemplateIncomplete: "CKR_TEMPLATE_INCOMPLETE",
    _exc.TemplateInconsistent: "CKR_TEMPLATE_INCONSISTENT",
    _exc.SlotIDInvalid: "CKR_SLOT_ID_INVALID",
    _exc.TokenNotPresent: "CKR_TOKEN_NOT_PRESENT",
    _exc.TokenNotRecognised: "CKR_TOKEN_NOT_RECOGNIZED",
    _exc.TokenWriteProtected: "CKR_TOKEN_WRITE_PROTECTED",
    _exc.UnwrappingKeyHandleInvalid: "CKR_UNWRAPPING_KEY_HANDLE_INVALID",
    _exc.UnwrappingKeySizeRange: "CKR_UNWRAPPING_KEY_SIZE_RANGE",
    _exc.UnwrappingKeyTypeInconsistent: "CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT",
    _exc.UserNotLoggedIn: "CKR_USER_NOT_LOGGED_IN",
    _exc.UserAlreadyLoggedIn: "CKR_USER_ALREADY_LOGGED_IN",
    _exc.AnotherUserAlreadyLoggedIn: "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
    _exc.UserPinNotInitialized: "CKR_USER_PIN_NOT_INITIALIZED",
    _exc.UserTooManyTypes: "CKR_USER_TOO_MANY_TYPES",
    _exc.WrappedKeyInvalid: "CKR_WRAPPED_KEY_INVALID",
    _exc.WrappedKeyLenRange: "CKR_WRAPPED_KEY_LEN_RANGE",
    _exc.WrappingKeyHandleInvalid: "CKR_WRAPPING_KEY_HANDLE_INVALID",
    _exc.WrappingKeySizeRange: "CKR_WRAPPING_KEY_SIZE_RANGE",
    _exc.WrappingKeyTypeInconsistent: "CKR_WRAPPING_KEY_TYPE_INCONSISTENT",
}

# The codes python-pkcs11 reports as a bare PKCS11Error with a fixed message.
_BARE_MESSAGE_TO_NAME: dict[str, str] = {
    "Buffer was too small. Should never see this.": "CKR_BUFFER_TOO_SMALL",
    "Initialisation error (already initialized). Should never see this.": "CKR_CRYPTOKI_ALREADY_INITIALIZED",
    "Initialisation error (not initialized). Should never see this.": "CKR_CRYPTOKI_NOT_INITIALIZED",
    "Parallel not supported. Should never see this.": "CKR_SESSION_PARALLEL_NOT_SUPPORTED",
    "User type invalid. Should never see this.": "CKR_USER_TYPE_INVALID",
}

_UNMAPPED = re.compile(r"Unmapped error code (0x[0-9a-fA-F]+|\d+)")


@dataclass(frozen=True, slots=True)
class Code:
    """A return code: its CKR name and numeric value (``None`` for HSMFSM_* pseudo codes)."""

    name: str
    value: int | None

    def __str__(self) -> str:
        return self.name if self.value is None else f"{self.name} (0x{self.value:08X})"


CKR_OK = Code("CKR_OK", 0)
#: An exception that did not come from python-pkcs11 at all.
UNKNOWN_ERROR = "HSMFSM_UNKNOWN_ERROR"
#: A call that overran the policy's call timeout; the watchdog cut it off.
CALL_TIMEOUT = Code("HSMFSM_CALL_TIMEOUT", None)


def name_of(value: int) -> str:
    """The CKR name of a numeric code; vendor codes read ``CKR_VENDOR_DEFINED+0x...``."""
    if value in _NAME_OF:
        return _NAME_OF[value]
    if value >= CKR_VENDOR_DEFINED:
        return f"CKR_VENDOR_DEFINED+0x{value - CKR_VENDOR_DEFINED:X}"
    return f"CKR_0x{value:08X}"


def code_from_value(value: int) -> Code:
    return Code(name_of(value), value)


def code_from_name(name: str) -> Code:
    """Parse a code as a policy writes it: a CKR name, an HSMFSM_* name, a number, or ``CKR_VENDOR_DEFINED+N``.

    Raises ``KeyError`` with the offending text when it is none of those.
    """
    text = name.strip()
    if text in CKR:
        return Code(text, CKR[text])
    if text in PSEUDO or text in (CALL_TIMEOUT.name, UNKNOWN_ERROR):
        return Code(text, None)
    m = re.fullmatch(r"CKR_VENDOR_DEFINED\s*\+\s*(0x[0-9a-fA-F]+|[0-9]+)", text)
    if m:
        return code_from_value(CKR_VENDOR_DEFINED + int(m.group(1), 0 if m.group(1).startswith("0x") else 10))
    m = re.fullmatch(r"(?:CKR_)?0x([0-9a-fA-F]+)", text)  # also the names name_of() gives unlisted codes
    if m:
        return code_from_value(int(m.group(1), 16))
    if re.fullmatch(r"[0-9]+", text):
        return code_from_value(int(text, 10))
    raise KeyError(text)


_PSEUDO_BY_CLASS = {cls: name for name, cls in PSEUDO.items()}


def code_of(error: BaseException) -> Code:
    """The return code behind an exception raised by python-pkcs11.

    Unknown exceptions (not from python-pkcs11) are ``CKR_GENERAL_ERROR``-like
    unknowns: they get the name ``HSMFSM_UNKNOWN_ERROR`` so a policy can still
    classify them (as ``unknown`` by default).
    """
    cls = type(error)
    name = _CLASS_TO_NAME.get(cls)
    if name is not None:
        return Code(name, CKR[name])
    pseudo = _PSEUDO_BY_CLASS.get(cls)
    if pseudo is not None:
        return Code(pseudo, None)
    if isinstance(error, _exc.PKCS11Error):
        text = str(error.args[0]) if error.args else ""
        if text in _BARE_MESSAGE_TO_NAME:
            name = _BARE_MESSAGE_TO_NAME[text]
            return Code(name, CKR[name])
        m = _UNMAPPED.search(text)
        if m:
            return code_from_value(int(m.group(1), 0))
        if "not initialized" in text:  # lib.initialize() wording, FACTS
            return Code("CKR_CRYPTOKI_NOT_INITIALIZED", CKR["CKR_CRYPTOKI_NOT_INITIALIZED"])
        for base, bname in _CLASS_TO_NAME.items():  # a subclass of a mapped class
            if isinstance(error, base):
                return Code(bname, CKR[bname])
    return Code(UNKNOWN_ERROR, None)


#: Every name a policy may classify.
ALL_NAMES: frozenset[str] = frozenset(CKR) | frozenset(PSEUDO) | {CALL_TIMEOUT.name, UNKNOWN_ERROR}
