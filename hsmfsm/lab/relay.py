"""A unix-socket relay between p11-kit-client and `p11-kit server` that can lie.

SoftHSM never answers CKR_TOKEN_NOT_PRESENT, CKR_DEVICE_REMOVED or a vendor
code, yet those are exactly the answers a real network HSM gives when an HA
member fails (FACTS). To test the recovery paths over the real wire, this
relay sits between the client module and the server, forwards every byte,
and on command replaces the reply of a chosen call with an error.

The p11-kit RPC, as seen on the wire (p11-kit 0.24.1, and p11-kit's
rpc-message.h / rpc-message.c / rpc-transport.c)::

    client -> server   1 byte   protocol version (0 with 0.24.1)
    server -> client   1 byte   the version it accepts
    then, in both directions, frames:
        [u32 code][u32 options_len][u32 data_len] options data   (big-endian)
    data of a request or reply:
        [u32 call_id][u32 sig_len][sig bytes] arguments...

`code` pairs a reply with its request; the client waits for the reply before
it sends the next request on a connection, so one connection never has two
requests in flight, and a reply always answers the oldest pending request.
An error reply is ``call_id 0 (P11_RPC_CALL_ERROR), signature "u", u64
CK_RV``; the client hands that CK_RV to the caller verbatim.

Call ids (``CALL_IDS``) are p11-kit's ``P11_RPC_CALL_*`` enumeration. They
were read from rpc-message.h and checked against live traffic of python-pkcs11
through p11-kit-client 0.24.1: every request's signature string matched the
table's request signature for its id (C_Initialize 1 "ayyay", C_OpenSession
10 "uu", C_Login 18 "uuay", C_FindObjectsInit 26 "uaA", C_SignInit 42
"uMu", C_Sign 43 "uayfy", C_GenerateRandom 64 "ufy", ...); tests/test_relay.py
re-checks this on every run.

Length queries: python-pkcs11 signs with C_SignInit, then C_Sign with a NULL
buffer (how long is the signature?), then the real C_Sign. A request whose
signature ends in "fy" and whose trailing u32 (the output buffer length) is 0
is such a query. The relay never rewrites one: the token would keep the
operation active while the client believes it ended (FACTS).
"""

from __future__ import annotations

import collections
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CALL_IDS", "CALL_NAMES", "Relay", "RelayError", "TraceEntry"]

#: p11-kit's P11_RPC_CALL_* ids, in enumeration order (rpc-message.h).
CALL_IDS: dict[str, int] = {
    name: number
    for number, name in enumerate(
        [
            "ERROR", "C_Initialize", "C_Finalize", "C_GetInfo", "C_GetSlotList",
            "C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo",
            "C_InitToken", "C_OpenSession", "C_CloseSession", "C_CloseAllSessions",
            "C_GetSessionInfo", "C_InitPIN", "C_SetPIN", "C_GetOperationState",
            "C_SetOperationState", "C_Login", "C_Logout", "C_CreateObject", "C_CopyObject",
            "C_DestroyObject", "C_GetObjectSize", "C_GetAttributeValue", "C_SetAttributeValue",
            "C_FindObjectsInit", "C_FindObjects", "C_FindObjectsFinal", "C_EncryptInit",
            "C_Encrypt", "C_EncryptUpdate", "C_EncryptFinal", "C_DecryptInit", "C_Decrypt",
            "C_DecryptUpdate", "C_DecryptFinal", "C_DigestInit", "C_Digest", "C_DigestUpdate",
            "C_DigestKey", "C_DigestFinal", "C_SignInit", "C_Sign", "C_SignUpdate",
            "C_SignFinal", "C_SignRecoverInit", "C_SignRecover", "C_VerifyInit", "C_Verify",
            "C_VerifyUpdate", "C_VerifyFinal", "C_VerifyRecoverInit", "C_VerifyRecover",
            "C_DigestEncryptUpdate", "C_DecryptDigestUpdate", "C_SignEncryptUpdate",
            "C_DecryptVerifyUpdate", "C_GenerateKey", "C_GenerateKeyPair", "C_WrapKey",
            "C_UnwrapKey", "C_DeriveKey", "C_SeedRandom", "C_GenerateRandom",
            "C_WaitForSlotEvent",
        ]
    )
}
CALL_NAMES: dict[int, str] = {number: name for name, number in CALL_IDS.items()}

ANY_CALL = "*"
#: `fail("*")` spares these: failing them breaks the client library itself
#: (a failed C_Initialize leaves python-pkcs11 uninitialised), not a call.
#: Name them explicitly to fail them anyway.
WILDCARD_EXEMPT = frozenset({"C_Initialize", "C_Finalize"})

_HEADER = struct.Struct(">III")
_ERROR_CALL = 0
_MAX_FRAME = 64 << 20  # far above any PKCS#11 payload; a larger length is a corrupt stream
_CONNECT_TIMEOUT = 2.0


