"""``hsmfsm demo``: a signer that survives its network HSM dying, hanging and idling.

It provisions a SoftHSM token behind `p11-kit server` in a temporary
directory, signs in a loop on one thread (verifying every signature with the
public key), and plays a script against the HSM: kill and restart it while
signing, hang it, and kill and restart it while nobody signs (the probe alone
brings the connection back). Every transition is printed as it happens.
Nothing in the program is restarted; every process it starts is stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TextIO

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from .connection import SlotConnection
from .errors import HSMError
from .lab import NetworkHSM, SoftHSMToken, find_module
from .policy_loader import load_policy
from .records import TransitionRecord

#: (seconds after start, action, description)
SCRIPT = [
    (1.0, "kill", "the HSM dies while signing"),
    (1.6, "start", "the HSM comes back"),
    (3.0, "hang", "the HSM hangs (SIGSTOP): calls are cut off at the call timeout"),
    (5.5, "resume", "the HSM resumes (SIGCONT)"),
    (7.0, "pause", "the application stops signing: the connection is idle"),
    (7.3, "kill", "the HSM dies while nobody is calling"),
    (8.0, "start", "the HSM comes back; the probe alone must bring the connection back"),
    (9.5, "unpause", "the application signs again"),
    (11.0, "end", "done"),
]


class _Signer(threading.Thread):
    def __init__(self, conn: SlotConnection, verify_key: ec.EllipticCurvePublicKey) -> None:
        super().__init__(name="demo-signer", daemon=True)
        self.conn, self.key = conn, verify_key
        self.ok = self.failed = self.bad = 0
        self.errors: list[str] = []
        self.paused = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            if self.paused.is_set():
                time.sleep(0.01)
                continue
            data = f"record {n}".encode()
            n += 1
            digest = hashlib.sha256(data).digest()
            try:
                sig = self.conn.sign("ec", digest, mechanism="ECDSA")
            except HSMError as exc:
                self.failed += 1
                self.errors.append(str(exc))
                continue
            r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
            try:
                self.key.verify(utils.encode_dss_signature(r, s), digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
                self.ok += 1
            except Exception:  # noqa: BLE001 - counted: a wrong signature is the worst outcome
                self.bad += 1


def run(out: TextIO | None = None, speed: float = 1.0) -> int:
    """Play the script; ``speed`` < 1 shortens it (the tests use that). Returns an exit code."""
    out = out or sys.stdout
    t0 = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - t0:6.2f}s] {text}", file=out, flush=True)

    def on_transition(rec: TransitionRecord) -> None:
        code = f"  {rec.code_name}" if rec.code_name else ""
        say(f"    {rec.member}: {rec.source:>12} -> {rec.dest:<12} on {rec.event}{code}")

    with tempfile.TemporaryDirectory(prefix="hsmfsm-demo-") as tmp:
        say(f"provisioning a SoftHSM token in {tmp}")
        token = SoftHSMToken(Path(tmp) / "token", label="demo-signer").provision()
        hsm = NetworkHSM(token, Path(tmp) / "hsm.sock").start()
        say(f"network HSM: p11-kit server pid {hsm.pid} on {hsm.socket_path}")
        os.environ["HSMFSM_DEMO_PIN"] = token.pin
        policy = load_policy("network-hsm")
        policy = dataclasses.replace(policy, operations=dataclasses.replace(policy.operations, call_timeout=1.0))
        conn = SlotConnection(find_module("p11-kit-client"), token.label, "env:HSMFSM_DEMO_PIN", policy,
                              name="hsm-a", env=hsm.client_env)
        conn.add_listener(on_transition)
        public = serialization.load_der_public_key(token.public_key_der("ec"))
        signer = _Signer(conn, public)  # type: ignore[arg-type]
        try:
            with conn:
                signer.start()
                for at, action, text in SCRIPT:
                    time.sleep(max(0.0, t0 + at * speed - time.monotonic()))
                    say(f"{action.upper():8} {text}  (signatures so far: {signer.ok}, failed calls: {signer.failed})")
                    if action == "kill":
                        hsm.kill()
                    elif action == "start":
                        hsm.start()
                    elif action == "hang":
                        hsm.hang()
                    elif action == "resume":
                        hsm.resume()
                    elif action == "pause":
                        signer.paused.set()
                    elif action == "unpause":
                        say(f"state before signing again: {conn.state} (recovered with no call made)")
                        signer.paused.clear()
                signer.stop.set()
                signer.join(5)
                final_state = conn.state
        finally:
            signer.stop.set()
            hsm.kill()
        say("summary:")
        print(f"  signatures made and verified : {signer.ok}", file=out)
        print(f"  wrong signatures             : {signer.bad}", file=out)
        print(f"  failed calls                 : {signer.failed}"
              + ("  (calls cut off while the HSM hung; an HA pool hides these)" if signer.failed else ""), file=out)
        for err in sorted(set(signer.errors))[:5]:
            print(f"      {err}", file=out)
        print(f"  final state                  : {final_state}", file=out)
        print("  program restarts             : 0", file=out)
    return 0 if signer.bad == 0 and signer.ok > 0 and final_state == "logged_in" else 1
