"""Diagrams are the rule-book's edges under a policy, deterministically, and diagrams/ is in sync.

"Every edge the code can take appears, labelled with its phase and codes under that policy;
nothing the code cannot do is drawn": the DOT text is parsed back into edges and compared
with :func:`hsmfsm.core.rules.edges`, and every reaction of :func:`reaction_table` that
fires an event is looked for in it.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
from hsmfsm import load_policy
from hsmfsm.audit import diagram
from hsmfsm.config.policy_file import shipped_policies
from hsmfsm.core import rules
from hsmfsm.core.policy import Policy
from hsmfsm.core.rules import PHASE_STATES, STEPS, Phase, Reaction, edges, reaction, reaction_table
from hsmfsm.core.states import TRANSITIONS, Event, State

ROOT = Path(__file__).resolve().parent.parent

_EDGE = re.compile(r'^\s*("[^"]+"|\S+) -> ("[^"]+"|\S+) \[(.*)\]$')
_LABEL = re.compile(r'label=("(?:[^"\\]|\\.)*"|[^ \]]+)')

def drawn(dot: str, policy: Policy, member: str | None = None) -> list[tuple]:
    """Every state-machine edge of the DOT text (of one pool member, if given), read from its label:
    (source, event, dest, phase or None, the classes it lists)."""
    out = []
    for line in dot.splitlines():
        m = _EDGE.match(line)
        if m is None:
            continue
        src, dst = (name.strip('"') for name in m.group(1, 2))
        if member is not None:
            if not src.startswith(f"{member}/"):
                continue
            src, dst = src.split("/", 1)[1], dst.split("/", 1)[1]
        elif "/" in src or src == "application":
            continue
        label = _LABEL.search(m.group(3))
        assert label is not None, line
        lines = [text for text in label.group(1).strip('"').split("\\l") if text]
        title = re.fullmatch(r"(\w+)(?: \((\w+)\))?", lines[0])
        assert title is not None, lines[0]
        classes = frozenset(name for name in policy.classes for text in lines[1:] if text.startswith(f"{name}: "))
        out.append((src, title.group(1), dst, title.group(2), classes))
    return out


def expected(policy: Policy, probe: bool = True) -> list[tuple]:
    return [(e.source.value, e.event.value, e.dest.value, e.phase.value if e.phase else None, frozenset(e.classes))
            for e in edges(policy, probe=probe)]


def labels(dot: str) -> dict[tuple[str, str, str, str | None], str]:
    """(source, event, dest, phase) -> the label text, for the policy diagram's edges."""
    out = {}
    for line in dot.splitlines():
        m = _EDGE.match(line)
        if m and "/" not in line.split("->")[0]:
            label = _LABEL.search(m.group(3))
            assert label is not None
            text = label.group(1).strip('"')
            title = re.fullmatch(r"(\w+)(?: \((\w+)\))?", text.split("\\l")[0])
            assert title is not None
            out[(m.group(1), title.group(1), m.group(2), title.group(2))] = text
    return out


def _can_fire(policy: Policy, phase: Phase, event: Event) -> bool:
    """The counts that make a reaction's event impossible under a policy (rules.edges says why)."""
    if event is Event.GIVE_UP:
        return policy.connect.max_attempts is not None
    if event is Event.CONNECT_FAILED:
        return policy.connect.max_attempts != 1
    if phase is Phase.PROBE and event is Event.IMPAIRED:
        return policy.probe.unhealthy_after >= 2
    return True


def with_reaction(policy: Policy, phase: str, name: str, react: str) -> Policy:
    return dataclasses.replace(policy, reactions={**policy.reactions, phase: {**policy.reactions.get(phase, {}),
                                                                              name: react}})


# --------------------------------------------------------------------------- edges()