class RelayError(RuntimeError):
    """The relay could not start or was misused; the message says what."""


class _Closed(Exception):
    """A peer closed or reset its side of a link."""


@dataclass(frozen=True)
class _Frame:
    """One RPC frame. `call_id`/`signature` are None when `data` is too short to hold them."""

    code: int
    options: bytes
    data: bytes

    @property
    def call_id(self) -> int | None:
        return struct.unpack_from(">I", self.data)[0] if len(self.data) >= 4 else None

    @property
    def signature(self) -> str | None:
        if len(self.data) < 8:
            return None
        (length,) = struct.unpack_from(">I", self.data, 4)
        sig = self.data[8 : 8 + length]
        return sig.decode("ascii", "replace") if len(sig) == length else None

    @property
    def is_length_query(self) -> bool:
        """A call that only asks how big its output buffer must be (see module docstring)."""
        sig = self.signature
        return bool(sig and sig.endswith("fy") and self.data[-4:] == b"\0\0\0\0")

    def encode(self) -> bytes:
        return _HEADER.pack(self.code, len(self.options), len(self.data)) + self.options + self.data

    def as_error(self, rv: int) -> "_Frame":
        """This frame's reply slot filled with the RPC error `rv` instead."""
        data = struct.pack(">II", _ERROR_CALL, 1) + b"u" + struct.pack(">Q", rv)
        return _Frame(self.code, b"", data)


@dataclass(frozen=True)
class TraceEntry:
    """One frame the relay saw, recorded when the relay was made with `trace=True`."""

    link: int
    direction: str  # "request" (client to server) or "reply"
    call: str  # call name, or "#<id>" for an id this module does not know
    signature: str | None
    data_len: int
    rewritten_rv: int | None = None


@dataclass
class _Fault:
    rv: int
    remaining: int | None
    forward: bool


@dataclass
class _Verdict:
    """What to do with the reply of one forwarded request."""

    call: str
    rv: int | None  # None: pass the real reply through


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        try:
            chunk = sock.recv(size - len(chunks))
        except OSError as exc:
            raise _Closed from exc
        if not chunk:
            raise _Closed
        chunks += chunk
    return bytes(chunks)


def _read_frame(sock: socket.socket) -> _Frame:
    code, options_len, data_len = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if options_len > _MAX_FRAME or data_len > _MAX_FRAME:
        raise _Closed  # not p11-kit RPC any more: drop the link as a broken wire would
    return _Frame(code, _recv_exact(sock, options_len), _recv_exact(sock, data_len))


def _send(sock: socket.socket, payload: bytes) -> None:
    try:
        sock.sendall(payload)
    except OSError as exc:
        raise _Closed from exc


def _call_name(call_id: int | None) -> str:
    if call_id is None:
        return "#short"
    return CALL_NAMES.get(call_id, f"#{call_id}")


@dataclass(eq=False)
class _Link:
    """One client connection and its own upstream connection, pumped by two threads.

    Either side ending ends both: a client that vanishes mid-frame must not
    leave a server child waiting forever, and a dead server must look dead
    to the client (the p11-kit client then reports CKR_DEVICE_ERROR).
    """

    number: int
    client: socket.socket
    upstream: socket.socket
    relay: "Relay"
    pending: collections.deque[_Verdict] = field(default_factory=collections.deque)
    client_lock: threading.Lock = field(default_factory=threading.Lock)
    closed: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    _pumps_left: int = 2
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for name, pump in (("requests", self._pump_requests), ("replies", self._pump_replies)):
            thread = threading.Thread(target=self._run, args=(pump,), daemon=True,
                                      name=f"relay-link{self.number}-{name}")
            self.threads.append(thread)
            thread.start()

    def close(self) -> None:
        """Break both connections now; the pumps notice and exit (idempotent)."""
        self.closed.set()
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _run(self, pump) -> None:
        try:
            pump()
        except _Closed:
            pass
        finally:
            self.close()
            self._pump_done()

    def _pump_done(self) -> None:
        # The file descriptors are closed only when both pumps are out of
        # recv/send: closing an fd another thread blocks on does not wake it.
        with self._lock:
            self._pumps_left -= 1
            last = self._pumps_left == 0
        if last:
            self.client.close()
            self.upstream.close()
            self.relay._forget(self)

    def _reply_to_client(self, payload: bytes) -> None:
        with self.client_lock:
            _send(self.client, payload)

    def _pump_requests(self) -> None:
        _send(self.upstream, _recv_exact(self.client, 1))  # version handshake
        while not self.closed.is_set():
            frame = _read_frame(self.client)
            verdict, forward = self.relay._judge(self, frame)
            if forward:
                self.pending.append(verdict)
                _send(self.upstream, frame.encode())
            else:
                self._delay()
                self._reply_to_client(frame.as_error(verdict.rv).encode())

    def _pump_replies(self) -> None:
        self._reply_to_client(_recv_exact(self.upstream, 1))  # version handshake
        while not self.closed.is_set():
            frame = _read_frame(self.upstream)
            verdict = self.pending.popleft() if self.pending else _Verdict(_call_name(frame.call_id), None)
            if verdict.rv is not None:
                frame = frame.as_error(verdict.rv)
            self.relay._record(self, "reply", frame, verdict.call, verdict.rv)
            self._delay()
            self._reply_to_client(frame.encode())

    def _delay(self) -> None:
        latency = self.relay.latency
        if latency > 0:
            self.closed.wait(latency)  # wakes at once when the link or relay closes


