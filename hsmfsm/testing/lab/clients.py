"""Run REAL PKCS#11 clients against a p11-kit RPC address, and judge their output with openssl.

`hsmfsm serve` will present an HA pool as one PKCS#11 slot over p11-kit's RPC protocol, so the
proof that it works is that software we did not write (opensc's ``pkcs11-tool``, GnuTLS's
``p11tool``, OpenSSL with libp11's ``pkcs11`` engine) signs through the stock
``p11-kit-client.so`` and that ``openssl`` — not our code — accepts the signatures. Every function
here takes an ``address`` ("unix:path=SOCKET"), so the same harness runs against the real
``p11-kit server`` today (the baseline) and against ``hsmfsm serve`` later.

Each call starts one client in a process group of its own, with ``stdin`` closed (p11tool and
pkcs11-tool otherwise wait on a PIN or "insert token" prompt) and a timeout; on timeout the whole
group is SIGKILLed by its PID. Nothing is ever found or killed by name. The result is a
:class:`ClientRun`; callers decide whether failure is expected and call :meth:`ClientRun.check`
when it is not.

Quirks found on Debian 12 (opensc 0.23.0, gnutls 3.7.9, libp11 0.4.12, openssl 3.0) that shape
this API:

* ``pkcs11-tool --sign`` selects the private key by CKA_ID *only*: ``--label`` is ignored
  (the search template is just CKA_CLASS=PRIVATE_KEY), so without ``--id`` it signs with whichever
  private key the token lists first. :func:`pkcs11_sign` therefore resolves the label to a CKA_ID
  with ``pkcs11-tool -O`` and passes ``--id``, and refuses (:class:`LabError`) when the key has no
  CKA_ID or shares it, instead of silently signing with the wrong key.
* libp11 (the OpenSSL engine) pairs an EC private key with its public key by CKA_ID; without one,
  ``openssl req -x509`` fails with ``i2o_ECPublicKey: passed a null parameter``. ``dgst -sign``
  works either way.
* ``pkcs11-tool`` writes ECDSA signatures as raw r||s by default; ``openssl dgst -verify`` wants
  DER, which is ``--signature-format openssl``. ``CKM_ECDSA`` signs a digest, so the caller hashes.
* ``p11tool`` needs the PIN non-interactively: ``--set-pin PIN`` (or ``GNUTLS_PIN``) works; with
  neither it answers "No PIN given" on a closed stdin.
* The engine finds the module through ``PKCS11_MODULE_PATH`` (its default is p11-kit-proxy.so).
* Token public keys written by the lab are PKCS#1 (RSA) or SubjectPublicKeyInfo (EC) DER;
  ``openssl dgst -verify -keyform DER`` reads both, and :func:`openssl_verify_certificate` lets
  ``openssl pkey`` normalise both sides before comparing.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .hsm import LabError, find_module

#: Seconds a client may run before its process group is killed. One-shot clients finish in well
#: under a second against a healthy server; a hung server blocks them for ever (CLIENTS.md §2).
DEFAULT_TIMEOUT = 60.0

#: Debian package of each binary, for the error that says what to install.
PACKAGES: Mapping[str, str] = {"pkcs11-tool": "opensc", "p11tool": "gnutls-bin", "openssl": "openssl"}
ENGINE_PACKAGE = "libengine-pkcs11-openssl"

_PathLike = str | os.PathLike[str]
_SECRET_OPTIONS = frozenset({"--pin", "--so-pin", "--set-pin", "--set-so-pin", "-p"})
_OUTPUT_LIMIT = 4000


class ClientFailed(LabError):
    """A real client exited non-zero or timed out; the message carries its command and output."""

    def __init__(self, run: ClientRun, reason: str | None = None) -> None:
        self.run = run
        what = reason or (f"timed out after {run.seconds:.1f}s (process group killed)" if run.timed_out
                          else f"exited with {run.returncode}")
        super().__init__(
            f"{run.command}: {what}\n--- stdout ---\n{_tail(run.stdout)}\n--- stderr ---\n{_tail(run.stderr)}"
        )


@dataclass(frozen=True)
class ClientRun:
    """What one run of a real client did. ``argv`` is exact (PIN included); use :attr:`command`
    for messages, which masks the PIN."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False
    pid: int | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def output(self) -> str:
        """stdout and stderr together: the clients split their progress lines between the two."""
        return self.stdout + self.stderr

    @property
    def command(self) -> str:
        return shlex.join(_redact(self.argv))

    def check(self) -> ClientRun:
        """Return self, or raise :class:`ClientFailed` if the client failed or timed out."""
        if not self.ok:
            raise ClientFailed(self)
        return self


