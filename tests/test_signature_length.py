"""The length of a signature as a key's attributes give it (hsmfsm.core.mechanisms.signature_length):
what lets a signature take two round trips instead of python-pkcs11's three."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from hsmfsm.core.mechanisms import signature_length


def _oid(dotted: str) -> bytes:
    """DER of an OBJECT IDENTIFIER, written out here independently of the code under test."""
    first, second, *rest = (int(p) for p in dotted.split("."))
    body = bytearray([40 * first + second])
    for part in rest:
        chunk = [part & 0x7F]
        part >>= 7
        while part:
            chunk.append(0x80 | (part & 0x7F))
            part >>= 7
        body += bytes(reversed(chunk))
    return bytes([0x06, len(body)]) + bytes(body)


@pytest.mark.parametrize(("curve", "oid"), [
    (ec.SECP256R1(), "1.2.840.10045.3.1.7"), (ec.SECP384R1(), "1.3.132.0.34"), (ec.SECP521R1(), "1.3.132.0.35"),
    (ec.SECP256K1(), "1.3.132.0.10"), (ec.BrainpoolP512R1(), "1.3.36.3.3.2.8.1.1.13"),
])
def test_ecdsa_signs_r_and_s_each_as_long_as_the_order(curve: ec.EllipticCurve, oid: str) -> None:
    key = ec.generate_private_key(curve)
    order_bytes = (key.curve.key_size + 7) // 8
    assert signature_length("EC", ec_params=_oid(oid)) == 2 * order_bytes


def test_rsa_signs_as_long_as_its_modulus() -> None:
    assert signature_length("RSA", modulus_bytes=256) == 256
    assert signature_length("RSA", modulus_bytes=None) is None


def test_eddsa_by_oid_or_curve_name() -> None:
    assert signature_length("EC_EDWARDS", ec_params=_oid("1.3.101.112")) == len(
        ed25519.Ed25519PrivateKey.generate().sign(b"x")) == 64
    assert signature_length("EC_EDWARDS", ec_params=_oid("1.3.101.113")) == len(
        ed448.Ed448PrivateKey.generate().sign(b"x")) == 114
    assert signature_length("EC_EDWARDS", ec_params=b"\x13\x0cedwards25519") == 64  # PKCS#11 3.0 PrintableString


@pytest.mark.parametrize(("key_type", "params"), [
    ("EC", _oid("1.2.3.4")),  # a curve nobody listed: ask the token
    ("EC", b"\x30\x03\x02\x01\x01"),  # explicit curve parameters
    ("EC", b"\x06\x05\x2a"),  # truncated
    ("EC", None),
    ("DSA", _oid("1.2.840.10045.3.1.7")),
])
def test_unknown_lengths_are_none(key_type: str, params: bytes | None) -> None:
    assert signature_length(key_type, ec_params=params) is None


def test_a_curve_as_cryptography_encodes_its_public_key_parameters() -> None:
    """The DER in CKA_EC_PARAMS is the namedCurve of the key's SubjectPublicKeyInfo."""
    der = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    params = _oid("1.3.132.0.34")
    assert params in der and signature_length("EC", ec_params=params) == 96
