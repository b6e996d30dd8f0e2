"""Run a scenario: the production connection or pool, scripted HSMs, one virtual clock.

Everything that runs is the runtime's own code: :class:`SlotConnection` with its
supervisor and the watchdog, and for a pool file :class:`Pool` built as
:meth:`Pool.from_spec` builds it (the pool's policy through ``Pool.member_policy``,
background or in-call recovery, standbys). Not by ``from_spec`` itself: its
members would read their PINs from the pool file's sources, and it would open
the pool file's audit record. Only the edge is replaced: each
member's module is a :class:`~hsmfsm.testing.ScriptedModule` on a
:class:`~hsmfsm.testing.ScriptedHSM` of its own, and every thread (the
supervisors, the watchdog, the workload, the fault schedule) runs on one
:class:`~hsmfsm.testing.VirtualClock`. PINs are supplied by a callable, so no
environment variable or PIN file is read or set, and the pool's audit record
is not written.

Determinism: the clock runs one thread at a time by fixed rules, the seed
drives the back-off's jitter, and the watchdog ticks connections in the order
they registered. The same scenario gives the same :class:`Outcome`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

from ...config.scenario_file import Scenario
from ...core.errors import HSMError
from ...core.records import SuspicionRecord, TransitionRecord
from ...runtime.clock import SYSTEM
from ...runtime.connection import SlotConnection
from ...runtime.edge import PRIVATE_KEY
from ...runtime.pool import Pool
from ...testing import ScriptedHSM, ScriptedModule, VirtualClock, VirtualDeadlock
from .model import END, Action, FailedCall, Mark, Outcome, Transition, schedule

__all__ = ["SimulationError", "simulate"]

#: The PIN every member is given, and the one a wrong-PIN member's HSM has instead. Not secrets:
#: scripted tokens exist only for the length of a run.
PIN = "simulated-pin"
OTHER_PIN = "another-pin"

#: What the workload's calls use: the scripted token's EC key (ECDSA over a SHA-256 digest, as the
#: lab's SoftHSM signs) and RSA key (OAEP).
SIGN_KEY, SIGN_MECHANISM = "ec", "ECDSA"
DECRYPT_KEY, DECRYPT_MECHANISM = "rsa", "RSA_PKCS_OAEP"
DIGEST = hashlib.sha256(b"hsmfsm simulate").digest()
PLAINTEXT = b"hsmfsm simulate"
RANDOM_BYTES = 32


class SimulationError(RuntimeError):
    """The run could not complete (a virtual deadlock: no thread could ever run again)."""


class _World:
    """The HSMs, their modules and the connections (or the pool) of one run."""

    def __init__(self, scenario: Scenario, clock: VirtualClock) -> None:
        self.scenario = scenario
        wrong = {m for f in scenario.faults if f.kind == "wrong_pin" for m in f.members}
        spec = scenario.pool
        labels = [m.token_label for m in spec.members] if spec is not None else ["token"]
        self.hsms = {
            name: ScriptedHSM(label=label, pin=OTHER_PIN if name in wrong else PIN, seed=scenario.seed,
                              latency=scenario.latency, clock=clock)
            for name, label in zip(scenario.members, labels)
        }
        pin: Callable[[], str] = lambda: PIN
        self.connections: list[SlotConnection] = []
        self.pool: Pool | None = None
        if spec is None:
            name = scenario.members[0]
            self.connections.append(SlotConnection(ScriptedModule(self.hsms[name], clock, name=name), labels[0],
                                                   pin, scenario.policy, name=name, clock=clock))
            self.target: Any = self.connections[0]
            return
        # What Pool.from_spec(spec, clock=clock, modules=...) builds (a test holds the two equal), with
        # two differences it cannot be asked for: a PIN from the simulator instead of the file's
        # env:/file: source, and no audit record.
        r = spec.recovery
        member_policy = Pool.member_policy(spec.policy, r.mode, r.interval, r.max_attempts)
        background = r.mode == "background"
        members = []
        for m in spec.members:
            conn = SlotConnection(ScriptedModule(self.hsms[m.name], clock, name=m.name), m.token_label, pin,
                                  member_policy, name=m.name, probe=background, wait_for_recovery=False,
                                  auto_recover=background, clock=clock)
            self.connections.append(conn)
            members.append((conn, m.standby))
        self.pool = Pool(spec.name, members, spec.policy, balance=spec.balance, recovery_mode=r.mode,
                         recovery_interval=r.interval, recovery_max_attempts=r.max_attempts, clock=clock)
        self.target = self.pool

    def add_listener(self, listener: Callable[[TransitionRecord], None]) -> None:
        for conn in self.connections:
            conn.add_listener(listener)

    def open(self) -> None:
        """Start recovering at once; the run does not wait for anyone to log in."""
        try:
            self.target.open(wait=0)
        except HSMError:  # a rejected PIN: the connection is failed, which the timeline shows
            pass

    def close(self) -> None:
        self.target.close()

    def apply(self, action: Action) -> None:
        o = action.occurrence
        hsm, fault = self.hsms[o.member], o.fault
        if action.step == END:  # a lasting fault is undone
            if fault.kind == "down":
                hsm.up()
            elif fault.kind == "hang":
                hsm.resume()
            else:
                hsm.slow(0.0)
        elif fault.kind == "down":
            hsm.down()
        elif fault.kind == "hang":
            hsm.hang()
        elif fault.kind == "restart":
            hsm.restart()
        elif fault.kind == "logout":
            hsm.logout_all()
        elif fault.kind == "slow":
            hsm.slow(fault.by or 0.0)
        elif fault.kind == "return":
            assert fault.call is not None and fault.code is not None
            hsm.fail(fault.call, fault.code, fault.times)


def _reference_signature(scenario: Scenario, label: str) -> bytes:
    """The token's signature of :data:`DIGEST`, made on a replica of it (the same seed, label and keys
    make the same key material) in real time with no latency, so that the run's HSMs see no extra call."""
    replica = ScriptedHSM(label=label, pin=PIN, seed=scenario.seed, latency=0.0, clock=SYSTEM)
    module = ScriptedModule(replica, SYSTEM, name="reference")
    module.initialize()
    session = module.open_session(module.find_token(label))
    module.login(session, PIN)
    key = module.find_key(session, SIGN_KEY, PRIVATE_KEY)
    signature: bytes = module.sign(key, DIGEST, module.mechanism(SIGN_MECHANISM), None)
    return signature


