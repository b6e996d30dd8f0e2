"""Load recovery policies from YAML, checking them the way an operator needs.

Every mistake comes back as one line, ``FILE:LINE: FIELD: what is wrong``
(the reading, composing, building and schema machinery is shared with pool
files, in :mod:`hsmfsm.config.documents`). The loader:

1. reads the file and composes its YAML with line numbers and the size,
   depth and alias guards (:func:`~hsmfsm.config.documents.parse`),
2. validates that data against ``policy.schema.json`` (the one definition of
   the format, also used by editors) and rephrases jsonschema's errors,
3. follows ``extends`` (mappings merge, lists and scalars replace; cycles and
   chains deeper than :data:`MAX_EXTENDS` are refused; a base that cannot be
   read is reported at the ``extends`` line that names it),
4. checks what a schema cannot: code names, class references (in ``codes``,
   ``default_class`` and ``reactions``), and the order of related values
   (``backoff.initial <= backoff.max``, ``call_timeout <= deadline``),
5. builds the frozen :class:`~hsmfsm.core.policy.Policy`.

:class:`~hsmfsm.core.policy.PolicyError` is the only exception that leaves this
module, whatever the input. The ``hsmfsm check`` command is in
:mod:`hsmfsm.config.check`.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Union, cast

import yaml
from jsonschema import ValidationError

from ..core.codes import ALL_NAMES, code_from_name
from ..core.policy import (
    Backoff,
    CodeClass,
    ConnectPolicy,
    DegradedPolicy,
    OperationsPolicy,
    Policy,
    PolicyError,
    ProbePolicy,
    SessionsPolicy,
    SuspicionPolicy,
)
from ..core.rules import Reaction
from ..core.states import CODE_EVENTS, Event
from .documents import (
    INLINE,
    MAX_FILE_BYTES,
    SHIPPED_DIR,
    Doc,
    FieldPath,
    Issue,
    Origin,
    UnreadableFile,
    attempts,
    did_you_mean,
    field_name,
    fields,
    file_origin,
    is_pool_file,
    issues,
    load_schema,
    make_validator,
    merge,
    missing,
    origin,
    parse,
    seconds,
    shipped_file,
    show,
    show_seconds,
    unknown_code_message,
)
from .documents import (
    validate as validate_against,
)

__all__ = [
    "INLINE", "MAX_EXTENDS", "MAX_FILE_BYTES", "SCHEMA_PATH", "SHIPPED_DIR", "PolicyError", "PolicySource",
    "default_policy",
    "load_policy", "policy_schema", "shipped_policies",
]

SCHEMA_PATH = Path(__file__).parent / "policy.schema.json"

#: Length of an ``extends`` chain.
MAX_EXTENDS = 8

PolicySource = Union[str, "os.PathLike[str]", Mapping[str, Any], yaml.Node]
"""What :func:`load_policy` accepts: a path, a shipped policy's name, or inline content."""


# --------------------------------------------------------------------------- public API


def load_policy(src: PolicySource, /, *, source: str | None = None, line: int = 1) -> Policy:
    """Load, check and build a policy.

    ``src`` is a path, the name of a shipped policy (``"default"``,
    ``"network-hsm"``), or an already-parsed policy (a mapping, or a YAML
    node to keep exact line numbers) for policies written inline in another
    file. ``source`` names the origin in error messages (default: the path as
    given, or ``<inline>``); a relative ``extends`` in an inline policy is
    resolved from its directory. ``line`` is where an inline mapping starts in
    ``source``, since a plain mapping has no line numbers of its own.

    Raises :class:`PolicyError` (and nothing else) when the policy is wrong.
    """
    doc = _resolve(origin(src, source, line, "policy", shipped_file, shipped_policies), trail=())
    _validate(doc, partial=False)
    _check_references(doc)
    policy = _build(doc)
    _check_order(policy, doc)
    return policy


@functools.cache
def default_policy() -> Policy:
    """The shipped default policy, loaded once: what a connection uses when given no policy."""
    return load_policy("default")


