"""Sessions, grouped by generation: the sessions valid between two losses.

Stale handles (docs/FACTS.md): after a reinitialise, old Session and key
objects may alias new handles. Every session belongs to a
:class:`Generation`; a loss retires the generation, the supervisor waits
until every lease of retired generations is back (drain) before it
reinitialises, and a lease whose generation is not current is never used
again, nor closed.
"""

from __future__ import annotations

from typing import Any


class CallSlot:
    """Where a thread stamps the start of a PKCS#11 call, for the watchdog."""

    __slots__ = ("started", "timed_out")

    def __init__(self) -> None:
        self.started = 0.0
        self.timed_out = False


class Lease(CallSlot):
    """A session of one generation, leased by one caller at a time, with its key cache
    (by lookup: label, kind, CKA_ID)."""

    __slots__ = ("g", "keys", "session")

    def __init__(self, g: Generation) -> None:
        super().__init__()
        self.g = g
        self.session: Any = None
        self.keys: dict[tuple[str | None, str, bytes | None], Any] = {}


class Generation:
    """The sessions valid between two losses. ``ready`` is true while the connection serves."""

    __slots__ = ("anchor", "epoch", "idle", "leases", "mech_values", "mechanisms", "module", "number",
                 "public_keys", "ready", "token")

    def __init__(self, number: int) -> None:
        self.number = number
        self.token: Any = None
        self.anchor: Any = None  # the logged-in session, never leased
        self.idle: list[Lease] = []
        self.leases: list[Lease] = []
        self.ready = False
        #: The module instance and its initialisation count when the anchor was opened: the
        #: sessions of this generation are valid handles of that instance until it is re-initialised.
        self.module: Any = None
        self.epoch = -1
        #: The token's mechanisms (C_GetMechanismList at connect, names without CKM_), or None:
        #: not read (yet), or the module could not say.
        self.mechanisms: frozenset[str] | None = None
        #: A caller's mechanism argument -> the module's value, for mechanisms checked against
        #: :attr:`mechanisms` (the success path of a call looks here first).
        self.mech_values: dict[Any, Any] = {}
        #: Public keys read from the token in this generation, by KeyRef: a reconnect drops them.
        self.public_keys: dict[Any, Any] = {}

    def drained(self) -> bool:
        return len(self.idle) == len(self.leases)