def _operation(world: _World, scenario: Scenario) -> tuple[Callable[[int, int], Any], Callable[[Any], bool]]:
    """The workload's call (thread, call number) -> result, and the check of its result."""
    target, first = world.target, next(iter(world.hsms.values()))
    op = scenario.workload.operation
    if op == "sign":
        return (lambda i, n: target.sign(SIGN_KEY, DIGEST, mechanism=SIGN_MECHANISM),
                lambda sig: first.verify_signature(SIGN_KEY, DIGEST, sig, SIGN_MECHANISM))
    if op == "verify":
        signature = _reference_signature(scenario, first.label)
        if not first.verify_signature(SIGN_KEY, DIGEST, signature, SIGN_MECHANISM):
            raise SimulationError("the reference signature does not verify on the scripted HSM")
        return (lambda i, n: target.verify(SIGN_KEY, DIGEST, signature, mechanism=SIGN_MECHANISM),
                lambda ok: ok is True)
    if op == "decrypt":
        ciphertext = first.encrypt(DECRYPT_KEY, PLAINTEXT)
        return (lambda i, n: target.decrypt(DECRYPT_KEY, ciphertext, mechanism=DECRYPT_MECHANISM),
                lambda plain: plain == PLAINTEXT)
    if op == "generate_random":
        return (lambda i, n: target.generate_random(RANDOM_BYTES),
                lambda data: isinstance(data, bytes) and len(data) == RANDOM_BYTES)
    return (lambda i, n: target.generate_keypair("EC", 256, f"simulated-{i}-{n}"),
            lambda key: key is not None)


