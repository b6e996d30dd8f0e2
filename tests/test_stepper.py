"""The stepper: a real PKCS#11 application, driven one C call at a time, over p11-kit-client.

These tests prove the instrument before other tests lean on it: the ctypes declarations are
right (a signature made call by call verifies outside any HSM), a wrong PIN is reported as the
module's rv, a call into a hung HSM blocks only the child (the parent times out and collects the
answer later), and a bad command is answered, not fatal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from cryptography.hazmat.primitives.serialization import load_der_public_key
from hsmfsm.testing.lab import NetworkHSM, SoftHSMToken
from hsmfsm.testing.lab.stepper import Stepper, StepperError, StepperTimeout

from conftest import verify

pytestmark = pytest.mark.timeout(60)

CKO_PRIVATE_KEY = 3
CKM_SHA256_RSA_PKCS = 0x40
CKM_RSA_PKCS_PSS = 0x0D
CKM_ECDSA = 0x1041
CKM_SHA256 = 0x250
CKG_MGF1_SHA256 = 0x2
CKA_MODULUS = 0x120
CKA_PRIVATE_EXPONENT = 0x123
CKS_RW_USER_FUNCTIONS = 3
DATA = b"stepper: one call at a time"


@pytest.fixture
def stepper(network_hsm: NetworkHSM, client_module: str) -> Iterator[Stepper]:
    network_hsm.start()
    with Stepper(client_module, network_hsm.client_env) as s:
        yield s


def ok(answer: dict[str, object]) -> dict[str, object]:
    assert answer.get("rv_name") == "CKR_OK", answer
    return answer


def open_session(s: Stepper, token: SoftHSMToken, login: bool = True) -> int:
    """initialize, slots, token, open (and login): the application's opening moves."""
    ok(s.do("initialize"))
    slots = ok(s.do("slots"))["slots"]
    assert isinstance(slots, list) and len(slots) == 1
    assert ok(s.do("token", slot=slots[0]))["label"] == token.label
    session = ok(s.do("open", slot=slots[0], rw=True))["session"]
    assert isinstance(session, int)
    if login:
        ok(s.do("login", session=session, pin=token.pin, user=1))
    return session


def find_key(s: Stepper, session: int, label: str) -> int:
    handles = ok(s.do("find", session=session, template={"class": CKO_PRIVATE_KEY, "label": label}))["handles"]
    assert isinstance(handles, list) and len(handles) == 1, handles
    return int(handles[0])


def test_sign_call_by_call_makes_a_signature_that_verifies_outside_the_hsm(stepper: Stepper,
                                                                           token: SoftHSMToken) -> None:
    s = stepper
    session = open_session(s, token)
    assert ok(s.do("info"))["manufacturer"] == "PKCS#11 Kit"
    assert ok(s.do("session_info", session=session))["state"] == CKS_RW_USER_FUNCTIONS
    key = find_key(s, session, "rsa")

    ok(s.do("sign_init", session=session, mechanism=CKM_SHA256_RSA_PKCS, key=key))
    query = ok(s.do("sign", session=session, data=DATA.hex(), length=None))
    assert query["length"] == 256 and "signature" not in query
    assert [c["fn"] for c in query["calls"]] == ["C_Sign"]  # type: ignore[union-attr]
    # A buffer too small keeps the operation active (PKCS#11 2.40 §5.2): the module says how much.
    short = s.do("sign", session=session, data=DATA.hex(), length=16)
    assert (short["rv_name"], short["length"]) == ("CKR_BUFFER_TOO_SMALL", 256)
    real = ok(s.do("sign", session=session, data=DATA.hex(), length=256))
    assert real["length"] == 256
    signature = bytes.fromhex(str(real["signature"]))
    public = load_der_public_key(token.public_key_der("rsa"))
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(signature, DATA, padding.PKCS1v15(), hashes.SHA256())

    # The operation ended with that C_Sign: another sign without an init is the module's error.
    assert s.do("sign", session=session, data=DATA.hex(), length=256)["rv_name"] == "CKR_OPERATION_NOT_INITIALIZED"

    # PSS passes CK_RSA_PKCS_PSS_PARAMS through the mechanism parameter. Over p11-kit 0.24's RPC
    # only CKM_RSA_PKCS_PSS (over a digest) gets through: SHA256_RSA_PKCS_PSS is CKR_MECHANISM_INVALID.
    digest = hashlib.sha256(DATA).digest()
    ok(s.do("sign_init", session=session, mechanism=CKM_RSA_PKCS_PSS, key=key, pss=[CKM_SHA256, CKG_MGF1_SHA256, 32]))
    pss = bytes.fromhex(str(ok(s.do("sign", session=session, data=digest.hex(), length=256))["signature"]))
    public.verify(pss, digest, padding.PSS(padding.MGF1(hashes.SHA256()), 32), utils.Prehashed(hashes.SHA256()))

    # Multi-part, and EC (CKM_ECDSA over a digest: Debian's SoftHSM lacks CKM_ECDSA_SHA256).
    ok(s.do("sign_init", session=session, mechanism=CKM_SHA256_RSA_PKCS, key=key))
    ok(s.do("sign_update", session=session, data=DATA[:5].hex()))
    ok(s.do("sign_update", session=session, data=DATA[5:].hex()))
    verify(token, "rsa", DATA, bytes.fromhex(str(ok(s.do("sign_final", session=session, length=256))["signature"])))
    ec_key = find_key(s, session, "ec")
    ok(s.do("sign_init", session=session, mechanism=CKM_ECDSA, key=ec_key))
    raw = ok(s.do("sign", session=session, data=digest.hex(), length=64))
    verify(token, "ec", DATA, bytes.fromhex(str(raw["signature"])))

    # Attributes: the modulus is public; the private exponent is the module's to refuse.
    assert ok(s.do("attribute", session=session, object=key, type=CKA_MODULUS))["length"] == 256
    sensitive = s.do("attribute", session=session, object=key, type=CKA_PRIVATE_EXPONENT)
    assert sensitive["rv_name"] == "CKR_ATTRIBUTE_SENSITIVE" and "value" not in sensitive
    assert len(bytes.fromhex(str(ok(s.do("random", session=session, length=32))["data"]))) == 32
    assert CKM_SHA256_RSA_PKCS in ok(s.do("mechanisms", slot=ok(s.do("slots"))["slots"][0]))["mechanisms"]  # type: ignore[index]

    ok(s.do("logout", session=session))
    ok(s.do("close", session=session))
    ok(s.do("finalize"))


