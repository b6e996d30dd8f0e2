"""``hsmfsm soak``: a bounded chaos run against an HA pool of network HSMs.

Two or three SoftHSM replicas of one token, each behind its own
`p11-kit server` and reached through its own reply-rewriting :class:`Relay`,
form an HA pool. Several threads sign through the pool for ``duration``
seconds (ECDSA P-256 over SHA-256 digests), and every signature is verified
with the public key outside any HSM. Meanwhile a fault schedule, drawn from a
seeded RNG before the run starts (the same seed gives the same schedule),
kills members and restarts them later, hangs them (SIGSTOP) and resumes them,
restarts them, resets their connections at the relay, slows their replies,
rewrites replies to transport, session, login and vendor codes, and takes
every member down at once for a while.

An extra standby member reads a *wrong* PIN from another environment
variable: it must end ``failed`` after exactly one C_Login, and neither PIN
may appear anywhere the soak can see (captured logs at DEBUG, transition
records, reprs, exception messages, the pool's status).

At the end a tally is printed (and written as JSON with ``--json``); each
"must be" row is checked and the exit status is 1 when any fails.

Bounds, all derived from the policy (``call_timeout`` T, ``deadline`` D):

- a failed call is excused only when it ended inside a window where the
  schedule had taken every member down, extended by D after the members were
  given back (a call that started inside the window may wait D for a member);
- a call is *lost* when it takes longer than D + T + 0.5 s: the pool checks
  its deadline between attempts, so one attempt that starts just before the
  deadline may run one call timeout past it (then the watchdog cuts it), and
  0.5 s covers the watchdog's period and a loaded 2-core machine;
- sessions left open: SoftHSM reports ``ulSessionCount`` as
  CK_UNAVAILABLE_INFORMATION (measured), and behind `p11-kit server` every
  client connection is served by a ``p11-kit-remote`` child process of its own
  whose SoftHSM instance holds that connection's sessions. So the soak counts
  what it can see: before close, the live session handles on each member's
  own connection (C_GetSessionInfo over handles 1..1024, reported); after
  close, the ``p11-kit-remote`` children still alive under each server and
  the links still open through each relay. No child, no session: that row
  must be 0.

Every process the soak starts is stopped by PID or process group, even on
Ctrl-C; the temporary directory is removed.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import random
import secrets
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from ..config.policy_file import load_policy
from ..core.errors import HSMError
from ..core.policy import Policy
from ..core.records import TransitionRecord
from ..p11.host import live_group_members
from ..runtime.connection import SlotConnection
from ..runtime.pool import Pool, format_status
from ..testing.lab import LabError, NetworkHSM, Relay, SoftHSMToken, find_module
from ..testing.lab.relay import RelayError

_now = time.monotonic

PIN_ENV = "HSMFSM_SOAK_PIN"
WRONG_PIN_ENV = "HSMFSM_SOAK_WRONG_PIN"
KEY = "ec"
WARMUP = 2.0          # seconds of clean signing before the first fault
QUIET = 3.0           # seconds at the end with no fault starting (faults still undone later are waited for)
RECOVERY_MARGIN = 1.0  # a member given back counts as down this much longer when faults are drawn
RSS_LIMIT_MIB = 50.0
#: How long a member may take to serve again once everything was given back, at the end.
FINAL_RECOVERY = 10.0

#: (call, CK_RV, forward, class) of the reply rewrites.
REWRITES = [
    ("C_Sign", 0x30, True, "transport CKR_DEVICE_ERROR"),
    ("C_Sign", 0x32, True, "transport CKR_DEVICE_REMOVED"),
    ("C_Sign", 0xE0, True, "transport CKR_TOKEN_NOT_PRESENT"),
    ("C_SignInit", 0x30, False, "transport CKR_DEVICE_ERROR"),
    ("C_Sign", 0xB3, True, "session CKR_SESSION_HANDLE_INVALID"),
    ("C_SignInit", 0xB3, False, "session CKR_SESSION_HANDLE_INVALID"),
    ("C_GetSessionInfo", 0xB3, True, "session CKR_SESSION_HANDLE_INVALID"),
    ("C_Sign", 0x101, True, "login CKR_USER_NOT_LOGGED_IN"),
    ("C_GetSessionInfo", 0x101, True, "login CKR_USER_NOT_LOGGED_IN"),
    ("C_Sign", 0x80000001, True, "vendor 0x80000001"),
    ("C_SignInit", 0x80000001, False, "vendor 0x80000001"),
]
#: kind -> weight in the draw.
KINDS = {"kill": 3, "hang": 3, "restart": 2, "reset": 2, "latency": 2, "rewrite": 5}
DOWN_KINDS = frozenset({"kill", "hang", "restart", "slow"})


# -- the schedule -------------------------------------------------------------

@dataclass(frozen=True)
class Fault:
    at: float                 # seconds after the start of the workload
    kind: str                 # kill, hang, restart, reset, latency, slow, rewrite, all_down
    members: tuple[str, ...]
    length: float = 0.0       # seconds until it is undone (0: nothing to undo)
    args: dict = field(default_factory=dict, hash=False, compare=False)

    def describe(self) -> str:
        who = ",".join(self.members)
        extra = "".join(f" {k}={v}" for k, v in self.args.items())
        span = f" for {self.length:.1f}s" if self.length else ""
        return f"{self.kind} {who}{span}{extra}"


def draw_schedule(seed: int, duration: float, members: list[str], call_timeout: float) -> list[Fault]:
    """The fault schedule of one run: a pure function of the seed, the length and the members.

    Every-member-down windows are placed first (one per minute, at least one);
    the other faults never overlap them and never take the last member that
    is up: at most ``len(members) - 1`` members are down at once outside the
    windows, counting a member as down for ``RECOVERY_MARGIN`` after it was
    given back.
    """
    rng = random.Random(seed)
    end = max(WARMUP + 1.0, duration - QUIET)
    faults: list[Fault] = []
    windows: list[tuple[float, float]] = []
    n_all = max(1, round(duration / 60.0))
    for i in range(n_all):
        span = (end - WARMUP) / n_all
        length = rng.uniform(3.0, 9.0) if duration >= 60 else rng.uniform(3.0, min(7.0, max(3.0, span * 0.4)))
        lo = WARMUP + i * span + 1.0
        hi = max(lo, WARMUP + (i + 1) * span - length - 1.0)
        at = rng.uniform(lo, hi)
        mode = rng.choice(["kill", "hang"])
        faults.append(Fault(round(at, 2), "all_down", tuple(members), round(length, 2), {"mode": mode}))
        windows.append((at - RECOVERY_MARGIN, at + length + RECOVERY_MARGIN))
    busy_until = {m: 0.0 for m in members}
    kinds, weights = list(KINDS), list(KINDS.values())
    t = WARMUP
    while True:
        t += rng.uniform(0.3, 1.5)
        if t >= end:
            break
        kind = rng.choices(kinds, weights)[0]
        member = rng.choice(members)
        if any(a <= t <= b for a, b in windows):
            continue
        if kind in ("kill", "hang"):
            length = rng.uniform(0.5, 4.0)
            args: dict = {}
        elif kind == "restart":
            length, args = 0.0, {}
        elif kind == "latency":
            seconds = rng.choice([0.01, 0.05, 0.15, 0.6])
            length, args = rng.uniform(1.0, 4.0), {"seconds": seconds}
            if 3 * seconds >= call_timeout * 0.8:  # a sign is three round trips: this one times out
                kind = "slow"
        elif kind == "rewrite":
            call, rv, forward, what = REWRITES[rng.randrange(len(REWRITES))]
            length, args = 2.0, {"call": call, "rv": hex(rv), "count": rng.randint(1, 3),
                                 "forward": forward, "class": what}
        else:  # reset
            length, args = 0.0, {}
        stop = t + length
        if kind in DOWN_KINDS:
            up = [m for m in members if m != member and busy_until[m] <= t]
            if busy_until[member] > t or not up:
                continue
            if any(a < stop + RECOVERY_MARGIN and t < b for a, b in windows):
                continue
            busy_until[member] = stop + RECOVERY_MARGIN
        elif any(a < stop and t < b for a, b in windows):
            continue
        faults.append(Fault(round(t, 2), kind, (member,), round(length, 2), args))
    faults.sort(key=lambda f: f.at)
    return faults


# -- what the soak watches ----------------------------------------------------

class _Secrets:
    """Scans every text the soak sees for the two PINs, and keeps count of where they showed."""

    def __init__(self, *pins: str) -> None:
        self.pins = [p for p in pins if p]
        self.hits: collections.Counter[str] = collections.Counter()
        self.scanned: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def scan(self, where: str, text: str) -> None:
        found = any(p in text for p in self.pins)
        with self._lock:
            self.scanned[where] += 1
            if found:
                self.hits[where] += 1


class _LogCapture(logging.Handler):
    """Everything the ``hsmfsm`` loggers say, at DEBUG: counted, scanned, the first lines kept."""

    def __init__(self, secrets_: _Secrets) -> None:
        super().__init__(logging.DEBUG)
        self.secrets = secrets_
        self.records = 0
        self.by_level: collections.Counter[str] = collections.Counter()
        self.with_traceback: list[str] = []
        self.first: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)  # includes the formatted traceback, if any
        except Exception:
            text = f"{record.name} unformattable record {record.msg!r}"
            self.with_traceback.append(text)
        self.records += 1
        self.by_level[record.levelname] += 1
        self.secrets.scan("log", text)
        if record.exc_info or "Traceback (most recent call last)" in text:
            if len(self.with_traceback) < 20:
                self.with_traceback.append(text)
            else:
                self.with_traceback.append("...")
        if len(self.first) < 30 and record.levelno >= logging.INFO:
            self.first.append(text)


class _Transitions:
    def __init__(self, secrets_: _Secrets) -> None:
        self.secrets = secrets_
        self.count = 0
        self.events: collections.Counter[tuple[str, str]] = collections.Counter()
        self.last: collections.deque[str] = collections.deque(maxlen=40)
        self._lock = threading.Lock()

    def __call__(self, record: TransitionRecord) -> None:
        text = f"{record!s} {record!r} {json.dumps(record.as_dict())}"
        self.secrets.scan("transition records", text)
        with self._lock:
            self.count += 1
            self.events[(record.member, record.event)] += 1
            self.last.append(str(record))


@dataclass
class _Failure:
    ended: float
    started: float
    klass: str
    message: str


class _Workload:
    """Signing threads: every call timed, every signature verified, every outcome counted."""

    def __init__(self, pool: Pool, public: ec.EllipticCurvePublicKey, threads: int, seed: int,
                 secrets_: _Secrets, lost_after: float) -> None:
        self.pool, self.public, self.seed = pool, public, seed
        self.secrets = secrets_
        self.lost_after = lost_after
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.calls = self.ok = self.wrong = 0
        self.failures: list[_Failure] = []
        self.failed_by_class: collections.Counter[str] = collections.Counter()
        self.messages: dict[str, int] = {}
        self.unhandled: list[str] = []
        self.worst = 0.0
        self.lost: list[str] = []
        self.buckets: collections.Counter[float] = collections.Counter()
        #: thread index -> start of the call in progress (0.0 when none), for the lost-call watchdog.
        self.inflight = [0.0] * threads
        self._flagged = [0.0] * threads
        self.threads = [threading.Thread(target=self._work, args=(i,), daemon=True, name=f"soak-signer-{i}")
                        for i in range(threads)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _work(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            data = f"soak {self.seed} thread {i} record {n}".encode()
            n += 1
            digest = hashlib.sha256(data).digest()
            t0 = _now()
            self.inflight[i] = t0
            try:
                sig = self.pool.sign(KEY, digest, mechanism="ECDSA")
            except HSMError as exc:
                t1 = _now()
                self.inflight[i] = 0.0
                text = f"{exc} {exc!r}"
                self.secrets.scan("exception messages", text)
                with self._lock:
                    self.calls += 1
                    self.failures.append(_Failure(t1, t0, type(exc).__name__, str(exc)))
                    self.failed_by_class[type(exc).__name__] += 1
                    if len(self.messages) < 200 or str(exc) in self.messages:
                        self.messages[str(exc)] = self.messages.get(str(exc), 0) + 1
                self._timed(i, t0, t1)
                continue
            except BaseException as exc:
                t1 = _now()
                self.inflight[i] = 0.0
                text = "".join(traceback.format_exception(exc))
                self.secrets.scan("exception messages", text)
                with self._lock:
                    self.calls += 1
                    self.unhandled.append(text)
                self._timed(i, t0, t1)
                continue
            t1 = _now()
            self.inflight[i] = 0.0
            r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
            try:
                self.public.verify(utils.encode_dss_signature(r, s), digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
                good = True
            except (InvalidSignature, ValueError):
                good = False
            with self._lock:
                self.calls += 1
                if good:
                    self.ok += 1
                else:
                    self.wrong += 1
            self._timed(i, t0, t1)

    def _timed(self, i: int, t0: float, t1: float) -> None:
        took = t1 - t0
        bucket = next((b for b in (0.01, 0.1, 0.5, 1.0, 2.0, 4.0, 6.0, 8.0) if took <= b), float("inf"))
        with self._lock:
            self.worst = max(self.worst, took)
            self.buckets[bucket] += 1
            if took > self.lost_after and self._flagged[i] != t0:
                self.lost.append(f"signer {i}: a call took {took:.2f}s")

    def watch(self, now: float) -> None:
        """The lost-call watchdog: flag a call still running past the bound (once per call)."""
        for i, t0 in enumerate(self.inflight):
            if t0 and now - t0 > self.lost_after and self._flagged[i] != t0:
                self._flagged[i] = t0
                with self._lock:
                    self.lost.append(f"signer {i}: a call still running after {now - t0:.2f}s")

    def join(self, timeout: float) -> list[str]:
        self.stop.set()
        limit = _now() + timeout
        for t in self.threads:
            t.join(max(0.0, limit - _now()))
        return [t.name for t in self.threads if t.is_alive()]


# -- the lab ------------------------------------------------------------------

class _Member:
    """One replica: its p11-kit server and the relay in front of it."""

    def __init__(self, name: str, token: SoftHSMToken, root: Path) -> None:
        self.name = name
        self.hsm = NetworkHSM(token, root / f"{name}.sock")
        self.relay = Relay(root / f"{name}-relay.sock", self.hsm.socket_path)
        self.down: set[str] = set()  # what the schedule did to it and has not undone yet
        self.stderr_lines = 0
        self.stderr_first: list[str] = []

    def start_server(self) -> None:
        self.hsm.start()
        proc = self.hsm.proc
        if proc is not None and proc.stderr is not None:
            threading.Thread(target=self._drain, args=(proc.stderr,), daemon=True,
                             name=f"soak-stderr-{self.name}").start()

    def _drain(self, pipe: Any) -> None:
        """Read the server's stderr so a chatty server can never block on a full pipe."""
        try:
            for line in iter(pipe.readline, b""):
                self.stderr_lines += 1
                if len(self.stderr_first) < 5:
                    self.stderr_first.append(line.decode(errors="replace").rstrip())
        except (OSError, ValueError):
            pass

    def kill(self) -> None:
        self.hsm.kill()

    def children(self) -> list[int]:
        """PIDs of the live (non-zombie) p11-kit-remote children of this member's server."""
        return _children(self.hsm.pid)


