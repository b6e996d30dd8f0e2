"""The record of every state change: a value per transition, handed to listeners and to logging.

Auditors read these; operators alert on them. A record carries the member,
the states, the event, the return code that caused it, the reconnect attempt
and the generation (which sessions were valid). It never carries a PIN: it is
built only from those fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from .states import Event, State


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
        return datetime.fromtimestamp(self.time, UTC).isoformat(timespec="milliseconds")

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
