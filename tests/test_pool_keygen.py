"""Key generation through an HA pool while members fail: never re-issued once it may have reached an HSM.

Two members, each a SoftHSM replica behind its own p11-kit server, each
reached through its own reply-rewriting relay, so that every
C_GenerateKeyPair that reaches either HSM is counted on the wire. The pool
prefers hsm-a (``balance: primary``), so the first attempt always goes there.
"""

from __future__ import annotations

import threading
import time

import pkcs11
import pytest
from hsmfsm import SlotConnection
from hsmfsm.core.errors import OutcomeUnknown
from hsmfsm.runtime.pool import Pool
from hsmfsm.testing.lab import NetworkHSM, Relay

from conftest import sign_ec, verify, wait_for

pytestmark = pytest.mark.timeout(120)
KEYGEN = "C_GenerateKeyPair"


@pytest.fixture
def members(token, tmp_path):
    """[(name, hsm, relay)] for hsm-a and hsm-b."""
    out = []
    try:
        for name in ("hsm-a", "hsm-b"):
            hsm = NetworkHSM(token.replicate(tmp_path / name), tmp_path / f"{name}.sock").start()
            out.append((name, hsm, None))
            relay = Relay(tmp_path / f"{name}-relay.sock", hsm.socket_path).start()
            out[-1] = (name, hsm, relay)
        yield out
    finally:
        for _, hsm, relay in out:
            if relay is not None:
                relay.stop()
            hsm.kill()


def make_pool(client_module, pin, policy, members, *, probe=True) -> Pool:
    member_policy = Pool.member_policy(policy, "background", 0.3, 6)
    conns = [(SlotConnection(module=client_module, token_label=hsm.token.label, pin=pin, policy=member_policy,
                             name=name, env={"P11_KIT_SERVER_ADDRESS": relay.address}, probe=probe,
                             wait_for_recovery=False), False)
             for name, hsm, relay in members]
    return Pool("signer", conns, policy, balance="primary", recovery_interval=0.3)


def seen(members) -> dict[str, int]:
    return {name: relay.calls_seen(KEYGEN) for name, _, relay in members}


def keygen(pool: Pool, label: str):
    return pool.generate_keypair(pkcs11.KeyType.RSA, 1024, label)


@pytest.mark.parametrize("name,rv", [("CKR_DEVICE_ERROR", 0x30), ("CKR_TOKEN_NOT_PRESENT", 0xE0)])
def test_reply_lost_after_forwarding_is_outcome_unknown_and_never_reissued(client_module, members, pin_env,
                                                                           fast_policy, name, rv):
    (_, a, relay_a), _ = members
    with make_pool(client_module, pin_env, fast_policy(), members) as pool:
        pub, _ = keygen(pool, "warm")  # the path works, and goes to hsm-a first
        assert pub.label == "warm" and seen(members) == {"hsm-a": 1, "hsm-b": 0}
        relay_a.fail(KEYGEN, rv, count=1, forward=True)  # hsm-a made the key; the caller hears rv
        with pytest.raises(OutcomeUnknown) as info:
            keygen(pool, "maybe-made")
        message = str(info.value)
        assert info.value.member == "hsm-a" and message.startswith("hsm-a: "), message
        assert "outcome is unknown" in message and name in message, message
        assert relay_a.calls_failed(KEYGEN) == 1
        assert seen(members) == {"hsm-a": 2, "hsm-b": 0}  # once, to hsm-a only: never sent elsewhere
        # The pool itself goes on serving; only the key generation was not repeated.
        verify(a.token, "ec", b"after", sign_ec(pool, b"after"))
        time.sleep(0.5)
        assert seen(members) == {"hsm-a": 2, "hsm-b": 0}


