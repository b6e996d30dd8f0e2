"""Recovery policies: frozen, typed values loaded from YAML.

A policy is a value, in the manner of urllib3's ``Retry``: one immutable object
holds every knob, each field documented with its default. The YAML format is
defined once, by ``hsmfsm/config/policy.schema.json`` (which editors can use to
validate policies as they are written); ``hsmfsm.config.policy_file`` checks a file
against it and builds these objects, and every error names the file, line and
field. Nothing here reads a clock or touches an HSM.

All durations are in seconds (floats). ``None`` for ``max_attempts`` means
"never give up".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .codes import Code
from .states import Event

#: Operations hsmfsm knows; a policy may declare any subset idempotent.
OPERATIONS: tuple[str, ...] = (
    "sign", "verify", "decrypt", "encrypt", "generate_random", "digest",
    "generate_keypair", "generate_key", "create_object", "destroy_object",
)


class PolicyError(ValueError):
    """A policy or pool file is wrong. The message reads ``file:line: field: what is wrong``."""

    def __init__(self, message: str, *, file: str = "", line: int | None = None, field: str = "") -> None:
        self.file, self.line, self.field = file, line, field
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before reconnect attempt *n* (1-based): ``min(max, initial * multiplier**(n-1))``,
    then spread by ``jitter`` (a fraction: 0.2 means +/-20 %) so that many
    clients do not reconnect in lockstep after an HSM restart."""

    initial: float = 0.05
    multiplier: float = 2.0
    max: float = 5.0
    jitter: float = 0.2


@dataclass(frozen=True, slots=True)
class ConnectPolicy:
    """How the connection gets (back) to ``logged_in``.

    ``max_attempts``: consecutive failed connect attempts before the connection
    gives up and goes ``failed`` (``None``: never). Counting restarts after
    every success.
    """

    backoff: Backoff = field(default_factory=Backoff)
    max_attempts: int | None = None


@dataclass(frozen=True, slots=True)
class SuspicionPolicy:
    """When a pool stops trusting a member that is slow to answer, long before the call timeout.

    A call of an idempotent operation still running after
    ``min(ceiling, max(floor, multiple * p99))``, where ``p99`` is that member's
    own 99th percentile for that operation over its last ``window`` answered
    calls, makes the member *suspected* (a pool-level mark, not a state), provided
    another member serves that is expected to answer sooner. A suspected member gets no new calls
    while another member serves, and its idempotent calls in flight are cut off
    and re-issued elsewhere at once (``hsmfsm.core.rules.decide_suspicion``). The
    first answer from it (a call, or the probe it is sent at once) takes the mark
    away; a member that stays silent is cut off at ``call_timeout`` as any other.

    - ``multiple``: how far past its own p99 a call may run. 10: a member whose
      calls take 2 ms is suspected after 20 ms (or the floor).
    - ``floor``: never sooner than this, whatever the p99 (a busy machine's
      scheduler alone delays a call by milliseconds).
    - ``ceiling``: never later than this: the longest a caller waits on a hung
      member while another one serves. Below the call timeout.
    - ``window``: how many recent answered calls per operation the p99 is taken
      over; until 32 have answered, the limit is the ceiling.
    """

    multiple: float = 10.0
    floor: float = 0.05
    ceiling: float = 1.0
    window: int = 256


@dataclass(frozen=True, slots=True)
class SessionsPolicy:
    """How many HSM sessions a member (a connection) holds open at once.

    ``max``: the logged-in session included. Callers lease one session each for
    the length of a call; one that finds every session leased waits for one,
    within its deadline. Through a module that serves one request at a time per
    link (p11-kit-client), every session gets a link (a module instance) of its own,
    so ``max`` is also how many requests a member has in flight. HSMs limit sessions
    (a YubiHSM 2 has 16 in all): leave room for the other applications.
    """

    max: int = 8


