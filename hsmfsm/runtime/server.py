"""``hsmfsm serve``: the pool as one virtual PKCS#11 slot, over p11-kit's RPC protocol.

An application loads the stock ``p11-kit-client.so`` with
``P11_KIT_SERVER_ADDRESS=unix:path=SOCKET`` and sees one slot with one
token; this server answers it (:mod:`hsmfsm.rpc.wire` for the bytes,
:mod:`hsmfsm.runtime.vslot` for the meaning, the pool for the members).

Why it is built this way (``../shared/P11KIT-RPC.md`` §1.2, §5.6, measured):

- **Threads, not asyncio.** python-pkcs11 releases the GIL in its C calls, so
  member calls overlap in threads; only the codec holds the GIL (microseconds).
- **One reader per connection, one FIFO per session, a shared worker pool.**
  One multi-threaded application is one connection with several requests in
  flight (p11-kit-client pipelines and matches replies by the frame's
  sequence code). PKCS#11 sessions are not reentrant and order inside one
  matters, so requests on one session run in order; requests on different
  sessions run in parallel on the workers, and each reply is written as soon
  as it is ready, under the connection's write lock.
- **The application's socket is never closed because a member failed.** A
  closed socket latches p11-kit-client into CKR_DEVICE_ERROR until
  C_Finalize. Member failures are error replies; only a frame that cannot be
  framed (a header beyond the caps) closes that one connection.
- **Hostile input**: caps on frames, counts and lengths (the codec), a
  malformed request gets an error reply, a uid not allowed is refused at
  connect (SO_PEERCRED), and no argument of C_Login, C_InitPIN or C_SetPIN is
  ever logged.

``hsmfsm status --server SOCKET`` asks a running server for its state: a
connection whose first byte is ``S`` (a p11-kit client sends its protocol
version there, 0 to 2) gets one JSON document and is closed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.pin import PinSource
from ..config.pool_file import ServeSpec
from ..core.codes import CKR
from ..rpc import wire
from .vslot import Application, Refused, SlotConfig, VirtualSlot

log = logging.getLogger("hsmfsm.serve")

STATUS_BYTE = b"S"
_CKR_FUNCTION_NOT_SUPPORTED = CKR["CKR_FUNCTION_NOT_SUPPORTED"]
_CKR_ARGUMENTS_BAD = CKR["CKR_ARGUMENTS_BAD"]
_CKR_GENERAL_ERROR = CKR["CKR_GENERAL_ERROR"]
_PEERCRED = struct.Struct("3i")


class ServeError(RuntimeError):
    """The server cannot start (the socket's folder, another server on the socket); says what to fix."""


def prepare_socket(path: Path, allow_uids: tuple[int, ...]) -> None:
    """Make the socket's folder (0700; 0711 when other users are allowed, who are then checked by
    uid at connect) and clear a stale socket. Refuses a folder others may write to and a socket
    another server answers on."""
    own = os.getuid()
    others = any(uid not in (own, 0) for uid in allow_uids)
    folder = path.parent
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700)
        os.chmod(folder, 0o711 if others else 0o700)
    info = folder.stat()
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        raise ServeError(f"{folder}: others may write to this folder, so they could replace the socket; "
                         "give the socket a folder of its own (hsmfsm creates it, mode 0700)")
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ServeError(f"{path} exists and is not a socket; remove it or choose another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody answers: a stale socket of a server that died
        else:
            raise ServeError(f"{path}: another server answers on this socket; stop it first")
        finally:
            probe.close()


@dataclass
class _Connection:
    sock: socket.socket
    app: Application
    number: int
    since: float
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    queues: dict[Any, deque[wire.Request | tuple[int, wire.Request]]] = field(default_factory=dict)
    running: set[Any] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    idle: threading.Condition = field(init=False)
    closed: bool = False
    requests: int = 0

    def __post_init__(self) -> None:
        self.idle = threading.Condition(self.lock)


class Server:
    """Serve ``pool`` on a unix socket as one virtual slot. ``start()`` listens; ``stop()`` drains
    and closes (the pool is the caller's to close)."""

    def __init__(self, pool: Any, config: SlotConfig, socket_path: str | os.PathLike[str], *,
                 allow_uids: tuple[int, ...] | None = None, max_connections: int = 256, workers: int = 16,
                 note: Callable[..., None] | None = None) -> None:
        self.pool = pool
        self.path = Path(socket_path).absolute()
        self.allow_uids = allow_uids if allow_uids is not None else (os.getuid(),)
        self.max_connections = max_connections
        self._note = note or (lambda kind, **fields: None)
        self.slot = VirtualSlot(pool, config, note=self._note)
        self._workers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hsmfsm-serve")
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._connections: dict[int, _Connection] = {}
        self._lock = threading.Lock()
        self._next = 1
        self._stopping = threading.Event()
        self.refused = 0
        self.started = time.time()

    @property
    def address(self) -> str:
        """What applications set ``P11_KIT_SERVER_ADDRESS`` to."""
        return f"unix:path={self.path}"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, *, warm: bool = True) -> Server:
        prepare_socket(self.path, self.allow_uids)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.path))
        except OSError as exc:
            listener.close()
            raise ServeError(f"{self.path}: cannot listen: {exc.strerror}") from None
        os.chmod(self.path, 0o666 if any(u not in (os.getuid(), 0) for u in self.allow_uids) else 0o600)
        listener.listen(64)
        self._listener = listener
        if warm:
            self.slot.warm()
        self._accepting = threading.Thread(target=self._accept, name="hsmfsm-serve-accept", daemon=True)
        self._accepting.start()
        log.info("serving pool %s on %s", self.pool.name, self.address)
        return self

    def stop(self, drain: float = 5.0) -> None:
        """Stop accepting, let requests in progress finish (up to ``drain`` seconds), close every
        connection and remove the socket."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        listener = self._listener
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        if self._accepting is not None:
            self._accepting.join(timeout=2.0)
        with self._lock:
            connections = list(self._connections.values())
        until = time.monotonic() + drain
        for conn in connections:
            try:
                conn.sock.shutdown(socket.SHUT_RD)  # the reader stops; replies in progress still go out
            except OSError:
                pass
        for conn in connections:
            _wait_idle(conn, max(0.0, until - time.monotonic()))
            self._close(conn)
        self._workers.shutdown(wait=False, cancel_futures=True)
        try:
            if self.path.exists() and stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()
        except OSError:
            pass
        log.info("stopped serving pool %s", self.pool.name)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def status(self) -> dict[str, Any]:
        """The running server's state: members, connected applications, counters."""
        with self._lock:
            apps = [{"connection": c.number, "uid": c.app.uid, "pid": c.app.pid, "logged_in": c.app.logged_in,
                     "sessions": len(c.app.sessions), "requests": c.requests,
                     "connected_seconds": round(time.time() - c.since, 1)}
                    for c in self._connections.values()]
        return {"pool": self.pool.name, "socket": str(self.path), "address": self.address,
                "token_label": self.slot.config.token_label, "uptime_seconds": round(time.time() - self.started, 1),
                "members": [m.as_dict() for m in self.pool.status()], "applications": apps,
                "refused_connections": self.refused, "counters": dict(self.slot.counters)}

    # -- connections -------------------------------------------------------------------------

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)
                continue
            try:
                self._admit(sock)
            except Exception:  # never let one connection end the accept loop
                log.exception("serve: could not admit a connection")
                sock.close()

    def _admit(self, sock: socket.socket) -> None:
        pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        with self._lock:
            full = len(self._connections) >= self.max_connections
        if uid not in self.allow_uids or full:
            self.refused += 1
            why = "uid not allowed" if uid not in self.allow_uids else "too many connections"
            log.warning("serve: refused a connection from uid %d pid %d: %s", uid, pid, why)
            self._note("application_refused", uid=uid, peer_pid=pid, reason=why)
            sock.close()
            return
        with self._lock:
            number = self._next
            self._next += 1
        conn = _Connection(sock, Application(uid, pid, f"uid={uid} pid={pid}"), number, time.time())
        threading.Thread(target=self._read, args=(conn,), name=f"hsmfsm-serve-conn-{number}", daemon=True).start()

    def _read(self, conn: _Connection) -> None:
        sock = conn.sock
        try:
            first = _recv_exact(sock, 1)
            if first is None:
                return
            if first == STATUS_BYTE:
                sock.sendall(json.dumps(self.status()).encode() + b"\n")
                return
            sock.sendall(bytes([wire.negotiate(first[0])]))
            with self._lock:
                self._connections[conn.number] = conn
            conn.app = self.slot.application(conn.app.uid, conn.app.pid, first[0])
            while not self._stopping.is_set():
                header = _recv_exact(sock, wire.HEADER.size)
                if header is None:
                    return
                code, options_len, data_len = wire.parse_header(header)
                body = _recv_exact(sock, options_len + data_len)
                if body is None:
                    return
                self._dispatch(conn, code, body[options_len:])
        except wire.ProtocolError as exc:  # a frame that cannot be framed: this connection only
            log.warning("serve: connection %d (%s): %s; closing it", conn.number, conn.app.name, exc)
        except OSError:
            pass
        finally:
            with self._lock:
                known = conn.number in self._connections
            if known:
                _wait_idle(conn, 30.0)
                self.slot.disconnected(conn.app)
                with self._lock:  # gone from the status only once its record is out
                    self._connections.pop(conn.number, None)
            self._close(conn)

    def _dispatch(self, conn: _Connection, code: int, data: bytes) -> None:
        conn.requests += 1
        try:
            request = wire.parse_request(data, client_version=conn.app.client_version)
        except wire.UnknownCall as exc:
            self._reply(conn, code, wire.encode_error(_CKR_FUNCTION_NOT_SUPPORTED))
            log.debug("serve: call id %d is not served", exc.call_id)
            return
        except wire.ProtocolError as exc:
            log.warning("serve: connection %d (%s): malformed request: %s", conn.number, conn.app.name, exc)
            self._reply(conn, code, wire.encode_error(_CKR_ARGUMENTS_BAD))
            return
        key = self.slot.session_of(request.call.name, request.args)
        with conn.lock:
            idle = key not in conn.running
        if idle and (len(conn.app.sessions) <= 1 and not conn.running
                     or self.slot.is_quick(conn.app, request.call.name, request.args)):
            # Nothing of this session is queued or running, and either the answer needs no member,
            # or the connection has a single session (so no request of another session can be
            # waiting behind this one): answer here, in order, without a hand-off to a worker.
            self._reply(conn, code, self._answer(conn, request))
            return
        with conn.lock:
            queue = conn.queues.setdefault(key, deque())
            queue.append((code, request))
            if key in conn.running:
                return
            conn.running.add(key)
        self._workers.submit(self._drain, conn, key)

    def _drain(self, conn: _Connection, key: Any) -> None:
        """Run one session's requests in order until its queue is empty."""
        while True:
            with conn.lock:
                queue = conn.queues.get(key)
                if not queue:
                    conn.queues.pop(key, None)
                    conn.running.discard(key)
                    conn.idle.notify_all()
                    return
                code, request = queue.popleft()  # type: ignore[misc]
            self._reply(conn, code, self._answer(conn, request))

    def _answer(self, conn: _Connection, request: wire.Request) -> bytes:
        name = request.call.name
        try:
            results = self.slot.call(conn.app, name, request.args)
            return wire.encode_reply(request.call.id, *results, client_version=conn.app.client_version)
        except Refused as exc:
            if exc.rv != _CKR_FUNCTION_NOT_SUPPORTED or name in ("C_GenerateKeyPair", "C_GenerateKey"):
                log.debug("serve: %s -> %s", wire.describe(request), exc)
            return wire.encode_error(exc.rv)
        except Exception:  # a defect here must not take the connection or the server down
            log.exception("serve: %s failed", wire.describe(request))
            return wire.encode_error(_CKR_GENERAL_ERROR)

    def _reply(self, conn: _Connection, code: int, data: bytes) -> None:
        frame = wire.encode_frame(code, data)
        with conn.write_lock:
            if conn.closed:
                return
            try:
                conn.sock.sendall(frame)
            except OSError:
                pass  # the application went away; its reader thread cleans up

    def _close(self, conn: _Connection) -> None:
        with conn.write_lock:
            if conn.closed:
                return
            conn.closed = True
            try:
                conn.sock.close()
            except OSError:
                pass


