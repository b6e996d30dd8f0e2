"""hsmfsm.keys: cryptography key objects bound to a KeyBackend, on a fake HSM that signs as PKCS#11 does.

The fake holds real software keys and answers each mechanism the way a token
does: CKM_RSA_PKCS is raw RSA over the PKCS#1 v1.5 block of whatever it is
given (it knows nothing about DigestInfo, so a wrong DigestInfo shows up as a
signature that cryptography and openssl refuse), CKM_ECDSA returns r||s over
the digest, the hash-and-sign mechanisms hash themselves. What the builders
produce from the bound keys is checked by cryptography and by the openssl
binary.
"""

from __future__ import annotations

import ast
import copy
import datetime
import enum
import hashlib
import inspect
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID
from hsmfsm.core.errors import HSMError, NotExtractable
from hsmfsm.core.mechanisms import OAEPParams, PSSParams
from hsmfsm.keys import (
    HSMECPrivateKey,
    HSMEd448PrivateKey,
    HSMEd25519PrivateKey,
    HSMRSAPrivateKey,
    KeyRef,
    SignatureMismatch,
    UnsupportedRequest,
    bind_private_key,
    parse_uri,
    public_key_from_attributes,
    public_key_from_certificate,
    uri_attributes,
)

HASH = {"SHA1": hashes.SHA1(), "SHA224": hashes.SHA224(), "SHA256": hashes.SHA256(), "SHA384": hashes.SHA384(),
        "SHA512": hashes.SHA512()}
BY_DIGEST_SIZE = {h.digest_size: h for h in HASH.values()}
#: RFC 8017 section 9.2 note 1, written out here independently of hsmfsm.keys.DIGEST_INFO.
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


@pytest.fixture(scope="module")
def software_keys() -> dict[str, Any]:
    return {"rsa": rsa.generate_private_key(65537, 2048), "ec": ec.generate_private_key(ec.SECP256R1()),
            "ec384": ec.generate_private_key(ec.SECP384R1()), "ec521": ec.generate_private_key(ec.SECP521R1()),
            "ed": ed25519.Ed25519PrivateKey.generate(), "ed448": ed448.Ed448PrivateKey.generate()}


@dataclass
class Call:
    op: str
    label: str | None
    mechanism: str
    param: Any
    data: bytes
    key_id: bytes | None
    deadline: float | None
    checked: bool


class FakeHSM:
    """A KeyBackend of ``members`` replicas holding software keys. An answer whose attempt number
    is in ``corrupt`` (or every answer, ``corrupt="all"``) has one byte flipped. With a check the
    fake behaves as a pool does: a rejected answer goes to the next member, and when every member's
    answer is rejected it raises; ``honor_check=False`` is a backend that ignores the check."""

    name = "fake-pool"

    def __init__(self, keys: dict[str, Any], *, members: int = 2, corrupt: Any = (), honor_check: bool = True,
                 answer: Any = None) -> None:
        self.keys, self.members, self.corrupt, self.honor_check = keys, members, corrupt, honor_check
        self.answer = answer
        self.calls: list[Call] = []
        self.attempts = self.rejected = 0

    def public_key(self, label: str | None = None, *, key_id: bytes | None = None, uri: str | None = None) -> Any:
        self.calls.append(Call("public_key", label, "", None, b"", key_id, None, False))
        return self.keys[label].public_key()

    def sign(self, key_label: str | None, data: bytes, mechanism: Any = None, mechanism_param: Any = None, *,
             key_id: bytes | None = None, deadline: float | None = None, check: Any = None) -> bytes:
        assert isinstance(data, bytes)
        self.calls.append(Call("sign", key_label, mechanism, mechanism_param, data, key_id, deadline,
                               check is not None))
        for _ in range(self.members):
            signature = self.answer(data) if self.answer else self._sign(self.keys[key_label], mechanism,
                                                                         mechanism_param, data)
            attempt, self.attempts = self.attempts, self.attempts + 1
            if self.corrupt == "all" or attempt in self.corrupt:
                signature = signature[:-1] + bytes([signature[-1] ^ 0x01])
            if check is None or not self.honor_check or check(signature):
                return signature
            self.rejected += 1
        raise HSMError(self.name, f"every member's answer failed the check ({self.rejected})")

    def decrypt(self, key_label: str | None, data: bytes, mechanism: Any = None, mechanism_param: Any = None, *,
                key_id: bytes | None = None, deadline: float | None = None) -> bytes:
        self.calls.append(Call("decrypt", key_label, mechanism, mechanism_param, data, key_id, deadline, False))
        key = self.keys[key_label]
        if mechanism == "RSA_PKCS":
            return bytes(key.decrypt(data, padding.PKCS1v15()))
        assert mechanism == "RSA_PKCS_OAEP" and isinstance(mechanism_param, OAEPParams)
        oaep = padding.OAEP(padding.MGF1(HASH[mechanism_param.mgf]), HASH[mechanism_param.hash],
                            mechanism_param.label)
        return bytes(key.decrypt(data, oaep))

    @staticmethod
    def _sign(key: Any, mechanism: str, param: Any, data: bytes) -> bytes:
        if isinstance(key, rsa.RSAPrivateKey):
            if mechanism == "RSA_PKCS":  # raw RSA over the EMSA-PKCS1-v1_5 block of the data as given
                numbers, size = key.private_numbers(), (key.key_size + 7) // 8
                assert len(data) <= size - 11
                block = b"\x00\x01" + b"\xff" * (size - 3 - len(data)) + b"\x00" + data
                return pow(int.from_bytes(block, "big"), numbers.d, numbers.public_numbers.n).to_bytes(size, "big")
            if mechanism == "RSA_PKCS_PSS":
                pss = padding.PSS(padding.MGF1(HASH[param.mgf]), param.salt_length)
                return bytes(key.sign(data, pss, utils.Prehashed(HASH[param.hash])))
            name, _, rest = mechanism.partition("_")
            if rest == "RSA_PKCS":
                assert param is None
                return bytes(key.sign(data, padding.PKCS1v15(), HASH[name]))
            if rest == "RSA_PKCS_PSS":
                assert param.hash == name
                return bytes(key.sign(data, padding.PSS(padding.MGF1(HASH[param.mgf]), param.salt_length),
                                      HASH[name]))
        if isinstance(key, ec.EllipticCurvePrivateKey):
            size = (key.curve.key_size + 7) // 8
            if mechanism == "ECDSA":
                der = key.sign(data, ec.ECDSA(utils.Prehashed(BY_DIGEST_SIZE[len(data)])))
            else:
                assert mechanism.startswith("ECDSA_")
                der = key.sign(data, ec.ECDSA(HASH[mechanism.removeprefix("ECDSA_")]))
            r, s = utils.decode_dss_signature(der)
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")
        if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) and mechanism == "EDDSA":
            assert param is None
            return bytes(key.sign(data))
        raise HSMError("fake-pool", f"CKR_MECHANISM_INVALID: {mechanism} for {type(key).__name__}")

    def signs(self) -> list[Call]:
        return [c for c in self.calls if c.op == "sign"]


