"""``hsmfsm bench``: what the managed path costs, as a ratio against raw python-pkcs11.

Both run in one process, on the same token behind the same `p11-kit server`,
in alternating short rounds, so that the noise of a shared machine hits both
alike; the figure reported is the median of the per-round ratios.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TextIO

from ..config.policy_file import load_policy
from ..p11.raw import mechanism, raw_private_key, raw_session
from ..runtime.connection import SlotConnection
from ..testing.lab import NetworkHSM, SoftHSMToken, find_module
from ..testing.lab.hsm import load_raw_client

_DATA = b"hsmfsm benchmark payload" * 4
_DIGEST = hashlib.sha256(_DATA).digest()


def _rate(fn: Callable[[], object], seconds: float) -> float:
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            fn()
        n += 20
    return n / seconds


def _raw_session(token: SoftHSMToken, hsm: NetworkHSM) -> Any:
    """A plain python-pkcs11 session on its own client instance (own socket to the server).

    ``Any``: python-pkcs11 ships no type information.
    """
    return raw_session(load_raw_client(hsm.address, "bench-raw"), token.label, token.pin)


_CASES = {
    "RSA-2048 SHA256_RSA_PKCS": ("rsa", _DATA, mechanism("SHA256_RSA_PKCS")),
    "ECDSA P-256 (prehashed)": ("ec", _DIGEST, mechanism("ECDSA")),
}


def _alternate(raw: Callable[[], float], managed: Callable[[], float], rounds: int) -> dict[str, float]:
    """Alternate which side goes first, so drift on a noisy machine hits both alike."""
    raws, mans, ratios = [], [], []
    for r in range(rounds):
        if r % 2 == 0:
            rr, mm = raw(), managed()
        else:
            mm, rr = managed(), raw()
        raws.append(rr)
        mans.append(mm)
        ratios.append(mm / rr)
    return {"raw": statistics.median(raws), "managed": statistics.median(mans), "ratio": statistics.median(ratios)}


def _row(case: str, fig: dict[str, float], out: TextIO) -> None:
    print(f"{case:28} {fig['raw']:10.0f} {fig['managed']:14.0f} {fig['ratio']:12.3f}", file=out)


_WORKER = r"""
import os, sys, time, pkcs11
from hsmfsm.tools.bench import _CASES, _rate
from hsmfsm.testing.lab import find_module
kind, case, seconds, label, pin = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5]
key_label, data, mech = _CASES[case]
if kind == "raw":
    s = pkcs11.lib(find_module("softhsm")).get_token(token_label=label).open(user_pin=pin)
    key = s.get_key(label=key_label, object_class=pkcs11.ObjectClass.PRIVATE_KEY)
    fn = lambda: key.sign(data, mechanism=mech)
else:
    from hsmfsm import SlotConnection, load_policy
    conn = SlotConnection(find_module("softhsm"), label, lambda: pin, load_policy("default"), name="bench",
                          env={"SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"]},
                          isolation="process" if kind == "isolated" else "none").open()
    fn = lambda: conn.sign(key_label, data, mechanism=mech)
fn()
print(_rate(fn, seconds))
"""


_CLIENT_WORKER = r"""
import os, sys, time, pkcs11
module, label, pin, key_label, case, seconds = sys.argv[1:7]
from pkcs11 import Mechanism, ObjectClass
data, mech = (bytes(128), Mechanism.SHA256_RSA_PKCS) if case == "rsa" else (bytes(32), Mechanism.ECDSA)
session = pkcs11.lib(module).get_token(token_label=label).open(user_pin=pin)
key = session.get_key(label=key_label, object_class=ObjectClass.PRIVATE_KEY)
key.sign(data, mechanism=mech)
n, end = 0, time.perf_counter() + float(seconds)
while time.perf_counter() < end:
    key.sign(data, mechanism=mech)
    n += 1
