"""systemd's notification protocol, with no dependency: READY, STATUS and the watchdog.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a path, or an
abstract name written ``@name``), and with ``WatchdogSec=`` also
``WATCHDOG_USEC`` (and ``WATCHDOG_PID``). A notification is one datagram of
``KEY=VALUE`` lines sent there (sd_notify(3)). Without ``NOTIFY_SOCKET``
every method here does nothing, so a daemon calls them unconditionally::

    notifier = Notifier.from_environment()
    pool.open()
    notifier.attach(pool)        # STATUS= on every member change
    notifier.ready()             # READY=1: the pool has opened (whether or not an HSM answers)
    notifier.start_watchdog()    # WATCHDOG=1 every WATCHDOG_USEC / 2
    ...
    notifier.stopping(); pool.close(); notifier.close()

READY is sent once the pool has opened, not once an HSM answers: a unit
whose start waited for an HSM would fail while the HSM is down, and systemd
would restart it into the same outage. For the same reason the watchdog
pings prove the *process* runs (the notifier's own thread, the pools'
supervisor threads and audit writer alive), never that an HSM does.

Sending never blocks and never raises: the socket is non-blocking, and a
notification that cannot be sent is logged at DEBUG and dropped. Only the
process that made the notifier sends (a forked child's datagrams would be
refused under ``NotifyAccess=main`` anyway).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from ..core.records import TransitionRecord

if TYPE_CHECKING:
    from .pool import Pool

log = logging.getLogger("hsmfsm.systemd")


def _address(value: str) -> str | None:
    """The socket address of a ``NOTIFY_SOCKET`` value; None for kinds not spoken here (``vsock:``)."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


class Notifier:
    """Notifications to systemd (``address`` None: inert). Build it with :meth:`from_environment`."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._sock: socket.socket | None = None
        if address is not None:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            except OSError as exc:
                log.warning("systemd notifications off: cannot make a socket (%s)", exc)
                self._address = None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._pools: list[Pool] = []
        self._last_status: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """From ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (a watchdog meant for
        another process is not ours to feed)."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = _address(raw) if raw else None
        if raw and address is None:
            log.warning("systemd notifications off: NOTIFY_SOCKET %r is not a unix socket", raw)
        usec: int | None = None
        pid = env.get("WATCHDOG_PID", "")
        if env.get("WATCHDOG_USEC", "").isdigit() and (not pid or pid == str(os.getpid())):
            usec = int(env["WATCHDOG_USEC"])
        return cls(address, watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None: no watchdog."""
        return None if self._watchdog_usec is None else self._watchdog_usec / 2e6

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``"READY=1"``, ...) as one notification; True if it was sent."""
        sock, address = self._sock, self._address
        if sock is None or address is None or os.getpid() != self._pid:
            return False
        try:
            sock.sendto("\n".join(fields).encode("utf-8", "replace"), address)
        except OSError as exc:
            log.debug("systemd notification not sent to %r: %s", address.replace("\0", "@"), exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``, with a ``STATUS=`` line (default: the attached pools' summary)."""
        text = self._summary() if status is None else _one_line(status)
        self._last_status = text or self._last_status
        return self.notify("READY=1", *([f"STATUS={text}"] if text else []))

    def status(self, text: str) -> bool:
        text = _one_line(text)
        self._last_status = text
        return self.notify(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping")

    # -- STATUS on member changes -------------------------------------------------------

    def attach(self, pool: Pool) -> None:
        """Send ``STATUS=`` (every attached pool's one-line summary) on each member change of ``pool``."""
        with self._lock:
            self._pools.append(pool)
        pool.add_listener(self._on_transition)

    def _summary(self) -> str:
        with self._lock:
            pools = list(self._pools)
        return " | ".join(p.health().summary() for p in pools)

    def _on_transition(self, record: TransitionRecord) -> None:
        if self._closed or record.source is record.dest:
            return
        text = self._summary()
        with self._lock:
            if text == self._last_status:
                return
            self._last_status = text
        self.notify(f"STATUS={text}")

    # -- the watchdog -------------------------------------------------------------------

    def start_watchdog(self, alive: Callable[[], bool] | None = None) -> bool:
        """Ping ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` from a thread of its own, while the process
        runs: while that thread is scheduled, every attached pool's supervisor threads and audit
        writer are alive, and ``alive()`` (the application's own check, if given) is true. HSM
        health plays no part. False (and nothing started) when systemd set no watchdog."""
        interval = self.watchdog_interval
        if interval is None or not self.enabled or self._thread is not None:
            return False
        self._thread = threading.Thread(target=self._watch, args=(interval, alive), name="hsmfsm-sd-watchdog",
                                        daemon=True)
        self._thread.start()
        return True

    def _machinery_alive(self) -> str | None:
        """What has died of the process's own machinery, or None."""
        with self._lock:
            pools = list(self._pools)
        for pool in pools:
            for row in pool.status():
                thread = pool.member(row.name)._supervisor
                if thread is not None and not thread.is_alive():
                    return f"the supervisor thread of {pool.name}/{row.name}"
            audit = pool.audit
            if audit is not None and not audit._closed and not audit._thread.is_alive():
                return f"the audit writer of {pool.name}"
        return None

    def _watch(self, interval: float, alive: Callable[[], bool] | None) -> None:
        stopped = False
        while True:
            dead = self._machinery_alive()
            if dead is None and alive is not None:
                try:
                    dead = None if alive() else "the application's liveness check"
                except Exception:
                    log.exception("the application's liveness check raised")
                    dead = "the application's liveness check"
            if dead is None:
                self.notify("WATCHDOG=1")
            elif not stopped:
                log.error("systemd watchdog pings stop: %s is not alive; systemd will restart the service", dead)
            stopped = dead is not None
            if self._stop.wait(interval):
                return

    def close(self) -> None:
        """Stop the watchdog thread and stop sending (the pools' listeners become no-ops)."""
        self._closed = True
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        for pool in self._pools:
            for row in pool.status():
                pool.member(row.name).remove_listener(self._on_transition)
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
