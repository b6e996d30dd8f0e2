"""Keys bound to a pool of real network HSMs: SoftHSM replicas, each behind its own `p11-kit server`.

The public keys the pool reads from the tokens are the token's own (the DER the lab
wrote when it provisioned them); signatures made through the key objects verify
with them outside any HSM, while a member is killed, when a replica holds another
key under the same label, and when a relay rewrites a member's signature on the wire.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from hsmfsm.core.errors import MechanismNotSupported
from hsmfsm.keys import SignatureMismatch
from hsmfsm.testing.lab import NetworkHSM, Relay

from test_pool import count_calls, make_pool, two

pytestmark = pytest.mark.timeout(120)


def public(token, label: str):
    return serialization.load_der_public_key(token.public_key_der(label))


def der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def pool(client_module, pin_env, fast_policy, hsms):
    with make_pool(client_module, pin_env, fast_policy(), two(hsms)) as p:
        yield p


def test_public_keys_are_the_tokens_and_key_objects_sign_through_cryptography(pool, token) -> None:
    for label in ("rsa", "ec"):  # the lab wrote them as provisioned (RSA: PKCS#1): compared as SPKI DER
        assert der(pool.public_key(label)) == der(public(token, label))
    assert der(pool.member("hsm-a").public_key("ec")) == der(public(token, "ec"))
    rsa_public = public(token, "rsa")
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
    for hash_locally in (True, False):  # RSA_PKCS over a DigestInfo, RSA_PKCS_PSS; or SHA256_RSA_PKCS
        key = pool.private_key("rsa", hash_locally=hash_locally)
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
        signature = key.sign(b"to be signed", padding.PKCS1v15(), hashes.SHA256())
        rsa_public.verify(signature, b"to be signed", padding.PKCS1v15(), hashes.SHA256())
    signature = pool.private_key("rsa").sign(b"to be signed", pss, hashes.SHA256())  # PSSParams on the wire
    rsa_public.verify(signature, b"to be signed", pss, hashes.SHA256())
    # p11-kit-client 0.24.1 lists no SHAn_RSA_PKCS_PSS (its RPC cannot carry their parameters, though
    # SoftHSM in-process offers them): the lists read at connect say so, and nothing is sent.
    assert "SHA256_RSA_PKCS_PSS" not in pool.member("hsm-a").mechanisms
    with pytest.raises(MechanismNotSupported) as info:
        pool.private_key("rsa", hash_locally=False).sign(b"to be signed", pss, hashes.SHA256())
    assert info.value.mechanism == "SHA256_RSA_PKCS_PSS"
    # OAEPParams on the wire. SoftHSM 2.6.1 decrypts OAEP with SHA-1 only (SHA-256: CKR_ARGUMENTS_BAD, measured).
    oaep = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
    assert pool.private_key("rsa").decrypt(rsa_public.encrypt(b"secret", oaep), oaep) == b"secret"


def test_an_ec_key_on_softhsm_signs_with_hash_locally(pool, token) -> None:
    """Debian's SoftHSM lacks CKM_ECDSA_SHA256: the key hashes in Python and signs the digest with ECDSA.
    The mechanism lists read at connect say so up front: without hash_locally the pool refuses at once."""
    assert "ECDSA" in pool.member("hsm-a").mechanisms and "ECDSA_SHA256" not in pool.member("hsm-a").mechanisms
    key = pool.private_key("ec", hash_locally=True, verify=True)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    for i in range(20):
        signature = key.sign(b"record %d" % i, ec.ECDSA(hashes.SHA256()))
        public(token, "ec").verify(signature, b"record %d" % i, ec.ECDSA(hashes.SHA256()))
    remote_hashing = pool.private_key("ec", hash_locally=False)
    t0 = time.monotonic()
    with pytest.raises(MechanismNotSupported) as info:
        remote_hashing.sign(b"x", ec.ECDSA(hashes.SHA256()))
    assert time.monotonic() - t0 < 0.5 and info.value.mechanism == "ECDSA_SHA256"
    assert "hsm-a" in str(info.value) and "hsm-b" in str(info.value)


def test_a_member_killed_mid_run_while_the_key_object_keeps_signing(client_module, pin_env, fast_policy, hsms,
                                                                    token) -> None:
    with make_pool(client_module, pin_env, fast_policy(), two(hsms), max_attempts=None) as pool:
        _sign_through_a_kill(pool, hsms, token)


def _sign_through_a_kill(pool, hsms, token) -> None:
    key = pool.private_key("ec", verify=True)
    verifier = public(token, "ec")
    stop = time.monotonic() + 4.0
    counts, failures = [0], []
    lock = threading.Lock()

    def work(i: int) -> None:
        n = 0
        while time.monotonic() < stop:
            data = b"%d-%d" % (i, n)
            n += 1
            try:
                verifier.verify(key.sign(data, ec.ECDSA(hashes.SHA256())), data, ec.ECDSA(hashes.SHA256()))
                with lock:
                    counts[0] += 1
            except Exception as exc:  # kept: the test fails on any
                failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    hsms[0].kill()
    time.sleep(1.5)
    hsms[0].start()
    for t in threads:
        t.join(30)
    assert not failures, failures[:3]
    assert counts[0] > 100
    deadline = time.monotonic() + 10
    while not pool.member("hsm-a").serving and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.member("hsm-a").serving


def test_a_replica_with_another_key_under_the_label_is_kept_out(client_module, pin_env, fast_policy, token,
                                                                 tmp_path: Path) -> None:
    a = NetworkHSM(token.replicate(tmp_path / "a"), tmp_path / "a.sock").start()
    b = NetworkHSM(token.replicate(tmp_path / "b").replace_key("rsa"), tmp_path / "b.sock").start()
    try:
        assert der(public(b.token, "rsa")) != der(public(token, "rsa"))
        with make_pool(client_module, pin_env, fast_policy(), two((a, b))) as p:
            calls = count_calls(p)
            key = p.private_key("rsa", public_key=public(token, "rsa"))  # the reference: the token's own
            status = {s.name: s for s in p.status()}
            assert status["hsm-a"].error is None
            assert status["hsm-b"].state == "logged_in" and "hsm-b" in status["hsm-b"].error
            assert "label 'rsa'" in status["hsm-b"].error
            for i in range(10):
                data = b"tbs %d" % i
                public(token, "rsa").verify(key.sign(data, padding.PKCS1v15(), hashes.SHA256()), data,
                                            padding.PKCS1v15(), hashes.SHA256())
            assert calls == {"hsm-a": 10, "hsm-b": 0}
            # Another key is served by both members' correct copies... but hsm-b is out of service whole.
            p.private_key("ec").sign(b"x", ec.ECDSA(hashes.SHA256()))
            assert calls["hsm-b"] == 0
            # hsm-a dies: nobody serves the key; the pool never falls back to the wrong replica.
            a.kill()
            with pytest.raises(Exception) as info:
                p.sign("rsa", b"x", "SHA256_RSA_PKCS", deadline=1.0)
            assert "kept out" in str(info.value) and calls["hsm-b"] == 0
    finally:
        a.kill()
        b.kill()


_CORRUPTING_RELAY = r"""
import sys
from hsmfsm.testing.lab import relay as r

