"""RFC 7512 ``pkcs11:`` URIs as key references.

``pkcs11:token=signer;object=zsk;id=%01%02;type=private`` names a key the way
p11tool, OpenSSL's pkcs11 provider and p11-kit print it. In hsmfsm the pool (or
the connection) already decides which module, token and PIN each member uses:
a URI only says which key. So:

* ``object`` -> ``KeyRef.label`` and ``id`` -> ``KeyRef.key_id`` (percent-decoded;
  ``id`` as bytes, ``object`` as UTF-8), ``type`` is returned (``private``,
  ``public`` or ``cert``: which object the caller meant).
* ``token``, ``manufacturer``, ``serial``, ``model``, ``library-*``, ``slot-*``,
  ``module-name``, ``module-path`` and ``x-*`` attributes are checked for form and
  otherwise ignored by :func:`parse` (a pool's members are replicas whose tokens
  may carry other labels and serials); :func:`attributes` returns them all for a
  caller who wants to compare them with its configuration.
* ``pin-value`` and ``pin-source`` are refused: a URI is logged and copied around,
  and hsmfsm takes PINs from ``pin=`` (``env:``, ``file:``, a callable) only.
  The error never repeats the value.
* Anything malformed is a ValueError naming the part: the scheme, an attribute
  without ``=``, an unknown or repeated attribute, a bad ``%`` escape, an
  ``object`` that is not UTF-8, an unknown ``type``.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from .backend import KeyRef

#: Path attributes (RFC 7512 section 2.3).
PATH_ATTRIBUTES = frozenset({
    "token", "manufacturer", "serial", "model", "library-manufacturer", "library-description",
    "library-version", "object", "type", "id", "slot-description", "slot-manufacturer", "slot-id"})
#: Query attributes (RFC 7512 section 2.3).
QUERY_ATTRIBUTES = frozenset({"pin-source", "pin-value", "module-name", "module-path"})
#: The object classes a key reference may name; ``secret-key`` and ``data`` are refused.
KEY_TYPES = ("private", "public", "cert")
_OTHER_TYPES = ("secret-key", "data")
_REFUSED = {"pin-value", "pin-source"}

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _decode(name: str, value: str, uri_part: str) -> bytes:
    if _BAD_ESCAPE.search(value):
        raise ValueError(f"pkcs11 URI: {uri_part} attribute {name!r}: a '%' not followed by two hex digits")
    return unquote_to_bytes(value)


def _split(segment: str, separator: str, uri_part: str) -> list[tuple[str, str]]:
    pairs = []
    for item in segment.split(separator) if segment else []:
        if not item:
            raise ValueError(f"pkcs11 URI: empty attribute in the {uri_part} (a doubled or trailing {separator!r})")
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ValueError(f"pkcs11 URI: {uri_part} attribute {item!r} is not name=value")
        pairs.append((name.lower(), value))
    return pairs


def attributes(uri: str) -> dict[str, str | bytes]:
    """Every attribute of ``uri``, percent-decoded: ``id`` as bytes, the others as text.

    ValueError for a malformed URI (naming the part); ``pin-value``/``pin-source`` are refused
    here already, so no PIN ever comes out of a URI."""
    if not isinstance(uri, str):
        raise TypeError(f"pkcs11 URI: expected a string, got {type(uri).__name__}")
    scheme, colon, rest = uri.strip().partition(":")
    if not colon or scheme.lower() != "pkcs11":
        raise ValueError(f"pkcs11 URI: the scheme must be 'pkcs11:', in {uri[:40]!r}")
    if "#" in rest:
        raise ValueError("pkcs11 URI: a '#' fragment is not part of RFC 7512")
    path, _, query = rest.partition("?")
    found: dict[str, str | bytes] = {}
    for part, known, pairs in (("path", PATH_ATTRIBUTES, _split(path, ";", "path")),
                               ("query", QUERY_ATTRIBUTES, _split(query, "&", "query"))):
        for name, value in pairs:
            if name in _REFUSED:
                raise ValueError(f"pkcs11 URI: {name} is refused (the value is not shown): hsmfsm reads PINs from "
                                 "the pool's or connection's pin= (env:NAME, file:PATH or a callable), never from "
                                 "a URI")
            if name not in known and not name.startswith("x-"):
                other = "query" if name in QUERY_ATTRIBUTES else "path" if name in PATH_ATTRIBUTES else None
                where = f" (it belongs in the {other})" if other else ""
                raise ValueError(f"pkcs11 URI: unknown {part} attribute {name!r}{where}")
            if name in found and part == "path":
                raise ValueError(f"pkcs11 URI: path attribute {name!r} appears twice")
            raw = _decode(name, value, part)
            if name == "id":
                found[name] = raw
                continue
            try:
                found[name] = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"pkcs11 URI: {part} attribute {name!r} is not UTF-8 after percent-decoding") from None
    kind = found.get("type")
    if kind is not None and kind not in KEY_TYPES:
        why = ("names no part of a key pair" if kind in _OTHER_TYPES
               else "is not an RFC 7512 object type")
        raise ValueError(f"pkcs11 URI: type={kind!s} {why} (expected {', '.join(KEY_TYPES)})")
    if "slot-id" in found and not str(found["slot-id"]).isdigit():
        raise ValueError(f"pkcs11 URI: slot-id={found['slot-id']!s} is not a decimal number")
    version = found.get("library-version")
    if version is not None and not re.fullmatch(r"\d+(\.\d+)?", str(version)):
        raise ValueError(f"pkcs11 URI: library-version={version!s} is not MAJOR[.MINOR]")
    return found


def parse(uri: str) -> tuple[KeyRef, str | None]:
    """The key reference in ``uri`` and the object type it names (``"private"``, ``"public"``,
    ``"cert"``, or None when it has no ``type=``). A URI with neither ``object`` nor ``id``
    gives ``KeyRef()``: the backend then finds the token's only key, or raises KeyNotFound."""
    found = attributes(uri)
    label, key_id, kind = found.get("object"), found.get("id"), found.get("type")
    return (KeyRef(label=label if isinstance(label, str) else None,
                   key_id=key_id if isinstance(key_id, bytes) else None),
            kind if isinstance(kind, str) else None)


#: The name :mod:`hsmfsm.keys` exports.
parse_uri = parse
