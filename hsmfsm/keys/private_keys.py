"""cryptography private keys whose private half lives on the HSMs of a pool (or one connection).

cryptography's X.509 builders (certificates, CSRs, CRLs, OCSP, PKCS#7), dnspython's
DNSSEC signing and PyJWT accept any subclass of cryptography's key ABCs and call
its ``sign()``; these classes forward that call to a :class:`~hsmfsm.keys.backend.KeyBackend`
(an :class:`hsmfsm.Pool` or :class:`hsmfsm.SlotConnection`), so a signature
survives a member's loss the way any pool call does, instead of being bound to
one python-pkcs11 session as other PKCS#11 key wrappers are.

Each class implements every abstract method of the installed cryptography with
the ABC's parameter names (signxml passes ``padding=``/``algorithm=``/
``signature_algorithm=`` by keyword). ``public_key()`` is the public half given
at construction: cryptography calls it while building a PSS signature, so it
must not cost an HSM round trip.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, overload

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric import padding as _padding
from cryptography.hazmat.primitives.asymmetric import utils as _utils

from ..core.errors import NotExtractable
from .backend import KeyBackend, KeyRef, SignatureCheck
from .errors import SignatureMismatch, UnsupportedRequest
from .signing import SignRequest, ecdsa_der, ecdsa_request, eddsa_request, oaep_request, rsa_request

if TYPE_CHECKING:  # cryptography.utils.Buffer is recent; annotations only
    from cryptography.utils import Buffer

log = logging.getLogger("hsmfsm.keys")

#: The public keys a key object can be bound to.
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey


class HSMKey:
    """What every bound key shares: the backend, how the key is found on it, and how it signs.

    ``verify_after_sign``: every answer is checked against the public key before it is
    returned; the check goes to the backend with the request so a pool can refuse a wrong
    member's answer and ask another member, and an answer that still does not verify raises
    :class:`~hsmfsm.keys.errors.SignatureMismatch` (an RSA-CRT fault in one HSM, or a member
    holding another key under the same label, never reaches a certificate).
    ``hash_locally``: hash in Python and send the digest (the default), or use the
    hash-and-sign mechanisms for HSMs whose key policy requires them.
    ``deadline``: passed to every backend call as ``deadline=`` (None: the backend's own).
    """

    def __init__(self, backend: KeyBackend, ref: KeyRef, *, verify: bool = False, hash_locally: bool = True,
                 deadline: float | None = None) -> None:
        if not isinstance(ref, KeyRef):
            raise TypeError(f"ref must be a hsmfsm.keys.KeyRef, got {ref!r}")
        self._backend, self._ref = backend, ref
        self._verify, self._hash_locally, self._deadline = bool(verify), bool(hash_locally), deadline

    @property
    def backend(self) -> KeyBackend:
        """The pool or connection the key signs through."""
        return self._backend

    @property
    def ref(self) -> KeyRef:
        """How the key is found on every member (label, CKA_ID)."""
        return self._ref

    @property
    def label(self) -> str | None:
        return self._ref.label

    @property
    def key_id(self) -> bytes | None:
        return self._ref.key_id

    @property
    def verify_after_sign(self) -> bool:
        return self._verify

    @property
    def hash_locally(self) -> bool:
        return self._hash_locally

    @property
    def deadline(self) -> float | None:
        return self._deadline

    def _who(self) -> str:
        who: str | None = getattr(self, "_who_text", None)
        if who is None:  # formatted once: it is passed on every signature, for error messages
            who = self._who_text = f"HSM key {self._ref}"
        return who

    def _backend_name(self) -> str:
        name = getattr(self._backend, "name", None)
        return name if isinstance(name, str) else type(self._backend).__name__

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._ref} ({self._describe()}) via {self._backend_name()}>"

    def _describe(self) -> str:
        raise NotImplementedError

    def _send(self, request: SignRequest) -> bytes:
        """Ask the backend for the signature; with ``verify_after_sign`` hand it the check, and
        never return an answer that fails it."""
        check: SignatureCheck | None = None
        accepted: list[bytes] = []
        if self._verify:
            def check(signature: bytes) -> bool:
                ok = request.accepts(signature)
                if ok:
                    accepted.append(signature)
                return ok
        signature = self._backend.sign(self._ref.label, request.payload, request.mechanism, request.param,
                                       key_id=self._ref.key_id, deadline=self._deadline, check=check)
        if not isinstance(signature, bytes):
            signature = bytes(signature)
        # The backend may return without consulting the check (or return an answer it rejected):
        # check here whatever it did not already accept.
        if self._verify and signature not in accepted and not request.accepts(signature):
            raise SignatureMismatch(self._backend_name(),
                                    f"{self._who()}: the {request.mechanism} signature returned does not verify "
                                    "against the key's public half; it was not returned")
        return signature

    def _not_extractable(self, what: str) -> NotExtractable:
        return NotExtractable(f"{self._who()}: {what}: the private key stays on the HSM (non-extractable); "
                              "public_key() gives the public half")



class HSMRSAPrivateKey(HSMKey, rsa.RSAPrivateKey):
    """An RSA key on the HSM: ``sign`` (PKCS#1 v1.5, PSS, ``Prehashed``, ``NoDigestInfo``) and
    ``decrypt`` (PKCS#1 v1.5, OAEP) go through the backend."""

    def __init__(self, backend: KeyBackend, ref: KeyRef, public_key: rsa.RSAPublicKey, *, verify: bool = False,
                 hash_locally: bool = True, deadline: float | None = None) -> None:
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise TypeError(f"HSM key {ref}: an RSA key needs an RSA public key, got {type(public_key).__name__}")
        super().__init__(backend, ref, verify=verify, hash_locally=hash_locally, deadline=deadline)
        self._public = public_key

    def _describe(self) -> str:
        return f"RSA {self.key_size}"

    def sign(self, data: bytes, padding: _padding.AsymmetricPadding,
             algorithm: _utils.Prehashed | hashes.HashAlgorithm | _utils.NoDigestInfo) -> bytes:
        request = rsa_request(self._public, bytes(data), padding, algorithm, self._hash_locally, self._who())
        return self._send(request)

    def decrypt(self, ciphertext: bytes, padding: _padding.AsymmetricPadding) -> bytes:
        mechanism, param = oaep_request(padding, self._who())
        result = self._backend.decrypt(self._ref.label, bytes(ciphertext), mechanism, param,
                                       key_id=self._ref.key_id, deadline=self._deadline)
        return bytes(result)

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        raise self._not_extractable("private_numbers")

    def private_bytes(self, encoding: serialization.Encoding, format: serialization.PrivateFormat,
                      encryption_algorithm: serialization.KeySerializationEncryption) -> bytes:
        raise self._not_extractable("private_bytes")

    def __copy__(self) -> HSMRSAPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[Any, Any]) -> HSMRSAPrivateKey:
        return self


class HSMECPrivateKey(HSMKey, ec.EllipticCurvePrivateKey):
    """An EC key on the HSM: ``sign`` with ECDSA (the HSM's ``r||s`` returned DER-encoded, as
    cryptography's own keys return it).

    ``ECDSA(hash, deterministic_signing=True)`` (cryptography >= 45; dnspython asks for it by
    default, the X.509 builders with ``ecdsa_deterministic=True``) is signed with the HSM's own
    random nonce: PKCS#11's CKM_ECDSA has no RFC 6979 mode. That signature is as valid as a
    deterministic one for every verifier (verification does not depend on how k was chosen),
    and the nonce comes from the HSM's RNG, which is what one buys an HSM for; only
    reproducibility (the same bytes for the same input) is lost. ``refuse_deterministic=True``
    raises UnsupportedRequest instead, for callers who depend on reproducible signatures.
    """

    def __init__(self, backend: KeyBackend, ref: KeyRef, public_key: ec.EllipticCurvePublicKey, *,
                 verify: bool = False, hash_locally: bool = True, deadline: float | None = None,
                 refuse_deterministic: bool = False) -> None:
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise TypeError(f"HSM key {ref}: an EC key needs an EC public key, got {type(public_key).__name__}")
        super().__init__(backend, ref, verify=verify, hash_locally=hash_locally, deadline=deadline)
        self._public = public_key
        self._refuse_deterministic = refuse_deterministic
        self._told_deterministic = False

    def _describe(self) -> str:
        return f"EC {self.curve.name}"

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if getattr(signature_algorithm, "deterministic_signing", False):
            if self._refuse_deterministic:
                raise UnsupportedRequest(f"{self._who()}: deterministic ECDSA (RFC 6979) was asked for; the HSM "
                                         "signs with its own random nonce (CKM_ECDSA has no deterministic mode) "
                                         "and this key was bound with refuse_deterministic=True")
            if not self._told_deterministic:
                self._told_deterministic = True
                log.debug("%s: deterministic ECDSA asked for; signing with the HSM's random nonce "
                          "(equally valid, not reproducible)", self._who())
        request = ecdsa_request(self._public, bytes(data), signature_algorithm, self._hash_locally, self._who())
        raw = self._send(request)
        try:
            return ecdsa_der(raw, self._public.curve)
        except ValueError as exc:
            raise SignatureMismatch(self._backend_name(), f"{self._who()}: {exc}") from None

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise NotExtractable(f"{self._who()}: ECDH exchange is not offered: a bound HSM key signs only, "
                             "and the private key stays on the HSM")

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise self._not_extractable("private_numbers")

    def private_bytes(self, encoding: serialization.Encoding, format: serialization.PrivateFormat,
                      encryption_algorithm: serialization.KeySerializationEncryption) -> bytes:
        raise self._not_extractable("private_bytes")

    def __copy__(self) -> HSMECPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[Any, Any]) -> HSMECPrivateKey:
        return self


class _EdDSAKey(HSMKey):
    """What Ed25519 and Ed448 keys share: ``sign`` with ``EDDSA`` over the message (``hash_locally``
    does not apply: EdDSA hashes inside the scheme), and no private material to hand out."""

    _scheme = ""
    _public_type: type[Any] = object

    def __init__(self, backend: KeyBackend, ref: KeyRef, public_key: Any, *,
                 verify: bool = False, hash_locally: bool = True, deadline: float | None = None) -> None:
        if not isinstance(public_key, self._public_type):
            raise TypeError(f"HSM key {ref}: an {self._scheme} key needs an {self._scheme} public key, "
                            f"got {type(public_key).__name__}")
        super().__init__(backend, ref, verify=verify, hash_locally=hash_locally, deadline=deadline)
        self._public = public_key

    def _describe(self) -> str:
        return self._scheme

    def sign(self, data: Buffer) -> bytes:
        return self._send(eddsa_request(self._public, bytes(data)))

    def private_bytes(self, encoding: serialization.Encoding, format: serialization.PrivateFormat,
                      encryption_algorithm: serialization.KeySerializationEncryption) -> bytes:
        raise self._not_extractable("private_bytes")

    def private_bytes_raw(self) -> bytes:
        raise self._not_extractable("private_bytes_raw")

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: dict[Any, Any]) -> Any:
        return self