left = [int(sys.argv.pop(1))]
judge = r.InProcessRelay._judge


def _judge(self, link, frame):
    verdict, forward = judge(self, link, frame)
    if verdict.call == "C_Sign" and not frame.is_length_query and verdict.rv is None and left[0]:
        left[0] -= 1
        verdict.corrupt = True
    return verdict, forward


def _pump_replies(self):
    self._reply_to_client(r._recv_exact(self.upstream, 1))
    while not self.closed.is_set():
        frame = r._read_frame(self.upstream)
        verdict = self.pending.popleft() if self.pending else r._Verdict(r._call_name(frame.call_id), None)
        if verdict.rv is not None:
            frame = frame.as_error(verdict.rv)
        elif getattr(verdict, "corrupt", False):  # the signature is the reply's last bytes: flip one bit
            frame = r._Frame(frame.code, frame.options, frame.data[:-1] + bytes([frame.data[-1] ^ 1]))
        self.relay._record(self, "reply", frame, verdict.call, verdict.rv)
        self._delay()
        self._reply_to_client(frame.encode())


r.InProcessRelay._judge = _judge
r._Link._pump_replies = _pump_replies
sys.exit(r.main(sys.argv[1:]))
"""


class CorruptingRelay(Relay):
    """The lab's relay, whose child rewrites the first ``corrupt`` real C_Sign replies: one bit of the
    signature flipped on the wire (the relay itself only rewrites replies into error codes)."""

    def __init__(self, listen_path: Path, upstream_path: Path, corrupt: int) -> None:
        super().__init__(listen_path, upstream_path)
        self.corrupt = corrupt

    def start(self, timeout: float = 10.0) -> CorruptingRelay:
        import subprocess

        argv = [sys.executable, "-c", _CORRUPTING_RELAY, str(self.corrupt), str(self.listen_path),
                str(self.upstream_path), "--latency", "0.0"]
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                      start_new_session=True)
        try:
            self._receive(timeout)
        except Exception:
            self._kill()
            raise
        return self


def test_a_signature_rewritten_on_the_wire_is_never_returned(client_module, pin_env, fast_policy, hsms, token,
                                                             recorder, tmp_path: Path) -> None:
    a, b = hsms
    relay_a = CorruptingRelay(tmp_path / "ra.sock", a.socket_path, corrupt=1000).start()
    relay_b = CorruptingRelay(tmp_path / "rb.sock", b.socket_path, corrupt=3).start()
    try:
        members = [("hsm-a", a, relay_a.address), ("hsm-b", b, relay_b.address)]
        with make_pool(client_module, pin_env, fast_policy(), members) as p:
            p.add_listener(recorder)
            calls = count_calls(p)
            verifier = public(token, "ec")
            key = p.private_key("ec", verify=True)
            # Every signature of hsm-a arrives with a bit flipped; hsm-b's first three too. None of them
            # is returned: each goes to the other member, and the ones that do come back verify.
            signatures = []
            with pytest.raises(SignatureMismatch) as info:  # the first call: both members' answers are wrong
                key.sign(b"first", ec.ECDSA(hashes.SHA256()))
            assert "hsm-a" in str(info.value) and "hsm-b" in str(info.value)
            for i in range(6):
                try:
                    signatures.append((b"%d" % i, key.sign(b"%d" % i, ec.ECDSA(hashes.SHA256()))))
                except SignatureMismatch:
                    pass
            assert len(signatures) >= 3
            for data, signature in signatures:
                verifier.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            assert calls["hsm-a"] >= 1 and calls["hsm-b"] >= 4
            # Three bad answers in a row took hsm-a out of the healthy group, as impaired calls.
            assert ("logged_in", "impaired", "degraded") in [
                (r.source, r.event, r.dest) for r in recorder.records if r.member == "hsm-a"]
    finally:
        relay_a.stop()
        relay_b.stop()


_STRIP_PUBLIC_OBJECTS = r"""
import datetime, sys, pkcs11
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, CertificateType, ObjectClass
module, label, pin, ec_der = sys.argv[1:5]
lib = pkcs11.lib(module)
with lib.get_token(token_label=label).open(rw=True, user_pin=pin) as s:
    for key_label in ("rsa", "ec"):
        for obj in list(s.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: key_label})):
            obj.destroy()
    private = list(s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: "ec"}))[0]
    private[Attribute.ID] = b"\x42"
    issuer = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ec")])
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(serialization.load_der_public_key(open(ec_der, "rb").read())).serial_number(7)
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=1)).sign(issuer, hashes.SHA256()))
    s.create_object({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
                     Attribute.VALUE: cert.public_bytes(serialization.Encoding.DER), Attribute.ID: b"\x42",
                     Attribute.SUBJECT: name.public_bytes(), Attribute.LABEL: "ec", Attribute.TOKEN: True})
