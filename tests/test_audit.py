"""The transition record: a SHA-256 chain that finds any edited, deleted or swapped line.

The chain's arithmetic is tested on synthetic records (every line of a log is
deleted, edited and swapped in turn); the pool's own record is tested on
real network HSMs that are killed and hung, and on a disk that fills up.
"""

from __future__ import annotations

import json
import logging
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hsmfsm.audit import record as audit
from hsmfsm.audit.record import AuditError, AuditLog, verify
from hsmfsm.core.records import TransitionRecord
from hsmfsm.runtime.pool import Pool

from conftest import sign_ec, wait_for
from conftest import verify as verify_sig

ROOT = Path(__file__).resolve().parent.parent


def rec(i: int, member: str = "hsm-a", code: str | None = "CKR_DEVICE_ERROR") -> TransitionRecord:
    return TransitionRecord(1_790_000_000.0 + i, member, "logged_in", "disconnected", "connection_lost",
                            code, 0x30 if code else None, i % 3, i)


def write_log(path: Path, n: int, **kw) -> Path:
    with AuditLog(path, pool="signer", **kw) as log:
        for i in range(n):
            log(rec(i, member="hsm-a" if i % 2 else "hsm-b"))
    return path


def bad_line(verdict) -> int:
    assert not verdict.ok, verdict
    m = re.match(r"(.+?):(\d+): ", verdict.problem)
    assert m, verdict.problem
    return int(m.group(2))


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


# --------------------------------------------------------------------------- the chain


def test_a_record_has_every_field_and_the_chain_verifies(tmp_path):
    log = write_log(tmp_path / "t.jsonl", 5)
    records = [json.loads(line) for line in lines_of(log)]
    assert [r["kind"] for r in records] == ["opened"] + ["transition"] * 5
    first = records[1]
    assert {"time", "pool", "member", "from", "to", "event", "code", "code_value", "attempt", "generation",
            "prev", "hash", "seq"} <= set(first)
    assert first["time"].endswith("+00:00") and first["pool"] == "signer" and first["code_value"] == 0x30
    assert records[0]["prev"] == audit.GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(records, records[1:]))
    verdict = verify([log])
    assert verdict.ok and verdict.records == 6 and verdict.last_seq == 5, verdict


@pytest.mark.parametrize("index", range(6))
def test_deleting_any_line_is_found_at_that_line(tmp_path, index):
    log = write_log(tmp_path / "t.jsonl", 5)
    lines = lines_of(log)
    del lines[index]
    log.write_text("".join(lines))
    verdict = verify([log])
    # The line after the gap is the first that no longer fits; deleting the last is caught by the head file.
    assert bad_line(verdict) == min(index + 1, len(lines)), verdict.problem
    assert "missing" in verdict.problem or "deleted" in verdict.problem or "prev" in verdict.problem


@pytest.mark.parametrize("index", range(6))
def test_editing_any_line_is_found_at_that_line(tmp_path, index):
    log = write_log(tmp_path / "t.jsonl", 5)
    lines = lines_of(log)
    record = json.loads(lines[index])
    record["member"] = "hsm-z"
    lines[index] = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    log.write_text("".join(lines))
    verdict = verify([log])
    assert bad_line(verdict) == index + 1 and "edited" in verdict.problem, verdict.problem


@pytest.mark.parametrize("index", range(5))
def test_an_edit_with_a_recomputed_hash_is_found_at_the_next_line(tmp_path, index):
    log = write_log(tmp_path / "t.jsonl", 5)
    lines = lines_of(log)
    record = json.loads(lines[index])
    record.pop("hash")
    record["to"] = "logged_in"
    lines[index], _ = audit.seal({k: v for k, v in record.items() if k not in ("seq", "prev")},
                                 record["seq"], record["prev"])
    lines[index] = lines[index].decode()
    log.write_text("".join(lines))
    verdict = verify([log])
    assert bad_line(verdict) == index + 2 and "prev" in verdict.problem, verdict.problem


@pytest.mark.parametrize("index", range(5))
def test_swapping_any_two_neighbours_is_found(tmp_path, index):
    log = write_log(tmp_path / "t.jsonl", 5)
    lines = lines_of(log)
    lines[index], lines[index + 1] = lines[index + 1], lines[index]
    log.write_text("".join(lines))
    verdict = verify([log])
    assert bad_line(verdict) == index + 1 and "out of order" in verdict.problem, verdict.problem


