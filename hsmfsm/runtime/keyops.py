"""What the connection and the pool share about keys and mechanisms: lookups, public keys, errors.

A key is found on a member by a :class:`hsmfsm.keys.KeyRef` (label, CKA_ID or both;
a ``pkcs11:`` URI is parsed into one). Its public half is read from the token
(``Module.key_attributes``) and turned into a ``cryptography`` key by
:mod:`hsmfsm.keys`, imported here only when a key is first asked for: a
connection that only signs by label never loads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core.errors import HSMError

if TYPE_CHECKING:
    from ..keys.backend import KeyRef

#: The operation the rule-book judges a call by, where hsmfsm's own name is not a policy operation:
#: reading a key's public half is as idempotent as C_Verify, and has no effect on the token.
RULE_OPERATION = {"public_key": "verify", "list_objects": "verify", "mechanism_infos": "verify"}




def mechanism_name(value: Any) -> str | None:
    """A mechanism's name without ``CKM_`` (a name, or a module value with a ``name``); None for None
    or a value without a name (a module's raw number: not checked against the token's list)."""
    if value is None:
        return None
    name = value if isinstance(value, str) else getattr(value, "name", None)
    return name.removeprefix("CKM_") if isinstance(name, str) else None


def key_ref(label: str | None, key_id: bytes | None, uri: str | None, *, kinds: tuple[str | None, ...] = ()
            ) -> KeyRef:
    """The lookup a caller gave: a label, a CKA_ID, both, or a ``pkcs11:`` URI (alone). ``kinds``: the
    object types a URI may name (``type=private`` ...); empty: any."""
    from ..keys.backend import KeyRef

    if uri is not None:
        if label is not None or key_id is not None:
            raise ValueError("give a pkcs11: URI or a label and/or key_id, not both")
        from ..keys import parse_uri

        ref, kind = parse_uri(uri)
        if kinds and kind is not None and kind not in kinds:
            raise ValueError(f"{uri}: names a {kind} object; this needs {' or '.join(k for k in kinds if k)}")
        if ref.label is None and ref.key_id is None:
            raise ValueError(f"{uri}: names no object (object= or id= is needed)")
        return ref
    if label is None and key_id is None:
        raise ValueError("a key is looked up by label, key_id or uri: none was given")
    return KeyRef(label, None if key_id is None else bytes(key_id))


def public_key_of(attributes: dict[str, Any]) -> Any:
    """The cryptography public key ``Module.key_attributes`` describes (attributes, or a certificate)."""
    from .. import keys

    certificate = attributes.get("certificate")
    if certificate is not None:
        return keys.public_key_from_certificate(certificate)
    return keys.public_key_from_attributes(attributes)


def public_der(key: Any) -> bytes:
    """The SubjectPublicKeyInfo DER of a public key: what two copies of a key are compared by."""
    from cryptography.hazmat.primitives import serialization

    der: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def signature_rejected(member: str, message: str) -> HSMError:
    """The error for a signature that failed the caller's check (never returned):
    :class:`hsmfsm.keys.SignatureMismatch`, the error a bound key raises for the same."""
    from ..keys import SignatureMismatch

    return SignatureMismatch(member, message)
