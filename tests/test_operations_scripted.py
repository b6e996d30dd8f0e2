"""Call records, health and the log fields, on ScriptedHSMs and a VirtualClock (fast and exact).

The same behaviours on real tokens, through Prometheus, ``hsmfsm health`` and a
NOTIFY_SOCKET, are in tests/test_operations.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from hsmfsm import AllMembersDown, CallTimeout
from hsmfsm.core.records import MESSAGE_IDS, CallRecord
from hsmfsm.runtime import connection as connection_module
from hsmfsm.runtime.pool import MemberStatus
from hsmfsm.testing import ScriptedHSM, VirtualClock

from scripted_helpers import MECH, PIN, Recorder, connection, guarded_clock, policy, pool, replicas

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def clock() -> Iterator[VirtualClock]:
    yield from guarded_clock()


@pytest.fixture
def rec(clock: VirtualClock) -> Recorder:
    return Recorder(clock)


def rows(records: list[CallRecord]) -> list[tuple[object, ...]]:
    return [(r.kind, r.member, r.attempt, r.reissued, r.outcome, r.code_name) for r in records]


# -- the call hook of a connection ---------------------------------------------------------------


def test_a_connection_records_each_attempt_of_a_call_it_reissues(clock) -> None:
    hsm = ScriptedHSM(label="tok", pin=PIN, clock=clock)
    conn = connection(clock, hsm, pol=policy(), probe=False)
    seen: list[CallRecord] = []
    conn.add_call_listener(seen.append)
    conn.open()
    conn.sign("rsa", b"one", MECH)
    assert rows(seen) == [("attempt", "hsm-a", 1, False, "ok", None)]
    assert seen[0].pool is None and seen[0].operation == "sign" and seen[0].code_value is None
    hsm.down()
    hsm.at(2.0, "up")
    t0 = clock.time()
    conn.sign("rsa", b"two", MECH)  # the first try meets the dead link; the connection waits and goes again
    elapsed = clock.time() - t0
    first, second = seen[1:]
    # The failure the connection went on from: a pool member would have raised MemberUnavailable for it.
    assert rows([first, second]) == [("attempt", "hsm-a", 1, False, "MemberUnavailable", "CKR_DEVICE_ERROR"),
                                     ("attempt", "hsm-a", 2, True, "ok", None)]
    assert first.code_value == 0x30 and first.time == pytest.approx(t0, abs=1e-6)
    assert first.seconds < 0.01 < 2.0 - 0.01 < second.seconds  # the second waited for the reconnect
    assert first.seconds + second.seconds == pytest.approx(elapsed, abs=1e-6)
    assert second.time == pytest.approx(first.time + first.seconds, abs=1e-6)
    conn.close()


def test_a_timed_out_call_is_recorded_with_the_watchdogs_code(clock) -> None:
    hsm = ScriptedHSM(label="tok", pin=PIN, clock=clock)
    pol = policy()
    conn = connection(clock, hsm, pol=pol, probe=False)
    seen: list[CallRecord] = []
    conn.add_call_listener(seen.append)
    conn.open()
    hsm.hang()
    with pytest.raises(CallTimeout):
        conn.sign("rsa", b"stuck", MECH)
    assert rows(seen) == [("attempt", "hsm-a", 1, False, "CallTimeout", "HSMFSM_CALL_TIMEOUT")]
    assert seen[0].code_value is None
    assert pol.operations.call_timeout < seen[0].seconds <= pol.operations.call_timeout + 0.021
    hsm.resume()
    conn.close()


def test_with_no_call_listener_the_call_path_makes_no_record(clock, monkeypatch) -> None:
    made: list[str] = []

    class Counting(connection_module.Attempts):
        def __init__(self, *args: object) -> None:
            made.append("attempts")
            super().__init__(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(connection_module, "Attempts", Counting)
    hsm = ScriptedHSM(label="tok", pin=PIN, clock=clock)
    conn = connection(clock, hsm, pol=policy(), probe=False)
    conn.open()
    for i in range(5):
        conn.sign("rsa", b"%d" % i, MECH)
    assert made == []
    listener = [].append
    conn.add_call_listener(listener)
    conn.sign("rsa", b"counted", MECH)
    assert made == ["attempts"]
    conn.remove_call_listener(listener)
    conn.sign("rsa", b"not counted", MECH)
    assert made == ["attempts"]
    conn.close()


# -- the call hook of a pool ---------------------------------------------------------------------


def test_a_pool_records_each_attempt_then_the_call_as_the_application_saw_it(clock, rec) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    with pool(clock, hsms, recorder=rec) as p:
        seen: list[CallRecord] = []
        p.add_call_listener(seen.append)
        p.sign("rsa", b"warm", MECH)
        assert rows(seen) == [("attempt", seen[0].member, 1, False, "ok", None),
                              ("call", seen[0].member, 1, False, "ok", None)]
        assert {r.pool for r in seen} == {"signer"}
        hsms["hsm-a"].down()
        del seen[:]
        for i in range(4):  # round robin: one of these goes to hsm-a first, meets the dead link, then to b
            p.sign("rsa", b"%d" % i, MECH)
        calls = [r for r in seen if r.kind == "call"]
        assert [(c.member, c.attempt, c.reissued, c.outcome) for c in calls].count(("hsm-b", 2, True, "ok")) == 1
        assert all(c.member == "hsm-b" and c.outcome == "ok" for c in calls) and len(calls) == 4
        i = next(n for n, r in enumerate(seen) if r.kind == "call" and r.attempt == 2)
        assert rows(seen[i - 2:i + 1]) == [("attempt", "hsm-a", 1, False, "MemberUnavailable", "CKR_DEVICE_ERROR"),
                                          ("attempt", "hsm-b", 2, True, "ok", None),
                                          ("call", "hsm-b", 2, True, "ok", None)]
        failed, served, call = seen[i - 2:i + 1]
        assert call.seconds == pytest.approx(failed.seconds + served.seconds, abs=1e-6)
        assert call.time == pytest.approx(failed.time, abs=1e-6)


def test_all_members_down_is_one_call_record_naming_the_error(clock) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    pol = policy()
    with pool(clock, hsms, pol, max_attempts=100) as p:
        seen: list[CallRecord] = []
        p.add_call_listener(seen.append)
        hsms["hsm-a"].down()
        hsms["hsm-b"].down()
        with pytest.raises(AllMembersDown):
            p.sign("rsa", b"nobody", MECH)
        call = seen[-1]
        assert (call.kind, call.outcome, call.code_name, call.pool) == ("call", "AllMembersDown", None, "signer")
        attempts = [r for r in seen if r.kind == "attempt"]
        assert call.attempt == len(attempts) >= 1 and call.reissued == (call.attempt > 1)
        assert [r.attempt for r in attempts] == list(range(1, call.attempt + 1))
        # The dead link's answer, or (a session of a link of its own, opened while the first probe had the
        # logged-in one) no token on a link initialised while the HSM is down.
        assert all(r.outcome == "MemberUnavailable" and r.code_name in ("CKR_DEVICE_ERROR", "HSMFSM_NO_SUCH_TOKEN")
                   for r in attempts)
        assert call.member == attempts[-1].member
        assert call.seconds == pytest.approx(pol.operations.deadline, abs=0.001)
        # Nobody serves any more: the next call asks no member at all.
        with pytest.raises(AllMembersDown):
            p.sign("rsa", b"still nobody", MECH)
        assert (seen[-1].attempt, seen[-1].member, seen[-1].reissued) == (0, None, False)


def test_a_call_listener_that_raises_is_logged_and_never_reaches_the_caller(clock, caplog) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    with pool(clock, hsms) as p:
        def broken(record: CallRecord) -> None:
            raise RuntimeError("listener bug")

        seen: list[CallRecord] = []
        p.add_call_listener(broken)
        p.add_call_listener(seen.append)  # the next listener still gets every record
        with caplog.at_level(logging.ERROR, logger="hsmfsm.calls"):
            assert hsms["hsm-a"].verify_signature("rsa", b"x", p.sign("rsa", b"x", MECH), MECH)
        assert [r.kind for r in seen] == ["attempt", "call"]
        assert caplog.text.count("call listener") == 2 and "listener bug" in caplog.text


def test_call_listeners_run_with_no_lock_held_and_may_call_the_pool(clock) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    with pool(clock, hsms) as p:
        held: list[str] = []
        nested: list[CallRecord] = []

        def check(record: CallRecord) -> None:
            locks = {"pool": p._lock, "hsm-a": p.member("hsm-a")._lock, "hsm-b": p.member("hsm-b")._lock,
                     "hsm-a call": p.member("hsm-a")._call_lock, "hsm-b call": p.member("hsm-b")._call_lock}
            for name, lock in locks.items():
                if lock.acquire(blocking=False):
                    lock.release()
                else:
                    held.append(f"{name} during {record.kind} {record.operation}")
            if record.kind == "call" and record.operation == "sign":
                nested.append(record)
                assert len(p.generate_random(8)) == 8  # a call of the same pool, from inside the listener

        p.add_call_listener(check)
        for i in range(4):
            p.sign("rsa", b"%d" % i, MECH)
        assert held == []
        assert len(nested) == 4


# -- health ------------------------------------------------------------------------------------


def test_health_says_since_when_members_and_the_pool_stopped_serving(clock, rec) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    with pool(clock, hsms, recorder=rec, interval=1.0) as p:
        h = p.health()
        assert (h.healthy, h.level, h.exit_code, h.unhealthy_since, h.serving, h.active) == (True, "ok", 0, None, 2, 2)
        logged_in = {r.member: r.time for r in rec.records if r.event == "login_ok"}
        assert {m.name: m.since for m in h.members} == logged_in
        assert all(m.serving and m.unhealthy_since is None and m.sessions == 1 for m in h.members)
        assert h.summary() == "pool signer: serving on 2 of 2 members (hsm-a logged_in, hsm-b logged_in)"
        status = {s.name: s for s in p.status()}
        assert status["hsm-a"].since == logged_in["hsm-a"] and status["hsm-a"].sessions == 1
        hsms["hsm-a"].down()
        for i in range(4):
            p.sign("rsa", b"%d" % i, MECH)
        lost = next(r.time for r in rec.records if r.member == "hsm-a" and r.event == "connection_lost")
        clock.sleep(5.0)  # reconnect attempts change hsm-a's state, not when it stopped serving
        h = p.health()
        a = {m.name: m for m in h.members}["hsm-a"]
        assert (h.healthy, h.level, h.exit_code, h.serving) == (False, "warning", 1, 1)
        assert h.unhealthy_since == lost and a.unhealthy_since == lost and not a.serving
        assert a.since == max(r.time for r in rec.records if r.member == "hsm-a") > lost
        assert h.summary().startswith("pool signer: degraded: serving on 1 of 2 members; hsm-a disconnected")
        assert "recovery" in h.summary()
        d = h.as_dict()
        assert d["healthy"] is False and d["unhealthy_since"].endswith("+00:00") and d["level"] == "warning"
        assert {m["name"]: m["healthy"] for m in d["members"]} == {"hsm-a": False, "hsm-b": True}
        hsms["hsm-a"].up()
        clock.sleep(1.1)
        h = p.health()
        assert (h.healthy, h.unhealthy_since, h.serving) == (True, None, 2)
        assert all(m.unhealthy_since is None for m in h.members)


def test_health_is_critical_when_a_member_failed_or_none_serves(clock) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    with pool(clock, hsms, pins={"hsm-b": "999999"}, max_attempts=100) as p:
        h = p.health()
        assert (h.level, h.exit_code, h.failed, h.serving) == ("critical", 2, ("hsm-b",), 1)
        b = {m.name: m for m in h.members}["hsm-b"]
        assert b.state == "failed" and b.last_code == "CKR_PIN_INCORRECT" and "999999" not in str(h.as_dict())
        assert b.error is not None and "PIN" in b.error
        assert h.summary() == "pool signer: a member failed: serving on 1 of 2 members; hsm-b failed CKR_PIN_INCORRECT"
        hsms["hsm-a"].down()
        with pytest.raises(AllMembersDown):
            p.sign("rsa", b"x", MECH)
        h = p.health()
        assert (h.level, h.serving) == ("critical", 0) and h.summary().startswith("pool signer: DOWN: serving on 0")


def test_a_standby_that_is_down_leaves_the_pool_healthy(clock) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    with pool(clock, hsms, standby=("hsm-b",)) as p:
        hsms["hsm-b"].down()
        clock.sleep(2.0)  # the probe notices
        assert not p.member("hsm-b").serving
        h = p.health()
        assert (h.healthy, h.level, h.serving, h.active) == (True, "ok", 1, 1)


def test_member_status_takes_its_old_positional_fields() -> None:
    old = MemberStatus("hsm-a", "active", "logged_in", None, None, 0, 6, None, 0, "none", None)
    assert (old.since, old.sessions) == (None, 0)
    assert list(old.as_dict())[-5:] == ["since", "sessions", "suspected", "links", "link_failures"]
    assert not old.suspected and (old.links, old.link_failures) == (0, 0)


# -- structured log fields ---------------------------------------------------------------------


def test_message_ids_never_change() -> None:
    assert MESSAGE_IDS == {
        "transition": "0c46f5c7cd884bbeb7a15c1b26386f3a",
        "member_lost": "c91b4e4f8733443bafd34fc791295358",
        "member_back": "d06fb947566b454da199a937259fa5cb",
        "member_failed": "6070e68d6ece4ee0a39d24e5283cb13c",
        "call_timeout": "ffb867c43f0a47cca5e9fccb45eb6a5d",
        "member_degraded": "591886e895ec4c378e284dc13536f35f",
        "all_members_down": "bbba3313c1c64d06a5205e86e7ecd007",
        "pool_serving": "42edd3ae973140aba8ad9a876a09211f",
    }


def test_transition_log_records_carry_journald_fields(clock, caplog) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    caplog.set_level(logging.INFO, logger="hsmfsm")
    with pool(clock, hsms, pins={"hsm-b": "999999"}, max_attempts=100) as p:
        hsms["hsm-a"].down()
        with pytest.raises(AllMembersDown):
            p.sign("rsa", b"x", MECH)
        hsms["hsm-a"].up()
        clock.sleep(2.0)
        assert p.member("hsm-a").serving
    transitions = [r for r in caplog.records if r.name == "hsmfsm.transitions"]
    fields = [(r.HSMFSM_MEMBER, r.HSMFSM_FROM, r.HSMFSM_EVENT, r.HSMFSM_TO, r.HSMFSM_CKR, r.MESSAGE_ID)
              for r in transitions]
    ids = MESSAGE_IDS
    assert ("hsm-a", "open", "login_ok", "logged_in", "CKR_OK", ids["member_back"]) in fields
    assert ("hsm-b", "open", "fatal", "failed", "CKR_PIN_INCORRECT", ids["member_failed"]) in fields
    assert ("hsm-a", "logged_in", "connection_lost", "disconnected", "CKR_DEVICE_ERROR", ids["member_lost"]) in fields
    assert ("hsm-a", "disconnected", "connect", "connecting", "", ids["transition"]) in fields
    assert {r.HSMFSM_POOL for r in transitions} == {"signer"}
    lost = next(r for r in transitions if r.HSMFSM_EVENT == "connection_lost")
    assert lost.HSMFSM_CKR_VALUE == "0x00000030" and lost.levelno == logging.WARNING
    assert lost.hsmfsm_record["member"] == "hsm-a" and lost.hsmfsm_record["pool"] == "signer"
    assert lost.hsmfsm_record["dest"] == "disconnected" and int(lost.HSMFSM_GENERATION) >= 1
    pool_lines = [(r.levelno, r.getMessage(), r.MESSAGE_ID) for r in caplog.records
                  if r.name == "hsmfsm.pool" and hasattr(r, "MESSAGE_ID")]
    assert pool_lines == [(logging.ERROR, "pool signer: no member serves", ids["all_members_down"]),
                          (logging.WARNING, "pool signer: serves again (hsm-a)", ids["pool_serving"])]
    assert "999999" not in caplog.text


def test_a_connection_outside_a_pool_logs_an_empty_pool_field(clock, caplog) -> None:
    hsm = ScriptedHSM(label="tok", pin=PIN, clock=clock)
    caplog.set_level(logging.INFO, logger="hsmfsm.transitions")
    conn = connection(clock, hsm, pol=policy(), probe=False)
    conn.open()
    conn.close()
    records = [r for r in caplog.records if r.name == "hsmfsm.transitions"]
    assert records and {r.HSMFSM_POOL for r in records} == {""}
    assert [r.HSMFSM_EVENT for r in records] == ["connect", "session_opened", "login_ok", "close"]


# -- hsmfsm health on a file it cannot use (no HSM needed) -----------------------------------------


@pytest.mark.parametrize("text", [None, "pool: signer\nmembers: [\n", "pool: signer\nmembers: []\n",
                                  "pool: s\nmembers:\n  - {name: a, module: /m.so, token_label: t, pin: '1234'}\n"])
def test_health_of_an_unusable_pool_file_is_unknown_exit_3(tmp_path, text) -> None:
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "pool.yaml"
    if text is not None:
        path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "hsmfsm", "health", str(path)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"HSMFSM UNKNOWN - {path}") and "Traceback" not in proc.stderr
    assert "'1234'" not in proc.stdout  # a literal PIN is refused without being echoed
