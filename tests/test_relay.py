"""The reply-rewriting relay, on real tokens behind a real `p11-kit server`.

Each test gets its own server and relay; the client module is loaded through
a fresh symlink per test because `pkcs11.lib` caches per path (docs/FACTS.md), and
P11_KIT_SERVER_ADDRESS is read when the module is loaded.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils
from hsmfsm.testing.lab import NetworkHSM, SoftHSMToken
from hsmfsm.testing.lab.hsm import load_raw_client
from hsmfsm.testing.lab.relay import CALL_IDS, Relay, RelayError
from pkcs11 import Mechanism, ObjectClass
from pkcs11.exceptions import (
    DeviceError,
    DeviceRemoved,
    PinIncorrect,
    PKCS11Error,
    TokenNotPresent,
    UserAlreadyLoggedIn,
)

CKR_DEVICE_REMOVED = 0x32
CKR_PIN_INCORRECT = 0xA0
CKR_TOKEN_NOT_PRESENT = 0xE0
CKR_VENDOR_DEFINED_1 = 0x80000001

#: Request signatures from p11-kit's rpc-message.h for the calls python-pkcs11
#: makes; a mismatch on the wire means CALL_IDS is wrong for this p11-kit.
REQUEST_SIGNATURES = {
    "C_Initialize": "ayyay", "C_GetInfo": "", "C_GetSlotList": "yfu", "C_GetSlotInfo": "u",
    "C_GetTokenInfo": "u", "C_GetMechanismList": "ufu", "C_OpenSession": "uu",
    "C_CloseSession": "u", "C_GetSessionInfo": "u", "C_Login": "uuay", "C_Logout": "u",
    "C_GetAttributeValue": "uufA", "C_FindObjectsInit": "uaA", "C_FindObjects": "ufu",
    "C_FindObjectsFinal": "u", "C_SignInit": "uMu", "C_Sign": "uayfy",
    "C_GenerateRandom": "ufy", "C_Finalize": "",
}
DIGEST = hashlib.sha256(b"hsmfsm relay test").digest()


# -- fixtures ---------------------------------------------------------------

@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> SoftHSMToken:
    """One provisioned token per module: RSA key generation is the slow part of the lab."""
    return SoftHSMToken(tmp_path_factory.mktemp("relay-token")).provision()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for sockets: pytest's tmp_path can pass the 108-byte sun_path limit."""
    path = Path(tempfile.mkdtemp(prefix="relay-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def hsm(token: SoftHSMToken, sockdir: Path) -> Iterator[NetworkHSM]:
    server = NetworkHSM(token, sockdir / "hsm.sock").start()
    yield server
    server.kill()


@pytest.fixture
def relay(hsm: NetworkHSM, sockdir: Path) -> Iterator[Relay]:
    relay = Relay(sockdir / "relay.sock", hsm.socket_path, trace=True).start()
    yield relay
    relay.stop()


@pytest.fixture
def load_client(relay: Relay, sockdir: Path) -> Iterator[Callable[[], pkcs11.lib]]:
    """Load a fresh p11-kit-client instance (its own connection) pointed at the relay."""
    loaded: list = []

    def load() -> pkcs11.lib:
        lib = load_raw_client(relay.address, "relay-test")
        loaded.append(lib)
        return lib

    yield load
    for lib in loaded:
        try:
            lib.finalize()
        except PKCS11Error:
            pass  # the test broke this connection on purpose


@pytest.fixture
def lib(load_client: Callable[[], pkcs11.lib]) -> pkcs11.lib:
    return load_client()


def login(lib: pkcs11.lib, token: SoftHSMToken) -> pkcs11.Session:
    return lib.get_token(token_label=token.label).open(user_pin=token.pin)


def private_key(session: pkcs11.Session, label: str) -> pkcs11.PrivateKey:
    return session.get_key(label=label, object_class=ObjectClass.PRIVATE_KEY)


def sign_ec(session: pkcs11.Session) -> bytes:
    return private_key(session, "ec").sign(DIGEST, mechanism=Mechanism.ECDSA)


def verify_ec(token: SoftHSMToken, signature: bytes) -> None:
    public = serialization.load_der_public_key(token.public_key_der("ec"))
    half = len(signature) // 2
    der = utils.encode_dss_signature(int.from_bytes(signature[:half], "big"),
                                     int.from_bytes(signature[half:], "big"))
    public.verify(der, DIGEST, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


# -- transparency -----------------------------------------------------------

def test_transparent_relay_signs_with_ec_and_rsa(lib: pkcs11.lib, token: SoftHSMToken,
                                                  relay: Relay) -> None:
    with login(lib, token) as session:
        verify_ec(token, sign_ec(session))
        message = b"hsmfsm relay rsa"
        signature = private_key(session, "rsa").sign(message, mechanism=Mechanism.SHA256_RSA_PKCS)
    public = serialization.load_der_public_key(token.public_key_der("rsa"))
    public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    assert relay.calls_seen("C_SignInit") == 2
    assert relay.calls_seen("C_Sign") == 4  # a length query and the real call, per sign


def test_call_ids_match_the_signatures_on_the_wire(lib: pkcs11.lib, token: SoftHSMToken,
                                                    relay: Relay) -> None:
    with login(lib, token) as session:
        sign_ec(session)
        session.generate_random(16)
    assert relay.trace is not None
    requests = [e for e in relay.trace if e.direction == "request"]
    seen = {e.call for e in requests}
    assert {"C_Initialize", "C_OpenSession", "C_Login", "C_FindObjectsInit", "C_SignInit",
            "C_Sign", "C_GenerateRandom", "C_Logout", "C_CloseSession"} <= seen
    for entry in requests:
        assert entry.call in REQUEST_SIGNATURES, entry
        assert entry.signature == REQUEST_SIGNATURES[entry.call], entry
    assert CALL_IDS["C_Login"] == 18 and CALL_IDS["C_Sign"] == 43


# -- rewriting --------------------------------------------------------------

def test_failed_sign_leaves_the_session_usable(lib: pkcs11.lib, token: SoftHSMToken,
                                               relay: Relay) -> None:
    with login(lib, token) as session:
        relay.fail("C_Sign", CKR_TOKEN_NOT_PRESENT)
        with pytest.raises(TokenNotPresent):
            sign_ec(session)
        with pytest.raises(TokenNotPresent):
            sign_ec(session)
        relay.clear()
        verify_ec(token, sign_ec(session))  # no operation was left active on the token
    assert relay.calls_failed("C_Sign") == 2


def test_count_limits_how_many_replies_are_rewritten(lib: pkcs11.lib, token: SoftHSMToken,
                                                     relay: Relay) -> None:
    with login(lib, token) as session:
        relay.fail("C_Sign", CKR_TOKEN_NOT_PRESENT, count=1)
        with pytest.raises(TokenNotPresent):
            sign_ec(session)
        verify_ec(token, sign_ec(session))
    assert relay.calls_failed("C_Sign") == 1


def test_vendor_code_arrives_unmapped(lib: pkcs11.lib, token: SoftHSMToken, relay: Relay) -> None:
    with login(lib, token) as session:
        relay.fail("C_Sign", CKR_VENDOR_DEFINED_1, count=1)
        with pytest.raises(PKCS11Error) as caught:
            sign_ec(session)
    assert type(caught.value) is PKCS11Error
    assert caught.value.args == ("Unmapped error code 0x80000001",)


def test_calls_seen_counts_logins_on_the_wire(lib: pkcs11.lib, token: SoftHSMToken,
                                              relay: Relay) -> None:
    assert relay.calls_seen("C_Login") == 0
    login(lib, token).close()
    login(lib, token).close()
    assert relay.calls_seen("C_Login") == 2


def test_pin_incorrect_before_the_token(lib: pkcs11.lib, token: SoftHSMToken, relay: Relay) -> None:
    relay.fail("C_Login", CKR_PIN_INCORRECT, forward=False)
    with pytest.raises(PinIncorrect):
        login(lib, token)
    relay.clear()
    login(lib, token).close()  # the refused login never reached the token
    assert relay.calls_seen("C_Login") == 2


def test_pin_incorrect_after_the_token_leaves_it_logged_in(lib: pkcs11.lib, token: SoftHSMToken,
                                                           relay: Relay) -> None:
    """forward=True is a lie told after the fact: the token did log in."""
    relay.fail("C_Login", CKR_PIN_INCORRECT, count=1)
    with pytest.raises(PinIncorrect):
        login(lib, token)
    with pytest.raises(UserAlreadyLoggedIn):
        login(lib, token)


def test_wildcard_fails_calls_but_spares_initialize(lib: pkcs11.lib, token: SoftHSMToken,
                                                    relay: Relay) -> None:
    session = login(lib, token)
    relay.fail("*", CKR_DEVICE_REMOVED)
    with pytest.raises(DeviceRemoved):
        session.generate_random(16)
    lib.reinitialize()  # C_Finalize and C_Initialize pass through
    relay.clear()
    with login(lib, token) as session:
        assert len(session.generate_random(16)) == 2


def test_unknown_call_name_is_refused(relay: Relay) -> None:
    with pytest.raises(RelayError, match="C_Sing"):
        relay.fail("C_Sing", CKR_TOKEN_NOT_PRESENT)


# -- the wire breaking ------------------------------------------------------

def test_reset_connections_is_a_device_error(lib: pkcs11.lib, token: SoftHSMToken,
                                             relay: Relay) -> None:
    session = login(lib, token)
    assert relay.reset_connections() == 1
    with pytest.raises(DeviceError):
        session.generate_random(16)
    lib.reinitialize()  # the listener stays up: reconnecting works
    with login(lib, token) as session:
        verify_ec(token, sign_ec(session))


def test_upstream_death_breaks_the_client_side(lib: pkcs11.lib, token: SoftHSMToken,
                                               relay: Relay, hsm: NetworkHSM) -> None:
    session = login(lib, token)
    hsm.kill()
    with pytest.raises(DeviceError):
        session.generate_random(16)
    _wait_for(lambda: relay.connections == 0)


def test_client_gone_mid_frame_does_not_disturb_others(lib: pkcs11.lib, token: SoftHSMToken,
                                                       relay: Relay) -> None:
    with login(lib, token) as session:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.connect(str(relay.listen_path))
            raw.sendall(b"\0")  # handshake
            assert raw.recv(1) == b"\0"
            raw.sendall(b"\0\0\0\x07\0\0")  # half a frame header
        _wait_for(lambda: relay.connections == 1)
        verify_ec(token, sign_ec(session))


def test_latency_delays_each_reply(lib: pkcs11.lib, token: SoftHSMToken, relay: Relay) -> None:
    with login(lib, token) as session:
        relay.latency = 0.2
        started = time.monotonic()
        session.generate_random(16)
        assert time.monotonic() - started >= 0.2
        relay.latency = 0


def test_stop_is_prompt_even_with_a_call_in_flight(lib: pkcs11.lib, token: SoftHSMToken,
                                                   relay: Relay) -> None:
    session = login(lib, token)
    relay.latency = 30
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            session.generate_random(16)
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.1)
    started = time.monotonic()
    relay.stop()
    assert time.monotonic() - started < 1.0
    caller.join(5)
    assert not caller.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], DeviceError)
    assert not relay.listen_path.exists()


def test_many_concurrent_connections(load_client: Callable[[], pkcs11.lib], token: SoftHSMToken,
                                     relay: Relay) -> None:
    libs = [load_client() for _ in range(6)]
    sessions = [login(lib, token) for lib in libs]
    assert relay.connections == 6
    errors: list[BaseException] = []

    def work(session: pkcs11.Session) -> None:
        try:
            for _ in range(20):
                verify_ec(token, sign_ec(session))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert relay.calls_seen("C_Sign") == 6 * 20 * 2
    for session in sessions:
        session.close()


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
