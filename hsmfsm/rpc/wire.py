"""p11-kit's RPC protocol as bytes: framing, the call table, and every argument encoding. Pure.

A server that speaks this serves a PKCS#11 slot to the stock ``p11-kit-client.so``
(bookworm's p11-kit 0.24.1, and later releases). No sockets, no threads, no clock:
the caller reads frames, this module turns them into values and back.

Sources, all of p11-kit (mirror ``p11-glue/p11-kit``), tag 0.24.1 unless another
tag is named; ``file:line`` references are to that tag:

* framing ``[u32 code][u32 options_len][u32 data_len] options data``, big-endian
  (``rpc-transport.c:251-272`` write, ``:405-418`` read; code 0 is refused there);
* a message is ``[u32 call_id][u32 sig_len][sig]`` then the values in signature
  order (``rpc-message.c:137-173``); the signature must equal the table's byte for
  byte (``:213-224``); the table is ``p11_rpc_calls`` (``rpc-message.h:138-205``,
  ids 66-89 from ``rpc-message.h`` of 0.26.4);
* the type codes and their encoders: ``rpc-message.c:246-521`` (message level),
  ``:566-779`` (buffer level), ``:781-1275`` (attributes), ``:1286-1617``
  (mechanisms); the server's readers ``rpc-server.c:78-461``.

What the client's release changes
---------------------------------
The version byte exchanged before the first frame is the client's *maximum*
protocol version: 0 from p11-kit <= 0.24.x, 1 from 0.25.0-0.25.5, 2 from 0.25.6
on (``meson_options.txt`` ``rpc_max`` of those tags). This server answers
:func:`negotiate` = 0, and the client then talks version 0, but several encodings
follow the client's *release*, not the negotiated version, so every parse and
encode takes ``client_version`` = the byte the client sent:

* ``M`` (a CK_MECHANISM). 0.24.1: u32 type, then a parameter serialiser chosen by
  type: CKM_RSA_PKCS_PSS 3 x u64, CKM_RSA_PKCS_OAEP 3 x u64 + byte array, any other
  type a byte array (0xFFFFFFFF when there is none) (``rpc-message.c:1416-1423``,
  ``1558-1617``). 0.25.0 added 38 more serialisers (the SHA*_RSA_PKCS_PSS family,
  AES/DES IVs, GCM, CTR, ECDH1, HMAC_GENERAL ...). **0.25.6 (commit 6449cfe)
  changed the framing**: a type on the no-parameter list is followed by nothing,
  any other by a u8 "has parameter" and then the serialiser. That change is not
  gated by the negotiated version. From 0.25.3 the NULL mechanism (cancel an
  operation) is the type 0xFFFFFFFF with nothing after it (commit 66f1fc7).
* ``fy``: 0.25.0+ send 0xFFFFFFFF for a non-NULL buffer of length 0 (506b941).
  ``ay``: they send a NULL array of length 0 as ``01 FFFFFFFF``, not ``00 00000000``.
* ``fA``: 0.25.4+ follow a template attribute's buffer length with its nested
  buffer list (6529b54). The version byte (1) cannot tell 0.25.0-0.25.3 from
  0.25.4-0.25.5, so for version 1 the parser takes whichever form fills the message.
* attribute kinds: :func:`hsmfsm.core.attributes.kind_of` with ``client_version``.

Values, by signature letter
---------------------------
``y`` int 0-255; ``u`` int (u64); ``v`` (major, minor); ``s`` bytes, space padded
by the caller (:func:`pad`), of the exact length the C struct has (checked, as
the reader of the other side does, ``rpc-message.c:482-486``); ``z`` bytes;
``ay`` bytes or None (NULL), and in a reply also :class:`Length` (``00`` + u32:
the size answer and the BUFFER_TOO_SMALL answer, ``rpc-server.c:145-174``);
``fy`` in a request the caller's buffer size, None for a NULL buffer (a length
query); ``au`` list[int], or :class:`Length` in a reply; ``fu`` the caller's
buffer count or None (NULL: a count query); ``aA`` list[:class:`Attribute`];
``fA`` list of (type, buffer length), length 0 for a NULL pValue; ``M``
:class:`Mechanism` or None (the NULL mechanism); ``P`` (C_DeriveKey2's updated
parameter, 0.25.6+) the raw encoded bytes.

Untrusted input
---------------
Every count and length is checked against the caps below and against the bytes
that are left before anything is built, so 10 bytes claiming 0xFFFFFFFF
attributes fail at once, and nesting is capped (p11-kit itself had no cap until
0.26.3, CVE-2026-13757). Malformed input raises :class:`ProtocolError`, which
says what and where, and never quotes the bytes (a PIN travels in clear,
``C_Login``: :data:`SECRET_CALLS`, :func:`describe`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..core import attributes as attrs
from ..core.attributes import Kind, kind_of, name_of
from ..core.mechanisms import HASH_BY_CKM, HASH_BY_MGF, ckm_name, ckm_value

__all__ = [
    "ALLOWED", "BY_NAME", "CALLS", "HANDSHAKE", "HEADER", "MAX_ARRAY", "MAX_BYTES", "MAX_DEPTH", "MAX_FRAME",
    "NULL_MECHANISM", "OAEP", "PROTOCOL_MAX", "PSS", "SECRET_CALLS", "Attribute", "Call",
    "ErrorReply", "Fields", "Length", "Mechanism", "ProtocolError", "Request", "UnknownCall", "client_allows",
    "describe", "encode_error", "encode_frame", "encode_reply", "encode_request", "negotiate", "pad",
    "parse_header", "parse_reply", "parse_request",
]

#: The highest protocol version this codec speaks. 0 is what bookworm's client speaks
#: (``configure.ac:22-23`` of 0.24.1); the later versions only add C_InitToken2 (1) and
#: C_DeriveKey2 (2), which a version-0 peer never receives (``rpc-client.c`` of 0.26.4,
#: ``rpc_C_InitToken``, ``rpc_C_DeriveKey``).
PROTOCOL_MAX = 0

#: The string C_Initialize carries as its first argument (``rpc-message.h:214-217``);
#: p11-kit's server refuses any other (``rpc-server.c:705-714``).
HANDSHAKE = b"PRIVATE-GNOME-KEYRING-PKCS11-PROTOCOL-V-1"

MAX_FRAME = 16 * 1024 * 1024  # options + data of one frame
MAX_ARRAY = 4096              # entries of an au / aA / fA list, or of CKA_ALLOWED_MECHANISMS
MAX_BYTES = 16 * 1024 * 1024  # one byte array
MAX_DEPTH = 2                 # templates inside templates (CKA_WRAP_TEMPLATE ...)

#: The mechanism type that stands for a NULL CK_MECHANISM_PTR (0.25.3+, commit 66f1fc7).
NULL_MECHANISM = 0xFFFFFFFF

HEADER = struct.Struct(">III")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_II = struct.Struct(">II")
_NULL_ARRAY = b"\xff\xff\xff\xff"  # a byte array's length for a NULL pointer (rpc-message.c:734-736)
_BYTE_ARRAY_LIMIT = 0x7FFFFFFF      # p11-kit refuses lengths from here up (rpc-message.c:737, 762)
_SIZEOF_CK_ATTRIBUTE = 24           # the client's sizeof (CK_ATTRIBUTE), LP64
_SIZEOF_CK_ULONG = 8


# ---------------------------------------------------------------------------------------------
# errors


class ProtocolError(Exception):
    """Malformed input: the message says what and at which offset, never which bytes."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message if offset is None else f"{message} (offset {offset})")
        self.offset = offset


class UnknownCall(ProtocolError):
    """A call id outside the table. Answer CKR_FUNCTION_NOT_SUPPORTED and keep the connection."""

    def __init__(self, call_id: int) -> None:
        super().__init__(f"unknown call id {call_id}", 0)
        self.call_id = call_id


