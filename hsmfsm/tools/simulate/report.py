"""What a run did, for an operator: the timeline, the failed calls, the recoveries and the tally.

:func:`analyse` turns an :class:`~.model.Outcome` into a :class:`Report` (the
recovery after each fault, time not serving); :func:`as_text` and
:func:`as_json` print the same report two ways. Both are pure functions of the
outcome, with every number rounded the same way, so one input prints the same
bytes every time.

How a recovery is measured, for each occurrence of a fault on a member (its
*window* runs from the fault's start to the next fault's start on that member,
or the end of the run):

- ``left``: the first moment in the window the member was not serving
  (``logged_in`` or ``degraded``): when it left, or the fault's start if it
  was not serving then. None: it kept serving through the window.
- ``back``: the first moment after ``left`` it was serving again, wherever
  that falls. None: not serving at the end of the run.
- ``outage`` is ``back - left``; ``after_end`` is ``back`` minus the fault's
  end (a lasting fault's end, an instant fault's start): how long recovery
  took once the HSM was healthy again.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from typing import Any

from ...config.documents import show_seconds
from ...core.states import SERVING
from .model import FailedCall, Mark, Occurrence, Outcome, Transition, occurrences

#: Decimal places of every time printed (virtual microseconds).
PLACES = 6


def _r(t: float) -> float:
    return round(t, PLACES) + 0.0  # + 0.0: never -0.0


@dataclass(frozen=True, slots=True)
class Recovery:
    """How one member came back from one occurrence of a fault (see the module docstring)."""

    occurrence: Occurrence
    left: float | None
    back: float | None
    degraded: tuple[float, float | None] | None  # a spell in degraded inside the window, if it kept serving
    state_at_end: str

    @property
    def outage(self) -> float | None:
        return None if self.left is None or self.back is None else self.back - self.left

    @property
    def after_end(self) -> float | None:
        return None if self.back is None else self.back - self.occurrence.end


@dataclass(frozen=True, slots=True)
class Report:
    outcome: Outcome
    recoveries: tuple[Recovery, ...]
    not_serving: dict[str, float]
    pool_not_serving: float | None  # with a pool: time no member served


def _serving_spans(timeline: list[Transition], member: str, end: float) -> list[tuple[float, float]]:
    """The member's serving spans up to ``end`` (every member starts disconnected at 0)."""
    spans: list[tuple[float, float]] = []
    since: float | None = None
    for tr in timeline:
        if tr.member != member:
            continue
        if tr.dest in SERVING and since is None:
            since = tr.t
        elif tr.dest not in SERVING and since is not None:
            spans.append((since, tr.t))
            since = None
    if since is not None:
        spans.append((since, max(since, end)))
    return spans


def _not_serving(spans: list[tuple[float, float]], end: float) -> float:
    served = sum(min(b, end) - min(a, end) for a, b in spans)
    return max(0.0, end - served)