"""


def test_a_public_key_is_read_from_the_private_key_or_a_certificate(client_module, pin_env, fast_policy, token,
                                                                     softhsm_module, tmp_path: Path) -> None:
    """A token without public key objects: the RSA key's modulus and exponent come from the private key
    object, the EC key's public half from the certificate with its CKA_ID."""
    import subprocess

    from hsmfsm import SlotConnection

    replica = token.replicate(tmp_path / "bare")
    subprocess.run([sys.executable, "-c", _STRIP_PUBLIC_OBJECTS, softhsm_module, token.label, token.pin,
                    str(replica.root / "ec.pub.der")], env={**os.environ, **replica.env}, check=True, timeout=60)
    hsm = NetworkHSM(replica, tmp_path / "bare.sock").start()
    try:
        conn = SlotConnection(module=client_module, token_label=token.label, pin=pin_env, policy=fast_policy(),
                              name="bare", env=hsm.client_env)
        with conn:
            assert der(conn.public_key("rsa")) == der(public(token, "rsa"))
            assert der(conn.public_key(key_id=b"\x42")) == der(public(token, "ec"))
            key = conn.private_key(uri="pkcs11:token=x;id=%42;type=private", verify=True)
            public(token, "ec").verify(key.sign(b"data", ec.ECDSA(hashes.SHA256())), b"data",
                                       ec.ECDSA(hashes.SHA256()))
    finally:
        hsm.kill()
