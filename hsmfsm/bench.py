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
from pathlib import Path
from typing import Callable, TextIO

import pkcs11

from .connection import SlotConnection
from .lab import NetworkHSM, SoftHSMToken, find_module
from .policy_loader import load_policy

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


def _raw_session(token: SoftHSMToken, hsm: NetworkHSM, workdir: Path):
    """A plain python-pkcs11 session on its own client instance (own socket to the server)."""
    link = workdir / "raw-client.so"
    link.symlink_to(find_module("p11-kit-client"))
    saved = os.environ.get("P11_KIT_SERVER_ADDRESS")
    os.environ["P11_KIT_SERVER_ADDRESS"] = hsm.address
    try:
        lib = pkcs11.lib(str(link))
    finally:
        if saved is None:
            os.environ.pop("P11_KIT_SERVER_ADDRESS", None)
        else:
            os.environ["P11_KIT_SERVER_ADDRESS"] = saved
    return lib.get_token(token_label=token.label).open(user_pin=token.pin)


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
            session = _raw_session(token, hsm, workdir)
            conn = SlotConnection(find_module("p11-kit-client"), token.label, "env:HSMFSM_BENCH_PIN",
                                  load_policy("network-hsm"), name="bench", env=hsm.client_env)
            with conn:
                cases = {
                    "RSA-2048 SHA256_RSA_PKCS": ("rsa", _DATA, pkcs11.Mechanism.SHA256_RSA_PKCS),
                    "ECDSA P-256 (prehashed)": ("ec", _DIGEST, pkcs11.Mechanism.ECDSA),
                }
                print(f"hsmfsm bench: {rounds} alternating rounds of {seconds:g}s, one thread, "
                      f"SoftHSM behind p11-kit server", file=out)
                print(f"{'case':28} {'raw ops/s':>10} {'managed ops/s':>14} {'managed/raw':>12}", file=out)
                for case, (label, data, mech) in cases.items():
                    key = session.get_key(label=label, object_class=pkcs11.ObjectClass.PRIVATE_KEY)
                    raw = lambda: key.sign(data, mechanism=mech)  # noqa: E731
                    managed = lambda: conn.sign(label, data, mechanism=mech)  # noqa: E731
                    raw(), managed()  # warm up: key lookups, sessions
                    raws, mans, ratios = [], [], []
                    for r in range(rounds):
                        first, second = (raw, managed) if r % 2 == 0 else (managed, raw)
                        a, b = _rate(first, seconds), _rate(second, seconds)
                        rr, mm = (a, b) if r % 2 == 0 else (b, a)
                        raws.append(rr), mans.append(mm), ratios.append(mm / rr)
                    fig = {"raw": statistics.median(raws), "managed": statistics.median(mans),
                           "ratio": statistics.median(ratios)}
                    results[case] = fig
                    print(f"{case:28} {fig['raw']:10.0f} {fig['managed']:14.0f} {fig['ratio']:12.3f}", file=out)
        finally:
            hsm.kill()
    return results
