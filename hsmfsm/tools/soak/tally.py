"""The tally: what the run did, and the "must be" rows it is judged by (printed, and as JSON).

Bounds, all derived from the policy (``call_timeout`` T, ``deadline`` D):

- a failed call is excused only when it ended inside a window where the
  schedule had taken every member down, extended by D after the members were
  given back (a call that started inside the window may wait D for a member);
- a call is *lost* when it takes longer than D + T + 0.5 s: the pool checks
  its deadline between attempts, so one attempt that starts just before the
  deadline may run one call timeout past it (then the watchdog cuts it), and
  0.5 s covers the watchdog's period and a loaded 2-core machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TextIO

from .chaos import Chaos
from .ending import Ending
from .watch import Watch
from .workload import Failure, Workload

RSS_LIMIT_MIB = 50.0


@dataclass(frozen=True)
class Settings:
    """One run's parameters."""

    seed: int
    duration: float
    threads: int
    members: int
    isolation: str
    call_timeout: float
    deadline: float

    @property
    def lost_after(self) -> float:
        """A call that takes longer than this is lost (see the module docstring)."""
        return self.deadline + self.call_timeout + 0.5


@dataclass
class Row:
    name: str
    value: Any
    must: str | None = None   # None: reported only
    ok: bool = True


def _split_failures(failures: list[Failure], windows: list[list[float]], t0: float,
                    grace: float) -> tuple[int, int, list[str]]:
    """Failed calls inside every-member-down windows (+ grace), outside them, and a few of the latter."""
    excused = outside = 0
    examples: list[str] = []
    for fl in failures:
        end_rel = fl.ended - t0
        if any(a <= end_rel <= b + grace for a, b in windows):
            excused += 1
        else:
            outside += 1
            if len(examples) < 8:
                examples.append(f"{fl.started - t0:.2f}s-{end_rel:.2f}s {fl.klass}: {fl.message}")
    return excused, outside, examples


def judge(s: Settings, names: list[str], t0: float, work: Workload, watch: Watch, windows: list[list[float]],
          end: Ending, rss_start: float | None) -> tuple[list[Row], list[str]]:
    """The rows of the tally, and examples of the failed calls no window excuses."""
    excused, outside, outside_examples = _split_failures(work.failures, windows, t0, s.deadline)
    lost_after = s.lost_after
    unhandled = work.unhandled + watch.unhandled
    traced = watch.log.with_traceback
    growth = end.rss_end - (rss_start or end.rss_end)
    rows = [
        Row("calls made", work.calls),
        Row("calls succeeded, signature verified", work.ok),
        Row("calls failed, by class", dict(work.failed_by_class)),
        Row("calls failed inside every-member-down windows (+deadline)", excused),
        Row("calls failed outside those windows", outside, "0", outside == 0),
        Row("calls lost (no answer within deadline + call timeout + 0.5s)", len(work.lost), "0",
            not work.lost),
        Row("wrong signatures", work.wrong, "0", work.wrong == 0),
        Row("unhandled exceptions (non-HSMError from a call, thread crash, 'Exception ignored')",
            len(unhandled), "0", not unhandled),
        Row("log records with a traceback", len(traced), "0", not traced),
        Row("p11-kit-remote children (= SoftHSM instances holding sessions) left after close", end.left,
            "0 each", not any(end.left.values())),
        Row("relay links left open after close", end.links, "0 each", not any(end.links.values())),
        *([Row("host processes (isolation: process) left after close", end.host_left, "0 each",
               not any(end.host_left.values()))] if end.hosts else []),
        Row("live sessions per member connection before close (those in use; at most one per link, and "
            "links at most sessions.max)",
            {n: f"{end.sessions_before[n]} ({end.expected_sessions[n][0]} in use, {end.expected_sessions[n][1]} "
                f"links of {end.expected_sessions[n][2]})" for n in names}, "in use <= live <= links <= max",
            all(_sessions_ok(end.sessions_before[n], *end.expected_sessions[n]) for n in names)),
        Row(f"worst call latency (bound: deadline {s.deadline:g}s + call timeout {s.call_timeout:g}s + 0.5s)",
            round(work.worst, 3), f"<= {lost_after:g}s", work.worst <= lost_after),
        Row("call latency histogram (upper bound s: calls)",
            {("inf" if b == float("inf") else f"{b:g}"): c for b, c in sorted(work.buckets.items())}),
        Row("every active member serving again at the end", f"{len(end.all_back)} of {len(names)}",
            f"{len(names)} of {len(names)}", len(end.all_back) == len(names)),
        Row("wrong-PIN standby: state, C_Login calls", f"{end.wrong_state}, {end.wrong_logins}", "failed, 1",
            end.wrong_state == "failed" and end.wrong_logins == 1),
        Row("PIN or wrong PIN seen in logs, records, reprs, errors, status", dict(watch.secrets.hits),
            "nowhere", not watch.secrets.hits),
        Row(f"process RSS growth after warm-up (MiB; start {rss_start or 0:.1f}, end {end.rss_end:.1f})",
            round(growth, 1), f"< {RSS_LIMIT_MIB:g}", growth < RSS_LIMIT_MIB),
    ]
    return rows, outside_examples


