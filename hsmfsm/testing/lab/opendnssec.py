"""OpenDNSSEC 2.1 in a temporary folder, signing a zone through a PKCS#11 token reached by p11-kit-client.

The lab's real DNSSEC signer: ``ods-enforcerd`` and ``ods-signerd`` from Debian's opendnssec
1:2.1.12 (``make test-clients`` installs it), configured for one token, one policy and one zone,
and driven the way an operator does (``ods-enforcer``, ``ods-signer``). Nothing in it knows about
hsmfsm: point it at any ``P11_KIT_SERVER_ADDRESS`` (a plain ``p11-kit server`` or ``hsmfsm
serve``) and judge the result with ``ldns-verify-zone``, which we did not write either.

What it takes to run OpenDNSSEC 2.1 outside /etc (``../shared/CLIENTS.md`` §3a, §4a, and the
2.1.12 source):

* **The database** is created from the packaged schema plus the one INSERT that
  ``ods-enforcer-db-setup`` runs (that tool has no ``-c`` and always reads /etc/opendnssec).
* **Keys are pre-generated** (:func:`generate_keys`) on the token itself before it is copied to
  the HA members, because a virtual slot cannot replicate key generation (``hsmfsm serve``
  answers CKR_FUNCTION_NOT_SUPPORTED). The enforcer runs with ``<ManualKeyGeneration/>``, so it
  never tries to generate, and each key enters its database with ``ods-enforcer key import``
  (enforcer/src/keystate/keystate_import_cmd.c): the locator is the hex CKA_ID, which libhsm
  looks up with C_FindObjects(CKA_ID), and the import needs the zone to exist already. Imported
  ``active`` keys are used as they are: the enforcer writes them into the signer configuration.
  The order in :meth:`OpenDNSSEC.bring_up` is policy import, zone add, key import, ``enforce``,
  and only then the signer. So two enforcer log lines are expected and harmless: "No keys
  available in HSM for policy lab" at zone add (nothing imported yet), and "unable to notify
  signer" (no signer runs yet; it reads the signconf when it starts).
* **The signer's control socket and pid file are compiled in**: conf.rng rejects
  ``<Signer><SocketFile>`` and ``<PidFile>`` (the parser would read them, the schema check
  comes first), so ``ods-signerd`` always uses /run/opendnssec/engine.sock and signerd.pid.
  Hence one signer per machine at a time: :class:`OpenDNSSEC` takes a lock there, refuses to
  start beside a running signer, and removes what it created when it stops.
* **The signer listens on 0.0.0.0:15354 by default** (UDP and TCP, for zone transfers): the
  configuration pins it to 127.0.0.1 and a free port.
* **Logging**: without ``<Syslog>`` the ``-d`` daemons log to stderr, into files here. A ``-v``
  on the command line replaces the configured verbosity (one ``-v`` logs errors only), so none
  is given.

Every daemon runs in a process group of its own and is stopped by its PID (SIGTERM, then
SIGKILL for the group); nothing is found by name.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ...p11.host import accepts
from .hsm import LabError, SoftHSMToken, find_module

#: Where ods-signerd keeps its control socket and pid file, whatever the configuration says.
SIGNER_RUN_DIR = Path("/run/opendnssec")
SCHEMA = Path("/usr/share/opendnssec/schema.sqlite")
#: DNSSEC algorithm 8 (RSASHA256): libhsm hashes in software and signs with CKM_RSA_PKCS.
RSASHA256 = 8
REPOSITORY = "hsm"
POLICY = "lab"

#: Debian package of each binary, for the error that says what to install.
_PACKAGES = {"ods-enforcerd": "opendnssec-enforcer-sqlite3", "ods-enforcer": "opendnssec-enforcer-sqlite3",
             "ods-kaspcheck": "opendnssec-enforcer-sqlite3",
             "ods-signerd": "opendnssec-signer", "ods-signer": "opendnssec-signer",
             "ldns-verify-zone": "ldnsutils"}

_KEYGEN = r"""
import os, sys, pkcs11
from pkcs11 import Attribute, KeyType
module, label, pin, bits, count = sys.argv[1:6]
token = pkcs11.lib(module).get_token(token_label=label)
with token.open(rw=True, user_pin=pin) as s:
    for _ in range(int(count)):
        ckaid = os.urandom(16)  # as libhsm does: 16 random bytes, the locator is their hex
        s.generate_keypair(KeyType.RSA, int(bits), id=ckaid, label=ckaid.hex(), store=True,
                           public_template={Attribute.VERIFY: True, Attribute.ENCRYPT: False,
                                            Attribute.WRAP: False},
                           private_template={Attribute.SIGN: True, Attribute.DECRYPT: False,
                                             Attribute.UNWRAP: False, Attribute.SENSITIVE: True,
                                             Attribute.EXTRACTABLE: False})
        print(ckaid.hex())
