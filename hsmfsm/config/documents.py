"""What policy files and pool files share: reading them safely, and saying exactly where they are wrong.

A policy or pool file is read by people under pressure (an HSM is down and
the signer is not recovering), so every mistake must come back as one line
that names the file, the line and the field: ``FILE:LINE: FIELD: what is
wrong``. This module is the machinery both loaders use to get there:

- **reading** (:func:`read_text`): a regular UTF-8 file of at most
  :data:`MAX_FILE_BYTES`; a file that cannot be read at all raises
  :class:`UnreadableFile`, so that a file naming it (``extends``, a pool's
  ``policy``) can take the blame;
- **composing** (:func:`compose`): PyYAML's safe composer, which keeps line
  numbers, stopped after :data:`MAX_NODES` nodes or :data:`MAX_DEPTH` levels;
- **building** (:class:`Builder`): plain data from the node tree (or from an
  inline mapping), only standard tags, every alias use counted, numbers
  written in at most :data:`MAX_NUMBER_TEXT` characters and within float
  range, and the line of every field recorded in a :class:`Doc`;
- **validating** (:func:`validate`): against a JSON Schema, with
  jsonschema's errors rephrased in an operator's words (:func:`issues`) and
  the first one in file order reported;
- **messages**: :func:`field_name`, :func:`fail`, :func:`show` and friends, so
  that both kinds of file word things the same way.

Also here, because both loaders and ``hsmfsm check`` need it: where the
shipped files are, and :func:`is_pool_file`, which tells the two kinds apart.

:class:`~hsmfsm.core.policy.PolicyError` (or its subclass
:class:`UnreadableFile`) is the only exception that leaves this module.
"""

from __future__ import annotations

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
from typing import Any, NoReturn, TextIO, TypeVar, cast

import yaml
from jsonschema import Draft202012Validator, ValidationError, validators

from ..core.codes import ALL_NAMES
from ..core.policy import PolicyError

__all__ = [
    "FILE_FIELD", "INLINE", "MAX_DEPTH", "MAX_FILE_BYTES", "MAX_NODES", "MAX_NUMBER_TEXT", "ROOT_FIELD",
    "SHIPPED_DIR", "YAML_FIELD", "Builder", "Doc", "FieldPath", "FileWarning", "Issue", "Origin", "UnreadableFile",
    "attempts", "clip", "compose", "did_you_mean", "duration_pattern", "fail", "fail_first", "field_name", "fields",
    "file_origin", "is_pool_file", "issues", "load_schema", "make_validator", "merge", "missing", "origin", "parse",
    "printable", "read_text", "say", "seconds", "shipped_file", "show", "show_number", "show_seconds", "show_type",
    "unknown_code_message", "validate",
]

#: Where the shipped policies and pools live (a symlink to the repository's ``policies/``).
SHIPPED_DIR = Path(__file__).parent / "shipped"
#: The schema that defines the duration syntax (``pool.schema.json`` repeats it; a test holds them equal).
DURATION_SCHEMA_PATH = Path(__file__).parent / "policy.schema.json"

#: A commented policy is a few kilobytes; anything near this is not a policy.
MAX_FILE_BYTES = 1 << 20
#: Values in one document, counting every use of an alias (a billion-laughs guard).
MAX_NODES = 10_000
#: Nesting depth of one document (a policy needs 4; recursive aliases hit this).
MAX_DEPTH = 50
#: Characters of a number (or boolean) as written: no value a policy allows is near it, and PyYAML
#: reads a long sexagesimal int (``1:59:59:...``, a YAML 1.1 int) in quadratic time.
MAX_NUMBER_TEXT = 100

INLINE = "<inline>"
#: The FIELD part of messages about the file as a whole, its YAML, or its top level.
FILE_FIELD, YAML_FIELD, ROOT_FIELD = "(file)", "(yaml)", "(policy)"

FieldPath = tuple[str | int, ...]
Issue = tuple[FieldPath, str]