def from_spec(pool: Any, serve: ServeSpec, *, socket_path: str | os.PathLike[str] | None = None) -> Server:
    """A server for ``pool`` as its pool file's ``serve`` section says (``--socket`` overrides it).
    The application PIN is read from its source at each C_Login, never kept."""
    pin = PinSource(serve.pin)
    config = SlotConfig(token_label=serve.token_label, pin=pin.read, outage_codes=serve.outage_codes,
                        keygen=serve.keygen, max_operation_bytes=serve.max_operation_bytes)
    audit = getattr(pool, "audit", None)
    return Server(pool, config, socket_path if socket_path is not None else serve.socket,
                  allow_uids=serve.allow_uids, max_connections=serve.max_connections, workers=serve.workers,
                  note=audit.note if audit is not None else None)


def _wait_idle(conn: _Connection, timeout: float) -> None:
    with conn.idle:
        conn.idle.wait_for(lambda: not conn.running, timeout=timeout)


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    """``size`` bytes, or None at EOF (a partial frame at EOF is also None: the peer went away)."""
    if size == 0:
        return b""
    chunks = []
    left = size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def query_status(socket_path: str | os.PathLike[str], timeout: float = 5.0) -> dict[str, Any]:
    """Ask a running ``hsmfsm serve`` for its state (``hsmfsm status --server``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(socket_path))
        sock.sendall(STATUS_BYTE)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    finally:
        sock.close()
    if not chunks:
        raise ServeError(f"{socket_path}: the server closed the connection without an answer "
                         "(is this uid allowed by serve.allow_uids?)")
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result
