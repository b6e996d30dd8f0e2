"""The pure core: the transition table, the live machine built from it, and recovery driven through both."""

from __future__ import annotations

import itertools
import re
from collections import deque

import pytest
from hsmfsm.core.policy import Backoff, ConnectPolicy, DegradedPolicy, ProbePolicy
from hsmfsm.core.recovery import HealthTracker, ReconnectSchedule, Verdict
from hsmfsm.core.states import (
    INITIAL,
    SERVING,
    TERMINAL,
    TRANSITIONS,
    Event,
    IllegalTransition,
    SlotMachine,
    State,
    machine_definition,
    next_state,
)
from hypothesis import assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

S, E = State, Event


def shortest_paths(start: State) -> dict[State, list[Event]]:
    """BFS over :data:`TRANSITIONS`: for each reachable state, a shortest list of events from ``start``."""
    paths: dict[State, list[Event]] = {start: []}
    queue = deque([start])
    while queue:
        src = queue.popleft()
        for (s, ev), dst in TRANSITIONS.items():
            if s == src and dst not in paths:
                paths[dst] = [*paths[src], ev]
                queue.append(dst)
    return paths


PATHS = shortest_paths(INITIAL)


def machine_in(state: State, member: str = "") -> SlotMachine:
    """A fresh machine driven into ``state`` by legal events only."""
    m = SlotMachine(member)
    for ev in PATHS[state]:
        m.fire(ev)
    assert m.current == state
    return m


# --------------------------------------------------------------------------- (a) every (state, event) pair

PAIRS = list(itertools.product(State, Event))


@pytest.mark.parametrize(("state", "event"), PAIRS, ids=[f"{s}-{e}" for s, e in PAIRS])
def test_every_pair_follows_the_table(state: State, event: Event) -> None:
    m = machine_in(state, member="slot-7")
    if (state, event) in TRANSITIONS:
        dest = TRANSITIONS[(state, event)]
        assert m.fire(event) == (state, dest)
        assert m.current == dest
        assert m.state == dest.value  # the attribute the transitions library writes
        return
    with pytest.raises(IllegalTransition) as info:
        m.fire(event)
    err = info.value
    assert (err.state, err.event, err.member) == (state, event, "slot-7")
    message = str(err)
    assert message.startswith("slot-7: ")
    head = message.split("(allowed")[0]  # the allowed list may name other events containing this one
    assert re.search(rf"\b{event.value}\b", head), message
    assert re.search(rf"\b{state.value}\b", head), message
    assert m.current == state


def test_pairs_cover_the_whole_table() -> None:
    """The parametrisation above exercises every row, and the table names only real states and events."""
    assert set(TRANSITIONS) <= set(PAIRS)
    assert all(isinstance(dst, State) for dst in TRANSITIONS.values())


def test_next_state_agrees_with_the_table() -> None:
    for state, event in PAIRS:
        if (state, event) in TRANSITIONS:
            assert next_state(state, event) == TRANSITIONS[(state, event)]
        else:
            with pytest.raises(IllegalTransition):
                next_state(state, event)


def test_live_machine_offers_exactly_the_table_triggers() -> None:
    m = SlotMachine()
    for state in State:
        expected = {ev.value for (s, ev) in TRANSITIONS if s == state}
        assert set(m._machine.get_triggers(state.value)) == expected, state


# --------------------------------------------------------------------------- (b) structural invariants


def test_failed_is_left_only_by_reset() -> None:
    exits = {ev for (s, ev), dst in TRANSITIONS.items() if s in TERMINAL and dst != s}
    assert exits == {E.RESET}
    assert TERMINAL == {S.FAILED}


def test_every_state_reachable_from_initial() -> None:
    assert INITIAL == S.DISCONNECTED
    assert set(PATHS) == set(State)


@pytest.mark.parametrize("state", sorted(set(State) - TERMINAL))
def test_logged_in_reachable_from_every_non_terminal_state(state: State) -> None:
    assert S.LOGGED_IN in shortest_paths(state)


def test_machine_definition_has_no_auto_transitions() -> None:
    states, rows = machine_definition()
    assert states == [s.value for s in State]
    assert not any(r["trigger"].startswith("to_") for r in rows)
    assert {(S(r["source"]), E(r["trigger"])): S(r["dest"]) for r in rows} == TRANSITIONS
    m = SlotMachine()
    assert not [s for s in State if hasattr(m, f"to_{s.value}")]


# --------------------------------------------------------------------------- (c) stateful: machine + recovery


