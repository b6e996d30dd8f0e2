"""``hsmfsm soak``: a bounded chaos run against an HA pool of network HSMs.

Two or three SoftHSM replicas of one token, each behind its own
`p11-kit server` and reached through its own reply-rewriting :class:`Relay`,
form an HA pool. Several threads sign through the pool for ``duration``
seconds (ECDSA P-256 over SHA-256 digests), and every signature is verified
with the public key outside any HSM. Meanwhile a fault schedule, drawn from a
seeded RNG before the run starts (the same seed gives the same schedule),
kills members and restarts them later, hangs them (SIGSTOP) and resumes them,
restarts them, resets their connections at the relay, slows their replies,
rewrites replies to transport, session, login and vendor codes, and takes
every member down at once for a while.

An extra standby member reads a *wrong* PIN from another environment
variable: it must end ``failed`` after exactly one C_Login, and neither PIN
may appear anywhere the soak can see (captured logs at DEBUG, transition
records, reprs, exception messages, the pool's status).

At the end a tally is printed (and written as JSON with ``--json``); each
"must be" row is checked and the exit status is 1 when any fails. The bounds
the rows use are in :mod:`.tally`.

Sessions left open: SoftHSM reports ``ulSessionCount`` as
CK_UNAVAILABLE_INFORMATION (measured), and behind `p11-kit server` every
client connection is served by a ``p11-kit-remote`` child process of its own
whose SoftHSM instance holds that connection's sessions. So the soak counts
what it can see: before close, the live session handles on each member's own
connection (C_GetSessionInfo over handles 1..1024, reported); after close, the
``p11-kit-remote`` children still alive under each server and the links still
open through each relay. No child, no session: that row must be 0.

Every process the soak starts is stopped by PID or process group, even on
Ctrl-C; the temporary directory is removed.

The modules, one job each:

- :mod:`.schedule`: the seeded fault schedule (:func:`draw_schedule`);
- :mod:`.lab`: the replicas, their servers and relays, the wrong-PIN standby; faults done and undone;
- :mod:`.pool`: the soak's policy and the pool over the lab;
- :mod:`.workload`: the signing threads and their bookkeeping;
- :mod:`.watch`: the PIN scan, the captured logs and transitions, stray exceptions;
- :mod:`.chaos`: plays the schedule against the lab while the workload signs;
- :mod:`.probes`: live sessions, server children, memory;
- :mod:`.ending`: gives everything back, closes the pool, counts what is left;
- :mod:`.tally`: the must-be rows, their checks, the printed and JSON tally;
- :mod:`.run`: the orchestration.
"""

from __future__ import annotations

from .lab import Lab, Member
from .pool import PIN_ENV, WRONG_PIN_ENV, soak_policy
from .probes import SessionCounter
from .run import run
from .schedule import DOWN_KINDS, KINDS, REWRITES, Fault, draw_schedule
from .tally import RSS_LIMIT_MIB, Row, Settings
from .watch import Secrets, Watch
from .workload import KEY, Failure, Workload

__all__ = ["DOWN_KINDS", "KEY", "KINDS", "PIN_ENV", "REWRITES", "RSS_LIMIT_MIB", "WRONG_PIN_ENV", "Failure",
           "Fault", "Lab", "Member", "Row", "SessionCounter", "Secrets", "Settings", "Watch", "Workload",
           "draw_schedule", "run", "soak_policy"]
