"""A python-pkcs11 *application*, written the way a user writes one, in a process of its own.

The hsmfsm server is only useful if ordinary applications keep signing through it while HSMs
fail, without being written for HA. So this is deliberately a naive, typical application: it
loads the stock ``p11-kit-client.so`` once (with ``P11_KIT_SERVER_ADDRESS`` set before loading, as
the client requires), opens one session per thread, signs in a loop, and never calls
C_Finalize/C_Initialize to recover (``finalize_calls`` is 0 by construction, and the process ends
with ``os._exit`` so even interpreter teardown finalizes nothing; a real server sees EOF, as with
the OpenSSL engine). It verifies *every* signature in-process with ``cryptography`` against the
public key read once at start (or from ``--public-der``), so a pool that returned a signature made
by the wrong key is caught, not just one that returned an error.

Run it::

    python -m hsmfsm.testing.lab.app --address unix:path=S --token L --pin P --key rsa|ec \\
        --threads 4 --seconds 20 [--out results.jsonl] [--until-file PATH]

``--key`` is the key label; RSA keys sign with CKM_SHA256_RSA_PKCS, EC keys with CKM_ECDSA over
a SHA-256 digest (Debian's SoftHSM lacks CKM_ECDSA_SHA256). A call that raises is counted by
exception class and the loop goes on after 10 ms. The last stdout line is a JSON summary::

    {"ok": n, "failed": n, "bad_signatures": n, "errors": {type: count}, "max_call_seconds": x,
     "finalize_calls": 0, "pid": ...}

The file is self-contained (stdlib, python-pkcs11, cryptography) so that :class:`App` can run it
by path with ``python -I``: the measured process then holds no hsmfsm code at all, and it does not
depend on the hsmfsm package importing cleanly. ``python -m`` works too.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pkcs11.types import Session

#: Where Debian-likes put the stock client (same list as hsmfsm.p11.host.CLIENT_CANDIDATES).
CLIENT_CANDIDATES = ("/usr/lib/*/pkcs11/p11-kit-client.so", "/usr/lib/pkcs11/p11-kit-client.so",
                     "/usr/lib64/pkcs11/p11-kit-client.so")
APP_PATH = str(Path(__file__).resolve())
PIN_ENV = "HSMFSM_APP_PIN"
ERROR_PAUSE = 0.01  # after an error: keeps a dead connection from becoming a busy loop


class AppFailed(RuntimeError):
    """The application did not produce a summary (crashed, timed out, bad arguments)."""


# --- the application (child side) -------------------------------------------------------------


def find_client_module() -> str:
    for pattern in CLIENT_CANDIDATES:
        for path in sorted(glob.glob(pattern)):
            if os.path.exists(path):
                return path
    raise SystemExit("p11-kit-client.so not found; install Debian package p11-kit-modules")


class _Stats:
    """Counters shared by the signing threads, and the optional per-call JSONL record."""

    def __init__(self, out: IO[str] | None) -> None:
        self.lock = threading.Lock()
        self.ok = 0
        self.failed = 0
        self.bad_signatures = 0
        self.errors: Counter[str] = Counter()
        self.max_call_seconds = 0.0
        self.in_flight: dict[int, float] = {}  # thread index -> monotonic start of its current call
        self.out = out

    def begin(self, thread: int) -> float:
        started = time.monotonic()
        with self.lock:
            self.in_flight[thread] = started
        return started

    def end(self, thread: int, seq: int, started: float, outcome: str, error: BaseException | None = None) -> None:
        seconds = time.monotonic() - started
        with self.lock:
            self.in_flight.pop(thread, None)
            self.max_call_seconds = max(self.max_call_seconds, seconds)
            if outcome == "ok":
                self.ok += 1
            elif outcome == "bad_signature":
                self.bad_signatures += 1
            else:
                self.failed += 1
                self.errors[type(error).__name__ if error is not None else "unknown"] += 1
            if self.out is not None:
                record: dict[str, Any] = {"t": round(time.time(), 6), "thread": thread, "seq": seq,
                                          "outcome": outcome, "seconds": round(seconds, 6)}
                if error is not None:
                    record["error"] = type(error).__name__
                    record["message"] = str(error)[:200]
                self.out.write(json.dumps(record) + "\n")

    def summary(self, **extra: Any) -> dict[str, Any]:
        now = time.monotonic()
        with self.lock:
            return {
                "ok": self.ok, "failed": self.failed, "bad_signatures": self.bad_signatures,
                "errors": dict(self.errors), "max_call_seconds": round(self.max_call_seconds, 6),
                "finalize_calls": 0, "pid": os.getpid(),
                "in_flight": len(self.in_flight),
                "longest_in_flight_seconds": round(max((now - t for t in self.in_flight.values()), default=0.0), 6),
                **extra,
            }


def _verifier(public_der: bytes) -> tuple[str, Callable[[bytes, bytes], bool]]:
    """("rsa"|"ec", verify(data, signature) -> bool) for a DER public key (PKCS#1 or SPKI)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

    public = serialization.load_der_public_key(public_der)
    if isinstance(public, rsa.RSAPublicKey):
        rsa_key = public

        def verify_rsa(data: bytes, signature: bytes) -> bool:
            try:
                rsa_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
            except (InvalidSignature, ValueError):
                return False
            return True

        return "rsa", verify_rsa
    if isinstance(public, ec.EllipticCurvePublicKey):
        ec_key = public
        size = (public.curve.key_size + 7) // 8

        def verify_ec(data: bytes, signature: bytes) -> bool:
            if len(signature) != 2 * size:  # CKM_ECDSA returns raw r||s
                return False
            der = utils.encode_dss_signature(int.from_bytes(signature[:size], "big"),
                                             int.from_bytes(signature[size:], "big"))
            try:
                ec_key.verify(der, hashlib.sha256(data).digest(), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
            except (InvalidSignature, ValueError):
                return False
            return True

        return "ec", verify_ec
    raise SystemExit(f"unsupported public key type {type(public).__name__}")


def run_app(opts: argparse.Namespace) -> dict[str, Any]:
    """Sign until told to stop; return the summary. Never raises for a failing HSM."""
    # p11-kit-client reads the address when it is initialised, i.e. when pkcs11.lib() loads it.
    os.environ["P11_KIT_SERVER_ADDRESS"] = opts.address
    import pkcs11
    from pkcs11 import Attribute, Mechanism, ObjectClass
    from pkcs11.exceptions import UserAlreadyLoggedIn
    from pkcs11.types import PrivateKey, PublicKey, SignMixin
    from pkcs11.util.ec import encode_ec_public_key
    from pkcs11.util.rsa import encode_rsa_public_key

    pin: str = opts.pin if opts.pin is not None else os.environ.get(opts.pin_env or PIN_ENV, "")
    out = open(opts.out, "a", buffering=1, encoding="utf-8") if opts.out else None  # closed by os._exit; line-buffered
    stats = _Stats(out)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    started = time.monotonic()
    if opts.until_file:
        limit = opts.seconds if opts.seconds is not None else opts.max_seconds
    else:
        limit = opts.seconds if opts.seconds is not None else 20.0
    deadline = started + limit

    def should_stop() -> bool:
        if stop.is_set() or time.monotonic() >= deadline:
            return True
        if opts.until_file and os.path.exists(opts.until_file):
            stop.set()
            return True
        return False

    lib = pkcs11.lib(opts.module or find_client_module())  # C_Initialize, once, for the process
    login_lock = threading.Lock()
    logged_in = False

    def open_session() -> Session:
        """A session on the token; only the first one logs in (the login is per application)."""
        nonlocal logged_in
        token = lib.get_token(token_label=opts.token)
        with login_lock:
            if not logged_in:
                try:
                    session = token.open(user_pin=pin)
                except UserAlreadyLoggedIn:
                    session = token.open()
                logged_in = True
                return session
        return token.open()

    # The public key, read once (retrying while the HSM is unreachable) unless given as a file.
    public_der: bytes | None = Path(opts.public_der).read_bytes() if opts.public_der else None
    setup_errors: Counter[str] = Counter()
    while public_der is None and not should_stop():
        try:
            with lib.get_token(token_label=opts.token).open() as session:
                pub = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=opts.key)
                assert isinstance(pub, PublicKey)
                public_der = (encode_ec_public_key(pub) if pub[Attribute.KEY_TYPE] == pkcs11.KeyType.EC
                              else encode_rsa_public_key(pub))
        except Exception as exc:  # a failing HSM must not end the application
            setup_errors[type(exc).__name__] += 1
            time.sleep(ERROR_PAUSE)
    if public_der is None:
        return stats.summary(setup_error="public key never read", setup_errors=dict(setup_errors),
                             seconds=round(time.monotonic() - started, 3), threads=opts.threads, key=opts.key)
    key_type, verify = _verifier(public_der)
    print(json.dumps({"ready": True, "pid": os.getpid(), "key_type": key_type, "key": opts.key}), flush=True)

    def sign(key: SignMixin, data: bytes) -> bytes:
        if key_type == "rsa":
            return key.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)
        return key.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA)

    def worker(index: int) -> None:
        key: SignMixin | None = None
        seq = 0
        while not should_stop():
            seq += 1
            t0 = stats.begin(index)
            data = f"hsmfsm app {os.getpid()} thread {index} call {seq}".encode()
            try:
                if key is None:  # the session is opened once and kept, as a naive application does
                    found = open_session().get_key(object_class=ObjectClass.PRIVATE_KEY, label=opts.key)
                    assert isinstance(found, PrivateKey) and isinstance(found, SignMixin)
                    key = found
                signature = sign(key, data)
            except Exception as exc:  # counted by class; the loop goes on
                stats.end(index, seq, t0, "failed", exc)
                time.sleep(ERROR_PAUSE)
                continue
            stats.end(index, seq, t0, "ok" if verify(data, signature) else "bad_signature")

    threads = [threading.Thread(target=worker, args=(i,), name=f"signer-{i}", daemon=True)
               for i in range(opts.threads)]
    for thread in threads:
        thread.start()
    while not should_stop():
        time.sleep(0.02)
    stop.set()
    # A call blocked on a hung HSM never returns; report it (in_flight) instead of waiting for ever.
    grace_end = time.monotonic() + opts.grace
    for thread in threads:
        thread.join(max(0.0, grace_end - time.monotonic()))
    return stats.summary(seconds=round(time.monotonic() - started, 3), threads=opts.threads, key=opts.key,
                         key_type=key_type, setup_errors=dict(setup_errors),
                         stuck_threads=sum(t.is_alive() for t in threads))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m hsmfsm.testing.lab.app", description=__doc__.split("\n")[0])
    ap.add_argument("--address", required=True, help="P11_KIT_SERVER_ADDRESS, unix:path=SOCKET")
    ap.add_argument("--token", required=True, help="token label")
    ap.add_argument("--pin", help="user PIN (visible in ps; prefer --pin-env)")
    ap.add_argument("--pin-env", help=f"read the PIN from this environment variable (default {PIN_ENV})")
    ap.add_argument("--key", required=True, help="key label; its type (RSA or EC) picks the mechanism")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--seconds", type=float, help="run this long (default 20; with --until-file: a cap)")
    ap.add_argument("--until-file", help="sign until this file exists")
    ap.add_argument("--max-seconds", type=float, default=3600.0, help="cap for --until-file without --seconds")
    ap.add_argument("--grace", type=float, default=5.0, help="how long to wait for in-flight calls at the end")
    ap.add_argument("--public-der", help="verify against this DER public key instead of reading the token's")
    ap.add_argument("--module", help="PKCS#11 module (default: the system's p11-kit-client.so)")
    ap.add_argument("--out", help="append one JSON line per call, and the summary, to this file")
    opts = ap.parse_args(argv)
    if not opts.address.startswith("unix:path="):
        ap.error("only unix socket addresses (unix:path=...) are allowed")
    if opts.threads < 1:
        ap.error("--threads must be at least 1")
    return opts


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_args(argv)
    summary = run_app(opts)
    line = json.dumps(summary, sort_keys=True)
    if opts.out:
        with open(opts.out, "a", encoding="utf-8") as out:
            out.write(line + "\n")
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    # No interpreter teardown: threads may still be blocked inside C_Sign, and nothing may
    # finalize the module on our behalf.
    os._exit(1 if "setup_error" in summary else 0)


