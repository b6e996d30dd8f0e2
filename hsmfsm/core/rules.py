"""The rule-book: what every return code does, in every phase, under a policy.

The constitution of recovery, in the manner of h11's ``_state.py``: the
connection, the pool, the diagrams and the simulator all ask this module
what a code means, and none of them decides it again. ``states.py`` says
which transitions exist; this module says which one a code takes, what the
caller is told, and whether the call may go again.

A code reaches the runtime in one of four **phases**:

- ``call``: a caller's operation (C_Sign, C_Decrypt, ...) on a leased session.
- ``connect``: the supervisor's attempt to reach the token: C_Initialize,
  finding the token, opening the anchor session.
- ``login``: the attempt's one C_Login.
- ``probe``: the supervisor's health probe of an idle, serving connection.

A policy sorts codes into classes, and each class names an event (``classes``
in the YAML). The phase turns that into a **reaction**, derived from the
class's event by :func:`derived_reaction` unless the policy's ``reactions``
section says otherwise for that phase and class. The shipped ``default``
policy writes every derived reaction out, so the file says what the code
does.

Facts that are not policy (they are what the HSM's answer means) also live
here: a login answered CKR_USER_ALREADY_LOGGED_IN succeeded; a probe that
finds the session without a user is CKR_USER_NOT_LOGGED_IN; a call the
watchdog cut off fires ``call_timeout`` whichever thread records it first.

Suspicion (:func:`decide_suspicion`) is a pool's mark on a member, not a
state: it fires no event and changes no session. A member whose idempotent
call runs past its limit (``hsmfsm.core.latency``) while another member
serves that answers sooner is suspected; it gets no new calls while another
member serves; its idempotent calls in flight are cut off and re-issued
elsewhere (:func:`may_cut_on_suspicion`; such a call fails with
``HSMFSM_SUSPECTED`` in :func:`decide_call`, with no transition); its first
answer takes the mark away. A member that stays silent meets the watchdog at
the call timeout, as without suspicion.

Pure: no I/O, no clock, no threads, no python-pkcs11.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum

from .codes import CALL_TIMEOUT, CKR, SUSPECTED, Code
from .errors import CallTimeout, HSMError, LoginRejected, MemberUnavailable, OperationFailed, OutcomeUnknown
from .policy import CodeClass, Policy
from .recovery import Verdict
from .states import TRANSITIONS, Event, State


class Phase(StrEnum):
    CALL = "call"
    CONNECT = "connect"
    LOGIN = "login"
    PROBE = "probe"


class Reaction(StrEnum):
    """What a phase does with a class of codes. Most are events; three are counts."""

    CONNECTION_LOST = "connection_lost"  #: reconnect from scratch (C_Finalize + C_Initialize)
    SESSION_LOST = "session_lost"  #: open a new session
    LOGIN_LOST = "login_lost"  #: log in again
    FATAL = "fatal"  #: stop until a person calls reset()
    IMPAIRED = "impaired"  #: call: count an impaired call; ``degraded`` at ``degraded.enter_after``
    NONE = "none"  #: call: no transition; the caller's own mistake
    CONNECT_FAILED = "connect_failed"  #: connect: the attempt failed; back off, give up after max_attempts
    PROBE_FAILED = "probe_failed"  #: probe: count a failed probe; degraded, then lost at unhealthy_after


#: The reactions a policy may write for each phase (``policy.schema.json`` says the same).
ALLOWED: dict[Phase, tuple[Reaction, ...]] = {
    Phase.CALL: (Reaction.CONNECTION_LOST, Reaction.SESSION_LOST, Reaction.LOGIN_LOST, Reaction.FATAL,
                 Reaction.IMPAIRED, Reaction.NONE),
    Phase.CONNECT: (Reaction.CONNECT_FAILED, Reaction.FATAL),
    Phase.LOGIN: (Reaction.CONNECTION_LOST, Reaction.SESSION_LOST, Reaction.FATAL),
    Phase.PROBE: (Reaction.CONNECTION_LOST, Reaction.SESSION_LOST, Reaction.LOGIN_LOST, Reaction.FATAL,
                  Reaction.PROBE_FAILED),
}

#: The states in which each phase's answer can arrive: where its edges start in the diagrams.
#: A call or a probe starts while serving, but can answer after another thread's
#: ``login_lost`` moved the connection to ``open`` (which keeps the generation, so the
#: answer still counts): their reactions start from ``open`` too.
PHASE_STATES: dict[Phase, tuple[State, ...]] = {
    Phase.CALL: (State.OPEN, State.LOGGED_IN, State.DEGRADED),
    Phase.CONNECT: (State.CONNECTING,),
    Phase.LOGIN: (State.OPEN,),
    Phase.PROBE: (State.OPEN, State.LOGGED_IN, State.DEGRADED),
}

#: The event each reaction fires directly (counts fire later, when a threshold is crossed).
REACTION_EVENT: dict[Reaction, Event] = {
    Reaction.CONNECTION_LOST: Event.CONNECTION_LOST,
    Reaction.SESSION_LOST: Event.SESSION_LOST,
    Reaction.LOGIN_LOST: Event.LOGIN_LOST,
    Reaction.FATAL: Event.FATAL,
    Reaction.CONNECT_FAILED: Event.CONNECT_FAILED,
}

#: The events a counted reaction can lead to: impaired calls and failed probes cross
#: ``degraded.enter_after`` (impaired); failed probes cross ``probe.unhealthy_after`` (connection_lost).
COUNT_EVENTS: dict[Reaction, tuple[Event, ...]] = {
    Reaction.IMPAIRED: (Event.IMPAIRED,),
    Reaction.PROBE_FAILED: (Event.IMPAIRED, Event.CONNECTION_LOST),
    Reaction.CONNECT_FAILED: (Event.CONNECT_FAILED, Event.GIVE_UP),
    Reaction.NONE: (),
}

#: What a health verdict (``recovery.HealthTracker``) fires.
VERDICT_EVENT: dict[Verdict, Event | None] = {
    Verdict.NONE: None,
    Verdict.IMPAIRED: Event.IMPAIRED,
    Verdict.HEALTHY: Event.HEALTHY,
    Verdict.UNHEALTHY: Event.CONNECTION_LOST,
}

#: C_Login answers that mean the login we wanted is there.
LOGIN_OK_VALUES: frozenset[int] = frozenset({CKR["CKR_OK"], CKR["CKR_USER_ALREADY_LOGGED_IN"]})
#: The code a probe reports when C_GetSessionInfo succeeds but no user is logged in any more.
NOT_LOGGED_IN = Code("CKR_USER_NOT_LOGGED_IN", CKR["CKR_USER_NOT_LOGGED_IN"])
#: C_GetSessionInfo states that mean "a user is logged in" (CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS).
USER_SESSION_STATES: frozenset[int] = frozenset({1, 3})


def derived_reaction(phase: Phase, event: Event | None) -> Reaction:
    """The reaction of ``phase`` to a class whose event is ``event``, when the policy says nothing.

    - call: the class's event (``none``: no transition).
    - connect: ``fatal`` stays fatal; anything else fails the attempt, which backs off.
    - login: ``fatal`` and ``session_lost`` keep their meaning; anything else is
      ``connection_lost`` (a login that fails for a reason nobody classified is
      not trusted to leave the module in a usable state).
    - probe: the events that name a loss keep their meaning; ``impaired`` and
      ``none`` count as a failed probe.
    """
    if phase is Phase.CALL:
        return Reaction(event.value) if event is not None else Reaction.NONE
    if event is Event.FATAL:
        return Reaction.FATAL
    if phase is Phase.CONNECT:
        return Reaction.CONNECT_FAILED
    if phase is Phase.LOGIN:
        return Reaction.SESSION_LOST if event is Event.SESSION_LOST else Reaction.CONNECTION_LOST
    if event in (Event.CONNECTION_LOST, Event.SESSION_LOST, Event.LOGIN_LOST):
        return Reaction(event.value)
    return Reaction.PROBE_FAILED


def reaction(policy: Policy, phase: Phase, class_name: str) -> Reaction:
    """The reaction of ``phase`` to the class ``class_name`` under ``policy``."""
    explicit = policy.reactions.get(phase.value, {}).get(class_name)
    if explicit is not None:
        return Reaction(explicit)
    return derived_reaction(phase, policy.classes[class_name].event)


@dataclass(frozen=True, slots=True)
class Decision:
    """What the runtime is to do about one code in one phase.

    - ``event``: fire it now (if the state accepts it; otherwise it is recorded as ignored).
    - ``count``: feed the health tracker (``impaired``, ``probe_failed``) or the reconnect
      schedule (``connect_failed``) first; the event then comes from their answer.
    - ``error``: the error class the caller or the failure record gets; ``None`` for a call
      means: wait for recovery and re-issue it here.
    - ``reissue``, ``may_have_acted``: carried by that error, for the pool.
    - ``reason``: the words after the operation's name in the error message.
    - ``link_only``: the failure was one new link's alone (:func:`link_failure`): the member keeps
      its state and its last code; the runtime counts it as a link failure.
    """

    phase: Phase
    code: Code
    code_class: str
    reaction: Reaction
    event: Event | None = None
    count: Reaction | None = None
    error: type[HSMError] | None = None
    reissue: bool = False
    may_have_acted: bool = True
    reason: str = ""
    link_only: bool = False


def _class(policy: Policy, code: Code) -> tuple[str, CodeClass]:
    klass = policy.class_of(code)
    return klass.name, klass


def decide_call(policy: Policy, code: Code, *, operation: str, timed_out: bool, sent: bool = True,
                in_pool: bool = False, reissues: int = 0, deadline_passed: bool = False,
                abandoned: bool = False, link_only: bool = False) -> Decision:
    """A caller's operation failed with ``code``. ``sent``: the request may have reached the HSM.

    ``timed_out``: the watchdog cut the call off. ``in_pool``: the connection is a pool
    member, which raises at once so the pool goes elsewhere instead of waiting here.
    ``abandoned``: the call was cut off because its member became suspected
    (:func:`decide_suspicion`): whatever the module answered (the cut's own error), it
    is no news about the member, which keeps its state; the pool re-issues the call.
    ``link_only``: nothing was sent; the call's new link (a session of its own over
    p11-kit-client: C_Initialize, the token, the session) could not be set up, and that is the
    link's failure alone (:func:`is_link_failure`, :func:`link_failure`).
    """
    name, klass = _class(policy, code)
    idempotent = policy.is_idempotent(operation)
    unknown = sent and not idempotent
    timeout = policy.operations.call_timeout
    if abandoned and not timed_out:
        if unknown:  # never cut (may_cut_on_suspicion), but should one be: its outcome is unknown
            return Decision(Phase.CALL, SUSPECTED, "", Reaction.NONE, None, error=OutcomeUnknown,
                            may_have_acted=True, reason="was cut off (its member is suspected) after it may "
                                                        "have reached the HSM; not re-issued: the outcome is unknown")
        return Decision(Phase.CALL, SUSPECTED, "", Reaction.NONE, None, error=MemberUnavailable, reissue=True,
                        may_have_acted=sent, reason="was cut off: its member is suspected (slower than its own "
                                                    "recent calls while another member serves)")
    if link_only and not timed_out and not sent:
        return link_failure(policy, Phase.CALL, code, in_pool=in_pool, deadline_passed=deadline_passed)
    if timed_out:
        # The watchdog cut this call off and records call_timeout; whichever thread gets
        # there first, the record says the same thing.
        if unknown:
            return Decision(Phase.CALL, code, name, Reaction.CONNECTION_LOST, Event.CALL_TIMEOUT,
                            error=OutcomeUnknown, may_have_acted=True,
                            reason=f"overran the call timeout of {timeout:g}s and was cut off after it may "
                                   "have reached the HSM; not re-issued: the outcome is unknown")
        return Decision(Phase.CALL, code, name, Reaction.CONNECTION_LOST, Event.CALL_TIMEOUT,
                        error=CallTimeout, reissue=True, may_have_acted=sent,
                        reason=f"overran the call timeout of {timeout:g}s and was cut off")
    react = reaction(policy, Phase.CALL, name)
    event = REACTION_EVENT.get(react)
    count = react if react is Reaction.IMPAIRED else None
    base = Decision(Phase.CALL, code, name, react, event, count)
    if react is Reaction.NONE or not klass.reissue:
        return _with(base, OperationFailed, False, klass.may_have_acted and sent, "failed")
    if unknown and klass.may_have_acted:
        return _with(base, OutcomeUnknown, False, True,
                     "failed after it may have reached the HSM; not re-issued: the outcome is unknown")
    if in_pool:
        return _with(base, MemberUnavailable, True, sent and klass.may_have_acted, "failed")
    if reissues >= policy.operations.max_reissues:
        return _with(base, OperationFailed, False, sent and klass.may_have_acted, f"failed after {reissues} re-issues")
    if deadline_passed:
        return _with(base, MemberUnavailable, False, sent and klass.may_have_acted,
                     f"deadline of {policy.operations.deadline:g}s passed")
    return base


def _with(d: Decision, error: type[HSMError], reissue: bool, may_have_acted: bool, reason: str) -> Decision:
    return Decision(d.phase, d.code, d.code_class, d.reaction, d.event, d.count, error, reissue, may_have_acted,
                    reason, d.link_only)


def decide_connect(policy: Policy, code: Code) -> Decision:
    """A connect attempt (C_Initialize, the token, the anchor session) failed with ``code``.

    ``connect_failed`` counts an attempt: the runtime asks the reconnect schedule,
    which answers ``give_up`` once ``connect.max_attempts`` ran out.
    """
    name, _ = _class(policy, code)
    react = reaction(policy, Phase.CONNECT, name)
    if react is Reaction.FATAL:
        return Decision(Phase.CONNECT, code, name, react, Event.FATAL, error=MemberUnavailable,
                        may_have_acted=False, reason="the policy treats this as fatal")
    return Decision(Phase.CONNECT, code, name, react, None, count=Reaction.CONNECT_FAILED,
                    error=MemberUnavailable, may_have_acted=False)


#: The failed set-up of a member's new link that is the member's, counting those in a row with no
#: answer from the member between them: the earlier ones are the links' alone (:func:`is_link_failure`).
LINK_FAILURES_IN_A_ROW = 3


def is_link_failure(*, failures_before: int) -> bool:
    """Whether a new link's failed set-up is that link's alone (:func:`link_failure`), not the
    member's, given ``failures_before`` such failures in a row with no answer from the member
    between them (a call, a probe, a link set up): the :data:`LINK_FAILURES_IN_A_ROW`-th is the
    member's. A healthy member's other
    links answer all the time, so a stray failure (1 in 100 on SoftHSM) never reaches three in
    a row; a member that is gone (its server refuses connects: each new link finds no token, in
    a millisecond) does at once, and its third failure is the member's, as any loss: a pool takes
    it out, a lone connection waits for its recovery within the caller's deadline."""
    return failures_before + 1 < LINK_FAILURES_IN_A_ROW


