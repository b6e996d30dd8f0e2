"""A scripted HSM and the client modules attached to it: the runtime's :class:`Module` without PKCS#11.

:class:`ScriptedHSM` is a token behind a network link (label, PIN, keys, and a
link that is up, down or hung); :class:`ScriptedModule` is one client module
instance attached to it, as one loaded ``p11-kit-client`` is. A test (or
``hsmfsm simulate``) scripts the HSM's failures and runs the production
connection on a :class:`~hsmfsm.testing.VirtualClock` against them.

The failures behave as docs/FACTS.md measured p11-kit-client over a killed,
hung or restarted server, because recovery code is only as good as the fake it
was tested against:

* ``down()``: every call on an instance connected before raises
  CKR_DEVICE_ERROR, *and keeps doing so after* ``up()``, until the instance is
  re-initialised. An instance initialised while the HSM is down gets CKR_OK
  and then sees no token (HSMFSM_NO_SUCH_TOKEN, CKR_SLOT_ID_INVALID) until it
  is re-initialised after ``up()``.
* ``hang()``: every call on every connected instance blocks, C_Initialize
  too, until ``resume()`` (the call completes normally), the instance's
  ``cut_off()`` or the HSM going down (CKR_DEVICE_ERROR; the instance is then
  broken until re-initialised).
* ``restart()``: sessions and logins are gone, connected instances are broken
  until re-initialised; a session from before a re-initialisation raises
  CKR_SESSION_HANDLE_INVALID.
* ``fail()``, ``slow()``, ``logout_all()``: injected return codes, latency,
  and a token that logged everyone out.

The token's keys are real software keys (``cryptography``), derived from the
HSM's seed, so what it signs verifies with its public key
(:meth:`ScriptedHSM.public_key`, or ``key_attributes`` as a module reads them):
RSA_PKCS over a DigestInfo, RSA_PKCS_PSS over a digest with its parameters,
ECDSA over a digest (``r||s``), EDDSA, and the hash-and-sign mechanisms. HSMs
built with the same seed and keys are replicas; ``replace_key`` makes one that
is not. ``mechanisms`` is what C_GetMechanismList answers.

Failures raise :class:`~hsmfsm.core.errors.ModuleCallError` and nothing else;
the calls whose contract returns a code (``initialize``, ``finalize``,
``close_session``, ``login``, ``session_state``) return it instead. Every call
takes virtual time (``latency``, plus ``slow()``'s extra; ``mechanisms`` none),
is logged in :attr:`ScriptedHSM.calls` and counted (:meth:`ScriptedHSM.count`).

All waiting goes through the clock's primitives (one condition per HSM), so
the same classes also run on :data:`hsmfsm.runtime.clock.SYSTEM` in real time.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.x509.oid import NameOID

from ..core import attributes
from ..core.codes import Code, code_from_name
from ..core.errors import ModuleCallError
from ..core.mechanisms import OAEPParams, PSSParams, ckm_name, ckm_value
from ..runtime.edge import PRIVATE_KEY, PUBLIC_KEY, Clock, Condition, Thread

__all__ = ["Call", "ScriptedHSM", "ScriptedKey", "ScriptedMechanism", "ScriptedModule", "ScriptedSession",
           "ScriptedToken"]

_T = TypeVar("_T")

OK = code_from_name("CKR_OK")
DEVICE_ERROR = code_from_name("CKR_DEVICE_ERROR")
NOT_INITIALIZED = code_from_name("CKR_CRYPTOKI_NOT_INITIALIZED")
SESSION_HANDLE_INVALID = code_from_name("CKR_SESSION_HANDLE_INVALID")
SLOT_ID_INVALID = code_from_name("CKR_SLOT_ID_INVALID")
NO_SUCH_TOKEN = code_from_name("HSMFSM_NO_SUCH_TOKEN")
NO_SUCH_KEY = code_from_name("HSMFSM_NO_SUCH_KEY")
MULTIPLE_OBJECTS = code_from_name("HSMFSM_MULTIPLE_OBJECTS")
USER_NOT_LOGGED_IN = code_from_name("CKR_USER_NOT_LOGGED_IN")
USER_ALREADY_LOGGED_IN = code_from_name("CKR_USER_ALREADY_LOGGED_IN")
PIN_INCORRECT = code_from_name("CKR_PIN_INCORRECT")
PIN_LOCKED = code_from_name("CKR_PIN_LOCKED")
MECHANISM_INVALID = code_from_name("CKR_MECHANISM_INVALID")
KEY_TYPE_INCONSISTENT = code_from_name("CKR_KEY_TYPE_INCONSISTENT")
KEY_FUNCTION_NOT_PERMITTED = code_from_name("CKR_KEY_FUNCTION_NOT_PERMITTED")
ENCRYPTED_DATA_INVALID = code_from_name("CKR_ENCRYPTED_DATA_INVALID")
SIGNATURE_INVALID = code_from_name("CKR_SIGNATURE_INVALID")
DATA_LEN_RANGE = code_from_name("CKR_DATA_LEN_RANGE")
MECHANISM_PARAM_INVALID = code_from_name("CKR_MECHANISM_PARAM_INVALID")

#: CKS_RW_PUBLIC_SESSION and CKS_RW_USER_FUNCTIONS: what session_state reports.
CKS_RW_PUBLIC_SESSION, CKS_RW_USER_FUNCTIONS = 2, 3

#: The Module functions that reach the HSM: the ones ``fail()`` can script and ``count()`` counts.
FUNCTIONS = frozenset({
    "initialize", "finalize", "find_token", "open_session", "close_session", "login", "session_state",
    "token_info", "find_key", "sign", "verify", "decrypt", "generate_random", "generate_keypair",
})
#: ``fail()`` also scripts these, which scenario files do not name (hsmfsm.config.scenario_file).
_SCRIPTABLE = FUNCTIONS | {"key_attributes", "mechanisms"}


@dataclass(frozen=True)
class ScriptedMechanism:
    """The module's own value for a mechanism (what :meth:`ScriptedModule.mechanism` returns)."""

    name: str
    key_type: str
    uses: frozenset[str]


def _mechanisms() -> dict[str, ScriptedMechanism]:
    sign, decrypt, both = frozenset({"sign"}), frozenset({"decrypt"}), frozenset({"sign", "decrypt"})
    table = {"RSA_PKCS": ("RSA", both), "RSA_X_509": ("RSA", both), "RSA_PKCS_OAEP": ("RSA", decrypt),
             "RSA_PKCS_PSS": ("RSA", sign), "ECDSA": ("EC", sign), "EDDSA": ("EC_EDWARDS", sign)}
    for h in ("SHA1", "SHA224", "SHA256", "SHA384", "SHA512"):
        table[f"{h}_RSA_PKCS"] = ("RSA", sign)
        table[f"{h}_RSA_PKCS_PSS"] = ("RSA", sign)
        table[f"ECDSA_{h}"] = ("EC", sign)
    return {name: ScriptedMechanism(name, kt, uses) for name, (kt, uses) in table.items()}


MECHANISMS: dict[str, ScriptedMechanism] = _mechanisms()
#: Key type spellings accepted, and what they mean.
_KEY_TYPES = {"RSA": "RSA", "EC": "EC", "ECDSA": "EC", "EC_EDWARDS": "EC_EDWARDS", "ED25519": "EC_EDWARDS",
              "EDDSA": "EC_EDWARDS"}
#: What a ``None`` mechanism means, as python-pkcs11's defaults.
_DEFAULT_SIGN = {"RSA": MECHANISMS["SHA512_RSA_PKCS"], "EC": MECHANISMS["ECDSA_SHA512"],
                 "EC_EDWARDS": MECHANISMS["EDDSA"]}
_DEFAULT_DECRYPT = {"RSA": MECHANISMS["RSA_PKCS_OAEP"]}
_CIPHERTEXT_MAGIC = b"SCRIPTED1"


class Call(NamedTuple):
    """One module call, as :attr:`ScriptedHSM.calls` logs it (at the virtual time it completed)."""

    at: float
    instance: str
    function: str
    outcome: str