def test_edges_are_unique_deterministic_and_in_the_table():
    for name in shipped_policies():
        policy = load_policy(name)
        found = list(edges(policy))
        assert found == list(edges(load_policy(name)))
        keys = [(e.source, e.event, e.dest, e.phase) for e in found]
        assert len(keys) == len(set(keys)), name
        for e in found:
            assert TRANSITIONS[(e.source, e.event)] is e.dest
            if e.phase is None:
                assert (e.source, e.event) in STEPS and e.classes == ()
            else:
                assert e.source in PHASE_STATES[e.phase] and e.classes == tuple(sorted(set(e.classes)))
                for klass in e.classes:  # each class's reaction in that phase fires that event
                    row = next(r for r in reaction_table(policy) if r.phase is e.phase and r.code_class == klass)
                    assert e.event in row.events, (e, row)


def test_every_step_once_and_no_impossible_edge():
    policy = load_policy("default")
    found = list(edges(policy))
    steps = [(e.source, e.event) for e in found if e.phase is None]
    assert steps == list(STEPS)
    assert {e for _, e in steps} == {Event.CONNECT, Event.SESSION_OPENED, Event.LOGIN_OK, Event.FATAL,
                                     Event.CALL_TIMEOUT, Event.IMPAIRED, Event.HEALTHY, Event.CLOSE, Event.RESET,
                                     Event.FORKED}
    assert {s for s, e in steps if e is Event.CALL_TIMEOUT} == {State.CONNECTING, State.OPEN, State.LOGGED_IN,
                                                                 State.DEGRADED}  # the watchdog, any live state
    # The health tracker reports impaired once, on crossing the count: never degraded -> degraded.
    assert not [e for e in found if e.event is Event.IMPAIRED and e.source is State.DEGRADED]
    assert policy.connect.max_attempts is None and not [e for e in found if e.event is Event.GIVE_UP]
    # Counted events are drawn once, on the phase that counts their codes, not again as steps.
    assert [(e.source, e.phase) for e in found if e.event is Event.CONNECTION_LOST and e.phase is Phase.PROBE] == \
        [(State.OPEN, Phase.PROBE), (State.LOGGED_IN, Phase.PROBE), (State.DEGRADED, Phase.PROBE)]
    assert {(e.event, e.phase) for e in found if e.phase is Phase.CONNECT} == \
        {(Event.CONNECT_FAILED, Phase.CONNECT), (Event.FATAL, Phase.CONNECT)}
    # Each phase starts only where its answer can arrive: a call or probe of a serving connection
    # may answer after another thread's login_lost moved it to open (the generation is kept).
    assert {e.source for e in found if e.phase is Phase.LOGIN} == {State.OPEN}
    assert {e.source for e in found if e.phase in (Phase.CALL, Phase.PROBE)} == \
        {State.OPEN, State.LOGGED_IN, State.DEGRADED}


def test_counts_decide_which_counted_edges_exist():
    policy = load_policy("default")

    def events(p: Policy, probe: bool = True) -> set[tuple[str, str | None]]:
        return {(e.event.value, e.phase.value if e.phase else None) for e in edges(p, probe=probe)}

    limited = dataclasses.replace(policy, connect=dataclasses.replace(policy.connect, max_attempts=6))
    assert {("give_up", "connect"), ("connect_failed", "connect")} <= events(limited)
    once = dataclasses.replace(policy, connect=dataclasses.replace(policy.connect, max_attempts=1))
    assert ("give_up", "connect") in events(once) and ("connect_failed", "connect") not in events(once)
    blunt = dataclasses.replace(policy, probe=dataclasses.replace(policy.probe, unhealthy_after=1))
    assert ("impaired", "probe") not in events(blunt) and ("connection_lost", "probe") in events(blunt)
    unprobed = events(policy, probe=False)
    assert not [p for _, p in unprobed if p == "probe"] and ("impaired", "call") in unprobed
    # A class no code belongs to can fire nothing (the default class always can).
    empty = dataclasses.replace(policy, codes={c: k for c, k in policy.codes.items() if k != "capacity"})
    assert not [e for e in edges(empty) if "capacity" in e.classes]
    assert [e for e in edges(empty) if "unknown" in e.classes]


# --------------------------------------------------------------------------- the policy diagram


