"""PKCS#11 attribute numbers, and how p11-kit's RPC classifies their values. Pure data.

A value crosses p11-kit's RPC in one of six forms, chosen by the attribute's
*type* alone: ``map_attribute_to_value_type`` in ``p11-kit/rpc-message.c``
(tag 0.24.1, lines 781-881, the version in Debian bookworm):

``bool``        one byte (CK_BBOOL), ``p11_rpc_buffer_add_byte_value`` (:900-916)
``ulong``       a u64 (CK_ULONG), ``p11_rpc_buffer_add_ulong_value`` (:918-940)
``template``    a nested CK_ATTRIBUTE array, ``..._attribute_array_value`` (:942-965)
``mechanisms``  a u32 count and that many u64, ``..._mechanism_type_array_value`` (:967-995)
``date``        a byte array of 8 or 0 bytes, ``p11_rpc_buffer_add_date_value`` (:997-1021)
``bytes``       a byte array, for everything else: the ``default:`` branch (:840-843)
                falls through to the byte-array case, so an attribute p11-kit does not
                name, vendor types included, travels as bytes.

Both ends must agree, because the form is not on the wire: a peer that
classifies an attribute differently reads garbage. :data:`KINDS` is the 0.24.1
switch, transcribed case by case. Three surprises that follow from it:

* ``CKA_DESTROYABLE``, ``CKA_UNIQUE_ID``, ``CKA_PUBLIC_KEY_INFO`` and
  ``CKA_NAME_HASH_ALGORITHM`` are not in the switch, so they are ``bytes`` (a
  CK_BBOOL ``CKA_DESTROYABLE`` travels as a 1-byte array, a CK_ULONG
  ``CKA_NAME_HASH_ALGORITHM`` as an 8-byte array of native memory).
* ``CKA_DERIVE_TEMPLATE`` is ``bytes`` in 0.24.1 and a ``template`` from 0.25.0.
* Later releases classify some vendor attributes (IBM's, from 0.25.0) and, in
  0.25.6-0.25.7 only, two NSS/p11-kit trust attributes differently
  (:data:`LATER_KINDS`, and ``kind_of(t, client_version=...)``).

A server that may face clients of several releases should answer the attributes
in :data:`AMBIGUOUS` as invalid. Note that the 0.24.1 *client* refuses a reply
that contains any of CKA_WRAP/UNWRAP/DERIVE_TEMPLATE at all, valid or not
(``IS_ATTRIBUTE_ARRAY`` check in ``proto_read_attribute_array``,
``rpc-client.c`` 0.24.1 lines 246-249, ``common/attrs.h:50-53``): the only
answer such a client can take for those is an error reply.

:func:`decode_native` / :func:`encode_native` convert between the C memory a
PKCS#11 module fills (what python-pkcs11's raw attribute calls hand over) and
the Python value the RPC codec (:mod:`hsmfsm.rpc.wire`) carries for that kind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

Kind = Literal["bool", "ulong", "bytes", "date", "template", "mechanisms"]

#: PKCS#11's flag for array-valued attributes (``CKF_ARRAY_ATTRIBUTE``, pkcs11.h).
CKF_ARRAY_ATTRIBUTE = 0x40000000
CKA_VENDOR_DEFINED = 0x80000000

# --- attribute types (pkcs11.h of p11-kit 0.26.4; unchanged since 0.24.1 for these) ---
CKA_CLASS = 0x0
CKA_TOKEN = 0x1
CKA_PRIVATE = 0x2
CKA_LABEL = 0x3
CKA_UNIQUE_ID = 0x4
CKA_APPLICATION = 0x10
CKA_VALUE = 0x11
CKA_OBJECT_ID = 0x12
CKA_CERTIFICATE_TYPE = 0x80
CKA_ISSUER = 0x81
CKA_SERIAL_NUMBER = 0x82
CKA_AC_ISSUER = 0x83
CKA_OWNER = 0x84
CKA_ATTR_TYPES = 0x85
CKA_TRUSTED = 0x86
CKA_CERTIFICATE_CATEGORY = 0x87
CKA_JAVA_MIDP_SECURITY_DOMAIN = 0x88
CKA_URL = 0x89
CKA_HASH_OF_SUBJECT_PUBLIC_KEY = 0x8A
CKA_HASH_OF_ISSUER_PUBLIC_KEY = 0x8B
CKA_NAME_HASH_ALGORITHM = 0x8C
CKA_CHECK_VALUE = 0x90
CKA_KEY_TYPE = 0x100
CKA_SUBJECT = 0x101
CKA_ID = 0x102
CKA_SENSITIVE = 0x103
CKA_ENCRYPT = 0x104
CKA_DECRYPT = 0x105
CKA_WRAP = 0x106
CKA_UNWRAP = 0x107
CKA_SIGN = 0x108
CKA_SIGN_RECOVER = 0x109
CKA_VERIFY = 0x10A
CKA_VERIFY_RECOVER = 0x10B
CKA_DERIVE = 0x10C
CKA_START_DATE = 0x110
CKA_END_DATE = 0x111
CKA_MODULUS = 0x120
CKA_MODULUS_BITS = 0x121
CKA_PUBLIC_EXPONENT = 0x122
CKA_PRIVATE_EXPONENT = 0x123
CKA_PRIME_1 = 0x124
CKA_PRIME_2 = 0x125
CKA_EXPONENT_1 = 0x126
CKA_EXPONENT_2 = 0x127
CKA_COEFFICIENT = 0x128
CKA_PUBLIC_KEY_INFO = 0x129
CKA_PRIME = 0x130
CKA_SUBPRIME = 0x131
CKA_BASE = 0x132
CKA_PRIME_BITS = 0x133
CKA_SUB_PRIME_BITS = 0x134
CKA_SUBPRIME_BITS = CKA_SUB_PRIME_BITS
CKA_VALUE_BITS = 0x160
CKA_VALUE_LEN = 0x161
CKA_EXTRACTABLE = 0x162
CKA_LOCAL = 0x163
CKA_NEVER_EXTRACTABLE = 0x164
CKA_ALWAYS_SENSITIVE = 0x165
CKA_KEY_GEN_MECHANISM = 0x166
CKA_MODIFIABLE = 0x170
CKA_COPYABLE = 0x171
CKA_DESTROYABLE = 0x172
CKA_EC_PARAMS = 0x180
CKA_ECDSA_PARAMS = CKA_EC_PARAMS
CKA_EC_POINT = 0x181
CKA_SECONDARY_AUTH = 0x200
CKA_AUTH_PIN_FLAGS = 0x201
CKA_ALWAYS_AUTHENTICATE = 0x202
CKA_WRAP_WITH_TRUSTED = 0x210
CKA_OTP_FORMAT = 0x220
CKA_OTP_LENGTH = 0x221
CKA_OTP_TIME_INTERVAL = 0x222
CKA_OTP_USER_FRIENDLY_MODE = 0x223
CKA_OTP_CHALLENGE_REQUIREMENT = 0x224
CKA_OTP_TIME_REQUIREMENT = 0x225
CKA_OTP_COUNTER_REQUIREMENT = 0x226
CKA_OTP_PIN_REQUIREMENT = 0x227
CKA_OTP_USER_IDENTIFIER = 0x22A
CKA_OTP_SERVICE_IDENTIFIER = 0x22B
CKA_OTP_SERVICE_LOGO = 0x22C
CKA_OTP_SERVICE_LOGO_TYPE = 0x22D
CKA_OTP_COUNTER = 0x22E
CKA_OTP_TIME = 0x22F
CKA_GOSTR3410_PARAMS = 0x250
CKA_GOSTR3411_PARAMS = 0x251
CKA_GOST28147_PARAMS = 0x252
CKA_HW_FEATURE_TYPE = 0x300
CKA_RESET_ON_INIT = 0x301
CKA_HAS_RESET = 0x302
CKA_PIXEL_X = 0x400
CKA_PIXEL_Y = 0x401
CKA_RESOLUTION = 0x402
CKA_CHAR_ROWS = 0x403
CKA_CHAR_COLUMNS = 0x404
CKA_COLOR = 0x405
CKA_BITS_PER_PIXEL = 0x406
CKA_CHAR_SETS = 0x480
CKA_ENCODING_METHODS = 0x481
CKA_MIME_TYPES = 0x482
CKA_MECHANISM_TYPE = 0x500
CKA_REQUIRED_CMS_ATTRIBUTES = 0x501
CKA_DEFAULT_CMS_ATTRIBUTES = 0x502
CKA_SUPPORTED_CMS_ATTRIBUTES = 0x503
CKA_PROFILE_ID = 0x601
CKA_WRAP_TEMPLATE = CKF_ARRAY_ATTRIBUTE | 0x211
CKA_UNWRAP_TEMPLATE = CKF_ARRAY_ATTRIBUTE | 0x212
CKA_DERIVE_TEMPLATE = CKF_ARRAY_ATTRIBUTE | 0x213
CKA_ALLOWED_MECHANISMS = CKF_ARRAY_ATTRIBUTE | 0x600

# --- object classes, key types, certificate types ---
CKO_DATA = 0x0
CKO_CERTIFICATE = 0x1
CKO_PUBLIC_KEY = 0x2
CKO_PRIVATE_KEY = 0x3
CKO_SECRET_KEY = 0x4
CKO_HW_FEATURE = 0x5
CKO_DOMAIN_PARAMETERS = 0x6
CKO_MECHANISM = 0x7
CKO_OTP_KEY = 0x8
CKO_PROFILE = 0x9

CKK_RSA = 0x0
CKK_DSA = 0x1
CKK_DH = 0x2
CKK_EC = 0x3
CKK_ECDSA = CKK_EC
CKK_X9_42_DH = 0x4
CKK_GENERIC_SECRET = 0x10
CKK_DES = 0x13
CKK_DES2 = 0x14
CKK_DES3 = 0x15
CKK_AES = 0x1F
CKK_SHA_1_HMAC = 0x28
CKK_SHA256_HMAC = 0x2B
CKK_SHA384_HMAC = 0x2C
CKK_SHA512_HMAC = 0x2D
CKK_SHA224_HMAC = 0x2E
CKK_GOSTR3410 = 0x30
CKK_EC_EDWARDS = 0x40
CKK_EC_MONTGOMERY = 0x41

CKC_X_509 = 0x0
CKC_X_509_ATTR_CERT = 0x1
CKC_WTLS = 0x2


def _table(kind: Kind, *types: int) -> dict[int, Kind]:
    return dict.fromkeys(types, kind)


#: p11-kit 0.24.1's classification, ``rpc-message.c:781-881``, every ``case`` label in
#: source order. Types not listed here are ``bytes`` (the ``default:`` label).
KINDS: Mapping[int, Kind] = {
    # :785-810  return P11_RPC_VALUE_BYTE
    **_table("bool", CKA_TOKEN, CKA_PRIVATE, CKA_TRUSTED, CKA_SENSITIVE, CKA_ENCRYPT, CKA_DECRYPT,
             CKA_WRAP, CKA_UNWRAP, CKA_SIGN, CKA_SIGN_RECOVER, CKA_VERIFY, CKA_VERIFY_RECOVER,
             CKA_DERIVE, CKA_EXTRACTABLE, CKA_LOCAL, CKA_NEVER_EXTRACTABLE, CKA_ALWAYS_SENSITIVE,
             CKA_MODIFIABLE, CKA_COPYABLE, CKA_SECONDARY_AUTH, CKA_ALWAYS_AUTHENTICATE,
             CKA_WRAP_WITH_TRUSTED, CKA_RESET_ON_INIT, CKA_HAS_RESET, CKA_COLOR),
    # :811-831  return P11_RPC_VALUE_ULONG
    **_table("ulong", CKA_CLASS, CKA_CERTIFICATE_TYPE, CKA_CERTIFICATE_CATEGORY,
             CKA_JAVA_MIDP_SECURITY_DOMAIN, CKA_KEY_TYPE, CKA_MODULUS_BITS, CKA_PRIME_BITS,
             CKA_SUB_PRIME_BITS, CKA_VALUE_BITS, CKA_VALUE_LEN, CKA_KEY_GEN_MECHANISM,
             CKA_AUTH_PIN_FLAGS, CKA_HW_FEATURE_TYPE, CKA_PIXEL_X, CKA_PIXEL_Y, CKA_RESOLUTION,
             CKA_CHAR_ROWS, CKA_CHAR_COLUMNS, CKA_BITS_PER_PIXEL, CKA_MECHANISM_TYPE),
    # :832-834  return P11_RPC_VALUE_ATTRIBUTE_ARRAY (not CKA_DERIVE_TEMPLATE in 0.24.1)
    **_table("template", CKA_WRAP_TEMPLATE, CKA_UNWRAP_TEMPLATE),
    # :835-836  return P11_RPC_VALUE_MECHANISM_TYPE_ARRAY
    **_table("mechanisms", CKA_ALLOWED_MECHANISMS),
    # :837-839  return P11_RPC_VALUE_DATE
    **_table("date", CKA_START_DATE, CKA_END_DATE),
    # :844-879  return P11_RPC_VALUE_BYTE_ARRAY (named; the default lands here too)
    **_table("bytes", CKA_LABEL, CKA_APPLICATION, CKA_VALUE, CKA_OBJECT_ID, CKA_ISSUER,
             CKA_SERIAL_NUMBER, CKA_AC_ISSUER, CKA_OWNER, CKA_ATTR_TYPES, CKA_URL,
             CKA_HASH_OF_SUBJECT_PUBLIC_KEY, CKA_HASH_OF_ISSUER_PUBLIC_KEY, CKA_CHECK_VALUE,
             CKA_SUBJECT, CKA_ID, CKA_MODULUS, CKA_PUBLIC_EXPONENT, CKA_PRIVATE_EXPONENT,
             CKA_PRIME_1, CKA_PRIME_2, CKA_EXPONENT_1, CKA_EXPONENT_2, CKA_COEFFICIENT, CKA_PRIME,
             CKA_SUBPRIME, CKA_BASE, CKA_EC_PARAMS, CKA_EC_POINT, CKA_CHAR_SETS,
             CKA_ENCODING_METHODS, CKA_MIME_TYPES, CKA_REQUIRED_CMS_ATTRIBUTES,
             CKA_DEFAULT_CMS_ATTRIBUTES, CKA_SUPPORTED_CMS_ATTRIBUTES),
}

# Vendor attributes that later releases name (common/pkcs11x.h of 0.26.4).
_IBM = {
    "CKA_IBM_RESTRICTABLE": 0x80010001, "CKA_IBM_NEVER_MODIFIABLE": 0x80010002,
    "CKA_IBM_RETAINKEY": 0x80010003, "CKA_IBM_ATTRBOUND": 0x80010004, "CKA_IBM_KEYTYPE": 0x80010005,
    "CKA_IBM_USE_AS_DATA": 0x80010008, "CKA_IBM_STD_COMPLIANCE1": 0x8001000A,
    "CKA_IBM_PROTKEY_EXTRACTABLE": 0x8001000C, "CKA_IBM_PROTKEY_NEVER_EXTRACTABLE": 0x8001000D,
    "CKA_IBM_DILITHIUM_KEYFORM": 0x800D0001, "CKA_IBM_KYBER_KEYFORM": 0x800D0009,
    "CKA_IBM_CCA_AES_KEY_MODE": 0x800D0101,
}
CKA_NSS_MOZILLA_CA_POLICY = 0xCE534372
CKA_X_DISTRUSTED = 0xD8444764

_LATER_V1: dict[int, Kind] = {
    CKA_DERIVE_TEMPLATE: "template",
    **_table("bool", *(_IBM[n] for n in ("CKA_IBM_RESTRICTABLE", "CKA_IBM_NEVER_MODIFIABLE",
                                          "CKA_IBM_RETAINKEY", "CKA_IBM_ATTRBOUND", "CKA_IBM_USE_AS_DATA",
                                          "CKA_IBM_PROTKEY_EXTRACTABLE", "CKA_IBM_PROTKEY_NEVER_EXTRACTABLE"))),
    **_table("ulong", *(_IBM[n] for n in ("CKA_IBM_KEYTYPE", "CKA_IBM_STD_COMPLIANCE1",
                                           "CKA_IBM_DILITHIUM_KEYFORM"))),
}

#: Where later p11-kit releases classify a type differently from 0.24.1, keyed by the
#: protocol version byte those releases send (1 = 0.25.0-0.25.5, 2 = 0.25.6 and later;
#: checked against rpc-message.c of 0.25.0, 0.25.5, 0.25.6, 0.25.10, 0.26.0 and 0.26.4).
LATER_KINDS: Mapping[int, Mapping[int, Kind]] = {
    1: _LATER_V1,
    2: {**_LATER_V1, **_table("ulong", _IBM["CKA_IBM_KYBER_KEYFORM"], _IBM["CKA_IBM_CCA_AES_KEY_MODE"])},
}

#: Types whose wire form depends on the client's p11-kit release (the keys of LATER_KINDS,
#: plus the two trust attributes 0.25.6-0.25.7 sent as bool and 0.25.8 reverted to bytes,
#: commit e7b760a), and the WRAP/UNWRAP templates a 0.24.1 client refuses in any reply.
AMBIGUOUS: frozenset[int] = frozenset(
    {*LATER_KINDS[2], CKA_NSS_MOZILLA_CA_POLICY, CKA_X_DISTRUSTED, CKA_WRAP_TEMPLATE, CKA_UNWRAP_TEMPLATE})


def kind_of(attribute_type: int, *, client_version: int = 0) -> Kind:
    """How p11-kit carries a value of ``attribute_type``: "bytes" for anything it does not name.

    ``client_version`` is the protocol byte the client sent (0 for bookworm's 0.24.1); 1 and 2
    select the later tables, for the few types that moved (:data:`LATER_KINDS`).
    """
    if client_version:
        later = LATER_KINDS[2 if client_version >= 2 else 1].get(attribute_type)
        if later is not None:
            return later
    return KINDS.get(attribute_type, "bytes")


NAMES: Mapping[int, str] = {
    value: name
    for name, value in reversed(list(globals().items()))
    if name.startswith("CKA_") and isinstance(value, int) and name not in ("CKA_VENDOR_DEFINED",)
    and name not in ("CKA_SUBPRIME_BITS", "CKA_ECDSA_PARAMS")
} | {value: name for name, value in _IBM.items()}


def name_of(attribute_type: int) -> str:
    """``"CKA_LABEL"``, or ``"0x%08X"`` for a type this module does not name."""
    name = NAMES.get(attribute_type)
    return name if name is not None else f"0x{attribute_type:08X}"


#: Private-key and secret-key material: never read from a member, never cached, never served.
#: (CKA_VALUE is the key itself for secret, EC, DSA and DH private keys; for certificates,
#: data objects and some public keys it is public, so callers decide by CKA_CLASS.)
SECRET: frozenset[int] = frozenset({
    CKA_VALUE, CKA_PRIVATE_EXPONENT, CKA_PRIME_1, CKA_PRIME_2, CKA_EXPONENT_1, CKA_EXPONENT_2,
    CKA_COEFFICIENT, 0x80000001, 0x80000003, 0x80000004,  # CKA_IBM_OPAQUE, _REENC, _OLD: key blobs
})

#: The public, immutable attributes a server reads once per object and caches. Not the
#: *_TEMPLATE ones (a 0.24.1 client cannot take them, see the module docstring).
CATALOG: tuple[int, ...] = (
    CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_LABEL, CKA_UNIQUE_ID, CKA_APPLICATION, CKA_OBJECT_ID,
    CKA_VALUE, CKA_CERTIFICATE_TYPE, CKA_ISSUER, CKA_SERIAL_NUMBER, CKA_TRUSTED,
    CKA_CERTIFICATE_CATEGORY, CKA_KEY_TYPE, CKA_SUBJECT, CKA_ID, CKA_SENSITIVE, CKA_ENCRYPT,
    CKA_DECRYPT, CKA_WRAP, CKA_UNWRAP, CKA_SIGN, CKA_SIGN_RECOVER, CKA_VERIFY, CKA_VERIFY_RECOVER,
    CKA_DERIVE, CKA_START_DATE, CKA_END_DATE, CKA_MODULUS, CKA_MODULUS_BITS, CKA_PUBLIC_EXPONENT,
    CKA_PUBLIC_KEY_INFO, CKA_VALUE_LEN, CKA_EXTRACTABLE, CKA_LOCAL, CKA_NEVER_EXTRACTABLE,
    CKA_ALWAYS_SENSITIVE, CKA_KEY_GEN_MECHANISM, CKA_MODIFIABLE, CKA_COPYABLE, CKA_DESTROYABLE,
    CKA_EC_PARAMS, CKA_EC_POINT, CKA_ALWAYS_AUTHENTICATE, CKA_WRAP_WITH_TRUSTED,
    CKA_ALLOWED_MECHANISMS,
)

NativeValue = bool | int | bytes | tuple[int, ...]


def decode_native(attribute_type: int, raw: bytes, *, ulong_size: int = 8,
                  byteorder: Literal["little", "big"] = "little") -> NativeValue:
    """The value a PKCS#11 module wrote into C memory, as the RPC codec carries its kind.

    ``bool``: CK_BBOOL, one byte. ``ulong``: one CK_ULONG of ``ulong_size`` native bytes.
    ``mechanisms``: an array of CK_ULONG, as a tuple. ``date`` and ``bytes``: the bytes as
    they are (so CKA_DESTROYABLE, a CK_BBOOL that p11-kit carries as bytes, stays ``b"\\x01"``).
    A ``template`` holds pointers into the module's memory and cannot be decoded from bytes:
    ValueError, as for a length that does not fit the kind.
    """
    kind = kind_of(attribute_type)
    raw = bytes(raw)
    if kind == "bool":
        if len(raw) != 1:
            raise ValueError(f"{name_of(attribute_type)}: a CK_BBOOL is 1 byte, not {len(raw)}")
        return raw != b"\0"
    if kind == "ulong":
        if len(raw) != ulong_size:
            raise ValueError(f"{name_of(attribute_type)}: a CK_ULONG is {ulong_size} bytes, not {len(raw)}")
        return int.from_bytes(raw, byteorder)
    if kind == "mechanisms":
        if len(raw) % ulong_size:
            raise ValueError(f"{name_of(attribute_type)}: {len(raw)} bytes is no CK_ULONG array")
        return tuple(int.from_bytes(raw[i:i + ulong_size], byteorder) for i in range(0, len(raw), ulong_size))
    if kind == "template":
        raise ValueError(f"{name_of(attribute_type)}: a CK_ATTRIBUTE array holds pointers, not bytes")
    if kind == "date" and len(raw) not in (0, 8):
        raise ValueError(f"{name_of(attribute_type)}: a CK_DATE is 8 bytes, not {len(raw)}")
    return raw


def encode_native(attribute_type: int, value: NativeValue | Sequence[int], *, ulong_size: int = 8,
                  byteorder: Literal["little", "big"] = "little") -> bytes:
    """The C memory for ``value``, the reverse of :func:`decode_native`.

    A bool is accepted for a ``bytes`` type too (one CK_BBOOL byte), so CKA_DESTROYABLE can be
    written as ``True``.
    """
    kind = kind_of(attribute_type)
    if kind == "bool" or (kind == "bytes" and isinstance(value, bool)):
        if not isinstance(value, (bool, int)) or not 0 <= int(value) <= 255:
            raise ValueError(f"{name_of(attribute_type)}: a CK_BBOOL, not {value!r}")
        return bytes((int(value),))
    if kind == "ulong":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name_of(attribute_type)}: a CK_ULONG, not {value!r}")
        return value.to_bytes(ulong_size, byteorder)
    if kind == "mechanisms":
        if isinstance(value, (bytes, bytearray, int)):
            raise ValueError(f"{name_of(attribute_type)}: a sequence of mechanism types, not {value!r}")
        return b"".join(int(v).to_bytes(ulong_size, byteorder) for v in value)
    if kind == "template":
        raise ValueError(f"{name_of(attribute_type)}: a CK_ATTRIBUTE array holds pointers, not bytes")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"{name_of(attribute_type)}: bytes, not {type(value).__name__}")
    if kind == "date" and len(value) not in (0, 8):
        raise ValueError(f"{name_of(attribute_type)}: a CK_DATE is 8 bytes, not {len(value)}")
    return bytes(value)