def bound(hsm: FakeHSM, label: str, **options: Any) -> Any:
    return bind_private_key(hsm, KeyRef(label=label), hsm.keys[label].public_key(), **options)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def self_signed(key: Any, algorithm: Any, **sign_options: Any) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name("hsmfsm test")).issuer_name(_name("hsmfsm test"))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True))
    return builder.sign(key, algorithm, **sign_options)


def openssl_verify(tmp_path: Path, cert: x509.Certificate) -> None:
    pem = tmp_path / "cert.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out = subprocess.run(["openssl", "verify", "-CAfile", str(pem), str(pem)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith(": OK"), out.stdout + out.stderr


def openssl_req_verify(tmp_path: Path, csr: x509.CertificateSigningRequest) -> None:
    pem = tmp_path / "req.pem"
    pem.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    out = subprocess.run(["openssl", "req", "-verify", "-noout", "-in", str(pem)], capture_output=True, text=True)
    assert out.returncode == 0 and "verify OK" in out.stdout + out.stderr, out.stdout + out.stderr


# --- the classes: every abstract method, the ABCs' parameter names, copies ------------------------------------

CLASSES = [(HSMRSAPrivateKey, rsa.RSAPrivateKey, "rsa"), (HSMECPrivateKey, ec.EllipticCurvePrivateKey, "ec"),
           (HSMEd25519PrivateKey, ed25519.Ed25519PrivateKey, "ed"),
           (HSMEd448PrivateKey, ed448.Ed448PrivateKey, "ed448")]


@pytest.mark.parametrize(("cls", "abc", "label"), CLASSES, ids=[c[0].__name__ for c in CLASSES])
def test_every_abstract_method_is_implemented_with_the_abcs_parameter_names(
        software_keys: dict[str, Any], cls: type, abc: type, label: str) -> None:
    key = bound(FakeHSM(software_keys), label)
    assert type(key) is cls and isinstance(key, abc)
    assert not getattr(cls, "__abstractmethods__", None)
    assert abc.__abstractmethods__, "the ABC lists its abstract methods"
    for name in abc.__abstractmethods__:
        ours, theirs = inspect.getattr_static(cls, name), inspect.getattr_static(abc, name)
        assert not getattr(ours, "__isabstractmethod__", False), name
        if isinstance(theirs, property):
            assert isinstance(ours, property), name
            continue
        assert list(inspect.signature(ours).parameters) == list(inspect.signature(theirs).parameters), name
    assert copy.copy(key) is key and copy.deepcopy(key) is key
    assert copy.deepcopy({"k": key})["k"] is key


