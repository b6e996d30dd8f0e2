"""What a cryptography ``sign()`` request becomes on the HSM: a mechanism, its parameter, the bytes sent.

Pure functions, one per key family, each returning a :class:`SignRequest`: the
mechanism name (PKCS#11 without ``CKM_``), the :class:`~hsmfsm.core.mechanisms.PSSParams`
or None, the payload, and how to verify the HSM's raw answer against the public
key for exactly that payload and mechanism. The key classes
(:mod:`hsmfsm.keys.private_keys`) only send the request and finish the answer.

Why hash locally by default: cryptography's X.509 builders, dnspython and PyJWT
hand ``sign()`` the whole to-be-signed data (a TBSCertificate, an RRset, a
PKCS#7 payload of megabytes with ``NoAttributes``). With the single-part
mechanisms (``RSA_PKCS`` over a DigestInfo, ``RSA_PKCS_PSS``, ``ECDSA``) only 20
to 83 bytes cross the link, the same for any payload size, and what was signed
can be logged as a digest. The hash-and-sign mechanisms (``SHA256_RSA_PKCS`` ...)
are there for HSMs whose key policy (CKA_ALLOWED_MECHANISMS, FIPS mode) refuses
the raw ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, utils
from cryptography.hazmat.primitives.asymmetric import padding as _padding

from ..core.mechanisms import HASHES, OAEPParams, PSSParams
from .errors import UnsupportedRequest

#: The DER prefix of a DigestInfo for each hash (RFC 8017 section 9.2, note 1): CKM_RSA_PKCS
#: pads and exponentiates what it is given, so PKCS#1 v1.5 signing sends DigestInfo || digest.
DIGEST_INFO: dict[str, bytes] = {
    "SHA1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "SHA224": bytes.fromhex("302d300d06096086480165030402040500041c"),
    "SHA256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "SHA384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "SHA512": bytes.fromhex("3051300d060960864801650304020305000440"),
}

#: cryptography >= 47 has utils.NoDigestInfo (PKCS#1 v1.5 over the data as given); older ones do not.
_NO_DIGEST_INFO: type | None = getattr(utils, "NoDigestInfo", None)

_HASH_LOCALLY_OFF = ("the key is bound with hash_locally=False, so it signs with the hash-and-sign "
                     "mechanisms (SHA256_RSA_PKCS, ECDSA_SHA256 ...) that hash on the HSM, for HSMs whose key "
                     "policy requires them; {what} cannot go through those. Bind the key with hash_locally=True "
                     "(the single-part mechanisms RSA_PKCS / RSA_PKCS_PSS / ECDSA) if the HSM allows them")


@dataclass(frozen=True, slots=True)
class SignRequest:
    """One signature as the HSM is asked for it. ``verify`` raises ``InvalidSignature`` (or
    ValueError) when the HSM's raw answer is not a signature of ``payload`` by the key."""

    mechanism: str
    param: PSSParams | None
    payload: bytes
    verify: Callable[[bytes], None]

    def accepts(self, signature: bytes) -> bool:
        """The :data:`~hsmfsm.keys.backend.SignatureCheck` for this request: never raises."""
        try:
            self.verify(signature)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True


def hash_name(algorithm: object, who: str) -> str:
    """The PKCS#11 spelling (``SHA256``) of a cryptography hash; UnsupportedRequest for a hash
    without a mechanism in :data:`hsmfsm.core.mechanisms.HASHES` (SHA3, SHA512/224, BLAKE2 ...)."""
    if not isinstance(algorithm, hashes.HashAlgorithm):
        raise TypeError(f"{who}: expected a cryptography hash algorithm, got {algorithm!r}")
    name = algorithm.name.upper()
    if name not in HASHES:
        raise UnsupportedRequest(f"{who}: hash {algorithm.name} is not supported: the HSM mechanisms hsmfsm "
                                 f"names exist for {', '.join(h.lower() for h in HASHES)} only")
    return name


#: hashlib's constructors for the SHA-2 family and SHA-1: a small digest costs about 0.5 us
#: there, a tenth of a ``hashes.Hash`` round trip, on the key object's per-signature path.
_HASHLIB: dict[str, Callable[[bytes], Any]] = {
    "sha1": hashlib.sha1, "sha224": hashlib.sha224, "sha256": hashlib.sha256,
    "sha384": hashlib.sha384, "sha512": hashlib.sha512,
}


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    quick = _HASHLIB.get(algorithm.name)
    if quick is not None:
        digest: bytes = quick(data).digest()
        return digest
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


