"""A daemon that forks workers after it connected: the child reconnects on its own, the parent never notices.

Every child here is a plain ``os.fork()`` of the test process. It reports
through a pipe as one JSON line and always leaves with ``os._exit`` (never
through pytest). The parent waits with a timeout and kills a stuck child by
PID, so a deadlock in the child is a failure, not a hung suite.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
from hsmfsm import SlotConnection
from hsmfsm.runtime.pool import Pool
from hsmfsm.testing.lab import Relay

from conftest import Recorder, sign_ec, verify, wait_for

pytestmark = pytest.mark.timeout(90)


# -- forking helpers ---------------------------------------------------------


def _stacks(pid: int) -> str:
    """Where a stuck child is, in C (gdb) and in Python (py-spy), when those tools are installed:
    a deadlock that happens once in twenty runs must explain itself the first time."""
    out = []
    for argv in (["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 25"],
                 ["py-spy", "dump", "--pid", str(pid)]):
        tool = shutil.which(argv[0]) or shutil.which(argv[0], path=os.path.dirname(sys.executable))
        if tool is None:
            continue
        argv[0] = tool
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            out.append(f"--- {argv[0]}:\n{done.stdout[-6000:]}{done.stderr[-1000:]}")
        except (OSError, subprocess.SubprocessError) as exc:
            out.append(f"--- {argv[0]}: {exc}")
    return "\n".join(out)


class Child:
    """A forked child running ``work()``; its result (a dict) comes back through a pipe."""

    def __init__(self, work: Callable[[], dict[str, Any]]) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            try:
                os.close(r)
                try:
                    payload = {"ok": True, **work()}
                except BaseException as exc:
                    payload = {"ok": False, "error": repr(exc), "traceback": traceback.format_exc()}
                os.write(w, (json.dumps(payload) + "\n").encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        self.pid, self._r, self._buf, self.status = pid, r, b"", None

    def done(self) -> bool:
        """True once the child has exited (reaped here)."""
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
        return self.status is not None

    def result(self, timeout: float) -> dict[str, Any]:
        """The child's report; kills the child and fails the test if it does not finish in time."""
        deadline = time.monotonic() + timeout
        while not self._buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready = select.select([self._r], [], [], max(0.0, left))[0] if left > 0 else []
            if not ready:
                stacks = _stacks(self.pid)
                self.kill()
                pytest.fail(f"forked child {self.pid} did not report within {timeout}s (deadlocked?)\n{stacks}")
            chunk = os.read(self._r, 65536)
            if not chunk:
                break
            self._buf += chunk
        os.close(self._r)
        while not self.done():
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"forked child {self.pid} did not exit within {timeout}s")
            time.sleep(0.01)
        assert os.WIFEXITED(self.status) and os.WEXITSTATUS(self.status) == 0, self.status
        report = json.loads(self._buf.decode() or "{}")
        assert report.get("ok"), report.get("traceback") or report
        return report

    def kill(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
            self.status = -1


def child_signs(signer, token, n: int = 5, records: Recorder | None = None) -> Callable[[], dict[str, Any]]:
    """The child's work: sign ``n`` times through ``signer`` and verify each signature outside the HSM."""

    def work() -> dict[str, Any]:
        for i in range(n):
            data = f"child {os.getpid()} {i}".encode()
            verify(token, "ec", data, sign_ec(signer, data))
        out: dict[str, Any] = {"signed": n}
        if records is not None:
            out["events"] = [[r.source, r.event, r.dest, r.generation] for r in records.records]
        return out

    return work


def open_conn(client_module, address: str, token, pin, policy) -> tuple[SlotConnection, Recorder]:
    rec = Recorder()
    conn = SlotConnection(module=client_module, token_label=token.label, pin=pin, policy=policy,
                          name="hsm-a", env={"P11_KIT_SERVER_ADDRESS": address})
    conn.add_listener(rec)
    conn.open()
    assert conn.state == "logged_in"
    return conn, rec


def parent_signs_while(child: Child, signer, token, at_least: int = 3, limit: float = 30.0) -> int:
    """Sign in the parent until the child has exited (and at least ``at_least`` times)."""
    n, deadline = 0, time.monotonic() + limit
    while n < at_least or not child.done():
        data = b"parent during %d" % n
        verify(token, "ec", data, sign_ec(signer, data))
        n += 1
        if time.monotonic() > deadline:
            break
    return n


# -- tests -------------------------------------------------------------------


def test_forked_child_reconnects_and_the_parent_keeps_its_session(client_module, network_hsm, pin_env,
                                                                 fast_policy):
    network_hsm.start()
    conn, rec = open_conn(client_module, network_hsm.address, network_hsm.token, pin_env, fast_policy())
    try:
        verify(network_hsm.token, "ec", b"before", sign_ec(conn, b"before"))
        generation, records, logins = conn.generation, len(rec.records), conn.login_attempts
        module = conn._module

        def work() -> dict[str, Any]:
            out = child_signs(conn, network_hsm.token, 5, rec)()
            out["generation"] = conn.generation
            out["state"] = conn.state
            out["fresh_module"] = conn._module is not module
            out["logins"] = conn.login_attempts
            return out

        child = Child(work)
        during = parent_signs_while(child, conn, network_hsm.token)
        report = child.result(timeout=30)
        time.sleep(3 * 0.2)  # a few probes (every 0.2 s): a parent logged out by the child would show it
        verify(network_hsm.token, "ec", b"after", sign_ec(conn, b"after"))

        # The child: dropped what it inherited (a transition of its own), reconnected, signed.
        assert report["signed"] == 5 and report["state"] == "logged_in" and report["fresh_module"]
        child_events = [tuple(e[:3]) for e in report["events"][records:]]
        assert child_events[0] == ("logged_in", "forked", "disconnected"), child_events
        assert ("open", "login_ok", "logged_in") in child_events
        assert report["generation"] > generation
        assert report["logins"] == logins + 1
        # The parent: same session, same generation, no transition, no new login.
        assert during >= 3
        assert conn.generation == generation and conn.state == "logged_in"
        assert len(rec.records) == records, rec.events()[records:]
        assert conn.login_attempts == logins and conn._module is module
    finally:
        conn.close()


def test_a_child_that_exits_with_finalisers_and_atexit_leaves_the_parent_alone(client_module, network_hsm,
                                                                               pin_env, fast_policy):
    """Even if the child lets go of everything it inherited (python-pkcs11's deallocator calls
    C_Finalize) and runs the atexit handlers (which cut sockets and remove the module links),
    nothing reaches the parent's server-side sessions or files."""
    import atexit
    import gc

    import pkcs11
    from hsmfsm.p11 import module
    from hsmfsm.runtime import connection

    network_hsm.start()
    conn, rec = open_conn(client_module, network_hsm.address, network_hsm.token, pin_env, fast_policy())
    try:
        sign_ec(conn, b"before")
        generation, records = conn.generation, len(rec.records)

        def work() -> dict[str, Any]:
            sign_ec(conn, b"child")  # the child has its own instance too, then drops everything
            conn.close()
            atexit._run_exitfuncs()
            connection._INHERITED.clear()
            module.ModuleInstance._keep_alive.clear()
            pkcs11._loaded.clear()
            gc.collect()
            return {}

        Child(work).result(timeout=30)
        time.sleep(3 * 0.2)
        for i in range(5):
            data = b"after %d" % i
            verify(network_hsm.token, "ec", data, sign_ec(conn, data))
        assert conn.generation == generation and conn.state == "logged_in"
        assert len(rec.records) == records, rec.events()[records:]
        # The parent's module links are still there: a second connection can still load.
        extra = SlotConnection(module=client_module, token_label=network_hsm.token.label, pin=pin_env,
                               policy=fast_policy(), name="hsm-a2", env=network_hsm.client_env)
        with extra:
            sign_ec(extra, b"new connection in the parent")
    finally:
        conn.close()


def make_pool(client_module, pin, policy, hsms) -> Pool:
    member_policy = Pool.member_policy(policy, "background", 0.3, 6)
    conns = [(SlotConnection(module=client_module, token_label=hsm.token.label, pin=pin, policy=member_policy,
                             name=name, env=hsm.client_env, wait_for_recovery=False), False)
             for name, hsm in zip(("hsm-a", "hsm-b"), hsms)]
    return Pool("signer", conns, policy)


def test_pool_in_a_forked_child(client_module, hsms, pin_env, fast_policy):
    a, _ = hsms
    rec = Recorder()
    with make_pool(client_module, pin_env, fast_policy(), hsms) as pool:
        pool.add_listener(rec)
        for i in range(4):
            sign_ec(pool, b"before %d" % i)
        generations = {n: pool.member(n).generation for n in ("hsm-a", "hsm-b")}

        def work() -> dict[str, Any]:
            out = child_signs(pool, a.token, 10)()
            wait_for(lambda: all(pool.member(n).serving for n in ("hsm-a", "hsm-b")), 5.0)
            out["states"] = {n: pool.member(n).state for n in ("hsm-a", "hsm-b")}
            out["forked"] = sorted(r.member for r in rec.records if r.event == "forked")
            return out

        child = Child(work)
        parent_signs_while(child, pool, a.token)
        report = child.result(timeout=30)
        for i in range(10):
            data = b"after %d" % i
            verify(a.token, "ec", data, sign_ec(pool, data))
        assert report["signed"] == 10 and report["forked"] == ["hsm-a", "hsm-b"]
        assert all(s in ("logged_in", "degraded") for s in report["states"].values()), report
        assert {n: pool.member(n).generation for n in generations} == generations
        assert rec.records == []  # the parent saw no transition at all


def test_fork_while_other_threads_hold_locks_and_are_inside_calls(client_module, network_hsm, pin_env,
                                                                  fast_policy, tmp_path):
    """The fork lands while other threads of the parent are inside PKCS#11 calls on this connection
    (its call lock and p11-kit-client's own state taken), and while locks of the connection and the
    watchdog are held: none of them exists any more in the child, and the child must not wait for
    them. (The module loader's lock is the fork's to wait for: the next test.)"""
    from hsmfsm.runtime.watchdog import WATCHDOG

    network_hsm.start()
    relay = Relay(tmp_path / "relay.sock", network_hsm.socket_path).start()
    conn, rec = open_conn(client_module, relay.address, network_hsm.token, pin_env,
                          fast_policy(call_timeout=2.0, deadline=10.0))
    stop = threading.Event()
    errors: list[BaseException] = []
    signed = [0]

    def hammer(i: int) -> None:
        n = 0
        while not stop.is_set():
            try:
                data = b"thread %d %d" % (i, n)
                verify(network_hsm.token, "ec", data, sign_ec(conn, data))
                signed[0] += 1
            except BaseException as exc:
                errors.append(exc)
            n += 1

    holding, release = threading.Event(), threading.Event()

    def hold_locks() -> None:
        with conn._lock, WATCHDOG._lock, conn._listeners._lock:
            holding.set()
            release.wait(30)

    threads = [threading.Thread(target=hammer, args=(i,), daemon=True) for i in range(3)]
    try:
        sign_ec(conn, b"warm")
        relay.latency = 0.02  # every reply: a sign is three round trips, so the threads are nearly always inside one
        for t in threads:
            t.start()
        generation, records = conn.generation, len(rec.records)
        for _attempt in range(3):
            holding.clear()
            release.clear()
            holder = threading.Thread(target=hold_locks, daemon=True)
            holder.start()
            assert holding.wait(10)
            deadline = time.monotonic() + 5
            while not _in_a_call(conn) and time.monotonic() < deadline:
                time.sleep(0.001)
            assert _in_a_call(conn)  # a call is under way right now
            child = Child(child_signs(conn, network_hsm.token, 3))
            release.set()
            holder.join(10)
            report = child.result(timeout=30)
            assert report["signed"] == 3
        stop.set()
        for t in threads:
            t.join(20)
        assert not errors, errors[:3]
        assert signed[0] > 0
        verify(network_hsm.token, "ec", b"after", sign_ec(conn, b"after"))
        assert conn.generation == generation
        assert rec.events()[records:] == []
    finally:
        stop.set()
        release.set()
        conn.close()
        relay.stop()


def test_a_fork_waits_for_a_module_load_under_way_and_the_child_loads_its_own(client_module, network_hsm,
                                                                            pin_env, fast_policy) -> None:
    """A fork made while another thread loads a module (holding the loader's lock, as
    p11-kit-client's C_GetFunctionList holds p11-kit's own process-wide lock, which its fork handler
    never resets: docs/FACTS.md) waits until the load is done, so the child's own first load of a
    fresh client instance finds that lock free; and the child signs."""
    from hsmfsm.p11 import module

    network_hsm.start()
    conn, _ = open_conn(client_module, network_hsm.address, network_hsm.token, pin_env, fast_policy())
    holding = threading.Event()
    released: list[float] = []

    def load_under_way() -> None:
        with module._ENV_LOCK:
            holding.set()
            time.sleep(0.3)
            released.append(time.monotonic())

    loader = threading.Thread(target=load_under_way, daemon=True)
    try:
        sign_ec(conn, b"warm")
        loader.start()
        assert holding.wait(10)
        child = Child(child_signs(conn, network_hsm.token, 3))  # os.fork() inside
        forked = time.monotonic()
        loader.join(10)
        assert released and forked >= released[0]  # the fork was made once the load was done
        assert child.result(timeout=30)["signed"] == 3
        free: list[bool] = []

        def try_lock() -> None:  # from another thread: the lock is re-entrant
            free.append(module._ENV_LOCK.acquire(blocking=False))
            if free[0]:
                module._ENV_LOCK.release()

        other = threading.Thread(target=try_lock)
        other.start()
        other.join(5)
        assert free == [True]  # the parent's loader lock is free again after the fork
        verify(network_hsm.token, "ec", b"after", sign_ec(conn, b"after"))
    finally:
        conn.close()


def _in_a_call(conn) -> bool:
    """A call holds some lane's call lock right now (with a link per session, not only lane 0's)."""
    return any(lane.lock is not None and lane.lock.locked() for lane in conn._lanes) and conn.inflight > 0