def test_a_truncated_line_and_garbage_are_named(tmp_path):
    log = write_log(tmp_path / "t.jsonl", 3)
    text = log.read_text()
    log.write_text(text[:-20])
    assert bad_line(verify([log])) == 4
    log.write_text(text.replace(text.splitlines()[2], "not json", 1))
    verdict = verify([log])
    assert bad_line(verdict) == 3 and "not a JSON record" in verdict.problem


def test_reopening_continues_the_chain(tmp_path):
    path = tmp_path / "t.jsonl"
    write_log(path, 3)
    write_log(path, 3)
    records = [json.loads(line) for line in lines_of(path)]
    assert [r["seq"] for r in records] == list(range(8))
    assert sum(r["kind"] == "opened" for r in records) == 2
    assert verify([path]).ok


def test_a_half_written_last_line_is_cut_off_when_the_log_is_reopened(tmp_path):
    path = write_log(tmp_path / "t.jsonl", 3)
    with open(path, "ab") as fh:
        fh.write(b'{"kind":"transition","se')  # the process died mid-write
    write_log(path, 1)
    assert verify([path]).ok
    assert len(lines_of(path)) == 6


def test_rotation_keeps_one_chain_across_files_in_any_order(tmp_path):
    path = tmp_path / "t.jsonl"
    write_log(path, 60, rotate_bytes=4096)
    files = sorted(tmp_path.glob("t.jsonl*"))
    rotated = [p for p in files if re.search(r"\.\d+$", p.name)]
    assert len(rotated) >= 3
    assert all(p.stat().st_size <= 4096 for p in rotated + [path])
    shuffled = files[:]
    random.Random(1).shuffle(shuffled)
    verdict = verify(shuffled)  # the head file in the glob is skipped
    assert verdict.ok and verdict.records == 61 and verdict.files == len(rotated) + 1, verdict
    first_new = json.loads(lines_of(path)[0])
    last_old = json.loads(lines_of(tmp_path / f"t.jsonl.{len(rotated)}")[-1])
    assert first_new["prev"] == last_old["hash"]
    # A rotated file that goes missing breaks the chain where the next file starts.
    (tmp_path / "t.jsonl.2").unlink()
    verdict = verify(tmp_path.glob("t.jsonl*"))
    assert not verdict.ok and "t.jsonl.3:1:" in verdict.problem, verdict.problem


def test_keep_deletes_the_oldest_and_partial_accepts_what_is_left(tmp_path):
    path = tmp_path / "t.jsonl"
    write_log(path, 60, rotate_bytes=4096, keep=2)
    rotated = sorted(p.name for p in tmp_path.glob("t.jsonl.*") if re.search(r"\.\d+$", p.name))
    assert len(rotated) == 2
    files = list(tmp_path.glob("t.jsonl*"))
    verdict = verify(files)
    assert bad_line(verdict) == 1 and "where 0 was expected" in verdict.problem
    partial = verify(files, partial=True)
    assert partial.ok and partial.first_seq > 0 and any("taken on trust" in n for n in partial.notes), partial


def test_a_second_writer_is_refused(tmp_path):
    with AuditLog(tmp_path / "t.jsonl"):
        with pytest.raises(AuditError, match="another process"):
            AuditLog(tmp_path / "t.jsonl")


def test_a_stalled_disk_never_blocks_the_caller_and_the_loss_is_on_the_record(tmp_path, monkeypatch):
    import threading

    gate = threading.Event()
    real_append = audit._append

    def stalled(fd, data):
        gate.wait(30)
        real_append(fd, data)

    monkeypatch.setattr(audit, "_append", stalled)
    log = AuditLog(tmp_path / "t.jsonl", queue_size=10)
    for i in range(100):
        log(rec(i))  # returns at once: the writer thread is the one waiting
    assert log.lost >= 80
    gate.set()
    log.close()
    records = [json.loads(line) for line in lines_of(tmp_path / "t.jsonl")]
    gaps = [r for r in records if r["kind"] == "gap"]
    assert len(gaps) == 1 and gaps[0]["lost"] == log.lost
    assert len([r for r in records if r["kind"] == "transition"]) + log.lost == 100
    assert verify([tmp_path / "t.jsonl"]).ok