def _children(pid: int | None) -> list[int]:
    if pid is None:
        return []
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            out.append(int(entry))
    return out


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def soak_policy(call_timeout: float = 1.0, deadline: float = 6.0) -> Policy:
    """The shipped network-hsm policy with the test suite's short timings."""
    p = load_policy("network-hsm")
    return dataclasses.replace(
        p,
        operations=dataclasses.replace(p.operations, call_timeout=call_timeout, deadline=deadline),
        probe=dataclasses.replace(p.probe, interval=0.2),
        connect=dataclasses.replace(p.connect, backoff=dataclasses.replace(p.connect.backoff, initial=0.05, max=0.4)),
    )


class _SessionCounter:
    """Live session handles on one member's own connection, asked with C_GetSessionInfo."""

    def __init__(self) -> None:
        self.fn: Any = None

    def count(self, conn: SlotConnection, upto: int = 1024) -> int | None:
        module = conn._module  # the soak is hsmfsm's own lab: it may look inside
        fn = module._fn.get("C_GetSessionInfo") if module.initialized else None
        if fn is None:
            return None
        from ..p11.module import _SessionInfo

        lock = conn._call_lock
        live = 0
        info = _SessionInfo()
        if lock is not None and not lock.acquire(timeout=2.0):
            return None
        try:
            for handle in range(1, upto + 1):
                if fn(handle, ctypes.byref(info)) == 0:
                    live += 1
        finally:
            if lock is not None:
                lock.release()
        return live