class ErrorReply(Exception):
    """:func:`parse_reply` met an error reply (call id 0); ``rv`` is its CK_RV."""

    def __init__(self, rv: int) -> None:
        super().__init__(f"error reply, CK_RV 0x{rv:08X}")
        self.rv = rv


# ---------------------------------------------------------------------------------------------
# values


@dataclass(frozen=True, slots=True)
class Length:
    """In a reply, an ``ay``/``au`` that carries only a length: a size answer, or BUFFER_TOO_SMALL."""

    n: int


@dataclass(frozen=True, slots=True)
class PSS:
    """CK_RSA_PKCS_PSS_PARAMS: hashAlg (a CKM_SHA* number), mgf (CKG_MGF1_*), sLen."""

    hash: int
    mgf: int
    salt_length: int


@dataclass(frozen=True, slots=True)
class OAEP:
    """CK_RSA_PKCS_OAEP_PARAMS: hashAlg, mgf, source (CKZ_DATA_SPECIFIED = 1), pSourceData."""

    hash: int
    mgf: int
    source: int
    source_data: bytes | None


#: A parameter that p11-kit 0.25+ serialises field by field (GCM, CTR, ECDH1, HMAC_GENERAL ...):
#: its u64 fields as ints, its byte arrays as bytes or None, in p11-kit's order.
Fields = tuple[int | bytes | None, ...]


@dataclass(frozen=True, slots=True)
class Mechanism:
    """A CK_MECHANISM. ``param`` is None for no parameter (or a NULL one), bytes for an opaque one."""

    type: int
    param: bytes | None | PSS | OAEP | Fields = None


@dataclass(frozen=True, slots=True)
class Attribute:
    """One CK_ATTRIBUTE as it crosses in an ``aA`` list.

    ``valid=False`` is p11-kit's "u32 type, u8 0": an unavailable or sensitive entry
    (ulValueLen == -1). ``value=None`` with ``valid=True`` is a NULL pValue: in a reply,
    a size answer of ``length`` bytes. ``length`` is the length field; None means the
    value's own length (1 for a bool, 8 for a ulong: 0.25+ clients trust this field,
    p11-kit #679). A decoded Attribute carries ``length`` only when it differs from that.
    """

    type: int
    value: bool | int | bytes | tuple[int, ...] | list[Attribute] | None = None
    valid: bool = True
    length: int | None = None


