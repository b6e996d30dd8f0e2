"""Operations on real tokens (issue 13's acceptance): Prometheus metrics over HTTP while a member is
killed and restarted, ``hsmfsm health`` exit codes, a NOTIFY_SOCKET during an outage of every
member, and PINs from systemd credentials that show nowhere.

The token has a PIN that cannot occur by accident, and every pool here reads it through
``credential:hsm-pin`` from a CREDENTIALS_DIRECTORY, as under systemd's LoadCredential=.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from hsmfsm import OperationFailed
from hsmfsm.runtime.pool import Pool
from hsmfsm.runtime.systemd import Notifier
from hsmfsm.testing.lab import NetworkHSM, SoftHSMToken

from conftest import sign_ec, verify, wait_for
from test_systemd import Listener

prometheus_client = pytest.importorskip("prometheus_client")
from hsmfsm.metrics import serve_metrics  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = [pytest.mark.hsm, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent
PIN = "Op5-cred-9Kq"  # distinctive: no timestamp, hash or counter contains it by chance


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> SoftHSMToken:
    """Override of conftest's token: one with a distinctive PIN (``hsms`` then serves replicas of it)."""
    return SoftHSMToken(tmp_path_factory.mktemp("ops") / "master", label="ops", pin=PIN).provision()


@pytest.fixture
def credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$CREDENTIALS_DIRECTORY with the PIN as ``hsm-pin`` (and a wrong one as ``wrong-pin``)."""
    folder = tmp_path / "credentials"
    folder.mkdir(mode=0o700)
    (folder / "hsm-pin").write_text(PIN + "\n")
    (folder / "wrong-pin").write_text("Wr0ng-cred-4Tz\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(folder))
    return folder


def write_pool(path: Path, client_module: str, hsms: tuple[NetworkHSM, NetworkHSM], *,
               pins: tuple[str, str] = ("hsm-pin", "hsm-pin")) -> Path:
    a, b = hsms
    path.write_text(f"""\
pool: signer
policy:
  extends: network-hsm
  name: ops
  operations: {{deadline: 2s, call_timeout: 1s}}
  probe: {{interval: 200ms}}
recovery: {{mode: background, interval: 200ms, max_attempts: 1000}}
audit: {{path: audit/transitions.jsonl}}
members:
  - name: hsm-a
    module: {client_module}
    env: {{P11_KIT_SERVER_ADDRESS: "{a.address}"}}
    token_label: ops
    pin: "credential:{pins[0]}"
  - name: hsm-b
    module: {client_module}
    env: {{P11_KIT_SERVER_ADDRESS: "{b.address}"}}
    token_label: ops
    pin: "credential:{pins[1]}"
""")
    return path


def health(pool_file: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hsmfsm", "health", str(pool_file), *args], capture_output=True,
                          text=True, timeout=90, cwd=ROOT, env=env or dict(os.environ))


def scrape(url: str) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """The exposition over HTTP, and its samples as the prometheus_client parser reads them back."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return text, samples


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name`` over the series that carry ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


# -- 1. metrics ---------------------------------------------------------------------------------