_T = TypeVar("_T")
_BARE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class UnreadableFile(PolicyError):
    """The file itself cannot be read: missing, a directory, a device, not permitted, too large.

    Raised before anything in the file was looked at, so the file's own line 1
    is no place to fix anything: a file that names this one (``extends``, a
    pool's ``policy``) reports it at its own line instead. ``reason`` is the
    bare reason (``it is not a regular file``), for that message.
    """

    def __init__(self, message: str, *, file: str, line: int, field: str, reason: str) -> None:
        super().__init__(message, file=file, line=line, field=field)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class FileWarning:
    """Something ``hsmfsm check`` reports without failing: ``FILE:LINE: FIELD: warning: TEXT``."""

    file: str
    line: int
    field: str
    text: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: warning: {self.text}"


# --------------------------------------------------------------------------- messages


def field_name(path: FieldPath, root: str = ROOT_FIELD) -> str:
    """``operations.deadline``, ``operations.idempotent[2]``; the top level reads ``root`` (``(policy)``).

    A key is whatever the file wrote, newlines and NULs included (``"a\\nb": 1``), so it is
    shown escaped: a message must stay one line.
    """
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f"{'.' if text else ''}{printable(clip(part))}"
    return text or root


def fail(file: str, line: int, field: str, text: str) -> NoReturn:
    raise PolicyError(f"{file}:{line}: {field}: {text}", file=file, line=line, field=field)


def clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(text: str) -> str:
    """``text`` with line breaks, NULs and other invisible characters as escapes (``\\n``, ``\\x00``)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def show_number(value: float) -> str:
    try:
        as_float = float(value)
    except OverflowError:  # a whole number beyond any float (10**400 inline): its size is what matters
        return f"about {'-' if value < 0 else ''}1e{int(math.log10(abs(value)))}"
    return str(int(value)) if as_float.is_integer() and abs(value) < 1e15 else repr(as_float)


def show(value: Any) -> str:
    """A value as the operator wrote it, short enough for one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return show_number(value)
    if isinstance(value, str):
        return repr(clip(value))
    return "a mapping" if isinstance(value, dict) else "a list"


def show_seconds(seconds: float) -> str:
    """``3600`` -> ``1h``, ``0.05`` -> ``50ms``: caps read the way policies are written."""
    for unit in ("h", "m", "s"):
        size = _UNITS[unit]
        if seconds >= size and (seconds / size).is_integer():
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s" if seconds >= 1 else f"{seconds * 1000:g}ms"


def show_type(value: Any) -> str:
    return f"a value of type {type(value).__name__}"


def did_you_mean(word: Any, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1) if isinstance(word, str) else []
    return f"did you mean {close[0]}? " if close else ""


def unknown_code_message(key: str) -> str:
    """What is wrong with a return code a file names that hsmfsm does not know."""
    guess = difflib.get_close_matches(key.strip().upper(), sorted(ALL_NAMES), n=1, cutoff=0.8)
    if guess:
        return f"unknown return code (did you mean {guess[0]}?)"
    return ("unknown return code (write a CKR_* or HSMFSM_* name, a number such as 0x80000001, "
            "or CKR_VENDOR_DEFINED+N)")