@dataclass(frozen=True, slots=True)
class Call:
    """One entry of p11-kit's call table: id, name, request and reply signatures."""

    id: int
    name: str
    request: str
    reply: str


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request: the call and its arguments, one value per signature item."""

    call: Call
    args: tuple[Any, ...]


# ---------------------------------------------------------------------------------------------
# the call table

_TABLE: tuple[tuple[str, str, str], ...] = (
    # rpc-message.h:138-205 (0.24.1)
    ("ERROR", "", "u"),
    ("C_Initialize", "ayyay", ""), ("C_Finalize", "", ""), ("C_GetInfo", "", "vsusv"),
    ("C_GetSlotList", "yfu", "au"), ("C_GetSlotInfo", "u", "ssuvv"),
    ("C_GetTokenInfo", "u", "ssssuuuuuuuuuuuvvs"), ("C_GetMechanismList", "ufu", "au"),
    ("C_GetMechanismInfo", "uu", "uuu"), ("C_InitToken", "uayz", ""), ("C_OpenSession", "uu", "u"),
    ("C_CloseSession", "u", ""), ("C_CloseAllSessions", "u", ""), ("C_GetSessionInfo", "u", "uuuu"),
    ("C_InitPIN", "uay", ""), ("C_SetPIN", "uayay", ""), ("C_GetOperationState", "ufy", "ay"),
    ("C_SetOperationState", "uayuu", ""), ("C_Login", "uuay", ""), ("C_Logout", "u", ""),
    ("C_CreateObject", "uaA", "u"), ("C_CopyObject", "uuaA", "u"), ("C_DestroyObject", "uu", ""),
    ("C_GetObjectSize", "uu", "u"), ("C_GetAttributeValue", "uufA", "aAu"),
    ("C_SetAttributeValue", "uuaA", ""), ("C_FindObjectsInit", "uaA", ""), ("C_FindObjects", "ufu", "au"),
    ("C_FindObjectsFinal", "u", ""), ("C_EncryptInit", "uMu", ""), ("C_Encrypt", "uayfy", "ay"),
    ("C_EncryptUpdate", "uayfy", "ay"), ("C_EncryptFinal", "ufy", "ay"), ("C_DecryptInit", "uMu", ""),
    ("C_Decrypt", "uayfy", "ay"), ("C_DecryptUpdate", "uayfy", "ay"), ("C_DecryptFinal", "ufy", "ay"),
    ("C_DigestInit", "uM", ""), ("C_Digest", "uayfy", "ay"), ("C_DigestUpdate", "uay", ""),
    ("C_DigestKey", "uu", ""), ("C_DigestFinal", "ufy", "ay"), ("C_SignInit", "uMu", ""),
    ("C_Sign", "uayfy", "ay"), ("C_SignUpdate", "uay", ""), ("C_SignFinal", "ufy", "ay"),
    ("C_SignRecoverInit", "uMu", ""), ("C_SignRecover", "uayfy", "ay"), ("C_VerifyInit", "uMu", ""),
    ("C_Verify", "uayay", ""), ("C_VerifyUpdate", "uay", ""), ("C_VerifyFinal", "uay", ""),
    ("C_VerifyRecoverInit", "uMu", ""), ("C_VerifyRecover", "uayfy", "ay"),
    ("C_DigestEncryptUpdate", "uayfy", "ay"), ("C_DecryptDigestUpdate", "uayfy", "ay"),
    ("C_SignEncryptUpdate", "uayfy", "ay"), ("C_DecryptVerifyUpdate", "uayfy", "ay"),
    ("C_GenerateKey", "uMaA", "u"), ("C_GenerateKeyPair", "uMaAaA", "uu"), ("C_WrapKey", "uMuufy", "ay"),
    ("C_UnwrapKey", "uMuayaA", "u"), ("C_DeriveKey", "uMuaA", "u"), ("C_SeedRandom", "uay", ""),
    ("C_GenerateRandom", "ufy", "ay"), ("C_WaitForSlotEvent", "u", "u"),
    # rpc-message.h of 0.26.4: the PKCS#11 3.0 calls (0.25.0, 7fe7e5d, not version gated) ...
    ("C_LoginUser", "uuayay", ""), ("C_SessionCancel", "uu", ""), ("C_MessageEncryptInit", "uMu", ""),
    ("C_EncryptMessage", "uayayayfy", "ay"), ("C_EncryptMessageBegin", "uayay", ""),
    ("C_EncryptMessageNext", "uayayfyu", "ay"), ("C_MessageEncryptFinal", "u", ""),
    ("C_MessageDecryptInit", "uMu", ""), ("C_DecryptMessage", "uayayayfy", "ay"),
    ("C_DecryptMessageBegin", "uayay", ""), ("C_DecryptMessageNext", "uayayfyu", "ay"),
    ("C_MessageDecryptFinal", "u", ""), ("C_MessageSignInit", "uMu", ""), ("C_SignMessage", "uayayfy", "ay"),
    ("C_SignMessageBegin", "uay", ""), ("C_SignMessageNext", "uayayyfy", "ay"),
    ("C_MessageSignFinal", "u", ""), ("C_MessageVerifyInit", "uMu", ""), ("C_VerifyMessage", "uayayay", ""),
    ("C_VerifyMessageBegin", "uay", ""), ("C_VerifyMessageNext", "uayayay", ""),
    ("C_MessageVerifyFinal", "u", ""),
    # ... C_InitToken2 (version 1, 0.25.0, b2dd8d5) and C_DeriveKey2 (version 2, 0.25.6, 6449cfe)
    ("C_InitToken2", "uays", ""), ("C_DeriveKey2", "uMuaA", "uPu"),
)

CALLS: Mapping[int, Call] = {i: Call(i, name, req, rep) for i, (name, req, rep) in enumerate(_TABLE)}
BY_NAME: Mapping[str, Call] = {call.name: call for call in CALLS.values()}
_LAST_ID = len(_TABLE) - 1

#: Calls whose arguments carry a PIN (or a label next to one) in clear: never log their bytes.
SECRET_CALLS: frozenset[str] = frozenset(
    {"C_Login", "C_LoginUser", "C_InitPIN", "C_SetPIN", "C_InitToken", "C_InitToken2"})

#: The exact lengths of the ``s`` items, in order (the C structs' fixed fields).
_SPACE_LENGTHS: Mapping[str, tuple[int, ...]] = {
    "C_GetInfo": (32, 32),                   # manufacturerID, libraryDescription
    "C_GetSlotInfo": (64, 32),               # slotDescription, manufacturerID
    "C_GetTokenInfo": (32, 32, 16, 16, 16),  # label, manufacturerID, model, serialNumber, utcTime
    "C_InitToken2": (32,),                   # label
}

#: Argument names for :func:`describe`, by call id, in signature order.
_ARG_NAMES: Mapping[int, tuple[str, ...]] = {i: tuple(names.split()) if names else () for i, names in enumerate((
    "", "handshake reserved_present reserved", "", "", "token_present count", "slot", "slot",
    "slot count", "slot mechanism", "slot pin label", "slot flags", "session", "slot", "session",
    "session pin", "session old_pin new_pin", "session buffer",
    "session state encryption_key authentication_key", "session user pin", "session",
    "session template", "session object template", "session object", "session object",
    "session object template", "session object template", "session template", "session count",
    "session", "session mechanism key", "session data buffer", "session part buffer", "session buffer",
    "session mechanism key", "session data buffer", "session part buffer", "session buffer",
    "session mechanism", "session data buffer", "session part", "session key", "session buffer",
    "session mechanism key", "session data buffer", "session part", "session buffer",
    "session mechanism key", "session data buffer", "session mechanism key", "session data signature",
    "session part", "session signature", "session mechanism key", "session signature buffer",
    "session part buffer", "session part buffer", "session part buffer", "session part buffer",
    "session mechanism template", "session mechanism public_template private_template",
    "session mechanism wrapping_key key buffer",
    "session mechanism unwrapping_key wrapped_key template", "session mechanism base_key template",
    "session seed", "session buffer", "flags",
    "session user pin username", "session flags", "session mechanism key",
    "session parameter associated_data data buffer", "session parameter associated_data",
    "session parameter part buffer flags", "session", "session mechanism key",
    "session parameter associated_data data buffer", "session parameter associated_data",
    "session parameter part buffer flags", "session", "session mechanism key",
    "session parameter data buffer", "session parameter", "session parameter data want_signature buffer",
    "session", "session mechanism key", "session parameter data signature", "session parameter",
    "session parameter data signature", "session", "slot pin label",
    "session mechanism base_key template",
))}


def _tokens(signature: str) -> tuple[str, ...]:
    """``"uayfy"`` -> ``("u", "ay", "fy")``: the legend of rpc-message.h:126-136 (and "P", 0.25.6)."""
    out: list[str] = []
    i = 0
    while i < len(signature):
        c = signature[i]
        if c in "af":
            if i + 1 >= len(signature) or signature[i + 1] not in "yuA":
                raise ValueError(f"bad signature {signature!r}")
            out.append(signature[i:i + 2])
            i += 2
        elif c in "yuvszMP":
            out.append(c)
            i += 1
        else:
            raise ValueError(f"bad signature {signature!r}")
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# mechanisms: which types carry which parameter form, per client release


def _ckms(*names: str) -> frozenset[int]:
    return frozenset(ckm_value(name) for name in names)


#: ``mechanism_has_no_parameters`` of 0.24.1 (rpc-message.c:1448-1547).
_NO_PARAMETERS_0 = _ckms(
    "RSA_PKCS_KEY_PAIR_GEN", "RSA_X9_31_KEY_PAIR_GEN", "RSA_PKCS", "RSA_9796", "RSA_X_509", "RSA_X9_31",
    "MD2_RSA_PKCS", "MD5_RSA_PKCS", "SHA1_RSA_PKCS", "SHA256_RSA_PKCS", "SHA384_RSA_PKCS", "SHA512_RSA_PKCS",
    "RIPEMD128_RSA_PKCS", "RIPEMD160_RSA_PKCS", "SHA1_RSA_X9_31", "DSA_KEY_PAIR_GEN", "DSA_PARAMETER_GEN",
    "DSA", "DSA_SHA1", "FORTEZZA_TIMESTAMP", "EC_KEY_PAIR_GEN", "ECDSA", "ECDSA_SHA1",
    "DH_PKCS_KEY_PAIR_GEN", "DH_PKCS_PARAMETER_GEN", "X9_42_DH_KEY_PAIR_GEN", "X9_42_DH_PARAMETER_GEN",
    "KEA_KEY_PAIR_GEN", "GENERIC_SECRET_KEY_GEN", "RC2_KEY_GEN", "RC4_KEY_GEN", "RC4", "RC5_KEY_GEN",
    "AES_KEY_GEN", "AES_ECB", "AES_MAC", "DES_KEY_GEN", "DES2_KEY_GEN", "DES3_KEY_GEN", "CDMF_KEY_GEN",
    "CAST_KEY_GEN", "CAST3_KEY_GEN", "CAST128_KEY_GEN", "IDEA_KEY_GEN", "SSL3_PRE_MASTER_KEY_GEN",
    "TLS_PRE_MASTER_KEY_GEN", "SKIPJACK_KEY_GEN", "BATON_KEY_GEN", "JUNIPER_KEY_GEN", "RC2_ECB", "DES_ECB",
    "DES3_ECB", "CDMF_ECB", "CAST_ECB", "CAST3_ECB", "CAST128_ECB", "RC5_ECB", "IDEA_ECB", "RC2_MAC",
    "DES_MAC", "DES3_MAC", "CDMF_MAC", "CAST_MAC", "CAST3_MAC", "RC5_MAC", "IDEA_MAC", "SSL3_MD5_MAC",
    "SSL3_SHA1_MAC", "SKIPJACK_WRAP", "BATON_WRAP", "JUNIPER_WRAP", "MD2", "MD2_HMAC", "MD5", "MD5_HMAC",
    "SHA_1", "SHA_1_HMAC", "SHA256", "SHA256_HMAC", "SHA384", "SHA384_HMAC", "SHA512", "SHA512_HMAC",
    "FASTHASH", "RIPEMD128", "RIPEMD128_HMAC", "RIPEMD160", "RIPEMD160_HMAC", "KEY_WRAP_LYNKS",
)
#: ``mechanism_has_no_parameters`` of 0.25.0 (242e5db), unchanged to 0.26.4: 35 more.
_NO_PARAMETERS_1 = _NO_PARAMETERS_0 | _ckms(
    "AES_CMAC", "DES3_CMAC", "ECDSA_SHA224", "ECDSA_SHA256", "ECDSA_SHA384", "ECDSA_SHA512", "IBM_CMAC",
    "IBM_DILITHIUM", "IBM_ED25519_SHA512", "IBM_ED448_SHA3", "IBM_SHA3_224", "IBM_SHA3_224_HMAC",
    "IBM_SHA3_256", "IBM_SHA3_256_HMAC", "IBM_SHA3_384", "IBM_SHA3_384_HMAC", "IBM_SHA3_512",
    "IBM_SHA3_512_HMAC", "SHA1_KEY_DERIVATION", "SHA224", "SHA224_HMAC", "SHA224_KEY_DERIVATION",
    "SHA224_RSA_PKCS", "SHA256_KEY_DERIVATION", "SHA384_KEY_DERIVATION", "SHA512_224", "SHA512_224_HMAC",
    "SHA512_224_KEY_DERIVATION", "SHA512_256", "SHA512_256_HMAC", "SHA512_256_KEY_DERIVATION",
    "SHA512_KEY_DERIVATION", "SHA512_T", "SHA512_T_HMAC", "SHA512_T_KEY_DERIVATION",
)

# Parameter layouts: "pss", "oaep", or a field string of q (u64), a (byte array), y (u8);
# "a" alone is a plain byte array. From the add/get pairs in rpc-message.c of 0.26.4.
_PSS_FAMILY = ("RSA_PKCS_PSS", "SHA1_RSA_PKCS_PSS", "SHA224_RSA_PKCS_PSS", "SHA256_RSA_PKCS_PSS",
               "SHA384_RSA_PKCS_PSS", "SHA512_RSA_PKCS_PSS")
_LAYOUTS_1: Mapping[int, str] = {
    **dict.fromkeys(_ckms(*_PSS_FAMILY), "pss"),
    ckm_value("RSA_PKCS_OAEP"): "oaep",
    **dict.fromkeys(_ckms("ECDH1_DERIVE", "IBM_EC_X25519", "IBM_EC_X448"), "qaa"),
    ckm_value("IBM_ATTRIBUTEBOUND_WRAP"): "q",
    **dict.fromkeys(_ckms("AES_CBC", "AES_CBC_PAD", "AES_OFB", "AES_CFB1", "AES_CFB8", "AES_CFB64",
                          "AES_CFB128", "AES_CTS"), "a"),
    ckm_value("AES_CTR"): "qa",
    ckm_value("AES_GCM"): "aqaq",
    **dict.fromkeys(_ckms("DES_CBC", "DES_CBC_PAD", "DES3_CBC", "DES3_CBC_PAD", "DES_CFB8", "DES_CFB64",
                          "DES_OFB64"), "a"),
    **dict.fromkeys(_ckms("SHA_1_HMAC_GENERAL", "SHA224_HMAC_GENERAL", "SHA256_HMAC_GENERAL",
                          "SHA384_HMAC_GENERAL", "SHA512_HMAC_GENERAL", "SHA512_224_HMAC_GENERAL",
                          "SHA512_256_HMAC_GENERAL", "AES_MAC_GENERAL", "AES_CMAC_GENERAL",
                          "DES3_MAC_GENERAL", "DES3_CMAC_GENERAL"), "q"),
    ckm_value("DH_PKCS_DERIVE"): "a",
}
_LAYOUTS: Mapping[int, Mapping[int, str]] = {
    # rpc-message.c:1416-1419 (0.24.1): only these two
    0: {ckm_value("RSA_PKCS_PSS"): "pss", ckm_value("RSA_PKCS_OAEP"): "oaep"},
    1: _LAYOUTS_1,  # 0.25.0-0.25.5: 40 serialisers
    2: {**_LAYOUTS_1, ckm_value("IBM_ECDSA_OTHER"): "q", ckm_value("IBM_BTC_DERIVE"): "qqaq",
        ckm_value("IBM_KYBER"): "qqqyaaq"},  # 0.25.6-0.26.4: 43
}
_NO_PARAMETERS: Mapping[int, frozenset[int]] = {0: _NO_PARAMETERS_0, 1: _NO_PARAMETERS_1, 2: _NO_PARAMETERS_1}

#: The mechanisms each client release lets through (``p11_rpc_mechanism_is_supported``): the
#: client refuses any other before sending (CKR_MECHANISM_INVALID) and deletes it from
#: C_GetMechanismList answers (rpc-client.c:397-417 of 0.24.1).
ALLOWED: Mapping[int, frozenset[int]] = {form: _NO_PARAMETERS[form] | frozenset(_LAYOUTS[form]) for form in (0, 1, 2)}


def _form(client_version: int) -> int:
    if not 0 <= client_version <= 255:
        raise ValueError(f"a protocol version byte is 0-255, not {client_version}")
    return client_version if client_version < 2 else 2


def client_allows(mechanism: int, *, client_version: int = 0) -> bool:
    """Whether a p11-kit client of that release can use ``mechanism`` at all."""
    return mechanism in ALLOWED[_form(client_version)]


# ---------------------------------------------------------------------------------------------
# readers: (data, offset) -> (value, new offset); every one checks before it reads

_Reader = Callable[[bytes, int], tuple[Any, int]]
_Writer = Callable[[Any], bytes]


def _short(what: str, off: int, need: int, data: bytes) -> ProtocolError:
    return ProtocolError(f"{what}: needs {need} bytes, {max(len(data) - off, 0)} left", off)


def _read_u32(data: bytes, off: int, what: str) -> int:
    if off + 4 > len(data):
        raise _short(what, off, 4, data)
    value: int = _U32.unpack_from(data, off)[0]
    return value


def _read_count(data: bytes, off: int, what: str, min_entry: int) -> int:
    """A u32 count at ``off``, checked against MAX_ARRAY and against the bytes that are left."""
    count = _read_u32(data, off, what)
    if count > MAX_ARRAY:
        raise ProtocolError(f"{what}: {count} entries exceed the cap of {MAX_ARRAY}", off)
    if count * min_entry > len(data) - off - 4:
        raise ProtocolError(f"{what}: {count} entries cannot fit in {len(data) - off - 4} bytes", off)
    return count


def _read_byte_array(data: bytes, off: int, what: str) -> tuple[bytes | None, int]:
    """p11_rpc_buffer_get_byte_array (rpc-message.c:745-779): u32 length, 0xFFFFFFFF = NULL."""
    if off + 4 > len(data):
        raise _short(what, off, 4, data)
    (n,) = _U32.unpack_from(data, off)
    if n == 0xFFFFFFFF:
        return None, off + 4
    if n >= _BYTE_ARRAY_LIMIT or n > MAX_BYTES:
        raise ProtocolError(f"{what}: a byte array of {n} bytes exceeds the cap", off)
    start = off + 4
    end = start + n
    if end > len(data):
        raise _short(what, start, n, data)
    return data[start:end], end


def _read_y(data: bytes, off: int) -> tuple[int, int]:
    if off >= len(data):
        raise _short("y", off, 1, data)
    return data[off], off + 1


def _read_u(data: bytes, off: int) -> tuple[int, int]:
    end = off + 8
    if end > len(data):
        raise _short("u", off, 8, data)
    value: int = _U64.unpack_from(data, off)[0]
    return value, end


def _read_v(data: bytes, off: int) -> tuple[tuple[int, int], int]:
    if off + 2 > len(data):
        raise _short("v", off, 2, data)
    return (data[off], data[off + 1]), off + 2


def _reader_s(size: int | None) -> _Reader:
    def read(data: bytes, off: int) -> tuple[bytes, int]:
        value, end = _read_byte_array(data, off, "s")
        if value is None or (size is not None and len(value) != size):
            got = "NULL" if value is None else f"{len(value)} bytes"
            raise ProtocolError(f"s: a space padded string of {size} bytes expected, got {got}", off)
        return value, end
    return read


def _read_z(data: bytes, off: int) -> tuple[bytes, int]:
    value, end = _read_byte_array(data, off, "z")
    return (b"" if value is None else value), end  # proto_read_null_string: NULL reads as ""


def _read_ay_request(data: bytes, off: int) -> tuple[bytes | None, int]:
    # proto_read_byte_array (rpc-server.c:111-143): valid 0 = NULL, its length is dropped
    if off + 5 > len(data):
        raise _short("ay", off, 5, data)
    if not data[off]:
        return None, off + 5
    return _read_byte_array(data, off + 1, "ay")


def _read_ay_reply(data: bytes, off: int) -> tuple[bytes | Length | None, int]:
    # proto_read_byte_array (rpc-client.c:297-340): valid 0 = "only the length"
    if off + 5 > len(data):
        raise _short("ay", off, 5, data)
    if not data[off]:
        return Length(_U32.unpack_from(data, off + 1)[0]), off + 5
    return _read_byte_array(data, off + 1, "ay")


def _read_fy(data: bytes, off: int) -> tuple[int | None, int]:
    # proto_read_byte_buffer (rpc-server.c:78-109; 0.25.0: 0xFFFFFFFF = a 0-length buffer).
    # A size, not data: not capped here (C_GenerateRandom's output is exactly this long);
    # the server caps what it allocates.
    n = _read_u32(data, off, "fy")
    return (None if n == 0 else 0 if n == 0xFFFFFFFF else n), off + 4


def _read_fu(data: bytes, off: int) -> tuple[int | None, int]:
    # proto_read_ulong_buffer (rpc-server.c:176-207): 0 = NULL, a count query. Clamped to
    # MAX_ARRAY, which changes nothing a server can answer: no au list may be longer.
    n = _read_u32(data, off, "fu")
    return (None if n == 0 else min(n, MAX_ARRAY)), off + 4


def _read_au(data: bytes, off: int) -> tuple[list[int] | Length, int]:
    # proto_read_ulong_array (rpc-client.c:349-393): u8 valid, u32 count, count x u64 if valid
    if off + 5 > len(data):
        raise _short("au", off, 5, data)
    if not data[off]:
        return Length(_U32.unpack_from(data, off + 1)[0]), off + 5
    count = _read_count(data, off + 1, "au", 8)
    start = off + 5
    return list(struct.unpack_from(f">{count}Q", data, start)), start + 8 * count


def _natural_length(kind: Kind, value: Any) -> int | None:
    if value is None:
        return None
    if kind == "bool":
        return 1
    if kind == "ulong":
        return _SIZEOF_CK_ULONG
    if kind == "mechanisms":
        return _SIZEOF_CK_ULONG * len(value)
    if kind == "template":
        return _SIZEOF_CK_ATTRIBUTE * len(value)
    return 1 if isinstance(value, bool) else len(value)


def _read_attributes(data: bytes, off: int, form: int, depth: int) -> tuple[list[Attribute], int]:
    count = _read_count(data, off, "aA", 5)  # the smallest entry: u32 type, u8 validity
    off += 4
    out: list[Attribute] = []
    for _ in range(count):
        attribute, off = _read_attribute(data, off, form, depth)
        out.append(attribute)
    return out, off


def _read_attribute(data: bytes, off: int, form: int, depth: int) -> tuple[Attribute, int]:
    """p11_rpc_buffer_get_attribute (rpc-message.c:1231-1275), value by kind_of."""
    if off + 5 > len(data):
        raise _short("attribute", off, 5, data)
    (atype,) = _U32.unpack_from(data, off)
    if not data[off + 4]:
        return Attribute(atype, None, valid=False), off + 5
    if off + 9 > len(data):
        raise _short(f"{name_of(atype)} length", off + 5, 4, data)
    (length,) = _U32.unpack_from(data, off + 5)
    off += 9
    kind = kind_of(atype, client_version=form)
    value: Any
    if kind == "bool":
        if off >= len(data):
            raise _short(name_of(atype), off, 1, data)
        value, off = data[off] != 0, off + 1
    elif kind == "ulong":
        if off + 8 > len(data):
            raise _short(name_of(atype), off, 8, data)
        value, off = _U64.unpack_from(data, off)[0], off + 8
    elif kind == "mechanisms":
        count = _read_count(data, off, name_of(atype), 8)
        value = tuple(struct.unpack_from(f">{count}Q", data, off + 4))
        off += 4 + 8 * count
    elif kind == "template":
        if depth >= MAX_DEPTH:
            raise ProtocolError(f"{name_of(atype)}: templates nested deeper than {MAX_DEPTH}", off)
        value, off = _read_attributes(data, off, form, depth + 1)
    else:
        start = off
        value, off = _read_byte_array(data, off, "attribute value")
        if kind == "date" and value is not None and len(value) not in (0, 8):
            # p11_rpc_buffer_get_date_value (rpc-message.c:1181-1208)
            raise ProtocolError(f"{name_of(atype)}: a date is 8 bytes or none, not {len(value)}", start)
    natural = _natural_length(kind, value)
    return Attribute(atype, value, True, None if natural == length else length), off


def _reader_aa(form: int) -> _Reader:
    def read(data: bytes, off: int) -> tuple[list[Attribute], int]:
        return _read_attributes(data, off, form, 0)
    return read


_ARRAY_ATTRIBUTES = frozenset({attrs.CKA_WRAP_TEMPLATE, attrs.CKA_UNWRAP_TEMPLATE, attrs.CKA_DERIVE_TEMPLATE})


def _read_fa(data: bytes, off: int, nested: bool, depth: int) -> tuple[list[tuple[int, int]], int]:
    """The fA list; ``nested``: 0.25.4+'s form, where a template entry carries its own list (discarded)."""
    count = _read_count(data, off, "fA", 8)
    off += 4
    out: list[tuple[int, int]] = []
    for _ in range(count):
        if off + 8 > len(data):
            raise _short("fA entry", off, 8, data)
        atype, length = _II.unpack_from(data, off)
        off += 8
        if nested and length and atype in _ARRAY_ATTRIBUTES:
            if depth >= MAX_DEPTH:
                raise ProtocolError(f"fA: {name_of(atype)} nested deeper than {MAX_DEPTH}", off)
            _, off = _read_fa(data, off, nested, depth + 1)
        out.append((atype, length))
    return out, off


