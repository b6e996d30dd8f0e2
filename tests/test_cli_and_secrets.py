"""`hsmfsm check` from the command line, PIN sources, and the demo's entry point."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hsmfsm.config.pin import PinError, PinSource

ROOT = Path(__file__).resolve().parent.parent


def hsmfsm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hsmfsm", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


BROKEN = {
    "syntax": ("version: 1\nname: x\nconnect: max_attempts: 3\nprobe:\n  interval: 1s\n", 3, "(yaml)"),
    "unknown-field": ("extends: default\nname: x\noperations:\n  colour: red\n", 4, "operations.colour"),
    "wrong-type": ("extends: default\nname: x\noperations:\n  max_reissues: lots\n", 4,
                   "operations.max_reissues"),
    "out-of-range": ("extends: default\nname: x\noperations:\n  max_reissues: 1000\n", 4,
                     "operations.max_reissues"),
    "unknown-ckr": ("extends: default\nname: x\ncodes:\n  CKR_DEVICE_EROR: transport\n", 4,
                    "codes.CKR_DEVICE_EROR"),
    "unknown-event": ("extends: default\nname: x\nclasses:\n  transport:\n    event: reconnect\n", 5,
                      "classes.transport.event"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_check_names_file_line_and_field_and_exits_2(tmp_path, kind):
    text, line, field = BROKEN[kind]
    path = tmp_path / f"{kind}.yaml"
    path.write_text(text)
    proc = hsmfsm("check", str(path))
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr + proc.stdout
    out = proc.stdout + proc.stderr
    assert re.search(rf"{re.escape(str(path))}:{line}: {re.escape(field)}:", out), out


def test_check_accepts_the_shipped_policies():
    proc = hsmfsm("check", "policies/default.yaml", "policies/network-hsm.yaml")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("OK") == 2


def test_pin_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("SOME_PIN", "4321")
    assert PinSource("env:SOME_PIN").read() == "4321"
    assert PinSource(lambda: "1111").read() == "1111"
    pin_file = tmp_path / "pin"
    pin_file.write_text("2468\n")
    pin_file.chmod(0o600)
    assert PinSource(f"file:{pin_file}").read() == "2468"
    pin_file.chmod(0o640)
    with pytest.raises(PinError, match="readable by group or others"):
        PinSource(f"file:{pin_file}").read()
    with pytest.raises(PinError, match="literal PIN"):
        PinSource("2468")
    monkeypatch.delenv("SOME_PIN")
    with pytest.raises(PinError, match="SOME_PIN is not set"):
        PinSource("env:SOME_PIN").read()
    assert "2468" not in repr(PinSource(f"file:{pin_file}")) and "1111" not in repr(PinSource(lambda: "1111"))


@pytest.mark.hsm
def test_demo_entry_point_runs_clean_and_leaves_no_process(tmp_path):
    """`make demo`'s entry point with its script shortened: zero failed calls, a timeline, nothing left running."""
    out = tmp_path / "out"
    proc = hsmfsm("demo", "--speed", "0.5", "--keep", "--out", str(out), timeout=120)
    text = proc.stdout
    assert proc.returncode == 0, text + proc.stderr
    assert re.search(r"failed calls\s+: 0\b", text), text
    assert re.search(r"wrong signatures\s+: 0\b", text), text
    assert int(re.search(r"signatures made and verified : (\d+)", text).group(1)) > 100
    assert "final states                 : hsm-a logged_in, hsm-b logged_in" in text, text
    served = re.search(r"through the virtual slot .*: (\d+) signatures verified, (\d+) failed, (\d+) wrong, "
                       r"(\d+) C_Finalize", text)
    assert served and int(served.group(1)) > 0 and served.groups()[1:] == ("0", "0", "0"), text
    assert "pkcs11-tool + openssl verify : OK" in text, text
    assert "before signing again: hsm-a logged_in, hsm-b logged_in" in text, text
    timeline = text.split("timeline of transitions")[1].split("tally:")[0]
    assert re.search(r"demo/hsm-a\s+logged_in -> disconnected on connection_lost  CKR_DEVICE_ERROR", timeline)
    assert re.search(r"demo/hsm-b\s+logged_in -> disconnected on call_timeout  HSMFSM_CALL_TIMEOUT",
                     timeline), timeline  # the hang: a call or the probe was cut off
    assert "audit record                 : OK:" in text
    assert {p.name for p in out.iterdir()} >= {"transitions.jsonl", "pool.svg", "pool.dot", "pool-live.svg",
                                                "demo-pool.yaml"}
    assert hsmfsm("audit", "verify", str(out / "transitions.jsonl")).returncode == 0
    pids = [int(p) for p in re.findall(r"p11-kit server pid (\d+)", text)]
    assert len(pids) == 2
    from hsmfsm.testing.lab.hsm import live_group_members

    for pid in pids:  # each server and its per-connection children ran in a process group of their own
        assert live_group_members(pid) == [], pid  # exited (orphans may wait for PID 1 to reap them)
    lab = re.search(r"two replicas in (\S+)", text).group(1)
    assert not Path(lab).exists()