def simulate(scenario: Scenario) -> Outcome:
    """Run ``scenario`` on virtual time and return what happened. Raises :class:`SimulationError`
    when the run cannot complete."""
    out = Outcome(scenario)
    with VirtualClock(seed=scenario.seed, epoch=0.0) as clock:
        try:
            _run(scenario, clock, out)
        except VirtualDeadlock as exc:
            raise SimulationError(str(exc)) from None
        out.internal_errors += [f"{f.at:.6f}s {f.thread}: {type(f.error).__name__}: {f.error}"
                                for f in clock.errors]
    return out


def _run(scenario: Scenario, clock: VirtualClock, out: Outcome) -> None:
    world = _World(scenario, clock)
    recording = [True]

    def record(r: TransitionRecord) -> None:
        if recording[0]:
            out.timeline.append(Transition(r.time, r.member, r.source, r.dest, r.event, r.code_name, r.code_value))

    def mark(r: SuspicionRecord) -> None:
        if recording[0]:
            out.marks.append(Mark(r.time, r.member, r.kind, r.operation, r.elapsed, r.limit, r.reason))

    world.add_listener(record)
    if world.pool is not None:
        world.pool.add_suspicion_listener(mark)
    call, check = _operation(world, scenario)
    workload, duration = scenario.workload, scenario.duration
    world.open()
    threads = []
    if workload.rate > 0:
        for i in range(workload.threads):
            threads.append(clock.start_thread(_worker(clock, out, call, check, i, workload.threads,
                                                      workload.rate, duration, workload.operation),
                                              f"simulate-workload-{i}"))
    for action in schedule(scenario):
        if action.at >= duration:
            break  # a fault that lasts past the end is never undone
        _sleep_until(clock, action.at)
        world.apply(action)
    _sleep_until(clock, duration)
    for thread in threads:
        thread.join()
    out.ended = clock.monotonic()
    out.logins = {c.name: c.login_attempts for c in world.connections}
    out.final_states = {c.name: str(c.state) for c in world.connections}
    recording[0] = False  # closing is the simulator's business, not the scenario's
    world.close()


def _sleep_until(clock: VirtualClock, t: float) -> None:
    delay = t - clock.monotonic()
    if delay > 0:
        clock.sleep(delay)


def _worker(clock: VirtualClock, out: Outcome, call: Callable[[int, int], Any], check: Callable[[Any], bool],
            index: int, threads: int, rate: float, duration: float, operation: str) -> Callable[[], None]:
    """Thread ``index`` of ``threads``: its calls at ``offset + k * period``, staggered, until ``duration``.
    A call that overruns its slot is followed at once by the next; missed slots are not made up."""
    period, offset = threads / rate, index / rate

    def run() -> None:
        k = n = 0
        while True:
            slot = offset + k * period
            if slot >= duration:
                return
            _sleep_until(clock, slot)
            started = clock.monotonic()
            try:
                result = call(index, n)
            except HSMError as exc:
                out.failures.append(FailedCall(started, clock.monotonic(), index, operation, type(exc).__name__,
                                               exc.member, exc.code.name if exc.code else None,
                                               str(exc.state) if exc.state else None, str(exc)))
            except Exception as exc:  # not an HSMError: a bug in what is simulated, reported as such
                out.failures.append(FailedCall(started, clock.monotonic(), index, operation, type(exc).__name__,
                                               "-", None, None, str(exc)))
            else:
                out.ok += 1
                if not check(result):
                    out.wrong += 1
            out.calls += 1
            n += 1
            out.slowest = max(out.slowest, clock.monotonic() - started)
            k += 1
            now = clock.monotonic()
            if offset + k * period < now:
                k = max(k, math.ceil((now - offset) / period))

    return run
