"""The virtual token's objects: stable handles, cached public attributes, template matching.

A virtual slot cannot hand out a member's object handles: they belong to one
member's session, alias after a reinit (docs/FACTS.md), and mean nothing on
the other members. So every token object gets a *virtual* handle of its own,
keyed by its identity ``(CKA_CLASS, CKA_ID, CKA_LABEL, CKA_KEY_TYPE)`` (plus
the value's hash for a certificate or data object), the same for every
application and for the server's whole life: an object that vanishes and
comes back (a member's token re-read after a restart) gets its old handle.
Operations on it go to a member through the pool by label and CKA_ID, and the
pool resolves them on each member (per generation).

The attributes a catalog holds are the public, immutable ones of
:data:`hsmfsm.core.attributes.CATALOG`, read once from a member: listings
(``pkcs11-tool -O``, p11tool's forty attribute reads per key) are answered
here, also while every member is down. A private or secret key's secret
parts are never read nor served (CKR_ATTRIBUTE_SENSITIVE).

Pure: no I/O, no clock, no threads; the server refreshes it from the pool.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core import attributes as a
from ..core.codes import CKR
from .wire import Attribute

#: The object classes private to a logged-in application.
Identity = tuple[Any, ...]

CKR_OK = 0
CKR_ATTRIBUTE_SENSITIVE = CKR["CKR_ATTRIBUTE_SENSITIVE"]
CKR_ATTRIBUTE_TYPE_INVALID = CKR["CKR_ATTRIBUTE_TYPE_INVALID"]
CKR_BUFFER_TOO_SMALL = CKR["CKR_BUFFER_TOO_SMALL"]

#: Named-curve OIDs (DER of CKA_EC_PARAMS) and their field size in bytes: an ECDSA signature is twice that.
_CURVE_BYTES = {
    bytes.fromhex("06082a8648ce3d030107"): 32,  # P-256
    bytes.fromhex("06052b81040022"): 48,  # P-384
    bytes.fromhex("06052b81040023"): 66,  # P-521
    bytes.fromhex("06052b8104000a"): 32,  # secp256k1
    bytes.fromhex("06082a8648ce3d030101"): 24,  # P-192
    bytes.fromhex("06052b81040021"): 28,  # P-224
}
_SIZE_OF_ULONG = 8  # what a 64-bit client's CK_ULONG takes, as p11-kit's client reports it


class CatalogProblem(Exception):
    """Two objects of one member share an identity: which one an operation means is ambiguous."""


@dataclass(frozen=True)
class CatalogObject:
    """One token object as the virtual slot shows it."""

    handle: int
    identity: Identity
    values: Mapping[int, Any]  # CKA -> value; None: the token calls it sensitive

    @property
    def object_class(self) -> int | None:
        value = self.values.get(a.CKA_CLASS)
        return value if isinstance(value, int) else None

    @property
    def key_type(self) -> int | None:
        value = self.values.get(a.CKA_KEY_TYPE)
        return value if isinstance(value, int) else None

    @property
    def label(self) -> str | None:
        """CKA_LABEL as text (how the pool finds the key), or None without one (or not UTF-8)."""
        value = self.values.get(a.CKA_LABEL)
        if not isinstance(value, bytes):
            return None
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None

    @property
    def key_id(self) -> bytes | None:
        value = self.values.get(a.CKA_ID)
        return value if isinstance(value, bytes) and value else None

    @property
    def private(self) -> bool:
        """Hidden from an application that has not logged in (CKA_PRIVATE, which defaults to true
        for private and secret keys)."""
        value = self.values.get(a.CKA_PRIVATE)
        if isinstance(value, bool):
            return value
        return self.object_class in (a.CKO_PRIVATE_KEY, a.CKO_SECRET_KEY)

    @property
    def is_key(self) -> bool:
        return self.object_class in (a.CKO_PRIVATE_KEY, a.CKO_PUBLIC_KEY, a.CKO_SECRET_KEY)

    def allows(self, usage: int) -> bool:
        """Whether a usage flag (CKA_SIGN, CKA_VERIFY, CKA_DECRYPT ...) is set."""
        return self.values.get(usage) is True

    def secret(self, attribute_type: int) -> bool:
        return self.object_class in (a.CKO_PRIVATE_KEY, a.CKO_SECRET_KEY) and attribute_type in a.SECRET

    def attribute(self, attribute_type: int, buffer_length: int, *, client_version: int = 0
                  ) -> tuple[Attribute, int]:
        """One entry of a C_GetAttributeValue answer for a caller's buffer of ``buffer_length`` bytes
        (0: a NULL pValue, the size question), and its code: CKR_OK, or the in-band
        CKR_ATTRIBUTE_SENSITIVE / _TYPE_INVALID / CKR_BUFFER_TOO_SMALL that p11-kit carries
        inside a normal reply. Values are held as 0.24.1 classifies them (:func:`kind_of`); a
        later client that carries a type as another kind gets it converted."""
        kind = a.kind_of(attribute_type, client_version=client_version)
        if self.secret(attribute_type) or (attribute_type in self.values and self.values[attribute_type] is None):
            return Attribute(attribute_type, valid=False), CKR_ATTRIBUTE_SENSITIVE
        if attribute_type not in self.values or kind == "template":
            # 0.24.1's client refuses nested templates in replies (P11KIT-RPC.md §2.2): not served.
            return Attribute(attribute_type, valid=False), CKR_ATTRIBUTE_TYPE_INVALID
        value = _as_kind(self.values[attribute_type], kind)
        needed = _client_length(kind, value)
        if buffer_length == 0:
            return Attribute(attribute_type, None, valid=True, length=needed), CKR_OK
        if buffer_length < needed:
            return Attribute(attribute_type, valid=False), CKR_BUFFER_TOO_SMALL
        return Attribute(attribute_type, value, valid=True, length=needed), CKR_OK

    def matches(self, template: Sequence[Attribute]) -> bool:
        """C_FindObjects semantics: every attribute of the template is on the object with that value."""
        for want in template:
            if want.type not in self.values or self.secret(want.type):
                return False
            have = self.values[want.type]
            if have is None or not _equal(have, want.value):
                return False
        return True

    def signature_length(self) -> int | None:
        """The length of this key's signatures where it follows from the key: RSA, the modulus's bytes;
        ECDSA, twice the curve's field size; EdDSA 64 or 114. None when unknown."""
        if self.key_type == a.CKK_RSA:
            modulus = self.values.get(a.CKA_MODULUS)
            if isinstance(modulus, bytes) and modulus:
                return len(modulus.lstrip(b"\0")) or None
            bits = self.values.get(a.CKA_MODULUS_BITS)
            return (bits + 7) // 8 if isinstance(bits, int) and bits > 0 else None
        params = self.values.get(a.CKA_EC_PARAMS)
        if self.key_type == a.CKK_EC and isinstance(params, bytes):
            size = _CURVE_BYTES.get(params)
            return 2 * size if size else None
        if self.key_type == a.CKK_EC_EDWARDS and isinstance(params, bytes):
            return 114 if b"edwards448" in params or params.endswith(bytes.fromhex("2b6571")) else 64
        return None


