"""``hsmfsm serve`` on the wire: framing, pipelining, hostile input, access control, status.

A real server on a unix socket in a temporary folder, over a pool of ScriptedHSMs on the
system clock (no SoftHSM: fast); the client is a raw socket speaking p11-kit's RPC with
hsmfsm.rpc.wire, so every byte can be chosen, including wrong ones. The stock
p11-kit-client.so and real tokens are tests/test_serve.py's.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hsmfsm import SlotConnection, load_policy
from hsmfsm.core import attributes as a
from hsmfsm.core.codes import CKR
from hsmfsm.core.mechanisms import ckm_value
from hsmfsm.rpc import wire
from hsmfsm.runtime.clock import SYSTEM
from hsmfsm.runtime.pool import Pool
from hsmfsm.runtime.server import ServeError, Server, query_status
from hsmfsm.runtime.vslot import SLOT_ID, SlotConfig
from hsmfsm.testing import ScriptedHSM, ScriptedModule
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(60)

APP_PIN = "s3cret-app-pin"
SHA256_RSA = ckm_value("SHA256_RSA_PKCS")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module: two scripted replicas behind a pool, on real time."""
    policy = load_policy("network-hsm")
    member_policy = Pool.member_policy(policy, "background", 0.3, None)
    hsms = [ScriptedHSM(label="signer", pin="1234") for _ in range(2)]
    conns = [(SlotConnection(ScriptedModule(h, SYSTEM, name=f"hsm-{i}"), "signer", lambda: "1234", member_policy,
                             name=f"hsm-{i}", clock=SYSTEM, wait_for_recovery=False), False)
             for i, h in enumerate(hsms)]
    pool = Pool("signer", conns, policy, clock=SYSTEM).open()
    folder = tmp_path_factory.mktemp("serve") / "run"
    server = Server(pool, SlotConfig(token_label="signer-ha", pin=lambda: APP_PIN), folder / "s.sock").start()
    server.hsms = hsms  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()
        pool.close()


class Wire:
    """A raw p11-kit RPC client: one connection, frames chosen by the test."""

    def __init__(self, path: Path, version: int = 0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10.0)
        self.sock.connect(str(path))
        self.sock.sendall(bytes([version]))
        self.version = self.sock.recv(1)[0]
        self.code = 0x10

    def send(self, call: str, *args: object) -> int:
        self.code += 1
        self.sock.sendall(wire.encode_frame(self.code, wire.encode_request(call, *args), b"client"))
        return self.code

    def raw(self, data: bytes) -> int:
        self.code += 1
        self.sock.sendall(wire.encode_frame(self.code, data, b"client"))
        return self.code

    def receive(self) -> tuple[int, bytes]:
        header = self._exact(12)
        code, options, length = struct.unpack(">III", header)
        body = self._exact(options + length)
        return code, body[options:]

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError("the server closed the connection")
            out += chunk
        return out

    def call(self, name: str, *args: object) -> tuple[object, ...]:
        code = self.send(name, *args)
        got, data = self.receive()
        assert got == code
        return wire.parse_reply(name, data)

    def error(self, name: str, *args: object) -> int:
        with pytest.raises(wire.ErrorReply) as info:
            self.call(name, *args)
        return info.value.rv

    def start(self, login: bool = True) -> int:
        self.call("C_Initialize", wire.HANDSHAKE, 0, None)
        (session,) = self.call("C_OpenSession", SLOT_ID, 6)
        if login:
            self.call("C_Login", session, 1, APP_PIN.encode())
        assert isinstance(session, int)
        return session

    def key(self, session: int, label: bytes = b"rsa") -> int:
        self.call("C_FindObjectsInit", session, [wire.Attribute(a.CKA_CLASS, a.CKO_PRIVATE_KEY),
                                                 wire.Attribute(a.CKA_LABEL, label)])
        (found,) = self.call("C_FindObjects", session, 4)
        self.call("C_FindObjectsFinal", session)
        assert isinstance(found, list) and len(found) == 1
        return found[0]

    def close(self) -> None:
        self.sock.close()


def rv(name: str) -> int:
    return CKR[f"CKR_{name}"]


def test_the_version_byte_is_answered_with_the_lower_version(served: Server) -> None:
    for offered in (0, 1, 2):
        w = Wire(served.path, offered)
        assert w.version == 0
        w.close()