def _reader_fa(form: int) -> _Reader:
    def read(data: bytes, off: int) -> tuple[list[tuple[int, int]], int]:
        if form != 1:
            return _read_fa(data, off, form == 2, 0)
        # 0.25.0-0.25.3 and 0.25.4-0.25.5 both send version 1; fA is the last item of the
        # only call that has one (C_GetAttributeValue), so the form that ends the message wins.
        flat, end = _read_fa(data, off, False, 0)
        if end == len(data) or not any(length and t in _ARRAY_ATTRIBUTES for t, length in flat):
            return flat, end
        return _read_fa(data, off, True, 0)
    return read


def _read_fields(layout: str, data: bytes, off: int) -> tuple[Fields, int]:
    values: list[int | bytes | None] = []
    for field_type in layout:
        if field_type == "q":
            value, off = _read_u(data, off)
            values.append(value)
        elif field_type == "y":
            value, off = _read_y(data, off)
            values.append(value)
        else:
            raw, off = _read_byte_array(data, off, "mechanism parameter")
            values.append(raw)
    return tuple(values), off


def _reader_m(form: int) -> _Reader:
    layouts = _LAYOUTS[form]
    no_parameters = _NO_PARAMETERS[form] if form == 2 else frozenset()

    def read(data: bytes, off: int) -> tuple[Mechanism | None, int]:
        mtype = _read_u32(data, off, "M")
        off += 4
        if mtype == NULL_MECHANISM:
            return None, off
        if form == 2:
            # p11_rpc_buffer_get_mechanism of 0.25.6+: nothing after a no-parameter type,
            # else u8 has_param (0: none) and then the serialiser
            if mtype in no_parameters:
                return Mechanism(mtype), off
            if off >= len(data):
                raise _short("M parameter flag", off, 1, data)
            off += 1
            if not data[off - 1]:
                return Mechanism(mtype), off
        layout = layouts.get(mtype)
        if layout is None or layout == "a":
            raw, off = _read_byte_array(data, off, "mechanism parameter")
            return Mechanism(mtype, raw), off
        if layout == "pss" or layout == "oaep":
            # p11_rpc_buffer_get_rsa_pkcs_{pss,oaep}_mechanism_value (rpc-message.c:1314-1414)
            if off + 24 > len(data):
                raise _short(f"{ckm_name(mtype)} parameter", off, 24, data)
            hash_alg, mgf, third = struct.unpack_from(">QQQ", data, off)
            off += 24
            if layout == "pss":
                return Mechanism(mtype, PSS(hash_alg, mgf, third)), off
            source_data, off = _read_byte_array(data, off, "OAEP source data")
            return Mechanism(mtype, OAEP(hash_alg, mgf, third, source_data)), off
        fields, off = _read_fields(layout, data, off)
        return Mechanism(mtype, fields), off
    return read


