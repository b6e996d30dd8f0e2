"""A cryptography public key from what a token reports: PKCS#11 attributes, or a certificate.

A bound key needs its public half once, at construction (it is cached: see
:mod:`hsmfsm.keys.private_keys`). The runtime reads the public key object's
attributes from a member and hands them here; modules differ in how they spell
them, so this accepts each form seen in the field:

* ``CKA_EC_PARAMS``: the DER of the curve's OID (the standard), a DER
  PrintableString curve name (``edwards25519``: some modules, and the PKCS#11 3.0
  text, for Edwards curves), or a curve given by name.
* ``CKA_EC_POINT``: a DER OCTET STRING around the point (the standard), or the bare
  point (some modules, and every Edwards-key module that predates 3.0). The two
  have different lengths for every curve, so the length decides, never a guess.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from . import der
from .errors import UnsupportedRequest
from .private_keys import PublicKey

#: CKK_* values (PKCS#11 3.0 section 4.8) of the key types read here.
_KEY_TYPES: dict[int, str] = {0x0: "RSA", 0x3: "EC", 0x40: "EC_EDWARDS"}
#: Key type names other spellings come down to (CKK_ECDSA is CKK_EC's old name).
_KEY_TYPE_ALIASES: dict[str, str] = {"RSA": "RSA", "EC": "EC", "ECDSA": "EC", "EC_EDWARDS": "EC_EDWARDS",
                                     "EDWARDS": "EC_EDWARDS"}

_ED25519, _ED448 = "ed25519", "ed448"
#: Edwards curves by OID (RFC 8410) and by the names modules print.
_EDWARDS_OIDS: dict[str, str] = {"1.3.101.112": _ED25519, "1.3.101.113": _ED448}
_EDWARDS_NAMES: dict[str, str] = {"edwards25519": _ED25519, "ed25519": _ED25519,
                                  "edwards448": _ED448, "ed448": _ED448}
_EDWARDS_SIZES: dict[str, int] = {_ED25519: 32, _ED448: 57}

#: Weierstrass curves by name, cryptography's name plus the usual aliases (OpenSSL, NIST, SSH).
_CURVES: tuple[type[ec.EllipticCurve], ...] = (
    ec.SECP192R1, ec.SECP224R1, ec.SECP256R1, ec.SECP384R1, ec.SECP521R1, ec.SECP256K1,
    ec.BrainpoolP256R1, ec.BrainpoolP384R1, ec.BrainpoolP512R1)
_CURVE_ALIASES: dict[str, type[ec.EllipticCurve]] = {
    "prime192v1": ec.SECP192R1, "p192": ec.SECP192R1, "nistp192": ec.SECP192R1,
    "p224": ec.SECP224R1, "nistp224": ec.SECP224R1,
    "prime256v1": ec.SECP256R1, "p256": ec.SECP256R1, "nistp256": ec.SECP256R1,
    "p384": ec.SECP384R1, "nistp384": ec.SECP384R1,
    "p521": ec.SECP521R1, "nistp521": ec.SECP521R1,
}

Curve = ec.EllipticCurve | str  # a Weierstrass curve, or _ED25519 / _ED448


def _name_key(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "").replace(" ", "")


def _curve_by_name(name: str) -> Curve:
    key = _name_key(name)
    edwards = {_name_key(n): curve for n, curve in _EDWARDS_NAMES.items()}
    if key in edwards:
        return edwards[key]
    for cls in _CURVES:
        if _name_key(cls().name) == key:
            return cls()
    if key in _CURVE_ALIASES:
        return _CURVE_ALIASES[key]()
    dotted = name.strip()
    if "." in dotted and all(part.isdigit() for part in dotted.split(".")):
        return _curve_by_oid(dotted)
    raise UnsupportedRequest(f"ec_params: curve {name!r} is not supported")


def _curve_by_oid(oid: str) -> Curve:
    if oid in _EDWARDS_OIDS:
        return _EDWARDS_OIDS[oid]
    try:
        return ec.get_curve_for_oid(x509.ObjectIdentifier(oid))()
    except LookupError:
        raise UnsupportedRequest(f"ec_params: curve OID {oid} is not supported") from None


def curve_from_ec_params(params: Any) -> Curve:
    """The curve of a CKA_EC_PARAMS value: DER OID, DER PrintableString name, a name, or a
    cryptography curve object. Explicit curve parameters are refused (no module should make them)."""
    if isinstance(params, ec.EllipticCurve):
        return params
    if isinstance(params, str):
        return _curve_by_name(params)
    if not isinstance(params, bytes | bytearray | memoryview):
        raise TypeError(f"ec_params: expected bytes (DER) or a curve name, got {type(params).__name__}")
    data = bytes(params)
    try:
        tag, content = der.read_tlv(data)
        oid = der.decode_oid(content) if tag == der.OBJECT_IDENTIFIER else None
    except ValueError as exc:
        raise ValueError(f"ec_params: not DER ({exc}): {data.hex()}") from None
    if oid is not None:
        return _curve_by_oid(oid)
    if tag == der.PRINTABLE_STRING:
        return _curve_by_name(content.decode("ascii", "replace"))
    if tag == der.SEQUENCE:
        raise UnsupportedRequest("ec_params: explicit curve parameters are not supported; the key must name its "
                                 "curve (an OID)")
    if tag == der.NULL:
        raise UnsupportedRequest("ec_params: implicitlyCA (NULL) names no curve")
    raise ValueError(f"ec_params: tag 0x{tag:02x} is neither an OID nor a curve name: {data.hex()}")


def _point(value: Any, raw_lengths: set[int], what: str) -> bytes:
    """The bare point in CKA_EC_POINT: as given when it has a bare point's length, else the
    content of the DER OCTET STRING around it."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"ec_point: expected bytes, got {type(value).__name__}")
    data = bytes(value)
    if len(data) in raw_lengths:
        return data
    try:
        tag, content = der.read_tlv(data)
    except ValueError:
        tag, content = -1, b""
    if tag == der.OCTET_STRING and len(content) in raw_lengths:
        return content
    lengths = " or ".join(str(n) for n in sorted(raw_lengths))
    raise ValueError(f"ec_point: {len(data)} bytes are neither a {what} point ({lengths} bytes) nor a DER OCTET "
                     "STRING around one")


