"""Load HA pool files: several HSM members, one policy, a balancing rule and a recovery rule.

A pool file is read by the same people, under the same pressure, as a policy
file, so it is checked the same way and by the same machinery
(:mod:`hsmfsm.config.policy_file`): the YAML is composed with line numbers and the
alias-bomb guards, validated against ``pool.schema.json`` (the one definition
of the format), and every mistake comes back as one line,
``FILE:LINE: FIELD: what is wrong``. What the schema cannot say is checked
here: member names are unique, at least one member is active, PINs come from
the environment or a file, ``${VAR}`` references resolve, and the policy
exists and is valid. A policy written inline keeps the pool file's line
numbers; a referenced policy file keeps its own.

:class:`~hsmfsm.core.policy.PolicyError` is the only exception that leaves this
module, whatever the input. Nothing here connects to an HSM or opens a module:
``hsmfsm check`` must work on a CI machine that has neither.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn, TextIO, Union

import yaml
from jsonschema import Draft202012Validator, ValidationError, validators

from ..core.policy import Policy, PolicyError
from .pin import PinError, PinSource
from .policy_file import (
    MAX_FILE_BYTES,
    ROOT_FIELD,
    SHIPPED_DIR,
    FieldPath,
    Issue,
    _attempts,
    _Builder,
    _check_one,
    _compose,
    _did_you_mean,
    _Doc,
    _duration_aware,
    _fail,
    _field,
    _fields,
    _issues,
    _missing,
    _Origin,
    _origin,
    _read_text,
    _say,
    _seconds,
    _shipped,
    _show,
    load_policy,
    shipped_policies,
)

#: Shipped example pools live beside the shipped policies; ``shipped_policies`` leaves them out.
POOLS_DIR = SHIPPED_DIR
POOL_SCHEMA_PATH = Path(__file__).parent / "pool.schema.json"

#: The FIELD part of messages about the pool file's top level.
POOL_FIELD = "(pool)"

PoolSource = Union[str, "os.PathLike[str]", Mapping[str, Any]]
"""What :func:`load_pool` accepts: a path, a shipped pool's name, or inline content."""


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class MemberSpec:
    """One member as the pool file declares it, ``${VAR}`` already expanded.

    ``pin`` is where the PIN comes from (``env:NAME`` or ``file:PATH``), never
    the PIN: the PIN is read at each login by :class:`~hsmfsm.config.pin.PinSource`.
    ``env`` is set while the member's own module instance is loaded.
    """

    name: str
    module: str
    token_label: str
    pin: str
    env: Mapping[str, str]
    standby: bool = False
    #: ``none`` (the module is loaded here) or ``process`` (behind a private host, :mod:`hsmfsm.p11.host`).
    isolation: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))


@dataclass(frozen=True, slots=True)
class PoolRecovery:
    """How failed members come back.

    ``mode``: ``background`` (each member's supervisor retries and probes on
    its own) or ``in_call`` (vendor HA semantics: only inside a caller's
    call). ``interval``: seconds between attempts (X). ``max_attempts``:
    attempts before the member stays failed until recovered by hand (N;
    ``None``: never gives up).
    """

    mode: str
    interval: float
    max_attempts: int | None


@dataclass(frozen=True, slots=True)
class AuditSpec:
    """Where the pool's audit record goes (:class:`hsmfsm.audit.AuditLog`'s arguments).

    ``rotate_bytes``: ``None`` never rotates; ``keep``: ``None`` keeps every rotated file.
    """

    path: Path
    rotate_bytes: int | None
    keep: int | None
    fsync: bool


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """A whole pool file, checked: what :meth:`hsmfsm.runtime.pool.Pool.from_spec` builds a pool from."""

    name: str
    policy: Policy
    balance: str
    recovery: PoolRecovery
    members: tuple[MemberSpec, ...]
    source: str
    audit: AuditSpec | None = None


# --------------------------------------------------------------------------- public API


