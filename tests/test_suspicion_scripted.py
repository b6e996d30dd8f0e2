"""Suspicion and sessions on ScriptedHSMs and a VirtualClock: the logic of tests/test_suspicion.py,
fast and exact (every time here is virtual).

The shipped network-hsm policy: call timeout 2 s, suspicion multiple 10, floor 50 ms, ceiling 200 ms.
The scripted HSM answers in 0.5 ms, so once 32 calls have answered a member's limit is the floor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from hsmfsm import AllMembersDown, CallTimeout, MemberUnavailable, OutcomeUnknown, State
from hsmfsm.core.records import CallRecord, SuspicionRecord
from hsmfsm.runtime.pool import Pool
from hsmfsm.testing import VirtualClock

from scripted_helpers import MECH, Caller, Recorder, connection, guarded_clock, policy, pool, replicas, signs

pytestmark = pytest.mark.timeout(30)

TICK = 0.02  # the watchdog's period


@pytest.fixture
def clock() -> Iterator[VirtualClock]:
    yield from guarded_clock(limit=20.0)


@pytest.fixture
def rec(clock: VirtualClock) -> Recorder:
    return Recorder(clock)


def with_sessions(n: int, **kw):
    p = policy(**kw)
    return dataclasses.replace(p, sessions=dataclasses.replace(p.sessions, max=n))


class Load:
    """``threads`` callers signing through the pool in a loop until ``stop()``; every call's start,
    end and outcome kept."""

    def __init__(self, clock: VirtualClock, p: Pool, threads: int, pause: float = 0.005) -> None:
        self.clock, self.pool = clock, p
        self.calls: list[tuple[float, float, str]] = []
        self.running = True

        def work(i: int) -> None:
            n = 0
            while self.running:
                t0 = clock.monotonic()
                try:
                    p.sign("rsa", b"%d-%d" % (i, n), MECH)
                    outcome = "ok"
                except Exception as exc:  # kept for the test to look at
                    outcome = f"{type(exc).__name__}: {exc}"
                self.calls.append((t0, clock.monotonic(), outcome))
                n += 1
                clock.sleep(pause)

        self.callers = [Caller(clock, lambda i=i: work(i), f"load-{i}") for i in range(threads)]

    def stop(self) -> None:
        self.running = False
        assert all(c.join(5.0) for c in self.callers)
        assert all(c.error is None for c in self.callers), [c.error for c in self.callers]

    @property
    def failed(self) -> list[str]:
        return [o for _, _, o in self.calls if o != "ok"]

    def slowest(self, since: float = 0.0) -> float:
        return max(end - start for start, end, _ in self.calls if start >= since)


def attempts_by_member(p: Pool) -> list[CallRecord]:
    records: list[CallRecord] = []
    p.add_call_listener(lambda r: records.append(r) if r.kind == "attempt" else None)
    return records


def suspicions(p: Pool) -> list[SuspicionRecord]:
    records: list[SuspicionRecord] = []
    p.add_suspicion_listener(records.append)
    return records


# -- a hung member ---------------------------------------------------------------------------------


def test_a_member_hung_under_load_is_suspected_gets_no_new_calls_and_costs_no_call_more_than_the_ceiling(
        clock, rec) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    a, b = hsms["hsm-a"], hsms["hsm-b"]
    pol = policy()
    ceiling = pol.operations.suspicion.ceiling
    with pool(clock, hsms, pol, recorder=rec, interval=0.5) as p:
        marks, attempts = suspicions(p), attempts_by_member(p)
        load = Load(clock, p, threads=4)
        clock.sleep(0.2)  # warm: every member has answered far more than 32 calls, in ~0.5 ms each
        assert p.member("hsm-a").latency_p99("sign") == pytest.approx(0.001)  # 0.5 ms; 1 ms with a key lookup
        hung_at = clock.monotonic()
        a.hang()
        clock.sleep(2.5)
        a.resume()
        clock.sleep(1.5)
        load.stop()
        assert load.failed == []
        # Suspected about one floor (50 ms) after the hang, within a watchdog tick, and nothing else.
        first = marks[0]
        assert (first.member, first.kind, first.operation) == ("hsm-a", "suspected", "sign")
        assert first.limit == pytest.approx(pol.operations.suspicion.floor)
        suspected_at = rec.clock.monotonic() - (clock.time() - first.time)
        assert hung_at + first.limit < suspected_at <= hung_at + first.limit + TICK + 0.001
        # No call waited for more than the ceiling (the one that overran the floor included).
        assert load.slowest() <= first.limit + TICK + 0.01 < ceiling
        # Once suspected, no new call went to hsm-a while hsm-b served: every attempt on hsm-a started before.
        on_a = [r for r in attempts if r.member == "hsm-a" and suspected_at < r.time - clock.time() + clock.monotonic()
                < hung_at + 2.5]
        assert on_a == []
        # Its probe stayed silent: cut off at the call timeout, as without suspicion; back after the resume.
        cut_at = rec.when("call_timeout", "hsm-a")[0]  # its probe's (the regular one, or the one suspicion asked for)
        assert hung_at + 2.0 < cut_at <= suspected_at + 2.0 + TICK + 0.001
        assert p.member("hsm-a").serving and not p.member("hsm-a").suspected
        assert [m.kind for m in marks] == ["suspected", "cleared"] and "left service" in marks[1].reason
        # hsm-a serves again: it signs its share.
        before = signs(a)
        load = Load(clock, p, threads=4)
        clock.sleep(0.3)
        load.stop()
        assert signs(a) - before > 50 and load.failed == []
        assert rec.of("hsm-b") == rec.of("hsm-b")[:3]  # hsm-b never left logged_in
        assert b.count("initialize") == p.member("hsm-b").links  # one per link it opened, no reconnect


def test_a_suspected_member_that_answers_comes_back(clock, rec) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    a = hsms["hsm-a"]
    with pool(clock, hsms, recorder=rec) as p:
        marks = suspicions(p)
        load = Load(clock, p, threads=2)
        clock.sleep(0.3)
        a.slow(0.12)  # slower than its limit (the 50 ms floor), far from the call timeout
        clock.sleep(0.3)
        a.slow(0.0)
        clock.sleep(0.5)
        load.stop()
        assert load.failed == [] and load.slowest() < 0.05 + TICK + 0.01
        kinds = [(m.member, m.kind) for m in marks]
        assert kinds[0] == ("hsm-a", "suspected") and ("hsm-a", "cleared") in kinds
        assert all("answered" in m.reason for m in marks if m.kind == "cleared")
        # No transition: it kept its state and generation, and serves again.
        assert rec.of("hsm-a") == rec.of("hsm-a")[:3] and p.member("hsm-a").generation == 1
        assert not p.member("hsm-a").suspected
        before = signs(a)
        load = Load(clock, p, threads=2)
        clock.sleep(0.2)
        load.stop()
        assert signs(a) > before


def test_a_keygen_on_a_hung_member_is_never_hedged(clock, rec) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    a, b = hsms["hsm-a"], hsms["hsm-b"]
    pol = policy()
    with pool(clock, hsms, pol, recorder=rec) as p:
        marks = suspicions(p)
        load = Load(clock, p, threads=2)
        clock.sleep(0.3)
        keygen = Caller(clock, lambda: p.member("hsm-a").generate_keypair("EC", 256, "k"))  # on hsm-a, as the pool's
        clock.sleep(0.0001)
        a.hang()
        assert keygen.join(3.0)
        load.stop()
        assert marks and marks[0].kind == "suspected"  # the signatures' overruns
        # The keygen was not cut off when hsm-a was suspected: it met the call timeout, and went nowhere else.
        assert isinstance(keygen.error, OutcomeUnknown)
        assert pol.operations.call_timeout < keygen.elapsed <= pol.operations.call_timeout + TICK + 0.001
        assert b.count("generate_keypair") == 0 and load.failed == []
    # Through the pool: the keygen waits for its call timeout on hsm-a, then is not sent to hsm-b.
    hsms = replicas(clock, "hsm-c", "hsm-d")
    c, d = hsms["hsm-c"], hsms["hsm-d"]
    with pool(clock, hsms, pol) as p:
        load = Load(clock, p, threads=2)
        clock.sleep(0.3)
        c.hang()
        t0 = clock.monotonic()
        with pytest.raises(OutcomeUnknown) as info:
            p.generate_keypair("EC", 256, "k2")  # round robin: hsm-c first
        assert info.value.member == "hsm-c" and clock.monotonic() - t0 > pol.operations.call_timeout
        load.stop()
        assert d.count("generate_keypair") == 0 and load.failed == []


def test_with_no_other_member_serving_nothing_is_suspected_and_a_hung_call_meets_the_call_timeout(clock) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    a, b = hsms["hsm-a"], hsms["hsm-b"]
    pol = policy(deadline=3.0)
    with pool(clock, hsms, pol, interval=10.0) as p:
        marks = suspicions(p)
        for i in range(100):
            p.sign("rsa", b"%d" % i, MECH)
        b.down()
        clock.sleep(1.0)  # hsm-b's loss is noticed by its probe
        assert not p.member("hsm-b").serving
        a.hang()
        t0 = clock.monotonic()
        with pytest.raises((AllMembersDown, CallTimeout)):
            p.sign("rsa", b"stuck", MECH)
        assert clock.monotonic() - t0 > pol.operations.call_timeout
        assert marks == []


def test_a_single_connection_is_never_suspected(clock) -> None:
    hsm = replicas(clock, "hsm-a")["hsm-a"]
    conn = connection(clock, hsm, pol=policy())
    conn.open()
    for i in range(100):
        conn.sign("rsa", b"%d" % i, MECH)
    hsm.slow(0.3)  # far past its limit
    assert conn.sign("rsa", b"slow", MECH)
    assert not conn.suspected and conn.state is State.LOGGED_IN
    conn.close()


# -- sessions ---------------------------------------------------------------------------------------


def test_sessions_never_exceed_sessions_max_under_32_threads(clock) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    with pool(clock, hsms, with_sessions(3)) as p:
        members = [p.member(n) for n in hsms]
        most = {n: 0 for n in hsms}
        links = {n: 0 for n in hsms}
        sampling = [True]

        def sample() -> None:
            while sampling[0]:
                for m in members:
                    most[m.name] = max(most[m.name], m.sessions)
                    links[m.name] = max(links[m.name], m.links)
                clock.sleep(0.0002)

        sampler = Caller(clock, sample, "sampler")
        load = Load(clock, p, threads=32, pause=0.0005)
        clock.sleep(0.2)
        load.stop()
        sampling[0] = False
        assert sampler.join(1.0)
        assert load.failed == []
        assert most == {"hsm-a": 3, "hsm-b": 3} and links == {"hsm-a": 3, "hsm-b": 3}
        # Each of the 3 links is an instance of its own, logged in once (the supervisor's and two more).
        assert all(hsms[n].count("login") == 3 and hsms[n].count("initialize") == 3 for n in hsms)


def test_a_caller_waits_for_a_session_within_its_deadline(clock) -> None:
    hsm = replicas(clock, "hsm-a")["hsm-a"]
    conn = connection(clock, hsm, pol=with_sessions(1))
    conn.open()
    conn.sign("rsa", b"warm", MECH)
    hsm.slow(0.3)
    first = Caller(clock, lambda: conn.sign("rsa", b"1", MECH))
    clock.sleep(0.01)
    second = Caller(clock, lambda: conn.sign("rsa", b"2", MECH))  # waits for the one session
    assert first.join(1.0) and second.join(1.0)
    assert first.error is None and second.error is None
    assert second.ended == pytest.approx(first.ended + 0.3, abs=0.005) and conn.sessions == 1 and conn.links == 1
    # Within its deadline only: one that cannot get a session in time is told so, and nothing was sent.
    hsm.slow(1.5)
    holder = Caller(clock, lambda: conn.sign("rsa", b"held", MECH))
    clock.sleep(0.01)
    with pytest.raises(MemberUnavailable) as info:
        conn.sign("rsa", b"late", MECH, deadline=0.5)
    assert "no session was free within the deadline of 0.5s" in str(info.value)
    assert not info.value.may_have_acted
    assert holder.join(2.0) and holder.error is None
    conn.close()


def test_balancing_counts_free_sessions(clock) -> None:
    """Round robin passes over a member whose sessions are all leased while another has one free."""
    hsms = replicas(clock, "hsm-a", "hsm-b")
    a, b = hsms["hsm-a"], hsms["hsm-b"]
    with pool(clock, hsms, with_sessions(1)) as p:
        clock.sleep(0.01)  # past the first probes
        p.sign("rsa", b"warm", MECH)  # each member finds the key once
        p.sign("rsa", b"warm", MECH)
        a.slow(0.3)
        holder = Caller(clock, lambda: p.sign("rsa", b"held", MECH))  # round robin: hsm-a, its one session
        clock.sleep(0.01)
        t0 = clock.monotonic()
        for i in range(10):
            p.sign("rsa", b"%d" % i, MECH)
        assert clock.monotonic() - t0 < 0.01  # none waited for hsm-a's session: all went to hsm-b
        assert signs(b) == 11 and signs(a) == 1
        assert holder.join(1.0) and holder.error is None
    with pool(clock, replicas(clock, "hsm-c", "hsm-d"), with_sessions(2), balance="least_busy") as p:
        clock.sleep(0.01)
        assert max(p._members, key=lambda m: m.conn._max_sessions - m.conn.inflight).conn.name == "hsm-c"
        c = p.member("hsm-c")
        lease = c._g.idle.pop()  # a session of hsm-c leased: hsm-d has more free
        assert p._pick(list(p._members)).conn.name == "hsm-d"
        c._g.idle.append(lease)