def link_failure(policy: Policy, phase: Phase, code: Code, *, in_pool: bool,
                 deadline_passed: bool = False) -> Decision:
    """A new link of a member (one more session over a module whose sessions each need a socket
    of their own) failed its set-up with ``code``, and it is that link's failure alone
    (:func:`is_link_failure`: not yet :data:`LINK_FAILURES_IN_A_ROW` in a row).

    Then there is no event, and the call goes again (the pool's next member; on a lone
    connection, another session here, within its deadline) with nothing sent: not a re-issue
    (``max_reissues`` counts calls sent again), and bounded by :func:`is_link_failure`. Measured on SoftHSM behind
    `p11-kit server` (docs/FACTS.md): each link is a server process of its own, each C_Login
    rewrites the token's file, and about 1 in 100 new links set up while others log in read it
    torn (HSMFSM_NO_SUCH_TOKEN, CKR_GENERAL_ERROR) on a member that is healthy throughout.
    A login the policy treats as fatal (a wrong PIN) is never a link's alone: see
    :func:`decide_login`.
    """
    name, _ = _class(policy, code)
    base = Decision(phase, code, name, Reaction.NONE, None, may_have_acted=False, link_only=True)
    reason = f"found no free session: a new link's set-up failed with {code}, the member answering otherwise"
    if in_pool:
        return _with(base, MemberUnavailable, True, False, reason)
    if deadline_passed:
        return _with(base, MemberUnavailable, False, False,
                     f"{reason}; the deadline of {policy.operations.deadline:g}s passed")
    return base