def _as_kind(value: Any, kind: str) -> Any:
    """A cached value as ``kind`` carries it (p11-kit releases moved a few types between kinds)."""
    if kind == "bool":
        return value if isinstance(value, bool) else bool(value) if isinstance(value, int) else any(bytes(value))
    if kind == "ulong":
        if isinstance(value, bool | int):
            return int(value)
        return int.from_bytes(bytes(value), "little")
    if kind in ("bytes", "date"):
        if isinstance(value, bool):
            return b"\x01" if value else b"\x00"
        if isinstance(value, int):
            return value.to_bytes(_SIZE_OF_ULONG, "little")
        if isinstance(value, tuple):
            return b"".join(v.to_bytes(_SIZE_OF_ULONG, "little") for v in value)
    return value


def _client_length(kind: str, value: Any) -> int:
    """The ulValueLen a 64-bit application sees for a value (p11-kit's client writes CK_ULONGs native)."""
    if kind == "bool":
        return 1
    if kind == "ulong":
        return _SIZE_OF_ULONG
    if kind == "mechanisms":
        return _SIZE_OF_ULONG * len(value)
    return len(value) if isinstance(value, bytes | bytearray) else 0


def _equal(have: Any, want: Any) -> bool:
    if isinstance(have, bool) or isinstance(want, bool):
        return bool(have) == bool(want) and isinstance(want, bool | int)
    if isinstance(have, int):
        return isinstance(want, int) and have == want
    if isinstance(have, tuple):
        return tuple(want) == have if isinstance(want, list | tuple) else False
    return isinstance(want, bytes | bytearray) and bytes(want) == have


