"""Mechanisms as names and parameters the runtime passes through, independent of any PKCS#11 library.

A key object (:mod:`hsmfsm.keys`) asks for ``"RSA_PKCS_PSS"`` with a
:class:`PSSParams`; the edge (:class:`hsmfsm.p11.P11Module`, or the scripted
module) turns that into its own library's values. Pure data.

:data:`CKM` numbers the mechanisms by name, so the RPC codec
(:mod:`hsmfsm.rpc.wire`) and its logs can speak of them without python-pkcs11:
every member of python-pkcs11's ``pkcs11.Mechanism`` (0.10, the names it marks
deprecated with a leading underscore listed without it, so ``"MD5"``), plus the
ones p11-kit's client allow-lists name that python-pkcs11 does not
(``mechanism_has_no_parameters`` and ``p11_rpc_mechanism_serializers`` in
``rpc-message.c`` of 0.24.1, 0.25.5 and 0.26.4: SHA512_224 ..., and IBM's vendor
mechanisms), plus PKCS#11 3.0's EC_MONTGOMERY_KEY_PAIR_GEN and XEDDSA.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: Hash names as PKCS#11 spells the mechanism (CKM_SHA256 ...) and cryptography the algorithm.
HASHES: tuple[str, ...] = ("SHA1", "SHA224", "SHA256", "SHA384", "SHA512")


@dataclass(frozen=True, slots=True)
class PSSParams:
    """CK_RSA_PKCS_PSS_PARAMS: the hash, the mask generation function's hash, the salt length."""

    hash: str
    mgf: str
    salt_length: int


@dataclass(frozen=True, slots=True)
class OAEPParams:
    """CK_RSA_PKCS_OAEP_PARAMS: the hash, the mask generation function's hash, the label (or None)."""

    hash: str
    mgf: str
    label: bytes | None = None


