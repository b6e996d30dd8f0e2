"""The systemd notifier (no systemd needed: a datagram socket plays NOTIFY_SOCKET) and the unit file.

The acceptance run on real tokens (READY, STATUS on member changes, watchdog pings
while every member is down) is in tests/test_operations.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hsmfsm.runtime.systemd import Notifier
from hsmfsm.testing import VirtualClock

from conftest import wait_for
from scripted_helpers import MECH, guarded_clock, pool, replicas

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "hsmfsm" / "tools" / "data" / "hsmfsm-serve@.service"


class Listener:
    """A NOTIFY_SOCKET: a bound datagram socket that collects what it is sent, in a thread."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def lines(self, prefix: str) -> list[str]:
        return [line for m in list(self.messages) for line in m.split("\n") if line.startswith(prefix)]

    def mark(self, address: str, text: str) -> list[str]:
        """Send ``text`` to the socket ourselves and wait until it is read: everything sent before
        it has been read too (one queue, in order). Returns the messages before the mark."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(text.encode(), address)
        assert wait_for(lambda: text in self.messages, 2.0)
        return self.messages[:self.messages.index(text)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[Listener, str]]:
    path = str(tmp_path / "notify.sock")
    sd = Listener(path)
    try:
        yield sd, path
    finally:
        sd.close()


@pytest.fixture
def clock() -> Iterator[VirtualClock]:
    yield from guarded_clock()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    n = Notifier.from_environment({})
    assert not n.enabled and n.watchdog_interval is None
    assert not n.ready() and not n.status("x") and not n.notify("WATCHDOG=1") and not n.start_watchdog()
    n.close()


def test_ready_and_status_reach_a_path_socket_as_one_datagram_of_one_line_each(listener) -> None:
    sd, path = listener
    n = Notifier.from_environment({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("pool signer: serving on 2 of 2 members")
    assert n.status("two\nlines  become one")
    assert n.stopping()
    assert wait_for(lambda: len(sd.messages) == 3, 2.0)
    assert sd.messages == ["READY=1\nSTATUS=pool signer: serving on 2 of 2 members", "STATUS=two lines become one",
                           "STOPPING=1\nSTATUS=stopping"]
    n.close()


def test_an_abstract_socket_name_is_spoken_too() -> None:
    name = f"hsmfsm-test-{os.getpid()}-{threading.get_ident()}"
    sd = Listener("\0" + name)
    try:
        n = Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        assert n.ready("abstract")
        assert wait_for(lambda: sd.messages == ["READY=1\nSTATUS=abstract"], 2.0), sd.messages
        n.close()
    finally:
        sd.close()


def test_a_missing_or_foreign_socket_never_raises(tmp_path, caplog) -> None:
    n = Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.enabled and not n.ready() and not n.notify("WATCHDOG=1")
    with caplog.at_level(logging.WARNING, logger="hsmfsm.systemd"):
        v = Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not v.enabled and "not a unix socket" in caplog.text
    n.close()


def test_a_receiver_that_does_not_read_never_blocks_the_sender(tmp_path) -> None:
    path = str(tmp_path / "full.sock")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)  # bound, never read: its queue fills up
    try:
        n = Notifier.from_environment({"NOTIFY_SOCKET": path})
        sent = [n.status(f"status {i} " + "x" * 1000) for i in range(2000)]
        assert sent[0] and not all(sent)  # the queue filled, and the sender went on (the test's timeout guards)
        n.close()
    finally:
        sink.close()


def test_the_watchdog_pings_at_half_the_interval_and_only_for_its_own_pid(listener) -> None:
    sd, path = listener
    assert Notifier.from_environment({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000",
                                      "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval is None
    n = Notifier.from_environment({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000",
                                   "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval == pytest.approx(0.05)
    assert n.start_watchdog() and not n.start_watchdog()  # one thread
    assert wait_for(lambda: len(sd.lines("WATCHDOG=1")) >= 5, 3.0)
    thread = n._thread
    n.close()
    assert thread is not None and not thread.is_alive()  # close stopped the pings


def test_watchdog_pings_stop_while_the_application_says_it_is_not_alive(listener, caplog) -> None:
    sd, path = listener
    alive = threading.Event()
    asked: list[bool] = []

    def check() -> bool:
        asked.append(alive.is_set())
        return asked[-1]

    n = Notifier.from_environment({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000"})
    with caplog.at_level(logging.ERROR, logger="hsmfsm.systemd"):
        n.start_watchdog(check)
        assert wait_for(lambda: len(asked) >= 3, 2.0)  # three rounds said "not alive"...
        assert sd.mark(path, "MARK") == []  # ...and sent nothing
        assert caplog.text.count("watchdog pings stop: the application's liveness check is not alive") == 1
        alive.set()
        assert wait_for(lambda: len(sd.lines("WATCHDOG=1")) >= 2, 2.0)
    n.close()


def test_status_follows_each_member_change_of_an_attached_pool(listener, clock) -> None:
    sd, path = listener
    hsms = replicas(clock, "hsm-a", "hsm-b")
    n = Notifier.from_environment({"NOTIFY_SOCKET": path})
    with pool(clock, hsms, interval=1.0) as p:
        n.attach(p)
        assert n.ready()
        hsms["hsm-a"].down()
        for i in range(4):
            p.sign("rsa", b"%d" % i, MECH)
        clock.sleep(3.0)  # reconnect attempts: state changes, but the summary's words repeat only once
        hsms["hsm-a"].up()
        clock.sleep(1.5)
        assert p.member("hsm-a").serving
    n.close()
    assert wait_for(lambda: sd.lines("STATUS=pool signer: serving on 2 of 2") and len(sd.messages) >= 3, 2.0)
    statuses = sd.lines("STATUS=")
    assert statuses[0] == "STATUS=pool signer: serving on 2 of 2 members (hsm-a logged_in, hsm-b logged_in)"
    assert sd.messages[0].startswith("READY=1\n")
    assert any(s.startswith("STATUS=pool signer: degraded: serving on 1 of 2 members; hsm-a disconnected")
               for s in statuses)
    assert all(a != b for a, b in zip(statuses, statuses[1:]))  # a line is sent when it changes
    assert statuses[-1].startswith("STATUS=pool signer:")
    assert "STATUS=pool signer: serving on 2 of 2 members (hsm-a logged_in, hsm-b logged_in)" in statuses[1:]


# -- the unit file -----------------------------------------------------------------------------


def test_the_unit_file_ships_as_package_data() -> None:
    from importlib import resources

    unit = resources.files("hsmfsm.tools") / "data" / "hsmfsm-serve@.service"
    assert unit.is_file() and unit.read_text() == UNIT.read_text()
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=30s", "NoNewPrivileges=yes", "PrivateTmp=yes", "ProtectSystem=strict",
                 "ReadWritePaths=/run/hsmfsm/%i /var/lib/hsmfsm/%i", "LoadCredential=hsm-pin:/etc/hsmfsm/%i.pin",
                 "Environment=P11_KIT_SERVER_ADDRESS=unix:path=/run/hsmfsm/signer/pkcs11.sock"):
        assert line in text, line
    readme = (ROOT / "README.md").read_text()
    assert text.strip() in readme  # the README shows the unit as shipped


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit_and_rates_it_hardened(tmp_path) -> None:
    unit = tmp_path / "hsmfsm-serve@signer.service"
    # verify checks that ExecStart exists: point it at this interpreter for the check.
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/hsmfsm", sys.executable))
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                            timeout=60)
    assert verify.returncode == 0 and not verify.stderr.strip() and not verify.stdout.strip(), verify
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True,
                              text=True, timeout=60)
    line = next(x for x in security.stdout.splitlines() if "Overall exposure level" in x)
    exposure = float(line.split(":")[-1].split()[0])
    assert exposure <= 2.5, line  # systemd's "OK" band; the unit as shipped rates about 1.9


class _StubPool:
    """What the watchdog looks at of a pool: its members' supervisor threads and its audit writer."""

    class _Row:
        name = "hsm-a"

    class _Thread:
        def __init__(self) -> None:
            self.alive = True

        def is_alive(self) -> bool:
            return self.alive

    def __init__(self) -> None:
        self.name, self.audit = "signer", None
        self.supervisor = self._Thread()
        self._listeners: list[object] = []
        self.looked = 0  # rounds of the watchdog (each reads the status once)

    def status(self) -> list[object]:
        self.looked += 1
        return [self._Row()]

    def member(self, name: str) -> object:
        pool = self

        class Member:
            _supervisor = pool.supervisor

            def remove_listener(self, fn: object) -> None:
                pool._listeners.remove(fn)

        return Member()

    def add_listener(self, fn: object) -> None:
        self._listeners.append(fn)

    def health(self) -> object:
        class H:
            @staticmethod
            def summary() -> str:
                return "pool signer: stub"

        return H()


def test_watchdog_pings_stop_when_a_supervisor_thread_has_died(listener, caplog) -> None:
    sd, path = listener
    stub = _StubPool()
    n = Notifier.from_environment({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000"})
    n.attach(stub)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="hsmfsm.systemd"):
        n.start_watchdog()
        assert wait_for(lambda: len(sd.lines("WATCHDOG=1")) >= 2, 2.0)
        stub.supervisor.alive = False
        assert wait_for(lambda: "the supervisor thread of signer/hsm-a is not alive" in caplog.text, 2.0)
        before = sd.mark(path, "MARK-1")
        rounds = stub.looked
        assert wait_for(lambda: stub.looked >= rounds + 3, 2.0)  # three more rounds of the watchdog...
        assert sd.mark(path, "MARK-2")[len(before) + 1:] == []  # ...and no ping between the marks
    n.close()
    assert stub._listeners == []  # close removed the STATUS listener
