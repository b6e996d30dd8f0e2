"""Private keys for cryptography, dnspython and PyJWT whose private half stays on the HSMs of a pool.

    key = hsmfsm.keys.bind_private_key(pool, KeyRef(label="ca"), public_key)   # or pool.private_key("ca")
    cert = x509.CertificateBuilder()...sign(key, hashes.SHA256())              # signed through the pool

The key objects are subclasses of cryptography's key ABCs, so every library
that takes a cryptography private key takes them unchanged; their ``sign()``
goes to a :class:`~hsmfsm.keys.backend.KeyBackend` (a Pool or a SlotConnection)
rather than to one PKCS#11 session, so a signature survives a member's loss as
any pool call does. The package depends on :mod:`hsmfsm.core` and cryptography
only: the runtime depends on it, not the other way round.
"""

from ..core.errors import KeyNotFound, NotExtractable
from .attributes import curve_from_ec_params, public_key_from_attributes, public_key_from_certificate
from .backend import KeyBackend, KeyRef, SignatureCheck
from .errors import SignatureMismatch, UnsupportedRequest
from .private_keys import (
    HSMECPrivateKey,
    HSMEd448PrivateKey,
    HSMEd25519PrivateKey,
    HSMKey,
    HSMPrivateKey,
    HSMRSAPrivateKey,
    PublicKey,
    bind_private_key,
)
from .signing import DIGEST_INFO, SignRequest, pss_salt_length
from .uri import attributes as uri_attributes
from .uri import parse_uri

__all__ = [
    "DIGEST_INFO", "HSMECPrivateKey", "HSMEd448PrivateKey", "HSMEd25519PrivateKey", "HSMKey", "HSMPrivateKey",
    "HSMRSAPrivateKey", "KeyBackend", "KeyNotFound", "KeyRef", "NotExtractable", "PublicKey", "SignRequest",
    "SignatureCheck", "SignatureMismatch", "UnsupportedRequest", "bind_private_key", "curve_from_ec_params",
    "parse_uri", "pss_salt_length", "public_key_from_attributes", "public_key_from_certificate", "uri_attributes",
]