def test_every_drawn_edge_is_an_edge_of_the_rule_book_and_output_is_deterministic():
    for name in shipped_policies():
        policy = load_policy(name)
        dot = diagram.to_dot(policy)
        assert dot == diagram.to_dot(load_policy(name))
        found = drawn(dot, policy)
        assert len(found) == len(set(found)) == len(list(edges(policy)))  # once each
        assert set(found) == set(expected(policy)), name  # (b): nothing drawn that edges() does not yield
        assert "CKR_DEVICE_ERROR" in dot and "CKR_PIN_INCORRECT" in dot and "legend" in dot


@pytest.mark.parametrize("name", shipped_policies())
def test_every_reaction_that_fires_appears_with_its_phase_and_codes(name):
    policy = load_policy(name)
    dot = diagram.to_dot(policy)
    found = drawn(dot, policy)
    text = labels(dot)
    for row in reaction_table(policy):
        if not row.codes and not row.default:
            continue
        drawn_for_row = 0
        for event in row.events:
            if not _can_fire(policy, row.phase, event):
                continue
            for source in PHASE_STATES[row.phase]:
                dest = TRANSITIONS.get((source, event))
                if dest is None or (event is Event.IMPAIRED and dest is source):
                    continue
                match = [f for f in found if f[:4] == (source.value, event.value, dest.value, row.phase.value)]
                assert len(match) == 1 and row.code_class in match[0][4], (row, source, match)
                label = text[(source.value, event.value, dest.value, row.phase.value)]
                assert label.startswith(f"{event.value} ({row.phase.value})")
                for code in row.codes:
                    assert code in label, (row, code)
                if row.default:
                    assert "every other code" in label
                drawn_for_row += 1
        assert drawn_for_row or not row.events, row  # every reaction that fires an event is somewhere


def test_labels_read_phase_classes_codes_counts_and_settings():
    policy = load_policy("default")
    text = labels(diagram.to_dot(policy))
    lost = text[("logged_in", "connection_lost", "disconnected", "call")].split("\\l")
    assert lost[0] == "connection_lost (call)"
    assert lost[1].startswith("transport: CKR_CRYPTOKI_NOT_INITIALIZED, CKR_DEVICE_ERROR,")
    assert lost[-2:] == ["unknown: every other code", ""]
    probe = text[("logged_in", "connection_lost", "disconnected", "probe")]
    assert "after 2 failed probes in a row with\\lcaller: CKR_ARGUMENTS_BAD" in probe
    assert "after 3 slow (> 1s) or impaired calls or failed probes in a row" in \
        text[("logged_in", "impaired", "degraded", "call")]
    failed = text[("connecting", "connect_failed", "disconnected", "connect")]
    assert failed.endswith("backoff 0.05s x2 max 5s jitter 0.2; attempts unlimited: never gives up\\l")
    assert text[("open", "call_timeout", "disconnected", None)] == "call_timeout\\lcall > 5s (watchdog)\\l"
    assert text[("degraded", "healthy", "logged_in", None)] == \
        "healthy\\lafter 5 healthy calls or 2 healthy probes in a row\\l"
    assert text[("open", "fatal", "failed", None)] == "fatal\\lthe PIN cannot be read from its source\\l"
    assert text[("disconnected", "connect", "connecting", None)] == "connect"


@pytest.mark.parametrize(("phase", "name", "react"), [
    ("login", "transport", "session_lost"),  # connection_lost -> session_lost
    ("call", "capacity", "none"),  # an impaired class the caller's own mistake: impaired (call) goes
    ("probe", "caller", "connection_lost"),  # counted -> at once: same edge, other label
    ("connect", "session", "fatal"),
    ("probe", "session", "probe_failed"),
])
def test_changing_one_reaction_changes_exactly_its_edges(phase, name, react):
    policy = load_policy("default")
    moved = with_reaction(policy, phase, name, react)
    assert reaction(policy, Phase(phase), name) is not Reaction(react)
    assert reaction(moved, Phase(phase), name) is Reaction(react)
    before = {line for line in diagram.to_dot(policy).splitlines() if "->" in line}
    after = {line for line in diagram.to_dot(moved).splitlines() if "->" in line}
    gone, new = before - after, after - before
    assert gone or new
    changed = drawn("\n".join(gone), policy) + drawn("\n".join(new), moved)
    assert all(p == phase for _, _, _, p, _ in changed), changed
    # The edges that changed are exactly those of (phase, class) before and after; the other
    # classes on them are the same.
    theirs = {(e.source.value, e.event.value, e.dest.value, phase)
              for p in (policy, moved) for e in edges(p) if e.phase is Phase(phase) and name in e.classes}
    assert {c[:4] for c in changed} == theirs

    def others(found):
        return {(*f[:4], f[4] - {name}) for f in found if f[4] - {name}}

    assert others(drawn("\n".join(gone), policy)) == others(drawn("\n".join(new), moved))
    assert set(drawn("\n".join(after), moved)) == set(expected(moved))