def identity_of(values: Mapping[int, Any]) -> Identity:
    """What makes two members' objects the same object: class, id, label, key type, and for an
    object with a public value (a certificate, a data object) that value's hash."""
    klass = values.get(a.CKA_CLASS)
    extra = b""
    if klass not in (a.CKO_PRIVATE_KEY, a.CKO_SECRET_KEY):
        value = values.get(a.CKA_VALUE)
        if isinstance(value, bytes):
            extra = hashlib.sha256(value).digest()
    return (klass, values.get(a.CKA_ID), values.get(a.CKA_LABEL), values.get(a.CKA_KEY_TYPE), extra)


@dataclass
class Catalog:
    """The objects of the virtual token, by virtual handle. Handles start at ``first_handle``
    and are never reused for another identity."""

    first_handle: int = 1
    _handles: dict[Identity, int] = field(default_factory=dict)
    _objects: dict[int, CatalogObject] = field(default_factory=dict)
    _next: int = 0
    #: The member the current listing came from, and how many listings were taken.
    source: str | None = None
    loads: int = 0
    #: Identities seen twice in the last listing (a configuration error on that member).
    problems: tuple[str, ...] = ()
    #: Objects only one member has (a key just generated on the primary), by handle: the member.
    pinned: dict[int, str] = field(default_factory=dict)

    def update(self, listing: Iterable[Mapping[int, Any]], member: str) -> tuple[int, int]:
        """Replace the visible objects with a member's listing; returns (added, removed) identities.

        An identity listed twice by one member is ambiguous: both are left out and named in
        :attr:`problems` (the pool would refuse the lookup with HSMFSM_MULTIPLE_OBJECTS anyway)."""
        seen: dict[Identity, Mapping[int, Any]] = {}
        doubled: set[Identity] = set()
        for values in listing:
            ident = identity_of(values)
            if ident in seen:
                doubled.add(ident)
            seen[ident] = values
        problems = []
        for ident in sorted(doubled, key=repr):
            del seen[ident]
            problems.append(f"{member}: two objects with class {ident[0]}, id {_hex(ident[1])}, "
                            f"label {ident[2]!r}: neither is served")
        before = set(self._by_identity())
        objects: dict[int, CatalogObject] = {}
        for ident, values in seen.items():
            handle = self._handles.get(ident)
            if handle is None:
                handle = self._handles[ident] = self.first_handle + self._next
                self._next += 1
            objects[handle] = CatalogObject(handle, ident, dict(values))
            if handle in self.pinned and self.pinned[handle] != member:
                del self.pinned[handle]  # another member has it too: its replica appeared
        for handle, owner in list(self.pinned.items()):
            if handle in objects:
                continue
            if owner == member:  # gone from the one member that had it
                del self.pinned[handle]
            elif handle in self._objects:
                objects[handle] = self._objects[handle]  # not on this member yet: keep serving it from its own
        self._objects = objects
        self.source = member
        self.loads += 1
        self.problems = tuple(problems)
        after = set(seen)
        return len(after - before), len(before - after)

    def add(self, values: Mapping[int, Any], *, pinned: str | None = None) -> CatalogObject:
        """One object learnt outside a listing (a key just generated on the primary), served by
        ``pinned`` alone until a listing from another member shows it too."""
        ident = identity_of(values)
        handle = self._handles.get(ident)
        if handle is None:
            handle = self._handles[ident] = self.first_handle + self._next
            self._next += 1
        obj = self._objects[handle] = CatalogObject(handle, ident, dict(values))
        if pinned is not None:
            self.pinned[handle] = pinned
        return obj

    def _by_identity(self) -> dict[Identity, int]:
        return {obj.identity: handle for handle, obj in self._objects.items()}

    @property
    def loaded(self) -> bool:
        return self.loads > 0

    def get(self, handle: int, *, logged_in: bool) -> CatalogObject | None:
        """The object behind a virtual handle, if this application may see it."""
        obj = self._objects.get(handle)
        if obj is None or (obj.private and not logged_in):
            return None
        return obj

    def find(self, template: Sequence[Attribute], *, logged_in: bool) -> list[int]:
        """The handles of the visible objects that match, in handle order (stable across calls)."""
        return [h for h, obj in sorted(self._objects.items())
                if (logged_in or not obj.private) and obj.matches(template)]

    def __len__(self) -> int:
        return len(self._objects)

    def objects(self) -> list[CatalogObject]:
        return [obj for _, obj in sorted(self._objects.items())]


def _hex(value: Any) -> str:
    return value.hex() if isinstance(value, bytes) and value else "(none)"