def say(stream: TextIO, text: str) -> None:
    """Print a line that survives any file name or policy text (odd bytes become escapes)."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    stream.write(printable(text).encode(encoding, "backslashreplace").decode(encoding, "replace") + "\n")


# --------------------------------------------------------------------------- documents


@dataclass
class Doc:
    """Plain data (one file, or a merged ``extends`` chain) and where each field was written.

    ``root`` is the FIELD of messages about the top level (``(policy)``, ``(pool)``).
    """

    data: Any
    where: dict[FieldPath, tuple[str, int]]
    label: str
    root: str = ROOT_FIELD

    def locate(self, path: FieldPath) -> tuple[str, int]:
        """File and line of ``path``, or of its nearest written ancestor (a missing field's parent)."""
        for n in range(len(path), -1, -1):
            if path[:n] in self.where:
                return self.where[path[:n]]
        return self.label, 1

    def fail(self, path: FieldPath, text: str) -> NoReturn:
        file, line = self.locate(path)
        fail(file, line, field_name(path, self.root), text)


@dataclass(frozen=True)
class Origin:
    """Where one document comes from: a file, or inline content (a YAML node or a mapping)."""

    label: str
    identity: str  # equal for the same document, for cycle detection
    base_dir: Path  # relative references (``extends``, a pool's ``policy``) resolve against this
    path: Path | None = None
    content: Any = None
    line: int = 1


def origin(src: Any, source: str | None, line: int, kind: str,
           shipped: Callable[[str], Path | None], shipped_names: Callable[[], list[str]]) -> Origin:
    """Where a document comes from: a mapping or node, a shipped name, or a path.

    ``kind`` (``policy``, ``pool``) words the messages; ``shipped`` finds a
    shipped file of that kind by name and ``shipped_names`` lists them.
    """
    if isinstance(src, (Mapping, yaml.Node)):
        label = source or INLINE
        base = Path(source).parent if source else Path(".")
        return Origin(label, f"{label}#{id(src)}", base, content=src, line=line)
    if isinstance(src, str):
        found = shipped(src)
        if found is not None:
            return file_origin(found, source)
        if _BARE_NAME.fullmatch(src) and missing(Path(src)):
            fail(source or src, 1, FILE_FIELD,
                 f"no such file, and no shipped {kind} of that name (shipped: {', '.join(shipped_names())})")
    try:
        return file_origin(Path(src), source)
    except TypeError:
        fail(source or INLINE, 1, FILE_FIELD, f"cannot load a {kind} from {show_type(src)} "
             f"(give a path, the name of a shipped {kind}, or a mapping)")


def file_origin(path: Path, label: str | None = None) -> Origin:
    try:
        identity = os.path.realpath(path)
    except (OSError, ValueError):
        identity = os.path.abspath(path)
    return Origin(label or str(path), identity, path.parent, path=path)


def shipped_file(name: str) -> Path | None:
    """The shipped file (policy or pool) of that name, if ``name`` is a bare name and one exists."""
    if not _BARE_NAME.fullmatch(name):
        return None
    path = SHIPPED_DIR / f"{name}.yaml"
    try:
        return path if path.is_file() else None
    except OSError:  # a name too long for the file system (ENAMETOOLONG) names no shipped file
        return None


def missing(path: Path) -> bool:
    try:
        return not os.path.lexists(path)
    except ValueError:  # an embedded NUL: the reader reports it
        return False


def merge(base: Doc, over: Doc) -> Doc:
    """``over`` on top of ``base``: mappings merge recursively, everything else replaces."""
    return Doc(_merged(base.data, over.data), {**base.where, **over.where}, over.label, over.root)


def _merged(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{key: _merged(base.get(key), value) for key, value in over.items()}}
    return over


#: A top-level ``pool:`` key: at column 0 (after an optional BOM), quoted or not.
_POOL_KEY = re.compile(rb"^(?:\xef\xbb\xbf)?(?:pool|\"pool\"|'pool')[ \t]*:(?:[ \t\r\n]|$)", re.MULTILINE)


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


# --------------------------------------------------------------------------- reading and parsing


def parse(origin: Origin) -> Doc:
    """The document as plain data with the line of every field (a file is read and composed first)."""
    builder = Builder(origin.label)
    if origin.path is not None:
        data = builder.from_node(compose(read_text(origin.path, origin.label), origin.label))
    elif isinstance(origin.content, yaml.Node):
        data = builder.from_node(origin.content)
    else:
        data = builder.from_plain(origin.content, origin.line)
    return Doc(data, builder.where, origin.label)


def read_text(path: Path, label: str) -> str:
    """The file's text: a regular UTF-8 file of at most MAX_FILE_BYTES."""
    mode = _io(label, lambda: path.stat().st_mode)
    if stat.S_ISDIR(mode):
        _unreadable(label, "is a directory, not a policy file", "it is a directory")
    if not stat.S_ISREG(mode):  # a device or a pipe could block or never end
        _unreadable(label, "is not a regular file", "it is not a regular file")
    raw = _io(label, lambda: _read_bytes(path))
    if len(raw) > MAX_FILE_BYTES:
        _unreadable(label, f"larger than {MAX_FILE_BYTES} bytes; this is not a policy file",
                    f"it is larger than {MAX_FILE_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        fail(label, line, FILE_FIELD,
             f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save the file as UTF-8")


def _unreadable(label: str, text: str, reason: str) -> NoReturn:
    raise UnreadableFile(f"{label}:1: {FILE_FIELD}: {text}", file=label, line=1, field=FILE_FIELD, reason=reason)


def _read_bytes(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(MAX_FILE_BYTES + 1)


def _io(label: str, action: Callable[[], _T]) -> _T:
    """Run a file system call, turning its failure into an UnreadableFile about the file."""
    try:
        return action()
    except FileNotFoundError:
        _unreadable(label, "no such file", "no such file")
    except OSError as exc:
        _unreadable(label, f"cannot read: {exc.strerror or exc}", str(exc.strerror or exc))
    except ValueError as exc:  # an embedded NUL byte in the path
        _unreadable(label, f"cannot read: {exc}", str(exc))


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
        event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
        raise yaml.composer.ComposerError(None, None, problem, event.start_mark)


def compose(text: str, label: str) -> yaml.Node | None:
    """The YAML node tree of ``text`` (None for an empty document), every failure a located PolicyError."""
    loader: _GuardedLoader | None = None
    try:
        loader = _GuardedLoader(text)
        return loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "invalid YAML"
        fail(label, mark.line + 1 if mark else 1, YAML_FIELD,
             f"{problem} ({exc.context})" if exc.context else problem)
    except yaml.reader.ReaderError as exc:
        char = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or b"\0")
        fail(label, text.count("\n", 0, exc.position) + 1, FILE_FIELD,
             f"contains the control character #x{char:02x}; a policy file must be plain text")
    except ValueError as exc:  # PyYAML's scanner calls chr() on an escape such as "\\U0011FFFF" unchecked
        fail(label, loader.line + 1 if loader else 1, YAML_FIELD, f"an escape names no Unicode character ({exc})")
    except (yaml.YAMLError, RecursionError) as exc:
        fail(label, 1, YAML_FIELD, f"cannot parse: {printable(str(exc))}")
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


class Builder:
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
            fail(self.label, 1, ROOT_FIELD, "the file is empty; a policy needs at least "
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
        fail(self.label, self.where.get(top, (self.label, line))[1], field_name(top), text)

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
        return self._scalar(cast(yaml.ScalarNode, node), path, line)

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
        fail(self.label, line, field_name(path), f"a policy cannot hold {show_type(value)}")

    def _mapping(self, entries: Iterator[tuple[str, int, Any]], path: FieldPath,
                 build: Callable[[Any, FieldPath], Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, line, value in entries:
            here = path + (key,)
            if key in out:
                fail(self.label, line, field_name(here), f"duplicate key (first given on line {self.where[here][1]})")
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
            fail(self.label, line, field_name(path),
                 "YAML merge keys (<<) are not supported; use 'extends' to inherit from another policy")
        if not isinstance(node, yaml.ScalarNode):
            fail(self.label, line, field_name(path), "a key must be a plain word, not a list or mapping")
        self._check_tag(node, path, line)
        key: str = node.value  # as written: field names and code names are text
        return key

    def _plain_key(self, key: Any, path: FieldPath, line: int) -> str:
        if isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool)):
            return str(key)
        fail(self.label, line, field_name(path), f"a key must be text, not {show_type(key)}")

    def _check_tag(self, node: yaml.Node, path: FieldPath, line: int) -> None:
        allowed = {yaml.ScalarNode: _SCALAR_TAGS, yaml.SequenceNode: {f"{_STD}seq"},
                   yaml.MappingNode: {f"{_STD}map"}}.get(type(node), ())
        if node.tag not in allowed:
            tag = node.tag.replace(_STD, "!!")
            fail(self.label, line, field_name(path),
                 f"unsupported YAML tag {clip(tag)}: a policy holds only mappings, lists, strings, "
                 "numbers and booleans (quote the value if it is meant as text)")

    def _scalar(self, node: yaml.ScalarNode, path: FieldPath, line: int) -> Any:
        spec = _SCALAR_TAGS[node.tag]
        if spec is None:
            return node.value
        method, noun = spec
        if len(node.value) > MAX_NUMBER_TEXT:
            fail(self.label, line, field_name(path), f"{show(node.value)} is too long to be {noun}")
        try:
            value = getattr(_SAFE, method)(node)
        except (ValueError, LookupError, ArithmeticError, yaml.YAMLError):  # LookupError: !!bool maybe, !!int ""
            fail(self.label, line, field_name(path), f"cannot read {show(node.value)} as {noun}")
        return self._finite(value, path, line)

    def _finite(self, value: Any, path: FieldPath, line: int) -> Any:
        """A number the schema can compare and a message can show: finite, and within float range.

        An inline policy is Python data, so 10**5000 can arrive; jsonschema cannot even print it.
        """
        if isinstance(value, float) and not math.isfinite(value):
            fail(self.label, line, field_name(path), f"{show(value)} is not a finite number")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max:
            fail(self.label, line, field_name(path), f"{show(value)} is too large for any field")
        return value


# --------------------------------------------------------------------------- schema


@functools.cache
def load_schema(path: Path) -> dict[str, Any]:
    """A schema file, read once (callers that hand it out copy it)."""
    schema: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return schema


@functools.cache
def duration_pattern() -> re.Pattern[str]:
    """The duration syntax, taken from the schema so that the two cannot disagree."""
    return re.compile(load_schema(DURATION_SCHEMA_PATH)["$defs"]["duration"]["anyOf"][1]["pattern"])


def seconds(value: str | float) -> float:
    """A duration as written (``250ms``, ``2s``, a number of seconds), in seconds; validated before."""
    if isinstance(value, str):
        match = duration_pattern().fullmatch(value)
        assert match is not None, "durations are validated before they are read"
        return float(match.group(1)) * _UNITS[match.group(2)]
    return float(value)


def _duration_aware(keyword: str) -> Callable[..., Any]:
    """``minimum``/``maximum`` that also apply to durations written as strings (``"2h"`` is 7200)."""
    original = Draft202012Validator.VALIDATORS[keyword]

    def check(validator: Any, bound: Any, instance: Any, schema: Any) -> Any:
        if isinstance(instance, str) and duration_pattern().fullmatch(instance):
            instance = seconds(instance)
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
def make_validator(path: Path) -> Draft202012Validator:
    """A validator for the schema at ``path``: durations as strings obey minimum/maximum, uniqueItems is linear."""
    keywords = {**{k: _duration_aware(k) for k in ("minimum", "maximum")}, "uniqueItems": _unique_texts}
    cls = validators.extend(Draft202012Validator, keywords)  # type: ignore[no-untyped-call]
    return cast(Draft202012Validator, cls(load_schema(path)))


def validate(doc: Doc, validator: Draft202012Validator, *, partial: bool = False,
             rephrase: Callable[[ValidationError], list[Issue]] | None = None) -> None:
    """Raise for the first schema violation in file order. ``partial``: leave ``required`` to a base
    (the merged result is checked again). ``rephrase``: a loader's own words for some errors
    (default: :func:`issues`)."""
    words = rephrase or issues
    fail_first(doc, [issue for error in validator.iter_errors(doc.data)
                     if not (partial and error.validator == "required") for issue in words(error)])


def fail_first(doc: Doc, found: list[Issue]) -> None:
    """Raise for the issue written first in the file (an operator fixes files top to bottom)."""
    if found:
        path, text = min(found, key=lambda issue: (doc.locate(issue[0])[1], len(issue[0])))
        doc.fail(path, text)


def _schema(error: ValidationError) -> Mapping[str, Any]:
    return error.schema if isinstance(error.schema, Mapping) else {}


def _instance(error: ValidationError) -> Any:
    return cast(Any, error.instance)


def _value(error: ValidationError) -> Any:
    return cast(Any, error.validator_value)


def issues(error: ValidationError) -> list[Issue]:
    """jsonschema's error, in an operator's words, at the field it is about."""
    path = tuple(error.absolute_path)
    if "propertyNames" in error.absolute_schema_path:  # a bad key: the field is the key itself
        path += (str(_instance(error)),)
        if _schema(error).get("title") == "return code":
            return [(path, unknown_code_message(str(_instance(error))))]
    rephrase = _REPHRASE.get(str(error.validator))
    return rephrase(error, path) if rephrase else [(path, error.message)]


def _unknown_field(error: ValidationError, path: FieldPath) -> list[Issue]:
    known = list(_schema(error).get("properties", {}))
    return [(path + (key,), f"unknown field (known: {', '.join(known)})") for key in _instance(error)
            if key not in known]


def _missing_field(error: ValidationError, path: FieldPath) -> list[Issue]:
    return [(path + (name,), "missing required field") for name in _value(error)
            if name not in _instance(error)]


_TYPE_NOUNS = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "a whole number",
               "number": "a number", "boolean": "true or false", "null": "nothing"}


def _wrong_type(error: ValidationError, path: FieldPath) -> list[Issue]:
    wanted = _value(error) if isinstance(_value(error), list) else [_value(error)]
    return [(path, f"expected {' or '.join(_TYPE_NOUNS.get(t, t) for t in wanted)}, got {show(_instance(error))}")]


def _out_of_range(error: ValidationError, path: FieldPath) -> list[Issue]:
    duration = _schema(error).get("$ref") == "#/$defs/duration"
    bound = show_seconds(_value(error)) if duration else show_number(_value(error))
    value = show(_instance(error)) + (" (seconds)" if duration and not isinstance(_instance(error), str) else "")
    if error.validator in ("maximum", "exclusiveMaximum"):
        return [(path, f"{value} is above the hard cap of {bound}")]
    return [(path, f"{value} is below the minimum of {bound}")]


def _not_in_enum(error: ValidationError, path: FieldPath) -> list[Issue]:
    known = [str(v) for v in _value(error)]
    noun = _schema(error).get("title", "value")
    return [(path, f"unknown {noun} {show(_instance(error))} ({did_you_mean(_instance(error), known)}"
                   f"known: {', '.join(known)})")]


def _wrong_const(error: ValidationError, path: FieldPath) -> list[Issue]:
    return [(path, f"{show(_instance(error))} is not supported (must be {show(_value(error))})")]


def _bad_pattern(error: ValidationError, path: FieldPath) -> list[Issue]:
    form = _schema(error).get("x-form", f"must match {_value(error)}")
    return [(path, f"{show(_instance(error))} is not a valid {_schema(error).get('title', 'value')} ({form})")]


def _duplicate_item(error: ValidationError, path: FieldPath) -> list[Issue]:
    items = list(_instance(error))
    repeat = _first_repeat(items)
    return [(path + (repeat,), f"{show(items[repeat])} is listed twice")] if repeat is not None else \
        [(path, "items must be unique")]


_SIZE_UNITS = {"Length": "characters", "Properties": "entries", "Items": "items"}


def _wrong_size(error: ValidationError, path: FieldPath) -> list[Issue]:
    limit, keyword = _value(error), str(error.validator)
    if keyword.startswith("min"):
        return [(path, "must not be empty" if limit == 1 else f"needs at least {limit} {_SIZE_UNITS[keyword[3:]]}")]
    return [(path, f"has {len(_instance(error))} {_SIZE_UNITS[keyword[3:]]}; the limit is {limit}")]


def _no_form_matches(error: ValidationError, path: FieldPath) -> list[Issue]:
    """``anyOf`` (durations, max_attempts): report the form the value was meant to have, if clear."""
    meant = [e for e in error.context or () if e.validator not in ("type", "const")]
    if len(meant) == 1:
        return issues(meant[0])
    return [(path, f"expected {_schema(error).get('title', 'another kind of value')}, "
                   f"got {show(_instance(error))}")]


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


# --------------------------------------------------------------------------- building


def fields(given: Mapping[str, Any], **convert: Callable[[Any], Any]) -> dict[str, Any]:
    """Dataclass keyword arguments for the fields a section gives; the rest keep their defaults."""
    out: dict[str, Any] = {}
    for key, value in given.items():
        how = convert.get(key)
        out[key] = value if how is None else how(value)
    return out


def attempts(value: int | str) -> int | None:
    """``max_attempts`` as written: a number, or ``unlimited`` (None: never give up)."""
    return None if value == "unlimited" else int(value)