def test_metrics_follow_a_member_killed_and_restarted(hsms, client_module, credentials, tmp_path) -> None:
    a, b = hsms
    pool = Pool.from_yaml(str(write_pool(tmp_path / "pool.yaml", client_module, hsms)))
    server = serve_metrics([pool], "127.0.0.1", 0)  # before open: the first connects are counted
    texts = []
    try:
        assert server.url == f"http://127.0.0.1:{server.port}/metrics" and server.port > 0
        pool.open()
        for i in range(10):
            verify(a.token, "ec", b"%d" % i, sign_ec(pool, b"%d" % i))
        with pytest.raises(OperationFailed):
            pool.sign("no-such-key", b"x", mechanism="ECDSA")
        text, m = scrape(server.url)
        texts.append(text)
        for member in ("hsm-a", "hsm-b"):
            assert sample(m, "hsmfsm_member_up", pool="signer", member=member) == 1
            states = {dict(ls)["state"]: v for (n, ls), v in m.items()
                      if n == "hsmfsm_member_state" and dict(ls)["member"] == member}
            assert states == {"disconnected": 0, "connecting": 0, "open": 0, "logged_in": 1, "degraded": 0,
                              "failed": 0}
        assert sample(m, "hsmfsm_calls_total", pool="signer", op="sign", outcome="ok") == 10
        assert sample(m, "hsmfsm_calls_total", pool="signer", op="sign", outcome="OperationFailed") == 1
        assert sample(m, "hsmfsm_pool_serving_members", pool="signer") == 2

        a.kill()
        for i in range(10):  # the pool hides the loss: every call still gets a good signature
            verify(b.token, "ec", b"k%d" % i, sign_ec(pool, b"k%d" % i))
        assert wait_for(lambda: sample(scrape(server.url)[1], "hsmfsm_member_up", pool="signer",
                                       member="hsm-a") == 0, 10.0)
        text, m = scrape(server.url)
        texts.append(text)
        assert sample(m, "hsmfsm_member_state", pool="signer", member="hsm-a", state="logged_in") == 0
        assert sample(m, "hsmfsm_pool_serving_members", pool="signer") == 1
        assert sample(m, "hsmfsm_pool_healthy", pool="signer") == 0
        a.start()
        assert wait_for(lambda: sample(scrape(server.url)[1], "hsmfsm_member_up", pool="signer",
                                       member="hsm-a") == 1, 15.0)
        for i in range(10):
            sign_ec(pool, b"back %d" % i)
        text, m = scrape(server.url)
        texts.append(text)
        # Transitions counted: hsm-a left logged_in (the dead link, a probe or the watchdog said so), logged in again.
        left = total(m, "hsmfsm_transitions_total", pool="signer", member="hsm-a", to="disconnected",
                     **{"from": "logged_in"})
        assert left == 1
        assert sample(m, "hsmfsm_transitions_total", pool="signer", member="hsm-a", event="login_ok",
                      to="logged_in", **{"from": "open"}) == 2
        assert sample(m, "hsmfsm_transitions_total", pool="signer", member="hsm-b", event="login_ok",
                      to="logged_in", **{"from": "open"}) == 1
        assert total(m, "hsmfsm_transitions_total", pool="signer", member="hsm-a", event="connect_failed") >= 1
        # Calls counted by outcome, and the histogram agrees with the counters.
        assert sample(m, "hsmfsm_calls_total", pool="signer", op="sign", outcome="ok") == 30
        assert sample(m, "hsmfsm_call_duration_seconds_count", pool="signer", op="sign") == 31
        assert total(m, "hsmfsm_member_calls_total", pool="signer", op="sign", outcome="ok") == 30
        assert sample(m, "hsmfsm_member_state_change_timestamp_seconds", pool="signer", member="hsm-a") == \
            pytest.approx(pool.member("hsm-a").since)
        assert sample(m, "hsmfsm_audit_dropped_records_total", pool="signer") == 0
        assert sample(m, "hsmfsm_pool_healthy", pool="signer") == 1
    finally:
        server.close()
        pool.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=2)  # closed
    for text in texts:
        assert PIN not in text
    promtool = shutil.which("promtool")
    if promtool:  # not installed on the development machine; CI images with Prometheus run it
        check = subprocess.run([promtool, "check", "metrics"], input=texts[-1], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


# -- 2. hsmfsm health ---------------------------------------------------------------------------


def test_health_exits_0_1_2_and_3(hsms, client_module, credentials, tmp_path) -> None:
    a, b = hsms
    pool_file = write_pool(tmp_path / "pool.yaml", client_module, hsms)
    outputs = []

    def run(*args: str, path: Path = pool_file) -> subprocess.CompletedProcess[str]:
        proc = health(path, *args)
        outputs.append(proc.stdout + proc.stderr)
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        return proc

    ok = run("--sign-test", "ec")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[0] == ("HSMFSM OK - pool signer: serving on 2 of 2 members (hsm-a logged_in, hsm-b logged_in)"
                        " | serving=2;;;0;2")
    assert all("sign test ok" in line for line in lines[1:3])
    doc = json.loads(run("--json", "--sign-test", "rsa").stdout)
    assert (doc["status"], doc["exit"], doc["healthy"], doc["unhealthy_since"]) == ("OK", 0, True, None)
    assert doc["sign_test"] == {"key_label": "rsa", "members": {"hsm-a": "ok", "hsm-b": "ok"}}
    assert [(m["name"], m["state"], m["healthy"]) for m in doc["members"]] == [
        ("hsm-a", "logged_in", True), ("hsm-b", "logged_in", True)]
    assert all(m["since"].endswith("+00:00") and m["sessions"] >= 1 for m in doc["members"])
    assert not (tmp_path / "audit").exists()  # the check leaves the daemon's record alone

    bad_key = run("--sign-test", "no-such-key")  # every member fails the sign test: nothing serves
    assert bad_key.returncode == 2 and bad_key.stdout.startswith("HSMFSM CRITICAL - pool signer: DOWN")
    assert "sign test: " in bad_key.stdout and "no-such-key" in bad_key.stdout

    a.kill()
    one = run()
    assert one.returncode == 1, one.stdout
    assert one.stdout.startswith("HSMFSM WARNING - pool signer: degraded: serving on 1 of 2 members; hsm-a ")
    assert "unhealthy since" in one.stdout
    doc = json.loads(run("--json").stdout)
    assert (doc["exit"], doc["healthy"], doc["serving"]) == (1, False, 1) and doc["unhealthy_since"]

    b.kill()
    none = run()
    assert none.returncode == 2 and none.stdout.startswith("HSMFSM CRITICAL - pool signer: DOWN: serving on 0 of 2")

    a.start()
    b.start()
    wrong = run(path=write_pool(tmp_path / "wrong.yaml", client_module, hsms, pins=("hsm-pin", "wrong-pin")))
    assert wrong.returncode == 2, wrong.stdout
    assert wrong.stdout.startswith("HSMFSM CRITICAL - pool signer: a member failed: serving on 1 of 2 members; "
                                   "hsm-b failed CKR_PIN_INCORRECT")

    broken = tmp_path / "broken.yaml"
    broken.write_text("pool: signer\nmembers: [\n")
    for path in (broken, tmp_path / "missing.yaml"):
        proc = run(path=path)
        assert proc.returncode == 3 and proc.stdout.startswith(f"HSMFSM UNKNOWN - {path}"), proc.stdout
    doc = json.loads(run("--json", path=broken).stdout)
    assert (doc["status"], doc["exit"]) == ("UNKNOWN", 3) and str(broken) in doc["error"]
    for text in outputs:
        assert PIN not in text and "Wr0ng-cred" not in text


# -- 3. systemd: NOTIFY_SOCKET ---------------------------------------------------------------------


def test_notify_socket_gets_ready_status_and_watchdog_pings_while_every_member_is_down(
        hsms, client_module, credentials, tmp_path, monkeypatch) -> None:
    a, b = hsms
    sd = Listener(str(tmp_path / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # WatchdogSec=0.2s: a ping every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_environment()
    pool = Pool.from_yaml(str(write_pool(tmp_path / "pool.yaml", client_module, hsms)))

    def status(text: str) -> bool:
        return any(text in line for line in sd.lines("STATUS="))

    try:
        pool.open()
        notifier.attach(pool)
        assert notifier.ready() and notifier.start_watchdog()
        assert wait_for(lambda: sd.messages and sd.messages[0].startswith("READY=1\nSTATUS="), 2.0)
        assert sd.messages[0] == ("READY=1\nSTATUS=pool signer: serving on 2 of 2 members "
                                  "(hsm-a logged_in, hsm-b logged_in)")
        a.kill()
        assert wait_for(lambda: status("pool signer: degraded: serving on 1 of 2 members; hsm-a "), 10.0)
        b.kill()
        assert wait_for(lambda: status("pool signer: DOWN: serving on 0 of 2 members; hsm-a "), 10.0)
        # Every member down: the process lives, so the pings go on (systemd must not restart it into the outage).
        pings = len(sd.lines("WATCHDOG=1"))
        assert wait_for(lambda: len(sd.lines("WATCHDOG=1")) >= pings + 10, 5.0)
        assert not pool.member("hsm-a").serving and not pool.member("hsm-b").serving
        a.start()
        b.start()
        assert wait_for(lambda: sd.lines("STATUS=")[-1] == "STATUS=pool signer: serving on 2 of 2 members "
                                                           "(hsm-a logged_in, hsm-b logged_in)", 15.0)
        sign_ec(pool, b"after the outage")
        assert notifier.stopping()
    finally:
        pool.close()
        notifier.close()
        sd.close()
    statuses = sd.lines("STATUS=")
    assert len(statuses) >= 4 and all(x != y for x, y in zip(statuses, statuses[1:]))
    assert any(line == "STOPPING=1" for m in sd.messages for line in m.split("\n"))
    assert PIN not in "\n".join(sd.messages)


# -- 4. credential: PINs ----------------------------------------------------------------------------


def test_a_missing_credential_is_a_clear_error_naming_the_variable_and_the_file(
        hsms, client_module, credentials, tmp_path, monkeypatch) -> None:
    pool_file = write_pool(tmp_path / "pool.yaml", client_module, hsms, pins=("hsm-pin", "absent"))
    proc = health(pool_file, "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 2 and doc["failed"] == ["hsm-b"]
    b = {m["name"]: m for m in doc["members"]}["hsm-b"]
    assert "credential:absent" in b["error"] and str(credentials / "absent") in b["error"]
    assert "CREDENTIALS_DIRECTORY" in b["error"]
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    proc = health(pool_file, env=env)
    assert proc.returncode == 2 and "CREDENTIALS_DIRECTORY is not set" in proc.stdout, proc.stdout
    assert PIN not in proc.stdout + proc.stderr


def test_a_credential_pin_signs_and_shows_nowhere(hsms, client_module, credentials, tmp_path,
                                                  caplog) -> None:
    a, b = hsms
    caplog.set_level(logging.DEBUG)
    pool = Pool.from_yaml(str(write_pool(tmp_path / "pool.yaml", client_module, hsms)))
    calls: list[str] = []
    pool.add_call_listener(lambda r: calls.append(f"{r} {r.as_dict()}"))
    server = serve_metrics(pool, "127.0.0.1", 0)
    try:
        pool.open()
        assert all(pool.member(n).login_attempts == 1 for n in ("hsm-a", "hsm-b"))
        for i in range(5):
            verify(a.token, "ec", b"%d" % i, sign_ec(pool, b"%d" % i))
        a.kill()
        for i in range(5):
            sign_ec(pool, b"k%d" % i)
        assert wait_for(lambda: not pool.member("hsm-a").serving, 5.0)
        exposition = scrape(server.url)[0]
        report = json.dumps(pool.health().as_dict()) + pool.health().summary() + repr(pool.status())
    finally:
        server.close()
        pool.close()
    # Everything a log handler could print: the message, the journald fields and the record dict.
    logs = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.__dict__!r}" for r in caplog.records)
    assert "HSMFSM_MEMBER" in logs and "login_ok" in logs and "credential:hsm-pin" not in exposition
    audit = "".join(p.read_text() for p in (tmp_path / "audit").iterdir())
    for where, text in {"metrics": exposition, "health": report, "logs": logs, "calls": "\n".join(calls),
                        "audit": audit}.items():
        assert text, where
        assert PIN not in text, f"the PIN appears in {where}"
