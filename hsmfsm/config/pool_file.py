"""Load HA pool files: several HSM members, one policy, a balancing rule and a recovery rule.

A pool file is read by the same people, under the same pressure, as a policy
file, so it is checked the same way and by the same machinery
(:mod:`hsmfsm.config.documents`): the YAML is composed with line numbers and the
alias-bomb guards, validated against ``pool.schema.json`` (the one definition
of the format), and every mistake comes back as one line,
``FILE:LINE: FIELD: what is wrong``. What the schema cannot say is checked
here: member names are unique, at least one member is active, PINs come from
the environment or a file, ``${VAR}`` references resolve (:func:`check_pool`,
for ``hsmfsm check``, makes an unset one a warning), and the policy exists
and is valid. A policy written inline keeps the pool file's line numbers; a
referenced policy file keeps its own, unless it cannot be read at all: then
the pool's ``policy`` line is to blame.

:class:`~hsmfsm.core.policy.PolicyError` is the only exception that leaves this
module, whatever the input. Nothing here connects to an HSM or opens a module:
``hsmfsm check`` must work on a CI machine that has neither.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Union

import yaml
from jsonschema import ValidationError

from ..core.policy import Policy, PolicyError
from .documents import (
    ROOT_FIELD,
    SHIPPED_DIR,
    Builder,
    Doc,
    FieldPath,
    FileWarning,
    Issue,
    Origin,
    attempts,
    compose,
    fail,
    fail_first,
    field_name,
    fields,
    is_pool_file,
    issues,
    load_schema,
    make_validator,
    origin,
    read_text,
    seconds,
    shipped_file,
    show,
)
from .documents import (
    validate as validate_against,
)
from .pin import PinError, PinSource
from .policy_file import load_policy, referenced_policy

__all__ = [
    "POOLS_DIR", "POOL_FIELD", "POOL_SCHEMA_PATH", "AuditSpec", "MemberSpec", "PolicyError", "PoolRecovery",
    "PoolSource", "PoolSpec", "check_pool", "is_pool_file", "load_pool", "pool_schema", "shipped_pools",
]

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

    ``pin`` is where the PIN comes from (``env:NAME``, ``file:PATH`` or ``credential:NAME``), never
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
class ServeSpec:
    """The ``serve`` section: the pool as one virtual PKCS#11 slot (:mod:`hsmfsm.runtime.server`).

    ``pin`` is the application PIN's source (never a member's PIN, never the PIN itself);
    ``allow_uids`` ``None`` means only the uid the server runs as.
    """

    socket: Path
    token_label: str
    pin: str
    allow_uids: tuple[int, ...] | None = None
    outage_codes: str = "device_error"
    keygen: str = "refuse"
    max_operation_bytes: int = 1024 * 1024
    max_connections: int = 256
    workers: int = 16


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
    serve: ServeSpec | None = None


# --------------------------------------------------------------------------- public API


def load_pool(src: PoolSource, /, *, source: str | None = None, environment: bool = True) -> PoolSpec:
    """Load, check and build a pool.

    ``src`` is a path, the name of a shipped pool (``"ha-pool"``), or an
    already-parsed pool (a mapping). ``source`` names the origin in error
    messages (default: the path as given, or ``<inline>``); for a mapping, a
    relative ``policy`` path is resolved from its directory.

    ``${VAR}`` in ``module``, ``env`` values and ``audit.path`` is expanded
    from the process environment now, so a pool file can point at
    per-deployment sockets; an unset variable is an error.
    ``environment=False`` checks the references' form but keeps them as
    written: for drawing a pool on a machine that will not run it.

    Raises :class:`PolicyError` (and nothing else) when the pool is wrong.
    """
    return _load(src, source, _Expansion(expand=environment))


def check_pool(src: PoolSource, /, *, source: str | None = None) -> tuple[PoolSpec, tuple[FileWarning, ...]]:
    """Load a pool as :func:`load_pool` does, for ``hsmfsm check`` on a machine that will not run it.

    Everything is checked the same way, and a ``${VAR}`` whose variable is set
    is expanded, but an unset one is not an error: it is kept as written and
    comes back as a warning (``FILE:LINE: FIELD: warning: environment
    variable X is not set (used as ${X})``), in file order.
    """
    expansion = _Expansion(expand=True, warn=True)
    spec = _load(src, source, expansion)
    return spec, tuple(expansion.warnings)


def shipped_pools() -> list[str]:
    """Names of the example pools shipped with hsmfsm (the pool files in ``policies/``)."""
    return sorted(p.stem for p in POOLS_DIR.glob("*.yaml") if is_pool_file(p))


def pool_schema() -> dict[str, Any]:
    """A copy of the JSON Schema of the pool format (``pool.schema.json``)."""
    return copy.deepcopy(_pool_schema())


def _load(src: PoolSource, source: str | None, expansion: _Expansion) -> PoolSpec:
    here = _pool_origin(src, source)
    doc, policy_node = _read_pool(here)
    _validate_pool(doc)
    data = _with_defaults(doc.data, _pool_schema())
    recovery = _with_defaults(data.get("recovery", {}), _pool_schema()["properties"]["recovery"])
    members = _members(doc, expansion)
    policy = _policy(doc, here, data["policy"], policy_node)
    spec = PoolSpec(
        name=data["pool"],
        policy=policy,
        balance=data["balance"],
        recovery=PoolRecovery(**fields(recovery, interval=seconds, max_attempts=attempts)),
        members=members,
        source=doc.label,
        audit=_audit(doc, here, expansion),
        serve=_serve(doc, here, expansion),
    )
    expansion.located(doc)
    return spec


# --------------------------------------------------------------------------- reading


def _shipped_pool(name: str) -> Path | None:
    """Pools and policies share the folder (and the rule for names): a shipped file that is a pool."""
    path = shipped_file(name)
    return path if path is not None and is_pool_file(path) else None


def _pool_origin(src: Any, source: str | None) -> Origin:
    """Where the pool comes from; the same rules as policies, with shipped pools for names."""
    return origin(src, source, 1, "pool", _shipped_pool, shipped_pools)


def _read_pool(here: Origin) -> tuple[Doc, yaml.Node | None]:
    """The pool as plain data with the line of every field, and the YAML node of its ``policy``.

    The node is kept so that an inline policy is loaded from it and its errors
    carry the pool file's real line numbers.
    """
    builder = Builder(here.label)
    if here.path is None:
        return Doc(builder.from_plain(here.content, here.line), builder.where, here.label, POOL_FIELD), None
    node = compose(read_text(here.path, here.label), here.label)
    if node is None:
        fail(here.label, 1, POOL_FIELD, "the file is empty; a pool needs at least pool and members")
    doc = Doc(builder.from_node(node), builder.where, here.label, POOL_FIELD)
    entries = node.value if isinstance(node, yaml.MappingNode) else []
    policy = next((value for key, value in entries if key.value == "policy"), None)
    return doc, policy


# --------------------------------------------------------------------------- schema


def _pool_schema() -> dict[str, Any]:
    return load_schema(POOL_SCHEMA_PATH)


def _with_defaults(given: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` with the schema's documented ``default`` for every field it leaves out.

    The schema is where operators read the defaults, so it is also where they come from.
    """
    defaults = {key: spec["default"] for key, spec in schema.get("properties", {}).items() if "default" in spec}
    return {**defaults, **given}


