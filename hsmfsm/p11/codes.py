"""python-pkcs11 exceptions back to return codes.

python-pkcs11 raises exceptions that carry no CKR number (``args == ()``), turns
a few codes into a bare ``PKCS11Error`` with a fixed message, and vendor codes
into ``PKCS11Error("Unmapped error code 0x...")`` (docs/FACTS.md). Recovery is
driven by codes, so this module turns any such exception back into a
:class:`~hsmfsm.core.codes.Code`.
"""

from __future__ import annotations

import re

import pkcs11.exceptions as _exc

from ..core.codes import CKR, PSEUDO_NAMES, UNKNOWN_ERROR, Code, code_from_value

#: Errors that python-pkcs11 raises from Python, with no CKR behind them.
#: They get names of their own so that a policy can classify them too.
PSEUDO: dict[str, type[BaseException]] = {
    "HSMFSM_NO_SUCH_TOKEN": _exc.NoSuchToken,
    "HSMFSM_NO_SUCH_KEY": _exc.NoSuchKey,
    "HSMFSM_MULTIPLE_TOKENS": _exc.MultipleTokensReturned,
    "HSMFSM_MULTIPLE_OBJECTS": _exc.MultipleObjectsReturned,
}

# python-pkcs11's map_rv_to_error (pkcs11/_pkcs11.pxd), inverted: exception
# class -> CKR name. tests/test_codes.py checks it against the installed copy.
_CLASS_TO_NAME: dict[type[BaseException], str] = {
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
        if "not initialized" in text:  # lib.initialize() wording, docs/FACTS.md
            return Code("CKR_CRYPTOKI_NOT_INITIALIZED", CKR["CKR_CRYPTOKI_NOT_INITIALIZED"])
        for base, bname in _CLASS_TO_NAME.items():  # a subclass of a mapped class
            if isinstance(error, base):
                return Code(bname, CKR[bname])
    return Code(UNKNOWN_ERROR, None)



assert set(PSEUDO) == PSEUDO_NAMES, "core.codes.PSEUDO_NAMES and p11.codes.PSEUDO disagree"
