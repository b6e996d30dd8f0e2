"""A new link's failure is that link's alone: the rule-book's decisions (``rules.link_failure``), and
the runtime on ScriptedHSMs and a VirtualClock. The same on real tokens is in tests/test_suspicion.py.

Over p11-kit-client each session of a member has a link (a socket, a server process) of its own. One
that cannot be set up while the member's other links serve says nothing about the member: SoftHSM
behind `p11-kit server` fails about 1 in 100 new links set up while others log in (docs/FACTS.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from hsmfsm import LoginRejected, MemberUnavailable, State
from hsmfsm.core import rules
from hsmfsm.core.codes import CALL_TIMEOUT, SUSPECTED, code_from_name
from hsmfsm.core.errors import CallTimeout
from hsmfsm.runtime.pool import format_status
from hsmfsm.testing import VirtualClock

from scripted_helpers import MECH, Caller, Recorder, connection, guarded_clock, policy, pool, replicas, signs

pytestmark = pytest.mark.timeout(30)

NO_TOKEN = code_from_name("HSMFSM_NO_SUCH_TOKEN")
GENERAL = code_from_name("CKR_GENERAL_ERROR")
PIN_INCORRECT = code_from_name("CKR_PIN_INCORRECT")


# --------------------------------------------------------------------------- the rule-book


@pytest.mark.parametrize("code", [NO_TOKEN, GENERAL, code_from_name("CKR_DEVICE_ERROR")])
def test_a_links_failure_fires_nothing_and_goes_again(code) -> None:
    p = policy()
    d = rules.decide_call(p, code, operation="sign", timed_out=False, sent=False, in_pool=True, link_only=True)
    assert (d.event, d.count, d.reaction) == (None, None, rules.Reaction.NONE)
    assert (d.error, d.reissue, d.may_have_acted, d.link_only) == (MemberUnavailable, True, False, True)
    assert d.code == code and "a new link's set-up failed" in d.reason
    # The same code from a member's own connection (not one more link) is the member's, as ever.
    whole = rules.decide_call(p, code, operation="sign", timed_out=False, sent=False, in_pool=True)
    assert whole.event is rules.Event.CONNECTION_LOST and not whole.link_only


def test_a_lone_connection_goes_again_within_its_deadline_and_it_is_no_reissue() -> None:
    p = policy()
    d = rules.decide_call(p, NO_TOKEN, operation="sign", timed_out=False, sent=False, link_only=True)
    assert (d.event, d.error, d.link_only) == (None, None, True)  # None: go again here
    d = rules.decide_call(p, NO_TOKEN, operation="sign", timed_out=False, sent=False, link_only=True,
                          reissues=p.operations.max_reissues)
    assert (d.event, d.error) == (None, None)  # nothing was sent: not counted against max_reissues
    d = rules.decide_call(p, NO_TOKEN, operation="sign", timed_out=False, sent=False, link_only=True,
                          deadline_passed=True)
    assert (d.event, d.error) == (None, MemberUnavailable) and "deadline" in d.reason


def test_a_cut_a_timeout_or_a_sent_call_is_not_a_links_failure() -> None:
    p = policy()
    d = rules.decide_call(p, NO_TOKEN, operation="sign", timed_out=False, sent=False, in_pool=True,
                          link_only=True, abandoned=True)
    assert d.code == SUSPECTED and not d.link_only  # cut on suspicion: that reason is the one on record
    d = rules.decide_call(p, GENERAL, operation="sign", timed_out=True, sent=False, in_pool=True, link_only=True)
    assert (d.event, d.error) == (rules.Event.CALL_TIMEOUT, CallTimeout)  # the watchdog's: the member's
    d = rules.decide_call(p, GENERAL, operation="sign", timed_out=False, sent=True, in_pool=True, link_only=True)
    assert d.event is rules.Event.CONNECTION_LOST and not d.link_only  # a call on the link, not its set-up
    assert CALL_TIMEOUT != SUSPECTED


def test_a_refused_pin_on_a_new_link_is_the_members_and_fatal() -> None:
    p = policy()
    d = rules.decide_login(p, PIN_INCORRECT, timed_out=False, link_only=True)
    assert (d.event, d.error, d.link_only) == (rules.Event.FATAL, LoginRejected, False)
    d = rules.decide_login(p, GENERAL, timed_out=False, link_only=True)
    assert (d.event, d.count, d.link_only) == (None, None, True)
    d = rules.decide_login(p, GENERAL, timed_out=False)
    assert d.event is not None and not d.link_only


def test_how_many_in_a_row_stay_a_links() -> None:
    n = rules.LINK_FAILURES_IN_A_ROW
    assert n >= 2
    assert all(rules.is_link_failure(failures_before=k) for k in range(n - 1))
    assert not rules.is_link_failure(failures_before=n - 1)  # the n-th in a row is the member's
    assert not rules.is_link_failure(failures_before=n + 10)


# --------------------------------------------------------------------------- the runtime, scripted


@pytest.fixture
def clock() -> Iterator[VirtualClock]:
    yield from guarded_clock(limit=20.0)


def with_sessions(n: int, **kw):
    """``sessions.max`` n, and no probe but the ones asked for (the background one would borrow a
    session, and open a link of its own)."""
    kw.setdefault("probe_interval", 100.0)
    p = policy(**kw)
    return dataclasses.replace(p, sessions=dataclasses.replace(p.sessions, max=n))


class Holders:
    """Callers holding every session the connection has in slow calls: the next caller needs a new link."""

    def __init__(self, clock: VirtualClock, conn, hsm, seconds: float = 0.3) -> None:
        conn.sign("rsa", b"warm", MECH)
        clock.sleep(0.01)  # past the first probe (it may have opened a link of its own)
        hsm.slow(seconds)
        self.callers = [Caller(clock, lambda i=i: conn.sign("rsa", b"held %d" % i, MECH)) for i in range(conn.links)]
        clock.sleep(0.01)
        hsm.slow(0)
        assert conn.inflight == conn.links

    def join(self) -> bool:
        return all(c.join(1.0) and c.error is None for c in self.callers)


@pytest.mark.parametrize("function,code", [("find_token", "HSMFSM_NO_SUCH_TOKEN"), ("initialize", "CKR_DEVICE_ERROR"),
                                           ("open_session", "CKR_GENERAL_ERROR"), ("login", "CKR_GENERAL_ERROR")])
def test_a_new_link_that_fails_its_set_up_costs_the_member_nothing(clock, function, code) -> None:
    hsm = replicas(clock, "hsm-a")["hsm-a"]
    rec = Recorder(clock)
    conn = connection(clock, hsm, pol=with_sessions(3), recorder=rec)
    conn.open()
    assert conn.links == 1
    holder = Holders(clock, conn, hsm)
    start = rec.mark()
    hsm.fail(function, code, times=1)
    assert conn.sign("rsa", b"needs a new link", MECH)  # the failed link dropped, another set up
    assert holder.join()
    assert rec.rows(start) == [] and conn.state is State.LOGGED_IN and conn.generation == 1
    assert conn.link_failures == 1 and conn.login_attempts == 1
    assert hsm.count(function, code) == 1
    assert conn.last_code is None or conn.last_code.name != code  # a healthy member's last code stays its own
    conn.close()


def test_a_refused_pin_on_a_new_link_fails_the_member_and_is_never_tried_again(clock) -> None:
    hsm = replicas(clock, "hsm-a")["hsm-a"]
    conn = connection(clock, hsm, pol=with_sessions(3))
    conn.open()
    holder = Holders(clock, conn, hsm)
    hsm.fail("login", "CKR_PIN_INCORRECT", times=1)
    with pytest.raises(LoginRejected):
        conn.sign("rsa", b"x", MECH)
    assert conn.state is State.FAILED and conn.link_failures == 0
    logins = hsm.count("login")
    assert holder.join()
    with pytest.raises(LoginRejected):
        conn.sign("rsa", b"again", MECH)
    assert hsm.count("login") == logins
    conn.close()


def test_new_links_that_keep_failing_with_no_answer_between_are_the_members(clock) -> None:
    """The HSM is gone for new links (each finds no token, as p11-kit-client does when its server
    refuses connects) while the member's sessions are held by slow calls: two failures in a row stay
    the links'; the third is the member's (connection_lost), and the caller waits for its recovery
    within its deadline, as on any loss. Once the HSM answers again, the member is back."""
    hsm = replicas(clock, "hsm-a")["hsm-a"]
    rec = Recorder(clock)
    conn = connection(clock, hsm, pol=with_sessions(3), recorder=rec)
    conn.open()
    holder = Holders(clock, conn, hsm)
    start = rec.mark()
    hsm.fail("find_token", "HSMFSM_NO_SUCH_TOKEN", times=None)
    clearer = Caller(clock, lambda: (clock.sleep(0.5), hsm.clear_faults()))
    t0 = clock.monotonic()
    assert conn.sign("rsa", b"x", MECH)  # waited for the member's recovery, then signed
    assert clock.monotonic() - t0 >= 0.5
    assert conn.link_failures == rules.LINK_FAILURES_IN_A_ROW - 1
    rows = rec.rows(start)
    assert rows[0] == (State.LOGGED_IN, rules.Event.CONNECTION_LOST, State.DISCONNECTED, "HSMFSM_NO_SUCH_TOKEN")
    assert rows[-1][2] is State.LOGGED_IN and conn.state is State.LOGGED_IN and conn.generation == 2
    assert holder.join() and clearer.join(1.0)
    conn.close()


def test_in_a_pool_a_links_failure_goes_to_the_next_member_and_neither_leaves(clock) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    a, b = hsms["hsm-a"], hsms["hsm-b"]
    rec = Recorder(clock)
    with pool(clock, hsms, with_sessions(3), balance="primary", recorder=rec) as p:
        clock.sleep(0.01)
        # Below the ceiling; primary: every call goes to hsm-a while it serves.
        holder = Holders(clock, p.member("hsm-a"), a, 0.15)
        start, before_b = rec.mark(), signs(b)
        a.fail("find_token", "HSMFSM_NO_SUCH_TOKEN", times=1)
        assert p.sign("rsa", b"next", MECH)
        assert a.count("find_token", "HSMFSM_NO_SUCH_TOKEN") == 1
        assert signs(b) == before_b + 1  # went to hsm-b at once, nothing sent to hsm-a
        assert holder.join()
        assert rec.rows(start) == [] and p.member("hsm-a").generation == 1 and p.member("hsm-a").link_failures == 1
        # Operators see it in the status: its row, its JSON, and the HA group display.
        row = {r.name: r for r in p.status()}["hsm-a"]
        assert (row.link_failures, row.links) == (1, p.member("hsm-a").links) and row.as_dict()["link_failures"] == 1
        assert "hsm-a" in format_status(p).splitlines()[1] and "1 failed link set-up(s)" in format_status(p)


def test_link_failures_on_both_members_never_use_up_a_calls_reissues(clock) -> None:
    """Both members' sessions held, and each fails its next two new links: the call goes hsm-a,
    hsm-b, hsm-a, hsm-b (four link failures, nothing sent) and is served by the fifth attempt, past
    ``max_reissues`` (3): a link's failure is no re-issue (``rules.counts_as_reissue``)."""
    hsms = replicas(clock, "hsm-a", "hsm-b")
    a, b = hsms["hsm-a"], hsms["hsm-b"]
    rec = Recorder(clock)
    pol = with_sessions(3)
    assert pol.operations.max_reissues < 4
    with pool(clock, hsms, pol, balance="primary", recorder=rec) as p:
        clock.sleep(0.01)
        held = [Holders(clock, p.member("hsm-a"), a, 0.15), Holders(clock, p.member("hsm-b"), b, 0.15)]
        start = rec.mark()
        a.fail("find_token", "HSMFSM_NO_SUCH_TOKEN", times=2)
        b.fail("find_token", "HSMFSM_NO_SUCH_TOKEN", times=2)
        assert p.sign("rsa", b"fifth time", MECH)
        assert (a.count("find_token", "HSMFSM_NO_SUCH_TOKEN"), b.count("find_token", "HSMFSM_NO_SUCH_TOKEN")) == (2, 2)
        assert p.member("hsm-a").link_failures == p.member("hsm-b").link_failures == 2
        assert all(h.join() for h in held)
        assert rec.rows(start) == []


def test_a_cut_and_a_links_failure_are_no_reissue_and_everything_else_is() -> None:
    p = policy()
    cut = rules.decide_call(p, GENERAL, operation="sign", timed_out=False, in_pool=True, abandoned=True)
    link = rules.decide_call(p, NO_TOKEN, operation="sign", timed_out=False, sent=False, in_pool=True,
                             link_only=True)
    lost = rules.decide_call(p, GENERAL, operation="sign", timed_out=False, in_pool=True)
    timeout = rules.decide_call(p, GENERAL, operation="sign", timed_out=True, in_pool=True, abandoned=True)
    assert [rules.counts_as_reissue(d) for d in (cut, link, lost, timeout)] == [False, False, True, True]