"""


@dataclass(frozen=True)
class DnssecKey:
    """A key pair that exists on the token: its role for OpenDNSSEC and its locator (hex CKA_ID)."""

    role: str  # KSK or ZSK: the lab policy has one of each
    locator: str
    bits: int = 2048
    algorithm: int = RSASHA256


def generate_keys(token: SoftHSMToken, roles: Sequence[str] = ("KSK", "ZSK"), bits: int = 2048) -> list[DnssecKey]:
    """Generate one RSA key pair per role on ``token`` directly with SoftHSM (never through a
    virtual slot), with CKA_ID = 16 random bytes and CKA_LABEL = their hex, as libhsm names the
    keys it generates. Call it before the token is replicated or served."""
    proc = subprocess.run([sys.executable, "-c", _KEYGEN, find_module("softhsm"), token.label, token.pin,
                           str(bits), str(len(roles))], env={**os.environ, **token.env},
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise LabError(f"key generation on {token.root} failed ({proc.returncode}): {proc.stderr.strip()}")
    locators = proc.stdout.split()
    return [DnssecKey(role, locator, bits) for role, locator in zip(roles, locators, strict=True)]


class Timeline:
    """What happened when, in seconds since the timeline began: printed by the tests for the README."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.wall_start = time.time()
        self.events: list[tuple[float, str]] = []

    def note(self, what: str, wall: float | None = None) -> float:
        """Record ``what`` now, or at the wall-clock time ``wall`` (a time.time() value, e.g. from a log)."""
        at = time.monotonic() - self.start if wall is None else wall - self.wall_start
        self.events.append((at, what))
        return at

    def __str__(self) -> str:
        return "\n".join(f"{at:8.2f} s  {what}" for at, what in sorted(self.events, key=lambda e: e[0]))


@dataclass
class Daemon:
    """One daemon in a process group of its own, its stderr and stdout in ``log``."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    _out: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM the daemon, wait ``grace`` seconds, then SIGKILL its group. Returns its exit code."""
        if self.running:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # and whatever it left in its group
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self._out.close()
        return self.proc.returncode


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise LabError(f"{binary} not found on PATH; install Debian package {_PACKAGES.get(binary, binary)} "
                       "(scripts/ensure-client-debs, run by make test-clients, does)")
    return path


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


