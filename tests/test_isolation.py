"""isolation: process on real tokens: a vendor module hung in C is cut off, its process killed.

The "vendor module" here is loaded by the host, never by the test process:
either in-process SoftHSM, or p11-kit-client talking to a network HSM that the
test hangs with SIGSTOP (a vendor client library stuck on a dead network HSM,
which no in-process watchdog could unblock).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hsmfsm import CallTimeout, PolicyError, Pool, SlotConnection, load_pool
from hsmfsm.p11.host import live_group_members
from hsmfsm.runtime.pool import format_status

from conftest import sign_ec, verify, wait_for


def remotes(conn: SlotConnection) -> list[int]:
    """The host's ``p11-kit-remote`` processes: the group minus the guardian and the listener."""
    host = conn._host
    assert host is not None and host.guardian_pid is not None
    return [p for p in live_group_members(host.guardian_pid) if p not in (host.guardian_pid, host.listener_pid)]


def test_a_vendor_module_hung_on_its_network_hsm_is_cut_off_and_its_process_killed(
        client_module, network_hsm, pin_env, fast_policy):
    network_hsm.start()
    conn = SlotConnection(module=client_module, token_label=network_hsm.token.label, pin=pin_env,
                          policy=fast_policy(call_timeout=1.0), name="vendor", env=network_hsm.client_env,
                          probe=False, isolation="process")
    with conn:
        assert conn.state == "logged_in"
        verify(network_hsm.token, "ec", b"warm", sign_ec(conn, b"warm"))
        [stuck] = remotes(conn)
        network_hsm.hang()
        try:
            t0 = time.monotonic()
            with pytest.raises(CallTimeout) as info:
                sign_ec(conn, b"stuck")
            assert time.monotonic() - t0 < 1.0 + 0.5
            assert "vendor" in str(info.value) and "HSMFSM_CALL_TIMEOUT" in str(info.value)
            # The process stuck inside the vendor module is gone (zombies count as gone).
            assert wait_for(lambda: stuck not in remotes(conn), 2.0)
            time.sleep(2.5)  # reconnect attempts hang too, and each is cut off: none piles up
            assert len(remotes(conn)) <= 1, remotes(conn)
        finally:
            network_hsm.resume()
        assert wait_for(lambda: conn.state == "logged_in", 5.0)
        verify(network_hsm.token, "ec", b"back", sign_ec(conn, b"back"))


def test_two_isolated_connections_to_in_process_softhsm_fail_independently(
        token, softhsm_module, tmp_path, pin_env, fast_policy):
    """In-process SoftHSM is one instance per process; isolated, each connection has its own."""
    replicas = [token.replicate(tmp_path / name) for name in ("a", "b")]
    conns = [SlotConnection(module=softhsm_module, token_label=r.label, pin=pin_env, policy=fast_policy(),
                            name=name, env=r.env, probe=False, isolation="process")
             for name, r in zip(("a", "b"), replicas)]
    try:
        for conn in conns:
            conn.open(wait=5.0)
            assert conn.state == "logged_in"
        a, b = conns
        for conn in conns:
            verify(token, "ec", b"both", sign_ec(conn, b"both"))
        before_b = b.generation
        for pid in remotes(a):
            os.kill(pid, signal.SIGKILL)  # a's vendor module crashes
        verify(token, "ec", b"after", sign_ec(a, b"after"))  # re-issued on a fresh process
        assert a.generation > 1
        verify(token, "ec", b"b", sign_ec(b, b"b"))
        assert b.generation == before_b
    finally:
        groups = [c._host.guardian_pid for c in conns]
        dirs = [c._host._dir for c in conns]
        for conn in conns:
            conn.close()
    assert all(live_group_members(g) == [] for g in groups)
    assert not any(d.exists() for d in dirs)


def test_a_dead_host_server_is_started_again(token, softhsm_module, tmp_path, pin_env, fast_policy):
    replica = token.replicate(tmp_path / "r")
    with SlotConnection(module=softhsm_module, token_label=replica.label, pin=pin_env, policy=fast_policy(),
                        name="h", env=replica.env, probe=False, isolation="process") as conn:
        host = conn._host
        old_group = host.guardian_pid
        os.kill(host.listener_pid, signal.SIGKILL)
        for pid in remotes(conn):
            os.kill(pid, signal.SIGKILL)
        verify(token, "ec", b"again", sign_ec(conn, b"again"))
        assert host.restarts == 1 and host.guardian_pid != old_group
        assert wait_for(lambda: live_group_members(old_group) == [], 5.0)