def _key_type(value: Any, attrs: Mapping[str, Any]) -> str:
    if value is None:
        if "modulus" in attrs:
            return "RSA"
        if "ec_point" in attrs or "ec_params" in attrs:
            return "EC"  # the curve (ec_params) tells Edwards from Weierstrass
        raise ValueError("key_type is missing, and neither modulus nor ec_point tells the key's type")
    name = getattr(value, "name", None)  # a python-pkcs11 KeyType
    if isinstance(value, int) and name is None:
        if value not in _KEY_TYPES:
            raise UnsupportedRequest(f"key_type 0x{value:x} is not supported (RSA, EC, EC_EDWARDS are)")
        return _KEY_TYPES[value]
    text = str(name if isinstance(name, str) else value).upper()
    text = text.removeprefix("CKK_")
    if text not in _KEY_TYPE_ALIASES:
        raise UnsupportedRequest(f"key_type {value!r} is not supported (RSA, EC, EC_EDWARDS are)")
    return _KEY_TYPE_ALIASES[text]


def _integer(attrs: Mapping[str, Any], name: str) -> int:
    if name not in attrs or attrs[name] is None:
        raise ValueError(f"RSA public key: {name} is missing")
    value = attrs[name]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return int.from_bytes(bytes(value), "big")
    raise TypeError(f"RSA public key: {name} must be big-endian bytes or an int, got {type(value).__name__}")


def _attribute_name(key: Any) -> str:
    """``"modulus"`` for ``"modulus"``, ``"CKA_MODULUS"`` and python-pkcs11's ``Attribute.MODULUS``."""
    name = key if isinstance(key, str) else getattr(key, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"attribute names must be strings or enum members, got {key!r}")
    return name.lower().removeprefix("cka_")


def public_key_from_attributes(attributes: Mapping[str, Any]) -> PublicKey:
    """The cryptography public key a module's attributes describe.

    Keys are attribute names, with or without ``CKA_``, any case, or enum members with such a
    ``name`` (python-pkcs11's ``Attribute.MODULUS``): ``key_type`` (``"RSA"``,
    ``"EC"``, ``"EC_EDWARDS"``, a ``CKK_*`` name or value, or python-pkcs11's KeyType; when
    absent, the attributes present decide), then ``modulus`` and ``public_exponent`` (big-endian
    bytes, or ints) for RSA, ``ec_params`` and ``ec_point`` for EC and Edwards keys (see the
    module's text for the forms accepted). Errors name the attribute that is missing or wrong.
    """
    attrs = {_attribute_name(k): v for k, v in attributes.items()}
    kind = _key_type(attrs.get("key_type"), attrs)
    if kind == "RSA":
        modulus, exponent = _integer(attrs, "modulus"), _integer(attrs, "public_exponent")
        try:
            return rsa.RSAPublicNumbers(exponent, modulus).public_key()
        except ValueError as exc:
            raise ValueError(f"RSA public key: modulus of {modulus.bit_length()} bits and exponent {exponent} "
                             f"are not a usable key: {exc}") from None
    for name in ("ec_params", "ec_point"):
        if attrs.get(name) is None:
            raise ValueError(f"{kind} public key: {name} is missing")
    curve = curve_from_ec_params(attrs["ec_params"])
    if isinstance(curve, str):
        size = _EDWARDS_SIZES[curve]
        point = _point(attrs["ec_point"], {size}, curve)
        if curve == _ED25519:
            return ed25519.Ed25519PublicKey.from_public_bytes(point)
        return ed448.Ed448PublicKey.from_public_bytes(point)
    size = (curve.key_size + 7) // 8
    point = _point(attrs["ec_point"], {1 + size, 1 + 2 * size}, curve.name)
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
    except ValueError as exc:
        raise ValueError(f"ec_point: not a point on {curve.name}: {exc}") from None


def public_key_from_certificate(certificate: bytes | x509.Certificate) -> PublicKey:
    """The public key of a certificate (DER or PEM bytes, or an ``x509.Certificate``): for keys
    whose public object is absent from the token and whose certificate is at hand."""
    if isinstance(certificate, x509.Certificate):
        cert = certificate
    else:
        data = bytes(certificate)
        try:
            cert = (x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----BEGIN")
                    else x509.load_der_x509_certificate(data))
        except ValueError as exc:
            raise ValueError(f"not a DER or PEM X.509 certificate: {exc}") from None
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
                      | ed448.Ed448PublicKey):
        raise UnsupportedRequest(f"certificate {cert.subject.rfc4514_string()}: a {type(key).__name__} key is not "
                                 "supported (RSA, EC, Ed25519 and Ed448 are)")
    return key
