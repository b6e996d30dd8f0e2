"""``hsmfsm demo``: a signer that signs through a two-member HA pool while its HSMs fail.

The main job, end to end, on an embedded default: it provisions a SoftHSM
token and two replicas of it, serves each behind its own ``p11-kit server``
(two network HSMs, ``hsm-a`` and ``hsm-b``), writes a pool file for them
(the same format an operator writes, with an audit record), and signs on two
threads through the pool, verifying every signature with the public key.
Meanwhile a script kills, hangs and restarts the HSMs. The caller should see
no failure at all: calls that die on one member go again to the other.

The same pool is also served as one virtual PKCS#11 slot (``hsmfsm serve``'s
server, from the pool file's ``serve:`` section), and an *unmodified*
python-pkcs11 application in a process of its own signs through the stock
``p11-kit-client.so`` for the whole script; at the end ``pkcs11-tool`` signs
through it and ``openssl`` verifies the signature.

At the end it prints the timeline of transitions (read back from the audit
record), the tally, and the verdict of ``hsmfsm audit verify``, and writes
the diagrams and the record into an output folder. Every process it started
is stopped, whatever happens.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from ..audit import diagram
from ..audit import record as audit
from ..config.pool_file import load_pool
from ..core.errors import HSMError
from ..runtime import server as slot_server
from ..runtime.pool import MemberStatus, Pool
from ..testing.lab import NetworkHSM, SoftHSMToken, clients, find_module
from ..testing.lab.app import App, AppSummary

#: (seconds after start, action, member, what it shows)
SCRIPT: list[tuple[float, str, str, str]] = [
    (2.0, "kill", "hsm-a", "hsm-a dies under load: its calls in flight go again to hsm-b"),
    (4.0, "start", "hsm-a", "hsm-a comes back: background recovery puts it back in the rotation"),
    (6.0, "hang", "hsm-b", "hsm-b hangs (SIGSTOP): its calls are cut off at the 1 s call timeout and go to hsm-a"),
    (8.5, "resume", "hsm-b", "hsm-b resumes (SIGCONT)"),
    (10.5, "pause", "", "the application stops signing: both connections are idle"),
    (11.0, "kill", "hsm-a", "hsm-a dies while nobody is calling"),
    (12.0, "start", "hsm-a", "hsm-a comes back; the probe alone brings it back, no call needed"),
    (14.0, "unpause", "", "the application signs again"),
    (15.5, "restart", "hsm-b", "hsm-b restarts (kill and start at once)"),
    (18.0, "end", "", "done"),
]

POOL_FILE = """\
# Written by `hsmfsm demo`: the pool it signs through. Check it with
# `HSMFSM_RUN={run} hsmfsm check {path}`.
pool: demo
policy:
  version: 1
  name: demo
  extends: network-hsm
  operations:
    call_timeout: 1s     # a hung HSM costs a caller at most this before the call goes elsewhere
    deadline: 6s
balance: round_robin
recovery:
  mode: background
  interval: 500ms
  max_attempts: unlimited
audit:
  path: transitions.jsonl
members:
  - name: hsm-a
    module: {module}
    env: {{P11_KIT_SERVER_ADDRESS: "unix:path=${{HSMFSM_RUN}}/hsm-a.sock"}}
    token_label: {label}
    pin: env:HSMFSM_DEMO_PIN
  - name: hsm-b
    module: {module}
    env: {{P11_KIT_SERVER_ADDRESS: "unix:path=${{HSMFSM_RUN}}/hsm-b.sock"}}
    token_label: {label}
    pin: env:HSMFSM_DEMO_PIN
# The pool as one virtual PKCS#11 slot for applications that load p11-kit-client.so.
serve:
  socket: "${{HSMFSM_RUN}}/serve/demo-ha.sock"
  token_label: demo-ha
  pin: env:HSMFSM_DEMO_APP_PIN