def decide_login(policy: Policy, code: Code, *, timed_out: bool, link_only: bool = False) -> Decision:
    """The attempt's one C_Login answered ``code`` (``timed_out``: the watchdog cut it off).

    ``link_only``: the login of one more link, whose failure would be that link's alone
    (:func:`is_link_failure`): a code the policy treats as fatal (the PIN refused) is the
    member's as ever; any other is that link's alone (:func:`link_failure`)."""
    name, _ = _class(policy, code)
    if not timed_out and code.value in LOGIN_OK_VALUES:
        return Decision(Phase.LOGIN, code, name, Reaction.NONE, Event.LOGIN_OK, may_have_acted=False)
    if timed_out:
        return Decision(Phase.LOGIN, CALL_TIMEOUT, name, Reaction.CONNECTION_LOST, Event.CALL_TIMEOUT,
                        count=Reaction.CONNECT_FAILED, may_have_acted=False)
    react = reaction(policy, Phase.LOGIN, name)
    if react is Reaction.FATAL:
        return Decision(Phase.LOGIN, code, name, react, Event.FATAL, error=LoginRejected, may_have_acted=False,
                        reason="the HSM rejected the login; hsmfsm will not try this PIN again "
                               "(a retry can lock the token). Fix the PIN, then call reset()")
    if link_only:
        return link_failure(policy, Phase.LOGIN, code, in_pool=True)
    # Every other failed login counts as a failed attempt, so a token that keeps
    # refusing logins still runs out of connect.max_attempts.
    return Decision(Phase.LOGIN, code, name, react, REACTION_EVENT[react], count=Reaction.CONNECT_FAILED,
                    may_have_acted=False)


