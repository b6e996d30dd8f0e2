"""Recent latency per member and operation, and the limit past which a call is suspicious.

A member's own recent answers say how long its next answer should take: a
signature that usually comes back in 2 ms and is still out after 200 ms is
not coming. :class:`LatencyWindow` keeps the last ``window`` answered calls of
one operation on one member and gives their 99th percentile;
:func:`suspicion_limit` turns it into the limit of
:class:`~hsmfsm.core.policy.SuspicionPolicy`: ``min(ceiling, max(floor,
multiple * p99))``. What crossing it does is the rule-book's
(:func:`hsmfsm.core.rules.decide_suspicion`).

Pure: time comes in as arguments. The caller's hot path only appends a float
to :attr:`LatencyWindow.samples` (a bounded deque, whose append is one C call);
the percentile is computed where it is asked for (the watchdog, a few times a
second at most, see :meth:`LatencyWindow.limit`), never per call.
"""

from __future__ import annotations

import math
from collections import deque

from .policy import SuspicionPolicy

__all__ = ["MIN_SAMPLES", "RECOMPUTE_AFTER", "LatencyWindow", "percentile", "suspicion_limit"]

#: Answered calls needed before the p99 is trusted; with fewer, the limit is the ceiling.
MIN_SAMPLES = 32
#: Seconds a computed limit is reused before the window is sorted again.
RECOMPUTE_AFTER = 0.1


def percentile(samples: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``samples`` (nearest rank: the smallest value with at least that
    share of the samples at or below it). ``samples`` must not be empty."""
    if not samples:
        raise ValueError("percentile of no samples")
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def suspicion_limit(policy: SuspicionPolicy, p99: float | None) -> float:
    """Seconds a call may run before its member is suspected: ``min(ceiling, max(floor, multiple * p99))``,
    the ceiling while the p99 is unknown (too few answers yet)."""
    if p99 is None:
        return policy.ceiling
    return min(policy.ceiling, max(policy.floor, policy.multiple * p99))


class LatencyWindow:
    """The last ``policy.window`` latencies of one operation on one member (answered calls only).

    ``samples`` is appended to directly by the call path; :meth:`p99` and
    :meth:`limit` read it. The limit is cached for :data:`RECOMPUTE_AFTER`
    seconds of the time the caller passes in, so that asking every watchdog tick
    sorts the window a few times a second at most.
    """

    __slots__ = ("_computed_at", "_limit", "_p99", "policy", "samples")

    def __init__(self, policy: SuspicionPolicy) -> None:
        self.policy = policy
        self.samples: deque[float] = deque(maxlen=policy.window)
        self._computed_at = -math.inf
        self._limit = policy.ceiling
        self._p99: float | None = None

    def p99(self) -> float | None:
        """The 99th percentile of the window, None with fewer than :data:`MIN_SAMPLES` answers."""
        snapshot = list(self.samples)  # the call path may append meanwhile: sort a copy
        if len(snapshot) < MIN_SAMPLES:
            return None
        return percentile(snapshot, 0.99)

    def limit(self, now: float) -> float:
        """:func:`suspicion_limit` of the window, recomputed at most every :data:`RECOMPUTE_AFTER` s."""
        if now - self._computed_at >= RECOMPUTE_AFTER:
            self._p99 = self.p99()
            self._limit = suspicion_limit(self.policy, self._p99)
            self._computed_at = now
        return self._limit

    def recent_p99(self, now: float) -> float | None:
        """The p99 as :meth:`limit` last computed it (recomputed when stale)."""
        self.limit(now)
        return self._p99

    def __repr__(self) -> str:
        return f"<LatencyWindow {len(self.samples)}/{self.policy.window} limit={self._limit:g}s>"
