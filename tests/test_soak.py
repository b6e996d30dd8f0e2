"""A 20-second soak: the pool under a seeded fault schedule, with every must-be row of the tally checked.

The same run as ``make soak``, shortened. The fault schedule is a pure function of the seed, so the
schedule test below pins what the 20-second run goes through.
"""

from __future__ import annotations

import io
import json
import os
import time

import pytest
from hsmfsm.tools.soak import DOWN_KINDS, draw_schedule, run


def test_schedule_is_reproducible_and_never_takes_the_last_member_outside_windows():
    names = ["hsm-a", "hsm-b", "hsm-c"]
    a = draw_schedule(1, 120, names, 1.0)
    assert a == draw_schedule(1, 120, names, 1.0)
    assert a != draw_schedule(2, 120, names, 1.0)
    kinds = {f.kind for f in a}
    assert {"all_down", "kill", "hang", "restart", "reset", "rewrite"} <= kinds
    assert sum(f.kind == "all_down" for f in a) == 2
    # Outside the every-member-down windows, some member is always up (as drawn).
    for t in [x / 10 for x in range(0, 1200)]:
        if any(f.kind == "all_down" and f.at - 1 <= t <= f.at + f.length + 1 for f in a):
            continue
        down = {f.members[0] for f in a if f.kind in DOWN_KINDS and f.at <= t <= f.at + f.length}
        assert len(down) < len(names), (t, down)


@pytest.mark.parametrize("isolation", ["none", "process"])
@pytest.mark.hsm
def test_twenty_second_soak_every_must_be_row_holds(tmp_path, isolation):
    out = io.StringIO()
    t0 = time.monotonic()
    status = run(duration=20, threads=4, seed=1, members=3, json_path=str(tmp_path / "tally.json"), out=out,
                 isolation=isolation)
    took = time.monotonic() - t0
    text = out.getvalue()
    tally = json.loads((tmp_path / "tally.json").read_text())
    failed = [r for r in tally["rows"] if r["must"] is not None and not r["ok"]]
    assert status == 0 and tally["ok"], (failed, text[-4000:])
    rows = {r["name"]: r for r in tally["rows"]}
    assert rows["calls succeeded, signature verified"]["value"] > 1000
    assert rows["wrong signatures"]["value"] == 0
    assert rows["calls lost (no answer within deadline + call timeout + 0.5s)"]["value"] == 0
    assert rows["wrong-PIN standby: state, C_Login calls"]["value"] == "failed, 1"
    assert tally["all_down_windows"], "the schedule must take every member down once"
    assert sum(tally["faults_applied"].values()) >= 8
    assert tally["texts_scanned_for_pins"]["log"] > 0
    assert tally["texts_scanned_for_pins"]["transition records"] > 0
    assert "RESULT: every must-be row holds" in text
    host_row = "host processes (isolation: process) left after close"
    assert (host_row in rows) == (isolation == "process")
    if isolation == "process":
        assert rows[host_row]["value"] == {"hsm-a": 0, "hsm-b": 0, "hsm-c": 0}
    assert took < 40, took
    assert not os.path.exists(tally["workdir"])  # the temporary directory is gone


def test_session_lost_closes_the_lost_generations_sessions(client_module, network_hsm, pin_env, fast_policy):
    """Found by the soak: after session_lost (no reinitialisation) the lost sessions stayed open on the token."""
    import threading

    from hsmfsm import SlotConnection
    from hsmfsm.testing.lab import Relay
    from hsmfsm.tools.soak import SessionCounter

    from conftest import sign_ec

    network_hsm.start()
    relay = Relay(network_hsm.socket_path.with_name("relay.sock"), network_hsm.socket_path).start()
    conn = SlotConnection(module=client_module, token_label=network_hsm.token.label, pin=pin_env,
                          policy=fast_policy(), name="hsm-a", env={"P11_KIT_SERVER_ADDRESS": relay.address},
                          probe=False)
    counter = SessionCounter()
    try:
        conn.open()

        def burst():
            ts = [threading.Thread(target=lambda: [sign_ec(conn, b"x") for _ in range(50)]) for _ in range(4)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(30)

        burst()
        in_use = len(conn._g.leases)
        assert in_use >= 2 and counter.count(conn) == in_use == conn.links  # a link per session
        for _ in range(3):
            generation = conn.generation
            relay.fail("C_Sign", 0xB3, count=1)  # CKR_SESSION_HANDLE_INVALID: session_lost
            sign_ec(conn, b"y")
            assert conn.generation > generation and conn.state == "logged_in"
            burst()
        # The lost generations' sessions did not pile up: at most one per link (a link not yet set up for
        # the new generation still holds its lost one, which dies with its next C_Initialize).
        assert len(conn._g.leases) <= counter.count(conn) <= conn.links <= fast_policy().sessions.max
    finally:
        conn.close()
        relay.stop()


def test_the_workload_counts_wrong_signatures_unhandled_errors_and_lost_calls(token):
    """The soak's own checks can fail: a fake pool that lies, crashes and hangs is caught by each row."""
    import threading

    from cryptography.hazmat.primitives import serialization
    from hsmfsm.core.errors import MemberUnavailable
    from hsmfsm.tools.soak import Secrets, Workload

    public = serialization.load_der_public_key(token.public_key_der("ec"))
    calls = iter(range(1000))
    release = threading.Event()

    class LyingPool:
        def sign(self, key, digest, mechanism=None):
            n = next(calls)
            if n == 0:
                return b"\x01" * 64  # a wrong signature
            if n == 1:
                raise ValueError("not an HSMError")  # unhandled
            if n == 2:
                raise MemberUnavailable("hsm-x", "down, and here is the PIN 1234-secret")
            release.wait(5)  # hangs: lost
            raise MemberUnavailable("hsm-x", "late")

    scanner = Secrets("1234-secret")
    work = Workload(LyingPool(), public, 1, 1, scanner, lost_after=0.2)
    work.start()
    time.sleep(0.6)
    work.watch(time.monotonic())
    release.set()
    assert work.join(5) == []
    assert work.wrong == 1
    assert len(work.unhandled) == 1 and "ValueError" in work.unhandled[0]
    assert work.lost and "still running" in work.lost[0]
    assert work.failed_by_class["MemberUnavailable"] >= 2
    assert scanner.hits["exception messages"] == 1
