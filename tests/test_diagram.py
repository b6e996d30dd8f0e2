"""Diagrams come from the transition table and the policy, deterministically, and diagrams/ is in sync."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hsmfsm import diagram, load_policy
from hsmfsm.policy_loader import shipped_policies
from hsmfsm.states import TRANSITIONS

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


def test_svg_and_png_are_real_files(tmp_path):
    policy = load_policy("network-hsm")
    svg = diagram.write(policy, tmp_path / "m.svg").read_bytes()
    png = diagram.write(policy, tmp_path / "m.png").read_bytes()
    assert svg.lstrip().startswith(b"<?xml") and b"<svg" in svg
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_committed_diagrams_match_the_code():
    names = shipped_policies()
    assert names
    for name in names:
        committed = ROOT / "diagrams" / f"{name}.dot"
        assert committed.exists(), f"{committed} missing: run make diagrams"
        assert committed.read_text() == diagram.to_dot(load_policy(name)), f"{committed} is stale: run make diagrams"