def test_unknown_and_malformed_calls_get_error_replies_and_the_connection_goes_on(served: Server) -> None:
    w = Wire(served.path)
    s = w.start()
    bad_id = struct.pack(">II", 200, 1) + b"u" + bytes(8)
    code = w.raw(bad_id)
    assert w.receive() == (code, wire.encode_error(rv("FUNCTION_NOT_SUPPORTED")))
    wrong_signature = struct.pack(">II", 43, 2) + b"uu" + bytes(16)  # C_Sign is "uayfy"
    code = w.raw(wrong_signature)
    assert w.receive() == (code, wire.encode_error(rv("ARGUMENTS_BAD")))
    truncated = wire.encode_request("C_Sign", s, b"x" * 40, 256)[:-10]
    code = w.raw(truncated)
    assert w.receive() == (code, wire.encode_error(rv("ARGUMENTS_BAD")))
    assert w.error("C_InitToken", SLOT_ID, b"123456", wire.pad("x", 32)) == rv("FUNCTION_NOT_SUPPORTED")
    assert w.call("C_GetSessionInfo", s)[1] == 3  # still the same healthy session
    w.close()


def test_a_frame_beyond_the_caps_closes_only_that_connection(served: Server) -> None:
    good = Wire(served.path)
    s = good.start()
    bad = Wire(served.path)
    bad.sock.sendall(struct.pack(">III", 0x10, 0, wire.MAX_FRAME + 1))
    with pytest.raises((EOFError, ConnectionResetError)):
        bad.receive()
    zero = Wire(served.path)
    zero.sock.sendall(struct.pack(">III", 0, 0, 8) + bytes(8))  # sequence code 0 is a protocol error
    with pytest.raises((EOFError, ConnectionResetError)):
        zero.receive()
    assert good.call("C_GetSessionInfo", s)[0] == SLOT_ID
    good.close()


def test_pipelined_requests_on_one_session_keep_their_order(served: Server) -> None:
    w = Wire(served.path)
    s = w.start()
    key = w.key(s)
    codes = []
    for i in range(5):  # SignInit, Sign, SignInit, Sign ... written before any reply is read
        codes.append(w.send("C_SignInit", s, wire.Mechanism(SHA256_RSA), key))
        codes.append(w.send("C_Sign", s, b"message %d" % i, 256))
    replies = dict(w.receive() for _ in codes)
    assert sorted(replies) == sorted(codes)
    for init, sign in zip(codes[::2], codes[1::2]):
        assert wire.parse_reply("C_SignInit", replies[init]) == ()
        (signature,) = wire.parse_reply("C_Sign", replies[sign])
        assert isinstance(signature, bytes) and len(signature) == 256
    w.close()


def test_sessions_of_one_connection_run_in_parallel_and_replies_match_by_code(served: Server) -> None:
    w = Wire(served.path)
    first = w.start()
    (second,) = w.call("C_OpenSession", SLOT_ID, 6)
    key = w.key(first)
    sent = {}
    for s in (first, second):
        w.call("C_SignInit", s, wire.Mechanism(SHA256_RSA), key)
    for s in (first, second):
        sent[w.send("C_Sign", s, b"parallel %d" % s, 256)] = s
    replies = dict(w.receive() for _ in sent)
    assert set(replies) == set(sent)
    for data in replies.values():
        (signature,) = wire.parse_reply("C_Sign", data)
        assert len(signature) == 256  # type: ignore[arg-type]
    w.close()