#: Mechanism numbers by name, without the ``CKM_`` prefix, ordered by value.
CKM: Mapping[str, int] = {
    "RSA_PKCS_KEY_PAIR_GEN": 0x0, "RSA_PKCS": 0x1, "RSA_9796": 0x2, "RSA_X_509": 0x3, "MD2_RSA_PKCS": 0x4,
    "MD5_RSA_PKCS": 0x5, "SHA1_RSA_PKCS": 0x6, "RIPEMD128_RSA_PKCS": 0x7, "RIPEMD160_RSA_PKCS": 0x8,
    "RSA_PKCS_OAEP": 0x9, "RSA_X9_31_KEY_PAIR_GEN": 0xA, "RSA_X9_31": 0xB, "SHA1_RSA_X9_31": 0xC,
    "RSA_PKCS_PSS": 0xD, "SHA1_RSA_PKCS_PSS": 0xE, "ML_KEM_KEY_PAIR_GEN": 0xF, "DSA_KEY_PAIR_GEN": 0x10,
    "DSA": 0x11, "DSA_SHA1": 0x12, "DSA_SHA224": 0x13, "DSA_SHA256": 0x14, "DSA_SHA384": 0x15, "DSA_SHA512": 0x16,
    "ML_KEM": 0x17, "ML_DSA_KEY_PAIR_GEN": 0x1C, "ML_DSA": 0x1D, "DH_PKCS_KEY_PAIR_GEN": 0x20,
    "DH_PKCS_DERIVE": 0x21, "X9_42_DH_KEY_PAIR_GEN": 0x30, "X9_42_DH_DERIVE": 0x31, "X9_42_DH_HYBRID_DERIVE": 0x32,
    "X9_42_MQV_DERIVE": 0x33, "SHA256_RSA_PKCS": 0x40, "SHA384_RSA_PKCS": 0x41, "SHA512_RSA_PKCS": 0x42,
    "SHA256_RSA_PKCS_PSS": 0x43, "SHA384_RSA_PKCS_PSS": 0x44, "SHA512_RSA_PKCS_PSS": 0x45, "SHA224_RSA_PKCS": 0x46,
    "SHA224_RSA_PKCS_PSS": 0x47, "SHA512_224": 0x48, "SHA512_224_HMAC": 0x49, "SHA512_224_HMAC_GENERAL": 0x4A,
    "SHA512_224_KEY_DERIVATION": 0x4B, "SHA512_256": 0x4C, "SHA512_256_HMAC": 0x4D, "SHA512_256_HMAC_GENERAL": 0x4E,
    "SHA512_256_KEY_DERIVATION": 0x4F, "SHA512_T": 0x50, "SHA512_T_HMAC": 0x51, "SHA512_T_KEY_DERIVATION": 0x53,
    "SHA3_256_RSA_PKCS": 0x60, "SHA3_384_RSA_PKCS": 0x61, "SHA3_512_RSA_PKCS": 0x62, "SHA3_256_RSA_PKCS_PSS": 0x63,
    "SHA3_384_RSA_PKCS_PSS": 0x64, "SHA3_512_RSA_PKCS_PSS": 0x65, "SHA3_224_RSA_PKCS": 0x66,
    "SHA3_224_RSA_PKCS_PSS": 0x67, "RC2_KEY_GEN": 0x100, "RC2_ECB": 0x101, "RC2_CBC": 0x102, "RC2_MAC": 0x103,
    "RC2_MAC_GENERAL": 0x104, "RC2_CBC_PAD": 0x105, "RC4_KEY_GEN": 0x110, "RC4": 0x111, "DES_KEY_GEN": 0x120,
    "DES_ECB": 0x121, "DES_CBC": 0x122, "DES_MAC": 0x123, "DES_MAC_GENERAL": 0x124, "DES_CBC_PAD": 0x125,
    "DES2_KEY_GEN": 0x130, "DES3_KEY_GEN": 0x131, "DES3_ECB": 0x132, "DES3_CBC": 0x133, "DES3_MAC": 0x134,
    "DES3_MAC_GENERAL": 0x135, "DES3_CBC_PAD": 0x136, "DES3_CMAC_GENERAL": 0x137, "DES3_CMAC": 0x138,
    "CDMF_KEY_GEN": 0x140, "CDMF_ECB": 0x141, "CDMF_CBC": 0x142, "CDMF_MAC": 0x143, "CDMF_MAC_GENERAL": 0x144,
    "CDMF_CBC_PAD": 0x145, "DES_OFB64": 0x150, "DES_OFB8": 0x151, "DES_CFB64": 0x152, "DES_CFB8": 0x153,
    "MD2": 0x200, "MD2_HMAC": 0x201, "MD2_HMAC_GENERAL": 0x202, "MD5": 0x210, "MD5_HMAC": 0x211,
    "MD5_HMAC_GENERAL": 0x212, "SHA_1": 0x220, "SHA_1_HMAC": 0x221, "SHA_1_HMAC_GENERAL": 0x222, "RIPEMD128": 0x230,
    "RIPEMD128_HMAC": 0x231, "RIPEMD128_HMAC_GENERAL": 0x232, "RIPEMD160": 0x240, "RIPEMD160_HMAC": 0x241,
    "RIPEMD160_HMAC_GENERAL": 0x242, "SHA256": 0x250, "SHA256_HMAC": 0x251, "SHA256_HMAC_GENERAL": 0x252,
    "SHA224": 0x255, "SHA224_HMAC": 0x256, "SHA224_HMAC_GENERAL": 0x257, "SHA384": 0x260, "SHA384_HMAC": 0x261,
    "SHA384_HMAC_GENERAL": 0x262, "SHA512": 0x270, "SHA512_HMAC": 0x271, "SHA512_HMAC_GENERAL": 0x272,
    "SECURID_KEY_GEN": 0x280, "SECURID": 0x282, "HOTP_KEY_GEN": 0x290, "HOTP": 0x291, "ACTI": 0x2A0,
    "ACTI_KEY_GEN": 0x2A1, "SHA3_256": 0x2B0, "SHA3_256_HMAC": 0x2B1, "SHA3_256_HMAC_GENERAL": 0x2B2,
    "SHA3_256_KEY_GEN": 0x2B3, "SHA3_224": 0x2B5, "SHA3_224_HMAC": 0x2B6, "SHA3_224_HMAC_GENERAL": 0x2B7,
    "SHA3_224_KEY_GEN": 0x2B8, "SHA3_384": 0x2C0, "SHA3_384_HMAC": 0x2C1, "SHA3_384_HMAC_GENERAL": 0x2C2,
    "SHA3_384_KEY_GEN": 0x2C3, "SHA3_512": 0x2D0, "SHA3_512_HMAC": 0x2D1, "SHA3_512_HMAC_GENERAL": 0x2D2,
    "SHA3_512_KEY_GEN": 0x2D3, "CAST_KEY_GEN": 0x300, "CAST_ECB": 0x301, "CAST_CBC": 0x302, "CAST_MAC": 0x303,
    "CAST_MAC_GENERAL": 0x304, "CAST_CBC_PAD": 0x305, "CAST3_KEY_GEN": 0x310, "CAST3_ECB": 0x311,
    "CAST3_CBC": 0x312, "CAST3_MAC": 0x313, "CAST3_MAC_GENERAL": 0x314, "CAST3_CBC_PAD": 0x315,
    "CAST5_KEY_GEN": 0x320, "CAST5_ECB": 0x321, "CAST5_CBC": 0x322, "CAST5_MAC": 0x323, "CAST5_MAC_GENERAL": 0x324,
    "CAST5_CBC_PAD": 0x325, "RC5_KEY_GEN": 0x330, "RC5_ECB": 0x331, "RC5_CBC": 0x332, "RC5_MAC": 0x333,
    "RC5_MAC_GENERAL": 0x334, "RC5_CBC_PAD": 0x335, "IDEA_KEY_GEN": 0x340, "IDEA_ECB": 0x341, "IDEA_CBC": 0x342,
    "IDEA_MAC": 0x343, "IDEA_MAC_GENERAL": 0x344, "IDEA_CBC_PAD": 0x345, "GENERIC_SECRET_KEY_GEN": 0x350,
    "CONCATENATE_BASE_AND_KEY": 0x360, "CONCATENATE_BASE_AND_DATA": 0x362, "CONCATENATE_DATA_AND_BASE": 0x363,
    "XOR_BASE_AND_DATA": 0x364, "EXTRACT_KEY_FROM_KEY": 0x365, "SSL3_PRE_MASTER_KEY_GEN": 0x370,
    "SSL3_MASTER_KEY_DERIVE": 0x371, "SSL3_KEY_AND_MAC_DERIVE": 0x372, "SSL3_MASTER_KEY_DERIVE_DH": 0x373,
    "TLS_PRE_MASTER_KEY_GEN": 0x374, "TLS_MASTER_KEY_DERIVE": 0x375, "TLS_KEY_AND_MAC_DERIVE": 0x376,
    "TLS_MASTER_KEY_DERIVE_DH": 0x377, "TLS_PRF": 0x378, "SSL3_MD5_MAC": 0x380, "SSL3_SHA1_MAC": 0x381,
    "MD5_KEY_DERIVATION": 0x390, "MD2_KEY_DERIVATION": 0x391, "SHA1_KEY_DERIVATION": 0x392,
    "SHA256_KEY_DERIVATION": 0x393, "SHA384_KEY_DERIVATION": 0x394, "SHA512_KEY_DERIVATION": 0x395,
    "SHA224_KEY_DERIVATION": 0x396, "SHA3_256_KEY_DERIVATION": 0x397, "SHA3_224_KEY_DERIVATION": 0x398,
    "SHA3_384_KEY_DERIVATION": 0x399, "SHA3_512_KEY_DERIVATION": 0x39A, "SHAKE_128_KEY_DERIVATION": 0x39B,
    "SHAKE_256_KEY_DERIVATION": 0x39C, "PBE_MD2_DES_CBC": 0x3A0, "PBE_MD5_DES_CBC": 0x3A1,
    "PBE_MD5_CAST_CBC": 0x3A2, "PBE_MD5_CAST3_CBC": 0x3A3, "PBE_MD5_CAST5_CBC": 0x3A4, "PBE_SHA1_CAST5_CBC": 0x3A5,
    "PBE_SHA1_RC4_128": 0x3A6, "PBE_SHA1_RC4_40": 0x3A7, "PBE_SHA1_DES3_EDE_CBC": 0x3A8,
    "PBE_SHA1_DES2_EDE_CBC": 0x3A9, "PBE_SHA1_RC2_128_CBC": 0x3AA, "PBE_SHA1_RC2_40_CBC": 0x3AB,
    "PKCS5_PBKD2": 0x3B0, "PBA_SHA1_WITH_SHA1_HMAC": 0x3C0, "WTLS_PRE_MASTER_KEY_GEN": 0x3D0,
    "WTLS_MASTER_KEY_DERIVE": 0x3D1, "WTLS_MASTER_KEY_DERIVE_DH_ECC": 0x3D2, "WTLS_PRF": 0x3D3,
    "WTLS_SERVER_KEY_AND_MAC_DERIVE": 0x3D4, "WTLS_CLIENT_KEY_AND_MAC_DERIVE": 0x3D5, "KEY_WRAP_LYNKS": 0x400,
    "KEY_WRAP_SET_OAEP": 0x401, "CMS_SIG": 0x500, "KIP_DERIVE": 0x510, "KIP_WRAP": 0x511, "KIP_MAC": 0x512,
    "CAMELLIA_KEY_GEN": 0x550, "CAMELLIA_ECB": 0x551, "CAMELLIA_CBC": 0x552, "CAMELLIA_MAC": 0x553,
    "CAMELLIA_MAC_GENERAL": 0x554, "CAMELLIA_CBC_PAD": 0x555, "CAMELLIA_ECB_ENCRYPT_DATA": 0x556,
    "CAMELLIA_CBC_ENCRYPT_DATA": 0x557, "CAMELLIA_CTR": 0x558, "ARIA_KEY_GEN": 0x560, "ARIA_ECB": 0x561,
    "ARIA_CBC": 0x562, "ARIA_MAC": 0x563, "ARIA_MAC_GENERAL": 0x564, "ARIA_CBC_PAD": 0x565,
    "ARIA_ECB_ENCRYPT_DATA": 0x566, "ARIA_CBC_ENCRYPT_DATA": 0x567, "SEED_KEY_GEN": 0x650, "SEED_ECB": 0x651,
    "SEED_CBC": 0x652, "SEED_MAC": 0x653, "SEED_MAC_GENERAL": 0x654, "SEED_CBC_PAD": 0x655,
    "SEED_ECB_ENCRYPT_DATA": 0x656, "SEED_CBC_ENCRYPT_DATA": 0x657, "SKIPJACK_KEY_GEN": 0x1000,
    "SKIPJACK_ECB64": 0x1001, "SKIPJACK_CBC64": 0x1002, "SKIPJACK_OFB64": 0x1003, "SKIPJACK_CFB64": 0x1004,
    "SKIPJACK_CFB32": 0x1005, "SKIPJACK_CFB16": 0x1006, "SKIPJACK_CFB8": 0x1007, "SKIPJACK_WRAP": 0x1008,
    "SKIPJACK_PRIVATE_WRAP": 0x1009, "SKIPJACK_RELAYX": 0x100A, "KEA_KEY_PAIR_GEN": 0x1010,
    "KEA_KEY_DERIVE": 0x1011, "FORTEZZA_TIMESTAMP": 0x1020, "BATON_KEY_GEN": 0x1030, "BATON_ECB128": 0x1031,
    "BATON_ECB96": 0x1032, "BATON_CBC128": 0x1033, "BATON_COUNTER": 0x1034, "BATON_SHUFFLE": 0x1035,
    "BATON_WRAP": 0x1036, "EC_KEY_PAIR_GEN": 0x1040, "ECDSA": 0x1041, "ECDSA_SHA1": 0x1042, "ECDSA_SHA224": 0x1043,
    "ECDSA_SHA256": 0x1044, "ECDSA_SHA384": 0x1045, "ECDSA_SHA512": 0x1046, "ECDH1_DERIVE": 0x1050,
    "ECDH1_COFACTOR_DERIVE": 0x1051, "ECMQV_DERIVE": 0x1052, "EC_EDWARDS_KEY_PAIR_GEN": 0x1055,
    "EC_MONTGOMERY_KEY_PAIR_GEN": 0x1056, "EDDSA": 0x1057, "XEDDSA": 0x1058, "JUNIPER_KEY_GEN": 0x1060,
    "JUNIPER_ECB128": 0x1061, "JUNIPER_CBC128": 0x1062, "JUNIPER_COUNTER": 0x1063, "JUNIPER_SHUFFLE": 0x1064,
    "JUNIPER_WRAP": 0x1065, "FASTHASH": 0x1070, "AES_KEY_GEN": 0x1080, "AES_ECB": 0x1081, "AES_CBC": 0x1082,
    "AES_MAC": 0x1083, "AES_MAC_GENERAL": 0x1084, "AES_CBC_PAD": 0x1085, "AES_CTR": 0x1086, "AES_GCM": 0x1087,
    "AES_CCM": 0x1088, "AES_CTS": 0x1089, "AES_CMAC": 0x108A, "AES_CMAC_GENERAL": 0x108B, "AES_XCBC_MAC": 0x108C,
    "AES_XCBC_MAC_96": 0x108D, "AES_GMAC": 0x108E, "BLOWFISH_KEY_GEN": 0x1090, "BLOWFISH_CBC": 0x1091,
    "TWOFISH_KEY_GEN": 0x1092, "TWOFISH_CBC": 0x1093, "BLOWFISH_CBC_PAD": 0x1094, "TWOFISH_CBC_PAD": 0x1095,
    "DES_ECB_ENCRYPT_DATA": 0x1100, "DES_CBC_ENCRYPT_DATA": 0x1101, "DES3_ECB_ENCRYPT_DATA": 0x1102,
    "DES3_CBC_ENCRYPT_DATA": 0x1103, "AES_ECB_ENCRYPT_DATA": 0x1104, "AES_CBC_ENCRYPT_DATA": 0x1105,
    "GOSTR3410_KEY_PAIR_GEN": 0x1200, "GOSTR3410": 0x1201, "GOSTR3410_WITH_GOSTR3411": 0x1202,
    "GOSTR3410_KEY_WRAP": 0x1203, "GOSTR3410_DERIVE": 0x1204, "GOSTR3411": 0x1210, "GOSTR3411_HMAC": 0x1211,
    "GOST28147_KEY_GEN": 0x1220, "GOST28147_ECB": 0x1221, "GOST28147": 0x1222, "GOST28147_MAC": 0x1223,
    "GOST28147_KEY_WRAP": 0x1224, "DSA_PARAMETER_GEN": 0x2000, "DH_PKCS_PARAMETER_GEN": 0x2001,
    "X9_42_DH_PARAMETER_GEN": 0x2002, "AES_OFB": 0x2104, "AES_CFB64": 0x2105, "AES_CFB8": 0x2106,
    "AES_CFB128": 0x2107, "AES_CFB1": 0x2108, "AES_KEY_WRAP": 0x2109, "AES_KEY_WRAP_PAD": 0x210A,
    "AES_KEY_WRAP_KWP": 0x210B, "AES_KEY_WRAP_PKCS7": 0x210C, "RSA_PKCS_TPM_1_1": 0x4001,
    "RSA_PKCS_OAEP_TPM_1_1": 0x4002, "IBM_SHA3_224": 0x80010001, "IBM_SHA3_256": 0x80010002,
    "IBM_SHA3_384": 0x80010003, "IBM_SHA3_512": 0x80010004, "IBM_CMAC": 0x80010007, "IBM_EC_X25519": 0x8001001B,
    "IBM_ED25519_SHA512": 0x8001001C, "IBM_EC_X448": 0x8001001E, "IBM_ED448_SHA3": 0x8001001F,
    "IBM_DILITHIUM": 0x80010023, "IBM_KYBER": 0x80010024, "IBM_SHA3_224_HMAC": 0x80010025,
    "IBM_SHA3_256_HMAC": 0x80010026, "IBM_SHA3_384_HMAC": 0x80010027, "IBM_SHA3_512_HMAC": 0x80010028,
    "IBM_ECDSA_OTHER": 0x80010031, "IBM_ATTRIBUTEBOUND_WRAP": 0x80020004, "IBM_BTC_DERIVE": 0x80070001,
}
#: p11-kit's spellings where python-pkcs11 uses another name for the same number.
_ALIASES: Mapping[str, int] = {"CAST128_KEY_GEN": 0x320, "CAST128_ECB": 0x321, "ECDSA_KEY_PAIR_GEN": 0x1040}
_BY_VALUE: Mapping[int, str] = {value: name for name, value in reversed(list(CKM.items()))}
_BY_NAME: Mapping[str, int] = {**CKM, **_ALIASES}


