"""Keys bound to connections and pools, on ScriptedHSMs and a VirtualClock.

The scripted HSM holds real software keys (derived from its seed: replicas hold the
same ones), so what a member signs verifies with its real public key, and a member
given another key under the same label (``replace_key``) is a replica that is not
one. Everything here is virtual time: the deadline of a call, a reconnect, and the
replica check made when a member logs in are exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from hsmfsm import AllMembersDown, MemberUnavailable, OperationFailed
from hsmfsm.core.errors import KeyNotFound, MechanismNotSupported, ModuleCallError
from hsmfsm.core.mechanisms import OAEPParams, PSSParams
from hsmfsm.keys import SignatureMismatch
from hsmfsm.runtime.pool import Pool, format_status
from hsmfsm.testing import ScriptedHSM, ScriptedModule, VirtualClock

from scripted_helpers import MECH, PIN, Caller, Recorder, connection, guarded_clock, policy, pool, replicas, signs

pytestmark = pytest.mark.timeout(30)

DIGEST = hashlib.sha256(b"hsmfsm keys").digest()


@pytest.fixture
def clock() -> Iterator[VirtualClock]:
    yield from guarded_clock(limit=15.0)  # the first RSA key of a seed takes a moment to derive


@pytest.fixture
def rec(clock: VirtualClock) -> Recorder:
    return Recorder(clock)


def der(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def verify_ecdsa(public: ec.EllipticCurvePublicKey, digest: bytes, raw: bytes) -> None:
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    public.verify(utils.encode_dss_signature(r, s), digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def status(p: Pool) -> dict[str, object]:
    return {s.name: s for s in p.status()}


# -- the scripted module's keys ---------------------------------------------------------------


def test_scripted_keys_are_real_deterministic_and_read_as_attributes(clock) -> None:
    hsm = ScriptedHSM("tok", pin=PIN, clock=clock, keys={"rsa": "RSA", "ec": "EC", "ed": "ED25519"})
    twin = ScriptedHSM("tok", pin=PIN, clock=clock, keys={"rsa": "RSA", "ec": "EC", "ed": "ED25519"})
    other_seed = ScriptedHSM("tok", pin=PIN, clock=clock, keys={"ec": "EC"}, seed=7)
    for label in ("rsa", "ec", "ed"):
        assert der(hsm.public_key(label)) == der(twin.public_key(label))  # replicas: the same material
    assert der(other_seed.public_key("ec")) != der(hsm.public_key("ec"))
    m = ScriptedModule(hsm, clock, "m")
    m.initialize()
    s = m.open_session(m.find_token("tok"))
    assert m.login(s, PIN).name == "CKR_OK"
    # Each mechanism's answer verifies with the public key, outside the HSM.
    rsa_key = m.find_key(s, "rsa", "private")
    block = bytes.fromhex("3031300d060960864801650304020105000420") + DIGEST  # DigestInfo || SHA-256
    hsm.public_key("rsa").verify(m.sign(rsa_key, block, m.mechanism("RSA_PKCS"), None), DIGEST,
                                 padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    pss = PSSParams("SHA256", "SHA256", 32)
    hsm.public_key("rsa").verify(m.sign(rsa_key, DIGEST, m.mechanism("RSA_PKCS_PSS"), pss), DIGEST,
                                 padding.PSS(padding.MGF1(hashes.SHA256()), 32), utils.Prehashed(hashes.SHA256()))
    hsm.public_key("rsa").verify(m.sign(rsa_key, b"data", m.mechanism("SHA256_RSA_PKCS_PSS"), pss), b"data",
                                 padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    ec_key = m.find_key(s, "ec", "private")
    raw = m.sign(ec_key, DIGEST, m.mechanism("ECDSA"), None)
    assert len(raw) == 64 and raw == m.sign(ec_key, DIGEST, m.mechanism("ECDSA"), None)  # RFC 6979
    verify_ecdsa(hsm.public_key("ec"), DIGEST, raw)
    raw = m.sign(ec_key, b"data", m.mechanism("ECDSA_SHA256"), None)
    verify_ecdsa(hsm.public_key("ec"), hashlib.sha256(b"data").digest(), raw)
    ed_key = m.find_key(s, "ed", "private")
    hsm.public_key("ed").verify(m.sign(ed_key, b"msg", m.mechanism("EDDSA"), None), b"msg")
    assert hsm.verify_signature("ed", b"msg", m.sign(ed_key, b"msg", m.mechanism("EDDSA"), None), "EDDSA")
    with pytest.raises(ModuleCallError) as info:
        m.sign(rsa_key, DIGEST + b"x", m.mechanism("RSA_PKCS_PSS"), pss)  # 33 bytes: not a SHA-256 digest
    assert info.value.code.name == "CKR_DATA_LEN_RANGE"
    # Real RSA decryption beside the scripted ciphertexts.
    ciphertext = hsm.public_key("rsa").encrypt(b"secret", padding.OAEP(padding.MGF1(hashes.SHA256()),
                                                                       hashes.SHA256(), None))
    assert m.decrypt(rsa_key, ciphertext, m.mechanism("RSA_PKCS_OAEP"), OAEPParams("SHA256", "SHA256")) == b"secret"
    # Attributes, as hsmfsm.keys reads them.
    attrs = m.key_attributes(s, rsa_key)
    numbers = hsm.public_key("rsa").public_numbers()
    assert attrs["key_type"] == "RSA" and int.from_bytes(attrs["modulus"], "big") == numbers.n
    assert int.from_bytes(attrs["public_exponent"], "big") == 65537 and attrs["label"] == "rsa"
    attrs = m.key_attributes(s, ec_key)
    assert attrs["ec_params"] == bytes.fromhex("06082a8648ce3d030107")  # the OID of P-256
    assert attrs["ec_point"][:2] == b"\x04\x41" and len(attrs["ec_point"]) == 67  # DER OCTET STRING of 04||x||y
    assert m.key_attributes(s, ed_key)["key_type"] == "EC_EDWARDS"
    assert m.mechanisms(m.find_token("tok")) >= {"RSA_PKCS", "RSA_PKCS_PSS", "ECDSA", "EDDSA", "SHA256_RSA_PKCS"}


def test_scripted_keys_without_a_public_object_and_by_id(clock) -> None:
    hsm = ScriptedHSM("tok", pin=PIN, clock=clock, keys={}, mechanisms=["ECDSA", "RSA_PKCS"])
    hsm.add_key("bare-rsa", "RSA", key_id=b"\x01", public=False)
    hsm.add_key("cert-ec", "EC", key_id=b"\x02", public=False, certificate=True)
    hsm.add_key("lost-ec", "EC", key_id=b"\x03", public=False)
    m = ScriptedModule(hsm, clock, "m")
    m.initialize()
    s = m.open_session(m.find_token("tok"))
    m.login(s, PIN)
    key = m.find_key(s, None, "private", b"\x01")  # by CKA_ID alone
    assert key.label == "bare-rsa"
    assert int.from_bytes(m.key_attributes(s, key)["modulus"], "big") == hsm.public_key("bare-rsa").public_numbers().n
    with pytest.raises(ModuleCallError) as info:
        m.find_key(s, "bare-rsa", "public")  # no public object
    assert info.value.code.name == "HSMFSM_NO_SUCH_KEY" and "label 'bare-rsa'" in info.value.detail
    attrs = m.key_attributes(s, m.find_key(s, "cert-ec", "private", b"\x02"))
    assert set(attrs) == {"certificate", "label", "id"} and attrs["id"] == b"\x02"
    with pytest.raises(ModuleCallError) as info:
        m.key_attributes(s, m.find_key(s, "lost-ec", "private"))
    assert info.value.code.name == "HSMFSM_NO_SUCH_KEY"
    with pytest.raises(ModuleCallError) as info:
        m.find_key(s, "cert-ec", "private", b"\x01")  # label and id must both match
    assert info.value.code.name == "HSMFSM_NO_SUCH_KEY" and "label 'cert-ec' and id 01" in info.value.detail
    assert m.mechanisms(m.find_token("tok")) == {"ECDSA", "RSA_PKCS"}
    with pytest.raises(ModuleCallError) as info:  # a mechanism the token does not offer
        m.sign(key, b"data", m.mechanism("SHA256_RSA_PKCS"), None)
    assert info.value.code.name == "CKR_MECHANISM_INVALID"


# -- deadline=, key_id= and lookups ------------------------------------------------------------


def test_deadline_overrides_the_policy_for_one_call(clock, rec) -> None:
    hsm = ScriptedHSM("tok", pin=PIN, clock=clock)
    pol = policy()  # deadline 8 s
    conn = connection(clock, hsm, pol=pol, recorder=rec, probe=False)
    conn.open()
    conn.sign("ec", DIGEST, "ECDSA")
    hsm.down()
    for call in (lambda: conn.sign("ec", DIGEST, "ECDSA", deadline=1.5),
                 lambda: conn.generate_random(8, deadline=1.5),
                 lambda: conn.verify("ec", DIGEST, bytes(64), "ECDSA", deadline=1.5)):
        t0 = clock.monotonic()
        with pytest.raises(MemberUnavailable) as info:
            call()
        assert clock.monotonic() - t0 == pytest.approx(1.5, abs=0.001)
        assert "deadline of 1.5s" in str(info.value)
    t0 = clock.monotonic()
    with pytest.raises(MemberUnavailable):
        conn.sign("ec", DIGEST, "ECDSA")  # the policy's own, for a call that gives none
    assert clock.monotonic() - t0 == pytest.approx(pol.operations.deadline, abs=0.001)
    hsm.up()
    clock.sleep(3.0)
    assert conn.serving
    conn.close()
    # A pool's deadline= bounds the whole call across its members.
    hsms = replicas(clock, "hsm-a", "hsm-b")
    with pool(clock, hsms, pol) as p:
        for h in hsms.values():
            h.down()
        t0 = clock.monotonic()
        with pytest.raises(AllMembersDown):
            p.sign("ec", DIGEST, "ECDSA", deadline=0.75)
        assert clock.monotonic() - t0 == pytest.approx(0.75, abs=0.001)


def test_keys_are_found_by_label_by_id_or_both(clock) -> None:
    hsm = ScriptedHSM("tok", pin=PIN, clock=clock)
    hsm.add_key("zsk", "EC", key_id=b"\x01\x02")
    hsm.add_key("ksk", "EC", key_id=b"\x03")
    conn = connection(clock, hsm, probe=False)
    with conn:
        by_id = conn.sign(None, DIGEST, "ECDSA", key_id=b"\x01\x02")
        verify_ecdsa(hsm.public_key("zsk"), DIGEST, by_id)
        verify_ecdsa(hsm.public_key("ksk"), DIGEST, conn.sign("ksk", DIGEST, "ECDSA", key_id=b"\x03"))
        assert conn.verify(None, DIGEST, by_id, "ECDSA", key_id=b"\x01\x02")
        assert not conn.verify("ksk", DIGEST, by_id, "ECDSA")
        assert der(conn.public_key(key_id=b"\x03")) == der(hsm.public_key("ksk"))
        assert der(conn.public_key(uri="pkcs11:token=tok;id=%01%02;type=private")) == der(hsm.public_key("zsk"))
        with pytest.raises(OperationFailed) as info:  # label and id of two different keys: no such key
            conn.sign("ksk", DIGEST, "ECDSA", key_id=b"\x01\x02")
        assert info.value.code.name == "HSMFSM_NO_SUCH_KEY"
        with pytest.raises(ValueError):
            conn.public_key()  # nothing to look up by
        with pytest.raises(ValueError):
            conn.sign(None, DIGEST, "ECDSA")
        key = conn.private_key(key_id=b"\x03")
        signature = key.sign(b"zone data", ec.ECDSA(hashes.SHA256()))
        hsm.public_key("ksk").verify(signature, b"zone data", ec.ECDSA(hashes.SHA256()))


def test_two_keys_under_one_label_are_both_named(clock) -> None:
    hsm = ScriptedHSM("tok", pin=PIN, clock=clock)
    hsm.add_key("dup", "EC", key_id=b"\x0a")
    hsm.add_key("dup", "EC", key_id=b"\x0b")
    with connection(clock, hsm, probe=False) as conn:
        with pytest.raises(KeyNotFound) as info:
            conn.public_key("dup")
        text = str(info.value)
        assert "label 'dup'" in text and "id 0a" in text and "id 0b" in text and "hsm-a" in text
        assert info.value.code.name == "HSMFSM_MULTIPLE_OBJECTS"
        with pytest.raises(OperationFailed) as failed:
            conn.sign("dup", DIGEST, "ECDSA")
        assert failed.value.code.name == "HSMFSM_MULTIPLE_OBJECTS"
        assert "id 0a" in str(failed.value.__cause__) and "id 0b" in str(failed.value.__cause__)
        # The id settles it.
        verify_ecdsa(conn.public_key("dup", key_id=b"\x0b"), DIGEST, conn.sign("dup", DIGEST, "ECDSA", key_id=b"\x0b"))


def test_a_key_missing_everywhere_is_key_not_found_naming_the_lookup_and_each_member(clock) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    with pool(clock, hsms) as p:
        t0 = clock.monotonic()
        with pytest.raises(KeyNotFound) as info:
            p.public_key("nope")
        assert clock.monotonic() - t0 < 0.05  # every member answered: no wait for the deadline
        text = str(info.value)
        assert "no key label 'nope' on any member" in text
        assert "hsm-a: public_key: label 'nope'" in text and "hsm-b: public_key: label 'nope'" in text
        with pytest.raises(KeyNotFound) as info:
            p.private_key(key_id=b"\xff")
        assert "id ff" in str(info.value) and "hsm-a" in str(info.value) and "hsm-b" in str(info.value)
        # A member that is down is named as not asked, after the deadline for it to come back.
        hsms["hsm-b"].down()
        clock.sleep(1.0)
        with pytest.raises(KeyNotFound) as info:
            p.public_key("nope", deadline=0.5)
        assert "hsm-b: not asked (disconnected" in str(info.value)


# -- check=: a signature that fails is never returned -------------------------------------------


def test_a_signature_failing_the_check_goes_to_another_member(clock, rec) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    hsms["hsm-b"].replace_key("ec")  # signs, but with another key than the one the caller checks against
    public = hsms["hsm-a"].public_key("ec")

    def check(raw: bytes) -> bool:
        try:
            verify_ecdsa(public, DIGEST, raw)
        except Exception:
            return False
        return True

    with pool(clock, hsms, recorder=rec) as p:  # the pool never read the key: no replica check keeps b out
        results = [p.sign("ec", DIGEST, "ECDSA", check=check) for _ in range(8)]
        assert all(check(r) for r in results)
        # Round robin sends every other call to hsm-b first; its answers failed the check and the call
        # went to hsm-a. Three such impaired calls in a row took hsm-b to degraded, where it gets no traffic.
        assert signs(hsms["hsm-b"]) == 3 and signs(hsms["hsm-a"]) == 8
        assert ("logged_in", "impaired", "degraded", None) in rec.of("hsm-b")
        assert p.member("hsm-b").state == "degraded"
        # No member signs correctly: never returned, and the error names the members tried.
        hsms["hsm-a"].replace_key("ec")
        with pytest.raises(SignatureMismatch) as info:
            p.sign("ec", DIGEST, "ECDSA", check=check)
        assert "hsm-a, hsm-b" in str(info.value) or "hsm-b, hsm-a" in str(info.value)
        assert "failed the caller's check and was not returned" in str(info.value)


def test_a_connection_reissues_a_rejected_signature_up_to_max_reissues(clock) -> None:
    hsm = ScriptedHSM("tok", pin=PIN, clock=clock)
    pol = policy(max_reissues=2)
    with connection(clock, hsm, pol=pol, probe=False) as conn:
        answers: list[bytes] = []
        with pytest.raises(SignatureMismatch) as info:
            conn.sign("ec", DIGEST, "ECDSA", check=lambda raw: answers.append(raw) is not None)
        assert len(answers) == signs(hsm) == 3  # the first and two re-issues
        assert "3 answer(s) from hsm-a failed the caller's check (re-issued 2 time(s))" in str(info.value)
        flaky = iter([False, True])
        raw = conn.sign("ec", DIGEST, "ECDSA", check=lambda raw: next(flaky))
        verify_ecdsa(hsm.public_key("ec"), DIGEST, raw)
        # Through a bound key with verify=True, a good HSM passes its own check.
        key = conn.private_key("rsa", verify=True)
        signature = key.sign(b"tbs", padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
        hsm.public_key("rsa").verify(signature, b"tbs", padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                                     hashes.SHA256())


# -- the replica check ------------------------------------------------------------------------


def test_a_replica_with_another_key_is_kept_out_and_the_other_serves(clock, rec) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    a, b = hsms["hsm-a"], hsms["hsm-b"]
    b.replace_key("rsa")
    with pool(clock, hsms, recorder=rec) as p:
        public = p.public_key("rsa")  # read from hsm-a (round robin's first), then every member compared
        assert der(public) == der(a.public_key("rsa"))
        st = status(p)["hsm-b"]
        assert st.state == "logged_in" and st.error is not None
        assert "hsm-b" in st.error and "label 'rsa'" in st.error and "differs" in st.error
        assert status(p)["hsm-a"].error is None
        text = format_status(p)
        assert "kept out: hsm-b: key label 'rsa' differs" in text and text.endswith("serving on 1 of 2 members")
        key = p.private_key("rsa")
        for i in range(10):
            signature = key.sign(b"%d" % i, padding.PKCS1v15(), hashes.SHA256())
            public.verify(signature, b"%d" % i, padding.PKCS1v15(), hashes.SHA256())
        assert signs(b) == 0 and signs(a) == 10  # every call, EC ones too: the member is out of service
        p.sign("ec", DIGEST, "ECDSA")
        assert signs(b) == 0
        # A later check at its next login: still wrong, still out; fixed, it rejoins.
        attributes_read = b.count("key_attributes")
        b.restart()
        clock.sleep(1.0)
        assert p.member("hsm-b").serving and status(p)["hsm-b"].error is not None
        assert b.count("key_attributes") == attributes_read + 1  # checked at login, with no call made
        b.replace_key("rsa", variant=0)  # fixed on the token: recheck() reads its keys again, no reconnect
        p.recheck("hsm-b")
        assert status(p)["hsm-b"].error is None and p.member("hsm-b").generation == 2
        for i in range(4):
            p.sign("rsa", b"%d" % i, MECH)
        assert signs(b) == 2


def test_a_member_joining_with_another_key_never_gets_a_call(clock, rec) -> None:
    """hsm-b is down while the pool reads the key; it comes back with another key under the label. Its
    check runs in the listener of its login_ok, before it is eligible: callers signing all along never
    reach it."""
    hsms = replicas(clock, "hsm-a", "hsm-b")
    a, b = hsms["hsm-a"], hsms["hsm-b"]
    b.down()
    with pool(clock, hsms, recorder=rec, interval=0.5, max_attempts=None) as p:
        p.public_key("ec")
        b.replace_key("ec")
        b.up()
        callers = [Caller(clock, lambda i=i: [p.sign("ec", DIGEST, "ECDSA") for _ in range(200)], f"c{i}")
                   for i in range(2)]
        for c in callers:
            assert c.join(30.0) and c.error is None
        assert p.member("hsm-b").serving and ("open", "login_ok", "logged_in", "CKR_OK") in rec.of("hsm-b")
        assert signs(b) == 0 and signs(a) == 400
        assert "differs" in (status(p)["hsm-b"].error or "")


def test_a_caller_given_public_key_is_the_reference(clock) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    hsms["hsm-a"].replace_key("ec")  # the first member is the odd one out
    with pool(clock, hsms) as p:
        key = p.private_key("ec", public_key=hsms["hsm-b"].public_key("ec"), verify=True)
        assert "hsm-a" in (status(p)["hsm-a"].error or "") and status(p)["hsm-b"].error is None
        signature = key.sign(b"x", ec.ECDSA(hashes.SHA256()))
        hsms["hsm-b"].public_key("ec").verify(signature, b"x", ec.ECDSA(hashes.SHA256()))
        assert signs(hsms["hsm-a"]) == 0


# -- mechanisms known up front -------------------------------------------------------------------


def test_calls_go_only_to_members_offering_the_mechanism(clock, rec) -> None:
    everything = ScriptedHSM(label="signer", pin=PIN, clock=clock).mechanisms
    hsms = {"hsm-a": ScriptedHSM(label="signer", pin=PIN, clock=clock),
            "hsm-b": ScriptedHSM(label="signer", pin=PIN, clock=clock,
                                 mechanisms=everything - {"RSA_PKCS_PSS", "SHA256_RSA_PKCS_PSS", "EDDSA"})}
    hsms["hsm-a"].mechanisms = everything - {"EDDSA"}
    a, b = hsms["hsm-a"], hsms["hsm-b"]
    pss = PSSParams("SHA256", "SHA256", 32)
    with pool(clock, hsms, recorder=rec) as p:
        assert p.member("hsm-b").mechanisms is not None and "RSA_PKCS_PSS" not in p.member("hsm-b").mechanisms
        for _ in range(6):
            signature = p.sign("rsa", DIGEST, "RSA_PKCS_PSS", pss)
            assert a.verify_signature("rsa", DIGEST, signature, "RSA_PKCS_PSS", pss)
        assert b.count("sign") == 0 and a.count("sign") == 6
        p.sign("rsa", b"x", MECH)
        p.sign("rsa", b"y", MECH)
        assert b.count("sign") == 1  # the others go round both
        # No member offers it: refused at once, naming the mechanism, with nothing sent.
        t0 = clock.monotonic()
        with pytest.raises(MechanismNotSupported) as info:
            p.sign("ed", b"msg", "EDDSA")
        assert clock.monotonic() == t0 and info.value.mechanism == "EDDSA" and "EDDSA" in str(info.value)
        assert "hsm-a" in str(info.value) and "hsm-b" in str(info.value)
        # The one member that has it is down: the call waits for it, and then names the mechanism.
        a.down()
        with pytest.raises(MechanismNotSupported) as info:
            p.sign("rsa", DIGEST, "RSA_PKCS_PSS", pss, deadline=1.0)
        assert "RSA_PKCS_PSS" in str(info.value) and "hsm-b" in str(info.value)
        assert b.count("sign") == 1
        a.up()
    # A connection alone refuses a mechanism its token lacks, before sending anything.
    conn = connection(clock, b, name="b-alone", probe=False)
    with conn:
        t0 = clock.monotonic()
        with pytest.raises(MechanismNotSupported) as info:
            conn.sign("rsa", DIGEST, "CKM_RSA_PKCS_PSS", pss)
        assert clock.monotonic() == t0 and info.value.mechanism == "RSA_PKCS_PSS"
        assert "b-alone" in str(info.value) and b.count("sign") == 1


# -- the public key cache ------------------------------------------------------------------------


def test_the_public_key_cache_is_dropped_on_reconnect(clock) -> None:
    hsm = ScriptedHSM("tok", pin=PIN, clock=clock)
    with connection(clock, hsm) as conn:
        first = conn.public_key("rsa")
        assert isinstance(first, rsa.RSAPublicKey)
        assert conn.public_key("rsa") is first and hsm.count("key_attributes") == 1
        hsm.restart()
        clock.sleep(1.0)  # the probe notices, the supervisor reconnects
        assert conn.generation == 2 and conn.serving
        again = conn.public_key("rsa")
        assert again is not first and der(again) == der(first) and hsm.count("key_attributes") == 2
    hsms = replicas(clock, "hsm-a", "hsm-b")
    with pool(clock, hsms) as p:
        p.public_key("ec")  # read from hsm-a, and checked on both
        reads = {name: h.count("key_attributes") for name, h in hsms.items()}
        assert reads == {"hsm-a": 1, "hsm-b": 1}
        for _ in range(4):
            assert isinstance(p.public_key("ec"), ec.EllipticCurvePublicKey)
        assert {name: h.count("key_attributes") for name, h in hsms.items()} == reads
        hsms["hsm-a"].restart()
        clock.sleep(1.0)
        assert hsms["hsm-a"].count("key_attributes") == 2  # the replica check at its login read it again
        assert isinstance(p.public_key("ec", deadline=1.0), ec.EllipticCurvePublicKey)


def test_ed25519_keys_sign_through_a_pool(clock) -> None:
    hsms = {name: ScriptedHSM(label="signer", pin=PIN, clock=clock, keys={"ed": "ED25519"})
            for name in ("hsm-a", "hsm-b")}
    with pool(clock, hsms) as p:
        key = p.private_key("ed")
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        key.public_key().verify(key.sign(b"message"), b"message")
