"""Audit diagrams drawn from the rule-book under a policy, never by hand.

The picture is :func:`hsmfsm.core.rules.edges`: every transition the runtime
can take under the given policy, each once, and nothing it cannot take. A
code-driven edge names its phase (``call``, ``connect``, ``login``,
``probe``) and lists, class by class, the return codes whose reaction in that
phase fires it; a counted event (``impaired``, ``give_up``, ``connection_lost``
after failed probes) says what is counted and how many. A policy that maps a
code, a class or a reaction differently draws a different diagram. The DOT
text is deterministic: the same input gives the same bytes, so diagrams can
be diffed in review.

Audit reads the rule-book (``hsmfsm.core``) and loaded files
(``hsmfsm.config``), never the runtime: a live diagram is given each member's
status as plain values (:class:`LiveMember`) by whoever connected to the pool.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import graphviz

from ..core.policy import Backoff, Policy
from ..core.policy import member_policy as policy_of_member
from ..core.rules import STEPS, Edge, Phase, Reaction, edges, reaction
from ..core.states import SERVING, TERMINAL, Event, State

if TYPE_CHECKING:
    from ..config.pool_file import PoolSpec


class DiagramError(RuntimeError):
    """The diagram cannot be written (for instance, Graphviz's ``dot`` is missing)."""


class LiveMember(Protocol):
    """What a live pool diagram needs of a member's status (``Pool.status()`` rows fit)."""

    @property
    def name(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def last_code(self) -> str | None: ...
    @property
    def recovery_attempts(self) -> int: ...
    @property
    def max_attempts(self) -> int | None: ...


#: Codes per line in a label: every code is listed (an auditor must not guess "+N more").
_PER_LINE = 3


def _class_lines(policy: Policy, name: str) -> list[str]:
    """``class: CODE, CODE, CODE`` (wrapped); the default class ends with "every other code"."""
    codes = sorted(code for code, klass in policy.codes.items() if klass == name)
    if name == policy.default_class:
        codes.append("every other code")
    chunks = [", ".join(codes[i:i + _PER_LINE]) for i in range(0, len(codes), _PER_LINE)] or ["no code"]
    lines = [f"{name}: {chunks[0]}", *(f"    {chunk}" for chunk in chunks[1:])]
    return [line + ("," if i < len(lines) - 1 else "") for i, line in enumerate(lines)]


def _count_note(phase: Phase, react: Reaction, event: Event, policy: Policy, probe: bool) -> str | None:
    """What a counted reaction counts before ``event`` fires (None: it fires at once)."""
    if event is Event.IMPAIRED:
        d = policy.degraded
        probes = " or failed probes" if probe else ""
        return f"after {d.enter_after} slow (> {d.slow_call:g}s) or impaired calls{probes} in a row, the last with"
    if react is Reaction.PROBE_FAILED and event is Event.CONNECTION_LOST:
        return f"after {policy.probe.unhealthy_after} failed probes in a row with"
    if event is Event.GIVE_UP:
        return f"after {policy.connect.max_attempts} failed attempts in a row (connect or login), the last with"
    return None


def _backoff_note(b: Backoff) -> str:
    return f"backoff {b.initial:g}s x{b.multiplier:g} max {b.max:g}s jitter {b.jitter:g}"


def _recovery_note(event: Event, policy: Policy, attempts: str | None = None) -> str | None:
    """The policy's recovery setting behind a recovery edge (None for other events).

    ``attempts``: who counts the attempts, when the connection itself does not (an in-call pool).
    """
    if event is Event.CONNECT_FAILED:
        n = policy.connect.max_attempts
        return _backoff_note(policy.connect.backoff) + (
            f"; {attempts}" if attempts else f"; give_up after {n} attempts" if n
            else "; attempts unlimited: never gives up")
    if event is Event.CALL_TIMEOUT:
        return f"call > {policy.operations.call_timeout:g}s (watchdog)"
    return None


def _step_note(edge: Edge, policy: Policy, probe: bool, attempts: str | None) -> str | None:
    """What drives a step, in this policy's numbers."""
    if edge.event is Event.IMPAIRED:
        d = policy.degraded
        probes = " or failed probes" if probe else ""
        return f"after {d.enter_after} slow (> {d.slow_call:g}s) or impaired calls{probes} in a row, the last slow"
    if edge.event is Event.HEALTHY:
        probes = f" or {policy.probe.healthy_after} healthy probes" if probe else ""
        return f"after {policy.degraded.leave_after} healthy calls{probes} in a row"
    if edge.event in (Event.FATAL, Event.LOGIN_OK):
        return STEPS[(edge.source, edge.event)].split(": ", 1)[-1]
    return _recovery_note(edge.event, policy, attempts)


def _title(edge: Edge) -> str:
    return edge.event.value if edge.phase is None else f"{edge.event.value} ({edge.phase.value})"


def _details(edge: Edge, policy: Policy, probe: bool, attempts: str | None = None) -> list[str]:
    """The lines under an edge's title: its classes and their codes, counts, recovery settings."""
    if edge.phase is None:
        note = _step_note(edge, policy, probe, attempts)
        return [note] if note else []
    direct: list[str] = []
    counted: dict[str, list[str]] = {}
    for name in edge.classes:
        react = reaction(policy, edge.phase, name)
        note = _count_note(edge.phase, react, edge.event, policy, probe)
        if note is None:
            direct += _class_lines(policy, name)
        else:
            counted.setdefault(note, []).extend(_class_lines(policy, name))
    lines = list(direct)
    for note, class_lines in counted.items():
        lines += [note, *class_lines]
    recovery = _recovery_note(edge.event, policy, attempts)
    return lines + ([recovery] if recovery else [])


def _edge_label(edge: Edge, policy: Policy, probe: bool) -> str:
    """The title and details, one left-justified line each (DOT's ``\\l``); a bare step is its event."""
    lines = [_title(edge), *_details(edge, policy, probe)]
    return lines[0] if len(lines) == 1 else "".join(f"{line}\\l" for line in lines)


def _state_attrs(state: State) -> dict[str, str]:
    attrs = {"shape": "doublecircle" if state in TERMINAL else "circle"}
    if state in SERVING:
        attrs.update(style="filled", fillcolor="palegreen")
    elif state in TERMINAL:
        attrs.update(style="filled", fillcolor="lightcoral")
    return attrs


def _sorted_edges(policy: Policy, probe: bool) -> list[Edge]:
    """:func:`~hsmfsm.core.rules.edges` in a fixed drawing order: source, event, phase."""
    return sorted(edges(policy, probe=probe),
                  key=lambda e: (e.source.value, e.event.value, e.phase.value if e.phase else ""))


def _edge_style(event: Event) -> str:
    return "dashed" if event in (Event.CLOSE, Event.RESET, Event.FORKED) else "solid"


_LEFT = "<br align='left'/>"  # ends a left-justified line in an HTML label


def _legend(g: graphviz.Digraph, codes_where: str, name: str = "legend") -> None:
    """What the shapes and labels mean: an auditor reads the picture without the source at hand."""
    g.node(name, shape="plaintext", label=(
        "<<table border='0' cellborder='1' cellspacing='0' cellpadding='4'>"
        "<tr><td colspan='2'><b>legend</b></td></tr>"
        "<tr><td bgcolor='palegreen'>green</td><td align='left'>serving: calls are sent here</td></tr>"
        "<tr><td bgcolor='lightcoral'>double circle</td><td align='left'>terminal: left only by an "
        "operator's reset (a rejected PIN is never retried)</td></tr>"
        f"<tr><td>event (phase)</td><td align='left'>fired by a return code that came back in that phase{_LEFT}"
        f"(the codes are {codes_where}, class by class, as this policy's reactions say){_LEFT}"
        f"call: a caller's operation; connect: C_Initialize, the token, the session;{_LEFT}"
        f"login: the attempt's one C_Login; probe: the supervisor's health probe{_LEFT}</td></tr>"
        "<tr><td>event</td><td align='left'>no return code: the supervisor's own step, the watchdog, "
        "the health counts</td></tr>"
        "<tr><td>after N ... in a row</td><td align='left'>a counted event: it fires when the count is "
        "reached</td></tr>"
        "<tr><td>dashed edge</td><td align='left'>the application or the operator (close, reset, fork)</td></tr>"
        "<tr><td>backoff / give_up / call &gt;</td><td align='left'>recovery settings of this policy</td></tr>"
        "</table>>"))


def to_dot(policy: Policy, *, probe: bool = True) -> str:
    """The DOT source for ``policy``'s slot machine: every edge the runtime can take, with its phase and codes.

    ``probe``: the connection runs the health probe (``SlotConnection``'s default).
    """
    g = graphviz.Digraph(name="slot_connection", graph_attr={
        "rankdir": "LR", "label": f"hsmfsm slot connection under policy {policy.name!r}\\n"
        f"re-issue idempotent calls ({', '.join(sorted(policy.operations.idempotent))}) "
        f"up to {policy.operations.max_reissues}x within {policy.operations.deadline:g}s",
        "labelloc": "t", "fontname": "Helvetica"})
    g.attr("node", fontname="Helvetica")
    g.attr("edge", fontname="Helvetica", fontsize="9")
    for state in State:
        g.node(state.value, **_state_attrs(state))
    for edge in _sorted_edges(policy, probe):
        g.edge(edge.source.value, edge.dest.value, label=_edge_label(edge, policy, probe),
               style=_edge_style(edge.event))
    _legend(g, "listed under it")
    return str(g.source)


def _html(text: object) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _code_table(policy: Policy, probe: bool, attempts: str | None) -> str:
    """What fires each edge of the members' machines, once for the whole pool (one policy for all)."""
    rows: dict[tuple[str, tuple[str, ...]], None] = {}
    for edge in edges(policy, probe=probe):
        details = tuple(_details(edge, policy, probe, attempts))
        if details:
            rows.setdefault((_title(edge), details), None)
    body = "".join(f"<tr><td align='left' valign='top'>{_html(title)}</td><td align='left'>"
                   f"{''.join(_html(line) + _LEFT for line in details)}</td></tr>" for title, details in rows)
    return ("<<table border='0' cellborder='1' cellspacing='0' cellpadding='3'>"
            f"<tr><td colspan='2'><b>what fires each edge under policy {_html(policy.name)}</b></td></tr>"
            f"{body}</table>>")


def member_policy(spec: PoolSpec) -> Policy:
    """The policy each member of the pool runs (:func:`hsmfsm.core.policy.member_policy`)."""
    r = spec.recovery
    return policy_of_member(spec.policy, r.mode, r.interval, r.max_attempts)


def member_probes(spec: PoolSpec) -> bool:
    """Whether the pool's members run the health probe (only with background recovery)."""
    return spec.recovery.mode == "background"


def pool_to_dot(spec: PoolSpec, status: Sequence[LiveMember] | None = None) -> str:
    """The DOT source for a pool: its members, roles, balancing and recovery, each member's machine.

    Each member's machine is :func:`~hsmfsm.core.rules.edges` under the policy the members run
    (:func:`member_policy`); a table says what fires each edge. ``status`` (for instance
    ``Pool.status()``) highlights each member's current state: the live picture of
    ``hsmfsm diagram --live``.
    """
    r = spec.recovery
    policy, probe = member_policy(spec), member_probes(spec)
    cap = "unlimited" if r.max_attempts is None else f"up to {r.max_attempts}"
    g = graphviz.Digraph(name=f"pool_{spec.name}", graph_attr={
        "rankdir": "LR", "compound": "true", "labelloc": "t", "fontname": "Helvetica",
        "label": f"hsmfsm HA pool {spec.name!r}: balance {spec.balance}; recovery {r.mode}, "
                 f"every {r.interval:g}s, {cap} attempts; policy {spec.policy.name!r}\\n"
                 f"re-issue idempotent calls ({', '.join(sorted(policy.operations.idempotent))}) "
                 f"on another member within {policy.operations.deadline:g}s"})
    g.attr("node", fontname="Helvetica")
    g.attr("edge", fontname="Helvetica", fontsize="9")
    live = {s.name: s for s in status or ()}
    machine = _sorted_edges(policy, probe)
    g.node("application", shape="box", style="rounded",
           label=f"application\\n(one virtual session)\\npool {spec.name}")
    for index, member in enumerate(spec.members):
        role = "standby" if member.standby else "active"
        now = live.get(member.name)
        with g.subgraph(name=f"cluster_{index}") as c:
            label = [f"member {member.name} ({role})", f"token {member.token_label!r}",
                     f"module {Path(member.module).name}"
                     + (" in a host process (isolation: process)" if member.isolation == "process" else "")]
            if now is not None:
                cap_now = "unlimited" if now.max_attempts is None else now.max_attempts
                recovering = "" if now.state in ("logged_in", "degraded") else \
                    f", recovery {now.recovery_attempts}/{cap_now}"
                label.append(f"now: {now.state}, last code {now.last_code or 'CKR_OK'}{recovering}")
            c.attr(label="\\n".join(label), style="rounded", color="gray40" if not member.standby else "gray70")
            for state in State:
                attrs = _state_attrs(state)
                if now is not None and now.state == state.value:
                    attrs.update(style="filled,bold", penwidth="4", color="blue", fillcolor="gold")
                c.node(f"{member.name}/{state.value}", label=state.value, **attrs)
            for edge in machine:
                c.edge(f"{member.name}/{edge.source.value}", f"{member.name}/{edge.dest.value}",
                       label=_title(edge), style=_edge_style(edge.event))
        calls = "calls only while every active member is down" if member.standby else f"calls ({spec.balance})"
        g.edge("application", f"{member.name}/{State.LOGGED_IN.value}", lhead=f"cluster_{index}", label=calls,
               style="dotted" if member.standby else "bold")
    attempts = None if r.mode == "background" else (
        f"attempts only inside calls, at most every {r.interval:g}s: {cap}, then the member waits "
        "to be recovered by hand")
    g.node("codes", shape="plaintext", label=_code_table(policy, probe, attempts))
    _legend(g, "listed in the table")
    return str(g.source)


def write(policy: Policy, path: str | Path) -> Path:
    """Write ``policy``'s diagram; the format comes from the extension (.dot, .svg, .png)."""
    return write_source(to_dot(policy), path)


def write_pool(spec: PoolSpec, path: str | Path, status: Sequence[LiveMember] | None = None) -> Path:
    """Write a pool's diagram (live when ``status`` is given); the format comes from the extension."""
    return write_source(pool_to_dot(spec, status), path)


FORMATS = ("dot", "svg", "png", "pdf")


def write_source(source: str, path: str | Path) -> Path:
    """DOT text to a file, rendered by Graphviz's ``dot`` for anything but .dot.

    No fallback: if ``dot`` is missing the answer is an error that says how to
    install it, never a file of another format under the requested name.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise DiagramError(f"{path}: unknown diagram format {fmt!r} (use .dot, .svg or .png)")
    if fmt == "dot":
        path.write_text(source)
        return path
    if shutil.which("dot") is None:
        raise DiagramError(f"{path}: Graphviz's 'dot' program is not installed, so .{fmt} cannot be drawn; "
                           "install it (Debian/Ubuntu: apt-get install graphviz) or write .dot")
    try:
        data = graphviz.Source(source).pipe(format=fmt)
    except (graphviz.ExecutableNotFound, graphviz.CalledProcessError) as exc:
        raise DiagramError(f"{path}: Graphviz failed: {exc}") from None
    path.write_bytes(data)
    return path
