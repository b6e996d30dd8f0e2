"""HA pools on ScriptedHSMs and a VirtualClock: the behaviours of tests/test_pool.py, fast and exact.

Each member has an HSM of its own (replicas of one token: the same keys, so a signature
from either verifies on both) and a module instance of its own, as in production.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from hsmfsm import AllMembersDown, MemberUnavailable, OutcomeUnknown, Policy, State
from hsmfsm.runtime.pool import MemberStatus, Pool, format_status
from hsmfsm.testing import VirtualClock

from scripted_helpers import (
    MECH,
    NO_TOKEN,
    PIN,
    UP,
    Caller,
    Recorder,
    gaps,
    guarded_clock,
    policy,
    pool,
    replicas,
    signs,
)

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def clock() -> Iterator[VirtualClock]:
    yield from guarded_clock()


@pytest.fixture
def rec(clock: VirtualClock) -> Recorder:
    return Recorder(clock)


def sign_many(p: Pool, n: int, tag: bytes = b"") -> list[bytes]:
    return [p.sign("rsa", tag + b"%d" % i, MECH) for i in range(n)]


def status(p: Pool) -> dict[str, MemberStatus]:
    return {s.name: s for s in p.status()}


# -- failover ----------------------------------------------------------------------------------


def test_a_killed_member_is_failed_over_with_no_error_and_comes_back(clock, rec) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    a, b = hsms["hsm-a"], hsms["hsm-b"]
    with pool(clock, hsms, recorder=rec, interval=1.0) as p:
        sign_many(p, 10)
        assert (signs(a), signs(b)) == (5, 5)  # round robin
        a.down()
        sigs = sign_many(p, 20, b"after")
        assert all(b.verify_signature("rsa", b"after%d" % i, s, MECH) for i, s in enumerate(sigs))
        # hsm-a got one C_Sign after it died (the dead link's answer), and b took every call.
        assert signs(a, "CKR_DEVICE_ERROR") == 1 and signs(a) == 5 and signs(b) == 25
        assert rec.of("hsm-a")[3] == ("logged_in", "connection_lost", "disconnected", "CKR_DEVICE_ERROR")
        st = status(p)
        assert st["hsm-a"].state == "disconnected" and st["hsm-a"].last_code == "HSMFSM_NO_SUCH_TOKEN"
        assert st["hsm-a"].recovery_attempts == 1 and st["hsm-a"].next_attempt_in == pytest.approx(1.0, abs=0.01)
        assert st["hsm-b"].state == "logged_in"
        text = format_status(p)
        assert "recovery 1/6, next in 1s" in text and text.endswith("Status: serving on 1 of 2 members")
        a.up()
        clock.sleep(1.1)  # the next background attempt, X = 1 s after the last
        assert p.member("hsm-a").serving
        sign_many(p, 10, b"back")
        assert (signs(a), signs(b)) == (10, 30)  # back in the rotation


def test_all_members_down_past_the_deadline_names_them_then_one_returns(clock, rec) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    pol = policy()
    with pool(clock, hsms, pol, recorder=rec, interval=1.0, max_attempts=100) as p:
        sign_many(p, 2)
        hsms["hsm-a"].down()
        hsms["hsm-b"].down()
        t0 = clock.monotonic()
        with pytest.raises(AllMembersDown) as info:
            p.sign("rsa", b"nobody", MECH)
        assert clock.monotonic() - t0 == pytest.approx(pol.operations.deadline, abs=0.001)
        err = info.value
        assert {name: (state, code.name if code else None) for name, (state, code) in err.members.items()} == {
            "hsm-a": ("disconnected", "HSMFSM_NO_SUCH_TOKEN"), "hsm-b": ("disconnected", "HSMFSM_NO_SUCH_TOKEN")}
        assert err.member == "signer"
        assert "hsm-a disconnected HSMFSM_NO_SUCH_TOKEN" in str(err)
        assert "hsm-b disconnected HSMFSM_NO_SUCH_TOKEN" in str(err)
        # One C_Sign each (the dead links' answers); nothing was sent into a dead member after that.
        assert signs(hsms["hsm-a"], "CKR_DEVICE_ERROR") == signs(hsms["hsm-b"], "CKR_DEVICE_ERROR") == 1
        hsms["hsm-b"].up()
        t1 = clock.monotonic()
        assert p.sign("rsa", b"back", MECH)  # waits for hsm-b's next attempt (X = 1 s), then serves
        assert clock.monotonic() - t1 <= 1.01
        assert p.member("hsm-b").serving and not p.member("hsm-a").serving


def without_suspicion(pol: Policy) -> Policy:
    """``pol`` with its suspicion limit at the call timeout: the watchdog's cut-off always comes first."""
    ops = pol.operations
    return dataclasses.replace(pol, operations=dataclasses.replace(ops, suspicion=dataclasses.replace(
        ops.suspicion, floor=ops.call_timeout, ceiling=ops.call_timeout)))


