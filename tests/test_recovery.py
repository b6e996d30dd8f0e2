"""Unit tests for the pure recovery arithmetic in :mod:`hsmfsm.core.recovery`."""

from __future__ import annotations

import itertools

import pytest
from hsmfsm.core.policy import Backoff, ConnectPolicy, DegradedPolicy, ProbePolicy
from hsmfsm.core.recovery import HealthTracker, ReconnectSchedule, Verdict, backoff_delay
from hypothesis import given, settings
from hypothesis import strategies as st

BACKOFF = Backoff(initial=0.1, multiplier=2.0, max=5.0, jitter=0.2)
NEAR_ONE = 1.0 - 2**-53  # the largest float random.random() can return

# --------------------------------------------------------------------------- backoff_delay


@pytest.mark.parametrize(
    ("attempt", "rand", "expected"),
    [
        (1, 0.5, 0.1),  # rand 0.5: no jitter
        (2, 0.5, 0.2),
        (3, 0.5, 0.4),
        (6, 0.5, 3.2),
        (7, 0.5, 5.0),  # 6.4 capped at max
        (1, 0.0, 0.08),  # rand 0: -20 %
        (3, 0.0, 0.32),
        (1, 0.75, 0.11),  # rand 0.75: +10 %
        (1, NEAR_ONE, 0.12),  # rand -> 1: +20 %
        (7, 0.0, 4.0),  # the cap, then jitter
        (7, NEAR_ONE, 6.0),
    ],
)
def test_backoff_delay_exact(attempt: int, rand: float, expected: float) -> None:
    assert backoff_delay(BACKOFF, attempt, rand) == pytest.approx(expected)


@pytest.mark.parametrize(
    "backoff",
    [
        BACKOFF,
        Backoff(initial=0.1, multiplier=2, max=5.0, jitter=0.2),  # int multiplier: exact big-int power
        Backoff(initial=0.1, multiplier=1e300, max=5.0, jitter=0.2),
    ],
)
@pytest.mark.parametrize("attempt", [64, 1_025, 10_000])
def test_backoff_delay_huge_attempt_is_capped_not_overflowing(backoff: Backoff, attempt: int) -> None:
    assert backoff_delay(backoff, attempt, 0.5) == pytest.approx(backoff.max)
    assert backoff_delay(backoff, attempt, 0.0) == pytest.approx(backoff.max * 0.8)


def test_backoff_delay_without_jitter_ignores_rand() -> None:
    plain = Backoff(initial=1.0, multiplier=3.0, max=100.0, jitter=0.0)
    assert {backoff_delay(plain, 3, r) for r in (0.0, 0.3, NEAR_ONE)} == {9.0}


def test_backoff_delay_constant_and_shrinking_multipliers() -> None:
    constant = Backoff(initial=0.5, multiplier=1.0, max=5.0, jitter=0.0)
    shrinking = Backoff(initial=1.0, multiplier=0.5, max=5.0, jitter=0.0)
    assert [backoff_delay(constant, n, 0.5) for n in (1, 2, 10_000)] == [0.5, 0.5, 0.5]
    assert [backoff_delay(shrinking, n, 0.5) for n in (1, 2, 3)] == [1.0, 0.5, 0.25]
    assert backoff_delay(shrinking, 10_000, 0.5) == 0.0  # underflows to zero, no error


def test_backoff_delay_jitter_above_one_never_negative() -> None:
    wild = Backoff(initial=1.0, multiplier=2.0, max=5.0, jitter=1.5)
    assert backoff_delay(wild, 1, 0.0) == 0.0  # factor 1 - 1.5 = -0.5, clamped
    assert backoff_delay(wild, 10, NEAR_ONE) == pytest.approx(12.5)


@pytest.mark.parametrize(("attempt", "rand"), [(0, 0.5), (-1, 0.5), (1, -0.1), (1, 1.0), (1, float("nan"))])
def test_backoff_delay_rejects_bad_arguments(attempt: int, rand: float) -> None:
    with pytest.raises(ValueError):
        backoff_delay(BACKOFF, attempt, rand)


backoffs = st.builds(
    Backoff,
    initial=st.floats(0.0, 10.0),
    multiplier=st.floats(0.0, 1e6),
    max=st.floats(0.0, 100.0),
    jitter=st.floats(0.0, 1.0),
)
rands = st.floats(0.0, 1.0, exclude_max=True)


@settings(max_examples=300)
@given(backoff=backoffs, attempt=st.integers(1, 20_000), rand=rands)
def test_backoff_delay_within_jitter_bounds(backoff: Backoff, attempt: int, rand: float) -> None:
    delay = backoff_delay(backoff, attempt, rand)
    assert 0.0 <= delay <= backoff.max * (1 + backoff.jitter)
    # And within +/- jitter of the un-jittered delay (rand 0.5).
    base = backoff_delay(backoff, attempt, 0.5)
    assert base * (1 - backoff.jitter) - 1e-9 <= delay <= base * (1 + backoff.jitter) + 1e-9