def load_pool(src: PoolSource, /, *, source: str | None = None, environment: bool = True) -> PoolSpec:
    """Load, check and build a pool.

    ``src`` is a path, the name of a shipped pool (``"ha-pool"``), or an
    already-parsed pool (a mapping). ``source`` names the origin in error
    messages (default: the path as given, or ``<inline>``); for a mapping, a
    relative ``policy`` path is resolved from its directory.

    ``${VAR}`` in ``module`` and ``env`` values is expanded from the process
    environment now, so a pool file can point at per-deployment sockets.
    ``environment=False`` checks the references' form but keeps them as
    written: for drawing a pool on a machine that will not run it.

    Raises :class:`PolicyError` (and nothing else) when the pool is wrong.
    """
    origin = _pool_origin(src, source)
    doc, policy_node = _read_pool(origin)
    _validate_pool(doc)
    data = _with_defaults(doc.data, _pool_schema())
    recovery = _with_defaults(data.get("recovery", {}), _pool_schema()["properties"]["recovery"])
    members = _members(doc, environment)
    policy = _policy(doc, origin, data["policy"], policy_node)
    return PoolSpec(
        name=data["pool"],
        policy=policy,
        balance=data["balance"],
        recovery=PoolRecovery(**_fields(recovery, interval=_seconds, max_attempts=_attempts)),
        members=members,
        source=doc.label,
        audit=_audit(doc, origin, environment),
    )


def is_pool_file(path: Any) -> bool:
    """Whether ``path`` is a YAML file whose top level has a ``pool:`` key.

    A look at the text, not a parse: ``hsmfsm check`` must send a broken pool
    file to the pool loader (to hear about the pool's mistake, not that
    ``pool`` is an unknown policy field), and it must never fail itself, so
    anything unreadable is simply "not a pool" and the policy loader reports it.
    """
    try:
        file = Path(path)
        if not file.is_file():  # a FIFO or a device could block
            return False
        with file.open("rb") as fh:
            head = fh.read(MAX_FILE_BYTES)
        return _POOL_KEY.search(head) is not None
    except Exception:
        return False