# -- the run ------------------------------------------------------------------

@dataclass
class Row:
    name: str
    value: Any
    must: str | None = None   # None: reported only
    ok: bool = True


def run(duration: float = 120.0, threads: int = 4, seed: int = 1, members: int = 3,
        json_path: str | None = None, out: TextIO | None = None, call_timeout: float = 1.0,
        deadline: float = 6.0, isolation: str = "none") -> int:
    """Run one soak; print the tally; return 0 when every "must be" row holds, else 1.

    ``isolation="process"`` loads every active member's module in a host process
    (:mod:`hsmfsm.p11.host`): the same faults then strike a module hsmfsm cannot cut off
    from inside the process, and the host's stuck processes are what gets killed.
    """
    if members not in (2, 3):
        raise ValueError("members must be 2 or 3")
    if duration < 10:
        raise ValueError("duration must be at least 10 seconds")
    out = out or sys.stdout
    t_start = _now()

    def say(text: str) -> None:
        print(f"[{_now() - t_start:7.2f}s] {text}", file=out, flush=True)

    names = ["hsm-a", "hsm-b", "hsm-c"][:members]
    policy = soak_policy(call_timeout, deadline)
    schedule = draw_schedule(seed, duration, names, call_timeout)
    lost_after = deadline + call_timeout + 0.5
    pin = "S" + secrets.token_hex(10)
    wrong_pin = "W" + secrets.token_hex(10)
    scanner = _Secrets(pin, wrong_pin)
    capture = _LogCapture(scanner)
    transitions = _Transitions(scanner)
    hsm_logger = logging.getLogger("hsmfsm")
    saved_logger = (hsm_logger.level, hsm_logger.propagate)
    thread_errors: list[str] = []
    unraisable: list[str] = []
    saved_hooks = (threading.excepthook, sys.unraisablehook)
    saved_env = {k: os.environ.get(k) for k in (PIN_ENV, WRONG_PIN_ENV)}
    saved_sigterm = None
    in_main = threading.current_thread() is threading.main_thread()

    def thread_hook(args: Any) -> None:
        thread_errors.append("".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))
        saved_hooks[0](args)

    def unraisable_hook(args: Any) -> None:
        unraisable.append(f"{args.err_msg or 'Exception ignored'}: {args.exc_type.__name__}: {args.exc_value}")
        saved_hooks[1](args)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    tmp = tempfile.mkdtemp(prefix="hsmfsm-soak-")
    root = Path(tmp)
    lab: list[_Member] = []
    wrong_hsm: NetworkHSM | None = None
    pool: Pool | None = None
    work: _Workload | None = None
    rows: list[Row] = []
    tally: dict[str, Any] = {}
    windows: list[list[float]] = []
    applied: collections.Counter[str] = collections.Counter()
    skipped: list[str] = []
    try:
        hsm_logger.addHandler(capture)
        hsm_logger.setLevel(logging.DEBUG)
        hsm_logger.propagate = False  # DEBUG records must not reach the console's handlers
        threading.excepthook = thread_hook
        sys.unraisablehook = unraisable_hook
        if in_main:
            saved_sigterm = signal.signal(signal.SIGTERM, on_sigterm)

        say(f"soak: seed {seed}, {duration:g}s, {threads} signing threads, {members} members, "
            f"isolation {isolation}, "
            f"+ 1 standby with a wrong PIN; call timeout {call_timeout:g}s, deadline {deadline:g}s")
        say(f"provisioning a SoftHSM token and {members + 1} replicas in {tmp}")
        master = SoftHSMToken(root / "master", label="soak", pin=pin, rsa_keys=(), ec_keys=(KEY,)).provision()
        public = serialization.load_der_public_key(master.public_key_der(KEY))
        assert isinstance(public, ec.EllipticCurvePublicKey)
        for name in names:
            m = _Member(name, master.replicate(root / name), root)
            lab.append(m)
            m.start_server()
            m.relay.start()
        wrong_hsm = NetworkHSM(master.replicate(root / "hsm-w"), root / "hsm-w.sock").start()
        if wrong_hsm.proc is not None and wrong_hsm.proc.stderr is not None:
            threading.Thread(target=lambda p=wrong_hsm.proc.stderr: p.read(), daemon=True).start()
        by_name = {m.name: m for m in lab}
        say("servers: " + ", ".join(f"{m.name} pid {m.hsm.pid} relay pid {m.relay.pid}" for m in lab)
            + f", hsm-w (wrong PIN) pid {wrong_hsm.pid}")

        os.environ[PIN_ENV] = pin
        os.environ[WRONG_PIN_ENV] = wrong_pin
        interval = 0.5
        member_policy = Pool.member_policy(policy, "background", interval, None)
        client = find_module("p11-kit-client")
        conns = [(SlotConnection(module=client, token_label=master.label, pin=f"env:{PIN_ENV}", policy=member_policy,
                                 name=m.name, env={"P11_KIT_SERVER_ADDRESS": m.relay.address}, probe=True,
                                 wait_for_recovery=False, auto_recover=True, isolation=isolation), False)
                 for m in lab]
        conns.append((SlotConnection(module=client, token_label=master.label, pin=f"env:{WRONG_PIN_ENV}",
                                     policy=member_policy, name="hsm-w", env=wrong_hsm.client_env, probe=True,
                                     wait_for_recovery=False, auto_recover=True), True))
        pool = Pool("soak", conns, policy, recovery_mode="background", recovery_interval=interval,
                    recovery_max_attempts=None)
        pool.add_listener(transitions)
        pool.open(wait=15.0)
        status_text = format_status(pool)
        say("pool open:\n" + status_text)
        if not all(pool.member(n).serving for n in names):
            raise RuntimeError("the pool did not come up: " + status_text)

        work = _Workload(pool, public, threads, seed, scanner, lost_after)
        work.start()
        t0 = _now()
        rss_start: float | None = None
        pending = list(schedule)
        undo: list[tuple[float, Fault]] = []
        window_start: float | None = None
        left: dict[str, int] = {}
        links: dict[str, int] = {}
        host_left: dict[str, int] = {}
        end_at = t0 + duration

        def down_now() -> set[str]:
            return {m.name for m in lab if m.down}

        def do(fault: Fault, undoing: bool) -> None:
            kind = fault.kind
            for name in fault.members:
                m = by_name[name]
                if kind in ("kill", "hang", "all_down"):
                    mode = fault.args.get("mode", kind)
                    if not undoing:
                        m.down.add(mode)
                        if mode == "kill":
                            m.kill()
                        else:
                            m.hsm.hang()
                    else:
                        if mode == "kill":
                            m.start_server()
                        else:
                            m.hsm.resume()
                        m.down.discard(mode)
                elif kind == "restart":
                    m.down.add("restart")
                    m.kill()
                    m.start_server()
                    m.down.discard("restart")
                elif kind in ("latency", "slow"):
                    if kind == "slow":
                        (m.down.discard if undoing else m.down.add)("slow")
                    m.relay.latency = 0.0 if undoing else fault.args["seconds"]
                elif kind == "rewrite":
                    if undoing:
                        m.relay.clear(fault.args["call"])
                    else:
                        m.relay.fail(fault.args["call"], int(fault.args["rv"], 16), fault.args["count"],
                                     forward=fault.args["forward"])
                elif kind == "reset":
                    m.relay.reset_connections()

        say(f"signing; {len(schedule)} faults scheduled")
        while True:
            now = _now()
            work.watch(now)
            if rss_start is None and now - t0 >= min(WARMUP, 2.0):
                rss_start = _rss_mib()
            due = [f for f in pending if t0 + f.at <= now]
            for f in due:
                pending.remove(f)
                if f.kind in DOWN_KINDS or f.kind == "all_down":
                    others = down_now() - set(f.members)
                    if f.kind != "all_down" and not (set(names) - others - set(f.members)):
                        skipped.append(f"{f.at:.1f}s {f.describe()}: would take the last member up")
                        continue
                    if f.kind == "all_down" and others:
                        skipped.append(f"{f.at:.1f}s {f.describe()}: members still down: {sorted(others)}")
                        continue
                if f.kind == "all_down":
                    window_start = _now()
                say(f"FAULT   {f.describe()}")
                do(f, undoing=False)
                applied[f.kind] += 1
                if f.length:
                    undo.append((t0 + f.at + f.length, f))
            for when, f in [u for u in undo if u[0] <= now]:
                undo.remove((when, f))
                do(f, undoing=True)
                if f.kind == "all_down" and window_start is not None:
                    windows.append([window_start - t0, _now() - t0])
                    window_start = None
                if f.kind in ("kill", "hang", "all_down", "latency", "slow"):
                    say(f"UNDO    {f.describe()}")
            if now >= end_at and not undo:
                break
            nxt = min([t0 + f.at for f in pending] + [w for w, _ in undo] + [end_at])
            time.sleep(max(0.0, min(0.1, nxt - _now())))

        # -- the end: give everything back, stop the signers, look, close ----------------
        for m in lab:
            m.relay.clear()
            m.relay.latency = 0.0
            if m.hsm.running:
                m.hsm.resume()
            else:
                m.start_server()
            m.down.clear()
        stuck = work.join(lost_after + 2.0)
        work.watch(_now())
        for name in stuck:
            work.lost.append(f"{name}: never returned (thread still alive at the end)")
        say(f"signers stopped; waiting up to {FINAL_RECOVERY:g}s for every member to serve")
        limit = _now() + FINAL_RECOVERY
        while _now() < limit and not all(pool.member(n).serving for n in names):
            time.sleep(0.05)
        rss_end = _rss_mib()
        all_back = [n for n in names if pool.member(n).serving]
        status = pool.status()
        status_text = format_status(pool)
        say("before close:\n" + status_text)
        texts = [status_text, json.dumps([s.as_dict() for s in status]), repr(pool)]
        texts += [repr(pool.member(n)) for n in [*names, "hsm-w"]]
        for t in texts:
            scanner.scan("status and reprs", t)
        counter = _SessionCounter()
        sessions_before = {n: counter.count(pool.member(n)) for n in names}
        expected_sessions = {n: 1 + len(pool.member(n)._g.leases) for n in names}
        wrong = pool.member("hsm-w")
        wrong_state, wrong_logins = wrong.state, wrong.login_attempts
        hosts = {n: pool.member(n)._host.guardian_pid for n in names if pool.member(n)._host is not None}
        close_t0 = _now()
        pool.close()
        close_took = _now() - close_t0
        limit = _now() + 5.0
        while _now() < limit:
            left = {m.name: len(m.children()) for m in lab}
            left["hsm-w"] = len(_children(wrong_hsm.pid))
            links = {m.name: m.relay.connections for m in lab}
            host_left = {n: len(live_group_members(g)) if g else 0 for n, g in hosts.items()}
            if not any(left.values()) and not any(links.values()) and not any(host_left.values()):
                break
            time.sleep(0.05)

        # -- the tally -----------------------------------------------------------------
        grace = deadline
        excused = outside = 0
        outside_examples: list[str] = []
        for fl in work.failures:
            end_rel = fl.ended - t0
            if any(a <= end_rel <= b + grace for a, b in windows):
                excused += 1
            else:
                outside += 1
                if len(outside_examples) < 8:
                    outside_examples.append(f"{fl.started - t0:.2f}s-{end_rel:.2f}s {fl.klass}: {fl.message}")
        rows = [
            Row("calls made", work.calls),
            Row("calls succeeded, signature verified", work.ok),
            Row("calls failed, by class", dict(work.failed_by_class)),
            Row("calls failed inside every-member-down windows (+deadline)", excused),
            Row("calls failed outside those windows", outside, "0", outside == 0),
            Row("calls lost (no answer within deadline + call timeout + 0.5s)", len(work.lost), "0",
                not work.lost),
            Row("wrong signatures", work.wrong, "0", work.wrong == 0),
            Row("unhandled exceptions (non-HSMError from a call, thread crash, 'Exception ignored')",
                len(work.unhandled) + len(thread_errors) + len(unraisable), "0",
                not (work.unhandled or thread_errors or unraisable)),
            Row("log records with a traceback", len(capture.with_traceback), "0", not capture.with_traceback),
            Row("p11-kit-remote children (= SoftHSM instances holding sessions) left after close", left,
                "0 each", not any(left.values())),
            Row("relay links left open after close", links, "0 each", not any(links.values())),
            *([Row("host processes (isolation: process) left after close", host_left, "0 each",
                   not any(host_left.values()))] if hosts else []),
            Row("live sessions per member connection before close (anchor + leases in use)",
                {n: f"{sessions_before[n]} of {expected_sessions[n]}" for n in names}, "no more",
                all(sessions_before[n] == expected_sessions[n] for n in names)),
            Row(f"worst call latency (bound: deadline {deadline:g}s + call timeout {call_timeout:g}s + 0.5s)",
                round(work.worst, 3), f"<= {lost_after:g}s", work.worst <= lost_after),
            Row("call latency histogram (upper bound s: calls)",
                {("inf" if b == float("inf") else f"{b:g}"): c for b, c in sorted(work.buckets.items())}),
            Row("every active member serving again at the end", f"{len(all_back)} of {len(names)}",
                f"{len(names)} of {len(names)}", len(all_back) == len(names)),
            Row("wrong-PIN standby: state, C_Login calls", f"{wrong_state}, {wrong_logins}", "failed, 1",
                wrong_state == "failed" and wrong_logins == 1),
            Row("PIN or wrong PIN seen in logs, records, reprs, errors, status", dict(scanner.hits),
                "nowhere", not scanner.hits),
            Row(f"process RSS growth after warm-up (MiB; start {rss_start or 0:.1f}, end {rss_end:.1f})",
                round(rss_end - (rss_start or rss_end), 1), f"< {RSS_LIMIT_MIB:g}",
                rss_end - (rss_start or rss_end) < RSS_LIMIT_MIB),
        ]
        tally = {
            "seed": seed, "duration": duration, "workdir": tmp, "threads": threads, "members": members,
            "isolation": isolation,
            "call_timeout": call_timeout, "deadline": deadline, "lost_after": lost_after,
            "faults_scheduled": len(schedule), "faults_applied": dict(applied), "faults_skipped": skipped,
            "all_down_windows": [[round(a, 2), round(b, 2)] for a, b in windows],
            "rows": [{"name": r.name, "value": r.value, "must": r.must, "ok": r.ok} for r in rows],
            "failed_outside_windows_examples": outside_examples,
            "lost": work.lost[:20],
            "unhandled": (work.unhandled + thread_errors + unraisable)[:5],
            "tracebacks_in_log": capture.with_traceback[:5],
            "error_messages": dict(sorted(work.messages.items(), key=lambda kv: -kv[1])[:20]),
            "transitions": transitions.count,
            "transitions_by_member_event": {f"{m} {e}": c for (m, e), c in sorted(transitions.events.items())},
            "log_records": dict(capture.by_level),
            "texts_scanned_for_pins": dict(scanner.scanned),
            "server_stderr_lines": {m.name: m.stderr_lines for m in lab},
            "close_seconds": round(close_took, 2),
            "ok": all(r.ok for r in rows),
        }
        say("done")
        _print_tally(tally, rows, out)
    except KeyboardInterrupt:
        say("interrupted: cleaning up")
        tally = {"ok": False, "interrupted": True}
        return 130
    except (LabError, RelayError, RuntimeError) as exc:
        say(f"soak could not run: {exc}")
        tally = {"ok": False, "error": str(exc)}
        return 2
    finally:
        if work is not None:
            work.stop.set()
        for m in lab:
            try:
                m.hsm.resume()
            except Exception:
                pass
        if pool is not None:
            try:
                pool.close()  # idempotent; makes sure nothing of ours still talks to the servers
            except Exception:
                pass
        for m in lab:
            m.relay.stop()
            m.kill()
        if wrong_hsm is not None:
            wrong_hsm.kill()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        hsm_logger.removeHandler(capture)
        hsm_logger.setLevel(saved_logger[0])
        hsm_logger.propagate = saved_logger[1]
        threading.excepthook, sys.unraisablehook = saved_hooks
        if saved_sigterm is not None:
            signal.signal(signal.SIGTERM, saved_sigterm)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if json_path and tally:
            Path(json_path).write_text(json.dumps(tally, indent=2, default=str) + "\n")
    return 0 if tally.get("ok") else 1


