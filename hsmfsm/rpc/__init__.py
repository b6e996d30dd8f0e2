"""p11-kit's RPC protocol: the codec a virtual PKCS#11 slot speaks to ``p11-kit-client.so``.

Pure: :mod:`hsmfsm.rpc.wire` turns frames into values and values into frames, with no
sockets, threads or clock. It imports only :mod:`hsmfsm.core` and the standard library.
"""

from __future__ import annotations

from .wire import (
    ALLOWED,
    BY_NAME,
    CALLS,
    HANDSHAKE,
    HEADER,
    MAX_ARRAY,
    MAX_BYTES,
    MAX_DEPTH,
    MAX_FRAME,
    NULL_MECHANISM,
    OAEP,
    PROTOCOL_MAX,
    PSS,
    SECRET_CALLS,
    Attribute,
    Call,
    ErrorReply,
    Fields,
    Length,
    Mechanism,
    ProtocolError,
    Request,
    UnknownCall,
    client_allows,
    describe,
    encode_error,
    encode_frame,
    encode_reply,
    encode_request,
    negotiate,
    pad,
    parse_header,
    parse_reply,
    parse_request,
)

__all__ = [
    "ALLOWED", "BY_NAME", "CALLS", "HANDSHAKE", "HEADER", "MAX_ARRAY", "MAX_BYTES", "MAX_DEPTH", "MAX_FRAME",
    "NULL_MECHANISM", "OAEP", "PROTOCOL_MAX", "PSS", "SECRET_CALLS", "Attribute", "Call",
    "ErrorReply", "Fields", "Length", "Mechanism", "ProtocolError", "Request", "UnknownCall", "client_allows",
    "describe", "encode_error", "encode_frame", "encode_reply", "encode_request", "negotiate", "pad",
    "parse_header", "parse_reply", "parse_request",
]
