"""The record of every state change and of every call: values handed to listeners and to logging.

Auditors read these; operators alert on them. A transition record carries the
member, the states, the event, the return code that caused it, the reconnect
attempt and the generation (which sessions were valid). A call record carries
the operation, its outcome, its return code and how long it took. Neither ever
carries a PIN, nor a key label: they are built only from those fields.

:func:`log_fields` gives the structured fields of a transition's log line
(journald fields, and the record itself for JSON formatters), with a stable
``MESSAGE_ID`` per kind of change (:data:`MESSAGE_IDS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from .states import SERVING, Event, State


def iso_time(t: float) -> str:
    """A record's UNIX time as ISO 8601 UTC with milliseconds, as every record prints it."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class TransitionRecord:
    """One state change. ``source``, ``dest`` and ``event`` are :class:`State` and :class:`Event`
    values, which compare equal to their names as strings (and serialise as them)."""

    time: float  # UNIX time (UTC)
    member: str
    source: State
    dest: State
    event: Event
    code_name: str | None
    code_value: int | None
    attempt: int
    generation: int

    @property
    def iso_time(self) -> str:
        return iso_time(self.time)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["time"] = self.iso_time
        d["source"], d["dest"], d["event"] = str(self.source), str(self.dest), str(self.event)
        return d

    def __str__(self) -> str:
        code = f" {self.code_name}" + (f" (0x{self.code_value:X})" if self.code_value is not None else "") \
            if self.code_name else ""
        return (f"{self.iso_time} {self.member}: {self.source} -> {self.dest} on {self.event}{code}"
                f" attempt={self.attempt} generation={self.generation}")


Listener = Callable[[TransitionRecord], None]


@dataclass(frozen=True, slots=True)
class SuspicionRecord:
    """A pool's suspicion of a member, set or taken away (``Pool.add_suspicion_listener``). Not a
    transition: the member keeps its state and sessions (``hsmfsm.core.rules.decide_suspicion``).

    ``kind``: ``"suspected"`` (a call of ``operation`` had run ``elapsed`` seconds, past the member's
    ``limit``, while another member served) or ``"cleared"`` (``reason`` says why: it answered, or
    it left service and will be judged afresh when it is back)."""

    time: float  # UNIX time (UTC)
    pool: str
    member: str
    kind: str
    operation: str | None
    elapsed: float | None
    limit: float | None
    reason: str

    @property
    def iso_time(self) -> str:
        return iso_time(self.time)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "time": self.iso_time}

    def __str__(self) -> str:
        return f"{self.iso_time} {self.pool}/{self.member}: {self.kind}: {self.reason}"


SuspicionListener = Callable[[SuspicionRecord], None]


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One call, as a call listener sees it (``SlotConnection.add_call_listener``, ``Pool.add_call_listener``).

    ``kind`` ``"attempt"``: one try of an operation on one member (connection); ``"call"``: one call
    of a pool, as the application saw it (failover included). ``outcome`` is ``"ok"`` or the name of
    the error class: the one raised, or for an attempt its connection went on from (a re-issue), the
    one the same failure raises on a pool member. ``code_value`` is ``None`` for HSMFSM_* pseudo codes.
    ``attempt`` counts from 1 within the call (a pool numbers its members' attempts within its call;
    a pool call's own record says how many attempts it made, 0 when no member was asked);
    ``reissued``: this attempt is a re-issue, or the pool call went to more than one attempt.
    """

    time: float  # UNIX time (UTC) the attempt or call began
    pool: str | None
    member: str | None
    operation: str
    outcome: str
    code_name: str | None
    code_value: int | None
    seconds: float
    attempt: int
    reissued: bool
    kind: str = "attempt"

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "time": iso_time(self.time)}

    def __str__(self) -> str:
        where = "/".join(x for x in (self.pool, self.member) if x) or "-"
        code = f" {self.code_name}" if self.code_name else ""
        return (f"{self.kind} {where} {self.operation} {self.outcome}{code} {self.seconds * 1000:.1f} ms"
                f" attempt={self.attempt}{' reissued' if self.reissued else ''}")


CallListener = Callable[[CallRecord], None]

#: journald ``MESSAGE_ID`` of each kind of log line hsmfsm writes about members and pools
#: (``journalctl MESSAGE_ID=...``). Documented; never changed.
MESSAGE_IDS: dict[str, str] = {
    "transition": "0c46f5c7cd884bbeb7a15c1b26386f3a",       # any other state change
    "member_lost": "c91b4e4f8733443bafd34fc791295358",      # a member stopped serving
    "member_back": "d06fb947566b454da199a937259fa5cb",      # a member serves again
    "member_failed": "6070e68d6ece4ee0a39d24e5283cb13c",    # failed: a person must act (PIN, give-up)
    "call_timeout": "ffb867c43f0a47cca5e9fccb45eb6a5d",     # a call overran the call timeout, cut off
    "member_degraded": "591886e895ec4c378e284dc13536f35f",  # logged_in -> degraded (slow or impaired)
    "all_members_down": "bbba3313c1c64d06a5205e86e7ecd007",  # a pool has no member that serves
    "pool_serving": "42edd3ae973140aba8ad9a876a09211f",     # a pool that had none serves again
}


def message_kind(record: TransitionRecord) -> str:
    """Which of :data:`MESSAGE_IDS` a transition's log line carries."""
    if record.dest is State.FAILED:
        return "member_failed"
    if record.event is Event.CALL_TIMEOUT:
        return "call_timeout"
    if record.source in SERVING and record.dest not in SERVING and record.event is not Event.CLOSE:
        return "member_lost"
    if record.dest in SERVING and record.source not in SERVING:
        return "member_back"
    if record.source is State.LOGGED_IN and record.dest is State.DEGRADED:
        return "member_degraded"
    return "transition"


def log_fields(record: TransitionRecord, pool: str | None) -> dict[str, Any]:
    """The ``extra=`` of a transition's log line: journald fields (upper case, strings; a
    journald handler sends every attribute of the log record) and ``hsmfsm_record``, the
    record as a dict, for JSON formatters. A field with no value is the empty string."""
    return {
        "MESSAGE_ID": MESSAGE_IDS[message_kind(record)],
        "HSMFSM_POOL": pool or "",
        "HSMFSM_MEMBER": record.member,
        "HSMFSM_FROM": str(record.source),
        "HSMFSM_TO": str(record.dest),
        "HSMFSM_EVENT": str(record.event),
        "HSMFSM_CKR": record.code_name or "",
        "HSMFSM_CKR_VALUE": "" if record.code_value is None else f"0x{record.code_value:08X}",
        "HSMFSM_ATTEMPT": str(record.attempt),
        "HSMFSM_GENERATION": str(record.generation),
        "hsmfsm_record": {**record.as_dict(), "pool": pool},
    }