# ---------------------------------------------------------------------------------------------
# writers: value -> bytes


def _byte_array(value: bytes | None) -> bytes:
    if value is None:
        return _NULL_ARRAY
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"bytes expected, not {type(value).__name__}")
    if len(value) >= _BYTE_ARRAY_LIMIT or len(value) > MAX_BYTES:
        raise ValueError(f"a byte array of {len(value)} bytes exceeds the cap")
    return _U32.pack(len(value)) + value


def _write_y(value: int) -> bytes:
    return bytes((value,))


def _write_u(value: int) -> bytes:
    return _U64.pack(value)


def _write_v(value: tuple[int, int]) -> bytes:
    major, minor = value
    return bytes((major, minor))


def _writer_s(size: int | None) -> _Writer:
    def write(value: bytes) -> bytes:
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError(f"s: bytes expected (see pad()), not {type(value).__name__}")
        if size is not None and len(value) != size:
            raise ValueError(f"s: {size} bytes expected (see pad()), not {len(value)}")
        return _byte_array(value)
    return write


def _write_z(value: bytes) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or b"\0" in value:
        raise ValueError("z: bytes without NUL expected")
    return _byte_array(value)


def _writer_ay_request(form: int) -> _Writer:
    null = b"\x00\x00\x00\x00\x00" if form == 0 else b"\x01" + _NULL_ARRAY  # 506b941, 0.25.0

    def write(value: bytes | None) -> bytes:
        if value is None:
            return null
        if isinstance(value, Length):
            raise ValueError("ay: a Length travels only in replies")
        return b"\x01" + _byte_array(value)
    return write