def test_the_host_dies_with_its_owner_even_on_sigkill(token, softhsm_module, tmp_path, pin_env):
    replica = token.replicate(tmp_path / "r")
    script = textwrap.dedent(f"""
        import sys, time
        from hsmfsm import SlotConnection
        conn = SlotConnection(module={softhsm_module!r}, token_label={replica.label!r}, pin={pin_env!r},
                              env={dict(replica.env)!r}, isolation="process")
        conn.open(wait=10)
        print(conn.state, conn._host.guardian_pid, flush=True)
        time.sleep(60)
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).parent.parent, env={**os.environ})
    try:
        state, group = owner.stdout.readline().split()
        assert state == "logged_in"
        assert live_group_members(int(group))
        owner.kill()
        owner.wait(5)
        assert wait_for(lambda: live_group_members(int(group)) == [], 5.0)
    finally:
        if owner.poll() is None:
            owner.kill()
        owner.stdout.close()


def test_a_pool_member_with_isolation_process(client_module, hsms, token, tmp_path, pin_env):
    a, b = hsms
    path = tmp_path / "pool.yaml"
    path.write_text(textwrap.dedent(f"""\
        pool: isolated
        policy:
          extends: network-hsm
          operations: {{deadline: 6s, call_timeout: 1s}}
        recovery: {{mode: background, interval: 200ms, max_attempts: unlimited}}
        members:
          - name: hsm-a
            module: {client_module}
            env: {{P11_KIT_SERVER_ADDRESS: "{a.address}"}}
            token_label: {token.label}
            pin: {pin_env}
            isolation: process
          - name: hsm-b
            module: {client_module}
            env: {{P11_KIT_SERVER_ADDRESS: "{b.address}"}}
            token_label: {token.label}
            pin: {pin_env}
        """))
    spec = load_pool(str(path))
    assert [m.isolation for m in spec.members] == ["process", "none"]
    with Pool.from_yaml(str(path)) as pool:
        assert pool.member("hsm-a").isolation == "process" and pool.member("hsm-a")._host is not None
        assert [m.isolation for m in pool.status()] == ["process", "none"]
        lines = format_status(pool).splitlines()
        assert lines[1].endswith("(host process)") and not lines[2].endswith("(host process)"), lines
        for i in range(10):
            verify(token, "ec", b"%d" % i, sign_ec(pool, b"%d" % i))
        a.hang()
        try:
            for i in range(10):  # failover hides the hung, isolated member
                verify(token, "ec", b"h%d" % i, sign_ec(pool, b"h%d" % i))
        finally:
            a.resume()
        assert wait_for(lambda: pool.member("hsm-a").state == "logged_in", 10)


def test_an_unknown_isolation_is_refused_with_its_line(tmp_path):
    path = tmp_path / "pool.yaml"
    path.write_text(textwrap.dedent("""\
        pool: p
        members:
          - name: a
            module: /usr/lib/softhsm/libsofthsm2.so
            token_label: t
            pin: env:PIN
            isolation: thread
        """))
    with pytest.raises(PolicyError) as info:
        load_pool(str(path))
    message = str(info.value)
    assert f"{path}:7:" in message and "isolation" in message and "thread" in message, message
    with pytest.raises(ValueError, match="isolation must be one of none, process"):
        SlotConnection(module="/usr/lib/softhsm/libsofthsm2.so", token_label="t", pin="env:PIN",
                       isolation="thread")


def test_a_forked_child_uses_the_parents_host_and_leaves_it_running(token, softhsm_module, tmp_path, pin_env,
                                                                   fast_policy):
    from test_fork import Child, child_signs, parent_signs_while

    replica = token.replicate(tmp_path / "r")
    with SlotConnection(module=softhsm_module, token_label=replica.label, pin=pin_env, policy=fast_policy(),
                        name="h", env=replica.env, isolation="process") as conn:
        verify(token, "ec", b"before", sign_ec(conn, b"before"))
        generation, host = conn.generation, conn._host
        group, listener = host.guardian_pid, host.listener_pid

        def work() -> dict:
            out = child_signs(conn, token, 5)()
            out["state"] = conn.state
            out["stopped"] = (conn.close(), host.running())[1]  # a child's close never stops the parent's host
            return out

        child = Child(work)
        during = parent_signs_while(child, conn, token)
        report = child.result(timeout=30)
        assert report["signed"] == 5 and report["state"] == "logged_in" and report["stopped"] is True
        verify(token, "ec", b"after", sign_ec(conn, b"after"))
        assert during >= 3 and conn.generation == generation and conn.state == "logged_in"
        assert host.running() and (host.guardian_pid, host.listener_pid) == (group, listener)


def test_a_closed_isolated_connection_opens_again(token, softhsm_module, tmp_path, pin_env, fast_policy):
    replica = token.replicate(tmp_path / "r")
    conn = SlotConnection(module=softhsm_module, token_label=replica.label, pin=pin_env, policy=fast_policy(),
                          name="again", env=replica.env, probe=False, isolation="process")
    for round_ in range(2):
        with conn:
            verify(token, "ec", b"%d" % round_, sign_ec(conn, b"%d" % round_))
            assert conn._host._dir.stat().st_mode & 0o777 == 0o700
        assert not conn._host._dir.exists() and not conn._host.running()


def test_a_module_that_cannot_be_loaded_is_named_with_the_loaders_words(token, tmp_path, pin_env, fast_policy,
                                                                         caplog):
    """p11-kit-remote is silent when a module fails to load; the host says why, and the connection keeps trying."""
    bogus = tmp_path / "libvendor.so"
    bogus.write_bytes(b"not a shared object\n" * 256)
    conn = SlotConnection(module=str(bogus), token_label=token.label, pin=pin_env, policy=fast_policy(),
                          name="bogus", probe=False, isolation="process")
    with caplog.at_level("WARNING", logger="hsmfsm.connection"):
        try:
            conn.open(wait=1.0)
            assert conn.state in ("disconnected", "connecting")
        finally:
            conn.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "hsmfsm.connection"]
    assert any(m.startswith("bogus: the PKCS#11 module ") and f"{bogus} cannot be loaded:" in m
               and "header" in m for m in messages), messages