#: Said instead of the value: a wrong ``pin`` may well be a literal PIN, which must not reach a log.
_PIN_REFUSED = ("must be env:NAME, file:PATH or credential:NAME; a literal PIN is refused "
                "(the value is not shown, in case it is one)")


def _is_pin(path: FieldPath) -> bool:
    """A member's ``pin`` or the virtual slot's: whatever is wrong with it, its value is not shown."""
    return (len(path) == 3 and path[0] == "members" and path[2] == "pin") or path == ("serve", "pin")


def _pool_issues(error: ValidationError) -> list[Issue]:
    path = tuple(error.absolute_path)
    return [(path, _PIN_REFUSED)] if _is_pin(path) else issues(error)


def _validate_pool(doc: Doc) -> None:
    """Raise for the first schema violation in file order, in the policy loader's words."""
    validate_against(doc, make_validator(POOL_SCHEMA_PATH), rephrase=_pool_issues)


# --------------------------------------------------------------------------- members


def _members(doc: Doc, expansion: _Expansion) -> tuple[MemberSpec, ...]:
    """Build the members, after the rules a schema cannot express (reported first in file order)."""
    found: list[Issue] = []
    first: dict[str, int] = {}
    specs: list[MemberSpec] = []
    for index, given in enumerate(doc.data["members"]):
        member = _with_defaults(given, _pool_schema()["$defs"]["member"])
        at: FieldPath = ("members", index)
        if member["name"] in first:
            other = ("members", first[member["name"]], "name")
            found.append((at + ("name",), f"duplicate member name {show(member['name'])} "
                                          f"(also {field_name(other)}, line {doc.locate(other)[1]})"))
        first.setdefault(member["name"], index)
        found += _pin_issues(at + ("pin",), member["pin"])
        module = expansion.expanded(at + ("module",), member["module"], found)
        if module == "":
            found.append((at + ("module",), f"{show(member['module'])} is empty once expanded"))
        env = {key: expansion.expanded(at + ("env", key), value, found)
               for key, value in member.get("env", {}).items()}
        specs.append(MemberSpec(name=member["name"], module=module or "", token_label=member["token_label"],
                                pin=member["pin"], env={key: value or "" for key, value in env.items()},
                                standby=member["standby"], isolation=member["isolation"]))
    if all(spec.standby for spec in specs):
        found.append((("members",), "every member is a standby; at least one must be active "
                                    "(leave out 'standby' or set it to false)"))
    fail_first(doc, found)
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