class Relay:
    """A transparent, scriptable relay from `listen_path` to a p11-kit server at `upstream_path`.

    Every client connection gets its own upstream connection (so the server
    forks its own child for it, as without the relay) and two pump threads.
    Usage::

        relay = Relay(tmp / "relay.sock", hsm.socket_path).start()
        os.environ["P11_KIT_SERVER_ADDRESS"] = relay.address   # before loading the client
        relay.fail("C_Sign", 0xE0)        # CKR_TOKEN_NOT_PRESENT until cleared
        relay.fail("C_Login", 0xA0, count=1, forward=False)
        relay.clear()
        relay.calls_seen("C_Login")       # requests seen on the wire
        relay.reset_connections()         # a network reset
        relay.latency = 0.05              # seconds added to every reply
        relay.stop()

    It is also a context manager (`with Relay(...).start() as relay:`).
    """

    def __init__(self, listen_path: Path | str, upstream_path: Path | str, *,
                 latency: float = 0.0, trace: bool = False) -> None:
        self.listen_path = Path(listen_path)
        self.upstream_path = Path(upstream_path)
        #: Seconds to wait before passing on each reply (not the handshake byte).
        #: Read per reply, so it can be changed while clients are connected.
        self.latency = latency
        #: Frames seen, in order, when `trace` is true; for debugging and for
        #: checking call ids against live traffic.
        self.trace: list[TraceEntry] | None = [] if trace else None
        self._lock = threading.Lock()
        self._faults: dict[str, _Fault] = {}
        self._seen: collections.Counter[str] = collections.Counter()
        self._rewritten: collections.Counter[str] = collections.Counter()
        self._links: set[_Link] = set()
        self._link_numbers = 0
        self._listener: socket.socket | None = None
        self._waker: tuple[socket.socket, socket.socket] | None = None
        self._acceptor: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- life cycle -----------------------------------------------------

    @property
    def address(self) -> str:
        """Value for P11_KIT_SERVER_ADDRESS that points a client at this relay."""
        return f"unix:path={self.listen_path.absolute()}"

    def start(self) -> "Relay":
        """Listen on `listen_path` (a stale socket file there is replaced) and start accepting."""
        if self._acceptor is not None:
            raise RelayError(f"relay on {self.listen_path} already started")
        self.listen_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.listen_path))
            listener.listen(128)
        except OSError as exc:
            listener.close()
            raise RelayError(f"relay cannot listen on {self.listen_path}: {exc}; "
                             "unix socket paths must be under 108 bytes") from exc
        listener.setblocking(False)
        self._listener = listener
        self._waker = socket.socketpair()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name=f"relay-accept-{self.listen_path.name}")
        self._acceptor.start()
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """Close the listener and every link, and join all threads within `timeout` seconds."""
        if self._acceptor is None or self._stopping.is_set():
            return
        self._stopping.set()
        assert self._waker is not None
        self._waker[1].send(b"x")
        deadline = time.monotonic() + timeout
        self._acceptor.join(max(0.0, deadline - time.monotonic()))
        links = self._close_links()
        for link in links:
            for thread in link.threads:
                thread.join(max(0.0, deadline - time.monotonic()))
        for sock in (*self._waker, self._listener):
            if sock is not None:
                sock.close()
        self.listen_path.unlink(missing_ok=True)

    def __enter__(self) -> "Relay":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def connections(self) -> int:
        """Client connections currently open through the relay."""
        with self._lock:
            return len(self._links)

    def reset_connections(self) -> int:
        """Break every open client connection (and its upstream) at once, like a network reset.

        The listener stays up: a client that reconnects (python-pkcs11's
        `reinitialize()`) gets through again. Returns how many links were cut.
        """
        return len(self._close_links())

    # -- faults ---------------------------------------------------------

    def fail(self, call: str | None, rv: int, count: int | None = None, *,
             forward: bool = True) -> None:
        """Answer `call` with CK_RV `rv` instead of the token's reply.

        `call` is a PKCS#11 function name ("C_Sign"), or "*"/None for every
        call except C_Initialize and C_Finalize (see WILDCARD_EXEMPT); a rule
        for a named call wins over "*". `count` is how many replies to
        rewrite, None for every one until `clear()`. A new rule for the same
        call replaces the old one.

        `forward=True` sends the request on and replaces the reply: the token
        did the work (a C_Sign signed, a C_Login logged in) but the client
        hears `rv` -- a failure after the request reached the HSM.
        `forward=False` answers from the relay: the token never sees the
        request -- a failure before it reached the HSM. Use that for calls
        that must not take effect (C_Login, C_SignInit, C_OpenSession); never
        for a call inside an operation (C_Sign), which would leave the
        operation active on the token.

        Length queries (module docstring) always pass untouched and do not
        use up `count`.
        """
        key = self._rule_key(call)
        if count is not None and count < 1:
            raise RelayError(f"fail({call!r}, count={count}): count must be at least 1, or None")
        if not 0 < rv <= 0xFFFFFFFFFFFFFFFF:
            raise RelayError(f"fail({call!r}, rv={rv:#x}): CKR_OK cannot be an error reply")
        with self._lock:
            self._faults[key] = _Fault(rv, count, forward)

    def clear(self, call: str | None = None) -> None:
        """Stop rewriting: every rule, or only the rule for `call` ("*" for the wildcard rule)."""
        with self._lock:
            if call is None:
                self._faults.clear()
            else:
                self._faults.pop(self._rule_key(call), None)

    def calls_seen(self, call: str) -> int:
        """Requests of `call` that reached the relay, on every connection, failed ones included.

        Counts wire requests, not PKCS#11 calls: one python-pkcs11 `sign`
        is one C_SignInit and two C_Sign (length query, then the real one).
        """
        self._rule_key(call)
        with self._lock:
            return self._seen[call]

    def calls_failed(self, call: str) -> int:
        """Replies of `call` the relay replaced with an error so far."""
        self._rule_key(call)
        with self._lock:
            return self._rewritten[call]

    @staticmethod
    def _rule_key(call: str | None) -> str:
        if call is None or call == ANY_CALL:
            return ANY_CALL
        if call not in CALL_IDS or call == "ERROR":
            raise RelayError(f"unknown PKCS#11 call {call!r}; use a name such as 'C_Sign' "
                             f"(known: {', '.join(n for n in CALL_IDS if n != 'ERROR')})")
        return call

    # -- called by links ------------------------------------------------

    def _judge(self, link: _Link, frame: _Frame) -> tuple[_Verdict, bool]:
        """Count a request and decide its fate: (verdict for its reply, forward it?)."""
        call = _call_name(frame.call_id)
        with self._lock:
            self._seen[call] += 1
            fault = self._matching_fault(call, frame)
            if fault is not None:
                self._rewritten[call] += 1
                if fault.remaining is not None:
                    fault.remaining -= 1
        self._record(link, "request", frame, call, None)
        if fault is None:
            return _Verdict(call, None), True
        if not fault.forward:
            self._record(link, "reply", frame.as_error(fault.rv), call, fault.rv)
        return _Verdict(call, fault.rv), fault.forward

    def _matching_fault(self, call: str, frame: _Frame) -> _Fault | None:
        if frame.is_length_query:
            return None
        fault = self._faults.get(call)
        if fault is None and call not in WILDCARD_EXEMPT:
            fault = self._faults.get(ANY_CALL)
        if fault is None or fault.remaining == 0:
            return None
        return fault

    def _record(self, link: _Link, direction: str, frame: _Frame, call: str, rv: int | None) -> None:
        if self.trace is None:
            return
        entry = TraceEntry(link.number, direction, call, frame.signature, len(frame.data), rv)
        with self._lock:
            self.trace.append(entry)

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    # -- accepting ------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._waker is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._waker[0], selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self._listener:
                        self._accept_one()

    def _accept_one(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        client.setblocking(True)
        upstream = self._connect_upstream()
        if upstream is None:
            client.close()  # the HSM is down: the client sees its connection closed
            return
        with self._lock:
            if self._stopping.is_set():
                client.close()
                upstream.close()
                return
            self._link_numbers += 1
            link = _Link(self._link_numbers, client, upstream, self)
            self._links.add(link)
        link.start()

    def _connect_upstream(self) -> socket.socket | None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.settimeout(_CONNECT_TIMEOUT)
        try:
            upstream.connect(str(self.upstream_path))
        except OSError:
            upstream.close()
            return None
        upstream.settimeout(None)
        return upstream

    def _close_links(self) -> list[_Link]:
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()
        return links

    def __repr__(self) -> str:
        with self._lock:
            rules = ", ".join(f"{c}->{f.rv:#x}" for c, f in self._faults.items()) or "none"
            links = len(self._links)
        return f"<Relay {self.listen_path} -> {self.upstream_path}: {links} links, faults {rules}>"