class Recovery(RuleBasedStateMachine):
    """A SlotMachine run by a toy supervisor with a ReconnectSchedule and a HealthTracker.

    ``model`` is the state computed from :data:`TRANSITIONS` alone; random
    events (legal or not) are fired besides the supervisor's own steps. The
    supervisor follows the recovery contract: it records connect failures,
    gives up when the schedule says so, resets the schedule on login and on
    ``reset``, resets the tracker on every login, and fires verdict events.
    """

    @initialize(
        backoff=st.builds(
            Backoff,
            initial=st.floats(0.0, 2.0),
            multiplier=st.floats(1.0, 4.0),
            max=st.floats(0.0, 10.0),
            jitter=st.floats(0.0, 1.0),
        ),
        max_attempts=st.none() | st.integers(1, 4),
        enter=st.integers(1, 3),
        leave=st.integers(1, 3),
        healthy=st.integers(1, 3),
        unhealthy=st.integers(1, 4),
    )
    def setup(
        self, backoff: Backoff, max_attempts: int | None, enter: int, leave: int, healthy: int, unhealthy: int
    ) -> None:
        self.now = 0.0
        self.rand = 0.5
        self.backoff = backoff
        self.machine = SlotMachine("m")
        self.model = INITIAL
        self.schedule = ReconnectSchedule(ConnectPolicy(backoff, max_attempts), lambda: self.rand)
        self.max_attempts = max_attempts
        self.tracker = HealthTracker(
            DegradedPolicy(slow_call=1.0, enter_after=enter, leave_after=leave),
            ProbePolicy(unhealthy_after=unhealthy, healthy_after=healthy),
        )
        self.last_health: Verdict | None = None  # last IMPAIRED/HEALTHY since the tracker's reset
        self.gave_up = False  # give_up fired and no reset since

    # -- firing, checked against the model

    def fire(self, event: Event) -> bool:
        """Fire ``event``; check it against the table; apply the supervisor's side effects."""
        before = self.model
        legal = (before, event) in TRANSITIONS
        if not legal:
            with pytest.raises(IllegalTransition):
                self.machine.fire(event)
            assert self.machine.current == before
            return False
        assert not self.gave_up or event == E.RESET, "failed left by something other than reset"
        self.model = TRANSITIONS[(before, event)]
        assert self.machine.fire(event) == (before, self.model)
        if event == E.GIVE_UP:
            self.gave_up = True
        elif event == E.RESET:
            self.gave_up = False
            self.schedule.reset()
        if before not in SERVING and self.model in SERVING:  # a new login
            self.schedule.succeeded()
            self.tracker.reset()
            self.last_health = None
        return True

    @rule(event=st.sampled_from(Event))
    def random_event(self, event: Event) -> None:
        # While serving, the tracker owns impaired/healthy; elsewhere they are illegal and worth firing.
        assume(not (event in (E.IMPAIRED, E.HEALTHY) and self.model in SERVING))
        self.fire(event)

    @rule(dt=st.floats(0.0, 20.0))
    def advance(self, dt: float) -> None:
        self.now += dt

    # -- the supervisor's connect loop

    @precondition(lambda self: self.model == S.DISCONNECTED)
    @rule()
    def connect_when_due(self) -> None:
        if self.schedule.due(self.now):
            assert self.fire(E.CONNECT)
        else:
            assert self.schedule.next_at is not None and self.now < self.schedule.next_at

    @precondition(lambda self: self.model == S.CONNECTING)
    @rule(rand=st.floats(0.0, 1.0, exclude_max=True))
    def attempt_fails(self, rand: float) -> None:
        self.rand = rand
        attempts = self.schedule.attempts
        at = self.schedule.failed(self.now)
        assert self.schedule.attempts == attempts + 1
        assert (at is None) == (self.schedule.attempts == self.max_attempts)  # gives up exactly at the limit
        if at is None:
            assert self.fire(E.GIVE_UP)
            assert self.machine.current == S.FAILED
        else:
            assert self.now <= at <= self.now + self.backoff.max * (1 + self.backoff.jitter)
            assert self.schedule.next_at == at
            assert self.fire(E.CONNECT_FAILED)

    @precondition(lambda self: self.model in (S.CONNECTING, S.OPEN))
    @rule()
    def attempt_progresses(self) -> None:
        assert self.fire(E.SESSION_OPENED if self.model == S.CONNECTING else E.LOGIN_OK)

    @rule()
    def kick(self) -> None:
        attempts, gave_up = self.schedule.attempts, self.schedule.gave_up
        self.schedule.kick(self.now)
        assert self.schedule.attempts == attempts
        assert self.schedule.due(self.now) == (not gave_up)

    # -- health observations, only while serving

    def observe(self, verdict: Verdict) -> None:
        if verdict is Verdict.HEALTHY:
            assert self.last_health is Verdict.IMPAIRED, "HEALTHY twice without IMPAIRED in between"
            self.last_health = verdict
            assert self.fire(E.HEALTHY)
        elif verdict is Verdict.IMPAIRED:
            assert self.last_health is not Verdict.IMPAIRED, "IMPAIRED reported twice in a row"
            self.last_health = verdict
            assert self.fire(E.IMPAIRED)
        elif verdict is Verdict.UNHEALTHY:
            assert self.fire(E.CONNECTION_LOST)

    @precondition(lambda self: self.model in SERVING)
    @rule(duration=st.sampled_from([0.0, 0.5, 1.0, 1.5, 10.0]))
    def call_ok(self, duration: float) -> None:
        self.observe(self.tracker.call_ok(duration))

    @precondition(lambda self: self.model in SERVING)
    @rule()
    def call_impaired(self) -> None:
        self.observe(self.tracker.call_impaired())

    @precondition(lambda self: self.model in SERVING)
    @rule()
    def probe_ok(self) -> None:
        self.observe(self.tracker.probe_ok())

    @precondition(lambda self: self.model in SERVING)
    @rule()
    def probe_failed(self) -> None:
        self.observe(self.tracker.probe_failed())

    # -- invariants

    @invariant()
    def machine_matches_model(self) -> None:
        assert self.machine.current == self.model

    @invariant()
    def given_up_means_failed(self) -> None:
        if self.gave_up:
            assert self.model == S.FAILED
        if self.schedule.gave_up:
            assert self.model == S.FAILED
            assert not self.schedule.due(self.now)

    @invariant()
    def tracker_agrees_with_degraded(self) -> None:
        if self.model in SERVING:
            assert self.tracker.impaired == (self.model == S.DEGRADED)

    @invariant()
    def next_at_within_one_backoff(self) -> None:
        at = self.schedule.next_at
        if at is not None:
            assert at <= self.now + self.backoff.max * (1 + self.backoff.jitter)


Recovery.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestRecovery = Recovery.TestCase
