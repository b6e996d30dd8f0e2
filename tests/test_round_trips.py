"""A signature costs two round trips on the wire (C_SignInit, C_Sign), counted by a relay between
p11-kit-client and the p11-kit server: the signature's length is known from the key, so hsmfsm
never asks for it first as python-pkcs11 does."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, utils
from hsmfsm.core.mechanisms import PSSParams
from hsmfsm.p11.raw import mechanism, raw_private_key, raw_session
from hsmfsm.testing.lab import Relay
from hsmfsm.testing.lab.hsm import load_raw_client

from conftest import verify
from test_pool import make_pool

pytestmark = pytest.mark.timeout(120)

DIGEST = hashlib.sha256(b"payload").digest()


def wire(relays: list[Relay], call: str) -> int:
    return sum(r.calls_seen(call) for r in relays)


def test_100_signatures_cost_100_sign_inits_and_100_signs_on_the_wire(client_module, hsms, pin_env, fast_policy,
                                                                      tmp_path) -> None:
    a, b = hsms
    relays = [Relay(tmp_path / "ra.sock", a.socket_path).start(), Relay(tmp_path / "rb.sock", b.socket_path).start()]
    try:
        members = [("hsm-a", a, relays[0].address), ("hsm-b", b, relays[1].address)]
        with make_pool(client_module, pin_env, fast_policy(), members) as pool:
            for label, data in (("ec", DIGEST), ("rsa", b"payload")):  # the key lookups, on both members
                for _ in range(2):
                    pool.sign(label, data, "ECDSA" if label == "ec" else "SHA256_RSA_PKCS")
            inits, signs = wire(relays, "C_SignInit"), wire(relays, "C_Sign")
            sigs = [pool.sign("ec", DIGEST, "ECDSA") for _ in range(100)]
            assert (wire(relays, "C_SignInit") - inits, wire(relays, "C_Sign") - signs) == (100, 100)
            for sig in sigs[:5]:
                verify(a.token, "ec", b"payload", sig)
            # RSA, and RSA-PSS with its parameters: two requests each too, and the signatures verify.
            inits, signs = wire(relays, "C_SignInit"), wire(relays, "C_Sign")
            sig = pool.sign("rsa", b"payload", "SHA256_RSA_PKCS")
            pss = pool.sign("rsa", DIGEST, "RSA_PKCS_PSS", PSSParams("SHA256", "SHA256", 32))
            assert (wire(relays, "C_SignInit") - inits, wire(relays, "C_Sign") - signs) == (2, 2)
            verify(a.token, "rsa", b"payload", sig)
            public = serialization.load_der_public_key(a.token.public_key_der("rsa"))
            public.verify(pss, DIGEST, padding.PSS(padding.MGF1(hashes.SHA256()), 32),  # type: ignore[union-attr]
                          utils.Prehashed(hashes.SHA256()))
            # RSA decryption: the plaintext into a buffer of the modulus length, one C_Decrypt.
            ciphertext = public.encrypt(b"secret", padding.OAEP(padding.MGF1(hashes.SHA1()),  # type: ignore[union-attr]
                                                                hashes.SHA1(), None))
            pool.decrypt("rsa", ciphertext, "RSA_PKCS_OAEP")  # the key lookup
            decrypts = wire(relays, "C_Decrypt")
            assert pool.decrypt("rsa", ciphertext, "RSA_PKCS_OAEP") == b"secret"
            assert wire(relays, "C_Decrypt") - decrypts == 1
    finally:
        for relay in relays:
            relay.stop()


def test_python_pkcs11_itself_takes_three(network_hsm, tmp_path) -> None:
    """The baseline the two are measured against: python-pkcs11 asks the length of every signature."""
    network_hsm.start()
    relay = Relay(tmp_path / "r.sock", network_hsm.socket_path).start()
    try:
        session = raw_session(load_raw_client(relay.address, "raw-trips"), network_hsm.token.label,
                              network_hsm.token.pin)
        key = raw_private_key(session, "ec")
        key.sign(DIGEST, mechanism=mechanism("ECDSA"))
        inits, signs = relay.calls_seen("C_SignInit"), relay.calls_seen("C_Sign")
        for _ in range(10):
            key.sign(DIGEST, mechanism=mechanism("ECDSA"))
        assert (relay.calls_seen("C_SignInit") - inits, relay.calls_seen("C_Sign") - signs) == (10, 20)
    finally:
        relay.stop()
