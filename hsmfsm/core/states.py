"""Every state, event and transition of a slot connection, in one place.

This module is the constitution of hsmfsm, in the manner of h11's
``_state.py``: nothing changes a connection's state except an event fired
through :class:`SlotMachine`, and every legal (state, event) pair is a row of
:data:`TRANSITIONS`. The ``transitions`` machine, the audit diagrams and the
tests are all built from that table, so the picture cannot drift from the
code. The module does no I/O and reads no clock.

Recovery is the path back up the ladder::

    disconnected --connect--> connecting --session_opened--> open --login_ok--> logged_in
                                                                           <--healthy-- degraded

What each state asks the supervisor to do next (see ``connection.py``):

- ``disconnected``: the module's connection is gone (or never was); the next
  attempt reinitialises the module (C_Finalize/C_Initialize) and drops every
  Session and key object of the old generation.
- ``connecting``: an attempt is under way (module up, opening a session).
- ``open``: a session is open but nobody is logged in: log in.
- ``logged_in``: serving.
- ``degraded``: logged in and serving, but impaired; gets less traffic in a pool.
- ``failed``: terminal. A PIN was rejected, or attempts ran out. Left only by
  an explicit ``reset``, because retrying a rejected PIN burns the token's
  retry counter and can lock it for good.

``forked`` is fired in the child of a ``fork()``, on its first use of the
connection: the sessions it inherited share the parent's socket and server
state, so they are abandoned (never closed: that would log the parent out)
and the child connects afresh with a module instance of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class State(StrEnum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    OPEN = "open"
    LOGGED_IN = "logged_in"
    DEGRADED = "degraded"
    FAILED = "failed"


class Event(StrEnum):
    # The supervisor's own steps up the ladder.
    CONNECT = "connect"
    SESSION_OPENED = "session_opened"
    CONNECT_FAILED = "connect_failed"
    LOGIN_OK = "login_ok"
    GIVE_UP = "give_up"
    # Fired by return codes, through the policy's class -> event table.
    CONNECTION_LOST = "connection_lost"
    SESSION_LOST = "session_lost"
    LOGIN_LOST = "login_lost"
    FATAL = "fatal"
    IMPAIRED = "impaired"
    # Health bookkeeping and the watchdog.
    HEALTHY = "healthy"
    CALL_TIMEOUT = "call_timeout"
    # The application.
    CLOSE = "close"
    RESET = "reset"
    # The process forked: in the child, every inherited session is abandoned (never closed).
    FORKED = "forked"


S, E = State, Event

#: States in which calls are served.
SERVING: frozenset[State] = frozenset({S.LOGGED_IN, S.DEGRADED})
#: States left only by an explicit reset.
TERMINAL: frozenset[State] = frozenset({S.FAILED})
_ALIVE = (S.CONNECTING, S.OPEN, S.LOGGED_IN, S.DEGRADED)

#: Events a policy may bind a class of return codes to (``none``: no transition).
CODE_EVENTS: frozenset[str] = frozenset(
    {E.CONNECTION_LOST, E.SESSION_LOST, E.LOGIN_LOST, E.FATAL, E.IMPAIRED, "none"}
)


def _rows(event: Event, sources: Iterable[State], dest: State) -> list[tuple[State, Event, State]]:
    return [(src, event, dest) for src in sources]


#: The whole machine: (source state, event) -> destination state.
TRANSITIONS: dict[tuple[State, Event], State] = {
    (src, ev): dst
    for src, ev, dst in [
        (S.DISCONNECTED, E.CONNECT, S.CONNECTING),
        (S.CONNECTING, E.SESSION_OPENED, S.OPEN),
        (S.CONNECTING, E.CONNECT_FAILED, S.DISCONNECTED),
        (S.CONNECTING, E.GIVE_UP, S.FAILED),
        (S.OPEN, E.LOGIN_OK, S.LOGGED_IN),
        *_rows(E.CONNECTION_LOST, _ALIVE, S.DISCONNECTED),
        *_rows(E.CALL_TIMEOUT, _ALIVE, S.DISCONNECTED),
        *_rows(E.SESSION_LOST, (S.OPEN, S.LOGGED_IN, S.DEGRADED), S.CONNECTING),
        *_rows(E.LOGIN_LOST, (S.LOGGED_IN, S.DEGRADED), S.OPEN),
        *_rows(E.FATAL, _ALIVE, S.FAILED),
        (S.LOGGED_IN, E.IMPAIRED, S.DEGRADED),
        (S.DEGRADED, E.IMPAIRED, S.DEGRADED),
        (S.DEGRADED, E.HEALTHY, S.LOGGED_IN),
        *_rows(E.CLOSE, (S.DISCONNECTED, *_ALIVE), S.DISCONNECTED),
        (S.FAILED, E.RESET, S.DISCONNECTED),
        # In a forked child. Not from failed: a rejected PIN stays rejected in every child.
        *_rows(E.FORKED, (S.DISCONNECTED, *_ALIVE), S.DISCONNECTED),
    ]
}

INITIAL = S.DISCONNECTED

#: Events after which no session of the current generation may be used again: the
#: connection retires the generation (its sessions are drained, then abandoned or closed).
ENDS_GENERATION: frozenset[Event] = frozenset({E.CONNECTION_LOST, E.CALL_TIMEOUT, E.SESSION_LOST,
                                               E.FATAL, E.CLOSE, E.FORKED})
#: Events that end one recovery attempt: in-call recovery waits for the next request after them.
ENDS_ATTEMPT: frozenset[Event] = frozenset({E.CONNECT_FAILED, E.GIVE_UP, E.LOGIN_OK, E.FATAL,
                                            E.CALL_TIMEOUT, E.CONNECTION_LOST})


def is_legal(state: State, event: Event) -> bool:
    """Whether ``state`` accepts ``event`` (a row of :data:`TRANSITIONS` exists)."""
    return (state, event) in TRANSITIONS


class IllegalTransition(Exception):
    """An event that the current state does not accept. The state is unchanged."""

    def __init__(self, state: State, event: Event, member: str = "") -> None:
        self.state, self.event, self.member = state, event, member
        allowed = ", ".join(sorted(e for (s, e) in TRANSITIONS if s == state)) or "none"
        who = f"{member}: " if member else ""
        super().__init__(f"{who}event {event!s} is not allowed in state {state!s} (allowed: {allowed})")


def next_state(state: State, event: Event, member: str = "") -> State:
    """The destination of ``event`` from ``state``; raises :class:`IllegalTransition`."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event, member) from None