def decide_probe(policy: Policy, code: Code, *, timed_out: bool, session_state: int | None = None) -> Decision:
    """The health probe answered ``code`` (and, for C_GetSessionInfo, the session's state).

    A probe that succeeds has ``reaction`` ``none`` and no event: the runtime reports it
    to the health tracker, whose verdict (``healthy``) may fire.
    """
    if timed_out:
        name, _ = _class(policy, CALL_TIMEOUT)
        return Decision(Phase.PROBE, CALL_TIMEOUT, name, Reaction.CONNECTION_LOST, Event.CALL_TIMEOUT)
    if code.value == CKR["CKR_OK"]:
        if session_state is None or session_state in USER_SESSION_STATES:
            return Decision(Phase.PROBE, code, "", Reaction.NONE)
        code = NOT_LOGGED_IN  # the session lives but nobody is logged in any more
    name, _ = _class(policy, code)
    react = reaction(policy, Phase.PROBE, name)
    if react is Reaction.PROBE_FAILED:
        return Decision(Phase.PROBE, code, name, react, None, count=Reaction.PROBE_FAILED)
    return Decision(Phase.PROBE, code, name, react, REACTION_EVENT[react])


def counts_as_reissue(d: Decision) -> bool:
    """Whether the error of decision ``d`` counts against ``operations.max_reissues`` when a pool
    goes elsewhere after it. Not a call cut off on suspicion (our own doing, after it ran past the
    member's limit: at least the floor) nor a new link's failure (nothing sent; the
    :data:`LINK_FAILURES_IN_A_ROW`-th is the member's): on a machine slow enough to suspect both
    members in turn, those would use a call's re-issues up while both serve. The deadline bounds
    them instead."""
    return not (d.link_only or d.code is SUSPECTED)