@pytest.mark.parametrize("suspicion", [True, False], ids=["suspicion", "no-suspicion"])
def test_a_hung_member_costs_a_caller_at_most_one_call_timeout(clock, rec, suspicion) -> None:
    """With suspicion, the call stuck on the hung member is cut off at the suspicion ceiling (too few
    answers yet for a p99) and re-issued on hsm-b; without, at the call timeout. Either way the
    member itself is cut off at the call timeout (here by the call, or by its probe)."""
    hsms = replicas(clock, "hsm-a", "hsm-b")
    pol = policy() if suspicion else without_suspicion(policy())
    bound = pol.operations.suspicion.ceiling if suspicion else pol.operations.call_timeout
    with pool(clock, hsms, pol, recorder=rec) as p:
        sign_many(p, 4)
        hsms["hsm-a"].hang()
        latencies = []
        for i in range(10):
            t0 = clock.monotonic()
            assert hsms["hsm-b"].verify_signature("rsa", b"%d" % i, p.sign("rsa", b"%d" % i, MECH), MECH)
            latencies.append(clock.monotonic() - t0)
        slow = [t for t in latencies if t > 0.01]
        assert len(slow) == 1 and bound < slow[0] <= bound + 0.025
        assert latencies[0] == slow[0]  # the first call went to hsm-a (round robin), was cut off, then went to b
        clock.sleep(pol.operations.call_timeout)
        assert rec.of("hsm-a")[3] == ("logged_in", "call_timeout", "disconnected", "HSMFSM_CALL_TIMEOUT")
        assert signs(hsms["hsm-b"]) == 12
        hsms["hsm-a"].resume()
        clock.sleep(3.0)
        assert p.member("hsm-a").serving


def test_a_call_is_reissued_at_most_max_reissues_times_across_members(clock, rec) -> None:
    """Both members answer CKR_DEVICE_MEMORY (capacity: impaired, may go again) to every C_Sign. The
    pool goes round them, but no more than operations.max_reissues (3) times, as one connection does:
    not thousands of times until the deadline, hammering two HSMs that are short of memory."""
    hsms = replicas(clock, "hsm-a", "hsm-b")
    with pool(clock, hsms, recorder=rec) as p:
        for hsm in hsms.values():
            hsm.fail("sign", "CKR_DEVICE_MEMORY", times=None)
        t0 = clock.monotonic()
        with pytest.raises(MemberUnavailable) as info:
            p.sign("rsa", b"x", MECH)
        assert clock.monotonic() - t0 < 0.05  # answered at once, not at the deadline
        assert info.value.code.name == "CKR_DEVICE_MEMORY" and info.value.member in hsms
        assert [signs(h, "CKR_DEVICE_MEMORY") for h in hsms.values()] == [2, 2]  # 1 + 3 re-issues
        for hsm in hsms.values():
            hsm.clear_faults()
        assert p.sign("rsa", b"y", MECH)


@pytest.mark.parametrize("suspicion", [True, False], ids=["suspicion", "no-suspicion"])
def test_a_caller_queued_behind_a_hung_probe_waits_less_than_one_call_timeout(clock, rec, suspicion) -> None:
    """hsm-a hangs just before its probe (every 0.5 s: at 0.503): the probe holds hsm-a's one session,
    stuck. A caller that picks hsm-a opens a session of its own, which hangs too. With suspicion, that
    is cut off at the ceiling and the call goes to hsm-b. Without, the watchdog cuts the probe off, and
    with it every link of hsm-a: the caller goes on to hsm-b, its wait bounded by the probe's call
    timeout, not by the hang."""
    hsms = replicas(clock, "hsm-a", "hsm-b")
    pol = policy() if suspicion else without_suspicion(policy())
    with pool(clock, hsms, pol, recorder=rec) as p:
        clock.sleep(0.5 - clock.monotonic())
        hsms["hsm-a"].hang()
        clock.sleep(0.1)
        latencies = []
        for i in range(6):
            t0 = clock.monotonic()
            p.sign("rsa", b"%d" % i, MECH)
            latencies.append(clock.monotonic() - t0)
        if suspicion:  # cut off at the ceiling (and a tick), then hsm-b: its open session, the key, the sign
            assert pol.operations.suspicion.ceiling < latencies[0] <= pol.operations.suspicion.ceiling + 0.022
            clock.sleep(2.0)
        else:  # the probe (stamped at 0.503) is cut at the first watchdog tick past 2.503, 2.52, and the
            # caller's C_Initialize of a link of its own with it; hsm-b then serves it (find the key, sign)
            assert latencies[0] == pytest.approx(2.52 + 0.001 - 0.6, abs=0.0005)
        assert latencies[0] < pol.operations.call_timeout and max(latencies[1:]) < 0.001
        assert rec.of("hsm-a")[3] == ("logged_in", "call_timeout", "disconnected", "HSMFSM_CALL_TIMEOUT")
        assert hsms["hsm-a"].count("session_state", "CKR_DEVICE_ERROR") == 1 and signs(hsms["hsm-b"]) == 6