def _write_ay_reply(value: bytes | Length | None) -> bytes:
    if isinstance(value, Length):
        return b"\x00" + _U32.pack(value.n)
    if value is None:
        return b"\x01" + _NULL_ARRAY
    return b"\x01" + _byte_array(value)


def _writer_fy(form: int) -> _Writer:
    zero = _U32.pack(0 if form == 0 else 0xFFFFFFFF)  # 0.24.1 cannot tell 0 from NULL

    def write(value: int | None) -> bytes:
        if value is None:
            return b"\x00\x00\x00\x00"
        if value == 0:
            return zero
        if not 0 < value < 0xFFFFFFFF:
            raise ValueError(f"fy: a buffer size below 0xFFFFFFFF, not {value}")
        return _U32.pack(value)
    return write


def _write_fu(value: int | None) -> bytes:
    return _U32.pack(0 if value is None else value)


def _write_au(value: Sequence[int] | Length | None) -> bytes:
    if value is None:
        value = Length(0)
    if isinstance(value, Length):
        return b"\x00" + _U32.pack(value.n)
    if len(value) > MAX_ARRAY:
        raise ValueError(f"au: {len(value)} entries exceed the cap of {MAX_ARRAY}")
    return b"\x01" + _U32.pack(len(value)) + struct.pack(f">{len(value)}Q", *value)


def _attribute_value(kind: Kind, a: Attribute, form: int, depth: int) -> bytes:
    """The value part of p11_rpc_buffer_add_attribute (rpc-message.c:1066-1071) for ``kind``."""
    value = a.value
    if value is None:  # a NULL pValue: the "NULL" form of the kind (rpc-message.c:900-1036)
        if kind == "bool":
            return b"\x00"
        if kind == "ulong":
            return b"\x00" * 8
        if kind in ("mechanisms", "template"):
            # count 0: p11-kit writes length/size entries and no values here, which its own
            # reader then over-reads (rpc-message.c:967-995 vs 1149-1179); 0.26 writes 0 too
            return b"\x00\x00\x00\x00"
        return _NULL_ARRAY
    if kind == "bool":
        if isinstance(value, (bytes, bytearray)) and len(value) == 1:
            return bytes(value)
        if not isinstance(value, int) or not 0 <= value <= 255:
            raise ValueError(f"{name_of(a.type)}: a bool, not {value!r}")
        return bytes((int(value),))
    if kind == "ulong":
        if not isinstance(value, int):
            raise ValueError(f"{name_of(a.type)}: an int, not {type(value).__name__}")
        return _U64.pack(value)
    if kind == "mechanisms":
        if not isinstance(value, (tuple, list)) or len(value) > MAX_ARRAY:
            raise ValueError(f"{name_of(a.type)}: up to {MAX_ARRAY} mechanism types expected")
        return _U32.pack(len(value)) + struct.pack(f">{len(value)}Q", *value)
    if kind == "template":
        if not isinstance(value, list):
            raise ValueError(f"{name_of(a.type)}: a list of Attribute expected")
        if depth >= MAX_DEPTH:
            raise ValueError(f"{name_of(a.type)}: templates nested deeper than {MAX_DEPTH}")
        return _write_attributes(value, form, depth + 1)
    if isinstance(value, bool):  # a CK_BBOOL that p11-kit carries as bytes (CKA_DESTROYABLE)
        value = bytes((value,))
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"{name_of(a.type)}: bytes expected, not {type(value).__name__}")
    if kind == "date" and len(value) not in (0, 8):
        raise ValueError(f"{name_of(a.type)}: a date is 8 bytes or none")
    return _byte_array(value)


def _write_attribute(a: Attribute, form: int, depth: int) -> bytes:
    if not isinstance(a, Attribute):
        raise ValueError(f"aA: Attribute expected, not {type(a).__name__}")
    head = _U32.pack(a.type)
    if not a.valid:
        return head + b"\x00"
    kind = kind_of(a.type, client_version=form)
    length = a.length
    if length is None:
        length = _natural_length(kind, a.value) or 0
    return head + b"\x01" + _U32.pack(length) + _attribute_value(kind, a, form, depth)


def _write_attributes(value: Sequence[Attribute], form: int, depth: int) -> bytes:
    if len(value) > MAX_ARRAY:
        raise ValueError(f"aA: {len(value)} attributes exceed the cap of {MAX_ARRAY}")
    return _U32.pack(len(value)) + b"".join(_write_attribute(a, form, depth) for a in value)


def _writer_aa(form: int) -> _Writer:
    def write(value: Sequence[Attribute]) -> bytes:
        return _write_attributes(value, form, 0)
    return write


def _write_fa(value: Sequence[tuple[Any, ...]], nested: bool, depth: int) -> bytes:
    if len(value) > MAX_ARRAY:
        raise ValueError(f"fA: {len(value)} entries exceed the cap of {MAX_ARRAY}")
    parts = [_U32.pack(len(value))]
    for entry in value:
        atype, length = entry[0], entry[1]
        parts.append(_II.pack(atype, length))
        if nested and length and atype in _ARRAY_ATTRIBUTES:
            if depth >= MAX_DEPTH:
                raise ValueError(f"fA: nested deeper than {MAX_DEPTH}")
            parts.append(_write_fa(entry[2] if len(entry) > 2 else (), nested, depth + 1))
    return b"".join(parts)


def _writer_fa(form: int) -> _Writer:
    def write(value: Sequence[tuple[Any, ...]]) -> bytes:
        # (type, length) entries; (type, length, nested entries) for a template on 0.25.4+
        nested = form == 2 or (form == 1 and any(len(e) > 2 for e in value))
        return _write_fa(value, nested, 0)
    return write


def _write_fields(layout: str, values: Sequence[Any]) -> bytes:
    if len(values) != len(layout):
        raise ValueError(f"mechanism parameter: {len(layout)} fields expected, not {len(values)}")
    parts = []
    for field_type, value in zip(layout, values):
        parts.append(_U64.pack(value) if field_type == "q" else bytes((value,)) if field_type == "y"
                     else _byte_array(value))
    return b"".join(parts)


