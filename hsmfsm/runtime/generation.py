"""Sessions, grouped by generation (the sessions valid between two losses), and the links they run on.

Stale handles (docs/FACTS.md): after a reinitialise, old Session and key
objects may alias new handles. Every session belongs to a
:class:`Generation`; a loss retires the generation, the supervisor waits
until every lease of retired generations is back (drain) before it
reinitialises, and a lease whose generation is not current is never used
again, nor closed.

A connection holds at most ``sessions.max`` sessions (the logged-in one
included: it is a lease like the others once the login succeeded). Over a
module that serves one request at a time per link (p11-kit-client, docs/FACTS.md),
each session has a :class:`Lane` of its own: a module instance with its own
link to the HSM and its own call lock, so that a member serves as many
calls at once as it has sessions. Lane 0 is the connection's own instance,
the one the supervisor reinitialises and logs in; the others are opened as
calls need them and set up afresh (C_Initialize, token, session, C_Login) for
each generation they serve. Over any other module every session is on lane 0.
"""

from __future__ import annotations

from typing import Any


class CallSlot:
    """Where a thread stamps the start of a PKCS#11 call, for the watchdog."""

    __slots__ = ("started", "timed_out")

    def __init__(self) -> None:
        self.started = 0.0
        self.timed_out = False


class Lane:
    """One module instance of a connection, the lock that serialises calls into it (None: the
    module takes parallel calls), and the lease on it.

    ``epoch`` counts its C_Initialize calls: a session opened before the last one is a stale
    handle. ``lease``: with a link per session, the lease that holds the lane now, of whichever
    generation (None: free); ``stale``: its link was cut (a suspected member's call), so it is
    set up afresh before its next session. ``generation``: the generation it was last set up for.
    """

    __slots__ = ("epoch", "generation", "lease", "lock", "module", "number", "stale", "token")

    def __init__(self, number: int, module: Any, lock: Any) -> None:
        self.number, self.module, self.lock = number, module, lock
        self.epoch = 0
        self.lease: Lease | None = None
        self.stale = False
        self.generation = -1
        self.token: Any = None

    def __repr__(self) -> str:
        return f"<Lane {self.number} epoch={self.epoch}{' stale' if self.stale else ''}>"


class Lease(CallSlot):
    """A session of one generation on one lane, leased by one caller at a time, with its key cache
    (by lookup: label, kind, CKA_ID).

    ``op``: the operation of the call in progress, for the watchdog's suspicion check;
    ``abandoned``: the watchdog cut this call off because its member became suspected, and the
    call goes to another member. ``drop``: the lease is not given back when its call ends (its
    lane's link was cut, or its lane's login is gone with a ``login_lost``): the lane is set up
    afresh for its next session.
    ``opened``: the session is open (and its lane logged in); before, a call waiting for it has
    sent nothing. ``module`` and ``lock`` are the lane's, copied here for the call path.
    """

    __slots__ = ("abandoned", "drop", "epoch", "g", "keys", "lane", "lock", "module", "op", "opened", "session",
                 "token")

    def __init__(self, g: Generation, lane: Lane) -> None:
        super().__init__()
        self.g = g
        self.lane, self.module, self.lock = lane, lane.module, lane.lock
        self.session: Any = None
        self.token: Any = lane.token
        self.epoch = lane.epoch
        self.op: str | None = None
        self.abandoned = False
        self.drop = False
        #: Set up (its session open, its lane logged in): until then nothing of a call was sent on it.
        self.opened = False
        self.keys: dict[tuple[str | None, str, bytes | None], Any] = {}


class Generation:
    """The sessions valid between two losses. ``ready`` is true while the connection serves."""

    __slots__ = ("anchor", "epoch", "idle", "leases", "mech_values", "mechanisms", "module", "number",
                 "public_keys", "ready", "token")

    def __init__(self, number: int) -> None:
        self.number = number
        self.token: Any = None
        #: The session the supervisor logs in on (lane 0's first); once the login succeeded it is
        #: leased like any other (it is in :attr:`leases` from the moment it opens).
        self.anchor: Any = None
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