@dataclass(frozen=True)
class ListedObject:
    """One object as ``pkcs11-tool -O`` prints it. ``id_hex`` is "" when the object has no CKA_ID."""

    kind: str  # "Private Key Object", "Public Key Object", "Certificate Object", ...
    key_type: str  # "RSA", "EC", ... ("" when not printed)
    label: str | None
    id_hex: str


@dataclass(frozen=True)
class CertificateCheck:
    """openssl's verdict on a certificate: its self-signature, and whether it holds the expected key."""

    self_signature_ok: bool
    public_key_matches: bool
    runs: tuple[ClientRun, ...] = field(repr=False)

    @property
    def ok(self) -> bool:
        return self.self_signature_ok and self.public_key_matches

    def check(self) -> CertificateCheck:
        if not self.self_signature_ok:
            raise ClientFailed(self.runs[0], "self-signature rejected by openssl verify")
        if not self.public_key_matches:
            raise ClientFailed(self.runs[-1], "certificate's public key differs from the expected key")
        return self


# --- plumbing -------------------------------------------------------------------------------


def require_binary(name: str) -> str:
    """Path of a client binary, or a LabError naming the Debian package that ships it."""
    path = shutil.which(name)
    if path is None:
        package = PACKAGES.get(name, name)
        raise LabError(f"{name} not found on PATH; install Debian package {package} (scripts/ensure-debs does)")
    return path


def client_module() -> str:
    """The stock p11-kit-client.so that every client here loads."""
    return find_module("p11-kit-client")


@functools.cache
def engine_path() -> str:
    """Path of libp11's OpenSSL engine, found in openssl's own ENGINESDIR (not a guessed triplet)."""
    run = _run([require_binary("openssl"), "version", "-e"], {}, 30.0).check()
    match = re.search(r'ENGINESDIR:\s*"([^"]*)"', run.stdout)
    candidates = [Path(match.group(1)) / "pkcs11.so"] if match else []
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    raise LabError(f"OpenSSL pkcs11 engine not found ({run.stdout.strip()}); install Debian package {ENGINE_PACKAGE}")


def pkcs11_uri(token_label: str, object_label: str | None = None, *, object_type: str | None = None,
               pin: str | None = None) -> str:
    """An RFC 7512 URI as libp11 and GnuTLS read it; values are percent-encoded.

    The PIN goes in as the ``pin-value`` path attribute because that is the form libp11 0.4.12
    accepted in CLIENTS.md's runs.
    """
    parts = [f"token={_pct(token_label)}"]
    if object_label is not None:
        parts.append(f"object={_pct(object_label)}")
    if object_type is not None:
        parts.append(f"type={_pct(object_type)}")
    if pin is not None:
        parts.append(f"pin-value={_pct(pin)}")
    return "pkcs11:" + ";".join(parts)


def _pct(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _client_env(address: str) -> dict[str, str]:
    """The variables that point p11-kit-client at ``address``; only unix sockets are allowed."""
    if not address.startswith("unix:path="):
        raise LabError(f"only unix socket addresses are allowed (unix:path=...), got {address!r}")
    return {"P11_KIT_SERVER_ADDRESS": address}


def _redact(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        if arg in _SECRET_OPTIONS:
            hide_next = True
        out.append(re.sub(r"(pin-value=)[^;?&]*", r"\1***", arg))
    return out


def _tail(text: str) -> str:
    return text if len(text) <= _OUTPUT_LIMIT else "…" + text[-_OUTPUT_LIMIT:]


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGCONT)  # a stopped member must wake to die promptly
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _run(argv: Sequence[str], extra_env: Mapping[str, str], timeout: float) -> ClientRun:
    """Run one client in its own process group; on timeout (or any error here) kill the group."""
    env = {**os.environ, **extra_env}
    started = time.monotonic()
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)
    timed_out = False
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            try:
                out, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                out, err = b"", b""
    finally:
        if proc.returncode is None:
            _kill_group(proc.pid)
            proc.wait(timeout=10)
    seconds = time.monotonic() - started
    returncode = proc.returncode if proc.returncode is not None else -signal.SIGKILL
    return ClientRun(tuple(argv), returncode, out.decode(errors="replace"), err.decode(errors="replace"),
                     seconds, timed_out, proc.pid)


