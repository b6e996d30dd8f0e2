"""What a key object needs from the pool or connection it is bound to.

:class:`hsmfsm.runtime.pool.Pool` and :class:`hsmfsm.runtime.connection.SlotConnection`
have this shape; the key classes of :mod:`hsmfsm.keys` depend only on it (and on
``cryptography``), so the package sits between the core and the runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class KeyRef:
    """How a key is found on every member: by label, by CKA_ID, or both (an RFC 7512 URI is parsed
    into these by :func:`hsmfsm.keys.uri.parse`). ``None`` fields do not constrain the lookup."""

    label: str | None = None
    key_id: bytes | None = None

    def __str__(self) -> str:
        parts = []
        if self.label is not None:
            parts.append(f"label {self.label!r}")
        if self.key_id is not None:
            parts.append(f"id {self.key_id.hex()}")
        return " and ".join(parts) or "any key"


#: A check a key object hands the backend with a signature request: called with each
#: member's signature before it is returned; False means the member signed wrongly (it
#: counts as an impaired call there, and the call goes to another member).
SignatureCheck = Callable[[bytes], bool]


class KeyBackend(Protocol):
    """The operations a bound key calls. ``mechanism`` is a PKCS#11 mechanism name without
    ``CKM_`` (``"RSA_PKCS"``, ``"RSA_PKCS_PSS"``, ``"ECDSA"``, ``"EDDSA"``, ``"SHA256_RSA_PKCS"`` ...),
    ``param`` a :class:`hsmfsm.core.mechanisms.PSSParams`/``OAEPParams`` or None."""

    def sign(self, key_label: str | None, data: bytes, mechanism: Any = None, mechanism_param: Any = None, *,
             key_id: bytes | None = None, deadline: float | None = None,
             check: SignatureCheck | None = None) -> bytes: ...

    def decrypt(self, key_label: str | None, data: bytes, mechanism: Any = None, mechanism_param: Any = None, *,
                key_id: bytes | None = None, deadline: float | None = None) -> bytes: ...

    def public_key(self, label: str | None = None, *, key_id: bytes | None = None,
                   uri: str | None = None) -> Any:
        """The key's public half as a ``cryptography`` public key object, read from the token."""
        ...
