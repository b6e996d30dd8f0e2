"""Return codes SoftHSM never produces, injected over the real p11-kit wire by the tests' relay.

Each one must drive the transition its class declares in the policy, and an
idempotent sign must still succeed (re-issued after recovery) and verify.
"""

from __future__ import annotations

import dataclasses

import pytest
from hsmfsm import OperationFailed, SlotConnection
from hsmfsm.testing.lab import Relay

from conftest import Recorder, sign_ec, verify


@pytest.fixture
def relayed(network_hsm):
    network_hsm.start()
    relay = Relay(listen_path=network_hsm.socket_path.with_name("relay.sock"),
                  upstream_path=network_hsm.socket_path).start()
    try:
        yield network_hsm, relay
    finally:
        relay.stop()


def open_conn(client_module, network_hsm, relay, pin, policy) -> tuple[SlotConnection, Recorder]:
    rec = Recorder()
    conn = SlotConnection(module=client_module, token_label=network_hsm.token.label, pin=pin, policy=policy,
                          name="hsm-a", env={"P11_KIT_SERVER_ADDRESS": relay.address}, probe=False)
    conn.add_listener(rec)
    conn.open()
    assert conn.state == "logged_in"
    return conn, rec


# Under the shipped default policy (policies/default.yaml).
CASES = [
    ("CKR_DEVICE_REMOVED", 0x32, "connection_lost", "disconnected"),
    ("CKR_TOKEN_NOT_PRESENT", 0xE0, "connection_lost", "disconnected"),
    ("CKR_SESSION_HANDLE_INVALID", 0xB3, "session_lost", "connecting"),
    ("CKR_USER_NOT_LOGGED_IN", 0x101, "login_lost", "open"),
    ("CKR_GENERAL_ERROR", 0x5, "connection_lost", "disconnected"),
    ("CKR_VENDOR_DEFINED+0x1", 0x80000001, "connection_lost", "disconnected"),
]


@pytest.mark.parametrize("name,rv,event,dest", CASES, ids=[c[0] for c in CASES])
def test_injected_code_drives_the_declared_transition(client_module, relayed, pin_env, fast_policy,
                                                      name, rv, event, dest):
    hsm, relay = relayed
    policy = dataclasses.replace(fast_policy(), default_class="unknown")
    assert policy.classes[policy.codes.get(name, policy.default_class)].event.value == event
    conn, rec = open_conn(client_module, hsm, relay, pin_env, policy)
    try:
        sign_ec(conn, b"before")
        relay.fail("C_Sign", rv, count=1)
        data = f"through {name}".encode()
        verify(hsm.token, "ec", data, sign_ec(conn, data))  # re-issued after recovery
        hit = [r for r in rec.records if r.event == event]
        assert hit, rec.events()
        assert (hit[0].source, hit[0].dest) == ("logged_in", dest)
        assert hit[0].code_name == name and hit[0].code_value == rv
        assert conn.state == "logged_in"
        assert relay.calls_failed("C_Sign") == 1
    finally:
        conn.close()


def test_the_policy_not_the_code_decides(client_module, relayed, pin_env, fast_policy):
    """The same vendor code, classified as `login` by a policy: now it means log in again."""
    hsm, relay = relayed
    base = fast_policy()
    policy = dataclasses.replace(base, codes={**base.codes, "CKR_VENDOR_DEFINED+0x1": "login"})
    conn, rec = open_conn(client_module, hsm, relay, pin_env, policy)
    try:
        relay.fail("C_Sign", 0x80000001, count=1)
        sign_ec(conn, b"x")
        assert ("logged_in", "login_lost", "open") in rec.events()
        assert ("logged_in", "connection_lost", "disconnected") not in rec.events()
        assert conn.login_attempts == 2
    finally:
        conn.close()


def test_caller_errors_are_not_reissued_and_change_nothing(client_module, relayed, pin_env, fast_policy):
    hsm, relay = relayed
    conn, rec = open_conn(client_module, hsm, relay, pin_env, fast_policy())
    try:
        sign_ec(conn, b"warm")
        before = (conn.state, conn.generation, len(rec.records), relay.calls_seen("C_SignInit"))
        relay.fail("C_Sign", 0x20, count=None)  # CKR_DATA_INVALID: the caller's problem
        with pytest.raises(OperationFailed) as info:
            sign_ec(conn, b"bad")
        assert "CKR_DATA_INVALID" in str(info.value) and "hsm-a" in str(info.value)
        assert relay.calls_seen("C_SignInit") == before[3] + 1  # exactly one attempt
        assert (conn.state, conn.generation, len(rec.records)) == before[:3]
    finally:
        relay.clear()
        conn.close()


def test_locked_pin_on_login_is_fatal_after_one_attempt(client_module, relayed, pin_env, fast_policy):
    from hsmfsm import LoginRejected

    hsm, relay = relayed
    relay.fail("C_Login", 0xA4, forward=False)  # CKR_PIN_LOCKED; the token never sees the PIN
    conn = SlotConnection(module=client_module, token_label=hsm.token.label, pin=pin_env,
                          policy=fast_policy(), name="hsm-a", env={"P11_KIT_SERVER_ADDRESS": relay.address})
    try:
        with pytest.raises(LoginRejected) as info:
            conn.open()
        assert "CKR_PIN_LOCKED" in str(info.value)
        assert conn.state == "failed" and relay.calls_seen("C_Login") == 1
    finally:
        conn.close()


def test_slow_calls_enter_degraded_and_healthy_calls_leave_it(client_module, relayed, pin_env, fast_policy):
    hsm, relay = relayed
    base = fast_policy()
    policy = dataclasses.replace(base, degraded=dataclasses.replace(
        base.degraded, slow_call=0.05, enter_after=3, leave_after=3))
    conn, rec = open_conn(client_module, hsm, relay, pin_env, policy)
    try:
        sign_ec(conn, b"warm")
        relay.latency = 0.03  # per reply; a sign is three round trips
        for i in range(3):
            verify(hsm.token, "ec", b"slow%d" % i, sign_ec(conn, b"slow%d" % i))
        assert conn.state == "degraded"  # still serving, but impaired
        relay.latency = 0.0
        for i in range(2):
            sign_ec(conn, b"fast%d" % i)
        assert conn.state == "degraded"
        sign_ec(conn, b"fast-last")
        assert conn.state == "logged_in"
        assert [e for e in rec.events() if e[1] in ("impaired", "healthy")] == [
            ("logged_in", "impaired", "degraded"), ("degraded", "healthy", "logged_in")]
    finally:
        conn.close()


def test_key_generation_is_never_reissued_after_it_may_have_reached_the_hsm(client_module, relayed, pin_env,
                                                                            fast_policy):
    import pkcs11
    from hsmfsm import OutcomeUnknown

    hsm, relay = relayed
    conn, rec = open_conn(client_module, hsm, relay, pin_env, fast_policy())
    try:
        sign_ec(conn, b"warm")
        relay.fail("C_GenerateKeyPair", 0x30, count=1)  # forwarded: the token really made the key
        with pytest.raises(OutcomeUnknown) as info:
            conn.generate_keypair(pkcs11.KeyType.RSA, 1024, label="maybe-made")
        assert "outcome is unknown" in str(info.value) and "hsm-a" in str(info.value)
        assert relay.calls_seen("C_GenerateKeyPair") == 1
        assert ("logged_in", "connection_lost", "disconnected") in rec.events()
        sign_ec(conn, b"after")  # the connection itself recovers; only the key generation is not repeated
        assert relay.calls_seen("C_GenerateKeyPair") == 1
    finally:
        conn.close()