def test_a_wrong_pin_is_one_c_login_answering_pin_incorrect(stepper: Stepper, token: SoftHSMToken) -> None:
    session = open_session(stepper, token, login=False)
    wrong = stepper.do("login", session=session, pin="0000" if token.pin != "0000" else "9999")
    assert wrong["rv_name"] == "CKR_PIN_INCORRECT"
    assert [(c["fn"], c["rv_name"]) for c in wrong["calls"]] == [("C_Login", "CKR_PIN_INCORRECT")]  # type: ignore[union-attr]
    ok(stepper.do("login", session=session, pin=token.pin))  # the session survives the wrong PIN
    assert token.pin not in stepper.stderr


def test_a_call_into_a_hung_hsm_blocks_the_child_and_its_answer_comes_after_resume(
        stepper: Stepper, network_hsm: NetworkHSM, token: SoftHSMToken) -> None:
    s = stepper
    session = open_session(s, token)
    key = find_key(s, session, "rsa")
    ok(s.do("sign_init", session=session, mechanism=CKM_SHA256_RSA_PKCS, key=key))
    network_hsm.hang()
    try:
        s.send("sign", session=session, data=DATA.hex(), length=256)
        with pytest.raises(StepperTimeout, match="'sign'"):
            s.answer(timeout=0.5)
        assert s.pending == ["sign"]
        with pytest.raises(StepperError, match="owed"):  # do() would read the sign's late answer
            s.do("info")
    finally:
        network_hsm.resume()
    late = ok(s.answer(timeout=10.0))
    assert late["seconds"] >= 0.5  # type: ignore[operator]
    verify(token, "rsa", DATA, bytes.fromhex(str(late["signature"])))
    assert ok(s.do("info"))["description"]


def test_unknown_op_and_bad_arguments_are_answered_and_the_process_goes_on(stepper: Stepper) -> None:
    s = stepper
    assert "unknown op" in s.do("frobnicate")["error"]  # type: ignore[operator]
    assert "error" in s.do("open")  # no slot
    assert "error" in s.do("sign", session=1, data="not hex", length=None)
    bad_pin = s.do("login", session=1, pin=["123456"])
    assert "error" in bad_pin and "123456" not in str(bad_pin)
    assert "rv" not in s.do("find", session=1, template={"colour": 1})
    answer = s.do("info")  # still alive; not initialised yet
    assert answer["rv_name"] == "CKR_CRYPTOKI_NOT_INITIALIZED"
    slept = s.do("sleep", seconds=0.05)
    assert slept["rv"] == 0 and slept["seconds"] >= 0.05  # type: ignore[operator]
    pid = s.pid
    s.close()
    with pytest.raises(StepperError):
        s.send("info")
    assert pid > 0