def test_public_key_size_and_curve_come_from_the_cached_public_key(software_keys: dict[str, Any]) -> None:
    hsm = FakeHSM(software_keys)
    rsa_key, ec_key = bound(hsm, "rsa"), bound(hsm, "ec384")
    assert rsa_key.key_size == 2048 and rsa_key.public_key() is rsa_key.public_key()
    assert ec_key.curve.name == "secp384r1" and ec_key.key_size == 384
    assert hsm.calls == [], "no HSM round trip for public_key/key_size/curve"
    assert "label 'rsa'" in repr(rsa_key) and "RSA 2048" in repr(rsa_key) and "fake-pool" in repr(rsa_key)


@pytest.mark.parametrize("label", ["rsa", "ec", "ed", "ed448"])
def test_private_material_is_not_extractable_and_the_error_names_the_key(
        software_keys: dict[str, Any], label: str) -> None:
    key = bound(FakeHSM(software_keys), label)
    attempts: list[Any] = [lambda: key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption())]
    if label in ("rsa", "ec"):
        attempts.append(key.private_numbers)
    if label == "ec":
        peer = ec.generate_private_key(ec.SECP256R1()).public_key()
        attempts.append(lambda: key.exchange(ec.ECDH(), peer))
    if label.startswith("ed"):
        attempts.append(key.private_bytes_raw)
    for attempt in attempts:
        with pytest.raises(NotExtractable, match=f"label '{label}'"):
            attempt()


# --- certificates and CSRs built by cryptography, checked by cryptography and openssl -----------------------------

@pytest.mark.parametrize("hash_locally", [True, False])
def test_rsa_certificate_pkcs1v15(software_keys: dict[str, Any], tmp_path: Path, hash_locally: bool) -> None:
    hsm = FakeHSM(software_keys)
    key = bound(hsm, "rsa", hash_locally=hash_locally)
    cert = self_signed(key, hashes.SHA256())
    cert.verify_directly_issued_by(cert)
    openssl_verify(tmp_path, cert)
    [call] = hsm.signs()
    if hash_locally:
        assert call.mechanism == "RSA_PKCS" and call.param is None
        assert call.data == SHA256_DIGEST_INFO + hashlib.sha256(cert.tbs_certificate_bytes).digest()
    else:
        assert (call.mechanism, call.param, call.data) == ("SHA256_RSA_PKCS", None, cert.tbs_certificate_bytes)
    assert call.label == "rsa" and not call.checked


@pytest.mark.parametrize("hash_locally", [True, False])
@pytest.mark.parametrize(("salt", "expected"), [(padding.PSS.DIGEST_LENGTH, 32), (padding.PSS.MAX_LENGTH, 222)],
                         ids=["digest_length", "max_length"])
def test_rsa_pss_certificate(software_keys: dict[str, Any], tmp_path: Path, hash_locally: bool, salt: Any,
                             expected: int) -> None:
    hsm = FakeHSM(software_keys)
    key = bound(hsm, "rsa", hash_locally=hash_locally)
    cert = self_signed(key, hashes.SHA256(), rsa_padding=padding.PSS(padding.MGF1(hashes.SHA256()), salt))
    assert cert.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSASSA_PSS
    cert.verify_directly_issued_by(cert)
    openssl_verify(tmp_path, cert)
    [call] = hsm.signs()
    assert call.param == PSSParams(hash="SHA256", mgf="SHA256", salt_length=expected)
    if hash_locally:
        assert call.mechanism == "RSA_PKCS_PSS" and call.data == hashlib.sha256(cert.tbs_certificate_bytes).digest()
    else:
        assert call.mechanism == "SHA256_RSA_PKCS_PSS" and call.data == cert.tbs_certificate_bytes


@pytest.mark.parametrize("hash_locally", [True, False])
@pytest.mark.parametrize(("label", "algorithm"), [("ec", hashes.SHA256()), ("ec384", hashes.SHA384()),
                                                  ("ec521", hashes.SHA512())], ids=["p256", "p384", "p521"])
def test_ec_csr(software_keys: dict[str, Any], tmp_path: Path, hash_locally: bool, label: str,
                algorithm: hashes.HashAlgorithm) -> None:
    hsm = FakeHSM(software_keys)
    key = bound(hsm, label, hash_locally=hash_locally)
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name("ec csr")).sign(key, algorithm)
    assert csr.is_signature_valid
    utils.decode_dss_signature(csr.signature)  # DER, as cryptography's own keys return it
    openssl_req_verify(tmp_path, csr)
    [call] = hsm.signs()
    if hash_locally:
        digest = hashes.Hash(algorithm)
        digest.update(csr.tbs_certrequest_bytes)
        assert (call.mechanism, call.param, call.data) == ("ECDSA", None, digest.finalize())
    else:
        assert (call.mechanism, call.data) == (f"ECDSA_{algorithm.name.upper()}", csr.tbs_certrequest_bytes)