# -- background and in-call recovery ----------------------------------------------------------


def test_background_recovery_every_x_up_to_n_then_failed_until_recovered(clock, rec) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    with pool(clock, hsms, recorder=rec, interval=1.0, max_attempts=3) as p:
        hsms["hsm-a"].down()
        clock.sleep(10.0)  # no calls at all: the probe notices, the supervisor retries
        assert rec.of("hsm-a")[3:] == [
            ("logged_in", "connection_lost", "disconnected", "CKR_DEVICE_ERROR"), *NO_TOKEN * 2,
            ("disconnected", "connect", "connecting", None),
            ("connecting", "give_up", "failed", "HSMFSM_NO_SUCH_TOKEN")]
        # X apart: 1 s after each failed attempt (no jitter here).
        failed_at = rec.when("connect_failed", "hsm-a")
        connects = rec.when("connect", "hsm-a")[1:]
        assert [round(c - f, 6) for f, c in zip(failed_at, connects[1:])] == [1.0, 1.0]
        st = status(p)["hsm-a"]
        assert (st.state, st.recovery_attempts, st.max_attempts, st.next_attempt_in) == ("failed", 3, 3, None)
        hsms["hsm-a"].up()
        clock.sleep(60.0)
        assert p.member("hsm-a").state is State.FAILED and hsms["hsm-a"].count("initialize") == 4
        sign_many(p, 6)
        assert signs(hsms["hsm-a"]) == 0 and signs(hsms["hsm-b"]) == 6
        mark = rec.mark()
        p.recover("hsm-a")
        clock.sleep(0.1)
        assert rec.rows(mark, member="hsm-a") == [("failed", "reset", "disconnected", None), *UP]
        st = status(p)["hsm-a"]
        assert (st.state, st.recovery_attempts) == ("logged_in", 0)
        sign_many(p, 6)
        assert signs(hsms["hsm-a"]) == 3


def test_an_in_call_pool_connects_its_members_at_open(clock, rec) -> None:
    """The first connect is no recovery: open() makes it in in_call mode too, at once, instead of
    waiting out the deadline for members that nobody asked to connect."""
    hsms = replicas(clock, "hsm-a", "hsm-b")
    p = pool(clock, hsms, mode="in_call", interval=1.0, max_attempts=3, recorder=rec)
    t0 = clock.monotonic()
    p.open()
    assert clock.monotonic() - t0 < 0.01
    assert rec.of("hsm-a") == UP and rec.of("hsm-b") == UP
    assert [(s.state, s.recovery_attempts) for s in p.status()] == [("logged_in", 0), ("logged_in", 0)]
    p.close()


