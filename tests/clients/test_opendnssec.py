"""OpenDNSSEC's signer through ``hsmfsm serve``: a member killed for good, and the signer never notices.

The acceptance of ``make test-clients``. Two SoftHSM replicas of one token, each behind its own
``p11-kit server`` (the lab's network HSMs), a pool over them served as one virtual slot by the
real command, ``python -m hsmfsm serve POOL.yaml``, and Debian's OpenDNSSEC 2.1.12 (ods-enforcerd,
ods-signerd) loading the stock p11-kit-client.so with P11_KIT_SERVER_ADDRESS pointed at it.
The keys are generated on the token before it is replicated (a virtual slot refuses key
generation) and enter OpenDNSSEC with ``ods-enforcer key import`` under manual key generation
(hsmfsm.testing.lab.opendnssec).

Without hsmfsm (``../shared/CLIENTS.md`` §2, measured on this machine): after the HSM dies,
``ods-signer sign`` fails with "HSM error" and is never retried, and the next periodic re-sign
reloads the engine and, with the HSM still down, **shuts the signer down**. Here one member is
SIGKILLed and never restarted: ``ods-signer sign`` must succeed at once, the next periodic re-sign
(Resign PT1M) must sign and write a new serial, with the same ods-signerd process throughout and
no reload. ``ldns-verify-zone``, which we did not write, judges the signed zone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from hsmfsm.p11.host import live_group_members
from hsmfsm.testing.lab import NetworkHSM, SoftHSMToken, find_module
from hsmfsm.testing.lab.opendnssec import OpenDNSSEC, Timeline, generate_keys, wait_until

pytestmark = pytest.mark.timeout(600)

APP_PIN = "ods-virtual-slot-pin"  # what OpenDNSSEC logs in with; checked by hsmfsm, never sent to a member
VIRTUAL_LABEL = "ods-ha"
MEMBERS = ("hsm-a", "hsm-b")
#: The periodic re-sign after the kill: Resign (PT1M, the signer's shortest effective period),
#: plus one 60 s back-off should a sign task be deferred, plus slack.
PERIODIC_WAIT = 60 + 60 + 30
#: "At once": CLIENTS.md measured 0.12 s for this re-sign against a healthy HSM.
AT_ONCE = 10.0
#: What the signer logs when it loses its HSM, reloads or exits (CLIENTS.md §2, signertasks.c, engine.c).
TROUBLE = re.compile(r"HSM error|hsm reset|reload|shutdown|CRITICAL|error creating libhsm context|No slots found")


def _pool_file(root: Path, hsms: dict[str, NetworkHSM], member_label: str) -> Path:
    client = find_module("p11-kit-client")
    members = "".join(f"""  - name: {name}
    module: {client}
    env: {{P11_KIT_SERVER_ADDRESS: "{hsm.address}"}}
    token_label: {member_label}
    pin: env:HSMFSM_ODS_MEMBER_PIN
""" for name, hsm in hsms.items())
    path = root / "pool.yaml"
    path.write_text(f"""pool: ods
policy: network-hsm
balance: round_robin
recovery:
  mode: background
  interval: 1s
  max_attempts: unlimited
audit:
  path: {root}/audit.jsonl
members:
{members}serve:
  socket: {root}/serve/ods.sock
  token_label: {VIRTUAL_LABEL}
  pin: env:HSMFSM_ODS_APP_PIN
