"""``hsmfsm serve`` with the stock p11-kit-client.so, real clients and real tokens.

Two SoftHSM replicas, each behind its own ``p11-kit server`` (the lab's network HSMs), each
reached through a relay that counts the requests on the wire; a pool over them; the server on
a unix socket in the test's folder. The applications are real and unmodified: pkcs11-tool,
p11tool (GnuTLS), openssl with libp11's engine, a python-pkcs11 application in its own
process, and a ctypes application driven call by call (hsmfsm.testing.lab.stepper). openssl
and cryptography, not our code, judge every signature.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from hsmfsm import SlotConnection
from hsmfsm.runtime.pool import Pool
from hsmfsm.runtime.server import Server, query_status
from hsmfsm.runtime.vslot import SlotConfig
from hsmfsm.testing.lab import NetworkHSM, Relay, SoftHSMToken
from hsmfsm.testing.lab.app import App
from hsmfsm.testing.lab.clients import (
    list_slots,
    openssl_engine_req_x509,
    openssl_engine_sign,
    openssl_verify,
    openssl_verify_certificate,
    p11tool_test_sign,
    pkcs11_list_objects,
    pkcs11_sign,
    token_labels,
)
from hsmfsm.testing.lab.stepper import Stepper

from conftest import wait_for

pytestmark = pytest.mark.timeout(180)

APP_PIN = "virtual-slot-pin"
LABEL = "signer-ha"
CKM_SHA256_RSA_PKCS = 0x40
CKO_PRIVATE_KEY = 3


class Lab:
    """Two network HSMs behind relays, a pool over the relays, and a server over the pool."""

    def __init__(self, token: SoftHSMToken, root: Path, client_module: str, pin_env: str, policy: Any,
                 keygen: str = "refuse", **server: Any) -> None:
        self.token, self.root, self.client_module = token, root, client_module
        self.hsms: dict[str, NetworkHSM] = {}
        self.relays: dict[str, Relay] = {}
        for name in ("hsm-a", "hsm-b"):
            hsm = NetworkHSM(token.replicate(root / name), root / f"{name}.sock").start()
            self.hsms[name] = hsm
            self.relays[name] = Relay(root / f"{name}-relay.sock", hsm.socket_path, trace=True).start()
        member_policy = Pool.member_policy(policy, "background", 0.3, None)
        conns = [(SlotConnection(module=client_module, token_label=token.label, pin=pin_env, policy=member_policy,
                                 name=name, env={"P11_KIT_SERVER_ADDRESS": self.relays[name].address},
                                 wait_for_recovery=False), False) for name in self.hsms]
        self.pool = Pool("signer", conns, policy, recovery_interval=0.3, recovery_max_attempts=None).open()
        self.server = Server(self.pool, SlotConfig(token_label=LABEL, pin=lambda: APP_PIN, keygen=keygen),
                             root / "run" / "s.sock",
                             **server).start()
        self.address = self.server.address
        self.env = {"P11_KIT_SERVER_ADDRESS": self.address}

    def calls(self, call: str) -> dict[str, int]:
        return {name: relay.calls_seen(call) for name, relay in self.relays.items()}

    def stepper(self) -> Stepper:
        return Stepper(self.client_module, self.env)

    def close(self) -> None:
        self.server.stop()
        self.pool.close()
        for relay in self.relays.values():
            relay.stop()
        for hsm in self.hsms.values():
            hsm.kill()


@pytest.fixture
def lab(token: SoftHSMToken, tmp_path: Path, client_module: str, pin_env: str, fast_policy: Any) -> Iterator[Lab]:
    lab = Lab(token, tmp_path, client_module, pin_env, fast_policy(call_timeout=1.0, deadline=3.0))
    try:
        yield lab
    finally:
        lab.close()


def ok(answer: dict[str, Any]) -> dict[str, Any]:
    assert answer.get("rv_name") == "CKR_OK", answer
    return answer


def open_and_login(s: Stepper) -> tuple[int, int]:
    ok(s.do("initialize"))
    slots = ok(s.do("slots"))["slots"]
    assert len(slots) == 1
    session = ok(s.do("open", slot=slots[0], rw=True))["session"]
    ok(s.do("login", session=session, pin=APP_PIN))
    return slots[0], session


def rsa_key(s: Stepper, session: int) -> int:
    handles = ok(s.do("find", session=session, template={"class": CKO_PRIVATE_KEY, "label": "rsa"}))["handles"]
    assert len(handles) == 1, handles
    return int(handles[0])


def verify_rsa(token: SoftHSMToken, data: bytes, signature_hex: str) -> None:
    public = serialization.load_der_public_key(token.public_key_der("rsa"))
    public.verify(bytes.fromhex(signature_hex), data, padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr]


# -- acceptance 1: real clients ------------------------------------------------------------------


def test_pkcs11_tool_sees_one_slot_and_signs_with_both_keys_and_openssl_verifies(lab: Lab, tmp_path: Path) -> None:
    listing = list_slots(lab.address).check()
    assert token_labels(listing.stdout) == [LABEL]
    assert listing.stdout.count("Slot ") == 1
    data = tmp_path / "data"
    data.write_bytes(b"signed through the virtual slot\n")
    digest = tmp_path / "data.sha256"
    digest.write_bytes(hashlib.sha256(data.read_bytes()).digest())
    for key, mechanism, source, fmt in (("rsa", "SHA256-RSA-PKCS", data, None), ("ec", "ECDSA", digest, "openssl")):
        signature = tmp_path / f"{key}.sig"
        pkcs11_sign(lab.address, LABEL, APP_PIN, key, mechanism, source, signature, signature_format=fmt).check()
        openssl_verify(lab.token.public_key_der(key), data, signature).check()
        flipped = tmp_path / f"{key}.bad"
        raw = bytearray(signature.read_bytes())
        raw[-1] ^= 1
        flipped.write_bytes(bytes(raw))
        assert not openssl_verify(lab.token.public_key_der(key), data, flipped).ok


def test_private_keys_are_listed_only_after_login(lab: Lab) -> None:
    before = pkcs11_list_objects(lab.address, LABEL).check().stdout
    after = pkcs11_list_objects(lab.address, LABEL, APP_PIN).check().stdout
    assert "Private Key Object" not in before and before.count("Public Key Object") == 2
    assert after.count("Private Key Object") == 2


def test_p11tool_test_sign_passes_for_both_keys(lab: Lab) -> None:
    for key in ("rsa", "ec"):
        run = p11tool_test_sign(lab.address, LABEL, APP_PIN, key).check()
        assert "Verifying against public key in the token... ok" in run.output


def test_the_openssl_engine_signs_and_makes_a_certificate(lab: Lab, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"engine data\n")
    for key in ("rsa", "ec"):
        signature = tmp_path / f"{key}.sig"
        openssl_engine_sign(lab.address, LABEL, APP_PIN, key, data, signature).check()
        openssl_verify(lab.token.public_key_der(key), data, signature).check()
        certificate = tmp_path / f"{key}.pem"
        openssl_engine_req_x509(lab.address, LABEL, APP_PIN, key, certificate).check()
        openssl_verify_certificate(certificate, lab.token.public_key_der(key)).check()


# -- acceptance 2: an application under faults ------------------------------------------------


def test_a_python_pkcs11_application_signs_through_a_kill_a_restart_and_a_hang(lab: Lab) -> None:
    a, b = lab.hsms["hsm-a"], lab.hsms["hsm-b"]
    with App(lab.address, LABEL, APP_PIN, "rsa", threads=4, seconds=20.0,
             public_der=lab.token.root / "rsa.pub.der") as app:
        app.start()
        app.wait_ready()
        time.sleep(3.0)
        a.kill()
        time.sleep(3.0)
        a.restart()
        assert wait_for(lambda: lab.pool.member("hsm-a").serving, 15.0)
        time.sleep(1.0)
        b.hang()
        time.sleep(3.0)
        b.resume()
        summary = app.wait(timeout=60.0)
    assert summary.ok > 100, summary
    assert (summary.failed, summary.bad_signatures, summary.finalize_calls) == (0, 0, 0), summary
    assert summary.errors == {}, summary


# -- acceptance 3: failover between SignInit and Sign -------------------------------------------


def test_sign_init_and_length_query_then_the_member_killed_then_sign_gives_a_good_signature(lab: Lab) -> None:
    with lab.stepper() as s:
        _, session = open_and_login(s)
        key = rsa_key(s, session)
        data = b"length query first"
        ok(s.do("sign_init", session=session, mechanism=CKM_SHA256_RSA_PKCS, key=key))
        before = lab.calls("C_Sign")
        answer = ok(s.do("sign", session=session, data=data.hex(), length=None))
        assert answer["length"] == 256
        served = [name for name, n in lab.calls("C_Sign").items() if n > before[name]]
        assert len(served) == 1, served
        lab.hsms[served[0]].kill()
        answer = ok(s.do("sign", session=session, data=data.hex(), length=256))
        verify_rsa(lab.token, data, answer["signature"])
        # And with the member lost between SignInit and the length query: the other one signs.
        ok(s.do("sign_init", session=session, mechanism=CKM_SHA256_RSA_PKCS, key=key))
        answer = ok(s.do("sign", session=session, data=data.hex(), length=None))
        answer = ok(s.do("sign", session=session, data=data.hex(), length=answer["length"]))
        verify_rsa(lab.token, data, answer["signature"])


# -- acceptance 4: every member down, then back ------------------------------------------------


def test_with_every_member_down_the_call_ends_in_time_and_the_same_process_signs_again(lab: Lab) -> None:
    deadline = lab.pool.policy.operations.deadline
    with lab.stepper() as s:
        _, session = open_and_login(s)
        key = rsa_key(s, session)
        for hsm in lab.hsms.values():
            hsm.kill()
        ok(s.do("sign_init", session=session, mechanism=CKM_SHA256_RSA_PKCS, key=key))
        started = time.monotonic()
        answer = s.do("sign", session=session, data=b"down".hex(), length=256, timeout=deadline + 10)
        elapsed = time.monotonic() - started
        assert answer["rv_name"] == "CKR_DEVICE_ERROR", answer
        assert elapsed <= deadline + 1.0, elapsed
        lab.hsms["hsm-b"].restart()

        def signs() -> bool:
            if s.do("sign_init", session=session, mechanism=CKM_SHA256_RSA_PKCS, key=key)["rv_name"] != "CKR_OK":
                return False
            return bool(s.do("sign", session=session, data=b"back".hex(), length=256,
                             timeout=deadline + 10)["rv_name"] == "CKR_OK")

        assert wait_for(signs, 30.0, step=0.2)
        answer = ok(s.do("sign_init", session=session, mechanism=CKM_SHA256_RSA_PKCS, key=key))
        answer = ok(s.do("sign", session=session, data=b"back".hex(), length=256))
        verify_rsa(lab.token, b"back", answer["signature"])
        calls = [c["fn"] for c in answer.get("calls", [])]
        assert "C_Finalize" not in calls and "C_Initialize" not in calls


# -- acceptance 5: the application's PIN never reaches a member ----------------------------------


def test_a_wrong_application_pin_costs_no_member_login(lab: Lab) -> None:
    logins = lab.calls("C_Login")
    with lab.stepper() as s:
        ok(s.do("initialize"))
        slot = ok(s.do("slots"))["slots"][0]
        session = ok(s.do("open", slot=slot, rw=True))["session"]
        found = ok(s.do("find", session=session, template={"class": CKO_PRIVATE_KEY}))["handles"]
        assert found == []
        for pin in (lab.token.pin, "0000", "not-the-pin"):  # the members' own PIN included
            assert s.do("login", session=session, pin=pin)["rv_name"] == "CKR_PIN_INCORRECT"
        assert ok(s.do("find", session=session, template={"class": CKO_PRIVATE_KEY}))["handles"] == []
    assert lab.calls("C_Login") == logins


# -- acceptance 6: a malformed frame on one connection, another signing --------------------------


def test_malformed_frames_on_one_connection_leave_another_signing(lab: Lab) -> None:
    import socket
    import struct

    with App(lab.address, LABEL, APP_PIN, "ec", threads=2, seconds=6.0,
             public_der=lab.token.root / "ec.pub.der") as app:
        app.start()
        app.wait_ready()
        for junk in (b"\x00" + struct.pack(">III", 0x10, 0, 0xFFFFFFF0),
                     b"\x00" + struct.pack(">III", 0x11, 0, 12) + struct.pack(">II", 43, 9) + b"uayfy",
                     b"\x07garbage that is not a frame at all" * 3, b""):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5.0)
            sock.connect(str(lab.server.path))
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            try:
                while sock.recv(4096):
                    pass
            except OSError:
                pass
            sock.close()
        summary = app.wait(timeout=60.0)
    assert summary.ok > 0 and summary.failed == 0 and summary.bad_signatures == 0, summary
    assert query_status(lab.server.path)["pool"] == "signer"


# -- key generation ------------------------------------------------------------------------------


def test_keygen_is_refused_by_default_and_goes_to_one_member_with_keygen_primary(
        token: SoftHSMToken, tmp_path: Path, client_module: str, pin_env: str, fast_policy: Any) -> None:
    from hsmfsm.testing.lab.clients import pkcs11_tool

    args = ["--token-label", LABEL, "--login", "--pin", APP_PIN, "--keypairgen", "--key-type", "rsa:2048",
            "--label", "zsk-new", "--id", "0a"]
    lab = Lab(token, tmp_path / "refuse", client_module, pin_env, fast_policy(call_timeout=1.0, deadline=3.0))
    try:
        run = pkcs11_tool(lab.address, *args)
        # pkcs11-tool reads the mechanism list first: key-pair generation is not on it.
        assert not run.ok and "mechanism not supported" in run.output, run.output
        assert sum(lab.calls("C_GenerateKeyPair").values()) == 0
    finally:
        lab.close()
    lab = Lab(token, tmp_path / "primary", client_module, pin_env, fast_policy(call_timeout=1.0, deadline=3.0),
              keygen="primary")
    try:
        pkcs11_tool(lab.address, *args).check()
        assert lab.calls("C_GenerateKeyPair") == {"hsm-a": 1, "hsm-b": 0}  # the first serving member, once
        public = tmp_path / "zsk-new.der"
        pkcs11_tool(lab.address, "--token-label", LABEL, "--read-object", "--type", "pubkey", "--id", "0a",
                    "--output-file", str(public)).check()
        data = tmp_path / "data"
        data.write_bytes(b"signed with a key made through the virtual slot\n")
        for i in range(4):  # the pool balances over both members; only hsm-a has the key
            signature = tmp_path / f"sig{i}"
            pkcs11_sign(lab.address, LABEL, APP_PIN, "zsk-new", "SHA256-RSA-PKCS", data, signature,
                        key_id="0a").check()
            openssl_verify(public.read_bytes(), data, signature).check()
        assert lab.pool.serving_members == ["hsm-a", "hsm-b"]  # hsm-b, lacking the key, still serves the rest
    finally:
        lab.close()


# -- the command ---------------------------------------------------------------------------------


def test_hsmfsm_serve_runs_from_a_pool_file_with_metrics_and_systemd_and_stops_on_sigterm(
        token: SoftHSMToken, tmp_path: Path, client_module: str, pin_env: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    hsm = NetworkHSM(token.replicate(tmp_path / "m"), tmp_path / "m.sock").start()
    try:
        monkeypatch.setenv("HSMFSM_TEST_APP_PIN", APP_PIN)
        socket_path = tmp_path / "srv" / "signer.sock"
        pool_file = tmp_path / "pool.yaml"
        pool_file.write_text(f"""