def test_in_call_recovery_only_inside_calls_at_most_every_x_at_most_n(clock, rec) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    a = hsms["hsm-a"]
    with pool(clock, hsms, mode="in_call", interval=1.0, max_attempts=3, recorder=rec) as p:
        ma = p.member("hsm-a")

        def agree(attempts: int, state: str) -> None:
            st = status(p)["hsm-a"]
            assert (st.recovery_attempts, st.state) == (attempts, state) == (ma.recovery_status()[0], ma.state)

        a.down()
        sign_many(p, 2)  # the first finds hsm-a dead; the second makes one attempt inside it (b serves both)
        lost = ("logged_in", "connection_lost", "disconnected", "CKR_DEVICE_ERROR")
        assert rec.of("hsm-a") == [*UP, lost, *NO_TOKEN]
        agree(1, "disconnected")
        clock.sleep(30.0)  # no calls: no attempts
        assert len(rec.of("hsm-a")) == 6
        # A success resets the count: back up, the next due attempt (inside a call) brings it back.
        a.up()
        t0 = clock.monotonic()
        while not ma.serving:
            p.sign("rsa", b"x", MECH)
            clock.sleep(0.1)
        assert rec.of("hsm-a")[6:] == UP and clock.monotonic() - t0 < 0.2
        agree(0, "logged_in")
        # Down again, calls every 0.1 s for 10 s: an attempt at most every X = 1 s, N = 3 in all.
        a.down()
        mark = rec.mark()
        for i in range(100):
            p.sign("rsa", b"%d" % i, MECH)
            clock.sleep(0.1)
        # The N-th failed attempt gives up on the member's own machine (and record).
        gave_up = ("connecting", "give_up", "failed", "HSMFSM_NO_SUCH_TOKEN")
        assert rec.rows(mark, member="hsm-a") == [lost, *NO_TOKEN * 2, NO_TOKEN[0], gave_up]
        attempts = rec.when("connect", "hsm-a", start=mark)
        assert all(1.0 <= g <= 1.11 for g in gaps(attempts)), gaps(attempts)
        assert status(p)["hsm-a"].recovery_attempts == 3 == ma.recovery_status()[0]
        assert status(p)["hsm-a"].next_attempt_in is None
        agree(3, "failed")
        a.up()
        sign_many(p, 20)
        assert not ma.serving and len(rec.rows(mark, member="hsm-a")) == 7  # N used up: only by hand
        p.recover("hsm-a")  # by hand: reset, and one attempt now
        clock.sleep(0.01)
        assert ma.serving and rec.rows(mark, member="hsm-a")[7:] == [("failed", "reset", "disconnected", None), *UP]
        agree(0, "logged_in")


def test_in_call_give_up_is_on_the_members_machine_too(clock, rec) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    with pool(clock, hsms, mode="in_call", interval=1.0, max_attempts=2, recorder=rec) as p:
        hsms["hsm-a"].down()
        for i in range(40):
            p.sign("rsa", b"%d" % i, MECH)
            clock.sleep(0.1)
        assert status(p)["hsm-a"].state == "failed"
        assert p.member("hsm-a").state == "failed"
        assert rec.of("hsm-a")[-1] == ("connecting", "give_up", "failed", "HSMFSM_NO_SUCH_TOKEN")


def test_a_wrong_pin_member_fails_after_one_login_and_the_others_serve(clock, rec) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    pin = ["999999"]
    p = pool(clock, hsms, recorder=rec, pins={"hsm-b": lambda: pin[0]})
    t0 = clock.monotonic()
    p.open()  # does not raise, and does not wait for the member that cannot log in
    assert clock.monotonic() - t0 < 0.01
    assert rec.of("hsm-b") == [*UP[:2], ("open", "fatal", "failed", "CKR_PIN_INCORRECT")]
    st = status(p)["hsm-b"]
    assert (st.state, st.last_code) == ("failed", "CKR_PIN_INCORRECT")
    for _ in range(60):  # ten minutes of calls and background recovery
        sign_many(p, 2)
        clock.sleep(10.0)
    assert hsms["hsm-b"].count("login") == 1 and signs(hsms["hsm-b"]) == 0 and signs(hsms["hsm-a"]) == 120
    pin[0] = PIN
    p.recover("hsm-b")
    clock.sleep(0.01)
    assert p.member("hsm-b").serving and hsms["hsm-b"].count("login") == 2
    sign_many(p, 4)
    assert signs(hsms["hsm-b"]) == 2
    p.close()


# -- choosing a member ------------------------------------------------------------------------


@pytest.mark.parametrize(("balance", "expected"), [("round_robin", (6, 6)), ("primary", (12, 0))])
def test_balance(clock, balance, expected) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    with pool(clock, hsms, balance=balance) as p:
        sign_many(p, 12)
        assert (signs(hsms["hsm-a"]), signs(hsms["hsm-b"])) == expected


def test_standby_serves_only_when_every_active_member_is_down(clock, rec) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    a, b = hsms["hsm-a"], hsms["hsm-b"]
    with pool(clock, hsms, standby=("hsm-b",), interval=1.0) as p:
        sign_many(p, 10)
        assert (signs(a), signs(b)) == (10, 0)
        a.down()
        sign_many(p, 10, b"s")
        assert (signs(a), signs(b)) == (10, 10)
        a.up()
        clock.sleep(1.1)
        assert p.member("hsm-a").serving
        sign_many(p, 10, b"t")
        assert (signs(a), signs(b)) == (20, 10)
        assert [s.role for s in p.status()] == ["active", "standby"]