@dataclass(frozen=True, slots=True)
class OperationsPolicy:
    """How calls are made and re-issued.

    - ``idempotent``: operations that may be re-issued after a failure that may
      have reached the HSM (C_Sign, C_Verify, C_Decrypt, C_GenerateRandom are
      safe; key generation and object creation are not: the object may exist).
    - ``max_reissues``: how many times one call may be re-issued (not counting a cut on
      suspicion, nor a new link's failure: ``rules.counts_as_reissue``).
    - ``deadline``: one budget spanning every attempt of a call, including the
      wait for recovery in between. The caller gets an answer by then.
    - ``call_timeout``: a single PKCS#11 call longer than this is cut off by
      the watchdog and the connection leaves ``logged_in``.
    - ``suspicion``: in a pool, when a slow member's calls are cut off and
      re-issued elsewhere long before the call timeout (:class:`SuspicionPolicy`).
    """

    idempotent: frozenset[str] = frozenset({"sign", "verify", "decrypt", "generate_random"})
    max_reissues: int = 3
    deadline: float = 10.0
    call_timeout: float = 5.0
    suspicion: SuspicionPolicy = field(default_factory=SuspicionPolicy)


@dataclass(frozen=True, slots=True)
class ProbePolicy:
    """The background health probe, which recovers idle connections.

    ``operation``: ``session_info`` (C_GetSessionInfo: cheap, proves the
    session and login are alive), ``token_info`` (C_GetTokenInfo) or
    ``generate_random`` (a real crypto call). ``unhealthy_after``
    consecutive failures declare the connection lost; fewer mark it
    ``degraded``. ``healthy_after`` consecutive successes leave ``degraded``.
    """

    interval: float = 1.0
    operation: str = "session_info"
    unhealthy_after: int = 2
    healthy_after: int = 2


@dataclass(frozen=True, slots=True)
class DegradedPolicy:
    """When a serving connection counts as impaired.

    A call slower than ``slow_call``, or failing with a code whose class fires
    ``impaired``, is an impaired call. ``enter_after`` consecutive impaired
    calls or probes enter ``degraded``; ``leave_after`` consecutive healthy
    ones return to ``logged_in``.
    """

    slow_call: float = 1.0
    enter_after: int = 3
    leave_after: int = 5


@dataclass(frozen=True, slots=True)
class CodeClass:
    """A class of return codes: the event it fires and what it allows.

    - ``event``: a machine event, or ``None`` for no transition (the caller's
      own mistakes: a missing key, a bad mechanism).
    - ``reissue``: an idempotent call that failed with this class may be
      re-issued (on this connection after recovery, or on another member).
    - ``may_have_acted``: the HSM may have carried the operation out before
      the error (a dropped connection after the request was sent). A
      non-idempotent operation is never re-issued after such a class.
    """

    name: str
    event: Event | None
    reissue: bool
    may_have_acted: bool


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True)
class Policy:
    """A whole recovery policy. Build one with :func:`hsmfsm.load_policy`."""

    name: str
    classes: Mapping[str, CodeClass]
    codes: Mapping[str, str]  # code name -> class name
    default_class: str
    connect: ConnectPolicy = field(default_factory=ConnectPolicy)
    operations: OperationsPolicy = field(default_factory=OperationsPolicy)
    probe: ProbePolicy = field(default_factory=ProbePolicy)
    degraded: DegradedPolicy = field(default_factory=DegradedPolicy)
    sessions: SessionsPolicy = field(default_factory=SessionsPolicy)
    source: str = "<built-in>"
    #: Per phase (``connect``, ``login``, ``probe``, ``call``), the reaction to a class where it
    #: differs from what :mod:`hsmfsm.core.rules` derives from the class's event: phase -> class -> reaction.
    reactions: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", _frozen(self.classes))
        object.__setattr__(self, "codes", _frozen(self.codes))
        object.__setattr__(self, "reactions", _frozen({k: _frozen(v) for k, v in self.reactions.items()}))

    def class_of(self, code: Code) -> CodeClass:
        """The class a return code belongs to under this policy."""
        return self.classes[self.codes.get(code.name, self.default_class)]


    def is_idempotent(self, operation: str) -> bool:
        return operation in self.operations.idempotent


def member_policy(policy: Policy, mode: str, interval: float, max_attempts: int | None) -> Policy:
    """The policy each member of an HA pool runs: the pool's recovery written into its connect policy.

    Background: the member retries every ``interval`` seconds (no growth, small jitter),
    ``max_attempts`` times. In-call: the member retries only when the pool asks (inside a
    call, at most every ``interval``), and its own schedule counts the ``max_attempts``, so
    that giving up is on the member's machine and record in both modes.
    """
    backoff = Backoff(initial=interval, multiplier=1.0, max=interval, jitter=min(0.1, policy.connect.backoff.jitter))
    connect = dataclasses.replace(policy.connect, backoff=backoff,
                                  max_attempts=max_attempts)
    return dataclasses.replace(policy, connect=connect)
