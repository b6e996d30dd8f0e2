"""``hsmfsm health POOL.yaml``: a check for Nagios, Icinga, a load balancer or a person.

It opens the pool (without its audit record: the daemon that runs the pool
keeps that), waits as ``Pool.open`` does, prints the pool's health and exits
by the Nagios plugin conventions:

- 0 OK: every active member serves;
- 1 WARNING: fewer do;
- 2 CRITICAL: no member serves, or a member is ``failed`` (a wrong PIN, a
  member that gave up: no retry mends it, a person must act);
- 3 UNKNOWN: the pool file is unusable (the message says why).

``--sign-test LABEL`` also signs a random message with the key ``LABEL`` on
each serving member and verifies the signature in software, as EJBCA's
health check does with a dedicated test key; a member whose test fails
counts as not serving. ``--json`` prints the same as one JSON document.
"""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import UTC, datetime
from typing import Any

from ..runtime.health import LEVELS, MemberHealth, PoolHealth

#: Nagios's words for the exit codes.
WORDS = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}


def sign_test(conn: Any, label: str) -> str | None:
    """Sign and verify with ``label`` on one member (a ``SlotConnection``); None if it passed,
    else what failed (never key material or a PIN)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

    from ..core.errors import HSMError

    data = b"hsmfsm health sign test " + os.urandom(16)
    try:
        key = conn.private_key(label)
        public = key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(key.sign(data, padding.PKCS1v15(), hashes.SHA256()), data, padding.PKCS1v15(),
                          hashes.SHA256())
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(key.sign(data, ec.ECDSA(hashes.SHA256())), data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            public.verify(key.sign(data), data)
        else:  # pragma: no cover - bind_private_key refuses other types first
            return f"no sign test for a {type(public).__name__}"
    except InvalidSignature:
        return f"the signature with {label} does not verify"
    except (HSMError, ValueError, TypeError) as exc:
        return str(exc)
    return None


def with_sign_tests(health: PoolHealth, failures: dict[str, str | None]) -> PoolHealth:
    """``health`` with every member whose sign test failed counted as not serving."""
    members: list[MemberHealth] = []
    for m in health.members:
        problem = failures.get(m.name)
        if m.serving and problem is not None:
            m = dataclasses.replace(m, serving=False, unhealthy_since=health.time, error=f"sign test: {problem}")
        members.append(m)
    healthy = all(m.serving for m in members if m.role == "active")
    since = None if healthy else (health.unhealthy_since or health.time)
    return dataclasses.replace(health, members=tuple(members), healthy=healthy, unhealthy_since=since,
                               serving=sum(m.serving for m in members))


def _iso(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def render(health: PoolHealth, tests: dict[str, str | None] | None) -> str:
    code = LEVELS[health.level]
    lines = [f"HSMFSM {WORDS[code]} - {health.summary()} | serving={health.serving};;;0;{len(health.members)}"]
    width = max(len(m.name) for m in health.members)
    for m in health.members:
        line = (f"  {m.name:<{width}}  {m.role:<7}  {m.state:<12} since {_iso(m.since)}"
                f"  sessions {m.sessions}  {m.last_code or 'CKR_OK'}")
        if tests is not None and m.name in tests:
            line += "  sign test " + ("ok" if tests[m.name] is None else "FAILED")
        if m.error:
            line += f"\n  {'':<{width}}  {m.error}"
        lines.append(line)
    if health.unhealthy_since is not None:
        lines.append(f"unhealthy since {_iso(health.unhealthy_since)}")
    return "\n".join(lines)


def run(path: str, *, as_json: bool = False, sign_test_label: str | None = None, wait: float | None = None) -> int:
    from ..config.pool_file import load_pool
    from ..runtime.pool import Pool

    try:
        spec = dataclasses.replace(load_pool(path), audit=None)
        pool = Pool.from_spec(spec)
    except Exception as exc:  # whatever makes the file unusable: UNKNOWN, with why
        message = f"{path}: {exc}" if path not in str(exc) else str(exc)
        if as_json:
            print(json.dumps({"pool_file": path, "status": WORDS[3], "exit": 3, "error": message}, indent=2))
        else:
            print(f"HSMFSM {WORDS[3]} - {message}")
        return 3
    try:
        pool.open(wait=wait)
        health = pool.health()
        tests: dict[str, str | None] | None = None
        if sign_test_label is not None:
            tests = {m.name: sign_test(pool.member(m.name), sign_test_label) for m in health.members if m.serving}
            health = with_sign_tests(health, tests)
    finally:
        pool.close()
    code = LEVELS[health.level]
    if as_json:
        doc: dict[str, Any] = {"status": WORDS[code], "exit": code, **health.as_dict()}
        if tests is not None:
            doc["sign_test"] = {"key_label": sign_test_label,
                                "members": {name: "ok" if problem is None else problem
                                            for name, problem in tests.items()}}
        print(json.dumps(doc, indent=2))
    else:
        print(render(health, tests))
    return code