print(n / float(seconds))
"""


def _serve_figures(token: SoftHSMToken, hsm: NetworkHSM, workdir: Path, rounds: int, seconds: float,
                   out: TextIO) -> dict[str, dict[str, float]]:
    """A python-pkcs11 application through ``hsmfsm serve`` (one member: this token's server) against
    the same application through ``p11-kit server`` directly, on the same token. The application
    runs in a process of its own (as in production) with the same code for both; only
    ``P11_KIT_SERVER_ADDRESS`` differs. The price is the extra hop plus the server's Python."""
    import subprocess
    import sys

    from ..runtime.pool import Pool
    from ..runtime.server import Server
    from ..runtime.vslot import SlotConfig

    client = find_module("p11-kit-client")
    policy = load_policy("network-hsm")
    members = [(SlotConnection(client, token.label, "env:HSMFSM_BENCH_PIN",
                               Pool.member_policy(policy, "background", 10.0, 6), name="hsm",
                               env=hsm.client_env, wait_for_recovery=False), False)]
    results: dict[str, dict[str, float]] = {}
    with Pool("bench", members, policy) as pool:
        server = Server(pool, SlotConfig(token_label="bench-ha", pin=lambda: token.pin),
                        workdir / "serve" / "s.sock").start()
        try:
            def worker(address: str, label: str, case: str) -> float:
                key_label = "rsa" if case == "rsa" else "ec"
                proc = subprocess.run([sys.executable, "-I", "-c", _CLIENT_WORKER, client, label, token.pin,
                                       key_label, case, str(seconds)],
                                      env={**os.environ, "P11_KIT_SERVER_ADDRESS": address},
                                      capture_output=True, text=True, timeout=60, check=True)
                return float(proc.stdout.strip().splitlines()[-1])

            print("-- an application (python-pkcs11, own process) through hsmfsm serve vs through p11-kit server",
                  file=out)
            for case, name in (("rsa", "RSA-2048 SHA256_RSA_PKCS"), ("ec", "ECDSA P-256 (prehashed)")):
                fig = _alternate(partial(worker, hsm.address, token.label, case),
                                 partial(worker, server.address, "bench-ha", case), rounds)
                results[f"serve {name}"] = fig
                _row(f"serve, {name}", fig, out)
        finally:
            server.stop()
    return results


def _in_process(token: SoftHSMToken, rounds: int, seconds: float, out: TextIO,
                managed_kind: str = "managed") -> dict[str, dict[str, float]]:
    """In-process SoftHSM is one instance per process, so each side runs in a worker process.

    ``managed_kind`` ``isolated`` runs the managed side with ``isolation: process``: the
    price of being able to cut off a hung vendor module, on a module that answers in
    microseconds (on a network HSM the round trip to the HSM dwarfs it).
    """
    import subprocess
    import sys

    env = {**os.environ, **token.env}

    def worker(kind: str, case: str) -> float:
        proc = subprocess.run([sys.executable, "-c", _WORKER, kind, case, str(seconds), token.label, token.pin],
                              env=env, capture_output=True, text=True, timeout=60, check=True)
        return float(proc.stdout.strip().splitlines()[-1])

    results = {}
    for case in _CASES:
        results[case] = fig = _alternate(partial(worker, "raw", case), partial(worker, managed_kind, case), rounds)
        _row(case, fig, out)
    return results


def _threads_rate(fn: Callable[[], object], threads: int, seconds: float) -> float:
    import threading

    counts = [0] * threads

    def work(i: int) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            fn()
            counts[i] += 1

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts) / seconds


def _pool_figures(token: SoftHSMToken, hsm: NetworkHSM, workdir: Path, rounds: int, seconds: float,
                  out: TextIO) -> dict[str, dict[str, float]]:
    """Two members (replicas behind their own servers) against one raw session on one server."""
    from ..runtime.pool import Pool

    replica = NetworkHSM(token.replicate(workdir / "replica"), workdir / "replica.sock").start()
    results: dict[str, dict[str, float]] = {}
    try:
        policy = load_policy("network-hsm")
        member_policy = Pool.member_policy(policy, "background", 10.0, 6)
        members = [(SlotConnection(find_module("p11-kit-client"), token.label, "env:HSMFSM_BENCH_PIN",
                                   member_policy, name=name, env=server.client_env, wait_for_recovery=False), False)
                   for name, server in (("hsm-a", hsm), ("hsm-b", replica))]
        session = _raw_session(token, hsm)
        label, data, mech = _CASES["ECDSA P-256 (prehashed)"]
        key = raw_private_key(session, label)
        with Pool("bench", members, policy) as pool:
            raw = partial(key.sign, data, mechanism=mech)
            managed = partial(pool.sign, label, data, mechanism=mech)
            raw(), managed()
            print("-- HA pool of two network HSMs vs one raw session on one, ECDSA P-256", file=out)
            for threads in (1, 2, 4):
                fig = _alternate(partial(_rate, raw, seconds), partial(_threads_rate, managed, threads, seconds),
                                 rounds)
                results[f"pool {threads} thread(s)"] = fig
                _row(f"pool, {threads} thread(s)", fig, out)
            results.update(_key_object_figures(pool, rounds, seconds, out))
    finally:
        replica.kill()
    return results