def _print_tally(tally: dict[str, Any], rows: list[Row], out: TextIO) -> None:
    p = lambda s="": print(s, file=out)
    p()
    p(f"soak tally (seed {tally['seed']}, {tally['duration']:g}s, {tally['threads']} threads, "
      f"{tally['members']} members + wrong-PIN standby)")
    p(f"  faults applied: {', '.join(f'{k} {v}' for k, v in sorted(tally['faults_applied'].items()))}"
      f"; skipped {len(tally['faults_skipped'])}")
    p(f"  every-member-down windows (s): {tally['all_down_windows']}")
    width = max(len(r.name) for r in rows)
    for r in rows:
        verdict = "" if r.must is None else (f"   must be {r.must}: " + ("ok" if r.ok else "FAILED"))
        p(f"  {r.name:<{width}}  {r.value}{verdict}")
    for key in ("failed_outside_windows_examples", "lost", "unhandled", "tracebacks_in_log", "faults_skipped"):
        if tally.get(key):
            p(f"  {key}:")
            for line in tally[key][:8]:
                p("    " + str(line).replace("\n", "\n    "))
    p(f"  transitions recorded: {tally['transitions']}; log records: {tally['log_records']}; "
      f"close took {tally['close_seconds']}s")
    p("RESULT: " + ("every must-be row holds" if tally["ok"] else "FAILED: a must-be row does not hold"))