def ckm_name(value: int) -> str:
    """The mechanism's name without ``CKM_`` (``"ECDSA"``), or ``"0x%08X"`` for an unknown number."""
    name = _BY_VALUE.get(value)
    return name if name is not None else f"0x{value:08X}"


def ckm_value(name: str) -> int:
    """The number of ``name``: ``"ECDSA"``, ``"CKM_ECDSA"``, ``"ecdsa"`` or ``"0x1041"``.

    ValueError for anything else, so that a typo in a configuration fails loudly.
    """
    text = name.strip()
    if text[:2].lower() == "0x":
        try:
            value = int(text, 16)
        except ValueError:
            raise ValueError(f"not a mechanism number: {name!r}") from None
        if not 0 <= value <= 0xFFFFFFFFFFFFFFFF:
            raise ValueError(f"mechanism number out of range: {name!r}")
        return value
    key = text.upper()
    if key.startswith("CKM_"):
        key = key[4:]
    found = _BY_NAME.get(key)
    if found is None and key.startswith("_"):  # python-pkcs11's deprecated spelling, "_MD5"
        found = _BY_NAME.get(key.lstrip("_"))
    if found is None:
        raise ValueError(f"unknown mechanism: {name!r}")
    return found


#: The digest a digest mechanism computes (CKM_SHA_1 ... CKM_SHA512), as :data:`HASHES` names it.
HASH_BY_CKM: Mapping[int, str] = {0x220: "SHA1", 0x255: "SHA224", 0x250: "SHA256", 0x260: "SHA384", 0x270: "SHA512"}
CKM_BY_HASH: Mapping[str, int] = {name: value for value, name in HASH_BY_CKM.items()}
#: The digest of an MGF1 mask generation function (CKG_MGF1_SHA1 = 1 ... CKG_MGF1_SHA224 = 5).
HASH_BY_MGF: Mapping[int, str] = {1: "SHA1", 2: "SHA256", 3: "SHA384", 4: "SHA512", 5: "SHA224"}
MGF_BY_HASH: Mapping[str, int] = {name: value for value, name in HASH_BY_MGF.items()}