# --- the parent side --------------------------------------------------------------------------


@dataclass(frozen=True)
class AppSummary:
    """The application's final JSON line, parsed; ``raw`` has every key it wrote."""

    ok: int
    failed: int
    bad_signatures: int
    errors: dict[str, int]
    max_call_seconds: float
    finalize_calls: int
    pid: int
    returncode: int
    raw: dict[str, Any] = field(repr=False)
    stderr: str = field(default="", repr=False)


class App:
    """Start :mod:`hsmfsm.testing.lab.app` in a process group of its own and collect its summary.

    ``with App(...) as app: app.start(); summary = app.wait()`` — leaving the block kills the
    group if it is still running. The PIN reaches the child through the environment, not argv.
    With ``until_file``, ``seconds`` is only a cap (pass None for none but ``--max-seconds``) and
    :meth:`finish` creates the file and collects the summary.
    """

    def __init__(self, address: str, token_label: str, pin: str, key_label: str, *, threads: int = 4,
                 seconds: float | None = 20.0, until_file: str | os.PathLike[str] | None = None,
                 public_der: str | os.PathLike[str] | None = None, out: str | os.PathLike[str] | None = None,
                 module: str | None = None, grace: float = 5.0, python: str = sys.executable) -> None:
        if not address.startswith("unix:path="):
            raise ValueError(f"only unix socket addresses are allowed, got {address!r}")
        self.until_file = Path(until_file) if until_file is not None else None
        self.seconds = seconds
        self._tmp = tempfile.TemporaryDirectory(prefix="hsmfsm-app-")
        self.stdout_path = Path(self._tmp.name) / "stdout"
        self.stderr_path = Path(self._tmp.name) / "stderr"
        self.argv = [python, "-I", APP_PATH, "--address", address, "--token", token_label, "--pin-env", PIN_ENV,
                     "--key", key_label, "--threads", str(threads), "--grace", str(grace)]
        if seconds is not None:
            self.argv += ["--seconds", str(seconds)]
        for option, value in (("--until-file", until_file), ("--public-der", public_der), ("--out", out),
                              ("--module", module)):
            if value is not None:
                self.argv += [option, os.fspath(value)]
        self._env = {**os.environ, PIN_ENV: pin}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> App:
        if self.proc is not None:
            raise AppFailed("already started")
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                         env=self._env, start_new_session=True)
        return self

    def _lines(self) -> list[dict[str, Any]]:
        lines: list[dict[str, Any]] = []
        for text in self.stdout_path.read_text(errors="replace").splitlines():
            try:
                value = json.loads(text)
            except ValueError:
                continue
            if isinstance(value, dict):
                lines.append(value)
        return lines

    def _stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """Block until the app has loaded the module and read the public key (its "ready" line)."""
        proc = self._started()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self._lines():
                if line.get("ready"):
                    return line
            if proc.poll() is not None:
                raise AppFailed(f"app exited with {proc.returncode} before ready: {self._stderr()[-2000:]}")
            time.sleep(0.01)
        raise AppFailed(f"app not ready within {timeout}s")

    def wait(self, timeout: float | None = None) -> AppSummary:
        """Wait for the app to finish and parse its summary. On timeout the group is killed and
        :class:`AppFailed` raised, so a hung app never outlives the test."""
        proc = self._started()
        if timeout is None:
            timeout = (self.seconds or 0.0) + 30.0
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AppFailed(f"app (pid {proc.pid}) did not finish within {timeout}s; killed its group") from None
        summaries = [line for line in self._lines() if "ok" in line and "finalize_calls" in line]
        if not summaries:
            raise AppFailed(f"app exited with {returncode} without a summary: {self._stderr()[-2000:]}")
        raw = summaries[-1]
        return AppSummary(int(raw["ok"]), int(raw["failed"]), int(raw["bad_signatures"]),
                          {str(k): int(v) for k, v in raw["errors"].items()}, float(raw["max_call_seconds"]),
                          int(raw["finalize_calls"]), int(raw["pid"]), returncode, raw, self._stderr())

    def finish(self, timeout: float = 30.0) -> AppSummary:
        """``--until-file`` mode: create the file, then :meth:`wait`."""
        if self.until_file is None:
            raise AppFailed("finish() needs until_file")
        self.until_file.touch()
        return self.wait(timeout)

    def stop(self) -> None:
        """SIGKILL the app's process group (by its PID) and reap it."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def _started(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise AppFailed("app not started")
        return self.proc

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    main()
