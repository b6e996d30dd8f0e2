"""``hsmfsm soak``: one run, from the lab's first process to the tally's last line."""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from ...runtime.pool import Pool, format_status
from ...testing.lab import LabError
from ...testing.lab.relay import RelayError
from .chaos import Chaos
from .ending import finish
from .lab import Lab
from .pool import PinEnvironment, build_pool, soak_policy
from .probes import rss_mib
from .schedule import WARMUP, draw_schedule
from .tally import Settings, judge, print_tally, summary
from .watch import Watch
from .workload import Workload

_now = time.monotonic


def run(duration: float = 120.0, threads: int = 4, seed: int = 1, members: int = 3,
        json_path: str | None = None, out: TextIO | None = None, call_timeout: float = 1.0,
        deadline: float = 6.0, isolation: str = "none") -> int:
    """Run one soak; print the tally; return 0 when every "must be" row holds, else 1.

    2 when the lab or the pool could not be set up, 130 when interrupted (Ctrl-C, or
    SIGTERM when called from the main thread). ``isolation="process"`` loads every
    active member's module in a host process (:mod:`hsmfsm.p11.host`): the same faults
    then strike a module hsmfsm cannot cut off from inside the process, and the host's
    stuck processes are what gets killed.
    """
    if members not in (2, 3):
        raise ValueError("members must be 2 or 3")
    if duration < 10:
        raise ValueError("duration must be at least 10 seconds")
    out = out or sys.stdout
    t_start = _now()

    def say(text: str) -> None:
        print(f"[{_now() - t_start:7.2f}s] {text}", file=out, flush=True)

    settings = Settings(seed, duration, threads, members, isolation, call_timeout, deadline)
    names = ["hsm-a", "hsm-b", "hsm-c"][:members]
    policy = soak_policy(call_timeout, deadline)
    schedule = draw_schedule(seed, duration, names, call_timeout)
    pin = "S" + secrets.token_hex(10)
    wrong_pin = "W" + secrets.token_hex(10)
    watch = Watch(pin, wrong_pin)
    pins = PinEnvironment()
    saved_sigterm: Callable[[int, FrameType | None], Any] | int | None = None
    tmp = tempfile.mkdtemp(prefix="hsmfsm-soak-")
    lab = Lab(Path(tmp), names)
    pool: Pool | None = None
    work: Workload | None = None
    tally: dict[str, Any] = {}
    try:
        watch.install()
        if threading.current_thread() is threading.main_thread():
            saved_sigterm = signal.signal(signal.SIGTERM, _interrupt)

        say(f"soak: seed {seed}, {duration:g}s, {threads} signing threads, {members} members, "
            f"isolation {isolation}, "
            f"+ 1 standby with a wrong PIN; call timeout {call_timeout:g}s, deadline {deadline:g}s")
        say(f"provisioning a SoftHSM token and {members + 1} replicas in {tmp}")
        master, public = lab.start(pin)
        say(lab.describe())

        pins.set(pin, wrong_pin)
        pool = build_pool(lab, master.label, policy, isolation, watch.transitions)
        pool.open(wait=15.0)
        status_text = format_status(pool)
        say("pool open:\n" + status_text)
        if not all(pool.member(n).serving for n in names):
            raise RuntimeError("the pool did not come up: " + status_text)

        work = signers = Workload(pool, public, threads, seed, watch.secrets, settings.lost_after)
        signers.start()
        t0 = _now()
        rss_start: float | None = None

        def tick(now: float) -> None:
            nonlocal rss_start
            signers.watch(now)
            if rss_start is None and now - t0 >= min(WARMUP, 2.0):
                rss_start = rss_mib()

        chaos = Chaos(schedule, lab, say)
        say(f"signing; {len(schedule)} faults scheduled")
        chaos.play(t0, duration, tick)

        end = finish(lab, pool, signers, watch.secrets, say)
        rows, outside_examples = judge(settings, names, t0, signers, watch, chaos.windows, end, rss_start)
        tally = summary(settings, tmp, len(schedule), chaos, signers, watch, end, rows, outside_examples,
                        {m.name: m.stderr_lines for m in lab.members})
        say("done")
        print_tally(tally, rows, out)
    except KeyboardInterrupt:
        say("interrupted: cleaning up")
        tally = {"ok": False, "interrupted": True}
        return 130
    except (LabError, RelayError, RuntimeError) as exc:
        say(f"soak could not run: {exc}")
        tally = {"ok": False, "error": str(exc)}
        return 2
    finally:
        if work is not None:
            work.stop.set()
        lab.wake()
        if pool is not None:
            try:
                pool.close()  # idempotent; makes sure nothing of ours still talks to the servers
            except Exception:
                pass
        lab.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        watch.remove()
        if saved_sigterm is not None:
            signal.signal(signal.SIGTERM, saved_sigterm)
        pins.restore()
        if json_path and tally:
            Path(json_path).write_text(json.dumps(tally, indent=2, default=str) + "\n")
    return 0 if tally.get("ok") else 1


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM ends the run as Ctrl-C does: cleaned up, exit status 130."""
    raise KeyboardInterrupt