def test_a_degraded_member_gets_traffic_only_when_no_healthy_one_serves(clock, rec) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    a, b = hsms["hsm-a"], hsms["hsm-b"]
    with pool(clock, hsms, policy(probe_interval=30.0), recorder=rec) as p:
        a.fail("sign", "CKR_DEVICE_MEMORY", times=3)  # capacity: impaired, and the call goes to b
        sign_many(p, 6)
        assert p.member("hsm-a").state is State.DEGRADED
        assert rec.of("hsm-a")[3:] == [("logged_in", "impaired", "degraded", "CKR_DEVICE_MEMORY")]
        assert signs(a, "CKR_DEVICE_MEMORY") == 3 and signs(b) == 6
        sign_many(p, 20)
        assert signs(a) == 0 and signs(b) == 26
        b.down()
        sign_many(p, 5)  # b is gone: the degraded member serves
        assert signs(a) == 5
        b.up()
        clock.sleep(61.0)  # two healthy probes (30 s apart) take hsm-a back to logged_in; b is back too
        assert p.member("hsm-a").state is State.LOGGED_IN and p.member("hsm-b").state is State.LOGGED_IN
        before = signs(a), signs(b)
        sign_many(p, 10)
        assert (signs(a) - before[0], signs(b) - before[1]) == (5, 5)


# -- keygen -----------------------------------------------------------------------------------


def test_keygen_goes_to_another_member_only_when_it_never_left(clock, rec) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    a, b = hsms["hsm-a"], hsms["hsm-b"]
    with pool(clock, hsms, recorder=rec) as p:
        clock.sleep(0.01)  # past the first probes
        a.slow(0.5)  # hsm-a's one open session is held by a slow call ...
        holder = Caller(clock, lambda: p.member("hsm-a").sign("rsa", b"held", MECH))
        clock.sleep(0.01)
        a.fail("initialize", "CKR_DEVICE_ERROR")  # ... and hsm-a cannot even open another for the keygen
        key = p.generate_keypair("RSA", 2048, "k1")
        assert key.label == "k1"
        assert a.count("generate_keypair") == 0 and b.count("generate_keypair") == 1
        assert "k1" in b.key_labels() and "k1" not in a.key_labels()
        a.slow(0.0)
        assert holder.join(1.0)
    others = replicas(clock, "hsm-c", "hsm-d")
    c, d = others["hsm-c"], others["hsm-d"]
    with pool(clock, others) as p:
        p.sign("rsa", b"open a session on each", MECH)
        p.sign("rsa", b"open a session on each", MECH)
        c.fail("generate_keypair", "CKR_DEVICE_ERROR")  # sent, then the link died: it may exist on hsm-c
        with pytest.raises(OutcomeUnknown) as info:
            p.generate_keypair("RSA", 2048, "k2")
        assert info.value.member == "hsm-c" and info.value.code.name == "CKR_DEVICE_ERROR"
        assert c.count("generate_keypair") == 1 and d.count("generate_keypair") == 0


# -- listeners that call back in ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["background", "in_call"])
def test_a_listener_may_recover_a_member_from_inside_a_record(clock, rec, mode) -> None:
    """Background: on give_up (recorded in the member's supervisor). In-call: on the failed attempt a call
    asked for (recorded in the supervisor too, while the caller waits). The listener brings the HSM back
    and calls pool.recover(): no deadlock, and the member serves again."""
    hsms = replicas(clock, "hsm-a", "hsm-b")
    p = pool(clock, hsms, recorder=rec, mode=mode, interval=1.0, max_attempts=2)
    trigger = "give_up" if mode == "background" else "connect_failed"

    def recover(record) -> None:
        if record.member == "hsm-a" and record.event == trigger:
            hsms["hsm-a"].up()
            p.recover("hsm-a")

    p.add_listener(recover)
    p.open()
    hsms["hsm-a"].down()
    if mode == "in_call":
        sign_many(p, 2)  # the first finds hsm-a dead, the second asks for an attempt
    job = Caller(clock, lambda: clock.sleep(5.0), "waiter")
    assert job.join(10.0), "a listener's recover() deadlocked"
    lost = ("logged_in", "connection_lost", "disconnected", "CKR_DEVICE_ERROR")
    if mode == "background":
        assert rec.of("hsm-a")[3:] == [lost, *NO_TOKEN, ("disconnected", "connect", "connecting", None),
                                       ("connecting", "give_up", "failed", "HSMFSM_NO_SUCH_TOKEN"),
                                       ("failed", "reset", "disconnected", None), *UP]
    else:
        assert rec.of("hsm-a")[3:] == [lost, *NO_TOKEN, *UP]
    assert p.member("hsm-a").serving and status(p)["hsm-a"].recovery_attempts == 0
    p.close()