@contextmanager
def _der_file(public_key: bytes | _PathLike) -> Iterator[str]:
    """A path for ``public_key``: the path itself, or a temporary file holding the bytes."""
    if isinstance(public_key, bytes):
        with tempfile.TemporaryDirectory(prefix="hsmfsm-pub-") as tmp:
            path = Path(tmp) / "public.der"
            path.write_bytes(public_key)
            yield str(path)
    else:
        yield os.fspath(public_key)


# --- pkcs11-tool (opensc) ---------------------------------------------------------------------


def pkcs11_tool(address: str, *args: str, timeout: float = DEFAULT_TIMEOUT) -> ClientRun:
    """``pkcs11-tool --module p11-kit-client.so ARGS`` against ``address``."""
    argv = [require_binary("pkcs11-tool"), "--module", client_module(), *args]
    return _run(argv, _client_env(address), timeout)


def list_slots(address: str, *, timeout: float = DEFAULT_TIMEOUT) -> ClientRun:
    """``pkcs11-tool -L``; :func:`token_labels` reads the labels from its stdout."""
    return pkcs11_tool(address, "-L", timeout=timeout)


def token_labels(listing: str) -> list[str]:
    """Token labels in a ``pkcs11-tool -L`` listing (``  token label        : L``)."""
    return [m.group(1).strip() for m in re.finditer(r"^\s*token label\s*:\s*(.*)$", listing, re.MULTILINE)]


