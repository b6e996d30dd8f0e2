"""SlotConnection on a ScriptedHSM and a VirtualClock: the behaviours of tests/test_connection.py, fast.

Every time here is virtual: a test that waits minutes of the policy's time runs in
milliseconds, and the interleaving of the supervisor, the watchdog and the callers is
the same on every run, so transition sequences, call counts and timings are exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hsmfsm import CallTimeout, LoginRejected, MemberUnavailable, OperationFailed, OutcomeUnknown, SlotConnection, State
from hsmfsm.testing import ScriptedHSM, ScriptedModule, VirtualClock

from scripted_helpers import MECH, NO_TOKEN, PIN, UP, Caller, Recorder, connection, gaps, guarded_clock, policy, signs

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def clock() -> Iterator[VirtualClock]:
    yield from guarded_clock()


@pytest.fixture
def hsm(clock: VirtualClock) -> ScriptedHSM:
    return ScriptedHSM(label="tok", pin=PIN, clock=clock)


@pytest.fixture
def rec(clock: VirtualClock) -> Recorder:
    return Recorder(clock)


# -- the link: killed, down for good, hung, restarted --------------------------------------


def test_killed_hsm_reconnects_with_backoff_and_the_sign_is_reissued(clock, hsm, rec) -> None:
    conn = connection(clock, hsm, pol=policy(), recorder=rec, probe=False)
    conn.open()
    assert rec.rows() == UP and conn.generation == 1
    conn.sign("rsa", b"one", MECH)
    hsm.down()
    hsm.at(2.0, "up")
    mark = rec.mark()
    t0 = clock.monotonic()
    signature = conn.sign("rsa", b"two", MECH)  # waits for the reconnect, then goes again: no error
    elapsed = clock.monotonic() - t0
    assert hsm.verify_signature("rsa", b"two", signature, MECH)
    assert elapsed < conn.policy.operations.deadline
    assert rec.rows(mark) == [("logged_in", "connection_lost", "disconnected", "CKR_DEVICE_ERROR"),
                              *NO_TOKEN * 5, *UP]
    # The back-off of network-hsm: 0.1 s doubling (no jitter here), the sixth attempt after the HSM is back.
    failed_at = rec.when("connect_failed")
    connect_at = rec.when("connect", start=mark)
    assert gaps(failed_at) == pytest.approx([0.101, 0.201, 0.401, 0.801])
    assert [round(c - f, 6) for f, c in zip(failed_at, connect_at[1:])] == [0.1, 0.2, 0.4, 0.8, 1.6]
    assert rec.attempts("connect_failed") == [1, 2, 3, 4, 5]
    assert connect_at[-1] > 2.0 > connect_at[-2]
    assert conn.state is State.LOGGED_IN and conn.generation == 2 and conn.login_attempts == 2
    # One C_Sign before, the one the link broke, and the re-issue.
    assert signs(hsm) == 2 and signs(hsm, "CKR_DEVICE_ERROR") == 1
    conn.close()


def test_hsm_down_past_the_deadline_raises_member_unavailable(clock, hsm, rec) -> None:
    pol = policy()
    conn = connection(clock, hsm, pol=pol, recorder=rec, probe=False)
    conn.open()
    conn.sign("rsa", b"warm", MECH)
    hsm.down()
    t0 = clock.monotonic()
    with pytest.raises(MemberUnavailable) as info:
        conn.sign("rsa", b"nobody", MECH)
    assert clock.monotonic() - t0 == pytest.approx(pol.operations.deadline, abs=0.001)
    err = info.value
    assert err.member == "hsm-a" and "hsm-a" in str(err) and "deadline of 8s" in str(err)
    assert err.code is not None and err.code.name == "HSMFSM_NO_SUCH_TOKEN"
    assert err.state == "disconnected" and not err.may_have_acted
    assert signs(hsm, "CKR_DEVICE_ERROR") == 1 and signs(hsm) == 1  # never re-issued into a dead link
    hsm.up()
    assert conn.sign("rsa", b"back", MECH)  # the next call waits for the reconnect and succeeds
    assert conn.state is State.LOGGED_IN and signs(hsm) == 2
    conn.close()


def test_hung_hsm_is_cut_off_at_the_call_timeout_then_recovers(clock, hsm, rec) -> None:
    pol = policy()
    conn = connection(clock, hsm, pol=pol, recorder=rec, probe=False)
    conn.open()
    conn.sign("rsa", b"warm", MECH)
    hsm.hang()
    mark = rec.mark()
    t0 = clock.monotonic()
    with pytest.raises(CallTimeout) as info:
        conn.sign("rsa", b"stuck", MECH)
    elapsed = clock.monotonic() - t0
    assert pol.operations.call_timeout < elapsed <= pol.operations.call_timeout + 0.021  # one watchdog period
    err = info.value
    assert err.member == "hsm-a" and err.code is not None and err.code.name == "HSMFSM_CALL_TIMEOUT"
    assert err.reissue and err.may_have_acted
    # The watchdog recorded the loss (call_timeout, not connection_lost), and reconnecting hangs too.
    assert rec.rows(mark)[0] == ("logged_in", "call_timeout", "disconnected", "HSMFSM_CALL_TIMEOUT")
    assert rec.when("call_timeout", start=mark)[0] == pytest.approx(t0 + elapsed, abs=0.001)
    assert signs(hsm, "CKR_DEVICE_ERROR") == 1  # the cut-off call came back as a dead link
    clock.sleep(5.0)  # still hung: every reconnect hangs in C_Initialize and is cut off in turn
    assert conn.state is not State.LOGGED_IN
    hsm.resume()
    t1 = clock.monotonic()
    assert conn.sign("rsa", b"back", MECH)
    assert clock.monotonic() - t1 < pol.operations.deadline
    timeout = ("connecting", "call_timeout", "disconnected", "HSMFSM_CALL_TIMEOUT")
    connect = ("disconnected", "connect", "connecting", None)
    assert rec.rows(mark) == [("logged_in", "call_timeout", "disconnected", "HSMFSM_CALL_TIMEOUT"),
                              connect, timeout, connect, timeout, *UP]
    # Each hung C_Initialize: the watchdog recorded call_timeout first, so the supervisor's own
    # connect_failed for it was refused and counted, not dropped; the attempt still counted (back-off).
    assert dict(conn.ignored_events) == {(State.DISCONNECTED, "connect_failed"): 2}
    assert rec.attempts("connect")[-3:] == [0, 1, 2]
    connects, cuts = rec.when("connect", start=mark), rec.when("call_timeout", start=mark)
    assert [round(c - t, 6) for t, c in zip(cuts[1:], connects[1:])] == [0.1, 0.2]
    assert all(2.0 < cut - start <= 2.021 for start, cut in zip(connects, cuts[1:]))
    assert conn.state is State.LOGGED_IN and conn.generation == 4
    conn.close()


class OneLinkModule(ScriptedModule):
    """A module that serves one request at a time and cannot open a second link (no ``new_link``):
    every session of the connection is on this instance, behind one call lock."""

    new_link = None  # type: ignore[assignment]


def test_a_hung_call_of_a_retired_generation_is_not_recorded_twice(clock, hsm, rec) -> None:
    """A caller hangs holding the module's call lock; the probe, waiting for that lock to probe the
    other (idle) session, times out first (Busy) and records the loss. When the watchdog then cuts the
    caller's call off, that call belongs to the retired generation: the loss is on the record already,
    and the reconnect under way must not be knocked down by a second call_timeout against the new one."""
    module = OneLinkModule(hsm, clock, name="hsm-a")
    conn = SlotConnection(module, hsm.label, lambda: PIN, policy(probe_interval=0.5), name="hsm-a", clock=clock,
                          rand=lambda: 0.5)  # probes at 0.0025, 0.503
    conn.add_listener(rec)
    conn.open()
    clock.sleep(0.01)  # past the first probe, which leases a session of its own
    warm = [Caller(clock, lambda d=d: conn.sign("rsa", d, MECH)) for d in (b"warm1", b"warm2")]
    assert all(c.join(1.0) for c in warm) and conn.sessions == 2 and conn.links == 1
    clock.sleep(0.5015 - clock.monotonic())  # just after a watchdog tick (every 0.02 s), before the probe
    hsm.hang()
    hsm.at(3.0, "resume")
    caller = Caller(clock, lambda: conn.sign("rsa", b"stuck", MECH))
    assert caller.join(5.0)
    assert isinstance(caller.error, CallTimeout) and 2.0 < caller.elapsed <= 2.021
    clock.sleep(1.0)
    assert rec.rows()[3:] == [("logged_in", "call_timeout", "disconnected", "HSMFSM_CALL_TIMEOUT"), *UP]
    assert rec.when("call_timeout") == [pytest.approx(2.503, abs=0.001)]  # the probe's lock wait: 0.503 + 2
    assert not conn.ignored_events
    assert conn.state is State.LOGGED_IN and conn.generation == 2
    assert hsm.count("initialize") == 2  # one reconnect, not two
    conn.close()


def test_restart_never_reuses_a_stale_session(clock, hsm, rec) -> None:
    conn = connection(clock, hsm, recorder=rec, probe=False)
    conn.open()
    conn.sign("rsa", b"x", MECH)
    old = conn._g
    old_sessions = [lease.session for lease in old.leases] + [old.anchor]
    hsm.restart()
    mark = rec.mark()
    assert conn.sign("rsa", b"y", MECH)
    assert rec.rows(mark) == [("logged_in", "connection_lost", "disconnected", "CKR_DEVICE_ERROR"), *UP]
    new = conn._g
    assert new is not old and new.number == old.number + 1 == 2
    assert all(lease.g is new for lease in new.leases)
    sessions = [lease.session for lease in new.leases] + [new.anchor]
    assert not any(s is o for s in sessions for o in old_sessions)
    assert all(s.epoch > o.epoch for s in sessions for o in old_sessions)  # opened after the re-initialisation
    # A stale handle was never sent (it would answer CKR_SESSION_HANDLE_INVALID), nor closed.
    assert hsm.count("sign", "CKR_SESSION_HANDLE_INVALID") == 0 and hsm.count("close_session") == 0
    assert hsm.count("initialize") == 2 and signs(hsm) == 2
    conn.close()


# -- a lost session, a lost login ---------------------------------------------------------


def test_lost_session_opens_a_new_one_without_reinitialising(clock, hsm, rec) -> None:
    conn = connection(clock, hsm, recorder=rec, probe=False)
    conn.open()
    conn.sign("rsa", b"x", MECH)
    hsm.fail("sign", "CKR_SESSION_HANDLE_INVALID")
    mark = rec.mark()
    assert hsm.verify_signature("rsa", b"y", conn.sign("rsa", b"y", MECH), MECH)
    assert rec.rows(mark) == [("logged_in", "session_lost", "connecting", "CKR_SESSION_HANDLE_INVALID"), *UP[1:]]
    assert conn.generation == 2
    # No C_Finalize, no second C_Initialize: only the lost generation's two sessions closed (lease and anchor).
    assert hsm.count("initialize") == 1 and hsm.count("finalize") == 0
    assert hsm.count("close_session", "CKR_OK") == 1  # the lost generation's one session, which the call had leased
    assert hsm.count("login") == 2 and signs(hsm) == 2 and signs(hsm, "CKR_SESSION_HANDLE_INVALID") == 1
    conn.close()


def test_lost_login_logs_in_once_more_and_keeps_the_sessions(clock, hsm, rec) -> None:
    conn = connection(clock, hsm, recorder=rec, probe=False)
    conn.open()
    conn.sign("rsa", b"x", MECH)
    hsm.logout_all()
    mark = rec.mark()
    assert conn.sign("rsa", b"y", MECH)
    assert rec.rows(mark) == [("logged_in", "login_lost", "open", "CKR_USER_NOT_LOGGED_IN"),
                              ("open", "login_ok", "logged_in", "CKR_OK")]
    assert conn.generation == 1  # the sessions are still good: no new generation
    assert hsm.count("login") == 2 == conn.login_attempts
    # One session all along: the logged-in one, which the calls lease.
    assert hsm.count("initialize") == 1 and hsm.count("open_session") == 1 and hsm.count("close_session") == 0
    assert signs(hsm) == 2 and signs(hsm, "CKR_USER_NOT_LOGGED_IN") == 1
    conn.close()


def test_probe_notices_a_silent_logout(clock, hsm, rec) -> None:
    conn = connection(clock, hsm, pol=policy(probe_interval=0.5), recorder=rec)
    conn.open()
    clock.sleep(0.1)  # after the first probe (at login)
    hsm.logout_all()
    clock.sleep(1.0)
    assert rec.rows()[3:] == [("logged_in", "login_lost", "open", "CKR_USER_NOT_LOGGED_IN"),
                              ("open", "login_ok", "logged_in", "CKR_OK")]
    assert rec.when("login_lost") == [pytest.approx(0.5025, abs=0.001)]  # the first probe after the logout
    assert hsm.count("login") == 2 and signs(hsm) == 0
    conn.close()


def test_probe_brings_an_idle_connection_back_with_no_caller(clock, hsm, rec) -> None:
    pol = policy(probe_interval=0.5)
    conn = connection(clock, hsm, pol=pol, recorder=rec)
    conn.open()
    hsm.at(0.2, "down")
    hsm.at(1.0, "up")
    clock.sleep(3.0)
    assert rec.rows() == [*UP, ("logged_in", "connection_lost", "disconnected", "CKR_DEVICE_ERROR"),
                          *NO_TOKEN * 3, *UP]
    lost = rec.when("connection_lost")
    assert lost == [pytest.approx(0.5025, abs=0.001)]  # the first probe after the HSM died
    connects = rec.when("connect")
    assert gaps(connects[1:]) == pytest.approx([0.101, 0.201, 0.401])  # back-off 0.1, 0.2, 0.4
    assert connects[-1] > 1.0 > connects[-2]
    assert conn.state is State.LOGGED_IN and conn.generation == 2
    # Nobody called: the probe did it all (one good, one failed, four good since the login at 1.2 s).
    assert signs(hsm) == 0 and hsm.count("session_state") == 6 and hsm.count("session_state", "CKR_DEVICE_ERROR") == 1
    conn.close()


# -- the PIN ------------------------------------------------------------------------------


def test_wrong_pin_is_tried_exactly_once_until_reset(clock, hsm, rec) -> None:
    pin = ["999999"]
    conn = connection(clock, hsm, pol=policy(probe_interval=0.05), pin=lambda: pin[0], recorder=rec)
    with pytest.raises(LoginRejected) as info:
        conn.open()
    err = info.value
    assert err.member == "hsm-a" and err.code is not None and err.code.name == "CKR_PIN_INCORRECT"
    assert err.state == "failed" and "999999" not in str(err) and "999999" not in repr(conn)
    assert conn.state is State.FAILED
    assert rec.rows() == [*UP[:2], ("open", "fatal", "failed", "CKR_PIN_INCORRECT")]
    assert hsm.count("login") == 1 == conn.login_attempts
    clock.sleep(600.0)  # ten minutes of probe intervals and back-off periods: nothing tries again
    assert conn.state is State.FAILED and hsm.count("login") == 1
    for _ in range(3):
        with pytest.raises(LoginRejected):
            conn.sign("rsa", b"refused", MECH)
    assert hsm.count("login") == 1 and signs(hsm) == 0 and len(rec.records) == 3
    pin[0] = PIN
    conn.reset()
    clock.sleep(0.1)
    assert rec.rows()[3:] == [("failed", "reset", "disconnected", None), *UP]
    assert hsm.count("login") == 2 and hsm.count("login", "CKR_OK") == 1
    assert conn.sign("rsa", b"fixed", MECH) and conn.state is State.LOGGED_IN
    conn.close()


# -- giving up ----------------------------------------------------------------------------


def test_give_up_after_max_attempts_failed_connects(clock, hsm, rec) -> None:
    hsm.down()
    conn = connection(clock, hsm, pol=policy(max_attempts=3), recorder=rec)
    with pytest.raises(MemberUnavailable) as info:
        conn.open(wait=60.0)
    assert "gave up after 3 connect attempts" in str(info.value) and info.value.member == "hsm-a"
    assert rec.rows() == [*NO_TOKEN * 2, ("disconnected", "connect", "connecting", None),
                          ("connecting", "give_up", "failed", "HSMFSM_NO_SUCH_TOKEN")]
    assert rec.when("give_up") == [pytest.approx(0.303, abs=0.001)]  # 0.1 + 0.2 of back-off, then no more
    hsm.up()
    t0 = clock.monotonic()
    clock.sleep(300.0)  # the clock is not stuck, and nothing tries again
    assert clock.monotonic() == pytest.approx(t0 + 300.0)
    assert conn.state is State.FAILED and hsm.count("initialize") == 3
    with pytest.raises(MemberUnavailable, match="waits for reset"):
        conn.sign("rsa", b"x", MECH)
    conn.reset()
    assert conn.sign("rsa", b"x", MECH) and conn.state is State.LOGGED_IN
    conn.close()


def test_give_up_when_the_last_attempts_fail_at_login(clock, hsm, rec) -> None:
    """The first attempt finds no token; then the HSM answers, but every C_Login fails with a transport
    code (connection_lost, counted as a failed attempt). The third failure must give up, once, and leave
    the supervisor asleep in failed (it used to spin without firing give_up)."""
    hsm.down()
    hsm.fail("login", "CKR_DEVICE_ERROR", times=None)
    hsm.at(0.05, "up")
    conn = connection(clock, hsm, pol=policy(max_attempts=3), recorder=rec)
    opening = Caller(clock, lambda: conn.open(wait=60.0), "opener")
    assert opening.join(70.0), "the clock is stuck"
    assert conn.state is State.FAILED
    # open() says so as it does when the attempts ran out while connecting.
    err = opening.error
    assert isinstance(err, MemberUnavailable) and err.member == "hsm-a", err
    assert "gave up after 3 connect attempts" in str(err) and err.code.name == "CKR_DEVICE_ERROR"
    t0 = clock.monotonic()
    clock.sleep(120.0)  # the supervisor sleeps in failed: time moves, nothing happens
    assert clock.monotonic() == pytest.approx(t0 + 120.0)
    lost = ("open", "connection_lost", "disconnected", "CKR_DEVICE_ERROR")
    assert rec.rows() == [*NO_TOKEN, *UP[:2], lost, *UP[:2], lost,
                          ("disconnected", "connect", "connecting", None),
                          ("connecting", "give_up", "failed", "CKR_DEVICE_ERROR")]
    assert rec.attempts("connection_lost") == [2, 3] and rec.attempts("give_up") == [3]
    assert hsm.count("login") == 2 == conn.login_attempts  # no third C_Login once the attempts ran out
    assert hsm.count("initialize") == 3
    with pytest.raises(MemberUnavailable):
        conn.sign("rsa", b"x", MECH)
    conn.close()


# -- operations that are not idempotent ------------------------------------------------------


def test_keygen_that_may_have_reached_the_hsm_is_never_reissued(clock, hsm, rec) -> None:
    conn = connection(clock, hsm, recorder=rec, probe=False)
    conn.open()
    hsm.fail("generate_keypair", "CKR_DEVICE_ERROR")
    with pytest.raises(OutcomeUnknown) as info:
        conn.generate_keypair("RSA", 2048, "new")
    err = info.value
    assert err.member == "hsm-a" and err.code is not None and err.code.name == "CKR_DEVICE_ERROR"
    assert err.may_have_acted and not err.reissue
    assert hsm.count("generate_keypair") == 1
    clock.sleep(1.0)  # reconnected meanwhile: still nobody sends it again
    assert hsm.count("generate_keypair") == 1 and conn.state is State.LOGGED_IN
    # Hung while opening a session for it (another call holds the open one): nothing was sent, the
    # caller is told so (CallTimeout, may go again).
    hsm.hang()
    holder = Caller(clock, lambda: conn.generate_random(4))
    clock.sleep(0.001)
    with pytest.raises(CallTimeout) as timeout:
        conn.generate_keypair("RSA", 2048, "new")
    assert not timeout.value.may_have_acted and timeout.value.reissue
    assert holder.join(1.0) and isinstance(holder.error, CallTimeout)
    assert hsm.count("generate_keypair") == 1
    hsm.resume()
    clock.sleep(1.0)
    conn.generate_random(4)  # now a session is open: the keygen's request goes out at once
    # Cut off by the call timeout after it was sent: the outcome is unknown.
    hsm.hang()
    t0 = clock.monotonic()
    with pytest.raises(OutcomeUnknown) as info:
        conn.generate_keypair("RSA", 2048, "new")
    assert 2.0 < clock.monotonic() - t0 <= 2.021 and info.value.code.name == "HSMFSM_CALL_TIMEOUT"
    hsm.resume()
    clock.sleep(1.0)
    assert hsm.count("generate_keypair") == 2 and "new" not in hsm.key_labels()
    # A session-class failure cannot have acted: that one is re-issued, and the key made once.
    hsm.fail("generate_keypair", "CKR_SESSION_HANDLE_INVALID")
    assert conn.generate_keypair("RSA", 2048, "new").label == "new"
    assert hsm.count("generate_keypair") == 4 and hsm.key_labels().count("new") == 1
    conn.close()


# -- degraded -------------------------------------------------------------------------------


def test_slow_calls_degrade_and_healthy_calls_bring_it_back(clock, hsm, rec) -> None:
    conn = connection(clock, hsm, recorder=rec, probe=False)  # slow_call 0.5 s, enter after 3, leave after 5
    conn.open()
    hsm.slow(0.6)
    for i in range(2):
        conn.sign("rsa", b"%d" % i, MECH)
    assert conn.state is State.LOGGED_IN
    conn.sign("rsa", b"third", MECH)
    assert conn.state is State.DEGRADED
    assert rec.rows()[3:] == [("logged_in", "impaired", "degraded", None)]
    hsm.slow(0)
    for i in range(4):
        conn.sign("rsa", b"ok%d" % i, MECH)
    assert conn.state is State.DEGRADED
    conn.sign("rsa", b"fifth", MECH)
    assert conn.state is State.LOGGED_IN
    assert rec.rows()[4:] == [("degraded", "healthy", "logged_in", None)]
    conn.close()


def test_a_uniformly_slow_hsm_degrades_although_its_probes_succeed(clock, hsm, rec) -> None:
    """Every call and probe 0.6 s (slow_call 0.5 s, enter after 3): the probes' successes between the
    calls must not break the streak. A slow probe is impaired, not failed: no connection_lost."""
    conn = connection(clock, hsm, recorder=rec)  # probing every 0.5 s
    conn.open()
    hsm.slow(0.6)
    clock.sleep(5.0)  # probes only, every one slow (0.6 s each, 0.5 s apart)
    assert conn.state is State.DEGRADED
    assert rec.rows()[3:] == [("logged_in", "impaired", "degraded", None)]
    assert hsm.count("session_state") >= 3
    hsm.slow(0)
    clock.sleep(2.0)  # two good probes in a row leave degraded
    assert conn.state is State.LOGGED_IN
    assert rec.rows()[4:] == [("degraded", "healthy", "logged_in", None)]
    conn.close()


def test_capacity_codes_degrade_and_the_call_goes_again(clock, hsm, rec) -> None:
    conn = connection(clock, hsm, recorder=rec, probe=False)
    conn.open()
    hsm.fail("sign", "CKR_DEVICE_MEMORY", times=3)
    assert hsm.verify_signature("rsa", b"x", conn.sign("rsa", b"x", MECH), MECH)  # the fourth try succeeds
    assert rec.rows()[3:] == [("logged_in", "impaired", "degraded", "CKR_DEVICE_MEMORY")]
    assert signs(hsm, "CKR_DEVICE_MEMORY") == 3 and signs(hsm) == 1 and conn.generation == 1
    for i in range(5):
        conn.sign("rsa", b"%d" % i, MECH)
    assert conn.state is State.LOGGED_IN and rec.rows()[-1] == ("degraded", "healthy", "logged_in", None)
    # max_reissues (3) bounds it: a fourth failure in a row is the caller's.
    hsm.fail("sign", "CKR_DEVICE_MEMORY", times=4)
    with pytest.raises(OperationFailed, match="after 3 re-issues"):
        conn.sign("rsa", b"y", MECH)
    assert signs(hsm, "CKR_DEVICE_MEMORY") == 7
    conn.close()


def test_probes_bring_a_degraded_connection_back(clock, hsm, rec) -> None:
    conn = connection(clock, hsm, pol=policy(probe_interval=0.5), recorder=rec)
    conn.open()
    hsm.fail("sign", "CKR_DEVICE_MEMORY", times=3)
    conn.sign("rsa", b"x", MECH)
    assert conn.state is State.DEGRADED
    t0 = clock.monotonic()
    clock.sleep(1.2)  # healthy_after: two good probes
    assert conn.state is State.LOGGED_IN
    healthy = rec.when("healthy")
    assert len(healthy) == 1 and t0 < healthy[0] <= t0 + 1.01
    conn.close()


# -- races, counted --------------------------------------------------------------------------


def test_a_refused_event_is_counted_not_dropped(clock, hsm, rec) -> None:
    """Two callers see the same lost login: the first fires login_lost (logged_in -> open); the second's
    answer arrives in open, which does not accept login_lost: counted in ignored_events, and both calls
    still succeed after the one new C_Login."""
    conn = connection(clock, hsm, recorder=rec, probe=False)
    conn.open()
    conn.sign("rsa", b"warm", MECH)
    # A second lease, so that both callers have a session with the key already found.
    first, second = (Caller(clock, lambda d=d: conn.sign("rsa", d, MECH)) for d in (b"1", b"2"))
    assert first.join(1.0) and second.join(1.0) and len(conn._g.leases) == 2
    hsm.logout_all()
    first, second = (Caller(clock, lambda d=d: conn.sign("rsa", d, MECH)) for d in (b"a", b"b"))
    assert first.join(5.0) and second.join(5.0)
    assert first.error is None and second.error is None
    assert dict(conn.ignored_events) == {(State.OPEN, "login_lost"): 1}
    assert rec.rows()[3:] == [("logged_in", "login_lost", "open", "CKR_USER_NOT_LOGGED_IN"),
                              ("open", "login_ok", "logged_in", "CKR_OK")]
    # Each session has a link of its own, which is its own application to the HSM: each logged in
    # at its start, and again after the loss (lane 0 by the supervisor, the other as its call came back).
    assert signs(hsm, "CKR_USER_NOT_LOGGED_IN") == 2 and hsm.count("login") == 4
    assert (conn.login_attempts, conn.link_logins) == (2, 2)
    conn.close()


# -- listeners that call back in -----------------------------------------------------------


def test_a_listener_may_reset_the_connection_it_is_told_about(clock, hsm, rec) -> None:
    """On entering failed after a wrong PIN, a listener fixes the PIN source and calls reset(): no
    deadlock, and the connection comes back with one more C_Login (two in all)."""
    pin = ["999999"]
    conn = connection(clock, hsm, pin=lambda: pin[0], recorder=rec)

    def fix_and_reset(record) -> None:
        if record.dest == "failed":
            pin[0] = PIN
            conn.reset()

    conn.add_listener(fix_and_reset)
    opening = Caller(clock, lambda: conn.open(wait=5.0), "opener")
    assert opening.join(5.0), "reset() from a listener deadlocked"
    assert opening.error is None and conn.state is State.LOGGED_IN
    assert rec.rows() == [*UP[:2], ("open", "fatal", "failed", "CKR_PIN_INCORRECT"),
                          ("failed", "reset", "disconnected", None), *UP]
    assert hsm.count("login", "CKR_PIN_INCORRECT") == 1 and hsm.count("login", "CKR_OK") == 1
    assert conn.sign("rsa", b"x", MECH)
    conn.close()


@pytest.mark.parametrize("noticed_by", ["caller", "probe", "watchdog"])
def test_a_listener_may_close_the_connection_it_is_told_about(clock, hsm, rec, noticed_by) -> None:
    """The loss is recorded in the caller's thread (its sign failed), in the supervisor's (the probe)
    or in the watchdog's (a hung call): a listener there that calls close() must not wait for itself."""
    conn = connection(clock, hsm, pol=policy(probe_interval=0.5), recorder=rec, probe=noticed_by == "probe")
    conn.open()
    supervisor = conn._supervisor
    conn.sign("rsa", b"warm", MECH)
    loss = "call_timeout" if noticed_by == "watchdog" else "connection_lost"
    conn.add_listener(lambda record: conn.close() if record.event == loss else None)
    if noticed_by == "watchdog":
        hsm.hang()
    else:
        hsm.down()
    if noticed_by == "probe":
        clock.sleep(1.0)
    else:
        call = Caller(clock, lambda: conn.sign("rsa", b"x", MECH))
        assert call.join(5.0), "close() from a listener deadlocked"
        if noticed_by == "caller":
            assert isinstance(call.error, MemberUnavailable) and "connection is closed" in str(call.error)
        else:
            assert isinstance(call.error, CallTimeout) and 2.0 < call.elapsed <= 2.021
    clock.sleep(30.0)  # closed: no reconnect, no probe
    code = "HSMFSM_CALL_TIMEOUT" if noticed_by == "watchdog" else "CKR_DEVICE_ERROR"
    assert rec.rows()[3:] == [("logged_in", loss, "disconnected", code),
                              ("disconnected", "close", "disconnected", None)]
    assert len(rec.records) == 5 and hsm.count("initialize") == conn.links  # each link once: no reconnect
    assert not supervisor.is_alive() and conn.state is State.DISCONNECTED
