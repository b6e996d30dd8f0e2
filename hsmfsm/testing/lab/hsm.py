"""A private HSM lab: SoftHSM tokens and network HSMs made of `p11-kit server`.

The demo, the benchmark and the tests all need real PKCS#11 tokens that they
can provision, kill, hang and restart without touching anything outside a
temporary directory. This module is that lab. It never finds a process by
name: every server is started in its own process group and stopped by PID
(docs/FACTS.md: `ps | grep p11-kit` does not even see the server, its argv[0] is
`server`).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...p11.host import CLIENT_CANDIDATES, accepts, live_group_members

SOFTHSM_UTIL = "softhsm2-util"
P11_KIT = "p11-kit"

_MODULE_CANDIDATES = {
    "softhsm": ["/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/*/softhsm/libsofthsm2.so"],
    "p11-kit-client": list(CLIENT_CANDIDATES),
    "p11-kit-proxy": ["/usr/lib/*/p11-kit-proxy.so", "/usr/lib/p11-kit-proxy.so"],
}


class LabError(RuntimeError):
    """The lab could not provision or start something; the message says what."""


def find_module(kind: str) -> str:
    """Return the path of a PKCS#11 module of this machine (`softhsm`, `p11-kit-client`, `p11-kit-proxy`).

    Globs instead of hard-coding the multiarch triplet, so the lab works on
    any Debian architecture.
    """
    for pattern in _MODULE_CANDIDATES[kind]:
        for path in sorted(glob.glob(pattern)):
            if os.path.exists(path):
                return path
    raise LabError(f"PKCS#11 module {kind!r} not found; install Debian packages softhsm2 p11-kit-modules")


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise LabError(f"{binary} not found on PATH; install Debian packages softhsm2 p11-kit (make test does)")
    return path


_KEYGEN = r"""
import sys, pkcs11
from pkcs11 import KeyType, Mechanism
from pkcs11.util.rsa import encode_rsa_public_key
from pkcs11.util.ec import encode_named_curve_parameters, encode_ec_public_key
module, label, pin, outdir, rsa_labels, ec_labels = sys.argv[1:7]
lib = pkcs11.lib(module)
token = lib.get_token(token_label=label)
rsa_labels, ec_labels = list(filter(None, rsa_labels.split(","))), list(filter(None, ec_labels.split(",")))
ids = {kl: bytes([n + 1]) for n, kl in enumerate(rsa_labels + ec_labels)}
with token.open(rw=True, user_pin=pin) as s:
    for kl in rsa_labels:
        pub, _ = s.generate_keypair(KeyType.RSA, 2048, label=kl, id=ids[kl], store=True)
        open(f"{outdir}/{kl}.pub.der", "wb").write(encode_rsa_public_key(pub))
    for kl in ec_labels:
        params = s.create_domain_parameters(KeyType.EC, {
            pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
        pub, _ = params.generate_keypair(label=kl, id=ids[kl], store=True)
        open(f"{outdir}/{kl}.pub.der", "wb").write(encode_ec_public_key(pub))
"""

_REPLACE_KEY = r"""
import sys, pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.util.rsa import encode_rsa_public_key
from pkcs11.util.ec import encode_named_curve_parameters, encode_ec_public_key
module, label, pin, outdir, key_label, kind, key_id = sys.argv[1:8]
key_id = bytes.fromhex(key_id)
lib = pkcs11.lib(module)
token = lib.get_token(token_label=label)
with token.open(rw=True, user_pin=pin) as s:
    for klass in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
        for obj in list(s.get_objects({Attribute.CLASS: klass, Attribute.LABEL: key_label})):
            obj.destroy()
    if kind == "rsa":
        pub, _ = s.generate_keypair(KeyType.RSA, 2048, label=key_label, id=key_id, store=True)
        der = encode_rsa_public_key(pub)
    else:
        params = s.create_domain_parameters(KeyType.EC, {
            Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
        pub, _ = params.generate_keypair(label=key_label, id=key_id, store=True)
        der = encode_ec_public_key(pub)
    open(f"{outdir}/{key_label}.pub.der", "wb").write(der)
"""


@dataclass
class SoftHSMToken:
    """A SoftHSM token in its own token directory, with its own config file.

    `rsa_keys` and `ec_keys` are the labels of the RSA-2048 and ECDSA P-256
    key pairs generated at provisioning; their public keys are written as DER
    next to the token so that signatures can be verified without the HSM.
    Each key pair has a CKA_ID (:meth:`key_id`: 01, 02 ... in that order), as
    deployed keys do: pkcs11-tool and the OpenSSL engine select keys by id.
    """

    root: Path
    label: str = "hsmfsm-lab"
    pin: str = "1234"
    so_pin: str = "5678"
    rsa_keys: tuple[str, ...] = ("rsa",)
    ec_keys: tuple[str, ...] = ("ec",)

    @property
    def conf(self) -> Path:
        return self.root / "softhsm2.conf"

    @property
    def tokendir(self) -> Path:
        return self.root / "tokens"

    @property
    def env(self) -> dict[str, str]:
        """Environment that points SoftHSM at this token directory."""
        return {"SOFTHSM2_CONF": str(self.conf)}

    def key_id(self, key_label: str) -> bytes:
        """The CKA_ID the key pair ``key_label`` was provisioned with."""
        labels = [*self.rsa_keys, *self.ec_keys]
        return bytes([labels.index(key_label) + 1])

    def public_key_der(self, key_label: str) -> bytes:
        return (self.root / f"{key_label}.pub.der").read_bytes()

    def _write_conf(self) -> None:
        self.tokendir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"directories.tokendir = {self.tokendir}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )

    def provision(self) -> SoftHSMToken:
        """Create the token and its key pairs. Idempotent only on an empty root."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_conf()
        env = {**os.environ, **self.env}
        _run([_require(SOFTHSM_UTIL), "--init-token", "--free", "--label", self.label,
              "--pin", self.pin, "--so-pin", self.so_pin], env)
        _run([sys.executable, "-c", _KEYGEN, find_module("softhsm"), self.label, self.pin,
              str(self.root), ",".join(self.rsa_keys), ",".join(self.ec_keys)], env)
        return self

    def replicate(self, root: Path) -> SoftHSMToken:
        """An HA replica: same label, serial and keys, in a token directory of its own (docs/FACTS.md)."""
        copy = SoftHSMToken(Path(root), self.label, self.pin, self.so_pin, self.rsa_keys, self.ec_keys)
        copy.root.mkdir(parents=True, exist_ok=True)
        copy._write_conf()
        shutil.rmtree(copy.tokendir)
        shutil.copytree(self.tokendir, copy.tokendir)
        for der in self.root.glob("*.pub.der"):
            shutil.copy(der, copy.root / der.name)
        return copy

    def replace_key(self, key_label: str) -> SoftHSMToken:
        """Destroy the key pair labelled ``key_label`` and generate another under the same label (and
        rewrite its ``.pub.der``): on a replica, a member that is not one. Call it before the token is
        served (a running SoftHSM may not see objects change under it)."""
        if key_label in self.rsa_keys:
            kind = "rsa"
        elif key_label in self.ec_keys:
            kind = "ec"
        else:
            raise LabError(f"{self.root}: no key labelled {key_label!r} was provisioned here")
        _run([sys.executable, "-c", _REPLACE_KEY, find_module("softhsm"), self.label, self.pin, str(self.root),
              key_label, kind, self.key_id(key_label).hex()], {**os.environ, **self.env})
        return self


def _run(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise LabError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")


@dataclass
class NetworkHSM:
    """A SoftHSM token served by `p11-kit server` on a unix socket: a network HSM we can break.

    The server runs in a process group of its own, because it forks one
    `p11-kit-remote` child per client: killing only the listener would leave
    existing connections alive (docs/FACTS.md). `kill`, `hang` and `resume` signal the
    whole group.
    """

    token: SoftHSMToken
    socket_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """Value for P11_KIT_SERVER_ADDRESS."""
        return f"unix:path={self.socket_path}"

    @property
    def client_env(self) -> dict[str, str]:
        return {"P11_KIT_SERVER_ADDRESS": self.address}

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 10.0) -> NetworkHSM:
        if self.proc is not None and self.proc.poll() is None:
            raise LabError(f"server for {self.socket_path} already running (pid {self.proc.pid})")
        # A SIGKILLed server leaves its socket file; clients would see "refused".
        self.socket_path.unlink(missing_ok=True)
        env = {**os.environ, **self.token.env}
        self.proc = subprocess.Popen(
            [_require(P11_KIT), "server", "--provider", find_module("softhsm"), "-f", "-s",
             "-n", str(self.socket_path), f"pkcs11:token={self.token.label}"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise LabError(f"p11-kit server exited with {self.proc.returncode}: {err.strip()}")
            if accepts(self.socket_path):
                return self
            time.sleep(0.01)
        self.kill()
        raise LabError(f"p11-kit server did not listen on {self.socket_path} within {timeout}s")

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """The HSM dies: the listener and every per-client child, at once."""
        proc = self.proc
        if proc is None:
            return
        self._signal(signal.SIGCONT)  # a stopped process group must wake to die promptly
        self._signal(signal.SIGKILL)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        # The per-client children die with the listener; as orphans they are reaped by PID 1,
        # which in a container can take seconds. Dead (zombie) is what matters here.
        _wait_until(lambda: not live_group_members(proc.pid), 5.0)
        if proc.stderr:
            proc.stderr.close()
        self.proc = None

    def hang(self) -> None:
        """The HSM hangs (or the link drops every packet): SIGSTOP the whole group."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def restart(self) -> NetworkHSM:
        self.kill()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def load_raw_client(address: str, name: str = "raw-client") -> Any:
    """A plain python-pkcs11 ``lib`` on a p11-kit-client instance of its own (its own socket),
    for baselines and wire tests that must bypass hsmfsm (:func:`hsmfsm.p11.raw.load_raw_client`)."""
    from ...p11.raw import load_raw_client as load

    return load(find_module("p11-kit-client"), address, name)