@pytest.mark.parametrize("label", ["ed", "ed448"])
def test_eddsa_certificate_sends_the_whole_message(software_keys: dict[str, Any], tmp_path: Path,
                                                   label: str) -> None:
    hsm = FakeHSM(software_keys)
    cert = self_signed(bound(hsm, label), None)
    cert.verify_directly_issued_by(cert)
    openssl_verify(tmp_path, cert)
    [call] = hsm.signs()
    assert (call.mechanism, call.param, call.data) == ("EDDSA", None, cert.tbs_certificate_bytes)


def test_ec_certificate_with_deterministic_signing_is_signed_with_the_hsm_nonce(
        software_keys: dict[str, Any], tmp_path: Path) -> None:
    hsm = FakeHSM(software_keys)
    key = bound(hsm, "ec")
    cert = self_signed(key, hashes.SHA256(), ecdsa_deterministic=True)
    cert.verify_directly_issued_by(cert)
    openssl_verify(tmp_path, cert)
    assert hsm.signs()[0].mechanism == "ECDSA"
    strict = HSMECPrivateKey(hsm, KeyRef(label="ec"), key.public_key(), refuse_deterministic=True)
    with pytest.raises(UnsupportedRequest, match="deterministic"):
        strict.sign(b"data", ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    strict.public_key().verify(strict.sign(b"data", ec.ECDSA(hashes.SHA256())), b"data", ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("label", ["rsa", "ec"])
def test_a_large_pkcs7_payload_never_crosses_the_link(software_keys: dict[str, Any], tmp_path: Path,
                                                      label: str) -> None:
    """With NoAttributes cryptography hands sign() the whole content; only its digest goes to the HSM."""
    hsm = FakeHSM(software_keys)
    key = bound(hsm, label, verify=True)
    cert = self_signed(key, hashes.SHA256())
    content = b"firmware image " * 20000
    signed = (pkcs7.PKCS7SignatureBuilder().set_data(content).add_signer(cert, key, hashes.SHA256())
              .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature,
                                                 pkcs7.PKCS7Options.NoAttributes]))
    for name, data in (("cert.pem", cert.public_bytes(serialization.Encoding.PEM)), ("sig.der", signed),
                       ("content", content)):
        (tmp_path / name).write_bytes(data)
    out = subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", "sig.der", "-content",
                          "content", "-CAfile", "cert.pem", "-out", "/dev/null"], cwd=tmp_path, capture_output=True,
                         text=True)
    assert out.returncode == 0 and "Verification successful" in out.stderr, out.stdout + out.stderr
    assert [len(c.data) for c in hsm.signs()] == ([19 + 32] * 2 if label == "rsa" else [32] * 2)


# --- sign() directly: every hash, Prehashed, keyword arguments, what is refused ------------------------------------

@pytest.mark.parametrize("hash_name", sorted(HASH))
@pytest.mark.parametrize("hash_locally", [True, False])
def test_every_supported_hash_verifies_in_software(software_keys: dict[str, Any], hash_name: str,
                                                   hash_locally: bool) -> None:
    hsm, algorithm, data = FakeHSM(software_keys), HASH[hash_name], b"payload " * 100
    rsa_key, ec_key = bound(hsm, "rsa", hash_locally=hash_locally), bound(hsm, "ec", hash_locally=hash_locally)
    pss = padding.PSS(padding.MGF1(hashes.SHA1()), padding.PSS.DIGEST_LENGTH)
    rsa_key.public_key().verify(rsa_key.sign(data, padding.PKCS1v15(), algorithm), data, padding.PKCS1v15(),
                                algorithm)
    rsa_key.public_key().verify(rsa_key.sign(data, pss, algorithm), data, pss, algorithm)
    ec_key.public_key().verify(ec_key.sign(data, ec.ECDSA(algorithm)), data, ec.ECDSA(algorithm))
    expected = (["RSA_PKCS", "RSA_PKCS_PSS", "ECDSA"] if hash_locally
                else [f"{hash_name}_RSA_PKCS", f"{hash_name}_RSA_PKCS_PSS", f"ECDSA_{hash_name}"])
    assert [c.mechanism for c in hsm.signs()] == expected
    assert hsm.signs()[1].param == PSSParams(hash_name, "SHA1", algorithm.digest_size)
    assert all(len(c.data) < 100 for c in hsm.signs()) == hash_locally


