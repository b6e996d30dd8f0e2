"""A vendor module in a process of its own, so that a call hung inside it can be cut off.

Why: a vendor PKCS#11 module (Luna, nShield, a cloud HSM client) is usually
loaded into the signer's own process and talks to its network HSM over a
socket the application cannot see. When that HSM stops answering, the
module's C_Sign blocks in C, and nothing in the process can unblock it: the
caller's thread hangs for as long as the vendor's own timeout, often forever.
hsmfsm's watchdog can only cut calls that cross a socket *it* knows.

How: with ``isolation: process`` the vendor module runs behind a private
``p11-kit server`` (the same well-kept RPC the network-HSM path already uses,
docs/FACTS.md), and the connection loads ``p11-kit-client`` pointed at it. p11-kit
serves each client connection from a ``p11-kit-remote`` child process that
loads the vendor module. A call that overruns the call timeout is then cut off
like any network call: the watchdog kills the stuck ``p11-kit-remote`` child
(:meth:`ModuleHost.kill_stuck`) and shuts the client's socket, the caller gets
:class:`~hsmfsm.errors.CallTimeout` within the call timeout, and the
reconnect gets a fresh child with a fresh module instance. The cost is one
local RPC per call (``hsmfsm bench`` prints it).

No host outlives its owner: the server runs under a guardian shell that leads
the process group and blocks reading a pipe whose write end only the owning
process (and its forks) hold. When the owner exits by any means, even
SIGKILL, the pipe reaches EOF and the guardian kills the whole group. The
socket lives in a private 0700 directory, so no other user can reach the
vendor module through it.

Processes are found by process group, from /proc, never by name.
"""

from __future__ import annotations

import collections
import glob
import logging
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO
from urllib.parse import quote

from .module import ModuleError

log = logging.getLogger("hsmfsm.host")

#: Where Debian and other distributions put p11-kit-client (the lab looks here too).
CLIENT_CANDIDATES = ("/usr/lib/*/pkcs11/p11-kit-client.so", "/usr/lib/pkcs11/p11-kit-client.so",
                      "/usr/lib64/pkcs11/p11-kit-client.so")

#: The guardian: starts the server in the background, prints its PID, then waits for EOF on
#: stdin (the owner is gone or closed the host) and kills the whole process group.
_GUARDIAN = '"$@" </dev/null >/dev/null & echo "$!"; exec >/dev/null; read _ignored; kill -s KILL 0'

#: Lines of the host's stderr kept for error messages (all of them also go to the log).
_TAIL = 20

#: The longest unix socket path (sun_path) Linux accepts.
_SUN_PATH_MAX = 107


class HostError(RuntimeError):
    """The module host could not be started; the message says why."""


def client_module() -> str:
    """The path of this machine's ``p11-kit-client.so`` (Debian package p11-kit-modules)."""
    for pattern in CLIENT_CANDIDATES:
        for path in sorted(glob.glob(pattern)):
            if os.path.exists(path):
                return path
    raise HostError("isolation: process needs p11-kit-client.so; install the Debian package p11-kit-modules")


def live_group_members(pgid: int) -> list[int]:
    """The processes of group ``pgid`` that have not exited (zombies awaiting reaping do not count).

    From /proc, by process group: by PID, never by name.
    """
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            out.append(int(entry))
    return out