def test_changing_one_code_moves_it_between_edges_of_every_phase():
    policy = load_policy("default")
    moved = dataclasses.replace(policy, codes={**policy.codes, "CKR_DEVICE_REMOVED": "session"})
    before, after = labels(diagram.to_dot(policy)), labels(diagram.to_dot(moved))
    assert before.keys() == after.keys()
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {k for k in before if "transport:" in before[k] or "session:" in before[k]}
    for key in changed:
        assert ("CKR_DEVICE_REMOVED" in after[key]) == ("session:" in after[key])


# --------------------------------------------------------------------------- pools, files, the command


def all_shipped():
    from hsmfsm.config.pool_file import load_pool, shipped_pools

    return [(n, diagram.to_dot(load_policy(n))) for n in shipped_policies()] + \
        [(n, diagram.pool_to_dot(load_pool(n, environment=False))) for n in shipped_pools()]


def test_every_shipped_policy_and_pool_draws_as_real_dot_svg_and_png(tmp_path):
    from hsmfsm.tools import cli

    names = [n for n, _ in all_shipped()]
    assert {"default", "network-hsm", "ha-pool", "luna-ha"} <= set(names)
    for name in names:
        for ext in ("dot", "svg", "png"):
            assert cli.main(["diagram", name, "-o", str(tmp_path / f"{name}.{ext}")]) == 0
        dot = (tmp_path / f"{name}.dot").read_text()
        assert dot.startswith("digraph ") and "->" in dot and "CKR_DEVICE_ERROR" in dot and "legend" in dot
        svg = (tmp_path / f"{name}.svg").read_bytes()
        assert svg.lstrip().startswith(b"<?xml") and b"<svg" in svg and b"CKR_PIN_INCORRECT" in svg
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(dot == again for (_, dot), (_, again) in zip(all_shipped(), all_shipped()))


def test_committed_diagrams_match_the_code():
    for name, dot in all_shipped():
        committed = ROOT / "diagrams" / f"{name}.dot"
        assert committed.exists(), f"{committed} missing: run make diagrams"
        assert committed.read_text() == dot, f"{committed} is stale: run make diagrams"
        assert (ROOT / "diagrams" / f"{name}.svg").exists(), f"{name}.svg missing: run make diagrams"


def test_a_pool_diagram_shows_members_roles_balance_recovery_and_each_machine():
    from hsmfsm.config.pool_file import load_pool, shipped_pools

    for pool in shipped_pools():
        spec = load_pool(pool, environment=False)
        dot = diagram.pool_to_dot(spec)
        policy, probe = diagram.member_policy(spec), diagram.member_probes(spec)
        for m in spec.members:
            assert f"member {m.name} ({'standby' if m.standby else 'active'})" in dot
            # The member's whole machine under the policy it runs: the same edges as a policy diagram.
            found = [f[:4] for f in drawn(dot, policy, member=m.name)]
            assert len(found) == len(set(found))
            assert set(found) == {e[:4] for e in expected(policy, probe)}, m.name
        assert f"balance {spec.balance}" in dot and f"recovery {spec.recovery.mode}" in dot
        assert f"every {spec.recovery.interval:g}s" in dot
        assert ("(probe)" in dot) == (spec.recovery.mode == "background")  # in-call members do not probe


