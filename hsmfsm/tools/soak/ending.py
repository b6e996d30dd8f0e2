"""The end of a run: give everything back, stop the signers, look at the pool, close it, count what is left."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from ...p11.host import live_group_members
from ...runtime.pool import Pool, format_status
from .lab import WRONG, Lab
from .probes import SessionCounter, rss_mib
from .watch import Secrets
from .workload import Workload

_now = time.monotonic

#: How long a member may take to serve again once everything was given back, at the end.
FINAL_RECOVERY = 10.0
#: How long the servers' children, the relays' links and the host processes get to go after close.
CLOSE_GRACE = 5.0


@dataclass
class Ending:
    """What the soak saw at the end, for the tally."""

    all_back: list[str]                       # active members serving again
    sessions_before: dict[str, int | None]    # live sessions on each member's connection before close
    expected_sessions: dict[str, tuple[int, int, int]]  # (sessions leased now, links, sessions.max)
    wrong_state: str                          # the wrong-PIN standby's state
    wrong_logins: int                         # and its C_Login calls
    hosts: dict[str, int | None]              # member -> its host's process group (isolation: process)
    left: dict[str, int]                      # p11-kit-remote children left after close, per server
    links: dict[str, int]                     # relay links left open after close
    host_left: dict[str, int]                 # host processes left after close
    rss_end: float                            # MiB
    close_seconds: float


def finish(lab: Lab, pool: Pool, work: Workload, secrets: Secrets, say: Callable[[str], None]) -> Ending:
    """Give every member back, stop the signers (a thread still alive is a lost call), wait for the
    members to serve, scan the status and reprs for the PINs, count sessions, close, count leftovers."""
    names = lab.names
    lab.give_back()
    stuck = work.join(work.lost_after + 2.0)
    work.watch(_now())
    for name in stuck:
        work.lost.append(f"{name}: never returned (thread still alive at the end)")
    say(f"signers stopped; waiting up to {FINAL_RECOVERY:g}s for every member to serve")
    limit = _now() + FINAL_RECOVERY
    while _now() < limit and not all(pool.member(n).serving for n in names):
        time.sleep(0.05)
    rss_end = rss_mib()
    all_back = [n for n in names if pool.member(n).serving]
    status = pool.status()
    status_text = format_status(pool)
    say("before close:\n" + status_text)
    texts = [status_text, json.dumps([s.as_dict() for s in status]), repr(pool)]
    texts += [repr(pool.member(n)) for n in [*names, WRONG]]
    for t in texts:
        secrets.scan("status and reprs", t)
    counter = SessionCounter()
    sessions_before = {n: counter.count(pool.member(n)) for n in names}
    expected_sessions = {n: (len(pool.member(n)._g.leases), pool.member(n).links, pool.member(n)._max_sessions)
                         for n in names}
    wrong = pool.member(WRONG)
    wrong_state, wrong_logins = wrong.state, wrong.login_attempts  # before close
    hosts = {n: host.guardian_pid for n in names if (host := pool.member(n)._host) is not None}
    close_t0 = _now()
    pool.close()
    close_took = _now() - close_t0
    left: dict[str, int] = {}
    links: dict[str, int] = {}
    host_left: dict[str, int] = {}
    limit = _now() + CLOSE_GRACE
    while _now() < limit:
        left, links = lab.leftovers()
        host_left = {n: len(live_group_members(g)) if g else 0 for n, g in hosts.items()}
        if not any(left.values()) and not any(links.values()) and not any(host_left.values()):
            break
        time.sleep(0.05)
    return Ending(all_back, sessions_before, expected_sessions, wrong_state, wrong_logins, hosts,
                  left, links, host_left, rss_end, close_took)