class HSMEd25519PrivateKey(_EdDSAKey, ed25519.Ed25519PrivateKey):
    """An Ed25519 key on the HSM."""

    _scheme = "Ed25519"
    _public_type = ed25519.Ed25519PublicKey

    def public_key(self) -> ed25519.Ed25519PublicKey:
        key: ed25519.Ed25519PublicKey = self._public
        return key


class HSMEd448PrivateKey(_EdDSAKey, ed448.Ed448PrivateKey):
    """An Ed448 key on the HSM: pure Ed448, empty context, no parameter. A module that wants
    CK_EDDSA_PARAMS for Ed448 refuses the call with CKR_MECHANISM_PARAM_INVALID; it cannot
    produce a wrong signature that way."""

    _scheme = "Ed448"
    _public_type = ed448.Ed448PublicKey

    def public_key(self) -> ed448.Ed448PublicKey:
        key: ed448.Ed448PublicKey = self._public
        return key


HSMPrivateKey = HSMRSAPrivateKey | HSMECPrivateKey | HSMEd25519PrivateKey | HSMEd448PrivateKey


@overload
def bind_private_key(backend: KeyBackend, ref: KeyRef, public_key: rsa.RSAPublicKey, *, verify: bool = ...,
                     hash_locally: bool = ..., deadline: float | None = ...) -> HSMRSAPrivateKey: ...
