"""The pure half of suspicion and sessions: latency windows, the limit, the rule-book's decisions,
and the policy fields that set them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hsmfsm import load_policy
from hsmfsm.core import rules
from hsmfsm.core.codes import CALL_TIMEOUT, SUSPECTED, code_from_name
from hsmfsm.core.errors import CallTimeout, MemberUnavailable, OutcomeUnknown
from hsmfsm.core.latency import MIN_SAMPLES, RECOMPUTE_AFTER, LatencyWindow, percentile, suspicion_limit
from hsmfsm.core.policy import PolicyError, SuspicionPolicy
from hypothesis import given
from hypothesis import strategies as st

SUSPICION = SuspicionPolicy(multiple=10.0, floor=0.05, ceiling=0.2, window=64)
DEVICE_ERROR = code_from_name("CKR_DEVICE_ERROR")


# --------------------------------------------------------------------------- the limit


def test_percentile_is_the_nearest_rank() -> None:
    samples = [float(i) for i in range(1, 101)]  # 1 .. 100
    assert percentile(samples, 0.99) == 99.0
    assert percentile(samples, 0.5) == 50.0
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([5.0, 1.0, 3.0], 1.0) == 5.0
    with pytest.raises(ValueError):
        percentile([], 0.99)


@pytest.mark.parametrize(("p99", "limit"), [
    (None, 0.2),      # too few answers: the ceiling
    (0.001, 0.05),    # 10 x 1 ms is below the floor
    (0.008, 0.08),    # 10 x p99
    (0.05, 0.2),      # 10 x 50 ms is above the ceiling
])
def test_the_limit_is_the_multiple_of_p99_between_floor_and_ceiling(p99: float | None, limit: float) -> None:
    assert suspicion_limit(SUSPICION, p99) == pytest.approx(limit)


@given(st.lists(st.floats(min_value=0.0, max_value=10.0), max_size=300))
def test_the_limit_never_leaves_floor_and_ceiling(samples: list[float]) -> None:
    window = LatencyWindow(SUSPICION)
    window.samples.extend(samples)
    assert SUSPICION.floor <= window.limit(0.0) <= SUSPICION.ceiling


def test_a_window_keeps_the_last_answers_and_trusts_its_p99_only_with_enough_of_them() -> None:
    window = LatencyWindow(SUSPICION)
    window.samples.extend([0.002] * (MIN_SAMPLES - 1))
    assert window.p99() is None and window.limit(0.0) == SUSPICION.ceiling
    window.samples.append(0.002)
    assert window.p99() == 0.002
    # The limit is cached: the same answer until RECOMPUTE_AFTER has passed.
    assert window.limit(RECOMPUTE_AFTER / 2) == SUSPICION.ceiling
    assert window.limit(RECOMPUTE_AFTER) == SUSPICION.floor
    # Only the last `window` answers count: slow ones from long ago are forgotten.
    window.samples.extend([0.1] * SUSPICION.window)
    window.samples.extend([0.004] * SUSPICION.window)
    assert list(window.samples) == [0.004] * SUSPICION.window
    assert window.limit(1.0) == pytest.approx(0.05)
    window.samples.extend([0.015] * SUSPICION.window)
    assert window.recent_p99(2.0) == 0.015 and window.limit(2.0) == pytest.approx(0.15)


# --------------------------------------------------------------------------- the rule-book


def policy():
    p = load_policy("network-hsm")
    return dataclasses.replace(p, operations=dataclasses.replace(p.operations, suspicion=SUSPICION))


def test_an_idempotent_call_past_its_limit_suspects_its_member_when_another_answers_sooner() -> None:
    p = policy()
    d = rules.decide_suspicion(p, operation="sign", elapsed=0.21, limit=0.2, alternatives=[0.002])
    assert d.suspect and "past the member's limit of 0.200s" in d.reason
    assert rules.decide_suspicion(p, operation="sign", elapsed=0.21, limit=0.2, alternatives=[None]).suspect


@pytest.mark.parametrize(("operation", "elapsed", "alternatives", "why"), [
    ("sign", 0.19, [0.002], "within its limit"),
    ("sign", 0.21, [], "no other member serves"),
    ("sign", 0.21, [0.3], "no other member serves that answers sooner"),  # as slow elsewhere: leave it
    ("generate_keypair", 5.0, [0.002], "not idempotent"),
])
def test_no_suspicion(operation: str, elapsed: float, alternatives: list, why: str) -> None:
    d = rules.decide_suspicion(policy(), operation=operation, elapsed=elapsed, limit=0.2, alternatives=alternatives)
    assert not d.suspect and why in d.reason


def test_only_idempotent_calls_are_ever_cut_on_suspicion() -> None:
    p = policy()
    assert rules.may_cut_on_suspicion(p, "sign") and rules.may_cut_on_suspicion(p, "decrypt")
    assert not rules.may_cut_on_suspicion(p, "generate_keypair")


def test_a_call_cut_on_suspicion_fires_nothing_and_goes_to_another_member() -> None:
    p = policy()
    d = rules.decide_call(p, DEVICE_ERROR, operation="sign", timed_out=False, in_pool=True, abandoned=True)
    assert (d.event, d.count, d.code, d.error, d.reissue) == (None, None, SUSPECTED, MemberUnavailable, True)
    assert rules.pool_may_reissue(MemberUnavailable("hsm-a", "x", reissue=True, may_have_acted=True), True)
    # A key generation is never cut; were one, its outcome would be unknown and it would not go again.
    d = rules.decide_call(p, DEVICE_ERROR, operation="generate_keypair", timed_out=False, in_pool=True,
                          abandoned=True)
    assert d.error is OutcomeUnknown and not d.reissue
    # The watchdog's call timeout wins over a cut it raced with: the member's loss is recorded.
    d = rules.decide_call(p, DEVICE_ERROR, operation="sign", timed_out=True, in_pool=True, abandoned=True)
    assert (d.event, d.error) == (rules.Event.CALL_TIMEOUT, CallTimeout) and d.code == DEVICE_ERROR
    assert CALL_TIMEOUT.name != SUSPECTED.name


# --------------------------------------------------------------------------- the policy fields


def test_shipped_defaults() -> None:
    base, net = load_policy("default"), load_policy("network-hsm")
    assert base.operations.suspicion == SuspicionPolicy(10.0, 0.05, 1.0, 256)
    assert net.operations.suspicion == SuspicionPolicy(10.0, 0.05, 0.2, 256)
    assert base.sessions.max == net.sessions.max == 8


MINIMAL = """\
version: 1
name: t
classes:
  transport: {event: connection_lost, reissue: true, may_have_acted: true}