def _split_algorithm(algorithm: object, data: bytes, who: str) -> tuple[hashes.HashAlgorithm, bool]:
    """The hash and whether ``data`` already is its digest (``Prehashed``), checked as cryptography does."""
    if isinstance(algorithm, utils.Prehashed):
        inner = algorithm._algorithm
        if len(data) != inner.digest_size:
            raise ValueError(f"{who}: Prehashed({inner.name}) data must be the {inner.digest_size}-byte digest, "
                             f"got {len(data)} bytes")
        return inner, True
    if not isinstance(algorithm, hashes.HashAlgorithm):
        raise TypeError(f"{who}: expected a hash algorithm or Prehashed, got {algorithm!r}")
    return algorithm, False


def pss_salt_length(salt: object, key_size: int, algorithm: hashes.HashAlgorithm, who: str) -> int:
    """The PSS salt length in bytes for a key of ``key_size`` bits, resolved as cryptography does:
    ``DIGEST_LENGTH`` is the hash's size, ``MAX_LENGTH`` is emLen - hLen - 2 (emLen = ceil((bits-1)/8),
    ``padding.calculate_max_pss_salt_length``). ``AUTO`` also means the maximum when signing: that is
    OpenSSL's meaning of RSA_PSS_SALTLEN_AUTO for a signer, and a verifier with AUTO accepts any
    length (cryptography's own keys refuse AUTO for signing; its X.509 builders refuse it before
    ``sign()`` is called, so only a direct caller gets here)."""
    maximum = (key_size + 6) // 8 - algorithm.digest_size - 2
    if isinstance(salt, _padding._MaxLength | _padding._Auto):
        length = maximum
    elif isinstance(salt, _padding._DigestLength):
        length = algorithm.digest_size
    elif isinstance(salt, int) and not isinstance(salt, bool):
        length = salt
    else:
        raise UnsupportedRequest(f"{who}: PSS salt length {salt!r} is not understood")
    if length < 0 or length > maximum:
        raise ValueError(f"{who}: a PSS salt of {length} bytes does not fit a {key_size}-bit key with "
                         f"{algorithm.name} (at most {maximum})")
    return length


def _mgf_hash(padding: _padding.PSS | _padding.OAEP, who: str) -> hashes.HashAlgorithm:
    mgf = padding._mgf
    if not isinstance(mgf, _padding.MGF1):
        raise UnsupportedRequest(f"{who}: mask generation function {mgf!r} is not supported (MGF1 only)")
    return mgf._algorithm


def rsa_request(public: rsa.RSAPublicKey, data: bytes, padding: _padding.AsymmetricPadding, algorithm: object,
                hash_locally: bool, who: str) -> SignRequest:
    """PKCS#1 v1.5: ``RSA_PKCS`` over DigestInfo || digest, or ``SHAn_RSA_PKCS`` over the data;
    PSS: ``RSA_PKCS_PSS`` over the digest, or ``SHAn_RSA_PKCS_PSS`` over the data, both with
    PSSParams(hash, mgf hash, salt); ``NoDigestInfo``: ``RSA_PKCS`` over the data as given."""
    if _NO_DIGEST_INFO is not None and isinstance(algorithm, _NO_DIGEST_INFO):
        if not isinstance(padding, _padding.PKCS1v15):
            raise UnsupportedRequest(f"{who}: NoDigestInfo goes with PKCS1v15 padding only, not {padding.name}")
        if not hash_locally:
            raise UnsupportedRequest(f"{who}: " + _HASH_LOCALLY_OFF.format(what="NoDigestInfo input"))
        _fits(public, len(data), who, "the data")

        def verify_raw(signature: bytes) -> None:
            if public.recover_data_from_signature(signature, _padding.PKCS1v15(), None) != data:
                raise InvalidSignature("the signature is of other data")
        return SignRequest("RSA_PKCS", None, data, verify_raw)

    hash_algorithm, prehashed = _split_algorithm(algorithm, data, who)
    name = hash_name(hash_algorithm, who)
    if prehashed and not hash_locally:
        raise UnsupportedRequest(f"{who}: " + _HASH_LOCALLY_OFF.format(what=f"Prehashed({hash_algorithm.name}) input"))
    local = hash_locally or prehashed
    digest = (data if prehashed else _digest(hash_algorithm, data)) if local else b""
    # What the verifier is given: the digest with Prehashed, or the data with its hash.
    message, message_algorithm = (digest, utils.Prehashed(hash_algorithm)) if local else (data, hash_algorithm)

    if isinstance(padding, _padding.PKCS1v15):
        def verify_v15(signature: bytes) -> None:
            public.verify(signature, message, _padding.PKCS1v15(), message_algorithm)
        if local:
            block = DIGEST_INFO[name] + digest
            _fits(public, len(block), who, f"a {hash_algorithm.name} DigestInfo")
            return SignRequest("RSA_PKCS", None, block, verify_v15)
        return SignRequest(f"{name}_RSA_PKCS", None, data, verify_v15)

    if isinstance(padding, _padding.PSS):
        mgf = _mgf_hash(padding, who)
        salt = pss_salt_length(padding._salt_length, public.key_size, hash_algorithm, who)
        param = PSSParams(hash=name, mgf=hash_name(mgf, who), salt_length=salt)
        resolved = _padding.PSS(mgf=_padding.MGF1(mgf), salt_length=salt)

        def verify_pss(signature: bytes) -> None:
            public.verify(signature, message, resolved, message_algorithm)
        if local:
            return SignRequest("RSA_PKCS_PSS", param, digest, verify_pss)
        return SignRequest(f"{name}_RSA_PKCS_PSS", param, data, verify_pss)

    raise UnsupportedRequest(f"{who}: padding {getattr(padding, 'name', padding)!r} is not supported for signing "
                             "(PKCS1v15 and PSS are)")


