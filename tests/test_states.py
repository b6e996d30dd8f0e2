"""The pure core: the transition table, the live machine built from it, and recovery driven through both."""

from __future__ import annotations

import itertools
import re
from collections import deque

import pytest
from hsmfsm import HSMError, SlotConnection, load_policy
from hsmfsm.core import rules
from hsmfsm.core.codes import CALL_TIMEOUT, code_from_name
from hsmfsm.core.policy import Policy
from hsmfsm.core.states import (
    INITIAL,
    TERMINAL,
    TRANSITIONS,
    Event,
    IllegalTransition,
    SlotMachine,
    State,
    machine_definition,
    next_state,
)
from hsmfsm.testing import ScriptedHSM, ScriptedModule, VirtualClock
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

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


# --------------------------------------------------------------------------- (c) stateful: the production code


def _events_the_rule_book_allows(policy: Policy, code_name: str | None) -> set[Event]:
    """Every event the rule-book lets a record with this code carry, in any phase."""
    if code_name is None:  # the supervisor's steps, the application, slow calls, healthy streaks
        return {E.CONNECT, E.SESSION_OPENED, E.CLOSE, E.RESET, E.FORKED, E.HEALTHY, E.IMPAIRED, E.FATAL}
    if code_name == CALL_TIMEOUT.name:
        allowed = {E.CALL_TIMEOUT}
    else:
        allowed = set()
    code = code_from_name(code_name)
    klass = policy.codes.get(code.name, policy.default_class)
    for phase in rules.Phase:
        react = rules.reaction(policy, phase, klass)
        allowed |= set(rules.COUNT_EVENTS.get(react, ()))
        if react in rules.REACTION_EVENT:
            allowed.add(rules.REACTION_EVENT[react])
    if code.value in rules.LOGIN_OK_VALUES:
        allowed.add(E.LOGIN_OK)
    allowed.add(E.GIVE_UP)  # carries the last attempt's code
    return allowed


class ProductionRecovery(RuleBasedStateMachine):
    """The production SlotConnection, supervisor, watchdog and rule-book, under random faults.

    The HSM is a :class:`ScriptedHSM` on a :class:`VirtualClock`: hypothesis drives
    faults, time and calls; nothing here re-implements the supervisor. Checked:
    every record is a row of the table and carries an event the rule-book gives
    its code in some phase; a wrong PIN is tried once until reset; and once the
    faults stop, the connection always comes back and signs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = VirtualClock(seed=7)
        self.hsm = ScriptedHSM(label="tok", pin="1234")
        self.pin = "1234"
        self.policy = load_policy("network-hsm")
        self.records: list = []
        self.conn = SlotConnection(ScriptedModule(self.hsm, self.clock, name="m"), "tok", lambda: self.pin,
                                   self.policy, name="m", clock=self.clock)
        self.conn.add_listener(self.records.append)
        self.wrong_logins = 0
        self.conn.open(wait=5.0)

    @rule(kind=st.sampled_from(["down", "up", "hang", "resume", "restart", "logout_all"]))
    def fault(self, kind: str) -> None:
        getattr(self.hsm, kind)()

    @rule(function=st.sampled_from(["sign", "open_session", "login", "session_state", "initialize", "find_token",
                                    "find_key"]),
          code=st.sampled_from(["CKR_DEVICE_ERROR", "CKR_SESSION_HANDLE_INVALID", "CKR_USER_NOT_LOGGED_IN",
                                "CKR_DEVICE_MEMORY", "CKR_GENERAL_ERROR", "CKR_TOKEN_NOT_PRESENT",
                                "CKR_OPERATION_ACTIVE", "CKR_VENDOR_DEFINED+0x7"]),
          times=st.integers(1, 3))
    def fail(self, function: str, code: str, times: int) -> None:
        self.hsm.fail(function, code, times)

    @rule(dt=st.sampled_from([0.01, 0.1, 0.5, 2.0, 10.0]))
    def advance(self, dt: float) -> None:
        self.clock.sleep(dt)

    @rule()
    def sign(self) -> None:
        try:
            signature = self.conn.sign("rsa", b"data", "SHA256_RSA_PKCS")
        except HSMError:
            return
        assert self.hsm.verify_signature("rsa", b"data", signature, "SHA256_RSA_PKCS")

    @rule()
    def break_the_pin(self) -> None:
        self.pin = "0000"

    @precondition(lambda self: self.conn.state is S.FAILED)
    @rule()
    def fix_the_pin_and_reset(self) -> None:
        self.pin = "1234"
        self.conn.reset()

    @invariant()
    def records_follow_the_table_and_the_rule_book(self) -> None:
        for r in self.records:
            assert TRANSITIONS[(r.source, r.event)] == r.dest, r
            assert r.event in _events_the_rule_book_allows(self.policy, r.code_name), r

    @invariant()
    def a_wrong_pin_is_tried_once(self) -> None:
        rejected = [c for c in self.hsm.calls if c.function == "login" and c.outcome == "CKR_PIN_INCORRECT"]
        resets = sum(1 for r in self.records if r.event is E.RESET)
        assert len(rejected) <= resets + 1, (len(rejected), resets)

    def teardown(self) -> None:
        try:
            self.hsm.clear_faults()
            self.hsm.resume()
            self.hsm.up()
            self.pin = "1234"
            if self.conn.state is S.FAILED:
                self.conn.reset()
            self.clock.sleep(30.0)
            assert self.conn.state is S.LOGGED_IN, self.records[-5:]
            assert self.hsm.verify_signature("rsa", b"end", self.conn.sign("rsa", b"end", "SHA256_RSA_PKCS"),
                                             "SHA256_RSA_PKCS")
            self.conn.close()
        finally:
            self.clock.close()


ProductionRecovery.TestCase.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)
TestProductionRecovery = ProductionRecovery.TestCase