def _key_object_figures(pool: Any, rounds: int, seconds: float, out: TextIO) -> dict[str, dict[str, float]]:
    """``pool.private_key(label).sign`` (cryptography's call: hashed here, DigestInfo or DER added)
    against ``pool.sign`` of the same digest: what the key object costs on top of the pool."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding

    message = b"m" * 64
    digest = hashlib.sha256(message).digest()
    rsa_info = bytes.fromhex("3031300d060960864801650304020105000420")  # DigestInfo(SHA-256)
    cases: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {}
    ec_key, rsa_key = pool.private_key("ec"), pool.private_key("rsa")
    cases["ECDSA P-256"] = (partial(pool.sign, "ec", digest, "ECDSA"),
                            partial(ec_key.sign, message, ec.ECDSA(hashes.SHA256())))
    cases["RSA-2048 PKCS#1 v1.5"] = (partial(pool.sign, "rsa", rsa_info + digest, "RSA_PKCS"),
                                     partial(rsa_key.sign, message, padding.PKCS1v15(), hashes.SHA256()))
    results: dict[str, dict[str, float]] = {}
    print("-- key object (pool.private_key(...).sign, cryptography's call) vs pool.sign of the digest", file=out)
    for case, (base, key_sign) in cases.items():
        base(), key_sign()
        fig = _alternate(partial(_rate, base, seconds), partial(_rate, key_sign, seconds), rounds)
        results[f"key object {case}"] = fig
        _row(f"key object, {case}", fig, out)
    return results


def run(rounds: int = 6, seconds: float = 0.5, out: TextIO | None = None) -> dict[str, dict[str, float]]:
    """Run the benchmark and print a table; returns the figures."""
    import sys

    out = out or sys.stdout
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="hsmfsm-bench-") as tmp:
        workdir = Path(tmp)
        token = SoftHSMToken(workdir / "token", label="bench").provision()
        hsm = NetworkHSM(token, workdir / "hsm.sock").start()
        os.environ["HSMFSM_BENCH_PIN"] = token.pin
        try:
            session = _raw_session(token, hsm)
            conn = SlotConnection(find_module("p11-kit-client"), token.label, "env:HSMFSM_BENCH_PIN",
                                  load_policy("network-hsm"), name="bench", env=hsm.client_env)
            with conn:
                print(f"hsmfsm bench: median of {rounds} alternating rounds of {seconds:g}s, one thread", file=out)
                print(f"{'case':28} {'raw ops/s':>10} {'managed ops/s':>14} {'managed/raw':>12}", file=out)
                print("-- network HSM: SoftHSM behind p11-kit server, both sides in this process", file=out)
                for case, (label, data, mech) in _CASES.items():
                    key = raw_private_key(session, label)
                    raw = partial(key.sign, data, mechanism=mech)
                    managed = partial(conn.sign, label, data, mechanism=mech)
                    raw(), managed()  # warm up: key lookups, sessions
                    fig = _alternate(partial(_rate, raw, seconds), partial(_rate, managed, seconds), rounds)
                    results[f"network {case}"] = fig
                    _row(case, fig, out)
            results.update(_pool_figures(token, hsm, workdir, rounds, seconds, out))
            results.update(_serve_figures(token, hsm, workdir, rounds, seconds, out))
            print("-- in-process SoftHSM: each side in a worker process (managed runs with OS locking on)",
                  file=out)
            for case, fig in _in_process(token, rounds, seconds, out).items():
                results[f"in-process {case}"] = fig
            print("-- isolation: process (SoftHSM in a host process) vs raw in-process SoftHSM", file=out)
            for case, fig in _in_process(token, rounds, seconds, out, "isolated").items():
                results[f"isolated {case}"] = fig
        finally:
            hsm.kill()
    return results
