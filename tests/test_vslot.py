"""The virtual slot's PKCS#11 semantics over a pool of ScriptedHSMs, on virtual time: no sockets.

What an application sees through ``hsmfsm serve`` is decided here (hsmfsm.runtime.vslot); the
wire and the real clients are tests/test_serve.py's. Every call goes in as the decoded arguments
p11-kit's RPC carries (hsmfsm.rpc.wire) and comes out as reply values or a CK_RV.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils
from hsmfsm.core import attributes as a
from hsmfsm.core.codes import CKR
from hsmfsm.core.mechanisms import ckm_value
from hsmfsm.rpc import wire
from hsmfsm.runtime.vslot import SLOT_ID, Application, Refused, SlotConfig, VirtualSlot
from hsmfsm.testing import ScriptedHSM, VirtualClock

from scripted_helpers import Caller, guarded_clock, policy, pool, replicas

pytestmark = pytest.mark.timeout(30)

APP_PIN = "app-pin-7"
SHA256_RSA = ckm_value("SHA256_RSA_PKCS")
ECDSA = ckm_value("ECDSA")


def rv(name: str) -> int:
    return CKR[f"CKR_{name}"]


@pytest.fixture
def clock() -> Iterator[VirtualClock]:
    yield from guarded_clock(limit=20.0)


class Client:
    """One application connection to the slot, calling it from a thread of the virtual clock."""

    def __init__(self, clock: VirtualClock, slot: VirtualSlot, uid: int = 1000, pid: int = 4242) -> None:
        self.clock, self.slot = clock, slot
        self.app: Application = slot.application(uid, pid)
        if not slot._catalog.loaded:  # what the server does at start, once the pool has opened
            assert Caller(clock, slot.warm, "warm").join(60.0)

    def __call__(self, name: str, *args: object, budget: float = 60.0) -> tuple[object, ...]:
        caller = Caller(self.clock, lambda: self.slot.call(self.app, name, args), name)
        assert caller.join(budget), f"{name} did not return within {budget} virtual seconds"
        if caller.error is not None:
            raise caller.error
        return caller.result  # type: ignore[no-any-return]

    def refused(self, name: str, *args: object) -> int:
        with pytest.raises(Refused) as info:
            self(name, *args)
        return info.value.rv

    def start(self) -> int:
        self("C_Initialize", wire.HANDSHAKE, 0, None)
        (session,) = self("C_OpenSession", SLOT_ID, 0x6)
        assert isinstance(session, int)
        return session

    def login(self, session: int, pin: str = APP_PIN) -> None:
        self("C_Login", session, 1, pin.encode())

    def find(self, session: int, *template: wire.Attribute) -> list[int]:
        self("C_FindObjectsInit", session, list(template))
        (found,) = self("C_FindObjects", session, 100)
        self("C_FindObjectsFinal", session)
        assert isinstance(found, list)
        return found

    def key(self, session: int, label: str, klass: int = a.CKO_PRIVATE_KEY) -> int:
        found = self.find(session, wire.Attribute(a.CKA_CLASS, klass), wire.Attribute(a.CKA_LABEL, label.encode()))
        assert len(found) == 1, found
        return found[0]

    def sign(self, session: int, key: int, data: bytes, mechanism: int = SHA256_RSA) -> bytes:
        self("C_SignInit", session, wire.Mechanism(mechanism), key)
        (size,) = self("C_Sign", session, data, None)
        assert isinstance(size, wire.Length)
        (signature,) = self("C_Sign", session, data, size.n)
        assert isinstance(signature, bytes) and len(signature) == size.n
        return signature


def make_slot(clock: VirtualClock, hsms: dict[str, ScriptedHSM], **config: object) -> tuple[VirtualSlot, object]:
    p = pool(clock, hsms, policy(deadline=3.0, call_timeout=1.0), max_attempts=None)
    notes: list[tuple[str, dict[str, object]]] = []
    slot = VirtualSlot(p, SlotConfig(token_label="signer-ha", pin=lambda: APP_PIN, **config),  # type: ignore[arg-type]
                       note=lambda kind, **fields: notes.append((kind, fields)), clock=clock)
    slot.notes = notes  # type: ignore[attr-defined]
    return slot, p


@contextmanager
def logged_in(clock: VirtualClock, *names: str, **config: object
              ) -> Iterator[tuple[dict[str, ScriptedHSM], VirtualSlot, Client, int]]:
    """Replicas named ``names``, a slot over their pool (opened), and one application logged in on
    one session: (hsms, slot, client, session)."""
    hsms = replicas(clock, *names)
    slot, p = make_slot(clock, hsms, **config)
    with p:  # type: ignore[attr-defined]
        c = Client(clock, slot)
        s = c.start()
        c.login(s)
        yield hsms, slot, c, s


def verify_rsa(hsm: ScriptedHSM, data: bytes, signature: bytes) -> None:
    hsm.public_key("rsa").verify(signature, data, padding.PKCS1v15(), hashes.SHA256())


# -- slot, token, sessions -------------------------------------------------------------------


def test_the_slot_is_answered_from_the_servers_own_state_even_with_every_member_down(clock) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    for h in hsms.values():
        h.down()
    slot, p = make_slot(clock, hsms)
    with p:  # type: ignore[attr-defined]
        c = Client(clock, slot)
        assert c.refused("C_GetSlotList", 1, 8) == rv("CRYPTOKI_NOT_INITIALIZED")
        assert c("C_Initialize", wire.HANDSHAKE, 0, None) == ()
        assert c("C_GetSlotList", 1, None) == (wire.Length(1),)
        assert c("C_GetSlotList", 1, 8) == ([SLOT_ID],)
        info = c("C_GetTokenInfo", SLOT_ID)
        assert info[0] == wire.pad("signer-ha", 32)
        assert c.refused("C_GetTokenInfo", 7) == rv("SLOT_ID_INVALID")
        (session,) = c("C_OpenSession", SLOT_ID, 0x6)
        assert c("C_GetSessionInfo", session) == (SLOT_ID, 2, 0x6, 0)  # CKS_RW_PUBLIC_SESSION
        assert c.refused("C_OpenSession", SLOT_ID, 0x2) == rv("SESSION_PARALLEL_NOT_SUPPORTED")


def test_a_wrong_handshake_and_unknown_calls_are_refused_with_codes(clock) -> None:
    slot, p = make_slot(clock, replicas(clock, "hsm-a"))
    with p:  # type: ignore[attr-defined]
        c = Client(clock, slot)
        assert c.refused("C_Initialize", b"SOMETHING-ELSE", 0, None) == rv("DEVICE_ERROR")
        c.start()
        assert c.refused("C_InitToken", SLOT_ID, b"", b"") == rv("FUNCTION_NOT_SUPPORTED")
        assert c.refused("C_DigestInit", 1, wire.Mechanism(0x250)) == rv("FUNCTION_NOT_SUPPORTED")


# -- login and access control -----------------------------------------------------------------


def test_a_wrong_application_pin_never_reaches_a_member_and_private_keys_stay_hidden(clock) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    slot, p = make_slot(clock, hsms)
    with p:  # type: ignore[attr-defined]
        c = Client(clock, slot)
        s = c.start()
        private = wire.Attribute(a.CKA_CLASS, a.CKO_PRIVATE_KEY)
        assert c.find(s, private) == []
        assert len(c.find(s, wire.Attribute(a.CKA_CLASS, a.CKO_PUBLIC_KEY))) == 2
        assert c.refused("C_Login", s, 1, b"1234") == rv("PIN_INCORRECT")  # the members' PIN is not the app's
        assert c.refused("C_Login", s, 1, b"wrong") == rv("PIN_INCORRECT")
        assert c.find(s, private) == []
        # No member saw the application's PINs (a member logs its own links in, with the members' PIN).
        assert {n: h.count("login", "CKR_PIN_INCORRECT") for n, h in hsms.items()} == {"hsm-a": 0, "hsm-b": 0}
        assert [k for k, _ in slot.notes].count("login_refused") == 2  # type: ignore[attr-defined]
        c.login(s)
        assert len(c.find(s, private)) == 2
        assert c("C_GetSessionInfo", s)[1] == 3  # CKS_RW_USER_FUNCTIONS, as libhsm requires
        assert c.refused("C_Login", s, 1, APP_PIN.encode()) == rv("USER_ALREADY_LOGGED_IN")
        assert c.refused("C_Login", s, 0, APP_PIN.encode()) == rv("USER_TYPE_INVALID")  # SO: members only


def test_logout_clears_only_that_connections_login(clock) -> None:
    slot, p = make_slot(clock, replicas(clock, "hsm-a"))
    with p:  # type: ignore[attr-defined]
        one, two = Client(clock, slot, pid=1), Client(clock, slot, pid=2)
        s1, s2 = one.start(), two.start()
        one.login(s1)
        two.login(s2)
        key = one.key(s1, "rsa")
        one("C_Logout", s1)
        assert one.refused("C_SignInit", s1, wire.Mechanism(SHA256_RSA), key) == rv("USER_NOT_LOGGED_IN")
        assert two.sign(s2, key, b"still mine")  # the other application is still logged in
        assert one.refused("C_Logout", s1) == rv("USER_NOT_LOGGED_IN")


# -- signing and failover --------------------------------------------------------------------


def test_sign_with_a_length_query_verifies_and_costs_one_member_call(clock) -> None:
    with logged_in(clock, "hsm-a", "hsm-b") as (hsms, slot, c, s):
        before = sum(h.count("sign") for h in hsms.values())
        signature = c.sign(s, c.key(s, "rsa"), b"zone data")
        verify_rsa(hsms["hsm-a"], b"zone data", signature)
        assert sum(h.count("sign") for h in hsms.values()) - before == 1


def test_a_sign_init_and_length_query_then_every_member_lost_still_gives_the_signature(clock) -> None:
    with logged_in(clock, "hsm-a", "hsm-b") as (hsms, slot, c, s):
        key = c.key(s, "rsa")
        c("C_SignInit", s, wire.Mechanism(SHA256_RSA), key)
        (size,) = c("C_Sign", s, b"payload", None)
        for h in hsms.values():
            h.down()
        (signature,) = c("C_Sign", s, b"payload", size.n)  # type: ignore[attr-defined]
        verify_rsa(hsms["hsm-b"], b"payload", signature)  # type: ignore[arg-type]


def test_a_member_lost_between_sign_init_and_sign_is_failed_over(clock) -> None:
    with logged_in(clock, "hsm-a", "hsm-b") as (hsms, slot, c, s):
        key = c.key(s, "rsa")
        for _ in range(3):  # whichever member the pool picks next, one of the two is down
            c("C_SignInit", s, wire.Mechanism(SHA256_RSA), key)
            hsms["hsm-a"].down()
            (signature,) = c("C_Sign", s, b"after loss", 256)
            verify_rsa(hsms["hsm-b"], b"after loss", signature)  # type: ignore[arg-type]
            hsms["hsm-a"].up()


def test_too_small_a_buffer_keeps_the_operation_and_multipart_input_is_bounded(clock) -> None:
    with logged_in(clock, "hsm-a", max_operation_bytes=2048) as (hsms, slot, c, s):
        key = c.key(s, "rsa")
        c("C_SignInit", s, wire.Mechanism(SHA256_RSA), key)
        assert c("C_Sign", s, b"x", 16) == (wire.Length(256),)  # BUFFER_TOO_SMALL, with the length
        (signature,) = c("C_Sign", s, b"x", 256)
        verify_rsa(hsms["hsm-a"], b"x", signature)  # type: ignore[arg-type]
        assert c.refused("C_Sign", s, b"x", 256) == rv("OPERATION_NOT_INITIALIZED")  # the operation ended
        c("C_SignInit", s, wire.Mechanism(SHA256_RSA), key)
        c("C_SignUpdate", s, b"part one, ")
        c("C_SignUpdate", s, b"part two")
        (signature,) = c("C_SignFinal", s, 256)
        verify_rsa(hsms["hsm-a"], b"part one, part two", signature)  # type: ignore[arg-type]
        c("C_SignInit", s, wire.Mechanism(SHA256_RSA), key)
        c("C_SignUpdate", s, b"y" * 2000)
        assert c.refused("C_SignUpdate", s, b"y" * 100) == rv("DATA_LEN_RANGE")
        assert c.refused("C_SignFinal", s, 256) == rv("OPERATION_NOT_INITIALIZED")


def test_ecdsa_over_a_digest_and_verify_through_the_pool(clock) -> None:
    with logged_in(clock, "hsm-a", "hsm-b") as (hsms, slot, c, s):
        digest = hashlib.sha256(b"rrset").digest()
        signature = c.sign(s, c.key(s, "ec"), digest, ECDSA)
        assert len(signature) == 64
        der = utils.encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
        hsms["hsm-a"].public_key("ec").verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        public = c.key(s, "ec", a.CKO_PUBLIC_KEY)
        c("C_VerifyInit", s, wire.Mechanism(ECDSA), public)
        assert c("C_Verify", s, digest, signature) == ()
        c("C_VerifyInit", s, wire.Mechanism(ECDSA), public)
        assert c.refused("C_Verify", s, digest, bytes(64)) == rv("SIGNATURE_INVALID")


def test_init_errors_come_from_the_catalog_before_any_member_is_asked(clock) -> None:
    with logged_in(clock, "hsm-a") as (hsms, slot, c, s):
        rsa, ec_key = c.key(s, "rsa"), c.key(s, "ec")
        public = c.key(s, "rsa", a.CKO_PUBLIC_KEY)
        assert c.refused("C_SignInit", s, wire.Mechanism(ECDSA), rsa) == rv("KEY_TYPE_INCONSISTENT")
        assert c.refused("C_SignInit", s, wire.Mechanism(SHA256_RSA), ec_key) == rv("KEY_TYPE_INCONSISTENT")
        assert c.refused("C_SignInit", s, wire.Mechanism(SHA256_RSA), public) == rv("KEY_TYPE_INCONSISTENT")
        assert c.refused("C_SignInit", s, wire.Mechanism(SHA256_RSA), 9999) == rv("KEY_HANDLE_INVALID")
        assert c.refused("C_SignInit", s, wire.Mechanism(ckm_value("AES_ECB")), rsa) == rv("MECHANISM_INVALID")
        c("C_SignInit", s, wire.Mechanism(SHA256_RSA), rsa)
        assert c.refused("C_SignInit", s, wire.Mechanism(SHA256_RSA), rsa) == rv("OPERATION_ACTIVE")
        assert c.refused("C_GenerateKeyPair", s, wire.Mechanism(0), [], []) == rv("FUNCTION_NOT_SUPPORTED")


# -- outages ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["device_error", "luna"])
def test_with_every_member_down_calls_end_within_the_deadline_and_the_same_session_signs_again(
        clock, mode) -> None:
    with logged_in(clock, "hsm-a", "hsm-b", outage_codes=mode) as (hsms, slot, c, s):
        key = c.key(s, "rsa")
        for h in hsms.values():
            h.down()
        started = clock.monotonic()
        c("C_SignInit", s, wire.Mechanism(SHA256_RSA), key)
        assert c.refused("C_Sign", s, b"d", 256) == rv("DEVICE_ERROR")
        assert clock.monotonic() - started <= 3.0 + 1.0  # the policy's deadline, plus slack
        c("C_SignInit", s, wire.Mechanism(SHA256_RSA), key)
        second = c.refused("C_Sign", s, b"d", 256)
        if mode == "luna":
            assert second == rv("TOKEN_NOT_PRESENT")
            assert c("C_GetSlotInfo", SLOT_ID)[2] & 0x1 == 0  # CKF_TOKEN_PRESENT cleared
            assert c.refused("C_GetTokenInfo", SLOT_ID) == rv("TOKEN_NOT_PRESENT")
        else:
            assert second == rv("DEVICE_ERROR")
        # Listings still work from the cache during the outage.
        assert len(c.find(s, wire.Attribute(a.CKA_CLASS, a.CKO_PRIVATE_KEY))) == 2
        assert [k for k, _ in slot.notes].count("outage") == 1  # type: ignore[attr-defined]
        hsms["hsm-b"].up()
        c("C_SignInit", s, wire.Mechanism(SHA256_RSA), key)
        (signature,) = c("C_Sign", s, b"back", 256, budget=120.0)
        verify_rsa(hsms["hsm-b"], b"back", signature)  # type: ignore[arg-type]
        assert c("C_GetSlotInfo", SLOT_ID)[2] & 0x1 == 1
        assert c("C_GetTokenInfo", SLOT_ID)[0] == wire.pad("signer-ha", 32)


# -- attributes ------------------------------------------------------------------------------


def test_attributes_are_served_from_the_catalog_with_p11_kits_in_band_codes(clock) -> None:
    with logged_in(clock, "hsm-a") as (hsms, slot, c, s):
        key = c.key(s, "rsa")
        attrs, code = c("C_GetAttributeValue", s, key, [(a.CKA_LABEL, 0), (a.CKA_KEY_TYPE, 0)])
        assert code == 0
        assert [(x.type, x.valid, x.length) for x in attrs] == [(a.CKA_LABEL, True, 3), (a.CKA_KEY_TYPE, True, 8)]
        attrs, code = c("C_GetAttributeValue", s, key, [(a.CKA_LABEL, 64), (a.CKA_SIGN, 1), (a.CKA_MODULUS, 512)])
        assert code == 0
        assert [x.value for x in attrs[:2]] == [b"rsa", True]
        assert attrs[2].value == hsms["hsm-a"].public_key("rsa").public_numbers().n.to_bytes(256, "big")
        attrs, code = c("C_GetAttributeValue", s, key, [(a.CKA_PRIVATE_EXPONENT, 512), (a.CKA_LABEL, 64)])
        assert code == rv("ATTRIBUTE_SENSITIVE") and not attrs[0].valid and attrs[1].value == b"rsa"
        attrs, code = c("C_GetAttributeValue", s, key, [(0x7FFF0000, 8)])
        assert code == rv("ATTRIBUTE_TYPE_INVALID") and not attrs[0].valid
        attrs, code = c("C_GetAttributeValue", s, key, [(a.CKA_LABEL, 2)])
        assert code == rv("BUFFER_TOO_SMALL") and not attrs[0].valid
        assert c.refused("C_GetAttributeValue", s, key, [(a.CKA_WRAP_TEMPLATE, 0)]) == rv("ATTRIBUTE_TYPE_INVALID")
        for h in hsms.values():
            h.down()
        attrs, code = c("C_GetAttributeValue", s, key, [(a.CKA_ID, 64)])  # no member needed
        assert code == 0 and attrs[0].value == c.slot._catalog.get(key, logged_in=True).values[a.CKA_ID]
        before = c("C_GetAttributeValue", s, key, [(a.CKA_LABEL, 64)])
        assert before[1] == 0


def test_object_handles_are_stable_across_member_restarts(clock) -> None:
    with logged_in(clock, "hsm-a", "hsm-b", catalog_max_age=0.0) as (hsms, slot, c, s):
        first = sorted(c.find(s))
        for h in hsms.values():
            h.restart()
        clock.sleep(5.0)
        assert sorted(c.find(s)) == first
        signature = c.sign(s, c.key(s, "rsa"), b"after restart")
        verify_rsa(hsms["hsm-a"], b"after restart", signature)


# -- key generation ------------------------------------------------------------------------------

RSA_KEYGEN = ckm_value("RSA_PKCS_KEY_PAIR_GEN")


def keygen_templates(label: bytes, key_id: bytes) -> tuple[list[wire.Attribute], list[wire.Attribute]]:
    public = [wire.Attribute(a.CKA_LABEL, label), wire.Attribute(a.CKA_ID, key_id),
              wire.Attribute(a.CKA_MODULUS_BITS, 2048), wire.Attribute(a.CKA_VERIFY, True),
              wire.Attribute(a.CKA_TOKEN, True)]
    private = [wire.Attribute(a.CKA_LABEL, label), wire.Attribute(a.CKA_ID, key_id),
               wire.Attribute(a.CKA_SIGN, True), wire.Attribute(a.CKA_TOKEN, True),
               wire.Attribute(a.CKA_PRIVATE, True), wire.Attribute(a.CKA_SENSITIVE, True)]
    return public, private


def test_keygen_primary_goes_to_the_first_serving_member_alone_and_its_key_signs(clock) -> None:
    with logged_in(clock, "hsm-a", "hsm-b", keygen="primary", catalog_max_age=0.0) as (hsms, slot, c, s):
        (mechanisms,) = c("C_GetMechanismList", SLOT_ID, 64)
        assert RSA_KEYGEN in mechanisms  # type: ignore[operator]
        hsms["hsm-a"].down()  # the first serving member is then hsm-b
        clock.sleep(1.0)
        public, private = c("C_GenerateKeyPair", s, wire.Mechanism(RSA_KEYGEN), *keygen_templates(b"ksk-new", b"\x09"))
        assert (hsms["hsm-a"].count("generate_keypair"), hsms["hsm-b"].count("generate_keypair")) == (0, 1)
        assert [k for k, _ in slot.notes].count("key_generated") == 1  # type: ignore[attr-defined]
        hsms["hsm-a"].up()
        clock.sleep(3.0)
        for _ in range(4):  # round robin would send half of these to hsm-a, which lacks the key
            signature = c.sign(s, private, b"with the new key")  # type: ignore[arg-type]
            hsms["hsm-b"].public_key("ksk-new").verify(signature, b"with the new key", padding.PKCS1v15(),
                                                       hashes.SHA256())
        assert c.find(s, wire.Attribute(a.CKA_LABEL, b"ksk-new")) == sorted([public, private])  # type: ignore[list-item]
        assert slot._catalog.pinned  # only hsm-b has it so far
        hsms["hsm-a"].add_key("ksk-new", "RSA", key_id=b"\x09")  # its replica appears (the same material)
        for _ in range(4):
            c.find(s)
        assert not slot._catalog.pinned
        assert c.find(s, wire.Attribute(a.CKA_LABEL, b"ksk-new")) == sorted([public, private])  # type: ignore[list-item]


def test_keygen_that_may_have_reached_the_hsm_is_never_sent_again(clock) -> None:
    with logged_in(clock, "hsm-a", "hsm-b", keygen="primary") as (hsms, slot, c, s):
        hsms["hsm-a"].fail("generate_keypair", "CKR_DEVICE_ERROR")
        assert c.refused("C_GenerateKeyPair", s, wire.Mechanism(RSA_KEYGEN),
                         *keygen_templates(b"zsk", b"\x0a")) == rv("DEVICE_ERROR")
        assert sum(h.count("generate_keypair") for h in hsms.values()) == 1
        notes = [f for k, f in slot.notes if k == "outcome_unknown"]  # type: ignore[attr-defined]
        assert notes and notes[0]["member"] == "hsm-a"
        assert c.refused("C_GenerateKeyPair", s, wire.Mechanism(ckm_value("AES_KEY_GEN")),
                         *keygen_templates(b"x", b"\x0b")) == rv("MECHANISM_INVALID")
        c("C_Logout", s)
        assert c.refused("C_GenerateKeyPair", s, wire.Mechanism(RSA_KEYGEN),
                         *keygen_templates(b"y", b"\x0c")) == rv("USER_NOT_LOGGED_IN")


def test_decrypt_with_a_length_query_through_the_pool(clock) -> None:
    with logged_in(clock, "hsm-a", "hsm-b") as (hsms, slot, c, s):
        key = c.key(s, "rsa")
        secret = b"a session key, wrapped"
        ciphertext = hsms["hsm-a"].public_key("rsa").encrypt(secret, padding.PKCS1v15())
        c("C_DecryptInit", s, wire.Mechanism(ckm_value("RSA_PKCS")), key)
        (size,) = c("C_Decrypt", s, ciphertext, None)
        assert size == wire.Length(len(secret))
        hsms["hsm-a"].down()  # the plaintext was kept from the length query: no member needed
        assert c("C_Decrypt", s, ciphertext, len(secret)) == (secret,)
        c("C_DecryptInit", s, wire.Mechanism(ckm_value("RSA_PKCS")), key)
        assert c("C_Decrypt", s, ciphertext, 256) == (secret,)  # on hsm-b
