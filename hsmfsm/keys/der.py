"""The few DER shapes PKCS#11 attributes come in: an OID, a PrintableString, an OCTET STRING.

``CKA_EC_PARAMS`` is the DER of an ``ECParameters`` choice (an OID, or a
PrintableString curve name some modules use for Edwards curves) and
``CKA_EC_POINT`` is, by the standard, a DER OCTET STRING (some modules give the
bare point). Reading them needs a TLV reader and an OID codec, nothing more, so
this module carries its own ~60 lines instead of another dependency.
"""

from __future__ import annotations

#: Universal tags read here.
OCTET_STRING, OBJECT_IDENTIFIER, PRINTABLE_STRING, SEQUENCE, NULL = 0x04, 0x06, 0x13, 0x30, 0x05


def read_tlv(data: bytes) -> tuple[int, bytes]:
    """The tag and the content of the single DER element ``data`` is; ValueError when ``data``
    is not exactly one element (wrong length, trailing bytes, indefinite or overlong length)."""
    if len(data) < 2:
        raise ValueError(f"{len(data)} bytes are too short for a DER element")
    tag, first = data[0], data[1]
    if first < 0x80:
        length, start = first, 2
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or len(data) < 2 + count:
            raise ValueError("DER length is indefinite or truncated")
        length, start = int.from_bytes(data[2:2 + count], "big"), 2 + count
        if length < 0x80 or data[2] == 0:
            raise ValueError("DER length is not in its shortest form")
    if start + length != len(data):
        raise ValueError(f"DER element of {length} content bytes in {len(data) - start}")
    return tag, data[start:]


def encode_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def encode_tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + encode_length(len(content)) + content


def decode_oid(content: bytes) -> str:
    """Dotted form of an OBJECT IDENTIFIER's content octets."""
    if not content or content[-1] & 0x80:
        raise ValueError("truncated OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    for i, byte in enumerate(content):
        if value == 0 and byte == 0x80 and (i == 0 or not content[i - 1] & 0x80):
            raise ValueError("OBJECT IDENTIFIER arc is not in its shortest form")
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in [first, arcs[0] - 40 * first, *arcs[1:]])


def encode_oid(dotted: str) -> bytes:
    """DER of the OBJECT IDENTIFIER ``dotted`` (tag and length included)."""
    arcs = [int(arc) for arc in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40):
        raise ValueError(f"{dotted!r} is not an object identifier")
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        while arc := arc >> 7:
            chunk.append(0x80 | (arc & 0x7F))
        body += bytes(reversed(chunk))
    return encode_tlv(OBJECT_IDENTIFIER, bytes(body))