@dataclass(eq=False)
class _KeyPair:
    """A key pair on the token: a private object, its public object (unless ``public`` is False) and,
    if asked for, a self-signed certificate with the same CKA_ID. The key material is derived from
    ``secret`` when first used (an RSA key takes a moment to derive), the same for the same secret."""

    label: str
    key_type: str  # RSA, EC or EC_EDWARDS
    bits: int
    secret: bytes = field(repr=False)
    key_id: bytes = b""
    public: bool = True
    certificate: bool = False
    serial: int = 0  # the key's place on the token: part of what its material is derived from
    #: Signatures by (mechanism, data, param) for the deterministic mechanisms, and verdicts of
    #: verify_signature: the simulator signs and checks the same digest thousands of times.
    _signed: dict[tuple[str, bytes, Any], bytes] = field(default_factory=dict, repr=False)
    _verified: dict[tuple[str, bytes, bytes, Any], bool] = field(default_factory=dict, repr=False)

    @property
    def private(self) -> Any:
        return _private_key(self.key_type, self.bits, self.secret)

    @property
    def public_key(self) -> Any:
        return self.private.public_key()

    def attributes(self) -> dict[str, Any]:
        """What a module reads from the public key object (hsmfsm.keys.public_key_from_attributes's input)."""
        out: dict[str, Any] = {"key_type": self.key_type, "label": self.label, "id": self.key_id}
        public = self.public_key
        if self.key_type == "RSA":
            numbers = public.public_numbers()
            out["modulus"] = _int_bytes(numbers.n)
            out["public_exponent"] = _int_bytes(numbers.e)
        elif self.key_type == "EC":
            out["ec_params"] = _der_oid(_CURVE_OIDS[public.curve.name])
            out["ec_point"] = _der_octets(public.public_bytes(serialization.Encoding.X962,
                                                              serialization.PublicFormat.UncompressedPoint))
        else:
            out["ec_params"] = _der_oid(_ED25519_OID)
            out["ec_point"] = _der_octets(public.public_bytes(serialization.Encoding.Raw,
                                                              serialization.PublicFormat.Raw))
        return out

    def certificate_der(self) -> bytes:
        return _certificate(self.key_type, self.bits, self.secret, self.label)


@dataclass(frozen=True)
class ScriptedToken:
    """A token as ``find_token`` returns it (the slot id stays stable across reconnects, as measured)."""

    label: str
    slot: int
    hsm: ScriptedHSM = field(repr=False, compare=False)


@dataclass(eq=False)
class ScriptedSession:
    """An open session of one module instance, valid for that instance's current initialisation only."""

    handle: int
    module: ScriptedModule = field(repr=False)
    epoch: int = field(repr=False)
    closed: bool = False


@dataclass(eq=False)
class ScriptedKey:
    """A key handle found (or generated) through ``session``: using it needs that session alive."""

    label: str
    kind: str
    key_type: str
    session: ScriptedSession = field(repr=False)
    pair: _KeyPair = field(repr=False)


@dataclass
class _Fault:
    code: Code
    remaining: int | None


def _secret(seed: int, label: str, serial: int, variant: int = 0) -> bytes:
    extra = f"/{variant}" if variant else ""
    return hashlib.sha256(f"hsmfsm-scripted/{seed}/{label}/{serial}{extra}".encode()).digest()


# -- software keys, derived from a secret ---------------------------------------------------------
#
# The scripted token signs with real keys, so that what it returns verifies with its real public
# key (and with hsmfsm.keys' checks). Keys are derived from the HSM's seed, the label and the
# key's serial on the token: replicas built with the same seed hold the same keys, and runs are
# reproducible. cryptography cannot generate an RSA key from a seed, so the primes are found here.

_SMALL_PRIMES = [p for p in range(3, 2000, 2) if all(p % q for q in range(3, int(p ** 0.5) + 1, 2))]
_SMALL_PRODUCT = functools.reduce(lambda a, b: a * b, _SMALL_PRIMES)
_CURVES: dict[int, ec.EllipticCurve] = {256: ec.SECP256R1(), 384: ec.SECP384R1(), 521: ec.SECP521R1()}
_CURVE_OIDS = {"secp256r1": "1.2.840.10045.3.1.7", "secp384r1": "1.3.132.0.34", "secp521r1": "1.3.132.0.35"}
_CURVE_OIDS_BY_BITS = {256: _CURVE_OIDS["secp256r1"], 384: _CURVE_OIDS["secp384r1"], 521: _CURVE_OIDS["secp521r1"]}
_ED25519_OID = "1.3.101.112"
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "SHA1": hashes.SHA1, "SHA224": hashes.SHA224, "SHA256": hashes.SHA256, "SHA384": hashes.SHA384,
    "SHA512": hashes.SHA512}
_DIGEST_SIZES: dict[str, int] = {"SHA1": 20, "SHA224": 28, "SHA256": 32, "SHA384": 48, "SHA512": 64}
_HASH_BY_SIZE: dict[int, str] = {size: name for name, size in _DIGEST_SIZES.items()}
#: DigestInfo prefixes (RFC 8017 9.2 note 1): CKM_RSA_PKCS signs DigestInfo || digest.
_DIGEST_INFO: dict[bytes, str] = {
    bytes.fromhex("3021300906052b0e03021a05000414"): "SHA1",
    bytes.fromhex("302d300d06096086480165030402040500041c"): "SHA224",
    bytes.fromhex("3031300d060960864801650304020105000420"): "SHA256",
    bytes.fromhex("3041300d060960864801650304020205000430"): "SHA384",
    bytes.fromhex("3051300d060960864801650304020305000440"): "SHA512",
}
#: cryptography >= 44 signs ECDSA deterministically (RFC 6979) when asked: reproducible runs.
try:
    ec.ECDSA(hashes.SHA256(), deterministic_signing=True)  # type: ignore[call-arg, unused-ignore]
    _DETERMINISTIC: dict[str, Any] = {"deterministic_signing": True}
except TypeError:  # pragma: no cover - older cryptography
    _DETERMINISTIC = {}
#: Mechanisms whose signatures are a function of key and data (cached per key pair).
_DETERMINISTIC_MECHANISMS = frozenset(
    {"RSA_PKCS", "RSA_X_509", "EDDSA", *(f"{h}_RSA_PKCS" for h in _HASHES)}
    | ({"ECDSA", *(f"ECDSA_{h}" for h in _HASHES)} if _DETERMINISTIC else set()))
_CACHE_LIMIT = 4096


def _is_probable_prime(n: int, rng: random.Random) -> bool:
    """For the large odd candidates of :func:`_prime`, which have no factor below 2000."""
    if pow(2, n - 1, n) != 1:  # Fermat, base 2: throws out nearly every composite at one exponentiation
        return False
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(8):  # Miller-Rabin on what is left
        x = pow(rng.randrange(2, n - 2), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime(bits: int, rng: random.Random, e: int) -> int:
    while True:
        candidate = rng.getrandbits(bits) | (3 << (bits - 2)) | 1  # top two bits: n has exactly 2*bits bits
        if math.gcd(candidate, _SMALL_PRODUCT) == 1 and candidate % e != 1 and _is_probable_prime(candidate, rng):
            return candidate


@functools.lru_cache(maxsize=256)
def _private_key(key_type: str, bits: int, secret: bytes) -> Any:
    """The software private key a secret stands for (cached: an RSA key takes a fraction of a second)."""
    if key_type == "RSA":
        rng = random.Random(hashlib.sha512(b"rsa/" + secret).digest())
        e = 65537
        while True:
            p, q = _prime(bits // 2, rng, e), _prime(bits - bits // 2, rng, e)
            if p != q:
                break
        p, q = max(p, q), min(p, q)
        d = pow(e, -1, (p - 1) * (q - 1))
        return rsa.RSAPrivateNumbers(p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q),
                                     rsa.rsa_crt_iqmp(p, q), rsa.RSAPublicNumbers(e, p * q)).private_key()
    if key_type == "EC":
        curve = _CURVES[bits]
        value = int.from_bytes(hashlib.shake_256(b"ec/" + secret).digest(bits // 8 + 8), "big")
        return ec.derive_private_key(value % (1 << (curve.key_size - 1)) + 1, curve)
    return ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"ed25519/" + secret).digest())


@functools.lru_cache(maxsize=64)
def _certificate(key_type: str, bits: int, secret: bytes, label: str) -> bytes:
    """A self-signed certificate for the key (DER), for tokens that hold a certificate instead of a public key."""
    key = _private_key(key_type, bits, secret)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, label or "scripted")])
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)  # noqa: UP017 - Python 3.11 has UTC too
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(int.from_bytes(hashlib.sha256(b"serial/" + secret).digest()[:8], "big") | 1)
               .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=3650)))
    algorithm = None if key_type == "EC_EDWARDS" else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = _int_bytes(n)
    return bytes([0x80 | len(body)]) + body


