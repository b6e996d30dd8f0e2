"""Suspicion and sessions on real network HSMs: two SoftHSM replicas, each behind its own p11-kit server,
one of them hung with SIGSTOP under load (tests/test_suspicion_scripted.py has the same logic on virtual time).

Policy: the shipped network-hsm's suspicion (multiple 10, floor 50 ms, ceiling 200 ms) with fast_policy's
call timeout of 1 s."""

from __future__ import annotations

import ctypes
import dataclasses
import socket
import threading
import time

import pytest
from hsmfsm.core.errors import KeyNotFound, OutcomeUnknown
from hsmfsm.core.records import CallRecord, SuspicionRecord
from hsmfsm.p11.module import sockets_to as module_sockets_to
from hsmfsm.tools.soak.probes import children

from conftest import sign_ec, verify, wait_for
from test_pool import make_pool, two

pytestmark = pytest.mark.timeout(120)

TICK = 0.02  # the watchdog's period
LIBC = ctypes.CDLL(None, use_errno=True)
#: What a loaded 2-core machine adds to a timer and a thread switch, at worst (measured: tens of ms).
SLACK = 0.08


class Load:
    """``threads`` callers signing (ECDSA, verified) through the pool until ``stop()``."""

    def __init__(self, pool, token, threads: int) -> None:
        self.calls: list[tuple[float, float, str]] = []
        self.running = True
        self._lock = threading.Lock()

        def work(i: int) -> None:
            n = 0
            while self.running:
                data = b"%d-%d" % (i, n)
                n += 1
                t0 = time.monotonic()
                try:
                    verify(token, "ec", data, sign_ec(pool, data))
                    outcome = "ok"
                except Exception as exc:  # kept for the test to look at
                    outcome = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    self.calls.append((t0, time.monotonic(), outcome))

        self.threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.running = False
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads)

    @property
    def failed(self) -> list[str]:
        return [o for _, _, o in self.calls if o != "ok"]


