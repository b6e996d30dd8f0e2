"""The fault schedule: drawn from a seeded RNG before the run starts, so the same seed gives the same run."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

WARMUP = 2.0          # seconds of clean signing before the first fault
QUIET = 3.0           # seconds at the end with no fault starting (faults still undone later are waited for)
RECOVERY_MARGIN = 1.0  # a member given back counts as down this much longer when faults are drawn

#: (call, CK_RV, forward, class) of the reply rewrites.
REWRITES = [
    ("C_Sign", 0x30, True, "transport CKR_DEVICE_ERROR"),
    ("C_Sign", 0x32, True, "transport CKR_DEVICE_REMOVED"),
    ("C_Sign", 0xE0, True, "transport CKR_TOKEN_NOT_PRESENT"),
    ("C_SignInit", 0x30, False, "transport CKR_DEVICE_ERROR"),
    ("C_Sign", 0xB3, True, "session CKR_SESSION_HANDLE_INVALID"),
    ("C_SignInit", 0xB3, False, "session CKR_SESSION_HANDLE_INVALID"),
    ("C_GetSessionInfo", 0xB3, True, "session CKR_SESSION_HANDLE_INVALID"),
    ("C_Sign", 0x101, True, "login CKR_USER_NOT_LOGGED_IN"),
    ("C_GetSessionInfo", 0x101, True, "login CKR_USER_NOT_LOGGED_IN"),
    ("C_Sign", 0x80000001, True, "vendor 0x80000001"),
    ("C_SignInit", 0x80000001, False, "vendor 0x80000001"),
]
#: kind -> weight in the draw.
KINDS = {"kill": 3, "hang": 3, "restart": 2, "reset": 2, "latency": 2, "rewrite": 5}
#: Kinds that take a member out of service while they last.
DOWN_KINDS = frozenset({"kill", "hang", "restart", "slow"})


@dataclass(frozen=True)
class Fault:
    at: float                 # seconds after the start of the workload
    kind: str                 # kill, hang, restart, reset, latency, slow, rewrite, all_down
    members: tuple[str, ...]
    length: float = 0.0       # seconds until it is undone (0: nothing to undo)
    args: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def describe(self) -> str:
        who = ",".join(self.members)
        extra = "".join(f" {k}={v}" for k, v in self.args.items())
        span = f" for {self.length:.1f}s" if self.length else ""
        return f"{self.kind} {who}{span}{extra}"


def draw_schedule(seed: int, duration: float, members: list[str], call_timeout: float) -> list[Fault]:
    """The fault schedule of one run: a pure function of the seed, the length and the members.

    Every-member-down windows are placed first (one per minute, at least one);
    the other faults never overlap them and never take the last member that
    is up: at most ``len(members) - 1`` members are down at once outside the
    windows, counting a member as down for ``RECOVERY_MARGIN`` after it was
    given back.
    """
    rng = random.Random(seed)
    end = max(WARMUP + 1.0, duration - QUIET)
    faults: list[Fault] = []
    windows: list[tuple[float, float]] = []
    n_all = max(1, round(duration / 60.0))
    for i in range(n_all):
        span = (end - WARMUP) / n_all
        length = rng.uniform(3.0, 9.0) if duration >= 60 else rng.uniform(3.0, min(7.0, max(3.0, span * 0.4)))
        lo = WARMUP + i * span + 1.0
        hi = max(lo, WARMUP + (i + 1) * span - length - 1.0)
        at = rng.uniform(lo, hi)
        mode = rng.choice(["kill", "hang"])
        faults.append(Fault(round(at, 2), "all_down", tuple(members), round(length, 2), {"mode": mode}))
        windows.append((at - RECOVERY_MARGIN, at + length + RECOVERY_MARGIN))
    busy_until = {m: 0.0 for m in members}
    kinds, weights = list(KINDS), list(KINDS.values())
    t = WARMUP
    while True:
        t += rng.uniform(0.3, 1.5)
        if t >= end:
            break
        kind = rng.choices(kinds, weights)[0]
        member = rng.choice(members)
        if any(a <= t <= b for a, b in windows):
            continue
        args: dict[str, Any]
        if kind in ("kill", "hang"):
            length = rng.uniform(0.5, 4.0)
            args = {}
        elif kind == "restart":
            length, args = 0.0, {}
        elif kind == "latency":
            seconds = rng.choice([0.01, 0.05, 0.15, 0.6])
            length, args = rng.uniform(1.0, 4.0), {"seconds": seconds}
            if 3 * seconds >= call_timeout * 0.8:  # a sign is three round trips: this one times out
                kind = "slow"
        elif kind == "rewrite":
            call, rv, forward, what = REWRITES[rng.randrange(len(REWRITES))]
            length, args = 2.0, {"call": call, "rv": hex(rv), "count": rng.randint(1, 3),
                                 "forward": forward, "class": what}
        else:  # reset
            length, args = 0.0, {}
        stop = t + length
        if kind in DOWN_KINDS:
            up = [m for m in members if m != member and busy_until[m] <= t]
            if busy_until[member] > t or not up:
                continue
            if any(a < stop + RECOVERY_MARGIN and t < b for a, b in windows):
                continue
            busy_until[member] = stop + RECOVERY_MARGIN
        elif any(a < stop and t < b for a, b in windows):
            continue
        faults.append(Fault(round(t, 2), kind, (member,), round(length, 2), args))
    faults.sort(key=lambda f: f.at)
    return faults