def test_prehashed_input_is_not_hashed_again(software_keys: dict[str, Any]) -> None:
    hsm = FakeHSM(software_keys)
    rsa_key, ec_key = bound(hsm, "rsa"), bound(hsm, "ec")
    digest = hashlib.sha384(b"message").digest()
    prehashed = utils.Prehashed(hashes.SHA384())
    pss = padding.PSS(padding.MGF1(hashes.SHA384()), padding.PSS.MAX_LENGTH)
    rsa_key.public_key().verify(rsa_key.sign(digest, padding.PKCS1v15(), prehashed), b"message",
                                padding.PKCS1v15(), hashes.SHA384())
    rsa_key.public_key().verify(rsa_key.sign(digest, pss, prehashed), b"message", pss, hashes.SHA384())
    ec_key.public_key().verify(ec_key.sign(digest, ec.ECDSA(prehashed)), b"message", ec.ECDSA(hashes.SHA384()))
    v15, pss_call, ecdsa = hsm.signs()
    assert v15.data.endswith(digest) and len(v15.data) == 19 + 48
    assert pss_call.data == digest and ecdsa.data == digest
    with pytest.raises(ValueError, match="48-byte digest"):
        ec_key.sign(b"short", ec.ECDSA(prehashed))


def test_prehashed_with_hash_locally_off_is_refused_with_the_reason(software_keys: dict[str, Any]) -> None:
    hsm = FakeHSM(software_keys)
    digest, prehashed = hashlib.sha256(b"m").digest(), utils.Prehashed(hashes.SHA256())
    for call in (lambda: bound(hsm, "rsa", hash_locally=False).sign(digest, padding.PKCS1v15(), prehashed),
                 lambda: bound(hsm, "ec", hash_locally=False).sign(digest, ec.ECDSA(prehashed))):
        with pytest.raises(UnsupportedRequest, match="hash_locally=False.*key policy"):
            call()
    assert hsm.signs() == []


def test_keyword_arguments_as_signxml_passes_them(software_keys: dict[str, Any]) -> None:
    hsm = FakeHSM(software_keys)
    rsa_key, ec_key = bound(hsm, "rsa"), bound(hsm, "ec")
    signature = rsa_key.sign(data=b"x", padding=padding.PKCS1v15(), algorithm=hashes.SHA256())
    rsa_key.public_key().verify(signature, b"x", padding.PKCS1v15(), hashes.SHA256())
    signature = ec_key.sign(data=memoryview(b"x"), signature_algorithm=ec.ECDSA(hashes.SHA256()))
    ec_key.public_key().verify(signature, b"x", ec.ECDSA(hashes.SHA256()))


def test_pss_auto_signs_with_the_maximum_salt_and_salt_lengths_are_checked(software_keys: dict[str, Any]) -> None:
    hsm = FakeHSM(software_keys)
    key = bound(hsm, "rsa")
    auto = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.AUTO)
    key.public_key().verify(key.sign(b"m", auto, hashes.SHA256()), b"m", auto, hashes.SHA256())
    key.sign(b"m", padding.PSS(padding.MGF1(hashes.SHA256()), 20), hashes.SHA256())
    assert [c.param.salt_length for c in hsm.signs()] == [222, 20]
    with pytest.raises(ValueError, match="223 bytes does not fit a 2048-bit key"):
        key.sign(b"m", padding.PSS(padding.MGF1(hashes.SHA256()), 223), hashes.SHA256())


def test_unsupported_hashes_and_paddings_are_named(software_keys: dict[str, Any]) -> None:
    hsm = FakeHSM(software_keys)
    rsa_key, ec_key = bound(hsm, "rsa"), bound(hsm, "ec")
    for call, name in [(lambda: rsa_key.sign(b"m", padding.PKCS1v15(), hashes.SHA3_256()), "sha3-256"),
                       (lambda: ec_key.sign(b"m", ec.ECDSA(hashes.SHA512_256())), "sha512-256"),
                       (lambda: rsa_key.sign(b"m", padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None),
                                             hashes.SHA256()), "EME-OAEP"),
                       (lambda: rsa_key.decrypt(b"c", padding.PSS(padding.MGF1(hashes.SHA256()), 0)), "EMSA-PSS"),
                       (lambda: rsa_key.sign(b"m", padding.PSS(padding.MGF1(hashes.SHA3_256()), 0), hashes.SHA256()),
                        "sha3-256")]:
        with pytest.raises(UnsupportedRequest, match=name) as caught:
            call()
        assert isinstance(caught.value, ValueError) and isinstance(caught.value, UnsupportedAlgorithm)
    assert hsm.signs() == []


def test_no_digest_info_signs_the_data_as_given(software_keys: dict[str, Any]) -> None:
    if not hasattr(utils, "NoDigestInfo"):
        pytest.skip("cryptography < 47 has no NoDigestInfo")
    hsm = FakeHSM(software_keys)
    key = bound(hsm, "rsa", verify=True)
    blob = b"tls 1.1 md5||sha1 blob"
    signature = key.sign(blob, padding.PKCS1v15(), utils.NoDigestInfo())
    assert key.public_key().recover_data_from_signature(signature, padding.PKCS1v15(), None) == blob
    assert (hsm.signs()[0].mechanism, hsm.signs()[0].data) == ("RSA_PKCS", blob)