@dataclass
class _Expansion:
    """What becomes of ``${NAME}``: expanded from the environment (``expand``), or checked for form only.

    An unset variable is an error, or with ``warn`` a warning (collected in
    ``warnings``, the reference kept as written): ``hsmfsm check`` runs where
    the deployment's variables are not set.
    """

    expand: bool = True
    warn: bool = False
    pending: list[Issue] = field(default_factory=list)
    warnings: list[FileWarning] = field(default_factory=list)

    def expanded(self, path: FieldPath, text: str, found: list[Issue]) -> str | None:
        """``text`` with every ``${NAME}`` replaced from the environment, or None after adding the problem to
        ``found``.

        Only the braced form is expanded (``$HOME`` stays as written), and an
        unset variable is an error rather than an empty string: an empty socket
        path would send the member to p11-kit's default server, silently.
        """
        parts: list[str] = []
        done = 0
        for match in _REFERENCE.finditer(text):
            name, closed = match.groups()
            if not closed:
                found.append((path, "'${' without a closing '}' (write ${NAME})"))
                return None
            if not _VARIABLE.fullmatch(name):
                found.append((path, f"{show('${' + name + '}')} is not a variable reference "
                                    "(write ${NAME}: letters, digits and '_', not starting with a digit)"))
                return None
            if not self.expand:
                continue  # checked for form only; kept as written
            if name not in os.environ:
                unset = (path, f"environment variable {name} is not set (used as ${{{name}}})")
                if not self.warn:
                    found.append(unset)
                    return None
                if unset not in self.pending:
                    self.pending.append(unset)
                continue  # kept as written
            parts += [text[done:match.start()], os.environ[name]]
            done = match.end()
        return "".join(parts) + text[done:]

    def located(self, doc: Doc) -> None:
        """Turn the pending warnings into located ones, in file order (once the pool is known to load)."""
        for path, text in sorted(self.pending, key=lambda issue: doc.locate(issue[0])[1]):
            file, line = doc.locate(path)
            self.warnings.append(FileWarning(file, line, field_name(path, POOL_FIELD), text))
        self.pending.clear()


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


