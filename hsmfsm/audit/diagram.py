"""Audit diagrams drawn from the transition table and a policy, never by hand.

The picture comes from :data:`hsmfsm.core.states.TRANSITIONS` (the same table that
builds the live machine) and labels each code-driven edge with the return
codes that fire it under the given policy, so a policy that maps a code
differently draws a different diagram. The DOT text is deterministic: the
same input gives the same bytes, so diagrams can be diffed in review.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import graphviz

from ..core.policy import Policy
from ..core.states import SERVING, TERMINAL, TRANSITIONS, Event, State

if TYPE_CHECKING:
    from ..config.pool_file import PoolSpec
    from ..runtime.pool import MemberStatus


class DiagramError(RuntimeError):
    """The diagram cannot be written (for instance, Graphviz's ``dot`` is missing)."""


def _codes_by_event(policy: Policy) -> dict[str, list[str]]:
    by_event: dict[str, list[str]] = defaultdict(list)
    for code, klass in sorted(policy.codes.items()):
        event = policy.classes[klass].event
        if event is not None:
            by_event[event.value].append(code)
    default = policy.classes[policy.default_class].event
    if default is not None:
        by_event[default.value].append(f"any other code ({policy.default_class})")
    return by_event


def _recovery_note(event: Event, policy: Policy) -> str | None:
    """The policy's recovery setting behind a recovery edge (None for other events)."""
    if event is Event.CONNECT_FAILED:
        b = policy.connect.backoff
        return f"backoff {b.initial:g}s x{b.multiplier:g} max {b.max:g}s jitter {b.jitter:g}"
    if event is Event.GIVE_UP:
        n = policy.connect.max_attempts
        return f"after {n} failed attempts" if n else "never: attempts unlimited"
    if event is Event.CALL_TIMEOUT:
        return f"call > {policy.operations.call_timeout:g}s"
    return None


def _edge_label(event: Event, codes: list[str], policy: Policy) -> str:
    note = _recovery_note(event, policy)
    lines = [event.value, *codes, *([note] if note else [])]  # every code: an auditor must not guess "+N more"
    return "\\n".join(lines)


_RECOVERY_EVENTS = (Event.CONNECT_FAILED, Event.GIVE_UP, Event.CALL_TIMEOUT)


def _state_attrs(state: State) -> dict[str, str]:
    attrs = {"shape": "doublecircle" if state in TERMINAL else "circle"}
    if state in SERVING:
        attrs.update(style="filled", fillcolor="palegreen")
    elif state in TERMINAL:
        attrs.update(style="filled", fillcolor="lightcoral")
    return attrs


def _edges() -> list[tuple[State, Event, State]]:
    return [(src, event, dst) for (src, event), dst in
            sorted(TRANSITIONS.items(), key=lambda kv: (kv[0][0].value, kv[0][1].value))]


def _edge_style(event: Event) -> str:
    return "dashed" if event in (Event.CLOSE, Event.RESET, Event.FORKED) else "solid"


def _legend(g: graphviz.Digraph, name: str = "legend") -> None:
    """What the shapes mean: an auditor reads the picture without the source at hand."""
    g.node(name, shape="plaintext", label=(
        "<<table border='0' cellborder='1' cellspacing='0' cellpadding='4'>"
        "<tr><td colspan='2'><b>legend</b></td></tr>"
        "<tr><td bgcolor='palegreen'>green</td><td align='left'>serving: calls are sent here</td></tr>"
        "<tr><td bgcolor='lightcoral'>double circle</td><td align='left'>terminal: left only by an "
        "operator's reset (a rejected PIN is never retried)</td></tr>"
        "<tr><td>solid edge</td><td align='left'>event fired by the supervisor or by the return codes "
        "listed under it (this policy's mapping)</td></tr>"
        "<tr><td>dashed edge</td><td align='left'>the application or the operator (close, reset, fork)</td></tr>"
        "<tr><td>backoff / attempts / call &gt;</td><td align='left'>recovery settings of this policy</td></tr>"
        "</table>>"))


def to_dot(policy: Policy) -> str:
    """The DOT source for ``policy``'s slot machine: every state and transition, codes on the edges."""
    g = graphviz.Digraph(name="slot_connection", graph_attr={
        "rankdir": "LR", "label": f"hsmfsm slot connection under policy {policy.name!r}\\n"
        f"re-issue idempotent calls ({', '.join(sorted(policy.operations.idempotent))}) "
        f"up to {policy.operations.max_reissues}x within {policy.operations.deadline:g}s",
        "labelloc": "t", "fontname": "Helvetica"})
    g.attr("node", fontname="Helvetica")
    g.attr("edge", fontname="Helvetica", fontsize="9")
    for state in State:
        g.node(state.value, **_state_attrs(state))
    codes = _codes_by_event(policy)
    for src, event, dst in _edges():
        g.edge(src.value, dst.value, label=_edge_label(event, codes.get(event.value, []), policy),
               style=_edge_style(event))
    _legend(g)
    return g.source


def _html(text: object) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _code_table(policy: Policy) -> str:
    """Event -> return codes, once for the whole pool (every member follows the same policy)."""
    codes = _codes_by_event(policy)
    rows = "".join(
        f"<tr><td align='left'>{_html(event.value)}</td><td align='left'>"
        f"{'<br/>'.join(_html(c) for c in codes[event.value])}</td></tr>"
        for event in Event if codes.get(event.value))
    recovery = "".join(f"<tr><td align='left'>{_html(e.value)}</td><td align='left'>"
                       f"{_html(_recovery_note(e, policy))}</td></tr>" for e in _RECOVERY_EVENTS)
    return ("<<table border='0' cellborder='1' cellspacing='0' cellpadding='3'>"
            f"<tr><td colspan='2'><b>return codes under policy {_html(policy.name)}</b></td></tr>"
            f"{rows}<tr><td colspan='2'><b>recovery</b></td></tr>{recovery}</table>>")


def pool_to_dot(spec: PoolSpec, status: Sequence[MemberStatus] | None = None) -> str:
    """The DOT source for a pool: its members, roles, balancing and recovery, each member's machine.

    ``status`` (from :meth:`hsmfsm.runtime.pool.Pool.status`) highlights each member's
    current state: the live picture of ``hsmfsm diagram --live``.
    """
    from ..runtime.pool import Pool

    r = spec.recovery
    policy = Pool.member_policy(spec.policy, r.mode, r.interval, r.max_attempts)
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
                attempts = "" if now.state in ("logged_in", "degraded") else \
                    f", recovery {now.recovery_attempts}/{'unlimited' if now.max_attempts is None else now.max_attempts}"
                label.append(f"now: {now.state}, last code {now.last_code or 'CKR_OK'}{attempts}")
            c.attr(label="\\n".join(label), style="rounded", color="gray40" if not member.standby else "gray70")
            for state in State:
                attrs = _state_attrs(state)
                if now is not None and now.state == state.value:
                    attrs.update(style="filled,bold", penwidth="4", color="blue", fillcolor="gold")
                c.node(f"{member.name}/{state.value}", label=state.value, **attrs)
            for src, event, dst in _edges():
                c.edge(f"{member.name}/{src.value}", f"{member.name}/{dst.value}", label=event.value,
                       style=_edge_style(event))
        calls = "calls only while every active member is down" if member.standby else f"calls ({spec.balance})"
        g.edge("application", f"{member.name}/{State.LOGGED_IN.value}", lhead=f"cluster_{index}", label=calls,
               style="dotted" if member.standby else "bold")
    g.node("codes", shape="plaintext", label=_code_table(policy))
    _legend(g)
    return g.source


def write(policy: Policy, path: str | Path) -> Path:
    """Write ``policy``'s diagram; the format comes from the extension (.dot, .svg, .png)."""
    return write_source(to_dot(policy), path)


def write_pool(spec: PoolSpec, path: str | Path, status: Sequence[MemberStatus] | None = None) -> Path:
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