def check_any_files(paths: list[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Check policy and pool files for ``hsmfsm check``: 0 if every file loads, 2 otherwise.

    Each file goes to the pool loader when :func:`is_pool_file` says so, else
    to the policy loader, whose output this repeats exactly: ``OK path
    (policy NAME)``, ``OK path (pool NAME, N members)``, or the one-line
    error on ``err``. Never a traceback: CI logs are read by people.
    """
    out, err = out or sys.stdout, err or sys.stderr
    if not paths:
        _say(err, "no policy or pool files given")
        return 2
    results = [_check_pool(path, out, err) if is_pool_file(path) else _check_one(path, out, err)
               for path in paths]
    return 0 if all(results) else 2


def shipped_pools() -> list[str]:
    """Names of the example pools shipped with hsmfsm (the pool files in ``policies/``)."""
    return sorted(p.stem for p in POOLS_DIR.glob("*.yaml") if is_pool_file(p))


def pool_schema() -> dict[str, Any]:
    """A copy of the JSON Schema of the pool format (``pool.schema.json``)."""
    return copy.deepcopy(_pool_schema())


# --------------------------------------------------------------------------- reading


#: A top-level ``pool:`` key: at column 0 (after an optional BOM), quoted or not.
_POOL_KEY = re.compile(rb"^(?:\xef\xbb\xbf)?(?:pool|\"pool\"|'pool')[ \t]*:(?:[ \t\r\n]|$)", re.MULTILINE)


def _shipped_pool(name: str) -> Path | None:
    """Pools and policies share the folder (and the rule for names): a shipped file that is a pool."""
    path = _shipped(name)
    return path if path is not None and is_pool_file(path) else None


def _pool_origin(src: Any, source: str | None) -> _Origin:
    """Where the pool comes from; the same rules as policies, with shipped pools for names."""
    return _origin(src, source, 1, "pool", _shipped_pool, shipped_pools)


def _read_pool(origin: _Origin) -> tuple[_Doc, yaml.Node | None]:
    """The pool as plain data with the line of every field, and the YAML node of its ``policy``.

    The node is kept so that an inline policy is loaded from it and its errors
    carry the pool file's real line numbers.
    """
    builder = _Builder(origin.label)
    if origin.path is None:
        return _Doc(builder.from_plain(origin.content, origin.line), builder.where, origin.label), None
    node = _compose(_read_text(origin.path, origin.label), origin.label)
    if node is None:
        _fail(origin.label, 1, POOL_FIELD, "the file is empty; a pool needs at least pool and members")
    doc = _Doc(builder.from_node(node), builder.where, origin.label)
    entries = node.value if isinstance(node, yaml.MappingNode) else []
    policy = next((value for key, value in entries if key.value == "policy"), None)
    return doc, policy


# --------------------------------------------------------------------------- schema


@functools.cache
def _pool_schema() -> dict[str, Any]:
    return json.loads(POOL_SCHEMA_PATH.read_text(encoding="utf-8"))


@functools.cache
def _pool_validator() -> Draft202012Validator:
    """The policy loader's validator (durations as strings obey minimum/maximum) on the pool schema."""
    cls = validators.extend(Draft202012Validator, {k: _duration_aware(k) for k in ("minimum", "maximum")})
    return cls(_pool_schema())


def _with_defaults(given: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` with the schema's documented ``default`` for every field it leaves out.

    The schema is where operators read the defaults, so it is also where they come from.
    """
    defaults = {key: spec["default"] for key, spec in schema.get("properties", {}).items() if "default" in spec}
    return {**defaults, **given}


#: Said instead of the value: a wrong ``pin`` may well be a literal PIN, which must not reach a log.
_PIN_REFUSED = ("must be env:NAME or file:PATH; a literal PIN is refused "
                "(the value is not shown, in case it is one)")


def _is_pin(path: FieldPath) -> bool:
    return len(path) == 3 and path[0] == "members" and path[2] == "pin"


def _pool_issues(error: ValidationError) -> list[Issue]:
    path = tuple(error.absolute_path)
    return [(path, _PIN_REFUSED)] if _is_pin(path) else _issues(error)


def _validate_pool(doc: _Doc) -> None:
    """Raise for the first schema violation in file order, in the policy loader's words."""
    issues = [issue for error in _pool_validator().iter_errors(doc.data) for issue in _pool_issues(error)]
    _fail_first(doc, issues)


def _fail_first(doc: _Doc, issues: list[Issue]) -> None:
    """Raise for the issue written first in the file (an operator fixes files top to bottom)."""
    if issues:
        path, text = min(issues, key=lambda issue: (doc.locate(issue[0])[1], len(issue[0])))
        _fail_at(doc, path, text)


def _fail_at(doc: _Doc, path: FieldPath, text: str) -> NoReturn:
    file, line = doc.locate(path)
    _fail(file, line, _field(path) if path else POOL_FIELD, text)


# --------------------------------------------------------------------------- members


def _members(doc: _Doc, environment: bool = True) -> tuple[MemberSpec, ...]:
    """Build the members, after the rules a schema cannot express (reported first in file order)."""
    issues: list[Issue] = []
    first: dict[str, int] = {}
    specs: list[MemberSpec] = []
    for index, given in enumerate(doc.data["members"]):
        member = _with_defaults(given, _pool_schema()["$defs"]["member"])
        at: FieldPath = ("members", index)
        if member["name"] in first:
            other = ("members", first[member["name"]], "name")
            issues.append((at + ("name",), f"duplicate member name {_show(member['name'])} "
                                           f"(also {_field(other)}, line {doc.locate(other)[1]})"))
        first.setdefault(member["name"], index)
        issues += _pin_issues(at + ("pin",), member["pin"])
        module = _expanded(at + ("module",), member["module"], issues, environment)
        if module == "":
            issues.append((at + ("module",), f"{_show(member['module'])} is empty once expanded"))
        env = {key: _expanded(at + ("env", key), value, issues, environment)
               for key, value in member.get("env", {}).items()}
        specs.append(MemberSpec(name=member["name"], module=module, token_label=member["token_label"],
                                pin=member["pin"], env=env, standby=member["standby"],
                                isolation=member["isolation"]))
    if all(spec.standby for spec in specs):
        issues.append((("members",), "every member is a standby; at least one must be active "
                                     "(leave out 'standby' or set it to false)"))
    _fail_first(doc, issues)
    return tuple(specs)


def _pin_issues(path: FieldPath, pin: str) -> list[Issue]:
    """The PIN source is checked by the class that will read it, so the two rules cannot differ."""
    try:
        PinSource(pin)
    except PinError:
        return [(path, _PIN_REFUSED)]
    return []


_REFERENCE = re.compile(r"\$\{([^}]*)(\}?)")
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _expanded(path: FieldPath, text: str, issues: list[Issue], environment: bool = True) -> str | None:
    """``text`` with every ``${NAME}`` replaced from the environment, or None after adding the problem to ``issues``.

    Only the braced form is expanded (``$HOME`` stays as written), and an
    unset variable is an error rather than an empty string: an empty socket
    path would send the member to p11-kit's default server, silently.
    """
    parts: list[str] = []
    done = 0
    for match in _REFERENCE.finditer(text):
        name, closed = match.groups()
        if not closed:
            issues.append((path, "'${' without a closing '}' (write ${NAME})"))
            return None
        if not _VARIABLE.fullmatch(name):
            issues.append((path, f"{_show('${' + name + '}')} is not a variable reference "
                                 "(write ${NAME}: letters, digits and '_', not starting with a digit)"))
            return None
        if not environment:
            continue  # checked for form only; kept as written
        if name not in os.environ:
            issues.append((path, f"environment variable {name} is not set (used as ${{{name}}})"))
            return None
        parts += [text[done:match.start()], os.environ[name]]
        done = match.end()
    return "".join(parts) + text[done:]


# --------------------------------------------------------------------------- the audit record

_SIZE_UNITS = {"B": 1, "kB": 1000, "KB": 1000, "KiB": 1024, "MB": 1000**2, "MiB": 1024**2,
               "GB": 1000**3, "GiB": 1024**3}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)\s*")
_MIN_ROTATE = 4096


def _bytes(value: int | str) -> int | None:
    if value == "never":
        return None
    if isinstance(value, int):
        return value
    match = _SIZE.fullmatch(value)
    assert match is not None, "sizes are validated before they are read"
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def _audit(doc: _Doc, origin: _Origin, environment: bool = True) -> AuditSpec | None:
    """The ``audit`` section: the path expanded and made absolute, sizes in bytes."""
    given = doc.data.get("audit")
    if given is None:
        return None
    audit = _with_defaults(given, _pool_schema()["properties"]["audit"])
    issues: list[Issue] = []
    path = _expanded(("audit", "path"), audit["path"], issues, environment)
    rotate = _bytes(audit["rotate_size"])
    if rotate is not None and rotate < _MIN_ROTATE:
        issues.append((("audit", "rotate_size"), f"{_show(audit['rotate_size'])} is below the minimum, 4KiB"))
    _fail_first(doc, issues)
    assert path is not None
    return AuditSpec(path=origin.base_dir / path, rotate_bytes=rotate,
                     keep=None if audit["keep"] == "all" else audit["keep"], fsync=audit["fsync"])


# --------------------------------------------------------------------------- the policy


def _policy(doc: _Doc, origin: _Origin, given: str | Mapping[str, Any], node: yaml.Node | None) -> Policy:
    """The members' policy: shipped by name, a file next to the pool, or written inline."""
    if isinstance(given, str):
        return _policy_file(doc, given, origin.base_dir)
    return _inline_policy(doc, origin, node if isinstance(node, yaml.MappingNode) else given)


def _policy_file(doc: _Doc, name: str, base_dir: Path) -> Policy:
    """A shipped policy or a policy file; errors inside the file keep the file's own location."""
    if _shipped_pool(name) is not None:
        _fail_at(doc, ("policy",), f"{name!r} is a shipped pool, not a policy "
                                   f"(shipped policies: {', '.join(shipped_policies())})")
    if _shipped(name) is not None:
        return load_policy(name)
    path = base_dir / name
    if _missing(path):
        shipped = shipped_policies()
        _fail_at(doc, ("policy",), f"no shipped policy and no policy file {str(path)!r} "
                                   f"({_did_you_mean(name, shipped)}shipped policies: {', '.join(shipped)})")
    if is_pool_file(path):
        _fail_at(doc, ("policy",), f"{str(path)!r} is a pool file, not a policy")
    return load_policy(path)


def _inline_policy(doc: _Doc, origin: _Origin, content: yaml.Node | Mapping[str, Any]) -> Policy:
    """A policy written in the pool file, with the pool file's line numbers.

    The policy loader resolves a relative ``extends`` from the folder of the
    source it is given, so it gets the pool file's real path; its errors about
    this document are then put back under the pool's label, with their field
    prefixed by ``policy`` so that the field is a full path in the pool file.
    """
    where = str(origin.path) if origin.path is not None else doc.label
    try:
        policy = load_policy(content, source=where, line=doc.locate(("policy",))[1])
    except PolicyError as exc:
        if exc.file != where:  # in a file the inline policy extends: that file's location stands
            raise
        text = str(exc)[len(f"{exc.file}:{exc.line}: {exc.field}: "):]
        field = "policy" if exc.field == ROOT_FIELD else f"policy.{exc.field}"
        _fail(doc.label, exc.line or 1, field, text)
    return dataclasses.replace(policy, source=doc.label)


# --------------------------------------------------------------------------- the check command


def _check_pool(path: str, out: TextIO, err: TextIO) -> bool:
    """One pool file for ``hsmfsm check``, in the same words as a policy's."""
    def describe(pool: PoolSpec) -> str:
        count = len(pool.members)
        return f"pool {pool.name}, {count} member{'' if count == 1 else 's'}"

    return _check_one(path, out, err, load_pool, describe)