""")
    return path


def _start_serve(pool_file: Path, env: dict[str, str], root: Path) -> tuple[subprocess.Popen[bytes], str]:
    out, err = (root / "serve.out").open("wb"), (root / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "hsmfsm", "serve", str(pool_file)], env=env,
                            stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
    out.close()
    err.close()

    def address() -> str | None:
        for line in (root / "serve.out").read_text().splitlines():
            if line.startswith("P11_KIT_SERVER_ADDRESS="):
                return line.split("=", 1)[1]
        return None

    assert wait_until(lambda: address() is not None or proc.poll() is not None, 60.0), "hsmfsm serve said nothing"
    found = address()
    assert found is not None, f"hsmfsm serve exited {proc.returncode}: {(root / 'serve.log').read_text()[-3000:]}"
    return proc, found


def _stop_serve(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _audit(root: Path) -> list[dict[str, object]]:
    path = root / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _status(socket_path: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", "hsmfsm", "status", "--server", socket_path], env=env,
                          capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


def test_ods_signer_signs_through_the_virtual_slot_and_outlives_a_member_killed_for_good(tmp_path: Path) -> None:
    tl = Timeline()  # printed at the end; `make test-clients` shows it (-rA), the README quotes it
    master = SoftHSMToken(tmp_path / "master", label="ods-members", rsa_keys=(), ec_keys=()).provision()
    keys = generate_keys(master)  # on the token itself, before it is replicated
    tl.note(f"keys generated on the master SoftHSM token: KSK {keys[0].locator}, ZSK {keys[1].locator}")
    hsms = {name: NetworkHSM(master.replicate(tmp_path / name), tmp_path / f"{name}.sock") for name in MEMBERS}
    env = {**os.environ, "HSMFSM_ODS_MEMBER_PIN": master.pin, "HSMFSM_ODS_APP_PIN": APP_PIN}
    serve: subprocess.Popen[bytes] | None = None
    ods: OpenDNSSEC | None = None
    groups: list[int] = []
    try:
        for hsm in hsms.values():
            hsm.start()
            assert hsm.pid is not None
            groups.append(hsm.pid)
        tl.note("token replicated to hsm-a and hsm-b, each behind its own `p11-kit server`")
        serve, address = _start_serve(_pool_file(tmp_path, hsms, master.label), env, tmp_path)
        groups.append(serve.pid)
        socket_path = address.removeprefix("unix:path=")
        tl.note(f"`hsmfsm serve pool.yaml` (pid {serve.pid}): P11_KIT_SERVER_ADDRESS={address}")

        ods = OpenDNSSEC(tmp_path / "ods", VIRTUAL_LABEL, APP_PIN, address, timeline=tl, resign_interval="PT1M")
        ods.bring_up(keys)
        assert ods.enforcerd is not None and ods.signerd is not None
        groups += [ods.enforcerd.pid, ods.signerd.pid]
        signer_pid = ods.signerd.pid
        verified = ods.verify()
        assert verified.returncode == 0, verified.stdout
        tl.note(f"ldns-verify-zone: {verified.stdout.strip()}")
        done, took = ods.resign("before-kill")
        assert done.returncode == 0 and took is not None, (done.stdout, ods.signerd_log.read_text()[-3000:])
        tl.note(f"ods-signer sign {ods.zone}: before-kill's RRSIG in the output after {took:.2f} s "
                f"(serial {ods.soa_serial()})")
        for line in _status(socket_path, env).splitlines():
            if "member" in line:
                tl.note(f"hsmfsm status: {line.strip()}")

        # -- the fault: a member dies and stays dead --------------------------------------------
        log_at_kill = len(ods.signerd_log.read_text(errors="replace").splitlines())
        audit_at_kill = len(_audit(tmp_path))
        hsms["hsm-a"].kill()
        tl.note("hsm-a killed (SIGKILL to its p11-kit server's process group); it is NOT restarted")

        done, took = ods.resign("after-kill", timeout=60.0)
        assert done.returncode == 0, done.stdout
        assert took is not None, f"after-kill not signed: {ods.signerd_log.read_text()[-4000:]}"
        tl.note(f"ods-signer sign {ods.zone}: {done.stdout.strip().splitlines()[-1]!r}; after-kill's RRSIG in the "
                f"output after {took:.2f} s (serial {ods.soa_serial()})")
        for record in [r for r in _audit(tmp_path)[audit_at_kill:] if r.get("kind") == "transition"][:3]:
            tl.note("hsmfsm audit: " + " ".join(f"{k}={record[k]}" for k in ("member", "from", "to", "event", "code")
                                                if record.get(k) is not None),
                    wall=datetime.fromisoformat(str(record["time"])).timestamp())
        assert took < AT_ONCE, f"the re-sign after the kill took {took:.1f} s"

        serial, stats = ods.soa_serial(), len(ods.stats_lines())
        assert serial is not None
        tl.note(f"waiting for the periodic re-sign (Resign PT1M), no command sent (up to {PERIODIC_WAIT} s)")
        periodic = wait_until(lambda: len(ods.stats_lines()) > stats and (ods.soa_serial() or 0) > serial,
                              PERIODIC_WAIT, 0.2)
        assert periodic, f"no periodic re-sign within {PERIODIC_WAIT} s: {ods.signerd_log.read_text()[-4000:]}"
        line = ods.stats_lines()[-1]
        tl.note(f"periodic re-sign: serial {serial} -> {ods.soa_serial()}; signerd: {line.split('msg    : ')[-1]}")
        new_signatures = re.search(r"RRSIG\[new=(\d+)", line)
        assert new_signatures and int(new_signatures.group(1)) > 0, line  # signed on the surviving member

        verified = ods.verify()
        assert verified.returncode == 0, verified.stdout
        assert ods.has_rrsig("after-kill") and ods.has_rrsig("before-kill")
        tl.note(f"ldns-verify-zone: {verified.stdout.strip()}")

        assert ods.signerd.running and ods.signerd.pid == signer_pid, "ods-signerd was restarted or exited"
        assert (ods.signerd_log.read_text().count("signer started")) == 1
        after_kill = ods.signerd_log.read_text(errors="replace").splitlines()[log_at_kill:]
        trouble = [ln for ln in after_kill if TROUBLE.search(ln)]
        assert not trouble, trouble
        tl.note(f"ods-signerd pid {signer_pid} ran throughout: no reload, no HSM error, no restart "
                f"({len(after_kill)} log lines since the kill checked)")
        for line in _status(socket_path, env).splitlines():
            if "member" in line:
                tl.note(f"hsmfsm status: {line.strip()}")
        since_kill = _audit(tmp_path)[audit_at_kill:]
        failed = [r for r in since_kill if r.get("member") == "hsm-a" and r.get("event") == "connect_failed"]
        assert not [r for r in since_kill if r.get("member") == "hsm-a" and r.get("to") == "logged_in"]
        tl.note(f"hsmfsm audit: hsm-a {len(failed)} reconnect attempts since the kill, all failed "
                f"({', '.join(sorted({str(r['code']) for r in failed}))}); hsm-b served every call")
    finally:
        if ods is not None:
            ods.stop()
        if serve is not None:
            _stop_serve(serve)
        for hsm in hsms.values():
            hsm.kill()
        tl.note("stopped ods-signerd, ods-enforcerd, hsmfsm serve and hsm-b, each by its PID")
        print(tl)
    assert wait_until(lambda: not any(live_group_members(g) for g in groups), 10.0), \
        {g: live_group_members(g) for g in groups}
    assert not [p for p in ("engine.sock", "signerd.pid", "hsmfsm-lab.lock") if (Path("/run/opendnssec") / p).exists()]
