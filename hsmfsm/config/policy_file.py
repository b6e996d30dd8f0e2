"""Load recovery policies from YAML, checking them the way an operator needs.

A policy file is read by people under pressure (an HSM is down and the signer
is not recovering), so every mistake must come back as one line that names the
file, the line and the field: ``FILE:LINE: FIELD: what is wrong``. To get
there the loader:

1. reads the file (the only I/O here, capped at :data:`MAX_FILE_BYTES`),
2. composes the YAML node tree with PyYAML's safe composer, which keeps line
   numbers, and builds plain data from it itself: only standard tags, at most
   :data:`MAX_NODES` values (alias expansions included, so an alias bomb ends
   at once) and :data:`MAX_DEPTH` levels, numbers written in at most
   :data:`MAX_NUMBER_TEXT` characters and within float range,
3. validates that data against ``policy.schema.json`` (the one definition of
   the format, also used by editors) and rephrases jsonschema's errors,
4. follows ``extends`` (mappings merge, lists and scalars replace; cycles and
   chains deeper than :data:`MAX_EXTENDS` are refused),
5. checks what a schema cannot: code names, class references, and the order
   of related values (``backoff.initial <= backoff.max``,
   ``call_timeout <= deadline``),
6. builds the frozen :class:`~hsmfsm.core.policy.Policy`.

:class:`~hsmfsm.core.policy.PolicyError` is the only exception that leaves this
module, whatever the input.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import math
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO, Union

import yaml
from jsonschema import Draft202012Validator, ValidationError, validators

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
)
from ..core.states import CODE_EVENTS, Event

#: Where the shipped policies live (a symlink to the repository's ``policies/``).
SHIPPED_DIR = Path(__file__).parent / "shipped"
SCHEMA_PATH = Path(__file__).parent / "policy.schema.json"

#: A commented policy is a few kilobytes; anything near this is not a policy.
MAX_FILE_BYTES = 1 << 20
#: Values in one document, counting every use of an alias (a billion-laughs guard).
MAX_NODES = 10_000
#: Nesting depth of one document (a policy needs 4; recursive aliases hit this).
MAX_DEPTH = 50
#: Length of an ``extends`` chain.
MAX_EXTENDS = 8
#: Characters of a number (or boolean) as written: no value a policy allows is near it, and PyYAML
#: reads a long sexagesimal int (``1:59:59:...``, a YAML 1.1 int) in quadratic time.
MAX_NUMBER_TEXT = 100

INLINE = "<inline>"
#: The FIELD part of messages about the file as a whole, its YAML, or its top level.
FILE_FIELD, YAML_FIELD, ROOT_FIELD = "(file)", "(yaml)", "(policy)"

FieldPath = tuple[str | int, ...]
Issue = tuple[FieldPath, str]
PolicySource = Union[str, "os.PathLike[str]", Mapping[str, Any], yaml.Node]
"""What :func:`load_policy` accepts: a path, a shipped policy's name, or inline content."""

_BARE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


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
    doc = _resolve(_origin(src, source, line), trail=())
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
    """Names of the policies shipped with hsmfsm, for ``extends`` and error hints."""
    from .pool_file import is_pool_file  # pool files share the folder; they are not policies

    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml") if not is_pool_file(p))


def policy_schema() -> dict[str, Any]:
    """A copy of the JSON Schema of the policy format (``policy.schema.json``)."""
    return copy.deepcopy(_schema())