def sockets_to(path) -> tuple[int, int]:
    """This process's sockets connected to the unix socket at ``path`` (told apart by inode): how many
    in all, and how many of them live (not shut down: a read would wait, or finds a reply). Read on
    each fd itself, never a dup: a dup is a second fd for a link's socket while hsmfsm looks for it."""
    byte = ctypes.create_string_buffer(1)
    found = {name: LIBC.recv(fd, byte, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != 0  # 0: shut down
             for fd, name in module_sockets_to(str(path)).items()}
    return len(found), sum(found.values())


def listen(pool) -> tuple[list[SuspicionRecord], list[tuple[float, CallRecord]]]:
    """The pool's suspicion records, and its members' attempt records with the monotonic time each began."""
    marks: list[SuspicionRecord] = []
    attempts: list[tuple[float, CallRecord]] = []
    pool.add_suspicion_listener(marks.append)
    pool.add_call_listener(lambda r: attempts.append((time.monotonic() - r.seconds, r)) if r.kind == "attempt"
                           else None)
    return marks, attempts


def test_a_member_hung_under_load_gets_no_new_calls_once_suspected_and_no_call_waits_past_the_ceiling(
        client_module, hsms, pin_env, fast_policy) -> None:
    a, b = hsms
    policy = fast_policy()
    ceiling = policy.operations.suspicion.ceiling
    with make_pool(client_module, pin_env, policy, two(hsms)) as pool:
        marks, attempts = listen(pool)
        load = Load(pool, a.token, threads=4)
        assert wait_for(lambda: all(pool.member(n).latency_p99("sign") is not None for n in ("hsm-a", "hsm-b")), 10)
        time.sleep(0.3)
        hung_at = time.monotonic()
        a.hang()
        time.sleep(2.0)  # twice the call timeout
        a.resume()
        resumed_at = time.monotonic()
        time.sleep(1.5)
        load.stop()
        assert load.failed == []
        # (A member may be suspected by a slow moment of this busy machine too, and clears at its next
        # answer: only hsm-a's suspicion after the hang counts here.)
        offset = time.monotonic() - time.time()
        suspected = [m for m in marks if m.kind == "suspected" and m.member == "hsm-a" and m.time + offset >= hung_at]
        assert suspected and suspected[0].operation == "sign"
        suspected_at = suspected[0].time + offset
        assert suspected[0].limit is not None and suspected[0].limit <= ceiling
        # Every attempt on hsm-a while it hung was cut off within the ceiling (and a watchdog tick) ...
        stuck = [r for t, r in attempts if r.member == "hsm-a" and hung_at <= t + r.seconds and t < resumed_at]
        assert stuck and all(r.seconds <= ceiling + TICK + SLACK for r in stuck), [r.seconds for r in stuck]
        assert {r.code_name for r in stuck} <= {"HSMFSM_SUSPECTED", None}  # cut off, or answered just in time
        # ... and once suspected, no new call went to hsm-a while hsm-b served.
        late = [r for t, r in attempts if r.member == "hsm-a" and suspected_at + SLACK < t < resumed_at]
        assert late == []
        # No caller waited past the ceiling for its signature: hsm-b took the cut-off calls at once.
        during = [end - start for start, end, _ in load.calls if hung_at <= end and start < resumed_at]
        assert max(during) <= ceiling + TICK + 2 * SLACK
        # Its probe stayed silent: hsm-a was cut off at the call timeout, as without suspicion, and is back.
        assert wait_for(lambda: pool.member("hsm-a").serving, 10)
        assert any(m.kind == "cleared" for m in marks) and not pool.member("hsm-a").suspected
        # hsm-b never left, even if a slow moment of this machine had it suspected and its links cut
        # (test_false_suspicions_cut_links_and_never_reconnect_a_member).
        assert pool.member("hsm-b").generation == 1


def test_false_suspicions_cut_links_and_never_reconnect_a_member(client_module, hsms, pin_env, fast_policy) -> None:
    """Two healthy members under 8 threads, with a suspicion limit of their own p99 (floor 1 ms): each
    is suspected over and over, its calls in flight cut and re-issued on the other, and its cut links
    set up afresh while its other links log in. A new link can fail its set-up there (SoftHSM rewrites
    its token file at each C_Login, and a server process starting meanwhile may read it torn:
    HSMFSM_NO_SUCH_TOKEN, CKR_GENERAL_ERROR; docs/FACTS.md): that is the link's alone. No call fails,
    and neither member ever reconnects."""
    a, b = hsms
    base = fast_policy()
    suspicion = dataclasses.replace(base.operations.suspicion, floor=0.001, multiple=1.0)
    policy = dataclasses.replace(base, operations=dataclasses.replace(base.operations, suspicion=suspicion))
    with make_pool(client_module, pin_env, policy, two(hsms)) as pool:
        transitions: list[object] = []
        pool.add_listener(transitions.append)
        marks, attempts = listen(pool)
        load = Load(pool, a.token, threads=8)
        assert wait_for(lambda: sum(r.code_name == "HSMFSM_SUSPECTED" for _, r in attempts) >= 20, 20)
        time.sleep(1.0)
        load.stop()
        others = [r for _, r in attempts if r.code_name not in (None, "HSMFSM_SUSPECTED")]
        seen = (transitions, [(r.member, r.code_name, r.outcome) for r in others],
                {n: pool.member(n).link_failures for n in ("hsm-a", "hsm-b")})
        assert load.failed == [] and len(load.calls) > 100, (load.failed[:5], seen)
        cut = sum(r.code_name == "HSMFSM_SUSPECTED" for _, r in attempts)
        assert cut >= 20 and sum(m.kind == "suspected" for m in marks) >= 2
        assert transitions == [], seen
        assert pool.member("hsm-a").generation == pool.member("hsm-b").generation == 1
        # Every other attempt that failed was a new link's set-up, counted as that link's failure.
        assert len(others) == sum(pool.member(n).link_failures for n in ("hsm-a", "hsm-b")), seen
        # Hundreds of links cut, some in their version handshake: no socket leaked (at most one dead
        # socket per link, kept by p11-kit-client until that link's next connect).
        for name, hsm in (("hsm-a", a), ("hsm-b", b)):
            total, alive = sockets_to(hsm.socket_path)
            assert alive <= pool.member(name).links and total <= 2 * policy.sessions.max, (name, total, alive)


def test_a_new_link_that_fails_its_set_up_is_that_links_failure_alone(client_module, network_hsm, pin_env,
                                                                       fast_policy, tmp_path) -> None:
    """A lone connection through a relay that fails one new link's C_OpenSession and another's C_Login
    (answered by the relay: the token never sees them): 4 threads sign throughout, the connection
    never leaves logged_in, and its own login was the one C_Login the PIN cost it besides its links'."""
    from hsmfsm import SlotConnection
    from hsmfsm.testing.lab import Relay

    network_hsm.start()
    relay = Relay(tmp_path / "r.sock", network_hsm.socket_path).start()
    base = fast_policy()
    policy = dataclasses.replace(base, sessions=dataclasses.replace(base.sessions, max=6))
    try:
        conn = SlotConnection(module=client_module, token_label=network_hsm.token.label, pin=pin_env, policy=policy,
                              name="hsm-a", env={"P11_KIT_SERVER_ADDRESS": relay.address})
        with conn.open(wait=10):
            transitions: list[object] = []
            conn.add_listener(transitions.append)
            sign_ec(conn, b"warm")
            relay.fail("C_OpenSession", 0x5, count=1, forward=False)  # CKR_GENERAL_ERROR
            relay.fail("C_Login", 0x5, count=1, forward=False)
            load = Load(conn, network_hsm.token, threads=4)
            assert wait_for(lambda: conn.links >= 4, 10)
            time.sleep(0.3)
            load.stop()
            assert load.failed == [] and len(load.calls) > 20
            assert relay.calls_failed("C_OpenSession") == 1 and relay.calls_failed("C_Login") == 1
            assert transitions == [] and conn.generation == 1 and conn.state == "logged_in"
            # The relay's two, and any of SoftHSM's own torn reads of its token file (docs/FACTS.md).
            assert conn.link_failures >= 2 and conn.login_attempts == 1
    finally:
        relay.stop()


def test_a_suspected_member_that_answers_comes_back_without_a_reconnect(client_module, hsms, pin_env,
                                                                         fast_policy) -> None:
    a, b = hsms
    with make_pool(client_module, pin_env, fast_policy(), two(hsms)) as pool:
        marks, _ = listen(pool)
        load = Load(pool, a.token, threads=2)
        assert wait_for(lambda: pool.member("hsm-a").latency_p99("sign") is not None, 10)
        a.hang()
        time.sleep(0.4)  # suspected after ~50 ms; resumed long before the call timeout of 1 s
        a.resume()
        assert wait_for(lambda: any(m.kind == "cleared" for m in marks), 2)
        time.sleep(0.5)
        load.stop()
        assert load.failed == []
        kinds = [m.kind for m in marks if m.member == "hsm-a"]
        assert kinds[:2] == ["suspected", "cleared"]
        assert "answered" in [m for m in marks if m.member == "hsm-a"][1].reason
        assert pool.member("hsm-a").generation == 1 and pool.member("hsm-a").state == "logged_in"


def test_a_keygen_on_a_hung_member_is_never_hedged(client_module, hsms, pin_env, fast_policy, tmp_path) -> None:
    """An RSA-4096 key generation is on the wire to hsm-a (the relay saw it) when hsm-a hangs; the
    signatures of two threads make hsm-a suspected and go to hsm-b, but the key generation is not cut
    off: it meets the call timeout, OutcomeUnknown names hsm-a, and hsm-b never hears of it."""
    import pkcs11
    from hsmfsm.testing.lab import Relay

    a, b = hsms
    relay = Relay(tmp_path / "ra.sock", a.socket_path).start()
    policy = fast_policy()
    try:
        members = [("hsm-a", a, relay.address), ("hsm-b", b, b.address)]
        with make_pool(client_module, pin_env, policy, members, balance="primary") as pool:
            marks, attempts = listen(pool)
            load = Load(pool, a.token, threads=2)  # primary: every call goes to hsm-a while it serves
            assert wait_for(lambda: pool.member("hsm-a").latency_p99("sign") is not None, 10)
            outcome: list[BaseException | None] = []

            def keygen() -> None:
                try:
                    pool.generate_keypair(pkcs11.KeyType.RSA, 4096, "never-twice")  # seconds of SoftHSM's time
                    outcome.append(None)
                except BaseException as exc:  # kept for the test to look at
                    outcome.append(exc)

            thread = threading.Thread(target=keygen)
            t0 = time.monotonic()
            thread.start()
            assert wait_for(lambda: relay.calls_seen("C_GenerateKeyPair") == 1, 5)
            a.hang()
            thread.join(10)
            elapsed = time.monotonic() - t0
            a.resume()
            time.sleep(0.5)
            load.stop()
            assert load.failed == []
            assert any(m.kind == "suspected" and m.member == "hsm-a" for m in marks)  # the signatures' overrun
            # Not cut off when hsm-a was suspected: it met the call timeout, and was sent nowhere else.
            assert isinstance(outcome[0], OutcomeUnknown) and outcome[0].member == "hsm-a", outcome
            assert elapsed >= policy.operations.call_timeout
            assert [r.member for _, r in attempts if r.operation == "generate_keypair"] == ["hsm-a"]
            assert wait_for(lambda: pool.member("hsm-b").serving, 5)
            with pytest.raises(KeyNotFound):
                pool.member("hsm-b").public_key("never-twice")
    finally:
        relay.stop()


def test_sessions_never_exceed_sessions_max_under_32_threads(client_module, hsms, pin_env, fast_policy) -> None:
    a, b = hsms
    base = fast_policy()
    policy = dataclasses.replace(base, sessions=dataclasses.replace(base.sessions, max=4))
    with make_pool(client_module, pin_env, policy, two(hsms)) as pool:
        members = [pool.member("hsm-a"), pool.member("hsm-b")]
        most = {"hsm-a": 0, "hsm-b": 0}
        live = {"hsm-a": 0, "hsm-b": 0}
        held = {"hsm-a": 0, "hsm-b": 0}
        sampling = [True]

        def sample() -> None:
            while sampling[0]:
                for m, hsm in zip(members, hsms):
                    most[m.name] = max(most[m.name], m.sessions, m.links)
                    total, alive = sockets_to(hsm.socket_path)
                    live[m.name], held[m.name] = max(live[m.name], alive), max(held[m.name], total)
                time.sleep(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        load = Load(pool, a.token, threads=32)
        time.sleep(2.0)
        load.stop()
        sampling[0] = False
        sampler.join(5)
        assert load.failed == [] and len(load.calls) > 100
        assert most == {"hsm-a": 4, "hsm-b": 4}  # used to the full, never past it
        # On the wire: this process's live sockets to each server, one per link, never more than
        # sessions.max. (Not the server's p11-kit-remote children: the child of a link cut on suspicion
        # exits when it reads the hang-up, which on this busy machine can be after its replacement
        # connected.) A link cut during its version handshake leaves p11-kit-client a dead socket it
        # keeps until its next connect (docs/FACTS.md): at most one per link.
        assert 1 <= live["hsm-a"] <= 4 and 1 <= live["hsm-b"] <= 4
        assert held["hsm-a"] <= 8 and held["hsm-b"] <= 8
        assert all(1 <= len(children(hsm.pid)) for hsm in hsms)