def test_the_backend_gets_label_key_id_and_deadline(software_keys: dict[str, Any]) -> None:
    hsm = FakeHSM(software_keys)
    key = bind_private_key(hsm, KeyRef(label="ec", key_id=b"\x01\x02"), software_keys["ec"].public_key(),
                           deadline=2.5)
    key.sign(b"m", ec.ECDSA(hashes.SHA256()))
    [call] = hsm.signs()
    assert (call.label, call.key_id, call.deadline, call.checked) == ("ec", b"\x01\x02", 2.5, False)


def test_decrypt_pkcs1v15_and_oaep(software_keys: dict[str, Any]) -> None:
    hsm = FakeHSM(software_keys)
    key = bind_private_key(hsm, KeyRef(label="rsa", key_id=b"\x07"), software_keys["rsa"].public_key(), deadline=1.0)
    oaep = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA256(), b"context")
    assert key.decrypt(key.public_key().encrypt(b"secret", oaep), oaep) == b"secret"
    assert key.decrypt(key.public_key().encrypt(b"secret", padding.PKCS1v15()), padding.PKCS1v15()) == b"secret"
    first, second = hsm.calls
    assert (first.mechanism, first.param, first.key_id, first.deadline) == (
        "RSA_PKCS_OAEP", OAEPParams(hash="SHA256", mgf="SHA1", label=b"context"), b"\x07", 1.0)
    assert (second.mechanism, second.param) == ("RSA_PKCS", None)


# --- verify=True: a wrong member's answer is refused, a bad signature is never returned ------------------------

@pytest.mark.parametrize("label", ["rsa", "ec", "ed"])
def test_verify_rejects_a_corrupted_answer_and_uses_the_next_member(software_keys: dict[str, Any],
                                                                    label: str) -> None:
    hsm = FakeHSM(software_keys, corrupt={0})
    key = bound(hsm, label, verify=True)
    cert = self_signed(key, None if label == "ed" else hashes.SHA256())
    cert.verify_directly_issued_by(cert)
    assert hsm.rejected == 1 and hsm.attempts == 2 and hsm.signs()[0].checked


@pytest.mark.parametrize("label", ["rsa", "ec", "ed"])
def test_verify_never_returns_a_bad_signature(software_keys: dict[str, Any], label: str) -> None:
    honest = FakeHSM(software_keys, corrupt="all")
    with pytest.raises(HSMError, match="failed the check"):
        self_signed(bound(honest, label, verify=True), None if label == "ed" else hashes.SHA256())
    assert honest.rejected == 2
    careless = FakeHSM(software_keys, corrupt="all", honor_check=False)
    with pytest.raises(SignatureMismatch, match="does not verify"):
        self_signed(bound(careless, label, verify=True), None if label == "ed" else hashes.SHA256())


def test_without_verify_the_check_is_not_sent(software_keys: dict[str, Any]) -> None:
    hsm = FakeHSM(software_keys, corrupt="all")
    cert = self_signed(bound(hsm, "rsa"), hashes.SHA256())  # what cryptography does with a bad answer: nothing
    with pytest.raises(InvalidSignature):
        cert.verify_directly_issued_by(cert)
    assert not hsm.signs()[0].checked


def test_an_ecdsa_answer_of_the_wrong_size_is_refused(software_keys: dict[str, Any]) -> None:
    key = bound(FakeHSM(software_keys, answer=lambda data: b"\x01" * 63), "ec")
    with pytest.raises(SignatureMismatch, match="r||s of 64 bytes, the HSM returned 63"):
        key.sign(b"m", ec.ECDSA(hashes.SHA256()))
    checked = bound(FakeHSM(software_keys, answer=lambda data: b"\x01" * 63, honor_check=False), "ec", verify=True)
    with pytest.raises(SignatureMismatch):
        checked.sign(b"m", ec.ECDSA(hashes.SHA256()))


# --- bind_private_key ------------------------------------------------------------------------------------------

def test_bind_picks_the_class_reads_a_missing_public_key_and_refuses_other_types(
        software_keys: dict[str, Any]) -> None:
    hsm = FakeHSM(software_keys)
    for label, cls in [("rsa", HSMRSAPrivateKey), ("ec", HSMECPrivateKey), ("ed", HSMEd25519PrivateKey),
                       ("ed448", HSMEd448PrivateKey)]:
        assert type(bound(hsm, label)) is cls
    key = bind_private_key(hsm, KeyRef(label="ec", key_id=b"\x05"), None)
    assert key.public_key() == software_keys["ec"].public_key()
    assert [(c.op, c.label, c.key_id) for c in hsm.calls] == [("public_key", "ec", b"\x05")]
    cert = self_signed(software_keys["ed"], None)
    assert type(bind_private_key(hsm, KeyRef(label="ed"), cert)) is HSMEd25519PrivateKey
    with pytest.raises(UnsupportedRequest, match="DSAPublicKey"):
        bind_private_key(hsm, KeyRef(label="dsa"), dsa.generate_private_key(2048).public_key())
    with pytest.raises(TypeError, match="RSA public key"):
        HSMRSAPrivateKey(hsm, KeyRef(label="ec"), software_keys["ec"].public_key())


