"""Fixtures: real SoftHSM tokens and network HSMs (SoftHSM behind p11-kit server).

Every server is started by the test that needs it, in a temporary directory,
and stopped by PID (process group) in a finaliser.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils
from hsmfsm.testing.lab import NetworkHSM, SoftHSMToken, find_module
from hypothesis import settings

PIN_ENV = "HSMFSM_TEST_PIN"

# `make test` must not fail by chance: hypothesis runs derandomized there (the same
# examples every run, no example database), and the deep random search runs behind
# `make fuzz` (HYPOTHESIS_PROFILE=fuzz). A failing example found by the fuzz is kept
# as an explicit @example next to its test.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("fuzz", derandomize=False, max_examples=5000, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: Fixtures that start real parts (SoftHSM, p11-kit server): a test using one is marked
#: ``hsm``, so ``pytest -m "not hsm"`` runs the fast layer alone.
_REAL_FIXTURES = frozenset({"token", "network_hsm", "hsms", "client_module", "softhsm_module", "pin_env"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _REAL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.hsm)


@pytest.fixture(scope="session")
def token(tmp_path_factory: pytest.TempPathFactory) -> SoftHSMToken:
    """One provisioned token per test run (RSA key ``rsa``, EC key ``ec``); tests serve copies of it."""
    return SoftHSMToken(tmp_path_factory.mktemp("token") / "master", label="hsmfsm-test").provision()


@pytest.fixture
def pin_env(token: SoftHSMToken, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(PIN_ENV, token.pin)
    return f"env:{PIN_ENV}"


@pytest.fixture
def network_hsm(token: SoftHSMToken, tmp_path: Path) -> Iterator[NetworkHSM]:
    """A network HSM of our own: a replica of the token behind `p11-kit server` on a unix socket."""
    hsm = NetworkHSM(token.replicate(tmp_path / "replica"), tmp_path / "hsm.sock")
    try:
        yield hsm
    finally:
        hsm.kill()


@pytest.fixture
def hsms(token: SoftHSMToken, tmp_path: Path) -> Iterator[tuple[NetworkHSM, NetworkHSM]]:
    """Two network HSMs for a pool: replicas of the token, each behind its own `p11-kit server`."""
    a = NetworkHSM(token.replicate(tmp_path / "a"), tmp_path / "a.sock").start()
    b = NetworkHSM(token.replicate(tmp_path / "b"), tmp_path / "b.sock").start()
    try:
        yield a, b
    finally:
        a.kill()
        b.kill()


@pytest.fixture(scope="session")
def client_module() -> str:
    return find_module("p11-kit-client")


@pytest.fixture(scope="session")
def softhsm_module() -> str:
    return find_module("softhsm")


@pytest.fixture
def fast_policy():
    """The shipped network-hsm policy with timings shortened so the suite stays quick."""
    from hsmfsm import load_policy

    def make(**ops: float) -> object:
        p = load_policy("network-hsm")
        return dataclasses.replace(
            p,
            operations=dataclasses.replace(p.operations, call_timeout=ops.get("call_timeout", 1.0),
                                           deadline=ops.get("deadline", 6.0)),
            probe=dataclasses.replace(p.probe, interval=ops.get("probe_interval", 0.2)),
            connect=dataclasses.replace(p.connect, backoff=dataclasses.replace(
                p.connect.backoff, initial=0.05, max=ops.get("backoff_max", 0.4))),
        )
    return make


def verify(token: SoftHSMToken, key_label: str, data: bytes, signature: bytes) -> None:
    """Raise unless ``signature`` verifies with the token's public key (outside any HSM)."""
    public = serialization.load_der_public_key(token.public_key_der(key_label))
    if isinstance(public, ec.EllipticCurvePublicKey):
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:], "big")
        public.verify(utils.encode_dss_signature(r, s), hashlib.sha256(data).digest(),
                      ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    else:
        public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())


def sign_ec(conn, data: bytes) -> bytes:
    """ECDSA P-256 over SHA-256: Debian's SoftHSM lacks CKM_ECDSA_SHA256, so hash here."""
    return conn.sign("ec", hashlib.sha256(data).digest(), mechanism="ECDSA")


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


class Recorder:
    """A transition listener that keeps every record."""

    def __init__(self) -> None:
        self.records: list = []

    def __call__(self, record) -> None:
        self.records.append(record)

    def events(self) -> list[tuple[str, str, str]]:
        return [(r.source, r.event, r.dest) for r in self.records]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


__all__ = ["PIN_ENV", "Recorder", "sign_ec", "verify", "wait_for", "os"]