def accepts(path: Path) -> bool:
    """Whether a unix socket at ``path`` takes connections (a server is listening)."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _private_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    if not os.path.isdir(base) or len(base) > _SUN_PATH_MAX - 40:
        base = "/tmp"  # a socket path must fit in sun_path
    return Path(tempfile.mkdtemp(prefix="hsmfsm-host-", dir=base))  # mode 0700


class ModuleHost:
    """One vendor module served to one slot connection by a private ``p11-kit server``.

    Owned by the process that started it. In a forked child the host is used as it
    is (the child's own ``p11-kit-client`` instance gets a ``p11-kit-remote`` of its
    own), but only the owner kills stuck children or stops the host: the child cannot
    tell its ``p11-kit-remote`` from the parent's.
    """

    def __init__(self, module: str, env: dict[str, str] | None, token_label: str, name: str) -> None:
        if not os.path.exists(module):
            raise ModuleError(f"{name}: PKCS#11 module {module} does not exist")
        self.module = module
        self.env = dict(env or {})
        self.token_label = token_label
        self.name = name
        self._dir: Path | None = None
        self._guardian: subprocess.Popen[bytes] | None = None
        self._listener: int | None = None
        self._owner = os.getpid()
        self._socket: Path | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=_TAIL)
        self.restarts = 0

    # -- what the connection needs ------------------------------------------

    @property
    def client_env(self) -> dict[str, str]:
        """The environment the connection's ``p11-kit-client`` instance is loaded with."""
        if self._socket is None:
            self._dir = _private_dir()
            self._socket = self._dir / "module.sock"
        return {"P11_KIT_SERVER_ADDRESS": f"unix:path={self._socket}"}

    @property
    def guardian_pid(self) -> int | None:
        """The host's process group (its guardian's PID), for audits and tests."""
        return self._guardian.pid if self._guardian is not None else None

    @property
    def listener_pid(self) -> int | None:
        return self._listener

    def running(self) -> bool:
        """Whether the guardian and the listener are both alive (from /proc: a forked child cannot
        ``poll()`` its parent's child)."""
        if self._guardian is None or self._listener is None:
            return False
        alive = live_group_members(self._guardian.pid)
        return self._guardian.pid in alive and self._listener in alive

    def ensure_running(self, timeout: float = 10.0) -> None:
        """Start the host, or start it again if its listener died. Raises :class:`HostError`."""
        if os.getpid() != self._owner or self.running():
            return
        if self._guardian is not None:
            log.warning("%s: the module host's server is gone; starting it again", self.name)
            self._stop_processes()
            self.restarts += 1
        self._start(timeout)

    def kill_stuck(self) -> int:
        """Kill every ``p11-kit-remote`` of this host (the calls into the vendor module); returns how many.

        Called by the watchdog when a call overran the call timeout: the child is
        stuck inside the vendor module, and only killing it frees what it holds.
        The listener stays up, so the reconnect gets a fresh child.
        """
        if os.getpid() != self._owner or self._guardian is None:
            return 0
        keep = {self._guardian.pid, self._listener}
        killed = 0
        for pid in live_group_members(self._guardian.pid):
            if pid in keep:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        return killed

    def stop(self) -> None:
        """Kill the host's whole process group and remove its private directory."""
        if os.getpid() != self._owner:
            return
        self._stop_processes()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def last_error(self) -> str:
        """The last line the server or its children wrote to stderr (vendor modules report there)."""
        return self._stderr[-1] if self._stderr else ""

    def _forward_stderr(self, pipe: IO[bytes]) -> None:
        """p11-kit's and the vendor module's stderr, to the ``hsmfsm.host`` logger: an operator
        sees the vendor's own words next to the transitions, and nothing grows on disk."""
        with pipe:
            for raw in iter(pipe.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip()[:300]
                if line:
                    self._stderr.append(line)
                    log.warning("%s: module host: %s", self.name, line)

    # -- the processes ----------------------------------------------------------

    def _start(self, timeout: float) -> None:
        p11_kit = shutil.which("p11-kit")
        if p11_kit is None:
            raise HostError(f"{self.name}: isolation: process needs p11-kit on PATH; "
                            "install the Debian package p11-kit")
        self._check_loadable(timeout)
        self.client_env  # noqa: B018 - chooses the private directory and the socket path
        assert self._socket is not None and self._dir is not None
        self._claim_dir()
        self._socket.unlink(missing_ok=True)
        env = {**os.environ, **self.env}
        env.pop("P11_KIT_SERVER_PID", None)
        uri = f"pkcs11:token={quote(self.token_label, safe='')}"
        self._guardian = subprocess.Popen(
            ["/bin/sh", "-c", _GUARDIAN, "hsmfsm-host", p11_kit, "server", "--provider", self.module,
             "-f", "-n", str(self._socket), uri],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        threading.Thread(target=self._forward_stderr, args=(self._guardian.stderr,), daemon=True,
                         name=f"hsmfsm-host-stderr-{self.name}").start()
        deadline = time.monotonic() + timeout
        try:
            self._listener = self._read_listener_pid(deadline)
            while not accepts(self._socket):
                if self._guardian.poll() is not None or self._listener not in live_group_members(self._guardian.pid):
                    raise HostError(f"{self.name}: p11-kit server for {self.module} exited at start: "
                                    f"{self.last_error() or 'no message'}")
                if time.monotonic() > deadline:
                    raise HostError(f"{self.name}: p11-kit server for {self.module} did not listen within {timeout:g}s")
                time.sleep(0.005)
        except BaseException:
            self._stop_processes()
            raise
        log.info("%s: module host for %s listening (group %d)", self.name, self.module, self._guardian.pid)

    def _check_loadable(self, timeout: float) -> None:
        """dlopen the module in a throwaway process first: p11-kit-remote says nothing when a
        module fails to load (the client just sees CKR_DEVICE_ERROR), and the operator needs
        the loader's own words."""
        probe = ("import ctypes, sys\n"
                 "try:\n    ctypes.CDLL(sys.argv[1]).C_GetFunctionList\n"
                 "except (OSError, AttributeError) as exc:\n    print(exc); sys.exit(3)\n")
        limit = max(timeout, 5.0)
        try:
            done = subprocess.run([sys.executable, "-c", probe, self.module], env={**os.environ, **self.env},
                                  capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            raise HostError(f"{self.name}: loading {self.module} took over {limit:g}s") from None
        if done.returncode != 0:
            why = (done.stdout.strip() or done.stderr.strip() or f"exit status {done.returncode}")[-300:]
            raise HostError(f"{self.name}: the PKCS#11 module {self.module} cannot be loaded: {why}")

    def _claim_dir(self) -> None:
        """(Re)create the private directory: after a close, the same path (the client instance
        was loaded with it), but only as a fresh 0700 directory of this user, never one that
        someone else made meanwhile."""
        assert self._dir is not None
        try:
            os.mkdir(self._dir, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(self._dir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
            raise HostError(f"{self.name}: {self._dir} is not a private directory of this user; refusing it")

    def _read_listener_pid(self, deadline: float) -> int:
        assert self._guardian is not None and self._guardian.stdout is not None
        fd = self._guardian.stdout.fileno()
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise HostError(f"{self.name}: the module host did not start within its timeout")
            chunk = os.read(fd, 64)
            if not chunk:
                raise HostError(f"{self.name}: the module host exited at start")
            line += chunk
        self._guardian.stdout.close()
        return int(line.strip())

    def _stop_processes(self) -> None:
        guardian, self._guardian, self._listener = self._guardian, None, None
        if guardian is None:
            return
        try:
            os.killpg(guardian.pid, signal.SIGCONT)  # a stopped group must wake to die promptly
            os.killpg(guardian.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            guardian.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("%s: the module host's guardian (pid %d) did not exit", self.name, guardian.pid)
        for pipe in (guardian.stdin, guardian.stdout):  # stderr: its reader thread closes it
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass

    def __repr__(self) -> str:
        return f"ModuleHost({self.name!r}, module={self.module!r}, group={self.guardian_pid})"
