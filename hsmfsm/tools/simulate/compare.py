"""Compare the path a simulated run took with the path a real one took.

A real run (a network HSM killed and restarted, hung and resumed, or a relay
rewriting replies) and its simulation take the same *path* through the state
machine, but not at the same times: how many reconnect attempts fit into an
outage depends on real time and on the back-off's jitter, and a loaded
machine can make one call slow enough to count as impaired. So the two are
compared as sequences of steps, ``(member, from, to, event, code)``, after
:func:`normalise`:

1. **Members apart.** Each member's steps are kept in their order; the
   members follow one another in order of first appearance. How two members'
   transitions interleave is real timing.
2. **Repeated reconnect cycles collapsed.** A failed attempt is the pair
   ``disconnected -> connecting`` (connect) then ``connecting -> disconnected``
   (``connect_failed``, or ``call_timeout`` when the watchdog cut a hung
   attempt off), with its code. Consecutive failed attempts with the same
   event and code are kept once: their number is the back-off's timing and
   the outage's real length, not the path. Attempts that fail another way
   stay, in order.
3. **The loss seen twice dropped.** A failed attempt directly after the
   loss (``... -> disconnected``) that fails with the very code the loss was
   recorded with is dropped: the first reconnect can start while a real
   server is still dying (its listener and its per-client processes are
   killed one after another) and hear the same error again
   (``CKR_DEVICE_ERROR`` from C_Initialize, measured), where later attempts
   find no server at all. Whether it does is a race with real time.
4. **Degraded excursions dropped.** ``logged_in -> degraded`` (impaired)
   directly followed, for that member, by ``degraded -> logged_in`` (healthy)
   is removed: a slow call or probe on a busy machine. A degraded spell that
   ends any other way (the connection lost from degraded) is kept.

Nothing else is dropped or merged, so a run that took another path (another
event, another code, a step more or less such as a ``session_lost`` instead
of a ``connection_lost``, a login that is missing, a ``failed``) still differs
after normalising.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

__all__ = ["Step", "first_difference", "normalise", "steps"]

#: (member, from, to, event, code name or None)
Step = tuple[str, str, str, str, str | None]


class _Record(Protocol):
    @property
    def member(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def dest(self) -> str: ...
    @property
    def event(self) -> str: ...


def steps(records: Iterable[_Record]) -> list[Step]:
    """Steps from transition records (:class:`~hsmfsm.TransitionRecord`, or the simulator's
    :class:`~.model.Transition`): their code is ``code_name`` or ``code``."""
    out: list[Step] = []
    for r in records:
        code = getattr(r, "code_name", None) if hasattr(r, "code_name") else getattr(r, "code", None)
        out.append((r.member, r.source, r.dest, r.event, code))
    return out


def _is_attempt(a: Step, b: Step) -> bool:
    return (a[1:4] == ("disconnected", "connecting", "connect") and b[1:3] == ("connecting", "disconnected")
            and b[3] in ("connect_failed", "call_timeout"))


def _is_excursion(a: Step, b: Step) -> bool:
    return a[1:4] == ("logged_in", "degraded", "impaired") and b[1:4] == ("degraded", "logged_in", "healthy")


def _is_loss_again(out: list[Step], attempt: list[Step]) -> bool:
    return bool(out) and out[-1][2] == "disconnected" and out[-1][1] != "connecting" and \
        attempt[1][4] == out[-1][4]


def _one_member(seq: list[Step]) -> list[Step]:
    out: list[Step] = []
    i = 0
    while i < len(seq):
        pair = seq[i:i + 2]
        if len(pair) == 2 and _is_excursion(pair[0], pair[1]):
            i += 2
            continue
        if len(pair) == 2 and _is_attempt(pair[0], pair[1]) and _is_loss_again(out, pair):
            i += 2
            continue
        if len(pair) == 2 and _is_attempt(pair[0], pair[1]):
            if len(out) >= 2 and _is_attempt(out[-2], out[-1]) and out[-1][3:] == pair[1][3:]:
                i += 2  # the same failed attempt again
                continue
            out += pair
            i += 2
            continue
        out.append(seq[i])
        i += 1
    return out


def normalise(seq: Sequence[Step]) -> list[Step]:
    """``seq`` normalised as the module docstring says."""
    members: list[str] = []
    by_member: dict[str, list[Step]] = {}
    for step in seq:
        if step[0] not in by_member:
            members.append(step[0])
            by_member[step[0]] = []
        by_member[step[0]].append(step)
    return [step for m in members for step in _one_member(by_member[m])]


def first_difference(a: Sequence[Step], b: Sequence[Step]) -> str | None:
    """None when ``a`` and ``b`` are equal; else where they part, for an assertion message."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"step {i}: {x} != {y}"
    if len(a) != len(b):
        longer, name = (a, "first") if len(a) > len(b) else (b, "second")
        return f"the {name} sequence has {abs(len(a) - len(b))} more step(s), from {longer[min(len(a), len(b))]}"
    return None