def _union_not_serving(all_spans: list[list[tuple[float, float]]], end: float) -> float:
    merged: list[list[float]] = []
    for a, b in sorted(span for spans in all_spans for span in spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return _not_serving([(a, b) for a, b in merged], end)


def analyse(outcome: Outcome) -> Report:
    scenario = outcome.scenario
    end = scenario.duration
    timeline = outcome.timeline
    spans = {m: _serving_spans(timeline, m, outcome.ended) for m in scenario.members}
    all_occurrences = occurrences(scenario)
    recoveries = []
    for o in all_occurrences:
        later = [x.start for x in all_occurrences if x.member == o.member and x.start > o.start]
        window_end = min(later) if later else outcome.ended
        recoveries.append(_recovery(o, timeline, window_end, outcome.final_states.get(o.member, "?")))
    pool = _union_not_serving(list(spans.values()), end) if scenario.pool is not None else None
    return Report(outcome, tuple(recoveries), {m: _not_serving(s, end) for m, s in spans.items()}, pool)


def _recovery(o: Occurrence, timeline: list[Transition], window_end: float, final: str) -> Recovery:
    """See the module docstring. The member's state at the fault is the one before its start:
    a transition at the very instant of the fault already comes after it."""
    mine = [tr for tr in timeline if tr.member == o.member]
    before = [tr for tr in mine if tr.t < o.start]
    left = None if before and before[-1].dest in SERVING else o.start
    back: float | None = None
    degraded_from: float | None = None
    degraded_to: float | None = None
    for tr in mine:
        if tr.t < o.start:
            continue
        if left is None:
            if tr.t >= window_end:
                break
            if tr.dest not in SERVING:
                left = tr.t
            elif tr.dest == "degraded" and degraded_from is None:
                degraded_from = tr.t
            elif tr.source == "degraded" and degraded_from is not None and degraded_to is None:
                degraded_to = tr.t
        elif tr.dest in SERVING:
            back = tr.t
            break
    degraded = (degraded_from, degraded_to) if left is None and degraded_from is not None else None
    return Recovery(o, left, back, degraded, final)


# --------------------------------------------------------------------------- JSON


def _code(name: str | None, value: int | None) -> str:
    if name is None:
        return ""
    return name if value is None else f"{name} (0x{value:X})"


def _transition(tr: Transition) -> dict[str, Any]:
    return {"t": _r(tr.t), "member": tr.member, "from": tr.source, "to": tr.dest, "event": tr.event,
            "code": tr.code, "code_value": tr.code_value}


def _mark(m: Mark) -> dict[str, Any]:
    return {"t": _r(m.t), "member": m.member, "kind": m.kind, "operation": m.operation,
            "elapsed": _opt(m.elapsed), "limit": _opt(m.limit), "reason": m.reason}


def _suspected(marks: list[Mark], members: tuple[str, ...] | list[str]) -> dict[str, int]:
    return {m: sum(1 for x in marks if x.member == m and x.kind == "suspected") for m in members}


def _failure(f: FailedCall) -> dict[str, Any]:
    return {"t": _r(f.ended), "started": _r(f.started), "waited": _r(f.ended - f.started), "thread": f.thread,
            "operation": f.operation, "error": f.error, "member": f.member, "code": f.code, "state": f.state,
            "message": f.message}


def _opt(t: float | None) -> float | None:
    return None if t is None else _r(t)


def _recovery_json(rc: Recovery) -> dict[str, Any]:
    o = rc.occurrence
    return {"fault": o.fault.kind, "text": o.fault.describe(), "member": o.member, "occurrence": o.number + 1,
            "start": _r(o.start), "end": _r(o.end), "left_serving": _opt(rc.left), "serving_again": _opt(rc.back),
            "not_serving_for": _opt(rc.outage), "after_fault_ended": _opt(rc.after_end),
            "degraded": None if rc.degraded is None else [_r(rc.degraded[0]), _opt(rc.degraded[1])],
            "state_at_end": rc.state_at_end}


def _by_class(failures: list[FailedCall]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for f in failures:
        counts[f.error] = counts.get(f.error, 0) + 1
    return dict(sorted(counts.items()))


def to_data(report: Report) -> dict[str, Any]:
    """The report as JSON-ready data (what ``--json`` prints)."""
    out = report.outcome
    s = out.scenario
    w = s.workload
    faults = [{"fault": f.kind, "text": f.describe(), "members": list(f.members), "at": [_r(t) for t in f.starts()]}
              for f in s.faults]
    tally: dict[str, Any] = {
        "calls": out.calls, "ok": out.ok, "failed": len(out.failures), "failed_by_class": _by_class(out.failures),
        "wrong_results": out.wrong, "slowest_call": _r(out.slowest),
        "not_serving": {m: _r(t) for m, t in report.not_serving.items()},
        "c_login_calls": dict(out.logins), "final_states": dict(out.final_states),
    }
    if s.pool is not None:
        tally["suspected"] = _suspected(out.marks, s.members)
    if report.pool_not_serving is not None:
        tally["pool_not_serving"] = _r(report.pool_not_serving)
    return {
        "scenario": s.name, "source": s.source, "description": s.description,
        "runs": {"pool": s.pool.name if s.pool is not None else None, "policy": s.policy.name,
                 "members": list(s.members),
                 "recovery": None if s.pool is None else s.pool.recovery.mode,
                 "balance": None if s.pool is None else s.pool.balance},
        "duration": _r(s.duration), "seed": s.seed, "latency": _r(s.latency),
        "workload": {"operation": w.operation, "rate": w.rate, "threads": w.threads},
        "faults": faults,
        "timeline": [_transition(tr) for tr in out.timeline],
        "suspicions": [_mark(m) for m in out.marks],
        "failed_calls": [_failure(f) for f in out.failures],
        "recovery": [_recovery_json(rc) for rc in report.recoveries],
        "tally": tally,
        "ended": _r(out.ended),
        "internal_errors": list(out.internal_errors),
    }


def as_json(report: Report) -> str:
    return json.dumps(to_data(report), indent=2) + "\n"


# --------------------------------------------------------------------------- text


def _t(t: float) -> str:
    return f"{t:.3f}s"


def _span(t: float) -> str:
    """A time the scenario wrote (a duration, a fault's start), the way it is written: 90 -> 1.5m."""
    return show_seconds(_r(t)) if t > 0 else "0s"


def as_text(report: Report) -> str:
    out = report.outcome
    s = out.scenario
    w = s.workload
    width = max(len(m) for m in s.members)
    lines = [f"scenario {s.name} ({s.source})"]
    if s.description:
        lines += textwrap.wrap(" ".join(s.description.split()), 100, initial_indent="  ", subsequent_indent="  ")
    if s.pool is None:
        lines.append(f"  runs: one connection, {s.members[0]}, under policy {s.policy.name}")
    else:
        p = s.pool
        lines.append(f"  runs: pool {p.name} ({', '.join(s.members)}), policy {s.policy.name}, balance {p.balance}, "
                     f"recovery {p.recovery.mode}")
    lines.append(f"  for {_span(s.duration)} of virtual time, seed {s.seed}, HSM latency {_span(s.latency)}")
    if w.rate > 0:
        lines.append(f"  workload: {w.operation}, {w.rate:g} calls/s on {w.threads} thread"
                     f"{'' if w.threads == 1 else 's'}")
    else:
        lines.append("  workload: none (an idle application)")
    lines.append("  faults:" if s.faults else "  faults: none")
    for f in s.faults:
        starts = f.starts()
        when = "from the start" if f.kind == "wrong_pin" else f"at {_span(starts[0])}"
        if f.count > 1:
            when += f", every {_span(f.every or 0.0)}, {f.count} times"
        lines.append(f"    {', '.join(f.members)}: {f.describe()} {when}")
    marks = f", {len(out.marks)} suspicion marks" if out.marks else ""
    lines += ["", f"timeline (virtual seconds; {len(out.timeline)} transitions{marks}):"]
    entries: list[tuple[float, int, str]] = []
    for i, tr in enumerate(out.timeline):
        move = f"{tr.source} -> {tr.dest}"
        entries.append((tr.t, i, f"  {tr.t:>11.4f}  {tr.member:<{width}}  {move:<28} {tr.event:<15} "
                                 f"{_code(tr.code, tr.code_value)}".rstrip()))
    for i, m in enumerate(out.marks):  # not transitions: the pool's marks, beside them in time order
        if m.kind == "suspected":
            elapsed, limit = (m.elapsed or 0.0) * 1e3, (m.limit or 0.0) * 1e3
            what = f"{m.operation} had run {elapsed:.1f}ms (its limit: {limit:.1f}ms) while another member served"
        else:
            what = m.reason
        entries.append((m.t, len(out.timeline) + i,
                        f"  {m.t:>11.4f}  {m.member:<{width}}  {'(' + m.kind + ')':<28} {what}"))
    lines += [text for _, _, text in sorted(entries)]
    lines += ["", f"failed calls ({len(out.failures)}):"]
    if not out.failures:
        lines.append("  none")
    for run in _runs(out.failures):
        call = run[0]
        lines.append(f"  {call.ended:>11.4f}  thread {call.thread}  {call.operation}  {call.error}  {call.member}  "
                     f"{call.code or '-'}  (waited {_t(call.ended - call.started)})")
        lines.append(f"               {call.message}")
        if len(run) > 1:
            lines.append(f"               ... and {len(run) - 1} more the same, the last at {_t(run[-1].ended)}")
    lines += ["", "recovery:"]
    if not report.recoveries:
        lines.append("  no faults")
    for rc in report.recoveries:
        lines.append(f"  {_recovery_text(rc, s.faults[rc.occurrence.fault.index].count > 1)}")
    lines += ["", "tally:"]
    failed = ", ".join(f"{name} {n}" for name, n in _by_class(out.failures).items())
    rows: list[tuple[str, str]] = [
        ("calls", str(out.calls)), ("ok", str(out.ok)),
        ("failed", f"{len(out.failures)}" + (f"  ({failed})" if failed else "")),
        ("wrong results", str(out.wrong)), ("slowest call", _t(out.slowest)),
    ]
    rows += [(f"not serving, {m}", _t(t)) for m, t in report.not_serving.items()]
    if report.pool_not_serving is not None:
        rows.append(("no member serving", _t(report.pool_not_serving)))
    if s.pool is not None:
        rows += [(f"suspected, {m}", f"{n} time{'' if n == 1 else 's'}")
                 for m, n in _suspected(out.marks, s.members).items()]
    rows += [(f"C_Login calls, {m}", str(n)) for m, n in out.logins.items()]
    rows += [(f"final state, {m}", state) for m, state in out.final_states.items()]
    label = max(len(name) for name, _ in rows)
    lines += [f"  {name:<{label}}  {value}" for name, value in rows]
    if out.internal_errors:
        lines += ["", f"internal errors ({len(out.internal_errors)}; bugs in hsmfsm, please report them):"]
        lines += [f"  {e}" for e in out.internal_errors]
    return "\n".join(lines) + "\n"


def _runs(failures: list[FailedCall]) -> list[list[FailedCall]]:
    """Consecutive failures that say the same (operation, error, member, code, state, message), grouped:
    the text shows a run of them once (a failed connection fails every call the same way); JSON lists each."""
    runs: list[list[FailedCall]] = []
    for call in failures:
        key = (call.operation, call.error, call.member, call.code, call.state, call.message)
        if runs and (runs[-1][0].operation, runs[-1][0].error, runs[-1][0].member, runs[-1][0].code,
                     runs[-1][0].state, runs[-1][0].message) == key:
            runs[-1].append(call)
        else:
            runs.append([call])
    return runs


def _recovery_text(rc: Recovery, repeated: bool) -> str:
    o = rc.occurrence
    what = f"{o.member}: {o.fault.describe()}"
    what += " from the start" if o.fault.kind == "wrong_pin" else f" at {_t(o.start)}"
    if repeated:
        what += f" (#{o.number + 1})"
    if rc.left is None:
        if rc.degraded is None:
            return f"{what}: kept serving"
        until = "the end" if rc.degraded[1] is None else _t(rc.degraded[1])
        return f"{what}: kept serving, degraded from {_t(rc.degraded[0])} to {until}"
    if rc.back is None:
        return f"{what}: not serving from {_t(rc.left)} to the end ({rc.state_at_end})"
    after = rc.after_end
    ended = "the fault ended" if o.lasting else "the fault"
    tail = f"; serving again {_t(after)} after {ended}" if after is not None and after >= 0 else ""
    return f"{what}: not serving {_t(rc.left)} to {_t(rc.back)} ({_t(rc.back - rc.left)}){tail}"