def shipped_policies() -> list[str]:
    """Names of the policies shipped with hsmfsm, for ``extends`` and error hints (pool files share the
    folder; they are not policies)."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml") if not is_pool_file(p))


def policy_schema() -> dict[str, Any]:
    """A copy of the JSON Schema of the policy format (``policy.schema.json``)."""
    return copy.deepcopy(load_schema(SCHEMA_PATH))


# --------------------------------------------------------------------------- documents and extends


def _resolve(here: Origin, trail: tuple[Origin, ...]) -> Doc:
    """One document, with its ``extends`` chain merged underneath it."""
    doc = parse(here)
    _validate(doc, partial=isinstance(doc.data, dict) and "extends" in doc.data)
    _normalise_codes(doc)
    base_name = doc.data.pop("extends", None)
    if base_name is None:
        return doc
    base, trail = _base_origin(doc, base_name, here.base_dir), trail + (here,)
    if any(o.identity == base.identity for o in trail):
        doc.fail(("extends",), f"cycle: {' -> '.join(o.label for o in (*trail, base))}")
    if len(trail) > MAX_EXTENDS:
        doc.fail(("extends",), f"more than {MAX_EXTENDS} levels of extends")
    try:
        below = _resolve(base, trail)
    except UnreadableFile as exc:
        if exc.file != base.label:  # further down the chain: that file's extends was already blamed
            raise
        doc.fail(("extends",), f"cannot read {base.label!r} as a policy: {exc.reason}")
    return merge(below, doc)


def _base_origin(doc: Doc, name: str, base_dir: Path) -> Origin:
    """A shipped policy by name, else a file relative to the extending document."""
    shipped = shipped_file(name)
    if shipped is not None:
        return file_origin(shipped)
    path = base_dir / name
    if missing(path):
        names = shipped_policies()
        doc.fail(("extends",), f"no such policy file {str(path)!r} ({did_you_mean(name, names)}"
                               f"shipped policies: {', '.join(names)})")
    return file_origin(path)


# --------------------------------------------------------------------------- schema


def _validate(doc: Doc, *, partial: bool) -> None:
    """Raise for the first schema violation in file order. ``partial``: a file that extends
    another may leave required fields to its base (the merged result is checked again)."""
    validate_against(doc, make_validator(SCHEMA_PATH), partial=partial, rephrase=_policy_issues)


_REACTIONS = frozenset(r.value for r in Reaction)


def _policy_issues(error: ValidationError) -> list[Issue]:
    """The shared wording, except in ``reactions``: a phase that does not exist, and a reaction that
    exists but not in the phase it is written under."""
    path = tuple(error.absolute_path)
    value = cast(Any, error.instance)
    if path == ("reactions",) and error.validator == "additionalProperties" and isinstance(value, dict):
        phases = list(load_schema(SCHEMA_PATH)["properties"]["reactions"]["properties"])  # connect ... call
        return [(path + (key,), f"unknown phase {show(key)} ({did_you_mean(key, phases)}"
                                f"known: {', '.join(phases)})") for key in value if key not in phases]
    if error.validator == "enum" and len(path) == 3 and path[0] == "reactions" and isinstance(value, str) \
            and value in _REACTIONS:
        allowed = ", ".join(str(v) for v in cast(Any, error.validator_value))
        return [(path, f"{show(value)} is not a reaction of the {path[1]} phase (allowed there: {allowed})")]
    return issues(error)


# --------------------------------------------------------------------------- checks beyond the schema


def _code_name(key: str) -> str | None:
    """The canonical name of a code as a policy writes it, or None when it is no code."""
    text = key.strip()
    if text in ALL_NAMES:  # includes HSMFSM_UNKNOWN_ERROR, which code_from_name does not parse
        return text
    try:
        return code_from_name(text).name
    except (KeyError, ValueError):
        return None


def _normalise_codes(doc: Doc) -> None:
    """Key ``codes`` by canonical name (``0x30`` -> ``CKR_DEVICE_ERROR``), refusing unknown and repeated codes.

    Done per file, before merging, so that a child's ``0x30`` overrides its base's ``CKR_DEVICE_ERROR``.
    """
    codes = doc.data.get("codes") if isinstance(doc.data, dict) else None
    if not isinstance(codes, dict):
        return
    keys: dict[str, str] = {}
    for key in codes:
        name = _code_name(key)
        if name is None:
            doc.fail(("codes", key), unknown_code_message(key))
        if name in keys:
            doc.fail(("codes", key), f"{name} is already listed on line {doc.locate(('codes', keys[name]))[1]}")
        keys[name] = key
    moved = {name: doc.where.pop(("codes", key)) for name, key in keys.items()}
    doc.where.update({("codes", name): place for name, place in moved.items()})
    doc.data["codes"] = {name: codes[key] for name, key in keys.items()}


def _check_references(doc: Doc) -> None:
    """Every event is one a code may fire; every class named in ``codes``, ``default_class`` and
    ``reactions`` exists."""
    events = sorted(CODE_EVENTS)
    for name, spec in doc.data["classes"].items():
        if spec["event"] not in CODE_EVENTS:
            doc.fail(("classes", name, "event"), f"unknown event {show(spec['event'])} "
                                                 f"({did_you_mean(spec['event'], events)}known: {', '.join(events)})")
    for code, class_name in doc.data["codes"].items():
        _check_class_name(doc, ("codes", code), class_name)
    _check_class_name(doc, ("default_class",), doc.data["default_class"])
    for phase, entries in doc.data.get("reactions", {}).items():
        for class_name in entries:
            _check_class_name(doc, ("reactions", phase, class_name), class_name)


def _check_class_name(doc: Doc, path: FieldPath, name: str) -> None:
    known = list(doc.data["classes"])
    if name not in known:
        doc.fail(path, f"unknown class {show(name)} ({did_you_mean(name, known)}known: {', '.join(known)})")


#: (shorter, longer, why): pairs of durations whose order the schema cannot express.
_ORDER_RULES: tuple[tuple[FieldPath, FieldPath, str], ...] = (
    (("connect", "backoff", "initial"), ("connect", "backoff", "max"),
     "the first delay cannot be longer than the longest"),
    (("operations", "call_timeout"), ("operations", "deadline"),
     "one call must fit within the deadline that spans all its attempts"),
    (("operations", "suspicion", "floor"), ("operations", "suspicion", "ceiling"),
     "the suspicion limit lies between the two"),
    (("operations", "suspicion", "ceiling"), ("operations", "call_timeout"),
     "a member is suspected before its call is cut off at the call timeout, or never"),
)


def _check_order(policy: Policy, doc: Doc) -> None:
    for low, high, why in _ORDER_RULES:
        short, long_ = _attribute(policy, low), _attribute(policy, high)
        if short <= long_:
            continue
        if _blame(doc, low, high) == low:
            doc.fail(low, f"{show_seconds(short)} is longer than {field_name(high)} ({show_seconds(long_)}); {why}")
        doc.fail(high, f"{show_seconds(long_)} is shorter than {field_name(low)} ({show_seconds(short)}); {why}")


def _blame(doc: Doc, *paths: FieldPath) -> FieldPath:
    """Of two conflicting fields, the one written in the policy itself, else one inherited, else the first."""
    wanted: tuple[Callable[[FieldPath], bool], ...] = (lambda p: doc.where.get(p, ("",))[0] == doc.label,
                                                       lambda p: p in doc.where)
    for test in wanted:
        for path in paths:
            if test(path):
                return path
    return paths[0]


def _attribute(obj: Any, path: FieldPath) -> Any:
    for name in path:
        obj = getattr(obj, str(name))
    return obj


# --------------------------------------------------------------------------- building


def _backoff(given: Mapping[str, Any]) -> Backoff:
    return Backoff(**fields(given, initial=seconds, max=seconds, multiplier=float, jitter=float))


def _suspicion(given: Mapping[str, Any]) -> SuspicionPolicy:
    return SuspicionPolicy(**fields(given, multiple=float, floor=seconds, ceiling=seconds, window=int))


def _code_class(name: str, spec: Mapping[str, Any]) -> CodeClass:
    event = None if spec["event"] == "none" else Event(spec["event"])
    return CodeClass(name, event, spec["reissue"], spec["may_have_acted"])


def _build(doc: Doc) -> Policy:
    data = doc.data
    return Policy(
        name=data["name"],
        classes={name: _code_class(name, spec) for name, spec in data["classes"].items()},
        codes=data["codes"],
        default_class=data["default_class"],
        connect=ConnectPolicy(**fields(data.get("connect", {}), backoff=_backoff, max_attempts=attempts)),
        operations=OperationsPolicy(**fields(data.get("operations", {}), idempotent=frozenset,
                                             max_reissues=int, deadline=seconds, call_timeout=seconds,
                                             suspicion=_suspicion)),
        probe=ProbePolicy(**fields(data.get("probe", {}), interval=seconds, unhealthy_after=int,
                                   healthy_after=int)),
        degraded=DegradedPolicy(**fields(data.get("degraded", {}), slow_call=seconds, enter_after=int,
                                         leave_after=int)),
        sessions=SessionsPolicy(**fields(data.get("sessions", {}), max=int)),
        source=doc.label,
        reactions={phase: dict(entries) for phase, entries in data.get("reactions", {}).items()},
    )


def referenced_policy(doc: Doc, name: str, base_dir: Path, *, shipped_pool_hint: str = "",
                      pool_file_hint: str = "") -> Policy:
    """The policy a pool or scenario file names at its ``policy`` line: a shipped policy by name,
    else a policy file relative to ``base_dir``. Errors inside that file keep the file's own
    location; one that cannot be read at all (a directory, ``/dev/null``, no permission), or that
    is a pool, is the naming file's mistake, reported at its ``policy`` line (the hints are added
    to those messages)."""
    shipped = shipped_file(name)
    if shipped is not None:
        if is_pool_file(shipped):
            doc.fail(("policy",), f"{name!r} is a shipped pool, not a policy ({shipped_pool_hint}"
                                  f"shipped policies: {', '.join(shipped_policies())})")
        return load_policy(name)
    path = base_dir / name
    if missing(path):
        names = shipped_policies()
        doc.fail(("policy",), f"no shipped policy and no policy file {str(path)!r} "
                              f"({did_you_mean(name, names)}shipped policies: {', '.join(names)})")
    if is_pool_file(path):
        doc.fail(("policy",), f"{str(path)!r} is a pool file, not a policy{pool_file_hint}")
    try:
        return load_policy(path)
    except UnreadableFile as exc:
        if exc.file != str(path):
            raise
        doc.fail(("policy",), f"cannot read {str(path)!r} as a policy: {exc.reason}")