def pool_may_reissue(error: HSMError, idempotent: bool) -> bool:
    """May a pool send a call that failed on one member with ``error`` to another?

    Only when the member said so (``reissue``), never after ``OutcomeUnknown``, and a
    non-idempotent call only when it cannot have reached the HSM.
    """
    if isinstance(error, OutcomeUnknown) or not error.reissue:
        return False
    return idempotent or not error.may_have_acted


@dataclass(frozen=True, slots=True)
class Suspicion:
    """Whether a call's overrun makes its member suspected, and why (for the record and the log)."""

    suspect: bool
    reason: str


def may_cut_on_suspicion(policy: Policy, operation: str, *, sent: bool = True) -> bool:
    """May a call of ``operation`` in flight on a suspected member be cut off and re-issued elsewhere?

    An idempotent one, always. Another only while nothing of it was sent (``sent`` False: its session
    is still being opened): a key generation cut off once sent might exist on the token already, and
    a second one elsewhere would be a duplicate (it meets the call timeout, as without suspicion).
    """
    return policy.is_idempotent(operation) or not sent


def decide_suspicion(policy: Policy, *, operation: str, elapsed: float, limit: float,
                     alternatives: Sequence[float | None]) -> Suspicion:
    """A call of ``operation`` has run ``elapsed`` seconds on a member whose limit for it is ``limit``
    (``hsmfsm.core.latency.suspicion_limit``). ``alternatives``: for each other member that serves and is
    not suspected, its own recent p99 of ``operation`` (None: too few answers to say).

    Suspected when the operation is idempotent (a slow key generation is the HSM's work, not a sign of
    trouble, and is never cut), the call is past the limit, and another member is expected to answer
    sooner than the limit (its p99 is below it, or not known yet). Without such a member, suspicion
    would only move calls to a member as slow: the member is left alone, as without suspicion.
    """
    if not policy.is_idempotent(operation):
        return Suspicion(False, f"{operation} is not idempotent: never cut off early")
    if elapsed <= limit:
        return Suspicion(False, f"{operation} has run {elapsed:.3f}s, within its limit of {limit:.3f}s")
    if not any(p99 is None or p99 < limit for p99 in alternatives):
        return Suspicion(False, f"{operation} has run {elapsed:.3f}s, past its limit of {limit:.3f}s, but no "
                                "other member serves that answers sooner")
    return Suspicion(True, f"{operation} has run {elapsed:.3f}s, past the member's limit of {limit:.3f}s "
                           "while another member serves")