def pkcs11_list_objects(address: str, token_label: str, pin: str | None = None, *,
                        object_type: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> ClientRun:
    """``pkcs11-tool --token-label L [--login --pin P] -O [--type T]``; private keys need the PIN.

    ``object_type`` is pkcs11-tool's ``--type`` (privkey, pubkey, cert, data, secrkey).
    """
    args = ["--token-label", token_label]
    if pin is not None:
        args += ["--login", "--pin", pin]
    args.append("-O")
    if object_type is not None:
        args += ["--type", object_type]
    return pkcs11_tool(address, *args, timeout=timeout)


def parse_objects(listing: str) -> list[ListedObject]:
    """The objects of a ``pkcs11-tool -O`` listing, in the order the token returned them."""
    objects: list[ListedObject] = []
    kind: str | None = None
    key_type = ""
    label: str | None = None
    id_hex = ""

    def flush() -> None:
        if kind is not None:
            objects.append(ListedObject(kind, key_type, label, id_hex))

    for line in listing.splitlines():
        header = re.match(r"^(\S[^;]*Object)\s*(?:;\s*(.*))?$", line)
        if header:
            flush()
            rest = (header.group(2) or "").split()
            kind, key_type = header.group(1).strip(), rest[0] if rest else ""
            label, id_hex = None, ""
            continue
        attr = re.match(r"^\s+(label|ID):\s*(.*?)\s*$", line)
        if attr and kind is not None:
            if attr.group(1) == "label":
                label = attr.group(2)
            else:
                id_hex = attr.group(2).lower()
    flush()
    return objects


def select_key_id(objects: Sequence[ListedObject], key_label: str) -> str:
    """The CKA_ID (hex) that makes ``pkcs11-tool --sign --id`` use the private key ``key_label``.

    pkcs11-tool 0.23 ignores ``--label`` when signing and takes the first private key matching
    ``--id``, so the label must map to an ID no other private key has. "" means "pass no --id",
    which is only correct when ``key_label`` is the token's only private key.
    """
    private = [o for o in objects if o.kind == "Private Key Object"]
    matches = [o for o in private if o.label == key_label]
    if not matches:
        raise LabError(f"no private key labelled {key_label!r} (private keys: {[o.label for o in private]})")
    if len(matches) > 1:
        raise LabError(f"{len(matches)} private keys are labelled {key_label!r}; pkcs11-tool cannot choose")
    key = matches[0]
    if not key.id_hex:
        if len(private) == 1:
            return ""
        raise LabError(
            f"private key {key_label!r} has no CKA_ID and is not the only private key: pkcs11-tool "
            "(opensc 0.23) selects signing keys by --id only and ignores --label, so it would sign "
            "with another key; give the keys CKA_IDs"
        )
    sharing = [o.label for o in private if o.id_hex == key.id_hex]
    if len(sharing) > 1:
        raise LabError(f"CKA_ID {key.id_hex} is shared by private keys {sharing}; pkcs11-tool cannot choose")
    return key.id_hex


def pkcs11_sign(address: str, token_label: str, pin: str, key_label: str, mechanism: str,
                data_path: _PathLike, out_path: _PathLike, *, key_id: str | None = None,
                signature_format: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> ClientRun:
    """``pkcs11-tool --sign`` of ``data_path`` into ``out_path``.

    ``mechanism`` is pkcs11-tool's name: "SHA256-RSA-PKCS" hashes inside the token; "ECDSA" signs
    ``data_path`` as is, so pass a digest (e.g. SHA-256 of the data). ``signature_format`` is
    pkcs11-tool's ECDSA format: None/"rs" (raw r||s), "sequence", or "openssl" (DER, what
    ``openssl dgst -verify`` reads). ``key_id`` (hex) skips resolving ``key_label`` to its CKA_ID,
    which otherwise costs one ``pkcs11-tool -O`` run; a failed listing raises
    :class:`ClientFailed`, an ambiguous key :class:`LabError` (see :func:`select_key_id`).
    """
    if key_id is None:
        listing = pkcs11_list_objects(address, token_label, pin, object_type="privkey", timeout=timeout).check()
        key_id = select_key_id(parse_objects(listing.stdout), key_label)
    # --label is kept although 0.23 ignores it for --sign: newer opensc also matches on it.
    args = ["--token-label", token_label, "--login", "--pin", pin, "--sign", "--mechanism", mechanism,
            "--label", key_label]
    if key_id:
        args += ["--id", key_id]
    args += ["--input-file", os.fspath(data_path), "--output-file", os.fspath(out_path)]
    if signature_format is not None:
        args += ["--signature-format", signature_format]
    return pkcs11_tool(address, *args, timeout=timeout)


# --- p11tool (GnuTLS) -------------------------------------------------------------------------


def p11tool_test_sign(address: str, token_label: str, pin: str, key_label: str, *,
                      timeout: float = DEFAULT_TIMEOUT) -> ClientRun:
    """``p11tool --provider MOD --login --set-pin P --test-sign "pkcs11:token=L;object=K"``.

    GnuTLS signs, then verifies the signature itself against the key's parameters and against the
    token's public key; success prints "Verifying against public key in the token... ok".
    ``--set-pin`` is what makes it non-interactive (``GNUTLS_PIN`` works too).
    """
    argv = [require_binary("p11tool"), "--provider", client_module(), "--login", "--set-pin", pin,
            "--test-sign", pkcs11_uri(token_label, key_label)]
    return _run(argv, _client_env(address), timeout)


# --- openssl with libp11's pkcs11 engine ------------------------------------------------------


def _engine_env(address: str) -> dict[str, str]:
    engine_path()  # fail early, naming the package, rather than with openssl's "invalid engine"
    return {**_client_env(address), "PKCS11_MODULE_PATH": client_module()}


def openssl_engine_sign(address: str, token_label: str, pin: str, key_label: str, data_path: _PathLike,
                        out_path: _PathLike, digest: str = "sha256", *,
                        timeout: float = DEFAULT_TIMEOUT) -> ClientRun:
    """``openssl dgst -DIGEST -engine pkcs11 -keyform engine -sign URI -out OUT DATA`` (RSA or EC).

    The result is what ``openssl dgst -verify`` reads: PKCS#1 v1.5 for RSA, DER ECDSA for EC.
    """
    uri = pkcs11_uri(token_label, key_label, object_type="private", pin=pin)
    argv = [require_binary("openssl"), "dgst", f"-{digest}", "-engine", "pkcs11", "-keyform", "engine",
            "-sign", uri, "-out", os.fspath(out_path), os.fspath(data_path)]
    return _run(argv, _engine_env(address), timeout)


def openssl_engine_req_x509(address: str, token_label: str, pin: str, key_label: str,
                            out_cert_path: _PathLike, subject: str = "/CN=hsmfsm test", *, days: int = 1,
                            digest: str = "sha256", timeout: float = DEFAULT_TIMEOUT) -> ClientRun:
    """``openssl req -new -x509 -engine pkcs11 -keyform engine -key URI -subj S``: a self-signed
    certificate whose key and signature both come from the token (libp11 reads the public half
    from the token too, which for EC needs the keys to share a CKA_ID)."""
    uri = pkcs11_uri(token_label, key_label, object_type="private", pin=pin)
    argv = [require_binary("openssl"), "req", "-new", "-x509", "-engine", "pkcs11", "-keyform", "engine",
            "-key", uri, "-subj", subject, "-days", str(days), f"-{digest}", "-out", os.fspath(out_cert_path)]
    return _run(argv, _engine_env(address), timeout)


# --- openssl as the judge ---------------------------------------------------------------------


def openssl_verify(public_key: bytes | _PathLike, data_path: _PathLike, sig_path: _PathLike,
                   digest: str = "sha256", *, timeout: float = DEFAULT_TIMEOUT) -> ClientRun:
    """``openssl dgst -DIGEST -verify PUB.der -keyform DER -signature SIG DATA``.

    ``public_key`` is DER bytes or a DER file (PKCS#1 RSA or SubjectPublicKeyInfo). Exit 0 and
    "Verified OK" mean openssl accepted it; "Verification failure" (exit 1) that it did not.
    ECDSA signatures must be DER (pkcs11-tool ``--signature-format openssl``).
    """
    with _der_file(public_key) as pub:
        argv = [require_binary("openssl"), "dgst", f"-{digest}", "-verify", pub, "-keyform", "DER",
                "-signature", os.fspath(sig_path), os.fspath(data_path)]
        return _run(argv, {}, timeout)


def openssl_verify_certificate(cert_path: _PathLike, public_key: bytes | _PathLike, *,
                               timeout: float = DEFAULT_TIMEOUT) -> CertificateCheck:
    """Let openssl check a self-signed certificate and compare its key with ``public_key`` (DER).

    ``openssl verify -check_ss_sig -CAfile CERT CERT``: a trust anchor's own signature is not
    checked without ``-check_ss_sig``, and that signature is the one the token made. Then
    ``openssl x509 -pubkey`` extracts the certificate's key and ``openssl pkey`` re-encodes both it
    and ``public_key`` as SubjectPublicKeyInfo DER, so PKCS#1 and SPKI inputs compare equal.
    """
    openssl = require_binary("openssl")
    cert = os.fspath(cert_path)
    verify = _run([openssl, "verify", "-check_ss_sig", "-CAfile", cert, cert], {}, timeout)
    with _der_file(public_key) as pub, tempfile.TemporaryDirectory(prefix="hsmfsm-cert-") as tmp:
        pem, from_cert, from_key = (os.path.join(tmp, n) for n in ("cert-pub.pem", "cert-pub.der", "key.der"))
        runs = [verify,
                _run([openssl, "x509", "-in", cert, "-noout", "-pubkey", "-out", pem], {}, timeout),
                _run([openssl, "pkey", "-pubin", "-in", pem, "-outform", "DER", "-out", from_cert], {}, timeout),
                _run([openssl, "pkey", "-pubin", "-inform", "DER", "-in", pub, "-outform", "DER", "-out", from_key],
                     {}, timeout)]
        for run in runs[1:]:
            run.check()
        matches = Path(from_cert).read_bytes() == Path(from_key).read_bytes()
    return CertificateCheck(verify.ok and cert + ": OK" in verify.stdout, matches, tuple(runs))


__all__ = [
    "DEFAULT_TIMEOUT", "ENGINE_PACKAGE", "PACKAGES", "CertificateCheck", "ClientFailed", "ClientRun",
    "ListedObject", "client_module", "engine_path", "list_slots", "openssl_engine_req_x509",
    "openssl_engine_sign", "openssl_verify", "openssl_verify_certificate", "p11tool_test_sign",
    "parse_objects", "pkcs11_list_objects", "pkcs11_sign", "pkcs11_tool", "pkcs11_uri", "require_binary",
    "select_key_id", "token_labels",
]