@dataclass
class OpenDNSSEC:
    """ods-enforcerd and ods-signerd for one zone, signed with keys of one token.

    ``server_address`` is the P11_KIT_SERVER_ADDRESS both daemons get; ``module`` is the PKCS#11
    module they load (the stock p11-kit-client.so).

    ``resign_interval`` is the policy's Resign: the period of the signer's own re-sign task. The
    signer's scheduler sleeps at least 60 s between tasks (common/scheduler/schedule.c clamps the
    wait of a non-enforcer task to 60 s), so PT1M is the shortest that takes effect; a shorter
    one is accepted and runs every 60 s. ``refresh`` is the policy's Refresh: a signature is made
    anew when it expires within Refresh of the re-sign (signer/src/signer/rrset.c), so with the
    Validity of P14D the default P13DT23H59M30S renews every signature older than 30 s: each
    periodic re-sign signs on the token and writes a new SOA serial, where a production Refresh
    (P3D) lets most re-signs find nothing to do and skip the write. (Refresh must exceed Resign:
    ods-kaspcheck refuses PT0S, which the signer would read as "always".)
    """

    root: Path
    token_label: str
    pin: str
    server_address: str
    zone: str = "example.test"
    resign_interval: str = "PT1M"
    refresh: str = "P13DT23H59M30S"
    module: str = field(default_factory=lambda: find_module("p11-kit-client"))
    timeline: Timeline = field(default_factory=Timeline)
    port: int = field(default_factory=_free_loopback_port)
    enforcerd: Daemon | None = field(default=None, init=False)
    signerd: Daemon | None = field(default=None, init=False)
    _lock: IO[str] | None = field(default=None, init=False, repr=False)
    _made_run_dir: bool = field(default=False, init=False, repr=False)

    # -- files -----------------------------------------------------------------------------------

    @property
    def conf(self) -> Path:
        return self.root / "conf.xml"

    @property
    def enforcer_socket(self) -> Path:
        return self.root / "enforcer.sock"

    @property
    def unsigned(self) -> Path:
        return self.root / "unsigned" / self.zone

    @property
    def signed(self) -> Path:
        return self.root / "signed" / self.zone

    @property
    def signconf(self) -> Path:
        return self.root / "signconf" / f"{self.zone}.xml"

    @property
    def signerd_log(self) -> Path:
        return self.root / "signerd.log"

    @property
    def enforcerd_log(self) -> Path:
        return self.root / "enforcerd.log"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "P11_KIT_SERVER_ADDRESS": self.server_address}

    def write_config(self) -> None:
        """conf.xml, kasp.xml, the zone list, the unsigned zone and kasp.db, all under ``root``."""
        for sub in ("unsigned", "signed", "signconf", "enforcer", "signer"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <RepositoryList>
    <Repository name="{REPOSITORY}">
      <Module>{self.module}</Module>
      <TokenLabel>{self.token_label}</TokenLabel>
      <PIN>{self.pin}</PIN>
      <SkipPublicKey/>
    </Repository>
  </RepositoryList>
  <Common>
    <Logging><Verbosity>5</Verbosity></Logging>
    <PolicyFile>{self.root}/kasp.xml</PolicyFile>
    <ZoneListFile>{self.root}/zonelist.xml</ZoneListFile>
  </Common>
  <Enforcer>
    <Datastore><SQLite>{self.root}/kasp.db</SQLite></Datastore>
    <ManualKeyGeneration/>
    <PidFile>{self.root}/enforcerd.pid</PidFile>
    <SocketFile>{self.enforcer_socket}</SocketFile>
    <WorkingDirectory>{self.root}/enforcer</WorkingDirectory>
    <WorkerThreads>1</WorkerThreads>
  </Enforcer>
  <Signer>
    <WorkingDirectory>{self.root}/signer</WorkingDirectory>
    <WorkerThreads>2</WorkerThreads>
    <SignerThreads>2</SignerThreads>
    <Listener><Interface><Address>127.0.0.1</Address><Port>{self.port}</Port></Interface></Listener>
  </Signer>
</Configuration>
""")
        (self.root / "kasp.xml").write_text(f"""<?xml version="1.0" encoding="UTF-8"?>
<KASP>
  <Policy name="{POLICY}">
    <Description>hsmfsm lab: pre-generated RSASHA256 keys, manual key generation</Description>
    <Signatures>
      <Resign>{self.resign_interval}</Resign>
      <Refresh>{self.refresh}</Refresh>
      <Validity><Default>P14D</Default><Denial>P14D</Denial></Validity>
      <Jitter>PT0S</Jitter>
      <InceptionOffset>PT3600S</InceptionOffset>
      <MaxZoneTTL>PT300S</MaxZoneTTL>
    </Signatures>
    <Denial><NSEC/></Denial>
    <Keys>
      <TTL>PT300S</TTL>
      <RetireSafety>PT360S</RetireSafety>
      <PublishSafety>PT360S</PublishSafety>
      <Purge>P14D</Purge>
      <KSK>
        <Algorithm length="2048">{RSASHA256}</Algorithm><Lifetime>P365D</Lifetime>
        <Repository>{REPOSITORY}</Repository><ManualRollover/>
      </KSK>
      <ZSK>
        <Algorithm length="2048">{RSASHA256}</Algorithm><Lifetime>P90D</Lifetime>
        <Repository>{REPOSITORY}</Repository><ManualRollover/>
      </ZSK>
    </Keys>
    <Zone>
      <PropagationDelay>PT300S</PropagationDelay>
      <SOA><TTL>PT300S</TTL><Minimum>PT300S</Minimum><Serial>counter</Serial></SOA>
    </Zone>
    <Parent>
      <PropagationDelay>PT300S</PropagationDelay>
      <DS><TTL>PT300S</TTL></DS>
      <SOA><TTL>PT300S</TTL><Minimum>PT300S</Minimum></SOA>
    </Parent>
  </Policy>
</KASP>
""")
        (self.root / "zonelist.xml").write_text('<?xml version="1.0" encoding="UTF-8"?>\n<ZoneList></ZoneList>\n')
        z = self.zone
        self.unsigned.write_text(f"""$ORIGIN {z}.
$TTL 300
@    IN SOA ns1.{z}. hostmaster.{z}. 1 3600 900 604800 300
@    IN NS  ns1.{z}.
@    IN MX  10 mail.{z}.
@    IN TXT "signed through a PKCS#11 slot"
ns1  IN A   127.0.0.53
www  IN A   127.0.0.80
mail IN A   127.0.0.25
""")
        db = self.root / "kasp.db"
        db.unlink(missing_ok=True)
        with sqlite3.connect(db) as conn:
            conn.executescript(SCHEMA.read_text())
            conn.execute("INSERT INTO databaseVersion (version) VALUES (1)")  # what ods-enforcer-db-setup adds
        conn.close()

    # -- daemons ---------------------------------------------------------------------------------

    def _spawn(self, name: str, log: Path) -> Daemon:
        out = log.open("ab")
        try:
            proc = subprocess.Popen([_require(name), "-c", str(self.conf), "-d"], env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.root)
        except BaseException:
            out.close()
            raise
        return Daemon(name, proc, log, out)

    def start_enforcer(self, timeout: float = 30.0) -> None:
        self.enforcerd = self._spawn("ods-enforcerd", self.enforcerd_log)
        daemon = self.enforcerd
        if not wait_until(lambda: accepts(self.enforcer_socket) or not daemon.running, timeout) or not daemon.running:
            raise LabError(f"ods-enforcerd did not listen on {self.enforcer_socket} within {timeout}s: "
                           f"{self.enforcerd_log.read_text(errors='replace')[-2000:]}")
        self.timeline.note(f"ods-enforcerd started (pid {daemon.pid})")

    def _take_signer_run_dir(self) -> None:
        """ods-signerd's compiled-in socket and pid file: one lab signer at a time, none beside a real one."""
        if not SIGNER_RUN_DIR.exists():
            SIGNER_RUN_DIR.mkdir(mode=0o755, parents=True)
            self._made_run_dir = True
        lock = (SIGNER_RUN_DIR / "hsmfsm-lab.lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise LabError(f"another lab OpenDNSSEC holds {SIGNER_RUN_DIR}/hsmfsm-lab.lock: one run at a time "
                           "(ods-signerd's socket and pid file are compiled in)") from None
        self._lock = lock
        if accepts(SIGNER_RUN_DIR / "engine.sock"):
            raise LabError(f"an ods-signerd already answers on {SIGNER_RUN_DIR}/engine.sock; stop it first")
        pidfile = SIGNER_RUN_DIR / "signerd.pid"
        if pidfile.exists():
            pid = pidfile.read_text().strip()
            if pid.isdigit() and Path(f"/proc/{pid}").exists():
                raise LabError(f"ods-signerd pid {pid} ({pidfile}) is running; stop it first")
        # Stale files of a signer that died: they would make the new one refuse to start.
        for name in ("engine.sock", "signerd.pid"):
            (SIGNER_RUN_DIR / name).unlink(missing_ok=True)

    def _release_signer_run_dir(self) -> None:
        for name in ("engine.sock", "signerd.pid"):
            (SIGNER_RUN_DIR / name).unlink(missing_ok=True)
        if self._lock is not None:
            (SIGNER_RUN_DIR / "hsmfsm-lab.lock").unlink(missing_ok=True)
            self._lock.close()
            self._lock = None
        if self._made_run_dir:
            try:
                SIGNER_RUN_DIR.rmdir()
            except OSError:
                pass
            self._made_run_dir = False

    def start_signer(self, timeout: float = 30.0) -> None:
        self._take_signer_run_dir()
        self.signerd = self._spawn("ods-signerd", self.signerd_log)
        daemon = self.signerd
        sock = SIGNER_RUN_DIR / "engine.sock"
        if not wait_until(lambda: accepts(sock) or not daemon.running, timeout) or not daemon.running:
            raise LabError(f"ods-signerd did not listen on {sock} within {timeout}s: "
                           f"{self.signerd_log.read_text(errors='replace')[-2000:]}")
        self.timeline.note(f"ods-signerd started (pid {daemon.pid}), listening on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        """Stop both daemons (by PID, then their groups) and remove what the signer left in /run."""
        for daemon in (self.signerd, self.enforcerd):
            if daemon is not None and daemon.proc.returncode is None:
                daemon.stop()
        if self._lock is not None or self._made_run_dir:
            self._release_signer_run_dir()

    def __enter__(self) -> OpenDNSSEC:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- commands --------------------------------------------------------------------------------

    def _command(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            raise LabError(f"{' '.join(argv)} did not finish within {timeout}s: {out.strip()}") from None
        return subprocess.CompletedProcess(argv, proc.returncode, out, "")

    def enforcer(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``ods-enforcer ARGS`` against our enforcer; raise unless it succeeds."""
        done = self._command([_require("ods-enforcer"), "-s", str(self.enforcer_socket), *args], timeout)
        if done.returncode != 0:
            raise LabError(f"ods-enforcer {' '.join(args)} failed ({done.returncode}): {done.stdout.strip()}")
        return done.stdout

    def signer(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``ods-signer ARGS`` (the compiled-in socket); the caller judges the result."""
        return self._command([_require("ods-signer"), "-s", str(SIGNER_RUN_DIR / "engine.sock"), *args], timeout)

    # -- the bring-up ----------------------------------------------------------------------------

    def import_keys(self, keys: Sequence[DnssecKey]) -> None:
        """``ods-enforcer key import`` each pre-generated key as active for the zone (which must exist)."""
        # Local time, as the command's strptime+mktime reads it; a day ago: keys in use, not just made.
        inception = time.strftime("%Y-%m-%d-%H:%M:%S", time.localtime(time.time() - 86400))
        for key in keys:
            self.enforcer("key", "import", "--cka_id", key.locator, "--repository", REPOSITORY, "--zone", self.zone,
                          "--bits", str(key.bits), "--algorithm", str(key.algorithm), "--keystate", "active",
                          "--keytype", key.role, "--inception_time", inception)
            self.timeline.note(f"ods-enforcer key import {key.role} locator {key.locator}")

    def bring_up(self, keys: Sequence[DnssecKey], timeout: float = 60.0) -> None:
        """Configuration, database, enforcer, policy, zone, key import, signer, and a first signed zone."""
        self.write_config()
        check = self._command([_require("ods-kaspcheck"), "-c", str(self.conf)], 60.0)
        if check.returncode != 0:
            raise LabError(f"ods-kaspcheck refuses {self.conf}: {check.stdout.strip()}")
        self.start_enforcer()
        self.enforcer("policy", "import")
        self.enforcer("zone", "add", "--zone", self.zone, "--policy", POLICY, "--input", str(self.unsigned),
                      "--output", str(self.signed), "--signerconf", str(self.signconf))
        self.timeline.note(f"ods-enforcer zone add {self.zone}")
        self.import_keys(keys)
        self.enforcer("enforce")
        if not wait_until(lambda: self.signconf_locators() >= {k.locator for k in keys}, timeout, 0.2):
            raise LabError(f"the enforcer wrote no signer configuration with the imported keys within {timeout}s "
                           f"({self.signconf}): {self.enforcerd_log.read_text(errors='replace')[-3000:]}")
        self.timeline.note("signconf written with the imported keys")
        self.start_signer()
        if not wait_until(lambda: self.soa_serial() is not None, timeout, 0.1):
            raise LabError(f"ods-signerd wrote no signed zone within {timeout}s: "
                           f"{self.signerd_log.read_text(errors='replace')[-3000:]}")
        self.timeline.note(f"zone signed, SOA serial {self.soa_serial()}")

    # -- what came out ---------------------------------------------------------------------------

    def signconf_locators(self) -> set[str]:
        if not self.signconf.exists():
            return set()
        return set(re.findall(r"<Locator>([0-9a-fA-F]+)</Locator>", self.signconf.read_text()))

    def signed_records(self) -> list[list[str]]:
        if not self.signed.exists():
            return []
        return [line.split() for line in self.signed.read_text().splitlines() if line and not line.startswith(";")]

    def soa_serial(self) -> int | None:
        """The output zone's SOA serial, once the zone is signed (its SOA has an RRSIG)."""
        records = self.signed_records()
        soa = [r for r in records if len(r) > 6 and r[3] == "SOA"]
        sig = [r for r in records if len(r) > 4 and r[3] == "RRSIG" and r[4] == "SOA"]
        return int(soa[0][6]) if soa and sig else None

    def has_rrsig(self, owner: str, rrtype: str = "A") -> bool:
        name = f"{owner}.{self.zone}."
        return any(len(r) > 4 and r[0] == name and r[3] == "RRSIG" and r[4] == rrtype for r in self.signed_records())

    def resign(self, tag: str, timeout: float = 60.0) -> tuple[subprocess.CompletedProcess[str], float | None]:
        """The operator's re-sign: add ``TAG A`` to the unsigned zone, ``ods-signer sign ZONE``, and wait
        for TAG's RRSIG in the output. Returns the command's result and the seconds until the RRSIG
        appeared (None if it did not within ``timeout``)."""
        with self.unsigned.open("a") as f:
            f.write(f"{tag} IN A 127.0.1.1\n")
        t0 = time.monotonic()
        done = self.signer("sign", self.zone)
        signed = wait_until(lambda: self.has_rrsig(tag), timeout, 0.05)
        return done, (time.monotonic() - t0 if signed else None)

    def verify(self) -> subprocess.CompletedProcess[str]:
        """``ldns-verify-zone`` on the signed zone: every RRSIG against the zone's DNSKEYs, the NSEC chain."""
        return self._command([_require("ldns-verify-zone"), str(self.signed)], 60.0)

    def signer_log_lines(self, pattern: str) -> list[str]:
        if not self.signerd_log.exists():
            return []
        rx = re.compile(pattern)
        return [line for line in self.signerd_log.read_text(errors="replace").splitlines() if rx.search(line)]

    def stats_lines(self) -> list[str]:
        """The signer's ``[STATS] ZONE SERIAL ...`` lines: one per signed zone written."""
        return self.signer_log_lines(rf"\[STATS\] {re.escape(self.zone)} ")


__all__ = ["DnssecKey", "OpenDNSSEC", "Timeline", "generate_keys", "wait_until"]