def _writer_m(form: int) -> _Writer:
    layouts = _LAYOUTS[form]
    no_parameters = _NO_PARAMETERS[form] if form == 2 else frozenset()

    def write(value: Mechanism | None) -> bytes:
        if value is None:
            return _NULL_ARRAY
        if not isinstance(value, Mechanism):
            raise ValueError(f"M: Mechanism expected, not {type(value).__name__}")
        if not 0 <= value.type < NULL_MECHANISM:
            raise ValueError(f"M: mechanism type {value.type:#x} is not a u32 below 0xFFFFFFFF")
        head = _U32.pack(value.type)
        param = value.param
        layout = layouts.get(value.type)
        if form == 2:
            if value.type in no_parameters:
                if param is not None:
                    raise ValueError(f"M: {ckm_name(value.type)} carries no parameter on the wire")
                return head
            if param is None:
                return head + b"\x00"
            head += b"\x01"
        if layout is None or layout == "a":
            if not (param is None or isinstance(param, (bytes, bytearray))):
                raise ValueError(f"M: {ckm_name(value.type)} takes bytes, not {type(param).__name__}")
            return head + _byte_array(param)
        if layout == "pss":
            if not isinstance(param, PSS):
                raise ValueError(f"M: {ckm_name(value.type)} takes PSS parameters")
            return head + _write_fields("qqq", (param.hash, param.mgf, param.salt_length))
        if layout == "oaep":
            if not isinstance(param, OAEP):
                raise ValueError(f"M: {ckm_name(value.type)} takes OAEP parameters")
            return head + _write_fields("qqqa", (param.hash, param.mgf, param.source, param.source_data))
        if not isinstance(param, tuple):
            raise ValueError(f"M: {ckm_name(value.type)} takes a tuple of fields ({layout})")
        return head + _write_fields(layout, param)
    return write


def _write_p(value: bytes) -> bytes:
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError("P: the encoded parameter update, as bytes")
    return bytes(value)


# ---------------------------------------------------------------------------------------------
# compiling a signature into readers and writers, once per (call, direction, client form)

_FIXED = {"y": 1, "u": 8, "v": 2}


@dataclass(frozen=True, slots=True)
class _Codec:
    call: Call
    signature: bytes
    prefix: bytes            # call id, signature length, signature: the start of every message
    tokens: tuple[str, ...]
    readers: tuple[_Reader, ...]
    writers: tuple[_Writer, ...]


def _compile(call: Call, reply: bool, form: int) -> _Codec:
    signature = call.reply if reply else call.request
    tokens = _tokens(signature)
    sizes = iter(_SPACE_LENGTHS.get(call.name, ()))
    readers: list[_Reader] = []
    writers: list[_Writer] = []
    for index, token in enumerate(tokens):
        if token == "y":
            readers.append(_read_y)
            writers.append(_write_y)
        elif token == "u":
            readers.append(_read_u)
            writers.append(_write_u)
        elif token == "v":
            readers.append(_read_v)
            writers.append(_write_v)
        elif token == "s":
            size = next(sizes, None)
            readers.append(_reader_s(size))
            writers.append(_writer_s(size))
        elif token == "z":
            readers.append(_read_z)
            writers.append(_write_z)
        elif token == "ay":
            readers.append(_read_ay_reply if reply else _read_ay_request)
            writers.append(_write_ay_reply if reply else _writer_ay_request(form))
        elif token == "fy":
            readers.append(_read_fy)
            writers.append(_writer_fy(form))
        elif token == "au":
            readers.append(_read_au)
            writers.append(_write_au)
        elif token == "fu":
            readers.append(_read_fu)
            writers.append(_write_fu)
        elif token == "aA":
            readers.append(_reader_aa(form))
            writers.append(_writer_aa(form))
        elif token == "fA":
            readers.append(_reader_fa(form))
            writers.append(_writer_fa(form))
        elif token == "M":
            readers.append(_reader_m(form))
            writers.append(_writer_m(form))
        else:  # "P": its length depends on the request's mechanism; it takes all but the fixed tail
            tail = sum(_FIXED[t] for t in tokens[index + 1:])

            def read_p(data: bytes, off: int, tail: int = tail) -> tuple[bytes, int]:
                end = len(data) - tail
                if end < off:
                    raise _short("P", off, tail, data)
                return data[off:end], end
            readers.append(read_p)
            writers.append(_write_p)
    raw = signature.encode("ascii")
    return _Codec(call, raw, _II.pack(call.id, len(raw)) + raw, tokens, tuple(readers), tuple(writers))


_REQUESTS: tuple[tuple[_Codec, ...], ...] = tuple(
    tuple(_compile(call, False, form) for call in CALLS.values()) for form in (0, 1, 2))
_REPLIES: tuple[tuple[_Codec, ...], ...] = tuple(
    tuple(_compile(call, True, form) for call in CALLS.values()) for form in (0, 1, 2))


def _call(call: str | int) -> Call:
    found = BY_NAME.get(call) if isinstance(call, str) else CALLS.get(call)
    if found is None or found.id == 0:
        raise ValueError(f"no such call: {call!r}")
    return found


# ---------------------------------------------------------------------------------------------
# the API


def negotiate(client_byte: int) -> int:
    """The version byte to answer: ``min(client, PROTOCOL_MAX)``, as rpc-server.c:1979-2005 does."""
    if not 0 <= client_byte <= 255:
        raise ValueError(f"a version byte is 0-255, not {client_byte}")
    return min(client_byte, PROTOCOL_MAX)


def pad(text: str | bytes, size: int) -> bytes:
    """A CK_UTF8CHAR field of ``size`` bytes: UTF-8, space padded, cut at a character boundary."""
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if len(raw) > size:
        cut = size
        while cut > 0 and raw[cut] & 0xC0 == 0x80:  # do not split a multi-byte character
            cut -= 1
        raw = raw[:cut]
    return raw.ljust(size, b" ")


def parse_header(header: bytes) -> tuple[int, int, int]:
    """(code, options length, data length) of a 12-byte frame header.

    ProtocolError for code 0 (rpc-transport.c:415-418) and for a frame above MAX_FRAME:
    p11-kit allocates whatever a header announces (rpc-transport.c:423-428); this refuses first.
    """
    if len(header) != HEADER.size:
        raise ProtocolError(f"a frame header is {HEADER.size} bytes, not {len(header)}", 0)
    code, options_len, data_len = HEADER.unpack(header)
    if code == 0:
        raise ProtocolError("frame header with code 0", 0)
    if options_len + data_len > MAX_FRAME:
        raise ProtocolError(f"frame of {options_len + data_len} bytes exceeds the cap of {MAX_FRAME}", 4)
    return code, options_len, data_len


def encode_frame(code: int, data: bytes, options: bytes = b"") -> bytes:
    """Header, options, data. Replies carry no options (rpc-server.c:2036); requests ``b"client"``."""
    if not 0 < code <= 0xFFFFFFFF:
        raise ValueError(f"a frame code is 1-0xFFFFFFFF, not {code}")
    if len(options) + len(data) > MAX_FRAME:
        raise ValueError(f"frame of {len(options) + len(data)} bytes exceeds the cap of {MAX_FRAME}")
    return HEADER.pack(code, len(options), len(data)) + options + data


def _parse_values(codec: _Codec, data: bytes, off: int) -> tuple[Any, ...]:
    values = []
    for read in codec.readers:
        value, off = read(data, off)
        values.append(value)
    if off != len(data):
        raise ProtocolError(f"{codec.call.name}: {len(data) - off} trailing bytes", off)
    return tuple(values)


def _check_signature(codec: _Codec, data: bytes, sig_len: int) -> int:
    end = 8 + sig_len
    if sig_len != len(codec.signature) or data[8:end] != codec.signature:
        raise ProtocolError(f"{codec.call.name}: the signature does not match "
                            f"{codec.signature.decode()!r}", 4)
    return end