def _der_octets(data: bytes) -> bytes:
    return b"\x04" + _der_length(len(data)) + data


def _der_oid(dotted: str) -> bytes:
    parts = [int(x) for x in dotted.split(".")]
    body = bytearray([40 * parts[0] + parts[1]])
    for part in parts[2:]:
        chunk = [part & 0x7F]
        part >>= 7
        while part:
            chunk.append(0x80 | (part & 0x7F))
            part >>= 7
        body += bytes(reversed(chunk))
    return b"\x06" + _der_length(len(body)) + bytes(body)


class _Refusal(ValueError):
    """Data or parameters the token refuses for a mechanism, with the code it answers."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code


def _hash_name(value: Any) -> str:
    """A hash named as PKCS#11 (SHA256), python-pkcs11 (Mechanism.SHA_1, MGF.SHA256) or cryptography spells it."""
    name = value if isinstance(value, str) else getattr(value, "name", None)
    if not isinstance(name, str):
        raise _Refusal(MECHANISM_PARAM_INVALID, f"not a hash: {value!r}")
    name = name.upper().removeprefix("CKM_").removeprefix("CKG_MGF1_").replace("-", "").replace("_", "")
    if name not in _HASHES:
        raise _Refusal(MECHANISM_PARAM_INVALID, f"unknown hash {value!r}")
    return name


def _pss_params(param: Any, mech_hash: str | None, digest_size: int | None, key: Any) -> tuple[str, str, int | Any]:
    """(hash, mgf hash, salt length) from PSSParams, a python-pkcs11 tuple, or the defaults."""
    if isinstance(param, PSSParams):
        return _hash_name(param.hash), _hash_name(param.mgf), param.salt_length
    if isinstance(param, tuple) and len(param) == 3:
        return _hash_name(param[0]), _hash_name(param[1]), int(param[2])
    if param is not None:
        raise _Refusal(MECHANISM_PARAM_INVALID, f"not PSS parameters: {param!r}")
    name = mech_hash or _HASH_BY_SIZE.get(digest_size or 0)
    if name is None:
        raise _Refusal(DATA_LEN_RANGE, f"no PSS parameters, and {digest_size} bytes are no digest")
    return name, name, _DIGEST_SIZES[name]


def _oaep(param: Any) -> padding.OAEP:
    if param is None:  # python-pkcs11's default: SHA-1, MGF1 SHA-1, no label
        h, mgf, label = "SHA1", "SHA1", None
    elif isinstance(param, OAEPParams):
        h, mgf, label = _hash_name(param.hash), _hash_name(param.mgf), param.label
    elif isinstance(param, tuple) and len(param) == 3:
        h, mgf, label = _hash_name(param[0]), _hash_name(param[1]), param[2]
    else:
        raise _Refusal(MECHANISM_PARAM_INVALID, f"not OAEP parameters: {param!r}")
    return padding.OAEP(padding.MGF1(_HASHES[mgf]()), _HASHES[h](), label)


def _ecdsa_digest(data: bytes, curve: ec.EllipticCurve) -> tuple[bytes, hashes.HashAlgorithm]:
    """CKM_ECDSA signs any hash value: as ECDSA, the leftmost bits of ``data`` up to the order's
    size (a short value is a small number: zeros in front). Returned as a digest of a hash of that size."""
    size = (curve.key_size + 7) // 8
    name = _HASH_BY_SIZE.get(size) or "SHA512"
    size = _DIGEST_SIZES[name]
    block = data[:size] if len(data) >= size else bytes(size - len(data)) + data
    return block, _HASHES[name]()


def _rsa_raw(key: Any, block: bytes) -> bytes:
    """m^d mod n of a block as long as the modulus (CKM_RSA_X_509, and CKM_RSA_PKCS over other data)."""
    numbers = key.private_numbers()
    n, size = numbers.public_numbers.n, (key.key_size + 7) // 8
    m = int.from_bytes(block, "big")
    if len(block) > size or m >= n:
        raise _Refusal(DATA_LEN_RANGE, f"{len(block)} bytes: too long for the key")
    mp, mq = pow(m, numbers.dmp1, numbers.p), pow(m, numbers.dmq1, numbers.q)
    s: int = mq + numbers.q * ((numbers.iqmp * (mp - mq)) % numbers.p)
    return s.to_bytes(size, "big")


def _pkcs1_block(data: bytes, size: int) -> bytes:
    if len(data) > size - 11:
        raise _Refusal(DATA_LEN_RANGE, f"{len(data)} bytes: too long for PKCS#1 v1.5 with this key")
    return b"\x00\x01" + b"\xff" * (size - 3 - len(data)) + b"\x00" + data


def _soft_sign(pair: _KeyPair, mech: str, data: bytes, param: Any) -> bytes:
    """What the token returns for ``mech`` over ``data``; ValueError for data or parameters it refuses."""
    cacheable = mech in _DETERMINISTIC_MECHANISMS
    if cacheable:
        cache_key = (mech, data, param)
        found = pair._signed.get(cache_key)
        if found is not None:
            return found
    key = pair.private
    if pair.key_type == "RSA":
        size = (key.key_size + 7) // 8
        if mech == "RSA_PKCS":
            for prefix, name in _DIGEST_INFO.items():
                if data.startswith(prefix) and len(data) == len(prefix) + _DIGEST_SIZES[name]:
                    signature = key.sign(data[len(prefix):], padding.PKCS1v15(), utils.Prehashed(_HASHES[name]()))
                    break
            else:
                signature = _rsa_raw(key, _pkcs1_block(data, size))
        elif mech == "RSA_X_509":
            signature = _rsa_raw(key, bytes(max(0, size - len(data))) + data)
        elif mech == "RSA_PKCS_PSS":
            h, mgf, salt = _pss_params(param, None, len(data), key)
            if len(data) != _DIGEST_SIZES[h]:
                raise _Refusal(DATA_LEN_RANGE, f"RSA_PKCS_PSS over {len(data)} bytes: not a {h} digest")
            signature = key.sign(data, padding.PSS(padding.MGF1(_HASHES[mgf]()), salt),
                                 utils.Prehashed(_HASHES[h]()))
        elif mech.endswith("_RSA_PKCS_PSS"):
            h, mgf, salt = _pss_params(param, mech.removesuffix("_RSA_PKCS_PSS"), None, key)
            signature = key.sign(data, padding.PSS(padding.MGF1(_HASHES[mgf]()), salt), _HASHES[h]())
        else:
            signature = key.sign(data, padding.PKCS1v15(), _HASHES[mech.removesuffix("_RSA_PKCS")]())
    elif pair.key_type == "EC":
        if mech == "ECDSA":
            digest, algorithm = _ecdsa_digest(data, key.curve)
            der = key.sign(digest, ec.ECDSA(utils.Prehashed(algorithm), **_DETERMINISTIC))
        else:
            der = key.sign(data, ec.ECDSA(_HASHES[mech.removeprefix("ECDSA_")](), **_DETERMINISTIC))
        r, s = utils.decode_dss_signature(der)
        size = (key.curve.key_size + 7) // 8
        signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    else:
        signature = key.sign(data)
    if cacheable:
        if len(pair._signed) >= _CACHE_LIMIT:
            pair._signed.clear()
        pair._signed[cache_key] = signature
    return bytes(signature)


def _soft_verify(pair: _KeyPair, mech: str, data: bytes, signature: bytes, param: Any) -> bool:
    """Whether ``signature`` is a valid ``mech`` signature of ``data`` by the pair's key."""
    cache_key = (mech, data, signature, param)
    found = pair._verified.get(cache_key)
    if found is not None:
        return found
    try:
        _verify_or_raise(pair, mech, data, signature, param)
        ok = True
    except (InvalidSignature, ValueError, TypeError, KeyError):
        ok = False
    if len(pair._verified) >= _CACHE_LIMIT:
        pair._verified.clear()
    pair._verified[cache_key] = ok
    return ok


