"""Audit diagrams drawn from the transition table and a policy, never by hand.

The picture comes from :data:`hsmfsm.states.TRANSITIONS` (the same table that
builds the live machine) and labels each code-driven edge with the return
codes that fire it under the given policy, so a policy that maps a code
differently draws a different diagram. The DOT text is deterministic: the
same input gives the same bytes, so diagrams can be diffed in review.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

import graphviz

from .policy import Policy
from .states import SERVING, TERMINAL, TRANSITIONS, Event, State

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


def _edge_label(event: Event, codes: list[str], policy: Policy) -> str:
    lines = [event.value, *codes]  # every code: an auditor must not have to guess "+N more"
    if event is Event.CONNECT_FAILED:
        b = policy.connect.backoff
        lines.append(f"backoff {b.initial:g}s x{b.multiplier:g} max {b.max:g}s jitter {b.jitter:g}")
    if event is Event.GIVE_UP:
        n = policy.connect.max_attempts
        lines.append(f"after {n} failed attempts" if n else "never: attempts unlimited")
    if event is Event.CALL_TIMEOUT:
        lines.append(f"call > {policy.operations.call_timeout:g}s")
    return "\\n".join(lines)


def to_dot(policy: Policy) -> str:
    """The DOT source for ``policy``'s slot machine."""
    g = graphviz.Digraph(name="slot_connection", graph_attr={
        "rankdir": "LR", "label": f"hsmfsm slot connection under policy {policy.name!r}\\n"
        f"re-issue idempotent calls ({', '.join(sorted(policy.operations.idempotent))}) "
        f"up to {policy.operations.max_reissues}x within {policy.operations.deadline:g}s",
        "labelloc": "t", "fontname": "Helvetica"})
    g.attr("node", fontname="Helvetica")
    g.attr("edge", fontname="Helvetica", fontsize="9")
    for state in State:
        attrs = {"shape": "doublecircle" if state in TERMINAL else "circle"}
        if state in SERVING:
            attrs.update(style="filled", fillcolor="palegreen")
        elif state in TERMINAL:
            attrs.update(style="filled", fillcolor="lightcoral")
        g.node(state.value, **attrs)
    codes = _codes_by_event(policy)
    for (src, event), dst in sorted(TRANSITIONS.items(), key=lambda kv: (kv[0][0].value, kv[0][1].value)):
        style = "dashed" if event in (Event.CLOSE, Event.RESET) else "solid"
        g.edge(src.value, dst.value, label=_edge_label(event, codes.get(event.value, []), policy), style=style)
    return g.source


def write(policy: Policy, path: str | Path) -> Path:
    """Write the diagram; the format comes from the extension (.dot, .svg, .png)."""
    path = Path(path)
    source = to_dot(policy)
    fmt = path.suffix.lstrip(".").lower()
    if fmt == "dot":
        path.write_text(source)
        return path
    if fmt not in ("svg", "png", "pdf"):
        raise DiagramError(f"{path}: unknown diagram format {fmt!r} (use .dot, .svg or .png)")
    if shutil.which("dot") is None:
        raise DiagramError("Graphviz's 'dot' is not installed; run: apt-get install graphviz")
    path.write_bytes(graphviz.Source(source).pipe(format=fmt))
    return path