def test_member_hung_during_keygen_is_outcome_unknown_and_never_reissued(client_module, members, pin_env,
                                                                         fast_policy):
    (_, a, relay_a), _ = members
    # No probes: hsm-a must still look healthy when the key generation is sent to it.
    with make_pool(client_module, pin_env, fast_policy(call_timeout=1.0), members, probe=False) as pool:
        keygen(pool, "warm")
        a.hang()  # SIGSTOP: the request reaches the server's socket and waits there
        try:
            t0 = time.monotonic()
            with pytest.raises(OutcomeUnknown) as info:
                keygen(pool, "maybe-made")
            elapsed = time.monotonic() - t0
            message = str(info.value)
            assert info.value.member == "hsm-a" and message.startswith("hsm-a: "), message
            assert "outcome is unknown" in message and "call timeout" in message, message
            assert elapsed < 1.0 + 2.0  # one call timeout, not the deadline
            assert seen(members) == {"hsm-a": 2, "hsm-b": 0}
            assert pool.member("hsm-a").state != "logged_in"
        finally:
            a.resume()
        # Other work fails over as usual; the key generation stays un-repeated.
        sign_ec(pool, b"after")
        assert seen(members)["hsm-b"] == 0


@pytest.mark.parametrize("fault", ["link_reset", "hsm_killed"])
def test_member_lost_while_keygen_in_flight_is_outcome_unknown(client_module, members, pin_env, fast_policy,
                                                               fault):
    (_, a, relay_a), _ = members
    with make_pool(client_module, pin_env, fast_policy(), members) as pool:
        keygen(pool, "warm")
        if fault == "link_reset":
            relay_a.latency = 2.0  # the HSM's answer is held in the relay: the call is surely in flight
            bits = 1024
        else:
            bits = 4096  # seconds of work for SoftHSM: still running when the HSM dies
        outcome: list[object] = []

        def call() -> None:
            try:
                outcome.append(pool.generate_keypair(pkcs11.KeyType.RSA, bits, "maybe-made"))
            except Exception as exc:
                outcome.append(exc)

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        assert wait_for(lambda: relay_a.calls_seen(KEYGEN) == 2, 10.0)
        if fault == "link_reset":
            assert relay_a.reset_connections() >= 1
        else:
            a.kill()
        caller.join(30)
        assert not caller.is_alive()
        error = outcome[0]
        assert isinstance(error, OutcomeUnknown), error
        assert error.member == "hsm-a" and "outcome is unknown" in str(error), error
        assert seen(members) == {"hsm-a": 2, "hsm-b": 0}
        relay_a.latency = 0.0
        sign_ec(pool, b"after")  # fails over or recovers; the key generation is not repeated
        assert seen(members)["hsm-b"] == 0


def test_keygen_goes_elsewhere_when_it_never_reached_the_first_member(client_module, members, pin_env,
                                                                      fast_policy):
    """hsm-a is chosen, but opening the session for the call (its one open session is leased) fails
    before anything of the key generation is sent (the relay answers C_OpenSession itself): the call
    may go to hsm-b."""
    (_, a, relay_a), (_, b, relay_b) = members
    with make_pool(client_module, pin_env, fast_policy(), members) as pool:
        member = pool.member("hsm-a")
        assert wait_for(lambda: member.inflight == 0 and member.serving, 5.0)
        held = member._g.idle.pop()  # as a caller would hold it: the keygen needs a session of its own
        opened = relay_a.calls_seen("C_OpenSession")
        relay_a.fail("C_OpenSession", 0x30, count=1, forward=False)  # CKR_DEVICE_ERROR, from the relay
        pub, _ = keygen(pool, "made-on-b")
        held.g.idle.append(held)
        assert pub.label == "made-on-b"
        assert relay_a.calls_failed("C_OpenSession") == 1  # (hsm-a then reconnects: more opens after it)
        assert relay_a.calls_seen("C_OpenSession") > opened
        assert seen(members) == {"hsm-a": 0, "hsm-b": 1}


def test_keygen_goes_elsewhere_when_the_first_member_is_down(client_module, members, pin_env, fast_policy):
    """hsm-a's HSM is gone (connection refused on every reconnect): the key is made on hsm-b."""
    (_, a, relay_a), _ = members
    with make_pool(client_module, pin_env, fast_policy(), members) as pool:
        keygen(pool, "warm")
        a.kill()
        assert wait_for(lambda: not pool.member("hsm-a").serving, 5.0)
        pub, _ = keygen(pool, "made-on-b")
        assert pub.label == "made-on-b"
        assert seen(members) == {"hsm-a": 1, "hsm-b": 1}