def test_a_wrong_pin_is_refused_and_never_logged(served: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    w = Wire(served.path)
    w.start(login=False)
    (session,) = w.call("C_OpenSession", SLOT_ID, 6)
    assert w.error("C_Login", session, 1, b"guess-4711") == rv("PIN_INCORRECT")
    w.call("C_Login", session, 1, APP_PIN.encode())
    assert "guess-4711" not in caplog.text and APP_PIN not in caplog.text
    assert "wrong PIN" in caplog.text
    w.close()


def test_status_reports_members_and_connected_applications(served: Server) -> None:
    w = Wire(served.path)
    w.start()
    state = query_status(served.path)
    assert state["token_label"] == "signer-ha"
    assert [m["state"] for m in state["members"]] == ["logged_in", "logged_in"]
    mine = [app for app in state["applications"] if app["pid"] == os.getpid()]
    assert mine and mine[0]["logged_in"] and mine[0]["sessions"] == 1
    w.close()


def test_a_uid_not_allowed_is_refused_at_connect(tmp_path: Path, served: Server) -> None:
    other = Server(served.pool, served.slot.config, tmp_path / "other" / "s.sock", allow_uids=(os.getuid() + 12345,))
    other.start(warm=False)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5.0)
        sock.connect(str(other.path))
        try:
            sock.sendall(b"\0")
            answer = sock.recv(1)
        except (ConnectionResetError, BrokenPipeError):  # closed before or with our byte unread
            answer = b""
        assert answer == b""  # closed before the version byte is answered
        sock.close()
        assert wait_for_count(lambda: other.refused, 1)
    finally:
        other.stop()


def test_a_second_server_on_a_live_socket_is_refused(served: Server) -> None:
    twin = Server(served.pool, served.slot.config, served.path)
    with pytest.raises(ServeError, match="another server answers"):
        twin.start(warm=False)


def test_a_socket_folder_others_may_write_to_is_refused(tmp_path: Path, served: Server) -> None:
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o777)
    with pytest.raises(ServeError, match="others may write"):
        Server(served.pool, served.slot.config, folder / "s.sock").start(warm=False)


@settings(max_examples=60, deadline=None)
@given(junk=st.binary(min_size=0, max_size=300))
def test_random_bytes_after_the_handshake_never_take_the_server_down(served: Server, junk: bytes) -> None:
    w = Wire(served.path)
    try:
        w.sock.sendall(junk)
        w.sock.shutdown(socket.SHUT_WR)
        try:
            while w.sock.recv(65536):
                pass
        except OSError:
            pass
    finally:
        w.close()
    probe = Wire(served.path)
    probe.call("C_Initialize", wire.HANDSHAKE, 0, None)
    assert probe.call("C_GetSlotList", 1, 4) == ([SLOT_ID],)
    probe.close()


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=8, max_size=200))
def test_random_request_bodies_get_an_error_reply_or_an_answer(served: Server, data: bytes) -> None:
    w = Wire(served.path)
    w.call("C_Initialize", wire.HANDSHAKE, 0, None)
    call_id = data[0] % 70
    body = struct.pack(">I", call_id) + data[1:]
    code = w.raw(body)
    got, reply = w.receive()
    assert got == code
    assert len(reply) >= 8
    assert w.call("C_GetSlotList", 1, 4) == ([SLOT_ID],)  # the connection is still usable
    w.close()


def test_applications_logins_and_refusals_are_on_the_audit_record(tmp_path: Path, served: Server) -> None:
    from hsmfsm.audit.record import AuditLog, verify

    log_path = tmp_path / "audit.log"
    audit = AuditLog(log_path, pool="signer")
    recorded = Server(served.pool, served.slot.config, tmp_path / "rec" / "s.sock", note=audit.note).start()
    try:
        w = Wire(recorded.path)
        w.call("C_Initialize", wire.HANDSHAKE, 0, None)
        (session,) = w.call("C_OpenSession", SLOT_ID, 6)
        assert w.error("C_Login", session, 1, b"wrong-9911") == rv("PIN_INCORRECT")
        w.call("C_Login", session, 1, APP_PIN.encode())
        w.close()
        assert wait_for_departure(recorded)
    finally:
        recorded.stop()
        audit.close()
    import json

    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds[:1] == ["opened"]
    assert [k for k in kinds if k != "opened"] == ["application_connected", "login_refused", "login",
                                                   "application_disconnected"]
    connected = records[kinds.index("application_connected")]
    assert (connected["uid"], connected["peer_pid"]) == (os.getuid(), os.getpid())
    assert "wrong-9911" not in log_path.read_text() and APP_PIN not in log_path.read_text()
    assert verify([str(log_path)]).ok


def wait_for_count(count: Callable[[], int], expected: int, timeout: float = 5.0) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if count() == expected:
            return True
        time.sleep(0.01)
    return count() == expected


def wait_for_departure(server: Server, timeout: float = 5.0) -> bool:
    """Until the server has no application (it drops one from its status after recording it)."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not server.status()["applications"]:
            return True
        time.sleep(0.02)
    return False