"""
#: The application PIN of the demo's virtual slot (not the HSMs' PIN: that one never leaves the pool).
APP_PIN = "demo-app-pin"


class _Signers:
    """Two signing threads and their tally; every signature is checked with the public key."""

    def __init__(self, pool: Pool, public: ec.EllipticCurvePublicKey, threads: int = 2) -> None:
        self.pool, self.public = pool, public
        self.requests = self.ok = self.bad = self.failed = 0
        self.errors: list[str] = []
        self.paused = threading.Event()
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"demo-signer-{i}", daemon=True)
                         for i in range(threads)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self, timeout: float) -> bool:
        self.stop.set()
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _run(self, index: int) -> None:
        n = 0
        while not self.stop.is_set():
            if self.paused.is_set():
                time.sleep(0.01)
                continue
            digest = hashlib.sha256(f"zone record {index}.{n}".encode()).digest()
            n += 1
            with self._lock:
                self.requests += 1
            try:
                sig = self.pool.sign("ec", digest, mechanism="ECDSA")
            except HSMError as exc:
                with self._lock:
                    self.failed += 1
                    self.errors.append(str(exc))
                continue
            r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
            try:
                self.public.verify(utils.encode_dss_signature(r, s), digest,
                                   ec.ECDSA(utils.Prehashed(hashes.SHA256())))
                good = True
            except Exception:
                good = False
            with self._lock:
                if good:
                    self.ok += 1
                else:
                    self.bad += 1


def _status_line(pool: Pool, s: _Signers) -> str:
    members = "  ".join(f"{m.name} {m.state}" + (f" ({m.last_code})" if m.last_code and m.state not in
                                                  ("logged_in", "degraded") else "")
                        for m in pool.status())
    return f"{members}  | requests {s.requests}, verified {s.ok}, failed {s.failed}"


def run(out: TextIO | None = None, speed: float = 1.0, keep: bool = False, outdir: str | None = None) -> int:
    """Play the script; ``speed`` < 1 shortens it (the tests use that). Returns the exit code.

    0 when every call succeeded with a verified signature, both members serve
    at the end, and the audit record verifies.
    """
    out = out or sys.stdout
    tty = out.isatty()
    t0 = time.monotonic()

    def say(text: str) -> None:
        print(("\r\033[K" if tty else "") + f"[{time.monotonic() - t0:6.2f}s] {text}", file=out, flush=True)

    folder = Path(outdir) if outdir else Path(tempfile.mkdtemp(prefix="hsmfsm-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    lab = Path(tempfile.mkdtemp(prefix="hsmfsm-demo-lab-"))
    hsms: dict[str, NetworkHSM] = {}
    try:
        say(f"provisioning a SoftHSM token and two replicas in {lab}")
        token = SoftHSMToken(lab / "token", label="demo-signer").provision()
        run_dir = lab / "run"
        run_dir.mkdir()
        for name in ("hsm-a", "hsm-b"):
            hsms[name] = NetworkHSM(token.replicate(lab / name), run_dir / f"{name}.sock").start()
            say(f"network HSM {name}: p11-kit server pid {hsms[name].pid} on {hsms[name].socket_path}")
        pool_file = folder / "demo-pool.yaml"
        pool_file.write_text(POOL_FILE.format(run=run_dir, path=pool_file, module=find_module("p11-kit-client"),
                                              label=token.label))
        os.environ["HSMFSM_RUN"] = str(run_dir)
        os.environ["HSMFSM_DEMO_PIN"] = token.pin
        os.environ["HSMFSM_DEMO_APP_PIN"] = APP_PIN
        public = serialization.load_der_public_key(token.public_key_der("ec"))
        assert isinstance(public, ec.EllipticCurvePublicKey)
        spec = load_pool(pool_file)
        pool = Pool.from_spec(spec)
        signers = _Signers(pool, public)
        with pool:
            say(f"pool {pool.name} open: {_status_line(pool, signers)}")
            assert spec.serve is not None
            server = slot_server.from_spec(pool, spec.serve).start()
            app = App(server.address, spec.serve.token_label, APP_PIN, "rsa", threads=1, seconds=None,
                      until_file=lab / "app-stop", public_der=token.root / "rsa.pub.der")
            try:
                app.start()
                app.wait_ready()
                say(f"virtual slot {spec.serve.token_label!r} served on {server.address}; an unmodified "
                    f"python-pkcs11 application (pid {app.pid}) signs through p11-kit-client.so")
                signers.start()
                _play(pool, signers, hsms, say, speed, t0, tty, out)
                clean = signers.join(10)
                served = app.finish(timeout=30.0)
                tool = _pkcs11_tool_check(server.address, spec.serve.token_label, token, lab)
            finally:
                app.stop()
                server.stop()
            final = pool.status()
            diagram.write_pool(spec, folder / "pool-live.svg", final)
        for ext in ("dot", "svg"):
            diagram.write_pool(spec, folder / f"pool.{ext}")
            diagram.write(spec.policy, folder / f"policy-{spec.policy.name}.{ext}")
        log_path = folder / "transitions.jsonl"
        verdict = audit.verify([log_path])
        _report(out, log_path, signers, final, verdict, clean, folder, keep, served, tool)
    finally:
        for hsm in hsms.values():
            hsm.kill()
        shutil.rmtree(lab, ignore_errors=True)
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    serving = all(m.state in ("logged_in", "degraded") for m in final)
    app_clean = served.ok > 0 and served.failed == 0 and served.bad_signatures == 0
    return 0 if (signers.failed == 0 and signers.bad == 0 and signers.ok > 0 and serving and verdict.ok
                 and clean and app_clean and tool) else 1


def _pkcs11_tool_check(address: str, token_label: str, token: SoftHSMToken, lab: Path) -> bool:
    """pkcs11-tool signs through the virtual slot; openssl (not hsmfsm) verifies the signature."""
    data, signature = lab / "tool-data", lab / "tool-sig"
    data.write_bytes(b"signed by pkcs11-tool through hsmfsm serve\n")
    run = clients.pkcs11_sign(address, token_label, APP_PIN, "rsa", "SHA256-RSA-PKCS", data, signature,
                              key_id=token.key_id("rsa").hex())
    return run.ok and clients.openssl_verify(token.public_key_der("rsa"), data, signature).ok


def _play(pool: Pool, signers: _Signers, hsms: dict[str, NetworkHSM], say: Callable[[str], None],
          speed: float, t0: float, tty: bool, out: TextIO) -> None:
    """Run the script, with a live status line between its steps."""
    for at, action, member, text in SCRIPT:
        due = t0 + at * speed
        while time.monotonic() < due:
            line = _status_line(pool, signers)
            if tty:
                print(f"\r\033[K    {line}", end="", file=out, flush=True)
            else:
                say(f"    {line}")
            time.sleep(min(0.25 if tty else 1.0 * max(speed, 0.5), max(0.0, due - time.monotonic())))
        say(f"{action.upper():8} {text}")
        hsm = hsms.get(member)
        if action == "kill" and hsm:
            hsm.kill()
        elif action == "start" and hsm:
            hsm.start()
        elif action == "restart" and hsm:
            hsm.restart()
        elif action == "hang" and hsm:
            hsm.hang()
        elif action == "resume" and hsm:
            hsm.resume()
        elif action == "pause":
            signers.paused.set()
        elif action == "unpause":
            states = ", ".join(f"{m.name} {m.state}" for m in pool.status())
            say(f"         before signing again: {states} (recovered with no call made)")
            signers.paused.clear()


def _report(out: TextIO, log_path: Path, s: _Signers, final: list[MemberStatus], verdict: audit.Verdict, clean: bool,
            folder: Path, keep: bool, served: AppSummary, tool: bool) -> None:
    print("\ntimeline of transitions (from the audit record):", file=out)
    for line in audit.timeline([log_path]):
        print(f"  {line}", file=out)
    print("\ntally:", file=out)
    print(f"  requests                     : {s.requests}", file=out)
    print(f"  signatures made and verified : {s.ok}", file=out)
    print(f"  wrong signatures             : {s.bad}", file=out)
    print(f"  failed calls                 : {s.failed}  (expected 0: the pool hides every member failure)",
          file=out)
    for err in sorted(set(s.errors))[:5]:
        print(f"      {err}", file=out)
    print(f"  signer threads stopped       : {'yes' if clean else 'NO'}", file=out)
    print("  through the virtual slot     : an unmodified python-pkcs11 application (own process): "
          f"{served.ok} signatures verified, {served.failed} failed, {served.bad_signatures} wrong, "
          f"{served.finalize_calls} C_Finalize", file=out)
    print(f"  pkcs11-tool + openssl verify : {'OK' if tool else 'FAILED'}", file=out)
    print("  final states                 : " + ", ".join(f"{m.name} {m.state}" for m in final), file=out)
    print("  program restarts             : 0", file=out)
    print(f"  audit record                 : {verdict}", file=out)
    print(f"\noutput folder: {folder}" + ("" if keep else "  (removed at exit; --keep leaves it)"), file=out)
    for path in sorted(folder.iterdir()):
        print(f"  {path.name}", file=out)
