"""Diagrams come from the transition table and the policy, deterministically, and diagrams/ is in sync."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hsmfsm import load_policy
from hsmfsm.audit import diagram
from hsmfsm.config.policy_file import shipped_policies
from hsmfsm.core.states import TRANSITIONS

ROOT = Path(__file__).resolve().parent.parent


def test_every_transition_is_an_edge_and_output_is_deterministic():
    policy = load_policy("default")
    dot = diagram.to_dot(policy)
    assert dot == diagram.to_dot(load_policy("default"))
    edges = [line for line in dot.splitlines() if "->" in line]
    assert len(edges) == len(TRANSITIONS)
    assert "CKR_DEVICE_ERROR" in dot and "CKR_PIN_INCORRECT" in dot


def test_changing_one_code_changes_its_edge():
    policy = load_policy("default")
    moved = dataclasses.replace(policy, codes={**policy.codes, "CKR_DEVICE_REMOVED": "session"})
    before = set(diagram.to_dot(policy).splitlines())
    after = set(diagram.to_dot(moved).splitlines())
    gone, new = before - after, after - before
    assert gone and new
    # Only the edges of the two events involved change: the code leaves one and joins the other.
    def has(line: str, event: str) -> bool:
        return f'label="{event}' in line and "CKR_DEVICE_REMOVED" in line

    def lacks(line: str, event: str) -> bool:
        return f'label="{event}' in line and "CKR_DEVICE_REMOVED" not in line

    assert all(has(line, "connection_lost") or lacks(line, "session_lost") for line in gone), gone
    assert all(lacks(line, "connection_lost") or has(line, "session_lost") for line in new), new
    n_edges = sum(1 for (s, e) in TRANSITIONS if e.value in ("connection_lost", "session_lost"))
    assert len(gone) == len(new) == n_edges


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
    from hsmfsm.config.pool_file import load_pool

    spec = load_pool("luna-ha", environment=False)
    dot = diagram.pool_to_dot(spec)
    for m in spec.members:
        assert f"member {m.name} ({'standby' if m.standby else 'active'})" in dot
        edges = [line for line in dot.splitlines() if f'"{m.name}/' in line.split("->")[0] and "->" in line]
        assert len(edges) == len(TRANSITIONS), m.name  # the member's whole slot machine
    assert f"balance {spec.balance}" in dot and f"recovery {spec.recovery.mode}" in dot
    assert f"every {spec.recovery.interval:g}s" in dot


def test_live_diagram_highlights_each_members_state():
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
