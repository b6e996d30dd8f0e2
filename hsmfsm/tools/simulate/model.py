"""What a simulation is made of: the fault schedule it follows, and what it records.

Plain values, no clock and no threads: :mod:`.run` executes a
:func:`schedule` and fills an :class:`Outcome`; :mod:`.report` reads one.
Times are virtual seconds from the start of the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config.scenario_file import LASTING, Fault, Scenario

#: An action's step: a fault starts, or a lasting fault (down, hang, slow) is undone.
START, END = "start", "end"


@dataclass(frozen=True, slots=True)
class Occurrence:
    """One occurrence of a fault on one member: from ``start`` to ``end`` (equal for an instant fault)."""

    fault: Fault
    member: str
    number: int  # 0 for the first occurrence of a repeated fault
    start: float
    end: float

    @property
    def lasting(self) -> bool:
        return self.fault.kind in LASTING


@dataclass(frozen=True, slots=True)
class Action:
    """One step of the fault schedule: at ``at``, ``step`` the occurrence on its member."""

    at: float
    step: str
    occurrence: Occurrence


def occurrences(scenario: Scenario) -> list[Occurrence]:
    """Every occurrence of every fault on every member it hits, in time order (ties: file order, then
    the members' order). A wrong PIN is there from the start."""
    order = {name: index for index, name in enumerate(scenario.members)}
    found = []
    for fault in scenario.faults:
        for number, start in enumerate(fault.starts()):
            end = start + (fault.duration or 0.0) if fault.kind in LASTING else start
            found += [Occurrence(fault, member, number, start, end) for member in fault.members]
    found.sort(key=lambda o: (o.start, o.fault.index, order[o.member], o.number))
    return found


def schedule(scenario: Scenario) -> list[Action]:
    """The actions to apply, in the order to apply them: by time; at one instant, what ends before what
    starts (a fault that ends at 15s and one that starts at 15s do not overlap), then in file order.
    A wrong PIN is no action: the member's HSM is made with another PIN."""
    actions = []
    for o in occurrences(scenario):
        if o.fault.kind == "wrong_pin":
            continue
        actions.append(Action(o.start, START, o))
        if o.lasting:
            actions.append(Action(o.end, END, o))
    order = {name: index for index, name in enumerate(scenario.members)}
    actions.sort(key=lambda a: (a.at, 0 if a.step == END else 1, a.occurrence.fault.index,
                                order[a.occurrence.member], a.occurrence.number))
    return actions


@dataclass(frozen=True, slots=True)
class Transition:
    """One transition record, at virtual time ``t``."""

    t: float
    member: str
    source: str
    dest: str
    event: str
    code: str | None
    code_value: int | None


@dataclass(frozen=True, slots=True)
class Mark:
    """A pool's suspicion of a member set (``suspected``) or taken away (``cleared``), at virtual time
    ``t``: not a transition (the member keeps its state), shown in the timeline beside them."""

    t: float
    member: str
    kind: str
    operation: str | None
    elapsed: float | None
    limit: float | None
    reason: str


@dataclass(frozen=True, slots=True)
class FailedCall:
    """A workload call that raised: when it started and ended, and what it raised."""

    started: float
    ended: float
    thread: int
    operation: str
    error: str  # the exception's class name (HSMError subclasses; anything else is a bug to report)
    member: str  # the member (or, for AllMembersDown, the pool) the error names
    code: str | None
    state: str | None
    message: str


@dataclass
class Outcome:
    """What one run recorded, before any analysis."""

    scenario: Scenario
    timeline: list[Transition] = field(default_factory=list)
    #: The pool's suspicion marks (``operations.suspicion``), in time order.
    marks: list[Mark] = field(default_factory=list)
    failures: list[FailedCall] = field(default_factory=list)
    calls: int = 0
    ok: int = 0
    #: Calls that returned, but not what the HSM should have answered (a signature that does not verify...).
    wrong: int = 0
    slowest: float = 0.0
    #: C_Login calls each member's connection made (``SlotConnection.login_attempts``).
    logins: dict[str, int] = field(default_factory=dict)
    #: Each member's state when the last call had returned.
    final_states: dict[str, str] = field(default_factory=dict)
    #: When the last call had returned (the run's ``duration``, or later when calls were in flight then).
    ended: float = 0.0
    #: Exceptions that escaped the runtime's own threads: bugs, reported, never hidden.
    internal_errors: list[str] = field(default_factory=list)
