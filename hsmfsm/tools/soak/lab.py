"""The soak's HSMs: replicas of one token behind p11-kit servers and relays, and the wrong-PIN standby.

Each active member is a SoftHSM replica served by its own ``p11-kit server`` and
reached through its own reply-rewriting :class:`~hsmfsm.testing.lab.Relay`; the
standby (``hsm-w``) is one more replica behind a server of its own, no relay.
The lab applies and undoes the schedule's faults, gives everything back at the
end, and counts what is left of it after the pool closed. Every process is
stopped by PID or process group.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import IO

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ...testing.lab import NetworkHSM, Relay, SoftHSMToken
from . import probes
from .schedule import Fault
from .workload import KEY

#: The name of the standby that reads the wrong PIN.
WRONG = "hsm-w"


class Member:
    """One replica: its p11-kit server and the relay in front of it."""

    def __init__(self, name: str, token: SoftHSMToken, root: Path) -> None:
        self.name = name
        self.hsm = NetworkHSM(token, root / f"{name}.sock")
        self.relay = Relay(root / f"{name}-relay.sock", self.hsm.socket_path)
        self.down: set[str] = set()  # what the schedule did to it and has not undone yet
        self.stderr_lines = 0
        self.stderr_first: list[str] = []

    def start_server(self) -> None:
        self.hsm.start()
        proc = self.hsm.proc
        if proc is not None and proc.stderr is not None:
            threading.Thread(target=self._drain, args=(proc.stderr,), daemon=True,
                             name=f"soak-stderr-{self.name}").start()

    def _drain(self, pipe: IO[bytes]) -> None:
        """Read the server's stderr so a chatty server can never block on a full pipe."""
        try:
            for line in iter(pipe.readline, b""):
                self.stderr_lines += 1
                if len(self.stderr_first) < 5:
                    self.stderr_first.append(line.decode(errors="replace").rstrip())
        except (OSError, ValueError):
            pass

    def kill(self) -> None:
        self.hsm.kill()

    def children(self) -> list[int]:
        """PIDs of the live (non-zombie) p11-kit-remote children of this member's server."""
        return probes.children(self.hsm.pid)

    def apply(self, fault: Fault, undoing: bool) -> None:
        """Do one fault to this member, or undo it."""
        kind = fault.kind
        if kind in ("kill", "hang", "all_down"):
            mode = fault.args.get("mode", kind)
            if not undoing:
                self.down.add(mode)
                if mode == "kill":
                    self.kill()
                else:
                    self.hsm.hang()
            else:
                if mode == "kill":
                    self.start_server()
                else:
                    self.hsm.resume()
                self.down.discard(mode)
        elif kind == "restart":
            self.down.add("restart")
            self.kill()
            self.start_server()
            self.down.discard("restart")
        elif kind in ("latency", "slow"):
            if kind == "slow":
                (self.down.discard if undoing else self.down.add)("slow")
            self.relay.latency = 0.0 if undoing else fault.args["seconds"]
        elif kind == "rewrite":
            if undoing:
                self.relay.clear(fault.args["call"])
            else:
                self.relay.fail(fault.args["call"], int(fault.args["rv"], 16), fault.args["count"],
                                forward=fault.args["forward"])
        elif kind == "reset":
            self.relay.reset_connections()

    def give_back(self) -> None:
        """Undo whatever the schedule left in place: no rewrites, no latency, the server running."""
        self.relay.clear()
        self.relay.latency = 0.0
        if self.hsm.running:
            self.hsm.resume()
        else:
            self.start_server()
        self.down.clear()


class Lab:
    """The members named ``names`` and the wrong-PIN standby, all in ``root``."""

    def __init__(self, root: Path, names: list[str]) -> None:
        self.root = root
        self.names = names
        self.members: list[Member] = []
        self.by_name: dict[str, Member] = {}
        self.wrong: NetworkHSM | None = None  # the standby's server

    def start(self, pin: str) -> tuple[SoftHSMToken, ec.EllipticCurvePublicKey]:
        """Provision a token with PIN ``pin`` and one replica per member and the standby, and serve
        them; the token and its public key. Whatever was started is in the lab, for :meth:`stop`."""
        master = SoftHSMToken(self.root / "master", label="soak", pin=pin, rsa_keys=(), ec_keys=(KEY,)).provision()
        public = serialization.load_der_public_key(master.public_key_der(KEY))
        assert isinstance(public, ec.EllipticCurvePublicKey)
        for name in self.names:
            m = Member(name, master.replicate(self.root / name), self.root)
            self.members.append(m)
            self.by_name[name] = m
            m.start_server()
            m.relay.start()
        self.wrong = NetworkHSM(master.replicate(self.root / WRONG), self.root / f"{WRONG}.sock").start()
        stderr = self.wrong.proc.stderr if self.wrong.proc is not None else None
        if stderr is not None:
            threading.Thread(target=stderr.read, daemon=True).start()
        return master, public

    def describe(self) -> str:
        wrong_pid = self.wrong.pid if self.wrong is not None else None
        return ("servers: " + ", ".join(f"{m.name} pid {m.hsm.pid} relay pid {m.relay.pid}" for m in self.members)
                + f", {WRONG} (wrong PIN) pid {wrong_pid}")

    def down_now(self) -> set[str]:
        """The members a fault has taken down and not given back yet."""
        return {m.name for m in self.members if m.down}

    def apply(self, fault: Fault, undoing: bool) -> None:
        for name in fault.members:
            self.by_name[name].apply(fault, undoing)

    def give_back(self) -> None:
        for m in self.members:
            m.give_back()

    def leftovers(self) -> tuple[dict[str, int], dict[str, int]]:
        """After close: the live p11-kit-remote children of each server (the standby's too), and
        the links still open through each relay."""
        left = {m.name: len(m.children()) for m in self.members}
        left[WRONG] = len(probes.children(self.wrong.pid if self.wrong is not None else None))
        links = {m.name: m.relay.connections for m in self.members}
        return left, links

    def wake(self) -> None:
        """Resume every member's server (a hung one must answer the close); never raises."""
        for m in self.members:
            try:
                m.hsm.resume()
            except Exception:
                pass

    def stop(self) -> None:
        """Stop every relay and server the lab started."""
        for m in self.members:
            m.relay.stop()
            m.kill()
        if self.wrong is not None:
            self.wrong.kill()
