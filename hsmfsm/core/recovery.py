"""The arithmetic of recovery: reconnect back-off and the ``degraded`` bookkeeping.

Everything here is pure: no I/O, no clock, no threads, no global randomness.
Time comes in as monotonic seconds (floats) and randomness as a float in
[0, 1) or a callable returning one, so the supervisor owns the clock and the
lock, and tests can drive these classes with a fake clock and exact random
values. Neither class knows the connection's :class:`~hsmfsm.core.states.State`:
they only tell the caller what happened, and the caller fires the events.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

from .policy import Backoff, ConnectPolicy, DegradedPolicy, ProbePolicy

__all__ = ["backoff_delay", "ReconnectSchedule", "Verdict", "HealthTracker"]


def backoff_delay(backoff: Backoff, attempt: int, rand: float) -> float:
    """Seconds to wait after the ``attempt``-th consecutive failure (1-based).

    The base is ``min(max, initial * multiplier**(attempt-1))``; it is then
    spread by ``jitter`` (``rand`` 0.5 leaves it unchanged, 0 shortens it by
    ``jitter``, values near 1 lengthen it by up to ``jitter``) so that clients
    that lost the same HSM do not all come back in the same instant. The result
    lies in ``[0, backoff.max * (1 + jitter)]`` whatever the policy says.

    A connection with ``max_attempts: null`` keeps counting for ever, so the
    exponent can get large enough to overflow a float: that case is the cap.
    """
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt}")
    if not 0.0 <= rand < 1.0:
        raise ValueError(f"rand must be in [0, 1), got {rand}")
    try:
        base = min(backoff.max, backoff.initial * backoff.multiplier ** (attempt - 1))
    except OverflowError:  # float ** int, or an int multiplier's exact power, past 1e308
        base = backoff.max
    ceiling = backoff.max * (1.0 + backoff.jitter)
    spread = base * (1.0 + backoff.jitter * (2.0 * rand - 1.0))
    return min(ceiling, max(0.0, spread))


class ReconnectSchedule:
    """When the next connect attempt of one connection may start, and when to give up.

    The caller records each failed attempt with :meth:`failed` and each success
    (the connection reached ``logged_in``) with :meth:`succeeded`. Consecutive
    failures lengthen the wait (see :func:`backoff_delay`); after
    ``policy.max_attempts`` of them :meth:`failed` returns ``None`` and the
    schedule stays given up, so that the caller fires ``give_up`` and the
    connection goes ``failed``, until :meth:`reset` (the application's ``reset``
    of a failed connection).
    """

    __slots__ = ("_policy", "_rand", "_attempts", "_next_at", "_gave_up")

    def __init__(self, policy: ConnectPolicy, rand: Callable[[], float]) -> None:
        self._policy = policy
        self._rand = rand
        self._attempts = 0
        self._next_at: float | None = None
        self._gave_up = False

    @property
    def attempts(self) -> int:
        """Consecutive failed attempts since the last success or reset."""
        return self._attempts

    @property
    def next_at(self) -> float | None:
        """Monotonic time from which the next attempt may start.

        ``None`` when no wait is pending (no failure yet, or the schedule gave
        up: see :attr:`gave_up`).
        """
        return self._next_at

    @property
    def gave_up(self) -> bool:
        """``max_attempts`` consecutive attempts failed; only :meth:`reset` revives it."""
        return self._gave_up

    def due(self, now: float) -> bool:
        """May an attempt start at ``now``? Never once the schedule gave up."""
        if self._gave_up:
            return False
        return self._next_at is None or now >= self._next_at

    def failed(self, now: float) -> float | None:
        """Record a failed attempt at ``now``.

        Returns when the next attempt may start, or ``None`` when this was the
        last allowed attempt: the caller is to fire ``give_up``. Further calls
        after giving up keep returning ``None`` and count nothing.
        """
        if self._gave_up:
            return None
        self._attempts += 1
        limit = self._policy.max_attempts
        if limit is not None and self._attempts >= limit:
            self._gave_up = True
            self._next_at = None
            return None
        self._next_at = now + backoff_delay(self._policy.backoff, self._attempts, self._rand())
        return self._next_at

    def succeeded(self) -> None:
        """The connection is back: the next loss starts counting from zero."""
        self.reset()

    def reset(self) -> None:
        """Forget every failure, including a give-up (the application reset the connection)."""
        self._attempts = 0
        self._next_at = None
        self._gave_up = False


class Verdict(StrEnum):
    """What a :class:`HealthTracker` observation asks the caller to do."""

    #: Nothing to do.
    NONE = "none"
    #: The connection just crossed into impaired: fire ``impaired`` (enter ``degraded``).
    IMPAIRED = "impaired"
    #: An impaired connection has recovered: fire ``healthy`` (leave ``degraded``).
    HEALTHY = "healthy"
    #: Probe failures reached ``unhealthy_after``: treat the connection as lost.
    UNHEALTHY = "unhealthy"


class HealthTracker:
    """The counting behind ``degraded``: consecutive impaired and healthy calls and probes.

    Each observation returns a :class:`Verdict`. ``IMPAIRED`` and ``HEALTHY``
    are reported once, when a threshold is crossed, and alternate strictly
    (``HEALTHY`` only ever follows an ``IMPAIRED``), so the caller can fire the
    matching event without tracking anything itself and never fires one per
    call. The tracker knows nothing about states.

    Rules:

    - ``degraded.enter_after`` consecutive impaired calls or probes, or failed
      probes (a call or probe slower than ``degraded.slow_call``, or a call
      failing with a code whose class fires ``impaired``) -> ``IMPAIRED``.
    - while impaired, ``degraded.leave_after`` consecutive healthy calls, or
      ``probe.healthy_after`` consecutive healthy probes -> ``HEALTHY``. The
      two streaks are counted apart (a probe is not a call) and a success of
      either kind does not break the other's streak; anything impaired breaks
      both.
    - ``probe.unhealthy_after`` consecutive failed probes -> ``UNHEALTHY``,
      which takes precedence over ``IMPAIRED``; any success breaks that streak.

    Contract with the caller:

    - Call :meth:`reset` whenever the connection (re-)enters ``logged_in`` from
      below (a new login): the tracker's idea of "impaired" must match the
      state, or a later ``HEALTHY`` would be fired at a state that rejects it.
    - The hot path: a fast, successful call need not be reported while
      :attr:`quiet` is true (it would change nothing), so in steady state
      ``call_ok`` runs only for slow calls, while degraded, or while an
      impaired streak is open. It must be reported whenever :attr:`quiet` is
      false, or impaired observations separated by successes would look
      consecutive. Every method is a few integer operations and takes no
      lock: the caller serialises.
    """

    __slots__ = (
        "_slow", "_enter", "_leave", "_probe_healthy", "_unhealthy",
        "_impaired", "_bad", "_probe_failures", "_good_calls", "_good_probes",
    )

    def __init__(self, degraded: DegradedPolicy, probe: ProbePolicy) -> None:
        self._slow = degraded.slow_call
        self._enter = degraded.enter_after
        self._leave = degraded.leave_after
        self._probe_healthy = probe.healthy_after
        self._unhealthy = probe.unhealthy_after
        self.reset()

    @property
    def impaired(self) -> bool:
        """``IMPAIRED`` was reported and ``HEALTHY`` not yet (the connection should be degraded)."""
        return self._impaired

    @property
    def quiet(self) -> bool:
        """Nothing is being counted: a fast successful call may skip :meth:`call_ok`."""
        return not (self._impaired or self._bad or self._probe_failures)

    def reset(self) -> None:
        """Forget everything: a new session or login starts healthy."""
        self._impaired = False
        self._bad = 0  # consecutive impaired calls and failed probes
        self._probe_failures = 0  # consecutive failed probes
        self._good_calls = 0  # consecutive healthy calls while impaired
        self._good_probes = 0  # consecutive healthy probes while impaired

    def call_ok(self, duration: float) -> Verdict:
        """A call succeeded after ``duration`` seconds (slower than ``slow_call`` is impaired)."""
        if duration > self._slow:
            return self.call_impaired()
        self._succeeded()
        if not self._impaired:
            return Verdict.NONE
        self._good_calls += 1
        return self._healthy_if(self._good_calls >= self._leave)

    def call_impaired(self) -> Verdict:
        """A call failed with a code whose class fires ``impaired``."""
        return self._impaired_observed()

    def probe_ok(self) -> Verdict:
        """The health probe succeeded."""
        self._succeeded()
        if not self._impaired:
            return Verdict.NONE
        self._good_probes += 1
        return self._healthy_if(self._good_probes >= self._probe_healthy)

    def probe_slow(self) -> Verdict:
        """The probe succeeded, but slower than ``degraded.slow_call``: an impaired observation
        (towards ``degraded``), not a failed probe (it does not count towards ``UNHEALTHY``).

        Without this, a uniformly slow HSM would never become degraded: each probe's
        success would break the streak of slow calls between two probes.
        """
        return self._impaired_observed()

    def probe_failed(self) -> Verdict:
        """The health probe failed: impaired, and one step towards ``UNHEALTHY``."""
        self._probe_failures += 1
        verdict = self._impaired_observed()
        if self._probe_failures >= self._unhealthy:
            if verdict is Verdict.IMPAIRED:
                # Not reported, so not recorded: HEALTHY must only follow a reported IMPAIRED.
                self._impaired = False
            return Verdict.UNHEALTHY
        return verdict

    def _succeeded(self) -> None:
        self._bad = 0
        self._probe_failures = 0

    def _impaired_observed(self) -> Verdict:
        self._good_calls = 0
        self._good_probes = 0
        self._bad += 1
        if self._impaired or self._bad < self._enter:
            return Verdict.NONE
        self._impaired = True
        return Verdict.IMPAIRED

    def _healthy_if(self, recovered: bool) -> Verdict:
        if not recovered:
            return Verdict.NONE
        self._impaired = False
        self._good_calls = 0
        self._good_probes = 0
        return Verdict.HEALTHY
