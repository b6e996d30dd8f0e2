"""Real signers, unchanged, on pool keys; verifiers nobody here wrote check the result.

Two network HSMs (SoftHSM replicas behind their own ``p11-kit server``) form a
pool; ``pool.private_key(label)`` is handed to cryptography's X.509 builders,
dnspython's zone signing and PyJWT exactly as a software key would be, and
``openssl``, ``ldns-verify-zone`` and PyJWT's own verification judge what they
made. One run kills and restarts a member in the middle of signing a zone.
"""

from __future__ import annotations

import datetime
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from test_pool import make_pool, two

NOW = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)


@pytest.fixture
def pool(client_module, pin_env, fast_policy, hsms):
    with make_pool(client_module, pin_env, fast_policy(), two(hsms)) as p:
        yield p


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=60)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def test_a_ca_issues_a_self_signed_rsa_certificate_and_an_ec_csr_that_openssl_accepts(pool, tmp_path) -> None:
    ca_key = pool.private_key("rsa")
    assert isinstance(ca_key, rsa.RSAPrivateKey) and ca_key.key_size == 2048
    cert = (x509.CertificateBuilder().subject_name(_name("hsmfsm test CA")).issuer_name(_name("hsmfsm test CA"))
            .public_key(ca_key.public_key()).serial_number(1)
            .not_valid_before(NOW).not_valid_after(NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    (tmp_path / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    done = _run("openssl", "verify", "-no_check_time", "-CAfile", "ca.pem", "ca.pem", cwd=tmp_path)
    assert done.returncode == 0 and "ca.pem: OK" in done.stdout, done.stdout + done.stderr
    # The public key the pool read from the token is the token's own.
    assert ca_key.public_key().public_numbers() == pool.public_key("rsa").public_numbers()

    ec_key = pool.private_key("ec")
    assert isinstance(ec_key, ec.EllipticCurvePrivateKey) and ec_key.curve.name == "secp256r1"
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name("signer.example")).sign(ec_key, hashes.SHA256())
    (tmp_path / "req.pem").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    done = _run("openssl", "req", "-verify", "-noout", "-in", "req.pem", cwd=tmp_path)
    assert done.returncode == 0 and "verify OK" in (done.stdout + done.stderr), done.stdout + done.stderr
    # A leaf signed by the CA key, for the EC key: a chain openssl checks end to end.
    leaf = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(cert.subject)
            .public_key(csr.public_key()).serial_number(2)
            .not_valid_before(NOW).not_valid_after(NOW + datetime.timedelta(days=7)).sign(ca_key, hashes.SHA256()))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    done = _run("openssl", "verify", "-no_check_time", "-CAfile", "ca.pem", "leaf.pem", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


ZONE = """$ORIGIN example.test.
$TTL 300
@   IN SOA ns1 hostmaster 2026120101 3600 900 604800 300
@   IN NS  ns1
ns1 IN A   192.0.2.1
www IN A   192.0.2.10
www IN AAAA 2001:db8::10
mail IN MX 10 www
"""


@pytest.mark.skipif(shutil.which("ldns-verify-zone") is None, reason="needs ldns-verify-zone (ldnsutils)")
def test_dnspython_signs_a_zone_through_a_member_restart_and_ldns_verifies_it(pool, hsms, tmp_path) -> None:
    pytest.importorskip("dns.zone")
    import dns.dnssec
    import dns.rdatatype
    from dns.dnssectypes import Algorithm

    ksk, zsk = pool.private_key("rsa"), pool.private_key("ec")
    keys = [(ksk, dns.dnssec.make_dnskey(ksk.public_key(), Algorithm.RSASHA256, flags=257)),
            (zsk, dns.dnssec.make_dnskey(zsk.public_key(), Algorithm.ECDSAP256SHA256, flags=256))]
    a = hsms[0]
    # hsm-a dies while the zone is being signed and comes back before it is done.
    signed_rrsets = [0]
    original = zsk.sign

    def sign_and_disturb(*args, **kwargs):
        signed_rrsets[0] += 1
        if signed_rrsets[0] == 2:
            a.kill()
        if signed_rrsets[0] == 5:
            a.start()
        return original(*args, **kwargs)

    zsk.sign = sign_and_disturb  # type: ignore[method-assign]
    records: list = []
    pool.add_listener(records.append)
    zone = dns.zone.from_text(ZONE, origin="example.test.", relativize=False)
    inception = NOW - datetime.timedelta(days=1)
    dns.dnssec.sign_zone(zone, keys=keys, inception=inception, expiration=inception + datetime.timedelta(days=365),
                         lifetime=None, deterministic=False)
    assert signed_rrsets[0] >= 6
    # The outage happened under the signing, and the pool hid it: hsm-a was lost, nothing failed.
    assert ("hsm-a", "connection_lost") in [(r.member, r.event) for r in records], records
    text = zone.to_text(relativize=False)
    (tmp_path / "example.test.zone").write_text(text)
    done = _run("ldns-verify-zone", "-t", "20261201000000", "example.test.zone", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is verified" in (done.stdout + done.stderr).lower() or "verified" in done.stdout, done.stdout
    assert zone.get_rdataset("www.example.test.", dns.rdatatype.RRSIG, covers=dns.rdatatype.A) is not None


def test_pyjwt_rs256_ps256_and_es256_tokens_verify_with_the_pools_public_keys(pool) -> None:
    jwt = pytest.importorskip("jwt")
    claims = {"sub": "signer", "iat": 1764547200}
    for algorithm, label in (("RS256", "rsa"), ("PS256", "rsa"), ("ES256", "ec")):
        token = jwt.encode(claims, pool.private_key(label), algorithm=algorithm)
        public = pool.public_key(label)
        assert jwt.decode(token, public, algorithms=[algorithm]) == claims, algorithm
        with pytest.raises(jwt.InvalidSignatureError):
            jwt.decode(token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"), public,
                       algorithms=[algorithm])


def test_many_threads_sign_with_one_key_object(pool) -> None:
    key = pool.private_key("ec", verify=True)
    public = pool.public_key("ec")
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for n in range(25):
                data = b"%d-%d" % (i, n)
                public.verify(key.sign(data, ec.ECDSA(hashes.SHA256())), data, ec.ECDSA(hashes.SHA256()))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
