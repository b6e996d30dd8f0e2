"""A pool's health: whether every active member serves, since when not, and each member's state.

:meth:`Pool.health() <hsmfsm.runtime.pool.Pool.health>` answers with a
:class:`PoolHealth`; ``hsmfsm health`` prints it and exits by the Nagios
plugin conventions (:attr:`PoolHealth.level`); the systemd notifier sends its
:meth:`~PoolHealth.summary` as ``STATUS=``. ``as_dict()`` has the shape of
Vault's ``/sys/seal-backend-status`` (``healthy``, ``unhealthy_since``, one
entry per member).

The times a member and the pool stopped serving are kept by
:class:`HealthWatch`, a transition listener each pool registers on its
members; everything else is read from the pool when asked.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..core.records import MESSAGE_IDS, TransitionRecord
from ..core.states import SERVING, Event, State

if TYPE_CHECKING:
    from .pool import Pool

log = logging.getLogger("hsmfsm.pool")

#: ``PoolHealth.level`` values, with their Nagios plugin exit codes.
LEVELS = {"ok": 0, "warning": 1, "critical": 2}


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class MemberHealth:
    """One member: its state and since when, whether it serves, and since when it does not."""

    name: str
    role: str  # "active" or "standby"
    state: str
    since: float | None  # UNIX time the member entered its state
    serving: bool  # its state serves and it is not kept out (a replica whose key differs)
    unhealthy_since: float | None  # UNIX time it stopped serving; None while it serves
    last_code: str | None
    last_code_value: int | None
    error: str | None  # why it is kept out, or why it failed (never a PIN)
    sessions: int
    inflight: int
    recovery_attempts: int
    max_attempts: int | None
    next_attempt_in: float | None

    def as_dict(self) -> dict[str, Any]:
        """Vault's words: ``healthy`` for :attr:`serving`; times in ISO 8601 (UTC)."""
        d = asdict(self)
        serving = d.pop("serving")
        out = {"name": d.pop("name"), "role": d.pop("role"), "state": d.pop("state"), "healthy": serving, **d}
        out["since"], out["unhealthy_since"] = _iso(self.since), _iso(self.unhealthy_since)
        return out

    def describe(self) -> str:
        """``hsm-b disconnected CKR_DEVICE_ERROR, recovery 2/6`` (a member that does not serve)."""
        text = f"{self.name} {self.state} {self.last_code or 'no code yet'}"
        if self.state in SERVING and self.error:
            return f"{self.name} kept out ({self.error})"
        if self.state != State.FAILED and not self.serving:
            cap = "unlimited" if self.max_attempts is None else self.max_attempts
            text += f", recovery {self.recovery_attempts}/{cap}"
        return text


@dataclass(frozen=True, slots=True)
class PoolHealth:
    """A pool's health at :attr:`time`.

    ``healthy``: every active member serves. ``level``: ``"ok"`` (healthy), ``"warning"``
    (some active member does not serve), ``"critical"`` (no member serves, or a member is
    ``failed``, which no retry mends: a person must act).
    """

    pool: str
    time: float
    healthy: bool
    unhealthy_since: float | None  # UNIX time the pool stopped being healthy; None while healthy
    serving: int  # members that serve, standbys included
    active: int  # active (non-standby) members
    members: tuple[MemberHealth, ...]

    @property
    def failed(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members if m.state == State.FAILED)

    @property
    def level(self) -> str:
        if self.serving == 0 or self.failed:
            return "critical"
        return "ok" if self.healthy else "warning"

    @property
    def exit_code(self) -> int:
        """The Nagios plugin exit code of :attr:`level` (0, 1, 2)."""
        return LEVELS[self.level]

    def summary(self) -> str:
        """One line, for ``STATUS=`` and the first line of ``hsmfsm health``."""
        head = f"pool {self.pool}: "
        if self.level == "critical":
            head += "DOWN: " if self.serving == 0 else "a member failed: "
        elif self.level == "warning":
            head += "degraded: "
        head += f"serving on {self.serving} of {len(self.members)} members"
        if self.level == "ok":
            return head + " (" + ", ".join(f"{m.name} {m.state}" for m in self.members) + ")"
        return head + "; " + ", ".join(m.describe() for m in self.members if not m.serving)

    def as_dict(self) -> dict[str, Any]:
        return {"pool": self.pool, "time": _iso(self.time), "healthy": self.healthy, "level": self.level,
                "unhealthy_since": _iso(self.unhealthy_since), "serving": self.serving, "active": self.active,
                "failed": list(self.failed), "members": [m.as_dict() for m in self.members]}


class HealthWatch:
    """The transition listener behind :meth:`Pool.health`: when each member and the pool stopped
    serving. Logs (with a ``MESSAGE_ID``) when a pool that served has no member left that serves,
    and when it serves again."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        now = pool._clock.time()
        self._lock = threading.Lock()
        #: The pool starts unhealthy: no member serves before it has opened.
        self._since: float | None = now
        self._left: dict[str, float | None] = {m.conn.name: now for m in pool._members}
        self._serving = 0
        self._down_logged = False
        for m in pool._members:
            m.conn.add_listener(self)

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    def _counts(self) -> tuple[bool, int]:
        members = self.pool._members
        up = [m.conn.serving and m.mismatch is None for m in members]
        return all(u for u, m in zip(up, members) if not m.standby), sum(up)

    def __call__(self, record: TransitionRecord) -> None:
        healthy, serving = self._counts()
        with self._lock:
            if record.dest in SERVING:
                self._left[record.member] = None
            elif record.source in SERVING or self._left.get(record.member) is None:
                self._left[record.member] = record.time
            if healthy:
                self._since = None
            elif self._since is None:
                self._since = record.time
            before, self._serving = self._serving, serving
            down = before > 0 and serving == 0 and record.event is not Event.CLOSE  # not a pool closing
            back = before == 0 and serving > 0 and self._down_logged
            self._down_logged = (self._down_logged or down) and not back
        name = self.pool.name
        if down:
            log.error("pool %s: no member serves", name,
                      extra={"MESSAGE_ID": MESSAGE_IDS["all_members_down"], "HSMFSM_POOL": name})
        elif back:
            log.warning("pool %s: serves again (%s)", name, record.member,
                        extra={"MESSAGE_ID": MESSAGE_IDS["pool_serving"], "HSMFSM_POOL": name,
                               "HSMFSM_MEMBER": record.member})

    def health(self) -> PoolHealth:
        pool = self.pool
        rows = pool.status()
        now = pool._clock.time()
        members = []
        with self._lock:
            for r in rows:
                serving = r.state in SERVING and r.error is None
                if serving:
                    self._left[r.name] = None
                elif self._left.get(r.name) is None:  # kept out without a transition: from now
                    self._left[r.name] = now
                failure = pool.member(r.name)._failure if r.state == State.FAILED else None
                members.append(MemberHealth(
                    r.name, r.role, str(r.state), r.since, serving, self._left.get(r.name), r.last_code,
                    r.last_code_value, r.error or (str(failure) if failure is not None else None), r.sessions,
                    r.inflight, r.recovery_attempts, r.max_attempts, r.next_attempt_in))
            healthy = all(m.serving for m in members if m.role == "active")
            if healthy:
                self._since = None
            elif self._since is None:
                self._since = now
            since = self._since
        return PoolHealth(pool.name, now, healthy, since, sum(m.serving for m in members),
                          sum(m.role == "active" for m in members), tuple(members))