#: ECDSA curves by the OID of CKA_EC_PARAMS (namedCurve): the byte size of r and of s (PKCS#11
#: signs r || s, each as long as the curve's order).
EC_SIGNATURE_HALF: Mapping[str, int] = {
    "1.2.840.10045.3.1.1": 24,  # P-192
    "1.3.132.0.33": 28,  # P-224
    "1.2.840.10045.3.1.7": 32,  # P-256
    "1.3.132.0.10": 32,  # secp256k1
    "1.3.132.0.34": 48,  # P-384
    "1.3.132.0.35": 66,  # P-521
    "1.3.36.3.3.2.8.1.1.7": 32,  # brainpoolP256r1
    "1.3.36.3.3.2.8.1.1.11": 48,  # brainpoolP384r1
    "1.3.36.3.3.2.8.1.1.13": 64,  # brainpoolP512r1
}
#: EdDSA signature sizes by curve: the OID of CKA_EC_PARAMS, or the curve's name (PKCS#11 3.0
#: allows a PrintableString there).
EDDSA_SIGNATURE: Mapping[str, int] = {"1.3.101.112": 64, "1.3.101.113": 114, "edwards25519": 64, "edwards448": 114}


def _der_oid_or_name(der: bytes) -> str | None:
    """CKA_EC_PARAMS as dotted OID (an OBJECT IDENTIFIER) or text (a PrintableString); None for
    anything else (explicit curve parameters)."""
    if len(der) < 2 or der[1] & 0x80 or der[1] != len(der) - 2:
        return None
    body = der[2:]
    if der[0] == 0x13:  # PrintableString
        return body.decode("ascii", "replace")
    if der[0] != 0x06 or not body:
        return None
    parts = [body[0] // 40, body[0] % 40] if body[0] < 80 else [2, body[0] - 80]
    value = 0
    for byte in body[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    return ".".join(str(p) for p in parts)


def signature_length(key_type: str, *, modulus_bytes: int | None = None, ec_params: bytes | None = None) -> int | None:
    """The length of a signature by a key of ``key_type`` (``"RSA"``, ``"EC"``, ``"EC_EDWARDS"``), as
    its attributes give it: an RSA key's CKA_MODULUS length; twice an ECDSA curve's order size; 64 or
    114 bytes for Ed25519 or Ed448. None when the attributes do not say (a curve not listed here, a
    key type without a fixed length): the caller then asks the token (a C_Sign length query).

    This is what lets a signature take two round trips (C_SignInit, C_Sign into a buffer of this
    size) rather than three: python-pkcs11 asks the length of every signature first.
    """
    if key_type == "RSA":
        return modulus_bytes or None
    if ec_params is None:
        return None
    curve = _der_oid_or_name(ec_params)
    if curve is None:
        return None
    if key_type == "EC":
        half = EC_SIGNATURE_HALF.get(curve)
        return None if half is None else 2 * half
    if key_type == "EC_EDWARDS":
        return EDDSA_SIGNATURE.get(curve)
    return None