def test_show_filters_by_member_and_time(tmp_path):
    log = write_log(tmp_path / "t.jsonl", 6)
    lines = list(audit.timeline([log], member="hsm-a"))
    assert len(lines) == 3 and all("signer/hsm-a" in line for line in lines)
    assert "CKR_DEVICE_ERROR (0x30)" in lines[0] and "logged_in -> disconnected" in lines[0]
    since = audit.parse_since("2026-09-21T14:13:24Z")  # rec(4)'s time: records 4 and 5, and the log's opening (now)
    later = list(audit.timeline([log], since=since))
    assert len(later) == 3 and "log opened" in later[0] and "gen=4" in later[1] and "gen=5" in later[2], later
    with pytest.raises(ValueError, match="ISO 8601"):
        audit.parse_since("yesterday")


def test_audit_command_exit_codes_and_messages(tmp_path):
    log = write_log(tmp_path / "t.jsonl", 4)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "hsmfsm", "audit", *args], capture_output=True,
                              text=True, timeout=60, cwd=ROOT)

    ok = cli("verify", str(log))
    assert ok.returncode == 0 and ok.stdout.startswith("OK: 5 records"), ok.stdout + ok.stderr
    shown = cli("show", str(log), "--member", "hsm-b")
    assert shown.returncode == 0 and len(shown.stdout.splitlines()) == 2, shown.stdout
    lines = lines_of(log)
    log.write_text("".join(lines[:2] + lines[3:]))
    bad = cli("verify", str(log))
    assert bad.returncode == 1 and f"{log}:3:" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    missing = cli("verify", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr and "Traceback" not in missing.stderr


def test_a_code_with_no_number_is_null_in_the_record_and_never_shown_as_0x0(tmp_path):
    """HSMFSM_CALL_TIMEOUT is hsmfsm's own code: it has no CK_RV (``Code.value`` is None).

    Written or shown as 0 / 0x0 it would read as CKR_OK, the opposite of what happened.
    """
    from hsmfsm.core.codes import CALL_TIMEOUT, CKR_OK

    assert CALL_TIMEOUT.value is None
    path = tmp_path / "t.jsonl"
    timed_out = TransitionRecord(1_790_000_000.0, "hsm-a", "logged_in", "disconnected", "call_timeout",
                                 CALL_TIMEOUT.name, CALL_TIMEOUT.value, 0, 1)
    logged_in = TransitionRecord(1_790_000_001.0, "hsm-a", "open", "logged_in", "login_ok",
                                 CKR_OK.name, CKR_OK.value, 0, 2)
    with AuditLog(path, pool="signer") as log:
        log(timed_out)
        log(logged_in)
    lines = lines_of(path)
    records = [json.loads(line) for line in lines]
    assert records[1]["code"] == "HSMFSM_CALL_TIMEOUT" and records[1]["code_value"] is None
    assert '"code_value":null' in lines[1]
    assert records[2]["code"] == "CKR_OK" and records[2]["code_value"] == 0  # a real CKR_OK keeps its number
    assert verify([path]).ok

    def timeout_lines(text_lines):
        found = [line for line in text_lines if "HSMFSM_CALL_TIMEOUT" in line]
        assert len(found) == 1, text_lines
        return found[0]

    shown = list(audit.timeline([path]))  # what `audit show` and the demo's timeline print
    line = timeout_lines(shown)
    assert "0x" not in line and "CKR_OK" not in line and "on call_timeout  HSMFSM_CALL_TIMEOUT  attempt=" in line
    assert "CKR_OK (0x0)" in shown[2]
    assert "0x" not in str(timed_out)
    assert timed_out.as_dict()["code_value"] is None
    cli = subprocess.run([sys.executable, "-m", "hsmfsm", "audit", "show", str(path)], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    assert "0x" not in timeout_lines(cli.stdout.splitlines())


# --------------------------------------------------------------------------- on real HSMs


def pool_file(tmp_path: Path, client_module: str, hsms, label: str, log: str, pin_b: str = "env:AUDIT_PIN") -> Path:
    a, b = hsms
    path = tmp_path / "pool.yaml"
    path.write_text(f"""\
pool: signer
policy:
  extends: network-hsm
  name: audited
  operations: {{deadline: 6s, call_timeout: 1s}}
  probe: {{interval: 200ms}}
recovery: {{mode: background, interval: 200ms, max_attempts: unlimited}}
audit: {{path: {log}, rotate_size: 4KiB}}
members:
  - name: hsm-a
    module: {client_module}
    env: {{P11_KIT_SERVER_ADDRESS: "{a.address}"}}
    token_label: {label}
    pin: env:AUDIT_PIN
  - name: hsm-b
    module: {client_module}
    env: {{P11_KIT_SERVER_ADDRESS: "{b.address}"}}
    token_label: {label}
    pin: {pin_b}
""")
    return path


def test_a_pool_run_with_faults_leaves_a_record_that_verifies_and_detects_tampering(
        client_module, hsms, token, tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIT_PIN", token.pin)
    a, b = hsms
    with Pool.from_yaml(str(pool_file(tmp_path, client_module, hsms, token.label, "logs/transitions.jsonl"))) \
            as pool:
        assert pool.audit is not None and pool.audit.path == tmp_path / "logs" / "transitions.jsonl"
        for i in range(20):
            verify_sig(token, "ec", b"x%d" % i, sign_ec(pool, b"x%d" % i))
        a.kill()
        for i in range(20):
            verify_sig(token, "ec", b"y%d" % i, sign_ec(pool, b"y%d" % i))
        a.start()
        assert wait_for(lambda: pool.member("hsm-a").state == "logged_in", 10)
        b.hang()
        for i in range(10):
            verify_sig(token, "ec", b"z%d" % i, sign_ec(pool, b"z%d" % i))
        # Suspected at once (its call cut off and signed on hsm-a); silent on, it meets the call timeout.
        assert wait_for(lambda: pool.member("hsm-b").state != "logged_in", 10)
        b.resume()
        assert wait_for(lambda: pool.member("hsm-b").state == "logged_in", 10)
    files = sorted((tmp_path / "logs").glob("transitions.jsonl*"))
    verdict = verify(files)
    assert verdict.ok, verdict
    records = [json.loads(line) for f in audit._log_files(files) for line in lines_of(f)]
    transitions = [(r["member"], r["from"], r["to"], r["event"], r["code"]) for r in records
                   if r["kind"] == "transition"]
    assert ("hsm-a", "logged_in", "disconnected", "connection_lost", "CKR_DEVICE_ERROR") in transitions
    assert ("hsm-b", "logged_in", "disconnected", "call_timeout", "HSMFSM_CALL_TIMEOUT") in transitions
    assert transitions[-1][3] == "close" and all(r["pool"] == "signer" for r in records)
    assert len([f for f in files if re.search(r"\.\d+$", f.name)]) >= 1  # 4 KiB rotation happened
    # Tamper with the live file of the real record: delete, edit, swap.
    live = tmp_path / "logs" / "transitions.jsonl"
    original = lines_of(live)
    assert len(original) >= 3
    for tamper in ("delete", "edit", "swap"):
        lines = original[:]
        if tamper == "delete":
            del lines[1]
        elif tamper == "edit":
            lines[1] = lines[1].replace('"attempt":', '"attempt":1', 1)
        else:
            lines[1], lines[2] = lines[2], lines[1]
        live.write_text("".join(lines))
        verdict = verify(files)
        assert not verdict.ok and f"{live}:2:" in verdict.problem, (tamper, verdict.problem)
    live.write_text("".join(original))
    assert verify(files).ok


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: a disk that really fills up (needs root, as in CI; skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_reported_and_signing_goes_on(client_module, hsms, token, tmp_path, small_disk,
                                                     monkeypatch, caplog):
    monkeypatch.setenv("AUDIT_PIN", token.pin)
    a, b = hsms
    caplog.set_level(logging.ERROR, logger="hsmfsm.audit")
    filler = small_disk / "filler"
    with Pool.from_yaml(str(pool_file(tmp_path, client_module, hsms, token.label, f"{small_disk}/t.jsonl"))) \
            as pool:
        pool.audit.flush()
        with open(filler, "wb", buffering=0) as fh:  # fill the disk to the last byte
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError:
                pass
        a.kill()
        for i in range(30):
            verify_sig(token, "ec", b"f%d" % i, sign_ec(pool, b"f%d" % i))
        a.start()
        assert wait_for(lambda: pool.member("hsm-a").state == "logged_in", 10)
        pool.audit.flush()
        assert pool.audit.lost > 0 and "No space left" in (pool.audit.last_error or "")
        assert any("cannot write" in r.getMessage() for r in caplog.records)
        filler.unlink()  # space again: the next record is a gap record saying how many were lost
        b.kill()
        for i in range(10):
            verify_sig(token, "ec", b"g%d" % i, sign_ec(pool, b"g%d" % i))
        b.start()
        lost = pool.audit.lost
    files = list(small_disk.glob("t.jsonl*"))
    records = [json.loads(line) for f in audit._log_files(files) for line in lines_of(f)]
    gaps = [r for r in records if r["kind"] == "gap"]
    assert gaps and sum(g["lost"] for g in gaps) == lost
    assert verify(files).ok