def _fits(public: rsa.RSAPublicKey, length: int, who: str, what: str) -> None:
    """PKCS#1 v1.5 needs 11 bytes of padding: refuse here what the HSM would refuse with CKR_DATA_LEN_RANGE."""
    room = (public.key_size + 7) // 8 - 11
    if length > room:
        raise ValueError(f"{who}: {what} of {length} bytes does not fit a {public.key_size}-bit key "
                         f"(at most {room} with PKCS#1 v1.5)")


def oaep_request(padding: _padding.AsymmetricPadding, who: str) -> tuple[str, OAEPParams | None]:
    """``decrypt()``'s padding as a mechanism: PKCS1v15 -> ``RSA_PKCS``, OAEP -> ``RSA_PKCS_OAEP``
    with OAEPParams(hash, mgf hash, label)."""
    if isinstance(padding, _padding.PKCS1v15):
        return "RSA_PKCS", None
    if isinstance(padding, _padding.OAEP):
        return "RSA_PKCS_OAEP", OAEPParams(hash=hash_name(padding._algorithm, who),
                                           mgf=hash_name(_mgf_hash(padding, who), who), label=padding._label)
    raise UnsupportedRequest(f"{who}: padding {getattr(padding, 'name', padding)!r} is not supported for decryption "
                             "(PKCS1v15 and OAEP are)")


def ecdsa_request(public: ec.EllipticCurvePublicKey, data: bytes, signature_algorithm: object, hash_locally: bool,
                  who: str) -> SignRequest:
    """``ECDSA`` over the digest, or ``ECDSA_SHAn`` over the data. The answer is the HSM's
    ``r||s`` (PKCS#11's form); :func:`ecdsa_der` turns it into what cryptography returns."""
    if not isinstance(signature_algorithm, ec.ECDSA):
        raise UnsupportedRequest(f"{who}: signature algorithm {signature_algorithm!r} is not supported (ECDSA is)")
    hash_algorithm, prehashed = _split_algorithm(signature_algorithm.algorithm, data, who)
    name = hash_name(hash_algorithm, who)
    if prehashed and not hash_locally:
        raise UnsupportedRequest(f"{who}: " + _HASH_LOCALLY_OFF.format(what=f"Prehashed({hash_algorithm.name}) input"))
    local = hash_locally or prehashed
    digest = (data if prehashed else _digest(hash_algorithm, data)) if local else b""
    message, check = (digest, ec.ECDSA(utils.Prehashed(hash_algorithm))) if local else (data, ec.ECDSA(hash_algorithm))

    def verify(signature: bytes) -> None:
        public.verify(ecdsa_der(signature, public.curve), message, check)
    if local:
        return SignRequest("ECDSA", None, digest, verify)
    return SignRequest(f"ECDSA_{name}", None, data, verify)


def ecdsa_der(raw: bytes, curve: ec.EllipticCurve) -> bytes:
    """The DER ``SEQUENCE {r, s}`` of PKCS#11's ``r||s`` (each half the curve's byte length);
    ValueError for an answer of another size (cryptography would embed it unchecked)."""
    size = (curve.key_size + 7) // 8
    if len(raw) != 2 * size:
        raise ValueError(f"an ECDSA signature on {curve.name} is r||s of {2 * size} bytes, the HSM returned "
                         f"{len(raw)}")
    return utils.encode_dss_signature(int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big"))


def eddsa_request(public: ed25519.Ed25519PublicKey | ed448.Ed448PublicKey, data: bytes) -> SignRequest:
    """``EDDSA`` over the message itself, no parameter (pure EdDSA): Ed25519 and Ed448 hash
    inside the signature scheme, twice over the message, so there is nothing to hash locally."""
    def verify(signature: bytes) -> None:
        public.verify(signature, data)
    return SignRequest("EDDSA", None, data, verify)