def parse_request(data: bytes, *, client_version: int = 0) -> Request:
    """A request's call and arguments. ``client_version``: the version byte the client sent.

    UnknownCall for call id 0 or beyond the table; ProtocolError for anything malformed,
    trailing bytes included.
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the cap of {MAX_FRAME}", 0)
    if len(data) < 4:
        raise _short("call id", 0, 4, data)
    (call_id,) = _U32.unpack_from(data, 0)
    if call_id == 0 or call_id > _LAST_ID:
        raise UnknownCall(call_id)
    if len(data) < 8:
        raise _short("signature length", 4, 4, data)
    codec = _REQUESTS[_form(client_version)][call_id]
    off = _check_signature(codec, data, _U32.unpack_from(data, 4)[0])
    return Request(codec.call, _parse_values(codec, data, off))


def _encode(codec: _Codec, values: tuple[Any, ...]) -> bytes:
    if len(values) != len(codec.writers):
        raise ValueError(f"{codec.call.name}: {len(codec.writers)} values for "
                         f"{codec.signature.decode()!r}, not {len(values)}")
    try:
        return codec.prefix + b"".join([write(value) for write, value in zip(codec.writers, values)])
    except (struct.error, TypeError, OverflowError) as error:
        raise ValueError(f"{codec.call.name}: {error}") from None


def encode_request(call: str | int, *args: Any, client_version: int = 0) -> bytes:
    """A request's data, as a p11-kit client of that version byte writes it."""
    return _encode(_REQUESTS[_form(client_version)][_call(call).id], args)


def encode_reply(call: str | int, *results: Any, client_version: int = 0) -> bytes:
    """A reply's data, by the call's reply signature (C_Sign: one ``ay``)."""
    return _encode(_REPLIES[_form(client_version)][_call(call).id], results)


_ERROR_PREFIX = _II.pack(0, 1) + b"u"


def encode_error(rv: int) -> bytes:
    """An error reply: call 0, signature "u", the CK_RV as u64 (rpc-server.c:1934-1943).

    p11-kit writes ``(uint32_t)rv``, and its client turns 0 into CKR_DEVICE_ERROR
    (rpc-client.c:150-153), so rv must be 1-0xFFFFFFFF.
    """
    if not 0 < rv <= 0xFFFFFFFF:
        raise ValueError(f"an error reply carries a CK_RV of 1-0xFFFFFFFF, not {rv}")
    return _ERROR_PREFIX + _U64.pack(rv)


def parse_reply(call: str | int, data: bytes, *, client_version: int = 0) -> tuple[Any, ...]:
    """The results of a reply to ``call``. ErrorReply for an error reply, ProtocolError if malformed."""
    expected = _call(call)
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) < 8:
        raise _short("call id and signature length", 0, 8, data)
    call_id, sig_len = _II.unpack_from(data, 0)
    if call_id == 0:
        if sig_len != 1 or data[8:9] != b"u":
            raise ProtocolError("error reply: the signature is not 'u'", 4)
        if len(data) != 17:
            raise ProtocolError(f"error reply of {len(data)} bytes, not 17", 9)
        (rv,) = _U64.unpack_from(data, 9)
        if rv == 0:
            raise ProtocolError("error reply with CK_RV 0", 9)
        raise ErrorReply(rv)
    if call_id != expected.id:
        raise ProtocolError(f"reply for call id {call_id}, expected {expected.id} ({expected.name})", 0)
    codec = _REPLIES[_form(client_version)][call_id]
    return _parse_values(codec, data, _check_signature(codec, data, sig_len))


# ---------------------------------------------------------------------------------------------
# logging

_SHOWN_VALUES = frozenset({attrs.CKA_LABEL, attrs.CKA_ID})  # public, and what an operator looks for


def _show_attribute(a: Attribute, secret: bool, depth: int = 0) -> str:
    name = name_of(a.type)
    if not a.valid:
        return f"{name}=<invalid>"
    value = a.value
    if value is None:
        return f"{name}=<NULL, {a.length or 0}>"
    if isinstance(value, bool):
        return f"{name}={value}"
    if isinstance(value, int):
        return f"{name}={ckm_name(value) if a.type == attrs.CKA_KEY_GEN_MECHANISM else value}"
    if isinstance(value, tuple):
        return f"{name}=[{', '.join(ckm_name(v) for v in value[:8])}{', ...' if len(value) > 8 else ''}]"
    if isinstance(value, list):
        return f"{name}={_show_template(value, secret, depth + 1)}"
    if not secret and a.type in _SHOWN_VALUES and len(value) <= 64:
        return f"{name}={value.hex() if a.type == attrs.CKA_ID else repr(value.decode('utf-8', 'replace'))}"
    return f"{name}=<{len(value)} bytes>"


def _show_template(template: Sequence[Attribute], secret: bool, depth: int = 0) -> str:
    if depth > MAX_DEPTH:
        return "[...]"
    shown = [_show_attribute(a, secret, depth) for a in template[:16]]
    return "[" + ", ".join(shown) + (f", ... {len(template) - 16} more" if len(template) > 16 else "") + "]"


def _show_mechanism(m: Mechanism | None) -> str:
    if m is None:
        return "NULL"
    name = ckm_name(m.type)
    param = m.param
    if param is None:
        return name
    if isinstance(param, PSS):
        return (f"{name}(hash={HASH_BY_CKM.get(param.hash, hex(param.hash))}, "
                f"mgf=MGF1_{HASH_BY_MGF.get(param.mgf, hex(param.mgf))}, salt={param.salt_length})")
    if isinstance(param, OAEP):
        label = "NULL" if param.source_data is None else f"<{len(param.source_data)} bytes>"
        return (f"{name}(hash={HASH_BY_CKM.get(param.hash, hex(param.hash))}, "
                f"mgf=MGF1_{HASH_BY_MGF.get(param.mgf, hex(param.mgf))}, label={label})")
    if isinstance(param, tuple):
        return f"{name}({', '.join(f'<{len(v)} bytes>' if isinstance(v, bytes) else str(v) for v in param)})"
    return f"{name}(<{len(param)} bytes>)"


def _show(token: str, name: str, value: Any, secret: bool) -> str:
    if value is None:
        return "NULL"
    if token in ("ay", "s", "z", "P"):
        if isinstance(value, Length):
            return f"<length {value.n}>"
        if token == "z" and not secret and len(value) <= 64:
            return repr(value.decode("utf-8", "replace"))
        return f"<{len(value)} bytes>"
    if token == "u" and name == "mechanism":
        return ckm_name(value)
    if token == "v":
        return f"{value[0]}.{value[1]}"
    if token == "M":
        return _show_mechanism(value)
    if token == "aA":
        return _show_template(value, secret)
    if token == "fA":
        shown = [f"{name_of(t)}({n})" for t, n in value[:16]]
        return "[" + ", ".join(shown) + (f", ... {len(value) - 16} more" if len(value) > 16 else "") + "]"
    if token == "au" and isinstance(value, list):
        return f"<{len(value)} handles>"
    return str(value)


def describe(request: Request) -> str:
    """One log line, ``C_Login(session=1, user=1, pin=<4 bytes>)``: never an argument's bytes.

    Byte arrays show as their length, templates as attribute names with their numbers and flags
    (CKA_LABEL's text and CKA_ID in hex as well, except in :data:`SECRET_CALLS`), so no PIN and
    no key material reaches a log.
    """
    call = request.call
    secret = call.name in SECRET_CALLS
    tokens = _tokens(call.request)
    names = _ARG_NAMES.get(call.id, ())
    parts = []
    for index, (token, value) in enumerate(zip(tokens, request.args)):
        name = names[index] if index < len(names) else f"arg{index}"
        parts.append(f"{name}={_show(token, name, value, secret)}")
    return f"{call.name}({', '.join(parts)})"