# --- public keys from PKCS#11 attributes and certificates -------------------------------------------------------

CURVE_OIDS = {"secp256r1": "06082a8648ce3d030107", "secp384r1": "06052b81040022", "secp521r1": "06052b81040023"}


def _octet_string(point: bytes) -> bytes:
    length = bytes([len(point)]) if len(point) < 0x80 else bytes([0x81, len(point)])
    return b"\x04" + length + point


def test_rsa_public_key_from_attributes(software_keys: dict[str, Any]) -> None:
    public = software_keys["rsa"].public_key()
    numbers = public.public_numbers()
    for key_type in ("RSA", "CKK_RSA", 0):
        attrs = {"key_type": key_type, "modulus": numbers.n.to_bytes(256, "big"), "public_exponent": b"\x01\x00\x01"}
        assert public_key_from_attributes(attrs) == public
    assert public_key_from_attributes({"CKA_MODULUS": numbers.n, "CKA_PUBLIC_EXPONENT": 65537}) == public

    class Attribute(enum.IntEnum):  # the shape of python-pkcs11's Attribute and KeyType
        KEY_TYPE, MODULUS, PUBLIC_EXPONENT = 0x100, 0x120, 0x122

    class KeyType(enum.IntEnum):
        RSA = 0

    by_enum = {Attribute.KEY_TYPE: KeyType.RSA, Attribute.MODULUS: numbers.n.to_bytes(256, "big"),
               Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01"}
    assert public_key_from_attributes(by_enum) == public
    with pytest.raises(ValueError, match="modulus is missing"):
        public_key_from_attributes({"key_type": "RSA", "public_exponent": b"\x01\x00\x01"})


@pytest.mark.parametrize("label", ["ec", "ec384", "ec521"])
def test_ec_public_key_from_attributes_in_both_point_encodings(software_keys: dict[str, Any], label: str) -> None:
    public = software_keys[label].public_key()
    raw = public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    compressed = public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    oid = bytes.fromhex(CURVE_OIDS[public.curve.name])
    for params in (oid, public.curve.name, public.curve):
        for point in (raw, _octet_string(raw), compressed, _octet_string(compressed)):
            for key_type in ("EC", "CKK_EC", 3):
                attrs = {"key_type": key_type, "ec_params": params, "ec_point": point}
                assert public_key_from_attributes(attrs) == public


@pytest.mark.parametrize("label", ["ed", "ed448"])
def test_edwards_public_key_from_attributes_in_both_point_encodings(software_keys: dict[str, Any],
                                                                     label: str) -> None:
    public = software_keys[label].public_key()
    raw = public.public_bytes_raw()
    name = "edwards25519" if label == "ed" else "edwards448"
    oid = bytes.fromhex("06032b6570" if label == "ed" else "06032b6571")
    printable = b"\x13" + bytes([len(name)]) + name.encode()
    for params in (oid, printable, name):
        for point in (raw, _octet_string(raw)):
            for key_type in ("EC_EDWARDS", "CKK_EC_EDWARDS", 0x40):
                attrs = {"key_type": key_type, "ec_params": params, "ec_point": point}
                assert public_key_from_attributes(attrs) == public


def test_attribute_errors_name_what_is_missing_or_unsupported(software_keys: dict[str, Any]) -> None:
    raw = software_keys["ec"].public_key().public_bytes(serialization.Encoding.X962,
                                                        serialization.PublicFormat.UncompressedPoint)
    p256 = bytes.fromhex(CURVE_OIDS["secp256r1"])
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"key_type": "EC", "ec_params": p256}, ValueError, "ec_point is missing"),
        ({"key_type": "EC", "ec_point": raw}, ValueError, "ec_params is missing"),
        ({"key_type": "DSA", "prime": b"\x01"}, UnsupportedRequest, "key_type 'DSA'"),
        ({"key_type": 0x41, "ec_point": raw}, UnsupportedRequest, "key_type 0x41"),
        ({"key_type": "EC", "ec_params": b"\x30\x03\x02\x01\x01", "ec_point": raw}, UnsupportedRequest,
         "explicit curve parameters"),
        ({"key_type": "EC", "ec_params": bytes.fromhex("06032a0304"), "ec_point": raw}, UnsupportedRequest,
         "OID 1.2.3.4"),
        ({"key_type": "EC", "ec_params": p256, "ec_point": raw[:-1]}, ValueError, "64 bytes are neither"),
        ({"key_type": "EC", "ec_params": b"\x06\x08\x2a", "ec_point": raw}, ValueError, "ec_params: not DER"),
        ({"key_type": "EC_EDWARDS", "ec_params": "curve448x", "ec_point": raw}, UnsupportedRequest,
         "curve 'curve448x'"),
        ({"label": "x"}, ValueError, "key_type is missing"),
    ]
    for attrs, error, message in cases:
        with pytest.raises(error, match=message):
            public_key_from_attributes(attrs)