def summary(s: Settings, workdir: str, scheduled: int, chaos: Chaos, work: Workload, watch: Watch, end: Ending,
            rows: list[Row], outside_examples: list[str], stderr_lines: dict[str, int]) -> dict[str, Any]:
    """The tally as JSON (``--json``): the settings, the faults, the rows and what backs them."""
    transitions = watch.transitions
    return {
        "seed": s.seed, "duration": s.duration, "workdir": workdir, "threads": s.threads, "members": s.members,
        "isolation": s.isolation,
        "call_timeout": s.call_timeout, "deadline": s.deadline, "lost_after": s.lost_after,
        "faults_scheduled": scheduled, "faults_applied": dict(chaos.applied), "faults_skipped": chaos.skipped,
        "all_down_windows": [[round(a, 2), round(b, 2)] for a, b in chaos.windows],
        "rows": [{"name": r.name, "value": r.value, "must": r.must, "ok": r.ok} for r in rows],
        "failed_outside_windows_examples": outside_examples,
        "lost": work.lost[:20],
        "unhandled": (work.unhandled + watch.unhandled)[:5],
        "tracebacks_in_log": watch.log.with_traceback[:5],
        "error_messages": dict(sorted(work.messages.items(), key=lambda kv: -kv[1])[:20]),
        "transitions": transitions.count,
        "transitions_by_member_event": {f"{m} {e}": c for (m, e), c in sorted(transitions.events.items())},
        "log_records": dict(watch.log.by_level),
        "texts_scanned_for_pins": dict(watch.secrets.scanned),
        "server_stderr_lines": stderr_lines,
        "close_seconds": round(end.close_seconds, 2),
        "ok": all(r.ok for r in rows),
    }


def print_tally(tally: dict[str, Any], rows: list[Row], out: TextIO) -> None:
    def p(s: str = "") -> None:
        print(s, file=out)

    p()
    p(f"soak tally (seed {tally['seed']}, {tally['duration']:g}s, {tally['threads']} threads, "
      f"{tally['members']} members + wrong-PIN standby)")
    p(f"  faults applied: {', '.join(f'{k} {v}' for k, v in sorted(tally['faults_applied'].items()))}"
      f"; skipped {len(tally['faults_skipped'])}")
    p(f"  every-member-down windows (s): {tally['all_down_windows']}")
    width = max(len(r.name) for r in rows)
    for r in rows:
        verdict = "" if r.must is None else (f"   must be {r.must}: " + ("ok" if r.ok else "FAILED"))
        p(f"  {r.name:<{width}}  {r.value}{verdict}")
    for key in ("failed_outside_windows_examples", "lost", "unhandled", "tracebacks_in_log", "faults_skipped"):
        if tally.get(key):
            p(f"  {key}:")
            for line in tally[key][:8]:
                p("    " + str(line).replace("\n", "\n    "))
    p(f"  transitions recorded: {tally['transitions']}; log records: {tally['log_records']}; "
      f"close took {tally['close_seconds']}s")
    p("RESULT: " + ("every must-be row holds" if tally["ok"] else "FAILED: a must-be row does not hold"))


def _sessions_ok(live: int | None, in_use: int, links: int, most: int) -> bool:
    """Every session in use is live; a lost generation's sessions did not pile up (a link holds one
    session at most: a lost one dies with its link's next C_Initialize); links never passed the cap."""
    return live is not None and in_use <= live <= links <= most