@dataclass(frozen=True, slots=True)
class ReactionRow:
    """One line of the rule-book under a policy: a phase, a class, what it does, and its codes."""

    phase: Phase
    code_class: str
    reaction: Reaction
    explicit: bool  # written in the policy's ``reactions`` section (not derived)
    events: tuple[Event, ...]  # the events it can fire
    codes: tuple[str, ...]  # the codes of the class (sorted); the default class says so in ``default``
    default: bool  # the policy's default class: every code not listed


def reaction_table(policy: Policy) -> list[ReactionRow]:
    """Every (phase, class) reaction under ``policy``, in a fixed order."""
    by_class: dict[str, list[str]] = {name: [] for name in policy.classes}
    for code, klass in policy.codes.items():
        by_class.setdefault(klass, []).append(code)
    rows = []
    for phase in Phase:
        for name in sorted(policy.classes):
            react = reaction(policy, phase, name)
            events = ((REACTION_EVENT[react],) if react in REACTION_EVENT and react is not Reaction.CONNECT_FAILED
                      else COUNT_EVENTS.get(react, ()))
            rows.append(ReactionRow(phase, name, react, name in policy.reactions.get(phase.value, {}), events,
                                    tuple(sorted(by_class.get(name, []))), name == policy.default_class))
    return rows


@dataclass(frozen=True, slots=True)
class Edge:
    """A transition the runtime can take under a policy, and why: a phase and the classes whose
    codes fire it there, or (``phase`` None, ``classes`` empty) a step no return code drives,
    described in :data:`STEPS`."""

    source: State
    event: Event
    dest: State
    phase: Phase | None  # None: not driven by a code (the supervisor's own steps, the watchdog, the application)
    classes: tuple[str, ...]  # sorted; for a counted event, the classes whose codes are counted