def test_public_key_from_certificate(software_keys: dict[str, Any]) -> None:
    cert = self_signed(software_keys["ec"], hashes.SHA256())
    for form in (cert.public_bytes(serialization.Encoding.DER), cert.public_bytes(serialization.Encoding.PEM), cert):
        assert public_key_from_certificate(form) == software_keys["ec"].public_key()
    with pytest.raises(ValueError, match="not a DER or PEM X.509 certificate"):
        public_key_from_certificate(b"\x30\x03\x02\x01\x01")


# --- RFC 7512 URIs --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("uri", "ref", "kind"), [
    ("pkcs11:object=zsk", KeyRef(label="zsk"), None),
    ("pkcs11:token=signer;object=my%20key;id=%01%02%ff;type=private", KeyRef("my key", b"\x01\x02\xff"), "private"),
    ("PKCS11:id=%A0;type=cert", KeyRef(key_id=b"\xa0"), "cert"),
    ("pkcs11:object=%C3%A9t%C3%A9;type=public?module-path=/usr/lib/softhsm/libsofthsm2.so",
     KeyRef(label="été"), "public"),
    ("pkcs11:manufacturer=SoftHSM%20project;serial=1234;model=SoftHSM%20v2;slot-id=3;library-version=2.6;"
     "x-vendor=1;object=a", KeyRef(label="a"), None),
    ("pkcs11:", KeyRef(), None),
    ("pkcs11:id=", KeyRef(key_id=b""), None),
])
def test_uri_parsing(uri: str, ref: KeyRef, kind: str | None) -> None:
    assert parse_uri(uri) == (ref, kind)


def test_uri_attributes_returns_the_ignored_ones() -> None:
    found = uri_attributes("pkcs11:token=signer%3Ba;object=k;id=%01?module-name=softhsm2")
    assert found == {"token": "signer;a", "object": "k", "id": b"\x01", "module-name": "softhsm2"}


@pytest.mark.parametrize(("uri", "message"), [
    ("pkcs12:object=a", "scheme must be 'pkcs11:'"),
    ("object=a", "scheme must be 'pkcs11:'"),
    ("pkcs11:object", "'object' is not name=value"),
    ("pkcs11:object=a;;id=%01", "empty attribute in the path"),
    ("pkcs11:id=%0", "'id': a '%' not followed by two hex digits"),
    ("pkcs11:object=%zz", "'object': a '%' not followed"),
    ("pkcs11:object=%ff", "'object' is not UTF-8"),
    ("pkcs11:object=a;object=b", "'object' appears twice"),
    ("pkcs11:colour=blue", "unknown path attribute 'colour'"),
    ("pkcs11:module-path=/x", "'module-path' \\(it belongs in the query\\)"),
    ("pkcs11:object=a?token=x", "unknown query attribute 'token' \\(it belongs in the path\\)"),
    ("pkcs11:type=secret-key", "type=secret-key names no part of a key pair"),
    ("pkcs11:type=privat", "type=privat is not an RFC 7512 object type"),
    ("pkcs11:slot-id=x1", "slot-id=x1 is not a decimal number"),
    ("pkcs11:library-version=two", "library-version=two"),
    ("pkcs11:object=a#frag", "fragment"),
])
def test_malformed_uris_name_the_part(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_uri(uri)


@pytest.mark.parametrize("uri", ["pkcs11:object=a?pin-value=123456", "pkcs11:object=a?pin-source=file:/pin"])
def test_a_pin_in_a_uri_is_refused_without_repeating_it(uri: str) -> None:
    with pytest.raises(ValueError, match="is refused") as caught:
        parse_uri(uri)
    assert "123456" not in str(caught.value) and "/pin" not in str(caught.value)


# --- the package's imports ---------------------------------------------------------------------------------------

def test_the_keys_package_imports_only_the_core_and_cryptography() -> None:
    package = Path(__file__).resolve().parent.parent / "hsmfsm" / "keys"
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [("." * node.level) + (node.module or "")] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                top = name.lstrip(".").split(".")[0]
                if name.startswith(".."):
                    assert name == "..core" or name.startswith("..core."), f"{path.name}: {name}"
                elif not name.startswith("."):
                    assert top in {"__future__", "collections", "hashlib", "dataclasses", "typing", "logging", "re",
                                   "urllib", "cryptography"}, f"{path.name}: {name}"