def machine_definition() -> tuple[list[str], list[dict[str, str]]]:
    """States and transitions in the form the ``transitions`` library takes."""
    states = [s.value for s in State]
    rows = [{"trigger": e.value, "source": s.value, "dest": d.value} for (s, e), d in TRANSITIONS.items()]
    return states, rows


class SlotMachine:
    """The live state of one slot connection, driven through a ``transitions`` machine.

    The ``transitions`` machine is built from :data:`TRANSITIONS` with no
    automatic ``to_<state>`` escapes and no queued or ignored triggers. The
    caller (``SlotConnection``) serialises ``fire`` with its own lock; this
    class holds no lock so that the core stays free of threading concerns.
    """

    def __init__(self, member: str = "") -> None:
        import logging
        from types import SimpleNamespace

        from transitions import Machine  # the edge: the library that runs the table

        logging.getLogger("transitions").setLevel(logging.WARNING)  # it logs every callback at INFO
        self.member = member
        # A private model: the library's per-event methods (model.connect() ...) would
        # bypass fire() and the table's error; nobody outside can reach them here.
        self._model = SimpleNamespace(state=INITIAL.value)
        states, rows = machine_definition()
        self._machine = Machine(
            model=self._model, states=states, transitions=rows, initial=INITIAL.value,
            auto_transitions=False, ignore_invalid_triggers=False, send_event=False,
        )

    @property
    def state(self) -> str:
        return str(self._model.state)

    @property
    def current(self) -> State:
        return State(self._model.state)

    def fire(self, event: Event) -> tuple[State, State]:
        """Apply ``event``; returns (from, to). Illegal events raise and change nothing."""
        before = State(self._model.state)
        dest = next_state(before, event, self.member)  # the table decides; the library enacts
        self._model.trigger(event.value)
        after = State(self._model.state)
        if after != dest:
            raise RuntimeError(f"transitions library disagrees with the table: {before}->{after}, table says {dest}")
        return before, after