#: The transitions no return code drives, (source, event) -> what drives them. The events
#: that a count of codes fires (``give_up``, ``impaired`` from impaired calls and failed
#: probes, ``connection_lost`` at ``probe.unhealthy_after``) are code-driven edges of the
#: phase whose codes are counted, not steps: :func:`edges` draws each once.
STEPS: dict[tuple[State, Event], str] = {
    (State.DISCONNECTED, Event.CONNECT): "supervisor: a connect attempt is due",
    (State.CONNECTING, Event.SESSION_OPENED): "connect: the token is found and the anchor session is open",
    (State.CONNECTING, Event.FATAL): "connect: the module cannot be used (missing, or its layout refused)",
    (State.OPEN, Event.LOGIN_OK): "login: C_Login answered CKR_OK or CKR_USER_ALREADY_LOGGED_IN",
    (State.OPEN, Event.FATAL): "login: the PIN cannot be read from its source",
    (State.LOGGED_IN, Event.IMPAIRED): "call: a slow call (> degraded.slow_call) makes degraded.enter_after "
                                       "impaired calls or failed probes in a row",
    (State.DEGRADED, Event.HEALTHY): "degraded.leave_after healthy calls or probe.healthy_after healthy probes",
    # Wherever the table allows them: the watchdog (any live state) and the application.
    **{(source, event): why for event, why in {
        Event.CALL_TIMEOUT: "watchdog: a call overran operations.call_timeout",
        Event.CLOSE: "the application closes the connection",
        Event.RESET: "a person resets the connection",
        Event.FORKED: "the process forked: the child abandons what it inherited",
    }.items() for source in State if (source, event) in TRANSITIONS},
}


def edges(policy: Policy, *, probe: bool = True) -> Iterator[Edge]:
    """Every transition the runtime can take under ``policy``, each once; nothing it cannot take.

    First the code-driven edges, in phase, event and source order: one per (source, event,
    phase), for every (phase, class) reaction whose class has codes (the default class always
    has), from each state where the phase runs (:data:`PHASE_STATES`) that accepts the event,
    listing the classes. Counted reactions count: ``impaired`` only enters ``degraded`` (the
    health tracker reports it once, when the count is crossed, so never ``degraded`` to
    itself); ``give_up`` only with ``connect.max_attempts`` set; ``connect_failed`` only
    when more than one attempt is allowed; ``impaired`` from probes only when
    ``probe.unhealthy_after`` leaves room for it. Then the steps of :data:`STEPS`.

    ``probe``: the connection runs the health probe (a pool member with in-call recovery does not).
    """
    # (phase, event) pairs a reaction names but the counts never produce under this policy.
    impossible: set[tuple[Phase, Event]] = set()
    limit = policy.connect.max_attempts
    if limit is None:  # the reconnect schedule never gives up
        impossible.add((Phase.CONNECT, Event.GIVE_UP))
    elif limit == 1:  # the first failed attempt is the last: give_up, never connect_failed
        impossible.add((Phase.CONNECT, Event.CONNECT_FAILED))
    if policy.probe.unhealthy_after < 2:  # the first failed probe is already unhealthy: connection_lost
        impossible.add((Phase.PROBE, Event.IMPAIRED))
    if not probe:
        impossible.update((Phase.PROBE, event) for event in Event)
    grouped: dict[tuple[Phase, Event, State], set[str]] = {}
    for row in reaction_table(policy):
        if not row.codes and not row.default:
            continue  # no code belongs to this class: nothing can fire it
        for event in row.events:
            if (row.phase, event) in impossible:
                continue
            for source in PHASE_STATES[row.phase]:
                dest = TRANSITIONS.get((source, event))
                if dest is None or (event is Event.IMPAIRED and dest is source):
                    continue
                grouped.setdefault((row.phase, event, source), set()).add(row.code_class)
    for phase in Phase:
        for event in Event:
            for source in State:
                classes = grouped.get((phase, event, source))
                if classes:
                    yield Edge(source, event, TRANSITIONS[(source, event)], phase, tuple(sorted(classes)))
    for source, event in STEPS:
        yield Edge(source, event, TRANSITIONS[(source, event)], None, ())