@pytest.mark.hsm
def test_demo_removes_its_output_folder_unless_kept(tmp_path):
    out = tmp_path / "gone"
    proc = hsmfsm("demo", "--speed", "0.25", "--out", str(out), timeout=120)
    assert "(removed at exit; --keep leaves it)" in proc.stdout, proc.stdout + proc.stderr
    assert not out.exists()


# -- credential:NAME (systemd LoadCredential=) ---------------------------------------------------


def test_a_credential_pin_is_read_from_the_credentials_directory(tmp_path, monkeypatch):
    (tmp_path / "hsm-pin").write_text("4321-secret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    source = PinSource("credential:hsm-pin")
    assert source.read() == "4321-secret"
    assert "4321" not in repr(source) and repr(source) == "<PinSource credential:hsm-pin>"


def test_a_missing_credential_names_the_variable_and_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(PinError, match=r"credential:hsm-pin: CREDENTIALS_DIRECTORY is not set"):
        PinSource("credential:hsm-pin").read()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(PinError) as info:
        PinSource("credential:hsm-pin").read()
    assert str(tmp_path / "hsm-pin") in str(info.value) and "CREDENTIALS_DIRECTORY" in str(info.value)
    with pytest.raises(PinError, match="has no '/'"):
        PinSource("credential:../etc/shadow").read()


def test_a_pool_file_takes_a_credential_pin(tmp_path):
    from hsmfsm import load_pool

    path = tmp_path / "pool.yaml"
    path.write_text("pool: p\nmembers:\n  - {name: a, module: /m.so, token_label: t, pin: 'credential:hsm-pin'}\n")
    assert load_pool(str(path)).members[0].pin == "credential:hsm-pin"


def test_a_connection_logs_in_with_a_credential_and_the_pin_shows_nowhere(client_module, tmp_path, monkeypatch,
                                                                          caplog):
    import logging

    from hsmfsm import SlotConnection
    from hsmfsm.testing.lab import NetworkHSM, SoftHSMToken

    pin = "cred-PIN-93f1c7"  # a PIN no log line can contain by accident
    token = SoftHSMToken(tmp_path / "token", label="cred", pin=pin).provision()
    hsm = NetworkHSM(token, tmp_path / "hsm.sock").start()
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "hsm-pin").write_text(pin + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    caplog.set_level(logging.DEBUG)
    try:
        with SlotConnection(client_module, token.label, "credential:hsm-pin", name="hsm-a",
                            env=hsm.client_env) as conn:
            assert conn.state == "logged_in" and conn.login_attempts == 1
            assert len(conn.generate_random(16)) == 16
            text = repr(conn) + str(conn.last_code) + repr(conn._pin)
    finally:
        hsm.kill()
    assert "cred-PIN" not in text and "cred-PIN" not in caplog.text
