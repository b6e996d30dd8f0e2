"""Plays the fault schedule against the lab while the workload signs."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from .lab import Lab
from .schedule import DOWN_KINDS, Fault

_now = time.monotonic


class Chaos:
    """Applies each fault when it is due and undoes it when its length is over.

    A fault is skipped (and said why) when, as things stand, it would take the last
    member that is up, or, for an every-member-down window, while some member is
    still down. ``windows`` are the every-member-down windows as they happened,
    in seconds after the workload started.
    """

    def __init__(self, schedule: list[Fault], lab: Lab, say: Callable[[str], None]) -> None:
        self.lab, self.say = lab, say
        self.pending = list(schedule)
        self.undo: list[tuple[float, Fault]] = []
        self.windows: list[list[float]] = []
        self.applied: collections.Counter[str] = collections.Counter()
        self.skipped: list[str] = []
        self._window_start: float | None = None

    def play(self, t0: float, duration: float, tick: Callable[[float], None]) -> None:
        """From ``t0`` for ``duration`` seconds, and on until every fault is undone; ``tick(now)``
        runs at every turn (at least every 0.1 s)."""
        end_at = t0 + duration
        while True:
            now = _now()
            tick(now)
            self._apply_due(t0, now)
            self._undo_due(t0, now)
            if now >= end_at and not self.undo:
                break
            nxt = min([t0 + f.at for f in self.pending] + [w for w, _ in self.undo] + [end_at])
            time.sleep(max(0.0, min(0.1, nxt - _now())))

    def _apply_due(self, t0: float, now: float) -> None:
        names = set(self.lab.names)
        due = [f for f in self.pending if t0 + f.at <= now]
        for f in due:
            self.pending.remove(f)
            if f.kind in DOWN_KINDS or f.kind == "all_down":
                others = self.lab.down_now() - set(f.members)
                if f.kind != "all_down" and not (names - others - set(f.members)):
                    self.skipped.append(f"{f.at:.1f}s {f.describe()}: would take the last member up")
                    continue
                if f.kind == "all_down" and others:
                    self.skipped.append(f"{f.at:.1f}s {f.describe()}: members still down: {sorted(others)}")
                    continue
            if f.kind == "all_down":
                self._window_start = _now()
            self.say(f"FAULT   {f.describe()}")
            self.lab.apply(f, undoing=False)
            self.applied[f.kind] += 1
            if f.length:
                self.undo.append((t0 + f.at + f.length, f))

    def _undo_due(self, t0: float, now: float) -> None:
        for when, f in [u for u in self.undo if u[0] <= now]:
            self.undo.remove((when, f))
            self.lab.apply(f, undoing=True)
            if f.kind == "all_down" and self._window_start is not None:
                self.windows.append([self._window_start - t0, _now() - t0])
                self._window_start = None
            if f.kind in ("kill", "hang", "all_down", "latency", "slow"):
                self.say(f"UNDO    {f.describe()}")