@overload
def bind_private_key(backend: KeyBackend, ref: KeyRef, public_key: ec.EllipticCurvePublicKey, *, verify: bool = ...,
                     hash_locally: bool = ..., deadline: float | None = ...) -> HSMECPrivateKey: ...
@overload
def bind_private_key(backend: KeyBackend, ref: KeyRef, public_key: ed25519.Ed25519PublicKey, *, verify: bool = ...,
                     hash_locally: bool = ..., deadline: float | None = ...) -> HSMEd25519PrivateKey: ...
@overload
def bind_private_key(backend: KeyBackend, ref: KeyRef, public_key: ed448.Ed448PublicKey, *, verify: bool = ...,
                     hash_locally: bool = ..., deadline: float | None = ...) -> HSMEd448PrivateKey: ...
@overload
def bind_private_key(backend: KeyBackend, ref: KeyRef, public_key: Any, *, verify: bool = ...,
                     hash_locally: bool = ..., deadline: float | None = ...) -> HSMPrivateKey: ...
def bind_private_key(backend: KeyBackend, ref: KeyRef, public_key: Any, *, verify: bool = False,
                     hash_locally: bool = True, deadline: float | None = None) -> HSMPrivateKey:
    """The key object for ``ref`` on ``backend``, of the class that fits ``public_key``'s type.

    This is what :meth:`hsmfsm.Pool.private_key` calls. ``public_key`` is a cryptography public
    key (from :func:`~hsmfsm.keys.public_key_from_attributes`, a certificate, or a file), an
    ``x509.Certificate`` (its public key is used), or None: then it is read once now through
    ``backend.public_key(ref.label, key_id=ref.key_id)``. It is cached in the key object:
    cryptography asks for it during PSS signing, and a round trip per signature would double
    the HSM traffic. A public key of another type (DSA, X25519 ...) is UnsupportedRequest.
    """
    if public_key is None:
        public_key = backend.public_key(ref.label, key_id=ref.key_id)
    if isinstance(public_key, x509.Certificate):
        public_key = public_key.public_key()
    options: dict[str, Any] = {"verify": verify, "hash_locally": hash_locally, "deadline": deadline}
    if isinstance(public_key, rsa.RSAPublicKey):
        return HSMRSAPrivateKey(backend, ref, public_key, **options)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return HSMECPrivateKey(backend, ref, public_key, **options)
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return HSMEd25519PrivateKey(backend, ref, public_key, **options)
    if isinstance(public_key, ed448.Ed448PublicKey):
        return HSMEd448PrivateKey(backend, ref, public_key, **options)
    raise UnsupportedRequest(f"HSM key {ref}: no key class for a public key of type {type(public_key).__name__} "
                             "(RSA, EC, Ed25519 and Ed448 are supported)")