def _verify_or_raise(pair: _KeyPair, mech: str, data: bytes, signature: bytes, param: Any) -> None:
    public = pair.public_key
    if pair.key_type == "RSA":
        size = (public.key_size + 7) // 8
        if mech in ("RSA_PKCS", "RSA_X_509"):
            if len(signature) != size:
                raise InvalidSignature()
            numbers = public.public_numbers()
            recovered = pow(int.from_bytes(signature, "big"), numbers.e, numbers.n).to_bytes(size, "big")
            expected = _pkcs1_block(data, size) if mech == "RSA_PKCS" else bytes(max(0, size - len(data))) + data
            if not hmac.compare_digest(recovered, expected):
                raise InvalidSignature()
        elif mech == "RSA_PKCS_PSS":
            h, mgf, salt = _pss_params(param, None, len(data), public)
            salt = salt if param is not None else padding.PSS.AUTO
            public.verify(signature, data, padding.PSS(padding.MGF1(_HASHES[mgf]()), salt),
                          utils.Prehashed(_HASHES[h]()))
        elif mech.endswith("_RSA_PKCS_PSS"):
            h, mgf, salt = _pss_params(param, mech.removesuffix("_RSA_PKCS_PSS"), None, public)
            salt = salt if param is not None else padding.PSS.AUTO
            public.verify(signature, data, padding.PSS(padding.MGF1(_HASHES[mgf]()), salt), _HASHES[h]())
        else:
            public.verify(signature, data, padding.PKCS1v15(), _HASHES[mech.removesuffix("_RSA_PKCS")]())
    elif pair.key_type == "EC":
        size = (public.curve.key_size + 7) // 8
        if len(signature) != 2 * size:
            raise InvalidSignature()
        der = utils.encode_dss_signature(int.from_bytes(signature[:size], "big"),
                                         int.from_bytes(signature[size:], "big"))
        if mech == "ECDSA":
            digest, algorithm = _ecdsa_digest(data, public.curve)
            public.verify(der, digest, ec.ECDSA(utils.Prehashed(algorithm)))
        else:
            public.verify(der, data, ec.ECDSA(_HASHES[mech.removeprefix("ECDSA_")]()))
    else:
        public.verify(signature, data)


def _soft_decrypt(pair: _KeyPair, mech: str, data: bytes, param: Any) -> bytes:
    key = pair.private
    if mech == "RSA_PKCS_OAEP":
        return bytes(key.decrypt(data, _oaep(param)))
    if mech == "RSA_PKCS":
        return bytes(key.decrypt(data, padding.PKCS1v15()))
    size = (key.key_size + 7) // 8
    if len(data) != size:
        raise _Refusal(ENCRYPTED_DATA_INVALID, "RSA_X_509 ciphertext of the wrong length")
    return _rsa_raw(key, data)


