"""What a bound key raises besides :mod:`hsmfsm.core.errors` (NotExtractable, KeyNotFound)."""

from __future__ import annotations

from cryptography.exceptions import UnsupportedAlgorithm

from ..core.errors import HSMError


class SignatureMismatch(HSMError):
    """The HSM's answer is not a valid signature of the request: it does not verify against the
    key's public half (``verify=True``), or it is not of the mechanism's form (an ECDSA answer
    that is not ``r||s`` of the curve's size).

    Raised instead of returning the signature: cryptography embeds whatever ``sign()`` returns
    in a certificate without looking at it, so a bad answer would otherwise reach the relying
    parties. ``reissue`` is False: the backend already had its chance to ask another member
    (the key hands it the check with ``verify=True``)."""

    reissue = False

    def __init__(self, member: str, message: str) -> None:
        super().__init__(member, message)


class UnsupportedRequest(UnsupportedAlgorithm, ValueError):
    """A request the bound key cannot turn into a PKCS#11 mechanism: a hash PKCS#11 has no
    mechanism name for here (SHA3, SHA512/224 ...), a padding other than PKCS#1 v1.5 / PSS /
    OAEP, ``Prehashed`` input to a key bound with ``hash_locally=False``.

    Both an ``UnsupportedAlgorithm`` (what cryptography's own keys raise for an algorithm they
    lack) and a ``ValueError`` (what they raise for a bad argument), so callers catching either
    catch it."""