def check_files(paths: list[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Check policy files for ``hsmfsm check``: 0 if every file loads, 2 otherwise.

    Prints ``OK path (policy NAME)`` to ``out`` (default: stdout) for each good
    file and the one-line error to ``err`` (default: stderr) for each bad one.
    It never prints a traceback: CI logs are read by people, not debuggers.
    No paths at all is an error (a glob that matched nothing checks nothing).
    """
    out, err = out or sys.stdout, err or sys.stderr
    if not paths:
        _say(err, "no policy files given")
        return 2
    results = [_check_one(path, out, err) for path in paths]
    return 0 if all(results) else 2


# --------------------------------------------------------------------------- messages


def _field(path: FieldPath) -> str:
    """``operations.deadline``, ``operations.idempotent[2]``; the top level reads ``(policy)``.

    A key is whatever the file wrote, newlines and NULs included (``"a\\nb": 1``), so it is
    shown escaped: a message must stay one line.
    """
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f"{'.' if text else ''}{_printable(_clip(part))}"
    return text or ROOT_FIELD


def _fail(file: str, line: int, field: str, text: str) -> NoReturn:
    raise PolicyError(f"{file}:{line}: {field}: {text}", file=file, line=line, field=field)


def _clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _printable(text: str) -> str:
    """``text`` with line breaks, NULs and other invisible characters as escapes (``\\n``, ``\\x00``)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _number(value: float) -> str:
    try:
        as_float = float(value)
    except OverflowError:  # a whole number beyond any float (10**400 inline): its size is what matters
        return f"about {'-' if value < 0 else ''}1e{int(math.log10(abs(value)))}"
    return str(int(value)) if as_float.is_integer() and abs(value) < 1e15 else repr(as_float)


def _show(value: Any) -> str:
    """A value as the operator wrote it, short enough for one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return _number(value)
    if isinstance(value, str):
        return repr(_clip(value))
    return "a mapping" if isinstance(value, dict) else "a list"


def _show_seconds(seconds: float) -> str:
    """``3600`` -> ``1h``, ``0.05`` -> ``50ms``: caps read the way policies are written."""
    for unit in ("h", "m", "s"):
        size = _UNITS[unit]
        if seconds >= size and (seconds / size).is_integer():
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s" if seconds >= 1 else f"{seconds * 1000:g}ms"


def _did_you_mean(word: Any, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1) if isinstance(word, str) else []
    return f"did you mean {close[0]}? " if close else ""


def _unknown_code(key: str) -> str:
    guess = difflib.get_close_matches(key.strip().upper(), sorted(ALL_NAMES), n=1, cutoff=0.8)
    if guess:
        return f"unknown return code (did you mean {guess[0]}?)"
    return ("unknown return code (write a CKR_* or HSMFSM_* name, a number such as 0x80000001, "
            "or CKR_VENDOR_DEFINED+N)")


# --------------------------------------------------------------------------- documents


@dataclass
class _Doc:
    """Plain policy data (one file, or a merged ``extends`` chain) and where each field was written."""

    data: Any
    where: dict[FieldPath, tuple[str, int]]
    label: str

    def locate(self, path: FieldPath) -> tuple[str, int]:
        """File and line of ``path``, or of its nearest written ancestor (a missing field's parent)."""
        for n in range(len(path), -1, -1):
            if path[:n] in self.where:
                return self.where[path[:n]]
        return self.label, 1

    def fail(self, path: FieldPath, text: str) -> NoReturn:
        file, line = self.locate(path)
        _fail(file, line, _field(path), text)


@dataclass(frozen=True)
class _Origin:
    """Where one policy document comes from: a file, or inline content (a YAML node or a mapping)."""

    label: str
    identity: str  # equal for the same document, for cycle detection
    base_dir: Path  # relative ``extends`` resolve against this
    path: Path | None = None
    content: Any = None
    line: int = 1


def _origin(src: Any, source: str | None, line: int, kind: str = "policy",
            shipped: Callable[[str], Path | None] | None = None,
            shipped_names: Callable[[], list[str]] | None = None) -> _Origin:
    """Where a document comes from: a mapping or node, a shipped name, or a path.
    ``kind`` and the two lookups let pool files (``pool_config``) share the rules."""
    if isinstance(src, (Mapping, yaml.Node)):
        label = source or INLINE
        base = Path(source).parent if source else Path(".")
        return _Origin(label, f"{label}#{id(src)}", base, content=src, line=line)
    if isinstance(src, str):
        found = (shipped or _shipped)(src)
        if found is not None:
            return _file_origin(found, source)
        if _BARE_NAME.fullmatch(src) and _missing(Path(src)):
            names = (shipped_names or shipped_policies)()
            _fail(source or src, 1, FILE_FIELD,
                  f"no such file, and no shipped {kind} of that name (shipped: {', '.join(names)})")
    try:
        return _file_origin(Path(src), source)
    except TypeError:
        _fail(source or INLINE, 1, FILE_FIELD, f"cannot load a {kind} from {_show_type(src)} "
              f"(give a path, the name of a shipped {kind}, or a mapping)")


def _file_origin(path: Path, label: str | None = None) -> _Origin:
    try:
        identity = os.path.realpath(path)
    except (OSError, ValueError):
        identity = os.path.abspath(path)
    return _Origin(label or str(path), identity, path.parent, path=path)


def _shipped(name: str) -> Path | None:
    if not _BARE_NAME.fullmatch(name):
        return None
    path = SHIPPED_DIR / f"{name}.yaml"
    try:
        return path if path.is_file() else None
    except OSError:  # a name too long for the file system (ENAMETOOLONG) names no shipped file
        return None


def _resolve(origin: _Origin, trail: tuple[_Origin, ...]) -> _Doc:
    """One document, with its ``extends`` chain merged underneath it."""
    doc = _parse(origin)
    _validate(doc, partial=isinstance(doc.data, dict) and "extends" in doc.data)
    _normalise_codes(doc)
    base_name = doc.data.pop("extends", None)
    if base_name is None:
        return doc
    base, trail = _base_origin(doc, base_name, origin.base_dir), trail + (origin,)
    if any(o.identity == base.identity for o in trail):
        doc.fail(("extends",), f"cycle: {' -> '.join(o.label for o in (*trail, base))}")
    if len(trail) > MAX_EXTENDS:
        doc.fail(("extends",), f"more than {MAX_EXTENDS} levels of extends")
    return _merge(_resolve(base, trail), doc)


def _base_origin(doc: _Doc, name: str, base_dir: Path) -> _Origin:
    """A shipped policy by name, else a file relative to the extending document."""
    shipped = _shipped(name)
    if shipped is not None:
        return _file_origin(shipped)
    path = base_dir / name
    if _missing(path):
        shipped = shipped_policies()
        doc.fail(("extends",), f"no such policy file {str(path)!r} ({_did_you_mean(name, shipped)}"
                               f"shipped policies: {', '.join(shipped)})")
    return _file_origin(path)


def _missing(path: Path) -> bool:
    try:
        return not os.path.lexists(path)
    except ValueError:  # an embedded NUL: the reader reports it
        return False


def _merge(base: _Doc, over: _Doc) -> _Doc:
    """``over`` on top of ``base``: mappings merge recursively, everything else replaces."""
    return _Doc(_merged(base.data, over.data), {**base.where, **over.where}, over.label)


def _merged(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{key: _merged(base.get(key), value) for key, value in over.items()}}
    return over


# --------------------------------------------------------------------------- reading and parsing


def _parse(origin: _Origin) -> _Doc:
    builder = _Builder(origin.label)
    if origin.path is not None:
        data = builder.from_node(_compose(_read_text(origin.path, origin.label), origin.label))
    elif isinstance(origin.content, yaml.Node):
        data = builder.from_node(origin.content)
    else:
        data = builder.from_plain(origin.content, origin.line)
    return _Doc(data, builder.where, origin.label)


def _read_text(path: Path, label: str) -> str:
    """The file's text: a regular UTF-8 file of at most MAX_FILE_BYTES."""
    mode = _io(label, lambda: path.stat().st_mode)
    if stat.S_ISDIR(mode):
        _fail(label, 1, FILE_FIELD, "is a directory, not a policy file")
    if not stat.S_ISREG(mode):  # a device or a pipe could block or never end
        _fail(label, 1, FILE_FIELD, "is not a regular file")
    raw = _io(label, lambda: _read_bytes(path))
    if len(raw) > MAX_FILE_BYTES:
        _fail(label, 1, FILE_FIELD, f"larger than {MAX_FILE_BYTES} bytes; this is not a policy file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        _fail(label, line, FILE_FIELD,
              f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save the file as UTF-8")


def _read_bytes(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(MAX_FILE_BYTES + 1)


def _io(label: str, action: Callable[[], Any]) -> Any:
    """Run a file system call, turning its failure into a PolicyError about the file."""
    try:
        return action()
    except FileNotFoundError:
        _fail(label, 1, FILE_FIELD, "no such file")
    except OSError as exc:
        _fail(label, 1, FILE_FIELD, f"cannot read: {exc.strerror or exc}")
    except ValueError as exc:  # an embedded NUL byte in the path
        _fail(label, 1, FILE_FIELD, f"cannot read: {exc}")


class _GuardedLoader(yaml.SafeLoader):
    """PyYAML's safe composer, stopped after MAX_NODES nodes or MAX_DEPTH levels.

    Composing is where a hostile file would build a huge or very deep tree
    (deep nesting also overflows the recursive composer), so the guard sits
    here, before anything else looks at the document.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.nodes = self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.nodes, self.depth = self.nodes + 1, self.depth + 1
        try:
            if self.nodes > MAX_NODES:
                self._refuse(f"more than {MAX_NODES} values; this is not a policy")
            if self.depth > MAX_DEPTH:
                self._refuse(f"nested more than {MAX_DEPTH} levels deep; this is not a policy")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def _refuse(self, problem: str) -> NoReturn:
        raise yaml.composer.ComposerError(None, None, problem, self.peek_event().start_mark)


def _compose(text: str, label: str) -> yaml.Node | None:
    loader: _GuardedLoader | None = None
    try:
        loader = _GuardedLoader(text)
        return loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "invalid YAML"
        _fail(label, mark.line + 1 if mark else 1, YAML_FIELD,
              f"{problem} ({exc.context})" if exc.context else problem)
    except yaml.reader.ReaderError as exc:
        char = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or b"\0")
        _fail(label, text.count("\n", 0, exc.position) + 1, FILE_FIELD,
              f"contains the control character #x{char:02x}; a policy file must be plain text")
    except ValueError as exc:  # PyYAML's scanner calls chr() on an escape such as "\\U0011FFFF" unchecked
        _fail(label, loader.line + 1 if loader else 1, YAML_FIELD, f"an escape names no Unicode character ({exc})")
    except (yaml.YAMLError, RecursionError) as exc:
        _fail(label, 1, YAML_FIELD, f"cannot parse: {_printable(str(exc))}")
    finally:
        if loader is not None:
            loader.dispose()


_STD = "tag:yaml.org,2002:"
#: Scalar tags a policy may use, the SafeConstructor method that reads each, and what it reads.
_SCALAR_TAGS: dict[str, tuple[str, str] | None] = {
    f"{_STD}str": None,
    f"{_STD}int": ("construct_yaml_int", "a whole number"),
    f"{_STD}float": ("construct_yaml_float", "a number"),
    f"{_STD}bool": ("construct_yaml_bool", "true or false"),
    f"{_STD}null": ("construct_yaml_null", "null"),
}
_SAFE = yaml.constructor.SafeConstructor()


class _Builder:
    """Plain data from a YAML node tree (or an inline mapping), recording where each field was written.

    Every value visited counts, each use of an alias included, so an alias
    bomb stops after MAX_NODES values instead of exhausting memory; depth is
    capped too, which also stops recursive aliases.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.where: dict[FieldPath, tuple[str, int]] = {}
        self.count = 0

    def from_node(self, node: yaml.Node | None) -> Any:
        if node is None:
            _fail(self.label, 1, ROOT_FIELD, "the file is empty; a policy needs at least "
                  "version, name, classes, codes and default_class")
        self.where[()] = (self.label, node.start_mark.line + 1)
        return self._node(node, (), 0)

    def from_plain(self, value: Any, line: int) -> Any:
        self.where[()] = (self.label, line)
        return self._plain(value, (), 0, line)

    def _enter(self, path: FieldPath, line: int, depth: int) -> None:
        self.count += 1
        if self.count > MAX_NODES:
            self._too_big(path, line, f"more than {MAX_NODES} values (counting every use of an alias); "
                                      "this is not a policy")
        if depth > MAX_DEPTH:
            self._too_big(path, line, f"nested more than {MAX_DEPTH} levels deep")

    def _too_big(self, path: FieldPath, line: int, text: str) -> NoReturn:
        """Blame the top-level field: deep inside an alias bomb, paths are long and lines are the anchor's."""
        top = path[:1]
        _fail(self.label, self.where.get(top, (self.label, line))[1], _field(top), text)

    def _node(self, node: yaml.Node, path: FieldPath, depth: int) -> Any:
        line = node.start_mark.line + 1
        self._enter(path, line, depth)
        self._check_tag(node, path, line)
        build = lambda child, here: self._node(child, here, depth + 1)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(((self._key(k, path), k.start_mark.line + 1, v) for k, v in node.value),
                                 path, build)
        if isinstance(node, yaml.SequenceNode):
            return self._sequence(((item.start_mark.line + 1, item) for item in node.value), path, build)
        return self._scalar(node, path, line)

    def _plain(self, value: Any, path: FieldPath, depth: int, line: int) -> Any:
        self._enter(path, line, depth)
        build = lambda child, here: self._plain(child, here, depth + 1, line)
        if isinstance(value, Mapping):
            return self._mapping(((self._plain_key(k, path, line), line, v) for k, v in value.items()),
                                 path, build)
        if isinstance(value, (list, tuple)):
            return self._sequence(((line, item) for item in value), path, build)
        if value is None or isinstance(value, (str, bool)):
            return value
        if isinstance(value, (int, float)):
            return self._finite(value, path, line)
        _fail(self.label, line, _field(path), f"a policy cannot hold {_show_type(value)}")

    def _mapping(self, entries: Iterator[tuple[str, int, Any]], path: FieldPath,
                 build: Callable[[Any, FieldPath], Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, line, value in entries:
            here = path + (key,)
            if key in out:
                _fail(self.label, line, _field(here), f"duplicate key (first given on line {self.where[here][1]})")
            self.where[here] = (self.label, line)
            out[key] = build(value, here)
        return out

    def _sequence(self, items: Iterator[tuple[int, Any]], path: FieldPath,
                  build: Callable[[Any, FieldPath], Any]) -> list[Any]:
        out: list[Any] = []
        for index, (line, item) in enumerate(items):
            self.where[path + (index,)] = (self.label, line)
            out.append(build(item, path + (index,)))
        return out

    def _key(self, node: yaml.Node, path: FieldPath) -> str:
        line = node.start_mark.line + 1
        if node.tag == f"{_STD}merge":
            _fail(self.label, line, _field(path),
                  "YAML merge keys (<<) are not supported; use 'extends' to inherit from another policy")
        if not isinstance(node, yaml.ScalarNode):
            _fail(self.label, line, _field(path), "a key must be a plain word, not a list or mapping")
        self._check_tag(node, path, line)
        return node.value  # as written: field names and code names are text

    def _plain_key(self, key: Any, path: FieldPath, line: int) -> str:
        if isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool)):
            return str(key)
        _fail(self.label, line, _field(path), f"a key must be text, not {_show_type(key)}")

    def _check_tag(self, node: yaml.Node, path: FieldPath, line: int) -> None:
        allowed = {yaml.ScalarNode: _SCALAR_TAGS, yaml.SequenceNode: {f"{_STD}seq"},
                   yaml.MappingNode: {f"{_STD}map"}}.get(type(node), ())
        if node.tag not in allowed:
            tag = node.tag.replace(_STD, "!!")
            _fail(self.label, line, _field(path),
                  f"unsupported YAML tag {_clip(tag)}: a policy holds only mappings, lists, strings, "
                  "numbers and booleans (quote the value if it is meant as text)")

    def _scalar(self, node: yaml.ScalarNode, path: FieldPath, line: int) -> Any:
        spec = _SCALAR_TAGS[node.tag]
        if spec is None:
            return node.value
        method, noun = spec
        if len(node.value) > MAX_NUMBER_TEXT:
            _fail(self.label, line, _field(path), f"{_show(node.value)} is too long to be {noun}")
        try:
            value = getattr(_SAFE, method)(node)
        except (ValueError, LookupError, ArithmeticError, yaml.YAMLError):  # LookupError: !!bool maybe, !!int ""
            _fail(self.label, line, _field(path), f"cannot read {_show(node.value)} as {noun}")
        return self._finite(value, path, line)

    def _finite(self, value: Any, path: FieldPath, line: int) -> Any:
        """A number the schema can compare and a message can show: finite, and within float range.

        An inline policy is Python data, so 10**5000 can arrive; jsonschema cannot even print it.
        """
        if isinstance(value, float) and not math.isfinite(value):
            _fail(self.label, line, _field(path), f"{_show(value)} is not a finite number")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max:
            _fail(self.label, line, _field(path), f"{_show(value)} is too large for any field")
        return value


def _show_type(value: Any) -> str:
    return f"a value of type {type(value).__name__}"


# --------------------------------------------------------------------------- schema


@functools.cache
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@functools.cache
def _duration_pattern() -> re.Pattern[str]:
    """The duration syntax, taken from the schema so that the two cannot disagree."""
    return re.compile(_schema()["$defs"]["duration"]["anyOf"][1]["pattern"])


def _duration_aware(keyword: str) -> Callable[..., Any]:
    """``minimum``/``maximum`` that also apply to durations written as strings (``"2h"`` is 7200)."""
    original = Draft202012Validator.VALIDATORS[keyword]

    def check(validator: Any, bound: Any, instance: Any, schema: Any) -> Any:
        if isinstance(instance, str) and _duration_pattern().fullmatch(instance):
            instance = _seconds(instance)
        return original(validator, bound, instance, schema)

    return check


def _unique_texts(validator: Any, unique: bool, instance: Any, schema: Any) -> Iterator[ValidationError]:
    """``uniqueItems`` in linear time, over the items that are text.

    jsonschema compares items it cannot sort pairwise: a list of a few thousand
    mappings (a valid file size) took half a minute. Only text is a valid item
    wherever the schema asks for unique items, and any other item already fails
    its own type check, so only text needs comparing.
    """
    if unique and isinstance(instance, list) and _first_repeat(instance) is not None:
        yield ValidationError("has non-unique elements")


def _first_repeat(items: list[Any]) -> int | None:
    """Index of the first text item that repeats an earlier one."""
    seen: set[str] = set()
    for index, item in enumerate(items):
        if isinstance(item, str):
            if item in seen:
                return index
            seen.add(item)
    return None


@functools.cache
def _validator() -> Draft202012Validator:
    cls = validators.extend(Draft202012Validator, {**{k: _duration_aware(k) for k in ("minimum", "maximum")},
                                                   "uniqueItems": _unique_texts})
    return cls(_schema())


def _seconds(value: str | float) -> float:
    if isinstance(value, str):
        match = _duration_pattern().fullmatch(value)
        assert match is not None, "durations are validated before they are read"
        return float(match.group(1)) * _UNITS[match.group(2)]
    return float(value)


def _validate(doc: _Doc, *, partial: bool) -> None:
    """Raise for the first schema violation in file order. ``partial``: a file that extends
    another may leave required fields to its base (the merged result is checked again)."""
    issues = [issue for error in _validator().iter_errors(doc.data)
              if not (partial and error.validator == "required") for issue in _issues(error)]
    if issues:
        path, text = min(issues, key=lambda issue: (doc.locate(issue[0])[1], len(issue[0])))
        doc.fail(path, text)


def _issues(error: ValidationError) -> list[Issue]:
    """jsonschema's error, in an operator's words, at the field it is about."""
    path = tuple(error.absolute_path)
    if "propertyNames" in error.absolute_schema_path:  # a bad key: the field is the key itself
        path += (str(error.instance),)
        if error.schema.get("title") == "return code":
            return [(path, _unknown_code(str(error.instance)))]
    rephrase = _REPHRASE.get(str(error.validator))
    return rephrase(error, path) if rephrase else [(path, error.message)]


def _unknown_field(error: ValidationError, path: FieldPath) -> list[Issue]:
    known = list(error.schema.get("properties", {}))
    return [(path + (key,), f"unknown field (known: {', '.join(known)})") for key in error.instance
            if key not in known]


def _missing_field(error: ValidationError, path: FieldPath) -> list[Issue]:
    return [(path + (name,), "missing required field") for name in error.validator_value
            if name not in error.instance]


_TYPE_NOUNS = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "a whole number",
               "number": "a number", "boolean": "true or false", "null": "nothing"}


def _wrong_type(error: ValidationError, path: FieldPath) -> list[Issue]:
    wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
    return [(path, f"expected {' or '.join(_TYPE_NOUNS.get(t, t) for t in wanted)}, got {_show(error.instance)}")]


def _out_of_range(error: ValidationError, path: FieldPath) -> list[Issue]:
    duration = error.schema.get("$ref") == "#/$defs/duration"
    bound = _show_seconds(error.validator_value) if duration else _number(error.validator_value)
    value = _show(error.instance) + (" (seconds)" if duration and not isinstance(error.instance, str) else "")
    if error.validator in ("maximum", "exclusiveMaximum"):
        return [(path, f"{value} is above the hard cap of {bound}")]
    return [(path, f"{value} is below the minimum of {bound}")]


def _not_in_enum(error: ValidationError, path: FieldPath) -> list[Issue]:
    known = [str(v) for v in error.validator_value]
    noun = error.schema.get("title", "value")
    return [(path, f"unknown {noun} {_show(error.instance)} ({_did_you_mean(error.instance, known)}"
                   f"known: {', '.join(known)})")]


def _wrong_const(error: ValidationError, path: FieldPath) -> list[Issue]:
    return [(path, f"{_show(error.instance)} is not supported (must be {_show(error.validator_value)})")]


def _bad_pattern(error: ValidationError, path: FieldPath) -> list[Issue]:
    form = error.schema.get("x-form", f"must match {error.validator_value}")
    return [(path, f"{_show(error.instance)} is not a valid {error.schema.get('title', 'value')} ({form})")]


def _duplicate_item(error: ValidationError, path: FieldPath) -> list[Issue]:
    items = list(error.instance)
    repeat = _first_repeat(items)
    return [(path + (repeat,), f"{_show(items[repeat])} is listed twice")] if repeat is not None else \
        [(path, "items must be unique")]


_SIZE_UNITS = {"Length": "characters", "Properties": "entries", "Items": "items"}


def _wrong_size(error: ValidationError, path: FieldPath) -> list[Issue]:
    limit, keyword = error.validator_value, str(error.validator)
    if keyword.startswith("min"):
        return [(path, "must not be empty" if limit == 1 else f"needs at least {limit} {_SIZE_UNITS[keyword[3:]]}")]
    return [(path, f"has {len(error.instance)} {_SIZE_UNITS[keyword[3:]]}; the limit is {limit}")]


def _no_form_matches(error: ValidationError, path: FieldPath) -> list[Issue]:
    """``anyOf`` (durations, max_attempts): report the form the value was meant to have, if clear."""
    meant = [e for e in error.context or () if e.validator not in ("type", "const")]
    if len(meant) == 1:
        return _issues(meant[0])
    return [(path, f"expected {error.schema.get('title', 'another kind of value')}, got {_show(error.instance)}")]


_REPHRASE: dict[str, Callable[[ValidationError, FieldPath], list[Issue]]] = {
    "additionalProperties": _unknown_field,
    "required": _missing_field,
    "type": _wrong_type,
    "minimum": _out_of_range,
    "maximum": _out_of_range,
    "exclusiveMinimum": _out_of_range,
    "exclusiveMaximum": _out_of_range,
    "enum": _not_in_enum,
    "const": _wrong_const,
    "pattern": _bad_pattern,
    "uniqueItems": _duplicate_item,
    **{f"{m}{s}": _wrong_size for m in ("min", "max") for s in _SIZE_UNITS},
    "anyOf": _no_form_matches,
}


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


def _normalise_codes(doc: _Doc) -> None:
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
            doc.fail(("codes", key), _unknown_code(key))
        if name in keys:
            doc.fail(("codes", key), f"{name} is already listed on line {doc.locate(('codes', keys[name]))[1]}")
        keys[name] = key
    moved = {name: doc.where.pop(("codes", key)) for name, key in keys.items()}
    doc.where.update({("codes", name): place for name, place in moved.items()})
    doc.data["codes"] = {name: codes[key] for name, key in keys.items()}


def _check_references(doc: _Doc) -> None:
    """Every event is one a code may fire; every class named in ``codes`` and ``default_class`` exists."""
    events = sorted(CODE_EVENTS)
    for name, spec in doc.data["classes"].items():
        if spec["event"] not in CODE_EVENTS:
            doc.fail(("classes", name, "event"), f"unknown event {_show(spec['event'])} "
                                                 f"({_did_you_mean(spec['event'], events)}known: {', '.join(events)})")
    for code, class_name in doc.data["codes"].items():
        _check_class_name(doc, ("codes", code), class_name)
    _check_class_name(doc, ("default_class",), doc.data["default_class"])


def _check_class_name(doc: _Doc, path: FieldPath, name: str) -> None:
    known = list(doc.data["classes"])
    if name not in known:
        doc.fail(path, f"unknown class {_show(name)} ({_did_you_mean(name, known)}known: {', '.join(known)})")


#: (shorter, longer, why): pairs of durations whose order the schema cannot express.
_ORDER_RULES: tuple[tuple[FieldPath, FieldPath, str], ...] = (
    (("connect", "backoff", "initial"), ("connect", "backoff", "max"),
     "the first delay cannot be longer than the longest"),
    (("operations", "call_timeout"), ("operations", "deadline"),
     "one call must fit within the deadline that spans all its attempts"),
)


def _check_order(policy: Policy, doc: _Doc) -> None:
    for low, high, why in _ORDER_RULES:
        short, long_ = _attribute(policy, low), _attribute(policy, high)
        if short <= long_:
            continue
        if _blame(doc, low, high) == low:
            doc.fail(low, f"{_show_seconds(short)} is longer than {_field(high)} ({_show_seconds(long_)}); {why}")
        doc.fail(high, f"{_show_seconds(long_)} is shorter than {_field(low)} ({_show_seconds(short)}); {why}")


def _blame(doc: _Doc, *paths: FieldPath) -> FieldPath:
    """Of two conflicting fields, the one written in the policy itself, else one inherited, else the first."""
    for wanted in (lambda p: doc.where.get(p, ("",))[0] == doc.label, lambda p: p in doc.where):
        for path in paths:
            if wanted(path):
                return path
    return paths[0]


def _attribute(obj: Any, path: FieldPath) -> Any:
    for name in path:
        obj = getattr(obj, str(name))
    return obj


# --------------------------------------------------------------------------- building


def _fields(given: Mapping[str, Any], **convert: Callable[[Any], Any]) -> dict[str, Any]:
    """Dataclass keyword arguments for the fields a section gives; the rest keep their defaults."""
    return {key: convert.get(key, _same)(value) for key, value in given.items()}


def _same(value: Any) -> Any:
    return value


def _attempts(value: int | str) -> int | None:
    return None if value == "unlimited" else int(value)


def _backoff(given: Mapping[str, Any]) -> Backoff:
    return Backoff(**_fields(given, initial=_seconds, max=_seconds, multiplier=float, jitter=float))


def _code_class(name: str, spec: Mapping[str, Any]) -> CodeClass:
    event = None if spec["event"] == "none" else Event(spec["event"])
    return CodeClass(name, event, spec["reissue"], spec["may_have_acted"])


def _build(doc: _Doc) -> Policy:
    data = doc.data
    return Policy(
        name=data["name"],
        classes={name: _code_class(name, spec) for name, spec in data["classes"].items()},
        codes=data["codes"],
        default_class=data["default_class"],
        connect=ConnectPolicy(**_fields(data.get("connect", {}), backoff=_backoff, max_attempts=_attempts)),
        operations=OperationsPolicy(**_fields(data.get("operations", {}), idempotent=frozenset,
                                              max_reissues=int, deadline=_seconds, call_timeout=_seconds)),
        probe=ProbePolicy(**_fields(data.get("probe", {}), interval=_seconds, unhealthy_after=int,
                                    healthy_after=int)),
        degraded=DegradedPolicy(**_fields(data.get("degraded", {}), slow_call=_seconds, enter_after=int,
                                          leave_after=int)),
        source=doc.label,
    )


# --------------------------------------------------------------------------- the check command


def _check_one(path: str, out: TextIO, err: TextIO,
               load: Callable[[Path], Any] | None = None,
               describe: Callable[[Any], str] = lambda policy: f"policy {policy.name}") -> bool:
    """Check one file for ``hsmfsm check``: one line, OK or the error, never a traceback.
    ``load`` and ``describe`` let pool files share this (``pool_config``)."""
    try:
        policy = (load or load_policy)(Path(path))
    except PolicyError as exc:
        _say(err, str(exc))
        return False
    except Exception as exc:
        _say(err, f"{path}:1: {FILE_FIELD}: internal error in hsmfsm ({type(exc).__name__}: {exc}); please report it")
        return False
    _say(out, f"OK {path} ({describe(policy)})")
    return True


def _say(stream: TextIO, text: str) -> None:
    """Print a line that survives any file name or policy text (odd bytes become escapes)."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    stream.write(_printable(text).encode(encoding, "backslashreplace").decode(encoding, "replace") + "\n")
