"""``hsmfsm simulate``: the scenario format, the what-if runs, their determinism and cost, and fidelity.

The scenario loader (hsmfsm/config/scenario_file.py) reports every mistake as
``FILE:LINE: FIELD: message``; the simulator (hsmfsm/tools/simulate/) runs the
production connection and pool on scripted HSMs and a virtual clock; one test
(marked hsm) runs a scenario on a real network HSM too and compares the paths.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pytest
from hsmfsm import SlotConnection
from hsmfsm.config.policy_file import shipped_policies
from hsmfsm.config.pool_file import shipped_pools
from hsmfsm.config.scenario_file import (
    MODULE_FUNCTIONS,
    SCENARIO_SCHEMA_PATH,
    SCENARIOS_DIR,
    load_scenario,
    scenario_schema,
    shipped_scenarios,
)
from hsmfsm.core.errors import HSMError
from hsmfsm.core.policy import PolicyError
from hsmfsm.testing.lab import NetworkHSM
from hsmfsm.testing.scripted import FUNCTIONS
from hsmfsm.tools.simulate import analyse, as_json, as_text, main, simulate
from hsmfsm.tools.simulate.compare import Step, first_difference, normalise, steps
from hsmfsm.tools.simulate.model import END, START, schedule

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ["all-members-down", "flapping-member", "hsm-restart", "hung-hsm", "network-blip", "wrong-pin"]

HEAD = "version: 1\nscenario: t\n"


def write(tmp: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def error_of(path: Path) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        load_scenario(path)
    return info.value


# --------------------------------------------------------------------------- the format


def test_shipped_scenarios_are_listed_apart_from_policies_and_pools() -> None:
    assert shipped_scenarios() == SHIPPED
    assert not set(SHIPPED) & (set(shipped_policies()) | set(shipped_pools()))
    assert SCENARIOS_DIR.resolve() == (REPO / "policies" / "scenarios").resolve()


def test_check_of_the_shipped_policies_glob_never_sees_a_scenario() -> None:
    """``hsmfsm check policies/*.yaml`` (make check) checks policies and pools only, and passes."""
    paths = sorted(glob.glob("policies/*.yaml", root_dir=REPO))
    assert paths and not any("scenarios" in p for p in paths)
    proc = subprocess.run([sys.executable, "-m", "hsmfsm", "check", *paths], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("OK ") == len(paths)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_scenario_loads_and_validates_with_plain_jsonschema(name: str) -> None:
    import yaml

    path = SCENARIOS_DIR / f"{name}.yaml"
    jsonschema.validate(yaml.safe_load(path.read_text()), scenario_schema())
    s = load_scenario(name)
    assert s.name == name and s.faults and s.duration == 600.0
    assert load_scenario(path) == s


def test_the_schema_documents_every_field() -> None:
    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            for key, spec in node.get("properties", {}).items():
                if isinstance(spec, dict):  # the per-kind "then" lists names only (true)
                    assert spec.get("description"), f"{where}.{key} has no description"
            for key, value in node.items():
                if key != "if":  # a condition on a field, not a field
                    walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    schema = scenario_schema()
    assert schema["description"]
    walk(schema, "scenario")


def test_the_schema_shares_the_duration_syntax_and_names_every_scripted_function() -> None:
    policy_schema = json.loads((REPO / "hsmfsm" / "config" / "policy.schema.json").read_text())
    schema = json.loads(SCENARIO_SCHEMA_PATH.read_text())
    assert schema["$defs"]["duration"]["anyOf"] == policy_schema["$defs"]["duration"]["anyOf"]
    calls = schema["$defs"]["fault"]["properties"]["call"]["enum"]
    assert calls == list(MODULE_FUNCTIONS) and set(calls) == set(FUNCTIONS)
    kinds = schema["$defs"]["fault"]["properties"]["fault"]["enum"]
    assert {b["then"]["x-fault"] for b in schema["$defs"]["fault"]["allOf"]} == set(kinds)


def test_durations_repeats_and_members_are_read_as_written(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "pool: ha-pool\nduration: 1.5m\nlatency: 2ms\nworkload: {rate: 5}\nfaults:\n"
                 "  - {fault: down, member: '*', at: 250ms, for: 2s, repeat: {every: 10s, count: 3}}\n"
                 "  - {fault: slow, member: [hsm-b], at: 1m, by: 800ms, for: 5s}\n"
                 "  - {fault: return, member: hsm-a, at: 0, code: '0x32', call: login, times: 2}\n")
    s = load_scenario(path)
    assert (s.duration, s.latency, s.members, s.seed) == (90.0, 0.002, ("hsm-a", "hsm-b"), 1)
    assert (s.workload.rate, s.workload.operation, s.workload.threads) == (5, "sign", 1)
    down, slow, ret = s.faults
    assert down.members == ("hsm-a", "hsm-b") and down.starts() == (0.25, 10.25, 20.25)
    assert (slow.members, slow.by, slow.duration, slow.describe()) == (("hsm-b",), 0.8, 5.0, "slow by 800ms for 5s")
    assert (ret.code, ret.describe()) == ("CKR_DEVICE_REMOVED", "return CKR_DEVICE_REMOVED on login 2 times")
    steps_ = [(a.at, a.step, a.occurrence.member) for a in schedule(s)][:5]
    assert steps_ == [(0.0, START, "hsm-a"), (0.25, START, "hsm-a"), (0.25, START, "hsm-b"),
                      (2.25, END, "hsm-a"), (2.25, END, "hsm-b")]


BROKEN = [
    # (what follows the head, line, field, message)
    ("policy: network-hsm\nduration: 10m\nfaults:\n  - {fault: dwon, at: 1m}\n", 6, "faults[0].fault",
     "unknown fault kind 'dwon' (did you mean down?"),
    ("policy: network-hsm\nduration: 10m\nfaults:\n  - fault: down\n    at: 1m\n    for: 5s\n    times: 3\n", 9,
     "faults[0].times", "a down fault does not take times (it takes: fault, member, at, for, repeat)"),
    ("policy: network-hsm\nduration: 10m\nfaults:\n  - fault: hang\n    at: 1m\n", 6, "faults[0].for",
     "missing required field"),
    ("policy: network-hsm\nduration: 10m\nfaults:\n  - {fault: down, at: 11m, for: 1s}\n", 6, "faults[0].at",
     "11m is not before the end of the run (duration 10m)"),
    ("policy: network-hsm\nduration: 10m\nfaults:\n  - {fault: return, at: 1m, code: CKR_DEVICE_EROR, call: sign}\n",
     6, "faults[0].code", "unknown return code (did you mean CKR_DEVICE_ERROR?)"),
    ("policy: network-hsm\nduration: 10m\nfaults:\n  - {fault: return, at: 1m, code: CKR_DEVICE_ERROR, call: C_Sign}\n",
     6, "faults[0].call", "unknown module function 'C_Sign'"),
    ("pool: ha-pool\nduration: 10m\nfaults:\n  - {fault: down, at: 1m, for: 5s, member: hsm-c}\n", 6,
     "faults[0].member", "no member named 'hsm-c' (did you mean hsm-"),
    ("pool: ha-pool\nduration: 10m\nfaults:\n  - {fault: restart, at: 1m}\n", 6, "faults[0].member",
     "missing required field: the pool has 2 members"),
    ("policy: network-hsm\nduration: 10m\nfaults:\n  - {fault: down, at: 1m, for: 5s}\n"
     "  - {fault: down, at: 62s, for: 5s}\n", 7, "faults[1].at", "overlaps the down fault of line 6"),
    ("policy: network-hsm\nduration: 10m\nfaults:\n  - {fault: down, at: 1m, for: 50s, "
     "repeat: {every: 30s, count: 2}}\n", 6, "faults[0].repeat.every", "30s is not longer than the fault's for"),
    ("policy: network-hsm\nduration: 10m\nfaults:\n  - {fault: down, at: 9m, for: 5s, "
     "repeat: {every: 70s, count: 2}}\n", 6, "faults[0].repeat", "the last occurrence (610s) is not before the end"),
    ("policy: network-hsm\npool: ha-pool\nduration: 10m\n", 4, "pool", "give either policy (one connection) or pool"),
    ("duration: 10m\n", 1, "(scenario)", "give policy (one connection under a policy) or pool"),
    ("pool: network-hsm\nduration: 10m\n", 3, "pool", "'network-hsm' is a shipped policy, not a pool"),
    ("policy: ha-pool\nduration: 10m\n", 3, "policy", "'ha-pool' is a shipped pool, not a policy"),
    ("pool: ../nowhere.yaml\nduration: 10m\n", 3, "pool", "no shipped pool and no pool file"),
    ("policy: network-hsm\nduration: 2d\n", 4, "duration", "'2d' is not a valid duration"),
    ("policy: network-hsm\nduration: 48h\n", 4, "duration", "'48h' is above the hard cap of 24h"),
    ("policy: network-hsm\nduration: 10m\nworkload: {rate: 5000}\n", 5, "workload.rate",
     "5000 is above the hard cap of 1000"),
    ("policy: network-hsm\nduration: 10m\nworkload: {operation: sing}\n", 5, "workload.operation",
     "unknown operation 'sing' (did you mean sign?"),
    ("policy: network-hsm\nduration: 10m\nbogus: 1\n", 5, "bogus", "unknown field (known: version, scenario"),
    ("policy: network-hsm\nduration: 10m\nfaults:\n  - {fault: wrong_pin}\n  - {fault: wrong_pin, member: hsm}\n",
     7, "faults[1].fault", "hsm already has a wrong PIN"),
    ("policy: network-hsm\nduration: 10m\nfaults:\n  - {fault: return, at: 1m, code: CKR_OK, call: sign}\n", 6,
     "faults[0].code", "CKR_OK is no failure"),
    ("policy: network-hsm\nduration: 10m\nfaults: [{fault: down, at: 1m, for: 5s}\n", 6, "(yaml)", ""),
]


@pytest.mark.parametrize(("body", "line", "field", "message"), BROKEN, ids=[b[2] + f"-{i}" for i, b in
                                                                            enumerate(BROKEN)])
def test_a_broken_scenario_names_file_line_and_field(tmp_path: Path, body: str, line: int, field: str,
                                                     message: str) -> None:
    path = write(tmp_path, HEAD + body)
    error = error_of(path)
    assert str(error).startswith(f"{path}:{line}: {field}: {message}"), str(error)
    assert (error.file, error.line, error.field) == (str(path), line, field)


def test_an_inline_policy_keeps_the_scenario_s_lines(tmp_path: Path) -> None:
    good = write(tmp_path, HEAD + "policy:\n  version: 1\n  name: mine\n  extends: network-hsm\n"
                 "  operations: {deadline: 3s}\nduration: 1m\n")
    s = load_scenario(good)
    assert (s.policy.name, s.policy.operations.deadline, s.members) == ("mine", 3.0, ("hsm",))
    bad = write(tmp_path, HEAD + "policy:\n  version: 1\n  name: mine\n  extends: network-hsm\n"
                "  operations:\n    max_reissues: 1000\nduration: 1m\n", "bad.yaml")
    assert str(error_of(bad)) == f"{bad}:8: policy.operations.max_reissues: 1000 is above the hard cap of 10"


def test_referenced_files_resolve_from_the_scenario_and_keep_their_own_errors(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "pol.yaml").write_text("version: 1\nname: pol\nextends: network-hsm\nprobe: {interval: 2s}\n")
    scenario = write(tmp_path / "sub", HEAD + "policy: ../pol.yaml\nduration: 1m\n")
    assert load_scenario(scenario).policy.probe.interval == 2.0
    (tmp_path / "pool.yaml").write_text("pool: p\nmembers:\n  - {name: x, module: /m.so, token_label: t, "
                                        "pin: env:P}\n  - {name: y, module: /m.so, token_label: t, pin: 1234}\n")
    scenario = write(tmp_path / "sub", HEAD + "pool: ../pool.yaml\nduration: 1m\n", "p.yaml")
    error = error_of(scenario)
    assert error.file == str(tmp_path / "sub" / ".." / "pool.yaml") and error.line == 4, str(error)
    assert error.field == "members[1].pin"
    scenario = write(tmp_path, HEAD + "pool: sub\nduration: 1m\n", "d.yaml")
    assert "cannot read" in str(error_of(scenario)) and error_of(scenario).line == 3


@pytest.mark.parametrize("pool", ["ha-pool", "luna-ha"])
def test_the_simulator_builds_the_pool_that_pool_from_spec_builds(pool: str, tmp_path: Path) -> None:
    """The simulator builds its pool itself (for a fixed watchdog order, its own PINs, no audit record):
    it must stay the pool ``Pool.from_spec(spec, clock=, modules=)`` builds from the same file."""
    import dataclasses

    from hsmfsm.runtime.pool import Pool
    from hsmfsm.testing import ScriptedHSM, ScriptedModule, VirtualClock
    from hsmfsm.tools.simulate.run import _World

    scenario = load_scenario(write(tmp_path, HEAD + f"pool: {pool}\nduration: 1m\n"))
    spec = dataclasses.replace(scenario.pool, audit=None)
    with VirtualClock(seed=1) as clock:
        modules = {m.name: ScriptedModule(ScriptedHSM(m.token_label), clock, name=m.name) for m in spec.members}
        reference = Pool.from_spec(spec, clock=clock, modules=modules)
        ours = _World(scenario, clock).pool
        assert ours is not None
        for attr in ("name", "policy", "balance", "recovery_mode", "interval", "max_attempts"):
            assert getattr(ours, attr) == getattr(reference, attr), attr
        pairs = list(zip(ours._members, reference._members, strict=True))
        for a, b in pairs:
            assert a.standby == b.standby
            for attr in ("name", "token_label", "policy", "isolation", "_probe_enabled", "_wait_for_recovery",
                         "_auto_recover"):
                assert getattr(a.conn, attr) == getattr(b.conn, attr), attr


def test_a_pool_file_s_environment_is_neither_needed_nor_touched(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HSMFSM_RUN", raising=False)
    monkeypatch.delenv("HSM_PIN", raising=False)
    before = dict(os.environ)
    s = load_scenario(write(tmp_path, HEAD + "pool: ha-pool\nduration: 5s\nworkload: {rate: 4}\n"))
    outcome = simulate(s)
    assert dict(os.environ) == before
    assert outcome.ok == outcome.calls == 20 and outcome.failures == []
    assert outcome.final_states == {"hsm-a": "logged_in", "hsm-b": "logged_in"}


def test_the_cli_exits_2_with_one_line_for_a_broken_scenario(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "policy: network-hsm\nduration: 10m\nworkload: {threads: 0}\n")
    proc = subprocess.run([sys.executable, "-m", "hsmfsm", "simulate", str(path)], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"{path}:5: workload.threads: 0 is below the minimum of 1\n"
    err = io.StringIO()
    assert main(str(tmp_path / "missing.yaml"), err=err) == 2
    assert err.getvalue().startswith(f"{tmp_path / 'missing.yaml'}:1: (file): no such file")


# --------------------------------------------------------------------------- what the runs show


#: For each shipped scenario, transitions its fault must cause, in this order (other steps may come between).
MUST = {
    "network-blip": [("hsm", "logged_in", "disconnected", "connection_lost", "CKR_DEVICE_ERROR"),
                     ("hsm", "connecting", "disconnected", "connect_failed", "HSMFSM_NO_SUCH_TOKEN"),
                     ("hsm", "connecting", "open", "session_opened", None),
                     ("hsm", "open", "logged_in", "login_ok", "CKR_OK")],
    "hsm-restart": [("hsm-a", "logged_in", "disconnected", "connection_lost", "CKR_DEVICE_ERROR"),
                    ("hsm-a", "connecting", "open", "session_opened", None),
                    ("hsm-a", "open", "logged_in", "login_ok", "CKR_OK")],
    "hung-hsm": [("hsm-b", "logged_in", "disconnected", "call_timeout", "HSMFSM_CALL_TIMEOUT"),
                 ("hsm-b", "connecting", "disconnected", "call_timeout", "HSMFSM_CALL_TIMEOUT"),
                 ("hsm-b", "open", "logged_in", "login_ok", "CKR_OK")],
    "wrong-pin": [("hsm-b", "open", "failed", "fatal", "CKR_PIN_INCORRECT")],
    "all-members-down": [("hsm-a", "logged_in", "disconnected", "connection_lost", "CKR_DEVICE_ERROR"),
                         ("hsm-b", "logged_in", "disconnected", "connection_lost", "CKR_DEVICE_ERROR"),
                         ("hsm-a", "open", "logged_in", "login_ok", "CKR_OK"),
                         ("hsm-b", "open", "logged_in", "login_ok", "CKR_OK")],
    "flapping-member": [("hsm-a", "logged_in", "disconnected", "connection_lost", "CKR_DEVICE_ERROR"),
                        ("hsm-a", "open", "logged_in", "login_ok", "CKR_OK")] * 6,
}


def _in_order(wanted: list[Step], seen: list[Step]) -> bool:
    """Each member's wanted steps appear in that member's steps, in order (members interleave freely)."""
    for member in {step[0] for step in wanted}:
        it = iter([step for step in seen if step[0] == member])
        if not all(step in it for step in wanted if step[0] == member):
            return False
    return True


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_scenario_prints_the_same_twice_and_its_fault_causes_its_transitions(name: str) -> None:
    scenario = load_scenario(name)
    # Up to 90 s after the last fault ends: every transition its fault must cause, and the recovery,
    # lie in that; the whole ten minutes run in the byte-for-byte tests below.
    end = max(max(f.starts()) + (f.duration or 0.0) for f in scenario.faults) + 90.0
    scenario = dataclasses.replace(scenario, duration=min(scenario.duration, end))
    first, second = simulate(scenario), simulate(scenario)
    text, data = as_text(analyse(first)), as_json(analyse(first))
    assert text == as_text(analyse(second)) and data == as_json(analyse(second))
    start = min(f.at for f in scenario.faults)
    after = steps(tr for tr in first.timeline if tr.t >= start)
    assert _in_order(MUST[name], after), "\n".join(map(str, after))
    assert first.internal_errors == [] and first.wrong == 0
    assert json.loads(data)["tally"]["calls"] == first.calls > 0
    if name == "wrong-pin":
        assert first.logins["hsm-b"] == 1 and first.final_states["hsm-b"] == "failed" and not first.failures
    elif name == "all-members-down":
        assert first.failures and {f.error for f in first.failures} == {"AllMembersDown"}
    else:
        assert first.failures == []  # a pool, or the deadline, hides every member failure


def test_the_timeline_shows_the_hung_member_suspected_and_the_stuck_calls_cost_milliseconds() -> None:
    scenario = load_scenario("hung-hsm")
    scenario = dataclasses.replace(scenario, duration=130.0)
    out = simulate(scenario)
    hang = scenario.faults[0].starts()[0]
    suspected = [m for m in out.marks if m.kind == "suspected"]
    assert [(m.member, m.operation) for m in suspected] == [("hsm-b", "sign")]
    limit = scenario.pool.policy.operations.suspicion.floor  # the HSM answers in 0.5 ms: 10 x p99 is below it
    assert suspected[0].limit == pytest.approx(limit) and hang + limit < suspected[0].t <= hang + limit + 0.021
    cut_off = [tr for tr in out.timeline if tr.member == "hsm-b" and tr.event == "call_timeout"][0]
    cleared = [m for m in out.marks if m.kind == "cleared"][0]
    assert cleared.t == cut_off.t and "left service" in cleared.reason  # its probe met the call timeout
    assert out.failures == [] and out.slowest < 0.1  # not the call timeout of 2 s
    text = as_text(analyse(out))
    assert "transitions, 2 suspicion marks):" in text and "hsm-b  (suspected)" in text
    assert "suspected, hsm-b      1 time" in text and "slowest call          0.0" in text
    data = json.loads(as_json(analyse(out)))
    assert [m["kind"] for m in data["suspicions"]] == ["suspected", "cleared"]
    assert data["tally"]["suspected"] == {"hsm-a": 0, "hsm-b": 1}


def test_the_report_reads_recovery_and_tally(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, HEAD + "policy: network-hsm\nduration: 2m\nworkload: {rate: 10}\n"
                            "faults:\n  - {fault: down, at: 30s, for: 5s}\n  - {fault: slow, at: 1m, by: 1ms, "
                            "for: 5s}\n  - {fault: return, at: 80s, code: CKR_ARGUMENTS_BAD, call: sign}\n"))
    report = analyse(simulate(s))
    down, slow, ret = report.recoveries
    assert down.left is not None and 30.0 <= down.left < 30.2 and down.back is not None and 35.0 < down.back < 39.0
    assert down.after_end == pytest.approx(down.back - 35.0)
    assert (slow.left, slow.degraded) == (None, None)  # 1 ms slower is not slow: kept serving
    assert ret.left is None  # a caller-class code: the call fails, the connection stays
    text = as_text(report)
    assert "hsm: down for 5s at 30.000s: not serving 30." in text and "kept serving" in text
    out = report.outcome
    assert [f.error for f in out.failures] == ["OperationFailed"] and out.failures[0].code == "CKR_ARGUMENTS_BAD"
    assert report.not_serving["hsm"] == pytest.approx(down.back - down.left + 0.002, abs=0.001)
    data = json.loads(as_json(report))
    assert data["tally"]["failed_by_class"] == {"OperationFailed": 1}
    assert data["recovery"][0]["serving_again"] == round(down.back, 6)


@pytest.mark.parametrize("operation", ["verify", "decrypt", "generate_random", "generate_keypair"])
def test_every_workload_operation_runs_and_checks_its_results(tmp_path: Path, operation: str) -> None:
    s = load_scenario(write(tmp_path, HEAD + f"policy: network-hsm\nduration: 20s\n"
                            f"workload: {{rate: 10, operation: {operation}, threads: 2}}\n"
                            "faults:\n  - {fault: restart, at: 10s}\n"))
    out = simulate(s)
    assert out.calls == 200 and out.wrong == 0 and out.internal_errors == []
    if operation == "generate_keypair":  # not idempotent: the call that hit the restart is not re-issued
        assert [f.error for f in out.failures] == ["OutcomeUnknown"]
    else:
        assert out.ok == 200


def test_a_return_fault_on_login_and_on_the_probe(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, HEAD + "policy: network-hsm\nduration: 30s\nworkload: {rate: 0}\nfaults:\n"
                            "  - {fault: return, at: 5s, code: CKR_SESSION_HANDLE_INVALID, call: session_state}\n"
                            "  - {fault: return, at: 5s, code: CKR_DEVICE_ERROR, call: login, times: 2}\n"))
    out = simulate(s)
    got = steps(tr for tr in out.timeline if tr.t >= 5.0)
    assert got[0] == ("hsm", "logged_in", "connecting", "session_lost", "CKR_SESSION_HANDLE_INVALID")
    assert ("hsm", "open", "disconnected", "connection_lost", "CKR_DEVICE_ERROR") in got
    assert got[-1] == ("hsm", "open", "logged_in", "login_ok", "CKR_OK") and out.logins["hsm"] == 4


def test_a_fault_that_outlasts_the_run_is_never_undone_and_the_run_still_ends(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, HEAD + "pool: ha-pool\nduration: 1m\nworkload: {rate: 20, threads: 4}\n"
                            "faults:\n  - {fault: hang, member: '*', at: 50s, for: 1h}\n"))
    started = time.monotonic()
    out = simulate(s)
    assert time.monotonic() - started < 5.0
    deadline, timeout = s.policy.operations.deadline, s.policy.operations.call_timeout
    assert 60.0 <= out.ended <= 60.0 + deadline + timeout  # the calls in flight at the end finish, no more
    assert out.failures and {f.error for f in out.failures} == {"AllMembersDown"}
    assert all(state not in ("logged_in", "degraded") for state in out.final_states.values())
    report = analyse(out)
    assert all(rc.back is None for rc in report.recoveries)
    assert "to the end" in as_text(report)


def test_a_scenario_that_would_run_for_hours_is_refused(tmp_path: Path) -> None:
    calls = write(tmp_path, HEAD + "policy: network-hsm\nduration: 24h\nworkload: {rate: 100}\n")
    assert "8640000 calls; the limit is 2000000" in str(error_of(calls))
    faults = write(tmp_path, HEAD + "pool: ha-pool\nduration: 24h\nfaults:\n" + "".join(
        f"  - {{fault: restart, member: '*', at: {i}s, repeat: {{every: 1s, count: 10000}}}}\n" for i in range(6)),
        "f.yaml")
    error = error_of(faults)
    assert error.field == "faults[5]" and "more than 100000 fault occurrences" in str(error)


FOUR_MEMBERS = """pool: four
policy: network-hsm
recovery: {interval: 1s, max_attempts: unlimited}
members:
  - {name: a, module: /x.so, token_label: t, pin: env:P}
  - {name: b, module: /x.so, token_label: t, pin: env:P}
  - {name: c, module: /x.so, token_label: t, pin: env:P}
  - {name: d, module: /x.so, token_label: t, pin: env:P}
"""


def test_the_same_input_prints_the_same_bytes_in_other_processes(tmp_path: Path) -> None:
    """Four members hung at once have their probes cut off in the same watchdog tick: the order in which
    they are cut off and recover must not depend on memory addresses (it did, before the simulator fixed
    the members' order in the watchdog), nor on string hashing."""
    write(tmp_path, FOUR_MEMBERS, "four.yaml")
    scenario = write(tmp_path, HEAD + "pool: four.yaml\nduration: 2m\nworkload: {rate: 8, threads: 4}\nfaults:\n"
                     "  - {fault: hang, member: '*', at: 1m, for: 30s}\n")
    outputs = []
    for seed in ("1", "2"):
        for args in ([str(scenario)], [str(scenario), "--json"], ["hung-hsm"]):
            proc = subprocess.run([sys.executable, "-m", "hsmfsm", "simulate", *args], capture_output=True,
                                  text=True, cwd=REPO, timeout=120, env={**os.environ, "PYTHONHASHSEED": seed})
            assert proc.returncode == 0, proc.stderr
            outputs.append(proc.stdout)
    assert outputs[:3] == outputs[3:]
    assert outputs[0] == as_text(analyse(simulate(load_scenario(scenario))))
    data = json.loads(outputs[1])
    assert sum(1 for t in data["timeline"] if t["event"] == "call_timeout") >= 4


def test_ten_virtual_minutes_take_under_five_real_seconds() -> None:
    """The watchdog ticks every 20 ms (30 000 ticks in ten minutes) and two members probe twice a second,
    besides 20 calls a second on four threads and a hang: all of it in a few real seconds."""
    scenario = load_scenario("hung-hsm")
    assert scenario.duration == 600.0
    started = time.monotonic()
    out = simulate(scenario)
    elapsed = time.monotonic() - started
    assert out.ended >= 600.0 and out.calls > 11_000
    assert elapsed < 5.0, f"{elapsed:.2f} s of real time for ten virtual minutes"


# --------------------------------------------------------------------------- comparing paths

LOST = ("hsm", "logged_in", "disconnected", "connection_lost", "CKR_DEVICE_ERROR")
CONNECT = ("hsm", "disconnected", "connecting", "connect", None)
NO_TOKEN = ("hsm", "connecting", "disconnected", "connect_failed", "HSMFSM_NO_SUCH_TOKEN")
OPENED = ("hsm", "connecting", "open", "session_opened", None)
LOGIN = ("hsm", "open", "logged_in", "login_ok", "CKR_OK")
UP = [CONNECT, OPENED, LOGIN]


def test_normalise_collapses_reconnect_cycles_and_degraded_excursions_only() -> None:
    raced = ("hsm", "connecting", "disconnected", "connect_failed", "CKR_DEVICE_ERROR")
    real = UP + [("hsm", "logged_in", "degraded", "impaired", None), ("hsm", "degraded", "logged_in", "healthy", None),
                 LOST, CONNECT, raced] + [CONNECT, NO_TOKEN] * 7 + UP
    simulated = UP + [LOST] + [CONNECT, NO_TOKEN] * 2 + UP
    assert normalise(real) == normalise(simulated) == UP + [LOST, CONNECT, NO_TOKEN] + UP
    assert first_difference(normalise(real), normalise(simulated)) is None
    # The loss heard again by an attempt that raced it goes only directly after the loss, with its code.
    assert normalise([LOST, CONNECT, NO_TOKEN, CONNECT, raced]) == [LOST, CONNECT, NO_TOKEN, CONNECT, raced]
    # Attempts that failed another way are kept apart, in order.
    timeouts = [CONNECT, ("hsm", "connecting", "disconnected", "call_timeout", "HSMFSM_CALL_TIMEOUT")]
    assert normalise([LOST] + timeouts * 3 + [CONNECT, NO_TOKEN] * 2) == [LOST] + timeouts + [CONNECT, NO_TOKEN]
    # A degraded spell that ends in a loss is a path, not noise.
    spell = [("hsm", "logged_in", "degraded", "impaired", None),
             ("hsm", "degraded", "disconnected", "connection_lost", "CKR_DEVICE_ERROR")]
    assert normalise(UP + spell) == UP + spell
    # Members apart: their interleaving does not count, each one's order does.
    a = [("a", *s[1:]) for s in UP]
    b = [("b", *s[1:]) for s in UP]
    assert normalise([a[0], b[0], a[1], b[1], a[2], b[2]]) == a + b


@pytest.mark.parametrize("mismatch", ["another code", "session_lost instead", "no login", "an extra failure"])
def test_the_comparison_fails_when_the_simulator_took_another_path(mismatch: str) -> None:
    """A deliberate mismatch: the normalisation must not hide a different path."""
    real = UP + [LOST] + [CONNECT, NO_TOKEN] * 4 + UP
    wrong = {
        "another code": UP + [LOST, CONNECT, ("hsm", "connecting", "disconnected", "connect_failed",
                                               "CKR_DEVICE_ERROR")] + UP,
        "session_lost instead": UP + [("hsm", "logged_in", "connecting", "session_lost", "CKR_DEVICE_ERROR"),
                                      OPENED, LOGIN],
        "no login": UP + [LOST, CONNECT, NO_TOKEN, CONNECT, OPENED],
        "an extra failure": UP + [LOST, CONNECT, NO_TOKEN] + UP + [LOST, CONNECT] + [OPENED, LOGIN],
    }[mismatch]
    assert normalise(real) != normalise(wrong)
    assert first_difference(normalise(real), normalise(wrong)) is not None


FIDELITY = """version: 1
scenario: fidelity
description: The network HSM dies for 2 s and comes back; the connection signs throughout.
policy:
  version: 1
  name: fidelity
  extends: network-hsm
  connect: {backoff: {initial: 50ms, max: 400ms}}
duration: 4.5s
workload: {rate: 20, operation: sign, threads: 1}
faults:
  - {fault: down, at: 1s, for: 2s}
"""


def _on_the_lab(scenario, hsm: NetworkHSM, module: str, pin: str) -> tuple[list, list[HSMError]]:
    """The scenario on a real network HSM in real time: the same policy, workload and fault times; a down
    fault is the server killed (every process of it) and started again. Returns the transition records
    (without the final close) and the failed calls."""
    name = scenario.members[0]
    conn = SlotConnection(module, hsm.token.label, lambda: pin, scenario.policy, name=name, env=hsm.client_env)
    records: list = []
    failures: list[HSMError] = []
    conn.add_listener(records.append)
    stop = threading.Event()
    period = scenario.workload.threads / scenario.workload.rate
    digest = hashlib.sha256(b"hsmfsm simulate").digest()

    def work() -> None:
        while not stop.is_set():
            try:
                conn.sign("ec", digest, mechanism="ECDSA")
            except HSMError as exc:
                failures.append(exc)
            stop.wait(period)

    conn.open()
    t0 = time.monotonic()
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        for action in schedule(scenario):
            time.sleep(max(0.0, t0 + action.at - time.monotonic()))
            assert action.occurrence.fault.kind == "down", "this driver plays down faults only"
            if action.step == START:
                hsm.kill()
            else:
                hsm.start()
        time.sleep(max(0.0, t0 + scenario.duration - time.monotonic()))
    finally:
        stop.set()
        worker.join(30)
        seen = list(records)
        conn.close()
    return seen, failures


def test_the_simulator_takes_the_path_a_real_network_hsm_takes(network_hsm: NetworkHSM, client_module: str,
                                                                tmp_path: Path) -> None:
    """One scenario (a down fault of 2 s, signing throughout) on the real lab (SoftHSM behind ``p11-kit
    server``, killed and started again) and in the simulator; their paths must be the same.

    Compared: the sequences of ``(member, from, to, event, code)`` of every transition record, the final
    close left out, after ``hsmfsm.tools.simulate.compare.normalise``, which

    1. keeps each member's steps apart, because how members interleave is timing (one member here);
    2. collapses consecutive failed reconnect attempts (``disconnected -> connecting`` on connect, then
       ``connecting -> disconnected`` on connect_failed or call_timeout) with the same event and code
       into one, because how many attempts fit into the outage is real time and the back-off's jitter;
    3. drops a failed attempt directly after the loss that fails with the loss's own code: the first
       reconnect can race the dying server (its listener and per-client processes die one after the
       other) and hear CKR_DEVICE_ERROR from C_Initialize again (seen in some runs here, not most),
       where later attempts find no server (HSMFSM_NO_SUCH_TOKEN); the scripted HSM dies at once;
    4. drops degraded excursions (``logged_in -> degraded`` on impaired directly followed by
       ``degraded -> logged_in`` on healthy), because one slow call on a loaded machine is timing noise.

    Nothing else is dropped: another event or code, a missing or extra step (a session_lost for the
    connection_lost, no login, a failed), or an attempt that failed another way still fails the test
    (test_the_comparison_fails_when_the_simulator_took_another_path proves it on deliberate mismatches).
    Also compared: neither run failed a call (the deadline covers the outage).
    """
    scenario = load_scenario(write(tmp_path, FIDELITY))
    network_hsm.start()
    real, real_failures = _on_the_lab(scenario, network_hsm, client_module, network_hsm.token.pin)
    simulated = simulate(scenario)
    a, b = normalise(steps(real)), normalise(steps(simulated.timeline))
    assert first_difference(a, b) is None, f"{first_difference(a, b)}\nreal: {a}\nsimulated: {b}"
    assert (real_failures, simulated.failures) == ([], [])
    assert a == UP + [LOST, CONNECT, NO_TOKEN] + UP
