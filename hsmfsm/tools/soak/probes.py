"""What the soak measures beside the pool's own account: live sessions, server children, memory.

SoftHSM reports ``ulSessionCount`` as CK_UNAVAILABLE_INFORMATION (measured), so
sessions are counted by asking C_GetSessionInfo about every handle; processes
are found from /proc, by PID, never by name.
"""

from __future__ import annotations

import os
from typing import Any

from ...runtime.connection import SlotConnection


class SessionCounter:
    """Live session handles on one member's own connection, asked with C_GetSessionInfo on each of its
    links (module instances: over p11-kit-client every session has one of its own)."""

    def count(self, conn: SlotConnection, upto: int = 1024) -> int | None:
        """How many of the handles 1..``upto`` are live sessions, summed over the connection's links;
        None when a call holds a link's call lock for 2 s."""
        total = 0
        for lane in list(conn._lanes):  # the soak is hsmfsm's own lab: it may look inside
            module: Any = lane.module
            lock = lane.lock
            if lock is not None and not lock.acquire(timeout=2.0):
                return None
            try:
                live: int | None = module.live_sessions(upto)
            finally:
                if lock is not None:
                    lock.release()
            total += live or 0
        return total


def children(pid: int | None) -> list[int]:
    """PIDs of the live (non-zombie) children of ``pid`` (none for None)."""
    if pid is None:
        return []
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            out.append(int(entry))
    return out


def rss_mib() -> float:
    """This process's resident set size, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0
