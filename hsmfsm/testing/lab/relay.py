"""A unix-socket relay between p11-kit-client and `p11-kit server` that can lie.

SoftHSM never answers CKR_TOKEN_NOT_PRESENT, CKR_DEVICE_REMOVED or a vendor
code, yet those are exactly the answers a real network HSM gives when an HA
member fails (docs/FACTS.md). To test the recovery paths over the real wire, this
relay sits between the client module and the server, forwards every byte,
and on command replaces the reply of a chosen call with an error, delays
replies, or cuts every connection.

`Relay` is the class to use: it runs the relay in a child process, because
python-pkcs11 holds the GIL in C_Finalize and a relay thread in the same
interpreter would deadlock `lib.reinitialize()`. `InProcessRelay` is the
engine it runs there (listener thread plus two pump threads per connection).

The p11-kit RPC, as seen on the wire (p11-kit 0.24.1, and p11-kit's
rpc-message.h / rpc-message.c / rpc-transport.c)::

    client -> server   1 byte   protocol version (0 with 0.24.1)
    server -> client   1 byte   the version it accepts
    then, in both directions, frames:
        [u32 code][u32 options_len][u32 data_len] options data   (big-endian)
    data of a request or reply:
        [u32 call_id][u32 sig_len][sig bytes] arguments...

`code` is a per-connection sequence number that the reply echoes; requests
carry the options b"client", replies none. The client waits for the reply before
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
re-checks this on every run. Calls that share a signature ("u": C_GetSlotInfo
5, C_GetTokenInfo 6, C_CloseSession 11, C_Logout 19, C_FindObjectsFinal 28)
were told apart by the order python-pkcs11 makes them; C_GetSessionInfo (13,
"u") was not seen on the wire and rests on the enumeration alone.

Length queries: python-pkcs11 signs with C_SignInit, then C_Sign with a NULL
buffer (how long is the signature?), then the real C_Sign. A request whose
signature ends in "fy" and whose trailing u32 (the output buffer length) is 0
is such a query. The relay never rewrites one: the token would keep the
operation active while the client believes it ended (docs/FACTS.md).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CALL_IDS", "CALL_NAMES", "InProcessRelay", "Relay", "RelayError", "TraceEntry",
           "WILDCARD_EXEMPT"]

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

    def as_error(self, rv: int) -> _Frame:
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
    relay: InProcessRelay
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

    def _run(self, pump: Callable[[], None]) -> None:
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
                assert verdict.rv is not None  # the relay answers itself only for a matching fault
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


class InProcessRelay:
    """The relay engine: listener and pump threads in the current process.

    Do not put it in front of a python-pkcs11 `lib` of the same process:
    python-pkcs11 0.10.1 holds the GIL while it calls C_Finalize (`finalize`,
    `reinitialize`, `unload` and garbage collection of the lib), so the
    relay's threads can never forward that request and the process hangs
    (measured). `Relay` runs this engine in a child process instead; use this
    class directly only where no client library shares the interpreter.
    The methods are documented on `Relay`.
    """

    def __init__(self, listen_path: Path | str, upstream_path: Path | str, *,
                 latency: float = 0.0, trace: bool = False) -> None:
        self.listen_path = Path(listen_path)
        self.upstream_path = Path(upstream_path)
        #: Seconds to wait before passing on each reply (not the handshake
        #: byte); read per reply, so it can change while clients are connected.
        self.latency = latency
        self._trace: list[TraceEntry] | None = [] if trace else None
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

    @property
    def trace(self) -> list[TraceEntry]:
        """Frames seen so far, in order (empty unless made with `trace=True`)."""
        with self._lock:
            return list(self._trace or ())

    # -- life cycle -----------------------------------------------------

    @property
    def address(self) -> str:
        """Value for P11_KIT_SERVER_ADDRESS that points a client at this relay."""
        return f"unix:path={self.listen_path.absolute()}"

    def start(self) -> InProcessRelay:
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
            hint = "; use a shorter directory (108-byte limit)" if len(str(self.listen_path)) > 107 else ""
            raise RelayError(f"relay cannot listen on {self.listen_path}: {exc}{hint}") from exc
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

    def __enter__(self) -> InProcessRelay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def connections(self) -> int:
        """Client connections currently open through the relay."""
        with self._lock:
            return len(self._links)

    def reset_connections(self) -> int:
        """Break every open link now; see `Relay.reset_connections`."""
        return len(self._close_links())

    # -- faults ---------------------------------------------------------

    def fail(self, call: str | None, rv: int, count: int | None = None, *,
             forward: bool = True) -> None:
        """Rewrite replies of `call` to `rv`; the rules are on `Relay.fail`."""
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
        """Requests of `call` seen on every connection; see `Relay.calls_seen`."""
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
        if self._trace is None:
            return
        entry = TraceEntry(link.number, direction, call, frame.signature, len(frame.data), rv)
        with self._lock:
            self._trace.append(entry)

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
        return f"<InProcessRelay {self.listen_path} -> {self.upstream_path}: {links} links, faults {rules}>"


class Relay:
    """A transparent, scriptable relay to a p11-kit server, run in a child process.

    `listen_path` is where clients connect (point them at `address`);
    `upstream_path` is the server's socket. Every client connection gets its
    own upstream connection, so the server forks its own child for it as it
    would without the relay. Usage::

        relay = Relay(tmp / "relay.sock", hsm.socket_path).start()
        os.environ["P11_KIT_SERVER_ADDRESS"] = relay.address  # before loading the client
        relay.fail("C_Sign", 0xE0)        # CKR_TOKEN_NOT_PRESENT until cleared
        relay.fail("C_Login", 0xA0, count=1, forward=False)
        relay.clear()
        relay.calls_seen("C_Login")       # C_Login requests seen on the wire
        relay.reset_connections()         # a network reset
        relay.latency = 0.05              # seconds added to every reply
        relay.stop()

    Why a child process: python-pkcs11 holds the GIL during C_Finalize, so a
    relay thread in the same interpreter deadlocks `lib.reinitialize()`
    (see `InProcessRelay`). The child runs `InProcessRelay` and obeys
    one-line JSON commands on its stdin; every method here returns once the
    child has applied it, so a `fail()` is in force for the very next call.
    The child runs in a process group of its own (like the lab's servers),
    exits when its stdin closes, and so never outlives the test process.
    """

    def __init__(self, listen_path: Path | str, upstream_path: Path | str, *,
                 latency: float = 0.0, trace: bool = False) -> None:
        self.listen_path = Path(listen_path)
        self.upstream_path = Path(upstream_path)
        self._latency = latency
        self._trace = trace
        self._proc: subprocess.Popen[bytes] | None = None
        self._inbox = bytearray()
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        """Value for P11_KIT_SERVER_ADDRESS that points a client at this relay."""
        return f"unix:path={self.listen_path.absolute()}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 10.0) -> Relay:
        """Start the child and return once it listens on `listen_path` (a stale file there is replaced)."""
        if self._proc is not None:
            raise RelayError(f"relay on {self.listen_path} already started (pid {self._proc.pid})")
        # Not "-m": hsmfsm.testing.lab imports this module first, and runpy would warn about running it twice.
        argv = [sys.executable, "-c", f"import sys, {__name__} as r; sys.exit(r.main(sys.argv[1:]))",
                str(self.listen_path), str(self.upstream_path),
                "--latency", repr(self._latency)] + (["--trace"] if self._trace else [])
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env=env, start_new_session=True)
        try:
            self._receive(timeout)
        except RelayError:
            self._kill()
            raise
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """Close the listener and every connection; the child is gone within `timeout` seconds.

        Asks the child to stop cleanly, and kills its process group if it
        has not exited by the deadline (the kernel then closes its sockets,
        which is just as final for the clients).
        """
        if self._proc is None:
            return
        deadline = time.monotonic() + timeout
        try:
            self._command("stop", timeout=timeout * 0.9)
            self._proc.wait(max(0.0, deadline - time.monotonic()))
        except (RelayError, subprocess.TimeoutExpired):
            pass
        self._kill()
        self.listen_path.unlink(missing_ok=True)

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def latency(self) -> float:
        """Seconds the relay waits before passing on each reply (not the handshake byte).

        Applies to replies sent after it is set, on every connection; calls
        already waiting keep the delay they started with.
        """
        return self._latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        if seconds < 0:
            raise RelayError(f"latency {seconds!r}: must be zero or more seconds")
        self._command("set_latency", seconds=float(seconds))
        self._latency = float(seconds)

    @property
    def connections(self) -> int:
        """Client connections currently open through the relay."""
        return self._count("connections")

    @property
    def trace(self) -> list[TraceEntry]:
        """Every frame seen so far, in order, if made with `trace=True` (else empty).

        For debugging, and for checking CALL_IDS against live traffic.
        """
        return [TraceEntry(**entry) for entry in self._command("trace")]

    def fail(self, call: str | None, rv: int, count: int | None = None, *,
             forward: bool = True) -> None:
        """Answer `call` with CK_RV `rv` instead of the token's reply.

        `call` is a PKCS#11 function name ("C_Sign"), or "*"/None for every
        call except C_Initialize and C_Finalize (WILDCARD_EXEMPT: failing
        those breaks the client library, not a call; name them to fail them
        anyway). A rule for a named call wins over "*". `count` is how many
        replies to rewrite, None for every one until `clear()`. A new rule
        for the same call replaces the old one.

        `forward=True` sends the request on and replaces the reply: the
        token did the work (a C_Sign signed, a C_Login logged in) but the
        client hears `rv` -- a failure after the request reached the HSM.
        `forward=False` answers from the relay: the token never sees the
        request -- a failure before it reached the HSM. Use that for calls
        that must not take effect (C_Login, C_SignInit, C_OpenSession);
        never for a call inside an operation (C_Sign), which would leave the
        operation active on the token.

        Length queries (module docstring) always pass untouched and do not
        use up `count`.
        """
        self._command("fail", call=call, rv=rv, count=count, forward=forward)

    def clear(self, call: str | None = None) -> None:
        """Stop rewriting: every rule, or only the rule for `call` ("*" for the wildcard rule)."""
        self._command("clear", call=call)

    def calls_seen(self, call: str) -> int:
        """Requests of `call` that reached the relay, on every connection, failed ones included.

        Counts wire requests, not PKCS#11 calls: one python-pkcs11 `sign` is
        one C_SignInit and two C_Sign (the length query, then the real one).
        """
        return self._count("calls_seen", call=call)

    def calls_failed(self, call: str) -> int:
        """Replies of `call` the relay has replaced with an error so far."""
        return self._count("calls_failed", call=call)

    def reset_connections(self) -> int:
        """Break every open client connection (and its upstream) at once, like a network reset.

        The listener stays up: a client that reconnects (python-pkcs11's
        `reinitialize()`) gets through again. Returns how many were cut.
        """
        return self._count("reset_connections")

    # -- talking to the child -------------------------------------------

    def _command(self, op: str, timeout: float = 10.0, **args: object) -> Any:
        if self._proc is None:
            raise RelayError(f"relay on {self.listen_path} is not running: call start() first")
        with self._lock:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(json.dumps({"op": op, "args": args}).encode() + b"\n")
                self._proc.stdin.flush()
            except OSError as exc:
                raise RelayError(f"relay on {self.listen_path} is gone "
                                 f"(exit status {self._proc.poll()}): {exc}") from exc
            return self._receive(timeout)

    def _count(self, op: str, **args: object) -> int:
        """A command whose answer is a count."""
        reply = self._command(op, 10.0, **args)
        if not isinstance(reply, int):
            raise RelayError(f"relay on {self.listen_path}: {op} answered {reply!r}, not a count")
        return reply

    def _receive(self, timeout: float) -> Any:
        reply = json.loads(self._read_line(timeout))
        if "error" in reply:
            raise RelayError(reply["error"])
        return reply["ok"]

    def _read_line(self, timeout: float) -> bytes:
        """One line from the child, or RelayError if it dies or stays silent for `timeout` seconds."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._inbox:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RelayError(f"relay on {self.listen_path} did not answer within {timeout}s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RelayError(f"relay on {self.listen_path} exited "
                                 f"(status {self._proc.wait()}); its stderr says why")
            self._inbox += chunk
        line, _, rest = bytes(self._inbox).partition(b"\n")
        self._inbox = bytearray(rest)
        return line

    def _kill(self) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        self._proc = None

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<Relay {self.listen_path} -> {self.upstream_path}: {state}>"


# -- the child process ----------------------------------------------------

_COMMANDS: dict[str, Callable[..., Any]] = {
    "fail": lambda r, **a: r.fail(a["call"], a["rv"], a["count"], forward=a["forward"]),
    "clear": lambda r, call: r.clear(call),
    "calls_seen": lambda r, call: r.calls_seen(call),
    "calls_failed": lambda r, call: r.calls_failed(call),
    "reset_connections": lambda r: r.reset_connections(),
    "set_latency": lambda r, seconds: setattr(r, "latency", seconds),
    "connections": lambda r: r.connections,
    "trace": lambda r: [dataclasses.asdict(entry) for entry in r.trace],
    "stop": lambda r: r.stop(),
}


def _answer(**reply: Any) -> None:
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Run an InProcessRelay and obey the JSON commands of `Relay` on stdin until stop or EOF."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("listen_path", type=Path)
    parser.add_argument("upstream_path", type=Path)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args(argv)
    try:
        relay = InProcessRelay(args.listen_path, args.upstream_path,
                               latency=args.latency, trace=args.trace).start()
    except RelayError as exc:
        _answer(error=str(exc))
        return 1
    _answer(ok=relay.address)
    try:
        for line in sys.stdin:
            request = json.loads(line)
            try:
                _answer(ok=_COMMANDS[request["op"]](relay, **request["args"]))
            except (RelayError, KeyError, TypeError, ValueError) as exc:
                _answer(error=f"{request.get('op')}: {exc}")
            if request["op"] == "stop":
                return 0
    finally:
        relay.stop()  # stdin closed: the parent is gone
    return 0


if __name__ == "__main__":
    sys.exit(main())