def test_member_policy_is_the_pools():
    from hsmfsm.config.pool_file import load_pool, shipped_pools
    from hsmfsm.runtime.pool import Pool

    for pool in shipped_pools():
        spec = load_pool(pool, environment=False)
        for mode in ("background", "in_call"):
            for cap in (None, 3):
                spec2 = dataclasses.replace(spec, recovery=dataclasses.replace(spec.recovery, mode=mode,
                                                                              max_attempts=cap))
                r = spec2.recovery
                assert diagram.member_policy(spec2) == Pool.member_policy(spec2.policy, r.mode, r.interval,
                                                                          r.max_attempts)


def test_live_diagram_highlights_each_members_state():
    from types import SimpleNamespace

    from hsmfsm.config.pool_file import load_pool
    from hsmfsm.runtime.pool import MemberStatus

    spec = load_pool("ha-pool", environment=False)
    status = [MemberStatus("hsm-a", "active", "logged_in", None, None, 0, 6, None, 0),
              MemberStatus("hsm-b", "active", "disconnected", "CKR_DEVICE_ERROR", 0x30, 2, 6, 3.0, 0)]
    plain, live = diagram.pool_to_dot(spec), diagram.pool_to_dot(spec, status)
    highlighted = [line.split()[0] for line in live.splitlines() if "fillcolor=gold" in line]
    assert highlighted == ['"hsm-a/logged_in"', '"hsm-b/disconnected"']
    assert "now: disconnected, last code CKR_DEVICE_ERROR, recovery 2/6" in live
    assert "gold" not in plain
    # Plain values do as well as the runtime's rows: audit needs only the fields.
    rows = [SimpleNamespace(name=s.name, state=s.state, last_code=s.last_code, recovery_attempts=s.recovery_attempts,
                            max_attempts=s.max_attempts) for s in status]
    assert diagram.pool_to_dot(spec, rows) == live


def test_audit_diagram_imports_neither_runtime_nor_tools():
    tree = ast.parse((ROOT / "hsmfsm" / "audit" / "diagram.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names] + \
        ["." * n.level + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert "..core.rules" in imported
    assert not [m for m in imported if re.match(r"(\.\.|hsmfsm\.)(runtime|tools|p11|testing)\b", m)], imported
    assert rules.edges is diagram.edges  # drawn from the rule-book itself


def test_without_dot_a_clear_error_and_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(diagram.shutil, "which", lambda name: None)
    with pytest.raises(diagram.DiagramError, match="apt-get install graphviz"):
        diagram.write(load_policy("default"), tmp_path / "m.svg")
    assert not (tmp_path / "m.svg").exists()
    assert diagram.write(load_policy("default"), tmp_path / "m.dot").read_text().startswith("digraph")
    with pytest.raises(diagram.DiagramError, match="unknown diagram format"):
        diagram.write(load_policy("default"), tmp_path / "m.jpg")


def test_live_command_connects_and_highlights_a_killed_member(client_module, hsms, token, tmp_path):
    import os
    import subprocess
    import sys

    a, b = hsms
    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text(f"""\
pool: signer
policy: {{extends: network-hsm, name: live, operations: {{deadline: 2s, call_timeout: 1s}}}}
members:
  - {{name: hsm-a, module: {client_module}, env: {{P11_KIT_SERVER_ADDRESS: "{a.address}"}},
      token_label: {token.label}, pin: env:LIVE_PIN}}
  - {{name: hsm-b, module: {client_module}, env: {{P11_KIT_SERVER_ADDRESS: "{b.address}"}},
      token_label: {token.label}, pin: env:LIVE_PIN}}
""")
    a.kill()
    out = tmp_path / "live.dot"
    proc = subprocess.run([sys.executable, "-m", "hsmfsm", "diagram", "--live", str(pool_file), "-o", str(out)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "LIVE_PIN": token.pin})
    assert proc.returncode == 0, proc.stderr
    highlighted = [line.split()[0] for line in out.read_text().splitlines() if "fillcolor=gold" in line]
    assert highlighted == ['"hsm-a/disconnected"', '"hsm-b/logged_in"'], highlighted