codes:
  CKR_DEVICE_ERROR: transport
default_class: transport
"""


def _error(tmp_path: Path, text: str) -> PolicyError:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return info.value


def test_the_fields_load(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(MINIMAL + "operations:\n  call_timeout: 1s\n  suspicion: {multiple: 4, floor: 10ms, "
                              "ceiling: 300ms, window: 100}\nsessions: {max: 3}\n")
    p = load_policy(path)
    assert p.operations.suspicion == SuspicionPolicy(4.0, 0.01, 0.3, 100) and p.sessions.max == 3


@pytest.mark.parametrize(("text", "fragment"), [
    ("operations:\n  suspicion: {floor: 300ms, ceiling: 200ms}\n",
     "operations.suspicion.floor: 300ms is longer than operations.suspicion.ceiling (200ms)"),
    ("operations:\n  call_timeout: 100ms\n  deadline: 1s\n  suspicion: {ceiling: 200ms}\n",
     "operations.suspicion.ceiling: 200ms is longer than operations.call_timeout (100ms)"),
    ("operations:\n  suspicion: {window: 8}\n", "operations.suspicion.window: 8 is below the minimum of 32"),
    ("operations:\n  suspicion: {multiple: 1}\n", "operations.suspicion.multiple: 1 is below the minimum of 1.5"),
    ("operations:\n  suspicion: {celing: 1s}\n", "operations.suspicion.celing: unknown field"),
    ("sessions: {max: 0}\n", "sessions.max: 0 is below the minimum of 1"),
    ("sessions: {max: 5000}\n", "sessions.max: 5000 is above the hard cap of 1024"),
])
def test_broken_fields_are_named(tmp_path: Path, text: str, fragment: str) -> None:
    assert fragment in str(_error(tmp_path, MINIMAL + text))