@settings(max_examples=100)
@given(backoff=backoffs, attempt=st.integers(1, 200), a=rands, b=rands)
def test_backoff_delay_monotonic_in_rand(backoff: Backoff, attempt: int, a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    assert backoff_delay(backoff, attempt, lo) <= backoff_delay(backoff, attempt, hi)


# --------------------------------------------------------------------------- ReconnectSchedule


def schedule(max_attempts: int | None = None, rand: float = 0.5, backoff: Backoff = BACKOFF) -> ReconnectSchedule:
    return ReconnectSchedule(ConnectPolicy(backoff=backoff, max_attempts=max_attempts), lambda: rand)


def test_fresh_schedule_is_due_at_once() -> None:
    s = schedule()
    assert (s.attempts, s.next_at, s.gave_up) == (0, None, False)
    assert s.due(0.0)


def test_failures_back_off_from_now() -> None:
    s = schedule()
    assert s.failed(100.0) == pytest.approx(100.1)
    assert (s.attempts, s.next_at) == (1, pytest.approx(100.1))
    assert not s.due(100.05)
    assert s.due(100.1)
    assert s.failed(100.1) == pytest.approx(100.3)
    assert s.failed(100.3) == pytest.approx(100.7)
    assert s.attempts == 3


def test_failed_uses_rand_for_each_failure() -> None:
    values = iter([0.0, NEAR_ONE])
    s = ReconnectSchedule(ConnectPolicy(backoff=BACKOFF), lambda: next(values))
    assert s.failed(0.0) == pytest.approx(0.08)
    assert s.failed(0.0) == pytest.approx(0.24)


def test_gives_up_at_max_attempts_and_stays_given_up() -> None:
    s = schedule(max_attempts=3)
    assert s.failed(0.0) is not None
    assert s.failed(1.0) is not None
    assert s.failed(2.0) is None
    assert (s.attempts, s.next_at, s.gave_up) == (3, None, True)
    assert s.failed(3.0) is None
    assert s.attempts == 3  # giving up again counts nothing
    assert not s.due(4.0) and not s.due(1e9)


def test_max_attempts_one_gives_up_on_first_failure() -> None:
    s = schedule(max_attempts=1)
    assert s.failed(0.0) is None
    assert s.gave_up


def test_no_max_attempts_never_gives_up_and_stays_capped() -> None:
    s = schedule(max_attempts=None)
    now = 0.0
    for _ in range(10_000):
        at = s.failed(now)
        assert at is not None
        now = at
    assert s.attempts == 10_000
    assert not s.gave_up
    assert s.failed(now) == pytest.approx(now + BACKOFF.max)


def test_succeeded_resets_the_count() -> None:
    s = schedule(max_attempts=3)
    s.failed(0.0)
    s.failed(0.0)
    s.succeeded()
    assert (s.attempts, s.next_at) == (0, None)
    assert s.due(0.0)
    assert s.failed(10.0) == pytest.approx(10.1)  # back to the initial delay
    assert s.failed(10.0) is not None  # and two more failures allowed before give-up


def test_reset_revives_a_schedule_that_gave_up() -> None:
    s = schedule(max_attempts=1)
    s.failed(0.0)
    s.reset()
    assert (s.attempts, s.gave_up) == (0, False)
    assert s.due(0.0)


# --------------------------------------------------------------------------- HealthTracker

DEGRADED = DegradedPolicy(slow_call=1.0, enter_after=3, leave_after=4)
PROBE = ProbePolicy(unhealthy_after=5, healthy_after=2)

N, IMP, H, U = Verdict.NONE, Verdict.IMPAIRED, Verdict.HEALTHY, Verdict.UNHEALTHY


def tracker(degraded: DegradedPolicy = DEGRADED, probe: ProbePolicy = PROBE) -> HealthTracker:
    return HealthTracker(degraded, probe)


def impaired_tracker() -> HealthTracker:
    t = tracker()
    assert [t.call_impaired() for _ in range(3)] == [N, N, IMP]
    return t


def test_enter_after_impaired_calls_reports_once() -> None:
    t = tracker()
    assert [t.call_impaired() for _ in range(6)] == [N, N, IMP, N, N, N]
    assert t.impaired


@pytest.mark.parametrize("duration", [1.0001, 30.0])
def test_slow_call_counts_as_impaired(duration: float) -> None:
    t = tracker()
    assert [t.call_ok(duration) for _ in range(3)] == [N, N, IMP]


def test_call_at_exactly_slow_call_is_healthy() -> None:
    t = tracker()
    assert [t.call_ok(1.0) for _ in range(10)] == [N] * 10
    assert not t.impaired and t.quiet


def test_mixed_impaired_calls_and_failed_probes_form_one_streak() -> None:
    t = tracker()
    assert [t.call_impaired(), t.probe_failed(), t.call_ok(5.0)] == [N, N, IMP]


@pytest.mark.parametrize("success", ["call", "probe"])
def test_any_success_breaks_the_impaired_streak(success: str) -> None:
    t = tracker()
    ok = (lambda: t.call_ok(0.01)) if success == "call" else t.probe_ok
    verdicts = [t.call_impaired(), t.call_impaired(), ok(), t.call_impaired(), t.call_impaired()]
    assert verdicts == [N] * 5
    assert t.call_impaired() == IMP


def test_leave_after_healthy_calls_reports_healthy_once() -> None:
    t = impaired_tracker()
    assert [t.call_ok(0.01) for _ in range(6)] == [N, N, N, H, N, N]
    assert not t.impaired


def test_healthy_after_probes_reports_healthy() -> None:
    t = impaired_tracker()
    assert [t.probe_ok(), t.probe_ok(), t.probe_ok()] == [N, H, N]


def test_impaired_observation_breaks_healthy_streaks() -> None:
    t = impaired_tracker()
    verdicts = [t.call_ok(0.01) for _ in range(3)]
    verdicts += [t.probe_ok(), t.call_impaired()]
    verdicts += [t.call_ok(0.01) for _ in range(3)] + [t.probe_ok()]
    assert verdicts == [N] * 9  # neither streak survived the impaired call
    assert t.call_ok(0.01) == H


def test_call_and_probe_healthy_streaks_are_counted_apart() -> None:
    t = impaired_tracker()
    assert [t.probe_ok(), t.call_ok(0.01), t.call_ok(0.01), t.call_ok(0.01)] == [N, N, N, N]
    assert t.probe_ok() == H  # the calls did not break the probe streak


def test_healthy_needs_a_reported_impaired_first() -> None:
    t = tracker()
    assert [t.call_ok(0.01) for _ in range(10)] + [t.probe_ok() for _ in range(10)] == [N] * 20


def test_unhealthy_after_consecutive_probe_failures() -> None:
    t = tracker()
    assert [t.probe_failed() for _ in range(6)] == [N, N, IMP, N, U, U]


@pytest.mark.parametrize("success", ["call", "probe"])
def test_success_breaks_the_probe_failure_streak(success: str) -> None:
    t = tracker(probe=ProbePolicy(unhealthy_after=2, healthy_after=2))
    ok = (lambda: t.call_ok(0.01)) if success == "call" else t.probe_ok
    assert [t.probe_failed(), ok(), t.probe_failed(), ok()] == [N, N, N, N]
    assert [t.probe_failed(), t.probe_failed()] == [N, U]


def test_impaired_calls_do_not_count_towards_unhealthy() -> None:
    t = tracker(probe=ProbePolicy(unhealthy_after=2, healthy_after=2))
    assert [t.call_impaired() for _ in range(10)] == [N, N, IMP] + [N] * 7
    assert t.probe_failed() == N
    assert t.probe_failed() == U


def test_unhealthy_takes_precedence_and_leaves_impaired_unreported() -> None:
    t = tracker(DegradedPolicy(slow_call=1.0, enter_after=2, leave_after=1), ProbePolicy(unhealthy_after=2))
    assert [t.probe_failed(), t.probe_failed()] == [N, U]
    assert not t.impaired
    assert t.call_ok(0.01) == N  # so no HEALTHY without an IMPAIRED first


def test_reset_forgets_everything() -> None:
    t = impaired_tracker()
    t.probe_failed()
    t.reset()
    assert (t.impaired, t.quiet) == (False, True)
    assert [t.call_impaired(), t.call_impaired()] == [N, N]  # a fresh streak
    assert [t.call_ok(0.01) for _ in range(5)] == [N] * 5


def test_quiet_says_when_a_fast_success_may_go_unreported() -> None:
    t = tracker()
    assert t.quiet
    t.call_ok(2.0)  # slow
    assert not t.quiet
    t.call_ok(0.01)
    assert t.quiet
    t.probe_failed()
    assert not t.quiet
    t.probe_ok()
    assert t.quiet
    t = impaired_tracker()
    t.call_ok(0.01)
    assert not t.quiet  # degraded: every call is counted


@pytest.mark.parametrize(
    ("enter", "leave", "healthy", "unhealthy"),
    list(itertools.product([1, 2, 4], [1, 3], [1, 2], [1, 3])),
)
def test_thresholds_are_exact(enter: int, leave: int, healthy: int, unhealthy: int) -> None:
    degraded = DegradedPolicy(slow_call=1.0, enter_after=enter, leave_after=leave)
    probe = ProbePolicy(unhealthy_after=unhealthy, healthy_after=healthy)
    t = HealthTracker(degraded, probe)
    assert [t.call_impaired() for _ in range(enter)] == [N] * (enter - 1) + [IMP]
    assert [t.call_ok(0.0) for _ in range(leave)] == [N] * (leave - 1) + [H]
    assert [t.call_impaired() for _ in range(enter)][-1] == IMP
    assert [t.probe_ok() for _ in range(healthy)] == [N] * (healthy - 1) + [H]
    t.reset()
    failures = [t.probe_failed() for _ in range(unhealthy)]
    assert failures[-1] == U
    assert U not in failures[:-1]