pool: served
policy: network-hsm
members:
  - name: hsm-m
    module: {client_module}
    env: {{P11_KIT_SERVER_ADDRESS: "{hsm.address}"}}
    token_label: {token.label}
    pin: {pin_env}
serve:
  socket: {socket_path}
  token_label: {LABEL}
  pin: env:HSMFSM_TEST_APP_PIN
""")
        import socket as sockets
        import urllib.request

        with sockets.socket() as probe:  # a free loopback port for the metrics
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        notify = sockets.socket(sockets.AF_UNIX, sockets.SOCK_DGRAM)
        notify.bind(str(tmp_path / "notify.sock"))
        notify.settimeout(30.0)
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
        proc = subprocess.Popen([sys.executable, "-m", "hsmfsm", "serve", str(pool_file), "--metrics",
                                 f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env=env)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            assert line == f"P11_KIT_SERVER_ADDRESS=unix:path={socket_path}", (line, proc.stderr.read()
                                                                               if proc.poll() is not None else "")
            assert token_labels(list_slots(line.split("=", 1)[1]).check().stdout) == [LABEL]
            messages = []
            while not any("READY=1" in m for m in messages):
                messages.append(notify.recv(4096).decode())
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
                exposition = reply.read().decode()
            assert 'hsmfsm_member_up{member="hsm-m",pool="served"} 1.0' in exposition
            assert APP_PIN not in exposition and token.pin not in exposition
            status = subprocess.run([sys.executable, "-m", "hsmfsm", "status", "--server", str(socket_path)],
                                    capture_output=True, text=True, timeout=30)
            assert status.returncode == 0, status.stderr
            assert "hsm-m" in status.stdout and "logged_in" in status.stdout
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            assert not socket_path.exists()
        finally:
            notify.close()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    finally:
        hsm.kill()