def _keystream(secret: bytes, n: int) -> bytes:
    blocks = (hashlib.sha256(secret + b"ct" + i.to_bytes(4, "big")).digest() for i in range(n // 32 + 1))
    return b"".join(blocks)[:n]


class ScriptedHSM:
    """A token behind a network link, with scripted failures.

    ``keys`` maps key labels to key types (``"RSA"``: 2048 bits, ``"EC"``: P-256,
    ``"EC_EDWARDS"`` or ``"ED25519"``); each label is a key pair (a private and a
    public object) of real software keys derived from ``seed``, the label and the
    order the keys were added in: HSMs made with the same seed and keys are
    replicas (the same key material), and signatures verify with
    :meth:`public_key`. :meth:`add_key` adds keys with a CKA_ID, without a public
    object, or with a certificate; :meth:`replace_key` gives one HSM another key
    under the same label. ``mechanisms``: the mechanism names the token offers
    (C_GetMechanismList; default: every mechanism the scripted module knows);
    :attr:`mechanisms` may be changed later. ``pin_retries``: after that many
    wrong PINs in a row the PIN is locked (CKR_PIN_LOCKED); None never locks.
    ``clock`` is needed only for :meth:`at` before any module is attached (a
    module attaches its own clock).
    """

    def __init__(self, label: str = "token", pin: str = "1234", *, keys: Mapping[str, str] | None = None,
                 seed: int = 0, latency: float = 0.0005, slot: int = 1, pin_retries: int | None = None,
                 mechanisms: Iterable[str] | None = None, clock: Clock | None = None) -> None:
        self.label, self.slot, self.seed = label, slot, seed
        self._pin = pin
        #: Virtual seconds every call takes (plus :meth:`slow`'s extra).
        self.latency = latency
        self.pin_retries = pin_retries
        self._wrong_pins = 0
        self._rng = random.Random(seed)
        self._serial = 0
        self._keys: list[_KeyPair] = []
        for key_label, key_type in (keys if keys is not None else {"rsa": "RSA", "ec": "EC"}).items():
            self.add_key(key_label, key_type)
        #: What C_GetMechanismList answers (names without CKM_); a call with another mechanism
        #: fails with CKR_MECHANISM_INVALID.
        self.mechanisms: frozenset[str] = (frozenset(MECHANISMS) if mechanisms is None
                                           else frozenset(m.removeprefix("CKM_") for m in mechanisms))
        self._state = "up"
        #: Bumped when the link drops (down, restart): instances connected before are broken.
        self._link = 1
        self._extra = 0.0
        self._faults: dict[str, deque[_Fault]] = {}
        #: (instance serial, instance epoch) of every application logged in.
        self._logins: set[tuple[int, int]] = set()
        self._instances = 0
        #: Every call, in completion order.
        self.calls: list[Call] = []
        #: Calls per function name.
        self.counts: Counter[str] = Counter()
        self._clock: Clock | None = None
        self._cond: Condition | None = None
        if clock is not None:
            self._bind(clock)

    # -- scripting ---------------------------------------------------------------

    @property
    def state(self) -> str:
        """``up``, ``down`` or ``hung``."""
        return self._state

    def down(self) -> None:
        """The server dies: connected instances are broken (hung calls return CKR_DEVICE_ERROR)."""
        self._change(state="down", drop=True)

    def up(self) -> None:
        """The server is back. Broken instances stay broken until re-initialised."""
        if self._state == "down":
            self._change(state="up")

    def hang(self) -> None:
        """Every call (C_Initialize too) blocks until :meth:`resume`, a cut-off, or :meth:`down`."""
        if self._state == "up":
            self._change(state="hung")

    def resume(self) -> None:
        """A hung HSM answers again: blocked calls complete normally."""
        if self._state == "hung":
            self._change(state="up")

    def restart(self) -> None:
        """The HSM restarts (and is up): sessions and logins are gone, connected instances broken."""
        self._change(state="up", drop=True)

    def logout_all(self) -> None:
        """The token logged every application out (sessions stay open)."""
        self._change(logout=True)

    def slow(self, seconds: float) -> None:
        """Extra virtual latency on every call from now on (``slow(0)`` ends it)."""
        if seconds < 0:
            raise ValueError("slow() takes a non-negative number of seconds")
        self._extra = seconds

    def fail(self, function: str, code_name: str, times: int | None = 1) -> None:
        """The next ``times`` calls of ``function`` that reach the HSM fail with ``code_name``
        (``times=None``: until :meth:`clear_faults`). Functions returning a code return it."""
        if function not in _SCRIPTABLE:
            raise ValueError(f"fail(): {function!r} is not a module call ({', '.join(sorted(_SCRIPTABLE))})")
        code = code_from_name(code_name)
        if code == OK:
            raise ValueError("fail() needs an error code, not CKR_OK")
        if times is not None and times < 1:
            raise ValueError("fail(): times must be at least 1, or None")
        self._faults.setdefault(function, deque()).append(_Fault(code, times))

    def clear_faults(self) -> None:
        self._faults.clear()

    def at(self, t: float, action: Callable[..., object] | str, *args: Any) -> Thread:
        """Run ``action(*args)`` (or the HSM's method of that name) at virtual time ``t``, from a clock thread."""
        clock = self._clock
        if clock is None:
            raise RuntimeError("ScriptedHSM.at() needs a clock: pass clock= or attach a ScriptedModule first")
        act: Callable[..., object] = getattr(self, action) if isinstance(action, str) else action

        def scheduled() -> None:
            delay = t - clock.monotonic()
            if delay > 0:
                clock.sleep(delay)
            act(*args)

        name = action if isinstance(action, str) else getattr(action, "__name__", "action")
        return clock.start_thread(scheduled, f"{self.label}-at-{t:g}-{name}")

    def add_key(self, label: str, key_type: str = "RSA", bits: int | None = None, *, key_id: bytes | None = None,
                public: bool = True, certificate: bool = False) -> None:
        """Put a key pair on the token (as provisioning would). ``bits``: RSA 2048, EC 256 (P-256; 384 and 521
        too) by default. ``key_id``: its CKA_ID (default: derived like the key, so replicas agree).
        ``public=False``: no public key object (the public key is then read from the private key's
        attributes for RSA, or from the certificate); ``certificate``: a self-signed certificate
        with the same CKA_ID is on the token too."""
        self._keys.append(self._new_pair(label, key_type, bits, key_id=key_id, public=public,
                                         certificate=certificate))

    def replace_key(self, label: str, *, variant: int = 1) -> None:
        """Give every key labelled ``label`` other key material (same type, size, CKA_ID and objects):
        a replica that is not one. ``variant`` 0 gives back the original material."""
        pairs = self._pairs(label)
        if not pairs:
            raise KeyError(f"no key labelled {label!r} on {self.label}")
        for pair in pairs:
            pair.secret = _secret(self.seed, pair.label, pair.serial, variant)
            pair._signed.clear()
            pair._verified.clear()

    def public_key(self, label: str, key_id: bytes | None = None) -> Any:
        """The cryptography public key of the key labelled ``label`` (and with that CKA_ID, if given)."""
        pairs = self._match(label, key_id)
        if not pairs:
            raise KeyError(f"no key labelled {label!r} on {self.label}")
        return pairs[0].public_key

    # -- checking what the token did --------------------------------------------------

    def count(self, function: str, outcome: str | None = None) -> int:
        """Calls of ``function`` made so far (with that outcome code name, if given)."""
        if outcome is None:
            return self.counts[function]
        return sum(1 for c in self.calls if c.function == function and c.outcome == outcome)

    def verify_signature(self, label: str, data: bytes, signature: bytes, mechanism: Any = None,
                         param: Any = None) -> bool:
        """Whether ``signature`` is a valid signature of ``data`` by the key labelled ``label``, verified
        with that key's public key as ``mechanism`` (and its parameters: PSSParams; none: PSS salt of any
        length) defines it. A mechanism of another key type never verifies."""
        mech = _mechanism_value(mechanism)
        for pair in self._pairs(label):
            m = mech or _DEFAULT_SIGN.get(pair.key_type)
            if m is not None and m.key_type == pair.key_type and _soft_verify(pair, m.name, bytes(data),
                                                                               bytes(signature), param):
                return True
        return False

    def encrypt(self, label: str, plaintext: bytes) -> bytes:
        """``plaintext`` encrypted to the key labelled ``label`` (what its ``decrypt`` turns back, with any
        mechanism): a scripted ciphertext, quick for the simulator. For a real RSA ciphertext, encrypt
        with :meth:`public_key`; ``decrypt`` takes those too."""
        pairs = self._pairs(label)
        if not pairs:
            raise KeyError(f"no key labelled {label!r} on {self.label}")
        secret = pairs[0].secret
        tag = hmac.new(secret, b"tag" + plaintext, hashlib.sha256).digest()[:16]
        return _CIPHERTEXT_MAGIC + tag + bytes(a ^ b for a, b in zip(plaintext, _keystream(secret, len(plaintext))))

    def key_labels(self) -> list[str]:
        return [pair.label for pair in self._keys]

    def __repr__(self) -> str:
        return f"<ScriptedHSM {self.label} {self._state} keys={len(self._keys)} calls={len(self.calls)}>"

    # -- inside --------------------------------------------------------------------------

    def _bind(self, clock: Clock) -> None:
        if self._clock is None:
            self._clock = clock
            self._cond = clock.condition(clock.lock())
        elif clock is not self._clock:
            raise ValueError(f"{self.label}: every module of one ScriptedHSM must use the same clock")

    def _change(self, state: str | None = None, drop: bool = False, logout: bool = False) -> None:
        """Change the HSM under its lock and wake every waiting call to look again."""
        cond = self._cond
        if cond is None:
            self._apply(state, drop, logout)
            return
        with cond:
            self._apply(state, drop, logout)
            cond.notify_all()

    def _apply(self, state: str | None, drop: bool, logout: bool) -> None:
        if state is not None:
            self._state = state
        if drop:
            self._link += 1
        if drop or logout:
            self._logins.clear()

    def _new_pair(self, label: str, key_type: str, bits: int | None, *, key_id: bytes | None = None,
                  public: bool = True, certificate: bool = False) -> _KeyPair:
        kt = _KEY_TYPES.get(key_type.upper().removeprefix("CKK_"))
        if kt is None:
            raise ValueError(f"key type {key_type!r}: RSA, EC or EC_EDWARDS (ED25519)")
        if bits is None or kt == "EC_EDWARDS":
            bits = {"RSA": 2048, "EC": 256, "EC_EDWARDS": 256}[kt]
        if kt == "EC" and bits not in _CURVES:
            raise ValueError(f"EC keys of {bits} bits: {', '.join(map(str, _CURVES))}")
        if kt == "RSA" and not 512 <= bits <= 8192:
            raise ValueError(f"RSA keys of {bits} bits: 512 to 8192")
        self._serial += 1
        secret = _secret(self.seed, label, self._serial)
        if key_id is None:
            key_id = hashlib.sha256(b"id/" + secret).digest()[:8]
        return _KeyPair(label, kt, bits, secret, bytes(key_id), public, certificate, self._serial)

    def _pairs(self, label: str) -> list[_KeyPair]:
        return [pair for pair in self._keys if pair.label == label]

    def _match(self, label: str | None, key_id: bytes | None) -> list[_KeyPair]:
        return [pair for pair in self._keys
                if (label is None or pair.label == label) and (key_id is None or pair.key_id == key_id)]

    def _take_fault(self, function: str) -> Code | None:
        queue = self._faults.get(function)
        if not queue:
            return None
        fault = queue[0]
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining == 0:
                queue.popleft()
        return fault.code

    def _record(self, now: float, instance: str, function: str, outcome: str) -> None:
        self.calls.append(Call(now, instance, function, outcome))
        self.counts[function] += 1


def _lookup(label: str | None, key_id: bytes | None) -> str:
    """A key lookup as messages name it (hsmfsm.keys.KeyRef's spelling)."""
    parts = ([f"label {label!r}"] if label is not None else []) + ([f"id {key_id.hex()}"] if key_id is not None else [])
    return " and ".join(parts) or "any key"


def _mechanism_info(mechanism: ScriptedMechanism) -> tuple[int, int, int]:
    """(min, max, flags) as SoftHSM reports them for the key type and uses."""
    sizes = {"RSA": (1024, 16384), "EC": (256, 521), "EC_EDWARDS": (255, 448)}.get(mechanism.key_type, (0, 0))
    flags = 0
    if "sign" in mechanism.uses:
        flags |= _CKF_SIGN | _CKF_VERIFY
    if "decrypt" in mechanism.uses:
        flags |= _CKF_ENCRYPT | _CKF_DECRYPT
    return sizes[0], sizes[1], flags


_CKF_ENCRYPT, _CKF_DECRYPT, _CKF_SIGN, _CKF_VERIFY = 0x100, 0x200, 0x800, 0x2000
_CKF_GENERATE_KEY_PAIR = 0x10000
_CKK = {"RSA": attributes.CKK_RSA, "EC": attributes.CKK_EC, "EC_EDWARDS": attributes.CKK_EC_EDWARDS}


def _pair_objects(pair: _KeyPair, *, private: bool) -> list[dict[int, Any]]:
    """The raw attribute listing of a key pair's objects (hsmfsm.runtime.edge.Module.list_objects)."""
    a = attributes
    public_values = pair.attributes()
    common: dict[int, Any] = {a.CKA_TOKEN: True, a.CKA_LABEL: pair.label.encode(), a.CKA_ID: pair.key_id,
                              a.CKA_KEY_TYPE: _CKK[pair.key_type], a.CKA_MODIFIABLE: True, a.CKA_LOCAL: True,
                              a.CKA_DERIVE: False}
    material: dict[int, Any] = {}
    if pair.key_type == "RSA":
        material = {a.CKA_MODULUS: public_values["modulus"], a.CKA_PUBLIC_EXPONENT: public_values["public_exponent"],
                    a.CKA_MODULUS_BITS: pair.bits}
    else:
        material = {a.CKA_EC_PARAMS: public_values["ec_params"]}
    rsa = pair.key_type == "RSA"
    out: list[dict[int, Any]] = []
    if private:
        out.append({**common, a.CKA_CLASS: a.CKO_PRIVATE_KEY, a.CKA_PRIVATE: True, a.CKA_SENSITIVE: True,
                    a.CKA_EXTRACTABLE: False, a.CKA_ALWAYS_SENSITIVE: True, a.CKA_NEVER_EXTRACTABLE: True,
                    a.CKA_SIGN: True, a.CKA_DECRYPT: rsa, a.CKA_UNWRAP: False, a.CKA_ALWAYS_AUTHENTICATE: False,
                    **{k: v for k, v in material.items() if k != a.CKA_MODULUS_BITS}})
    if pair.public:
        out.append({**common, a.CKA_CLASS: a.CKO_PUBLIC_KEY, a.CKA_PRIVATE: False, a.CKA_VERIFY: True,
                    a.CKA_ENCRYPT: rsa, a.CKA_WRAP: False, **material,
                    **({} if rsa else {a.CKA_EC_POINT: public_values["ec_point"]})})
    if pair.certificate:
        out.append({a.CKA_CLASS: a.CKO_CERTIFICATE, a.CKA_TOKEN: True, a.CKA_PRIVATE: False,
                    a.CKA_LABEL: pair.label.encode(), a.CKA_ID: pair.key_id,
                    a.CKA_CERTIFICATE_TYPE: a.CKC_X_509, a.CKA_VALUE: pair.certificate_der()})
    return out


def _mechanism_value(mechanism: Any) -> ScriptedMechanism | None:
    """A mechanism by value, name (``CKM_`` prefix optional), CKM number or enum with that ``name``;
    None stays None."""
    if mechanism is None or isinstance(mechanism, ScriptedMechanism):
        return mechanism
    if isinstance(mechanism, int) and not hasattr(mechanism, "name"):
        mechanism = ckm_name(mechanism)
    name = mechanism if isinstance(mechanism, str) else getattr(mechanism, "name", None)
    if isinstance(name, str):
        found = MECHANISMS.get(name.removeprefix("CKM_"))
        if found is not None:
            return found
    raise ValueError(f"unknown mechanism {mechanism!r} (a name such as SHA256_RSA_PKCS; "
                     f"known: {', '.join(sorted(MECHANISMS))})")


class ScriptedModule:
    """One client module instance on a :class:`ScriptedHSM`, with the shape of
    :class:`hsmfsm.runtime.edge.Module`.

    ``can_cut_off``: whether :meth:`cut_off` can make hung calls return (a socket
    module); ``parallel``: what the module reports for CKF_OS_LOCKING_OK.
    """

    def __init__(self, hsm: ScriptedHSM, clock: Clock, name: str = "module", *, can_cut_off: bool = True,
                 parallel: bool = True) -> None:
        hsm._bind(clock)
        if hsm._cond is None:  # pragma: no cover - _bind always makes it
            raise RuntimeError("ScriptedHSM without a condition")
        self.hsm = hsm
        self.name = name
        self.initialized = False
        self.parallel = parallel
        self._can_cut_off = can_cut_off
        self._clock = clock
        self._cond: Condition = hsm._cond
        hsm._instances += 1
        self._serial = hsm._instances
        #: Bumped by every (re)initialisation: sessions of an older epoch are stale.
        self._epoch = 0
        #: The HSM link this instance is connected on; None: initialised while the HSM was down (no token).
        self._link: int | None = None
        #: cut_off() shut the link: broken until re-initialised.
        self._severed = False
        #: Bumped by every cut_off(): calls in flight compare it to notice the cut.
        self._cuts = 0
        self._inflight = 0
        self._handles = 0
        self._sessions: set[int] = set()

    @property
    def can_cut_off(self) -> bool:
        return self._can_cut_off

    @property
    def open_sessions(self) -> int:
        """Sessions open on this instance since its last initialisation."""
        return len(self._sessions)

    @property
    def logged_in(self) -> bool:
        return (self._serial, self._epoch) in self.hsm._logins

    # -- lifecycle ----------------------------------------------------------------------

    def prepare(self, timeout: float) -> None:
        self._note("prepare")

    def stop(self) -> None:
        self._note("stop")

    def for_child(self) -> ScriptedModule:
        self._note("for_child")
        return ScriptedModule(self.hsm, self._clock, self.name, can_cut_off=self._can_cut_off,
                              parallel=self.parallel)

    def initialize(self) -> Code:
        """C_Finalize (if initialised) + C_Initialize: CKR_OK even while the HSM is down (then no token).
        Blocks while the HSM hangs; a cut-off (or the HSM dying) then returns CKR_DEVICE_ERROR and leaves
        the instance uninitialised, as does an injected failure."""
        hsm = self.hsm

        def connect() -> Code:
            self._link = None if hsm._state == "down" else hsm._link
            self.initialized = True
            return OK

        try:
            return self._run("initialize", connect, mode="initialize")
        except ModuleCallError as exc:
            return exc.code

    def finalize(self) -> Code:
        def op() -> Code:
            self._teardown()
            return OK

        try:
            return self._run("finalize", op, mode="finalize")
        except ModuleCallError as exc:
            return exc.code

    def cut_off(self) -> tuple[int, int]:
        """Shut the instance's link: calls in flight (hung, or waiting for their reply) return
        CKR_DEVICE_ERROR and the instance is broken until re-initialised. Returns (0, calls made to return);
        (0, 0) and nothing happens when ``can_cut_off`` is False."""
        cut = 0
        if self._can_cut_off:
            with self._cond:
                cut = self._inflight
                if self.initialized and self._link is not None:
                    self._severed = True
                self._cuts += 1
                self._cond.notify_all()
        self._note("cut_off")
        return 0, cut

    def cut_link(self) -> bool:
        """This instance's link alone (each instance has its own): as :meth:`cut_off`; False when
        ``can_cut_off`` is False."""
        return self._can_cut_off and self.cut_off()[1] >= 0

    def new_link(self) -> ScriptedModule | None:
        """One more client instance on the same HSM, with a link of its own (as a second p11-kit-client
        instance is), for a module that can be cut off; None otherwise (sessions share this one)."""
        if not self._can_cut_off:
            return None
        return ScriptedModule(self.hsm, self._clock, self.name, can_cut_off=True, parallel=self.parallel)

    # -- token and session ------------------------------------------------------------------

    def find_token(self, label: str) -> Any:
        hsm = self.hsm

        def op() -> ScriptedToken:
            if self._link is None or label != hsm.label:
                raise ModuleCallError(NO_SUCH_TOKEN, f"{self.name}: no token labelled {label!r}")
            return ScriptedToken(hsm.label, hsm.slot, hsm)

        return self._run("find_token", op)

    def open_session(self, token: Any) -> Any:
        def op() -> ScriptedSession:
            self._check_token(token)
            self._handles += 1
            self._sessions.add(self._handles)
            return ScriptedSession(self._handles, self, self._epoch)

        return self._run("open_session", op)

    def close_session(self, session: Any) -> Code:
        """Closing the instance's last session logs it out, as PKCS#11 says."""
        def op() -> Code:
            s = self._check_session(session)
            s.closed = True
            self._sessions.discard(s.handle)
            if not self._sessions:
                self.hsm._logins.discard((self._serial, self._epoch))
            return OK

        try:
            return self._run("close_session", op)
        except ModuleCallError as exc:
            return exc.code

    def login(self, session: Any, pin: str) -> Code:
        hsm = self.hsm

        def op() -> Code:
            self._check_session(session)
            if self.logged_in:
                return USER_ALREADY_LOGGED_IN
            if hsm.pin_retries is not None and hsm._wrong_pins >= hsm.pin_retries:
                return PIN_LOCKED
            if not hmac.compare_digest(pin.encode(), hsm._pin.encode()):
                hsm._wrong_pins += 1
                return PIN_INCORRECT
            hsm._wrong_pins = 0
            hsm._logins.add((self._serial, self._epoch))
            return OK

        try:
            return self._run("login", op, outcome=lambda code: code.name)
        except ModuleCallError as exc:
            return exc.code

    def session_state(self, session: Any) -> tuple[Code, int]:
        def op() -> tuple[Code, int]:
            self._check_session(session)
            return OK, CKS_RW_USER_FUNCTIONS if self.logged_in else CKS_RW_PUBLIC_SESSION

        try:
            return self._run("session_state", op)
        except ModuleCallError as exc:
            return exc.code, 0

    def token_info(self, token: Any) -> None:
        self._run("token_info", lambda: self._check_token(token))

    # -- keys and operations ---------------------------------------------------------------------

    def find_key(self, session: Any, label: str | None, kind: str, key_id: bytes | None = None) -> Any:
        """Exactly one key of ``kind`` with that label and/or CKA_ID (None: any)."""
        if kind not in (PRIVATE_KEY, PUBLIC_KEY):
            raise ValueError(f"key kind {kind!r}: {PRIVATE_KEY!r} or {PUBLIC_KEY!r}")

        def op() -> ScriptedKey:
            s = self._check_session(session)
            # Private objects are invisible to a session that is not logged in.
            if kind == PRIVATE_KEY and not self.logged_in:
                pairs = []
            else:
                pairs = [p for p in self.hsm._match(label, key_id) if kind == PRIVATE_KEY or p.public]
            lookup = _lookup(label, key_id)
            if not pairs:
                raise ModuleCallError(NO_SUCH_KEY, f"{self.name}: no {kind} key with {lookup}")
            if len(pairs) > 1:
                found = ", ".join(f"label {p.label!r} id {p.key_id.hex() or '(none)'}" for p in pairs)
                raise ModuleCallError(MULTIPLE_OBJECTS,
                                      f"{self.name}: {len(pairs)} {kind} keys match {lookup}: {found}")
            pair = pairs[0]
            return ScriptedKey(pair.label, kind, pair.key_type, s, pair)

        return self._run("find_key", op)

    def key_attributes(self, session: Any, key: Any) -> dict[str, Any]:
        """The public key's attributes: from the public key object, else the RSA private key's own,
        else the certificate with the same CKA_ID (``{"certificate": der}``)."""
        def op() -> dict[str, Any]:
            self._check_session(session)
            if not isinstance(key, ScriptedKey):
                raise ModuleCallError(code_from_name("CKR_OBJECT_HANDLE_INVALID"), f"{self.name}: not a key: {key!r}")
            self._check_session(key.session)
            pair = key.pair
            if pair.public or pair.key_type == "RSA":
                return pair.attributes()
            if pair.certificate:
                return {"certificate": pair.certificate_der(), "label": pair.label, "id": pair.key_id}
            raise ModuleCallError(NO_SUCH_KEY, f"{self.name}: no public key object, readable private key "
                                  f"attributes or certificate for {_lookup(pair.label, pair.key_id)}")

        return self._run("key_attributes", op)

    def mechanisms(self, token: Any) -> frozenset[str]:
        """C_GetMechanismList. Takes no virtual time: it is read once per connect, and a round trip
        there would move every scripted timeline; the link and scripted faults apply as to any call."""
        def op() -> frozenset[str]:
            self._check_token(token)
            return frozenset(self.hsm.mechanisms)

        return self._run("mechanisms", op, timed=False)

    def mechanism_infos(self, token: Any) -> dict[int, tuple[int, int, int]]:
        """The scripted token's mechanisms by CKM value, with SoftHSM-like sizes and flags."""
        def op() -> dict[int, tuple[int, int, int]]:
            self._check_token(token)
            infos = {ckm_value(name): _mechanism_info(MECHANISMS[name])
                     for name in sorted(self.hsm.mechanisms) if name in MECHANISMS}
            # The token generates RSA and EC key pairs (generate_keypair, generate_keypair_raw).
            infos[ckm_value("RSA_PKCS_KEY_PAIR_GEN")] = (1024, 16384, _CKF_GENERATE_KEY_PAIR)
            infos[ckm_value("EC_KEY_PAIR_GEN")] = (256, 521, _CKF_GENERATE_KEY_PAIR)
            return infos

        return self._run("mechanisms", op, timed=False)

    def list_objects(self, session: Any) -> list[dict[int, Any]]:
        """The token's objects as a raw attribute listing (private keys only to a logged-in session):
        per key pair its private key, its public key object and certificate where it has them."""
        def op() -> list[dict[int, Any]]:
            self._check_session(session)
            out: list[dict[int, Any]] = []
            for pair in self.hsm._keys:
                out += _pair_objects(pair, private=self.logged_in)
            return out

        return self._run("list_objects", op)

    def mechanism(self, mechanism: Any) -> Any:
        return _mechanism_value(mechanism)

    def sign(self, key: Any, data: bytes, mechanism: Any, param: Any) -> bytes:
        def op() -> bytes:
            k, mech = self._check_key(key, PRIVATE_KEY, mechanism, "sign")
            try:
                return _soft_sign(k.pair, mech.name, bytes(data), param)
            except (ValueError, TypeError, KeyError) as exc:
                raise self._refused(mech, param, exc) from None

        return self._run("sign", op)

    def verify(self, key: Any, data: bytes, signature: bytes, mechanism: Any, param: Any) -> bool:
        def op() -> bool:
            k, mech = self._check_key(key, PUBLIC_KEY, mechanism, "sign")
            return _soft_verify(k.pair, mech.name, bytes(data), bytes(signature), param)

        return self._run("verify", op, outcome=lambda ok: "CKR_OK" if ok else SIGNATURE_INVALID.name)

    def decrypt(self, key: Any, data: bytes, mechanism: Any, param: Any) -> bytes:
        """:meth:`ScriptedHSM.encrypt`'s ciphertexts (quick, for the simulator), or real RSA ciphertexts
        made with :meth:`ScriptedHSM.public_key` (OAEP with OAEPParams, PKCS#1 v1.5, raw)."""
        def op() -> bytes:
            k, mech = self._check_key(key, PRIVATE_KEY, mechanism, "decrypt")
            blob = bytes(data)
            if not blob.startswith(_CIPHERTEXT_MAGIC):
                try:
                    return _soft_decrypt(k.pair, mech.name, blob, param)
                except (ValueError, TypeError, KeyError):
                    raise ModuleCallError(ENCRYPTED_DATA_INVALID, f"{self.name}: not a ciphertext of {k.label!r}") \
                        from None
            head = len(_CIPHERTEXT_MAGIC)
            secret = k.pair.secret
            plain = bytes(a ^ b for a, b in zip(blob[head + 16:], _keystream(secret, len(blob) - head - 16)))
            tag = hmac.new(secret, b"tag" + plain, hashlib.sha256).digest()[:16]
            if not hmac.compare_digest(tag, blob[head:head + 16]):
                raise ModuleCallError(ENCRYPTED_DATA_INVALID, f"{self.name}: not a ciphertext of {k.label!r}")
            return plain

        return self._run("decrypt", op)

    def generate_random(self, session: Any, nbytes: int) -> bytes:
        def op() -> bytes:
            self._check_session(session)
            return self.hsm._rng.randbytes(nbytes)

        return self._run("generate_random", op)

    def generate_keypair(self, session: Any, key_type: Any, bits: int, label: str) -> Any:
        """The new pair is on the token at once (other instances find it); returns its public key."""
        def op() -> ScriptedKey:
            s = self._check_session(session)
            if not self.logged_in:
                raise ModuleCallError(USER_NOT_LOGGED_IN, f"{self.name}: generate_keypair needs a login")
            kt = key_type if isinstance(key_type, str) else getattr(key_type, "name", str(key_type))
            try:
                pair = self.hsm._new_pair(label, kt, bits)
            except ValueError:
                raise ModuleCallError(MECHANISM_INVALID, f"{self.name}: cannot generate {key_type!r} keys of "
                                      f"{bits} bits") from None
            self.hsm._keys.append(pair)
            return ScriptedKey(label, PUBLIC_KEY, pair.key_type, s, pair)

        return self._run("generate_keypair", op)

    def generate_keypair_raw(self, session: Any, mechanism: int, parameter: bytes | None,
                             public: dict[int, Any], private: dict[int, Any]) -> tuple[dict[int, Any], dict[int, Any]]:
        """A new key pair from an application's templates: RSA (CKA_MODULUS_BITS) or EC (CKA_EC_PARAMS
        of a named curve), with the templates' CKA_LABEL and CKA_ID."""
        a = attributes

        def op() -> tuple[dict[int, Any], dict[int, Any]]:
            self._check_session(session)
            if not self.logged_in:
                raise ModuleCallError(USER_NOT_LOGGED_IN, f"{self.name}: generate_keypair needs a login")
            name = ckm_name(mechanism)
            raw_label = private.get(a.CKA_LABEL, public.get(a.CKA_LABEL, b""))
            label = raw_label.decode() if isinstance(raw_label, bytes) else str(raw_label)
            key_id = private.get(a.CKA_ID, public.get(a.CKA_ID))
            if name == "RSA_PKCS_KEY_PAIR_GEN":
                kt, bits = "RSA", int(public.get(a.CKA_MODULUS_BITS, 2048))
            elif name == "EC_KEY_PAIR_GEN":
                params = public.get(a.CKA_EC_PARAMS, b"")
                curves = {_der_oid(oid): size for size, oid in _CURVE_OIDS_BY_BITS.items()}
                if params not in curves:
                    raise ModuleCallError(code_from_name("CKR_DOMAIN_PARAMS_INVALID"),
                                          f"{self.name}: EC parameters not a named curve this token knows")
                kt, bits = "EC", curves[params]
            else:
                raise ModuleCallError(MECHANISM_INVALID, f"{self.name}: cannot generate key pairs with {name}")
            pair = self.hsm._new_pair(label, kt, bits, key_id=key_id if isinstance(key_id, bytes) else None)
            self.hsm._keys.append(pair)
            objects = _pair_objects(pair, private=True)
            return objects[1], objects[0]

        return self._run("generate_keypair", op)

    def __repr__(self) -> str:
        link = "no token" if self._link is None else ("broken" if self._broken(self._cuts) else "connected")
        return (f"<ScriptedModule {self.name} on {self.hsm.label} initialized={self.initialized} "
                f"{link if self.initialized else 'uninitialised'} sessions={len(self._sessions)}>")

    # -- the call path ---------------------------------------------------------------------------

    def _run(self, function: str, op: Callable[[], _T], *, mode: str = "call",
             outcome: Callable[[_T], str] | None = None, timed: bool = True) -> _T:
        """One call: its latency, the link (broken, hung), an injected fault, then ``op`` on the token.

        Runs under the HSM's condition, released only while waiting; everything the call
        decides is decided in one piece. Logs the call when it completes."""
        hsm, cond, clock = self.hsm, self._cond, self._clock
        with cond:
            my_cut = self._cuts
            self._inflight += 1
            try:
                if mode == "initialize":
                    self._teardown()
                delay = hsm.latency + hsm._extra if timed else 0.0
                if delay > 0:  # the round trip; a cut-off ends it early
                    cond.wait_for(lambda: self._cuts != my_cut, timeout=delay)
                if mode == "initialize":
                    self._await_initialize(my_cut)
                else:
                    self._await_link(mode, my_cut)
                fault = hsm._take_fault(function)
                if fault is not None:
                    raise ModuleCallError(fault, f"{self.name}: {function} failed (scripted)")
                result = op()
            except ModuleCallError as exc:
                hsm._record(clock.monotonic(), self.name, function, exc.code.name)
                raise
            finally:
                self._inflight -= 1
            hsm._record(clock.monotonic(), self.name, function, "CKR_OK" if outcome is None else outcome(result))
            return result

    def _await_link(self, mode: str, my_cut: int) -> None:
        """(Under the condition.) Raise what a broken link raises; wait while the HSM hangs."""
        if not self.initialized:
            if mode == "finalize":
                return
            raise ModuleCallError(NOT_INITIALIZED, f"{self.name}: not initialised")
        if self._link is None:  # no server was there at C_Initialize: nothing goes over the wire
            return
        if self._broken(my_cut):
            if mode == "finalize":
                return
            raise ModuleCallError(DEVICE_ERROR, f"{self.name}: the link to {self.hsm.label} is gone")
        if self.hsm._state == "hung":
            self._cond.wait_for(lambda: self.hsm._state != "hung" or self._broken(my_cut))
            if self._broken(my_cut):
                if mode == "finalize":
                    self._teardown()
                raise ModuleCallError(DEVICE_ERROR, f"{self.name}: the link to {self.hsm.label} was cut")

    def _await_initialize(self, my_cut: int) -> None:
        """(Under the condition.) C_Initialize connects: it waits while the HSM hangs."""
        hsm = self.hsm
        if hsm._state == "hung" and self._cuts == my_cut:
            link = hsm._link
            self._cond.wait_for(lambda: hsm._state != "hung" or self._cuts != my_cut or hsm._link != link)
            if hsm._state == "down":  # accepted, then the server died under the handshake
                raise ModuleCallError(DEVICE_ERROR, f"{self.name}: C_Initialize lost its connection")
        if self._cuts != my_cut:
            raise ModuleCallError(DEVICE_ERROR, f"{self.name}: C_Initialize was cut off")

    def _broken(self, my_cut: int) -> bool:
        return self._severed or self._cuts != my_cut or self._link != self.hsm._link

    def _teardown(self) -> None:
        """C_Finalize's local part: sessions and this application's login are gone."""
        self.hsm._logins.discard((self._serial, self._epoch))
        self._epoch += 1
        self._sessions.clear()
        self._link = None
        self._severed = False
        self.initialized = False

    def _check_token(self, token: Any) -> None:
        if self._link is None or not isinstance(token, ScriptedToken) or token.hsm is not self.hsm:
            raise ModuleCallError(SLOT_ID_INVALID, f"{self.name}: no such slot")

    def _check_session(self, session: Any) -> ScriptedSession:
        if (not isinstance(session, ScriptedSession) or session.module is not self or session.closed
                or session.epoch != self._epoch):
            raise ModuleCallError(SESSION_HANDLE_INVALID, f"{self.name}: stale or closed session {session!r}")
        return session

    def _check_key(self, key: Any, kind: str, mechanism: Any, use: str) -> tuple[ScriptedKey, ScriptedMechanism]:
        if not isinstance(key, ScriptedKey):
            raise ModuleCallError(code_from_name("CKR_KEY_HANDLE_INVALID"), f"{self.name}: not a key: {key!r}")
        self._check_session(key.session)
        if key.kind != kind:
            raise ModuleCallError(KEY_FUNCTION_NOT_PERMITTED, f"{self.name}: {key.label} is a {key.kind} key")
        if kind == PRIVATE_KEY and not self.logged_in:
            raise ModuleCallError(USER_NOT_LOGGED_IN, f"{self.name}: not logged in")
        try:
            mech = _mechanism_value(mechanism)
        except ValueError:
            raise ModuleCallError(MECHANISM_INVALID, f"{self.name}: {mechanism!r}") from None
        if mech is None:
            mech = (_DEFAULT_SIGN if use == "sign" else _DEFAULT_DECRYPT).get(key.key_type)
            if mech is None:
                raise ModuleCallError(MECHANISM_INVALID, f"{self.name}: no default {use} mechanism")
        if use not in mech.uses or mech.name not in self.hsm.mechanisms:
            raise ModuleCallError(MECHANISM_INVALID, f"{self.name}: {mech.name} cannot {use}" if use not in mech.uses
                                  else f"{self.name}: the token does not offer {mech.name}")
        if mech.key_type != key.key_type:
            raise ModuleCallError(KEY_TYPE_INCONSISTENT, f"{self.name}: {mech.name} on a {key.key_type} key")
        return key, mech

    def _refused(self, mech: ScriptedMechanism, param: Any, exc: Exception) -> ModuleCallError:
        """What the token answers for data or parameters the mechanism does not take (a salt too
        long for the key is cryptography's ValueError: a parameter the token refuses)."""
        code = exc.code if isinstance(exc, _Refusal) else (MECHANISM_PARAM_INVALID if param is not None
                                                            else DATA_LEN_RANGE)
        return ModuleCallError(code, f"{self.name}: {mech.name}: {exc}")

    def _note(self, function: str) -> None:
        """A local call (no round trip), logged and counted like the others."""
        self.hsm._record(self._clock.monotonic(), self.name, function, "CKR_OK")


if TYPE_CHECKING:  # mypy checks the scripted module against the runtime's shape
    from ..runtime.edge import Module

    def _shape(hsm: ScriptedHSM, clock: Clock) -> Module:
        return ScriptedModule(hsm, clock)