def _audit(doc: Doc, here: Origin, expansion: _Expansion) -> AuditSpec | None:
    """The ``audit`` section: the path expanded and made absolute, sizes in bytes."""
    given = doc.data.get("audit")
    if given is None:
        return None
    audit = _with_defaults(given, _pool_schema()["properties"]["audit"])
    found: list[Issue] = []
    path = expansion.expanded(("audit", "path"), audit["path"], found)
    rotate = _bytes(audit["rotate_size"])
    if rotate is not None and rotate < _MIN_ROTATE:
        found.append((("audit", "rotate_size"), f"{show(audit['rotate_size'])} is below the minimum, 4KiB"))
    fail_first(doc, found)
    assert path is not None
    return AuditSpec(path=here.base_dir / path, rotate_bytes=rotate,
                     keep=None if audit["keep"] == "all" else audit["keep"], fsync=audit["fsync"])


def _serve(doc: Doc, here: Origin, expansion: _Expansion) -> ServeSpec | None:
    """The ``serve`` section: the socket path expanded and made absolute, the PIN source checked."""
    given = doc.data.get("serve")
    if given is None:
        return None
    serve = _with_defaults(given, _pool_schema()["properties"]["serve"])
    found: list[Issue] = []
    path = expansion.expanded(("serve", "socket"), serve["socket"], found)
    found += _pin_issues(("serve", "pin"), serve["pin"])
    if path is not None and len(str(here.base_dir / path).encode()) > 107:
        found.append((("serve", "socket"), f"{show(str(here.base_dir / path))} is longer than 107 bytes, "
                                           "the limit of a unix socket address"))
    fail_first(doc, found)
    assert path is not None
    uids = serve.get("allow_uids")
    return ServeSpec(socket=here.base_dir / path, token_label=serve["token_label"], pin=serve["pin"],
                     allow_uids=None if uids is None else tuple(uids), outage_codes=serve["outage_codes"],
                     keygen=serve["keygen"], max_operation_bytes=serve["max_operation_bytes"],
                     max_connections=serve["max_connections"], workers=serve["workers"])


# --------------------------------------------------------------------------- the policy


def _policy(doc: Doc, here: Origin, given: str | Mapping[str, Any], node: yaml.Node | None) -> Policy:
    """The members' policy: shipped by name, a file next to the pool, or written inline."""
    if isinstance(given, str):
        return referenced_policy(doc, given, here.base_dir)
    return _inline_policy(doc, here, node if isinstance(node, yaml.MappingNode) else given)


def _inline_policy(doc: Doc, here: Origin, content: yaml.Node | Mapping[str, Any]) -> Policy:
    """A policy written in the pool file, with the pool file's line numbers.

    The policy loader resolves a relative ``extends`` from the folder of the
    source it is given, so it gets the pool file's real path; its errors about
    this document are then put back under the pool's label, with their field
    prefixed by ``policy`` so that the field is a full path in the pool file.
    """
    where = str(here.path) if here.path is not None else doc.label
    try:
        policy = load_policy(content, source=where, line=doc.locate(("policy",))[1])
    except PolicyError as exc:
        if exc.file != where:  # in a file the inline policy extends: that file's location stands
            raise
        text = str(exc)[len(f"{exc.file}:{exc.line}: {exc.field}: "):]
        name = "policy" if exc.field == ROOT_FIELD else f"policy.{exc.field}"
        fail(doc.label, exc.line or 1, name, text)
    return dataclasses.replace(policy, source=doc.label)
