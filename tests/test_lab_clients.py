"""Real clients (pkcs11-tool, p11tool, the OpenSSL engine, a python-pkcs11 app) against the real
`p11-kit server`: the baseline the hsmfsm server has to reproduce, and the proof that the
harness in hsmfsm.testing.lab.clients/app drives them correctly. openssl is the judge of every
signature; nothing here verifies with our own code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hsmfsm.p11.host import live_group_members
from hsmfsm.testing.lab import LabError, NetworkHSM, SoftHSMToken
from hsmfsm.testing.lab.app import App
from hsmfsm.testing.lab.clients import (
    ClientFailed,
    ListedObject,
    list_slots,
    openssl_engine_req_x509,
    openssl_engine_sign,
    openssl_verify,
    openssl_verify_certificate,
    p11tool_test_sign,
    parse_objects,
    pkcs11_list_objects,
    pkcs11_sign,
    select_key_id,
    token_labels,
)

DATA = b"hsmfsm: real clients through p11-kit-client\n"

@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.write_bytes(DATA)
    return path


def _flipped(sig: Path) -> Path:
    """A copy of ``sig`` with its last byte changed: inside the signature value for PKCS#1 and for
    DER ECDSA alike, so openssl sees a well-formed but wrong signature."""
    raw = bytearray(sig.read_bytes())
    raw[-1] ^= 0x01
    bad = sig.with_suffix(".flipped")
    bad.write_bytes(bytes(raw))
    return bad


def _assert_openssl_accepts_only(token: SoftHSMToken, key: str, data: Path, sig: Path) -> None:
    good = openssl_verify(token.public_key_der(key), data, sig)
    assert good.ok and "Verified OK" in good.stdout, good.output
    bad = openssl_verify(token.public_key_der(key), data, _flipped(sig))
    assert bad.returncode == 1 and "Verification failure" in bad.stdout, bad.output
    other = "ec" if key == "rsa" else "rsa"
    assert not openssl_verify(token.public_key_der(other), data, sig).ok


def test_list_slots_shows_the_token(network_hsm: NetworkHSM, token: SoftHSMToken) -> None:
    network_hsm.start()
    run = list_slots(network_hsm.address).check()
    assert token_labels(run.stdout) == [token.label]


def test_list_objects_needs_the_pin_for_private_keys(network_hsm: NetworkHSM, token: SoftHSMToken) -> None:
    network_hsm.start()
    public = parse_objects(pkcs11_list_objects(network_hsm.address, token.label).check().stdout)
    assert {(o.kind, o.label) for o in public} == {("Public Key Object", "rsa"), ("Public Key Object", "ec")}
    private = parse_objects(pkcs11_list_objects(network_hsm.address, token.label, token.pin,
                                                 object_type="privkey").check().stdout)
    # A set: the listing order differs between copies of the same token, which is why pkcs11-tool's
    # "first private key" must never be relied on.
    assert {(o.label, o.key_type, o.id_hex) for o in private} == {("rsa", "RSA", "01"), ("ec", "EC", "02")}


@pytest.mark.parametrize("key, mechanism", [("rsa", "SHA256-RSA-PKCS"), ("ec", "ECDSA")])
def test_pkcs11_tool_signs_and_openssl_verifies(network_hsm: NetworkHSM, token: SoftHSMToken, data: Path,
                                                tmp_path: Path, key: str, mechanism: str) -> None:
    network_hsm.start()
    sig = tmp_path / f"{key}.sig"
    if key == "ec":  # CKM_ECDSA signs a digest; DER ("openssl") is what openssl dgst -verify reads
        digest = tmp_path / "data.sha256"
        digest.write_bytes(hashlib.sha256(DATA).digest())
        run = pkcs11_sign(network_hsm.address, token.label, token.pin, key, mechanism, digest, sig,
                          signature_format="openssl")
    else:
        run = pkcs11_sign(network_hsm.address, token.label, token.pin, key, mechanism, data, sig)
    run.check()
    assert ["--id", "01" if key == "rsa" else "02"] == list(run.argv[run.argv.index("--id"):][:2])
    _assert_openssl_accepts_only(token, key, data, sig)


@pytest.mark.parametrize("key", ["rsa", "ec"])
def test_p11tool_test_sign(network_hsm: NetworkHSM, token: SoftHSMToken, key: str) -> None:
    network_hsm.start()
    run = p11tool_test_sign(network_hsm.address, token.label, token.pin, key).check()
    # GnuTLS verified its own signature against the token's public key object.
    assert "Verifying against public key in the token... ok" in run.output, run.output


@pytest.mark.parametrize("key", ["rsa", "ec"])
def test_openssl_engine_signs_and_openssl_verifies(network_hsm: NetworkHSM, token: SoftHSMToken, data: Path,
                                                   tmp_path: Path, key: str) -> None:
    network_hsm.start()
    sig = tmp_path / f"{key}.engine.sig"
    openssl_engine_sign(network_hsm.address, token.label, token.pin, key, data, sig).check()
    _assert_openssl_accepts_only(token, key, data, sig)


@pytest.mark.parametrize("key", ["rsa", "ec"])
def test_openssl_engine_req_x509(network_hsm: NetworkHSM, token: SoftHSMToken, tmp_path: Path, key: str) -> None:
    network_hsm.start()
    cert = tmp_path / f"{key}.pem"
    openssl_engine_req_x509(network_hsm.address, token.label, token.pin, key, cert).check()
    verdict = openssl_verify_certificate(cert, token.public_key_der(key)).check()
    assert verdict.self_signature_ok and verdict.public_key_matches
    other = "ec" if key == "rsa" else "rsa"
    assert not openssl_verify_certificate(cert, token.public_key_der(other)).public_key_matches


def test_a_client_on_a_hung_server_is_killed_by_group(network_hsm: NetworkHSM) -> None:
    network_hsm.start()
    network_hsm.hang()
    try:
        run = list_slots(network_hsm.address, timeout=1.0)
    finally:
        network_hsm.resume()
    assert run.timed_out and not run.ok and 1.0 <= run.seconds < 10
    assert run.pid is not None and not live_group_members(run.pid)
    with pytest.raises(ClientFailed, match="timed out"):
        run.check()


def test_app_signs_and_verifies_in_its_own_process(network_hsm: NetworkHSM, token: SoftHSMToken,
                                                   tmp_path: Path) -> None:
    network_hsm.start()
    stop_file = tmp_path / "stop"
    with App(network_hsm.address, token.label, token.pin, "rsa", threads=2, seconds=3) as rsa_app, \
            App(network_hsm.address, token.label, token.pin, "ec", threads=2, seconds=None,
                until_file=stop_file, out=tmp_path / "ec.jsonl") as ec_app:
        rsa_app.start()
        ec_app.start()
        assert ec_app.wait_ready()["key_type"] == "ec"
        rsa = rsa_app.wait(timeout=30)
        ec = ec_app.finish(timeout=30)
    for summary, pid in ((rsa, rsa_app.pid), (ec, ec_app.pid)):
        assert summary.ok > 0, summary
        assert (summary.failed, summary.bad_signatures, summary.errors) == (0, 0, {}), summary
        assert summary.finalize_calls == 0 and summary.pid == pid and summary.returncode == 0
        assert summary.raw["stuck_threads"] == 0 and summary.raw["threads"] == 2
    assert 2.9 <= rsa.raw["seconds"] < 10
    records = (tmp_path / "ec.jsonl").read_text().splitlines()
    assert len(records) == ec.ok + 1  # one line per call, then the summary


def test_select_key_id_refuses_what_pkcs11_tool_would_get_wrong() -> None:
    """pkcs11-tool 0.23 signs with the first private key matching --id (label ignored)."""
    rsa, ec = ListedObject("Private Key Object", "RSA", "rsa", ""), ListedObject("Private Key Object", "EC", "ec", "")
    with pytest.raises(LabError, match="no CKA_ID"):
        select_key_id([rsa, ec], "ec")
    assert select_key_id([ec], "ec") == ""  # the only private key: no --id needed
    with pytest.raises(LabError, match="shared"):
        select_key_id([ListedObject("Private Key Object", "RSA", "rsa", "01"),
                       ListedObject("Private Key Object", "EC", "ec", "01")], "ec")
    with pytest.raises(LabError, match="no private key"):
        select_key_id([ListedObject("Public Key Object", "EC", "ec", "02")], "ec")
