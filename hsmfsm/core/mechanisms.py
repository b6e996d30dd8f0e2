"""Mechanisms as names and parameters the runtime passes through, independent of any PKCS#11 library.

A key object (:mod:`hsmfsm.keys`) asks for ``"RSA_PKCS_PSS"`` with a
:class:`PSSParams`; the edge (:class:`hsmfsm.p11.P11Module`, or the scripted
module) turns that into its own library's values. Pure data.
"""

from __future__ import annotations

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
