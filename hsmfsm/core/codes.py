"""PKCS#11 return codes: every error python-pkcs11 can raise, named and numbered.

Recovery is driven by codes: this module names and numbers them, and parses
them as a policy writes them. Turning a python-pkcs11 exception back into a
:class:`Code` is the edge's job (``hsmfsm.p11.codes``).

Pure data and string parsing: no I/O. Which *class* a code belongs to (and so
which event it fires) is policy, not code: see ``policies/default.yaml``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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

#: Names for errors that python-pkcs11 raises from Python, with no CKR behind them
#: (``hsmfsm.p11.codes`` maps the exception classes), so that a policy can classify them too.
PSEUDO_NAMES: frozenset[str] = frozenset({
    "HSMFSM_NO_SUCH_TOKEN", "HSMFSM_NO_SUCH_KEY", "HSMFSM_MULTIPLE_TOKENS", "HSMFSM_MULTIPLE_OBJECTS",
})
_NAME_OF: dict[int, str] = {v: k for k, v in CKR.items()}

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
#: A call cut off because its member became suspected (it ran past its suspicion limit while
#: another member served): re-issued on another member. The rule-book's own fact, never a
#: policy's to classify (``hsmfsm.core.rules.decide_call``), so it is not in :data:`ALL_NAMES`.
SUSPECTED = Code("HSMFSM_SUSPECTED", None)


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
    if text in PSEUDO_NAMES or text in (CALL_TIMEOUT.name, UNKNOWN_ERROR):
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


#: Every name a policy may classify.
ALL_NAMES: frozenset[str] = frozenset(CKR) | PSEUDO_NAMES | {CALL_TIMEOUT.name, UNKNOWN_ERROR}
