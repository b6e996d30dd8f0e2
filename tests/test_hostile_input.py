"""Hostile policy and pool files: whatever the input, loading ends in a policy (or pool) or a located PolicyError.

The loaders promise three things to an operator who runs ``hsmfsm check`` on
a file they did not write (or broke by hand during an outage):

* the only exception is :class:`~hsmfsm.PolicyError`, and its message is one
  line, ``FILE:LINE: FIELD: what is wrong``, where FILE is the file (or
  ``<inline>``) and LINE a line of that file;
* no input hangs the loader: alias bombs, deep nesting, huge numbers and
  huge strings all end within :data:`TIME_LIMIT`;
* YAML tags never construct objects (``!!python/object/apply:os.system``).

Inputs come two ways: (a) structured documents, the shipped policies and pools
as data with fields set to hostile values, added, deleted or replaced, then
written with ``yaml.safe_dump`` and also given inline as mappings; (b) the
shipped files' text mutated byte by byte and line by line.

``make test`` runs these derandomized (the "ci" profile of ``conftest.py``:
the same examples every run, no example database), at the example counts
below; ``make fuzz`` (``HYPOTHESIS_PROFILE=fuzz``) searches randomly and
deeper. Hypothesis prints a reproduction blob for a failure; a failing input
the fuzz finds is kept as an ``@example`` on its test.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hsmfsm import Policy, PolicyError
from hsmfsm.config.policy_file import INLINE, MAX_EXTENDS, MAX_FILE_BYTES, load_policy
from hsmfsm.config.pool_file import PoolSpec, load_pool
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "policies"
POLICY_FILES = ("default.yaml", "network-hsm.yaml")
POOL_FILES = ("ha-pool.yaml", "luna-ha.yaml")

#: Every load must end within this many seconds (the limit is a hard one: an alarm interrupts a hang).
TIME_LIMIT = 2.0

Loader = Callable[..., Any]
LOADERS: dict[str, Loader] = {"policy": load_policy, "pool": load_pool}
RESULTS: dict[str, type] = {"policy": Policy, "pool": PoolSpec}

#: Hypothesis settings for the fuzzing tests: our own time limit instead of Hypothesis' deadline, and a
#: reproduction blob on failure. Randomness and the example database are the profile's (conftest.py):
#: derandomized in ``make test``, random in ``make fuzz``; nothing here overrides them.
_FUZZ = settings(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])


def fuzz(examples: int) -> settings:
    """Half of ``examples`` per test in ``make test`` (derandomized: the same ones every run, the
    regressions kept as explicit @examples), so the fast layer stays fast; under a profile that asks
    for more (``make fuzz``), ``examples`` or that many, whichever is larger."""
    deeper = settings.default.max_examples
    return settings(_FUZZ, max_examples=max(20, examples // 2) if deeper <= 100 else max(examples, deeper))


#: Under ``make fuzz`` one test runs thousands of examples for minutes; the 120 s per-test timeout of
#: ``make test`` (pyproject.toml) is there to catch hangs, which TIME_LIMIT catches per load here.
pytestmark = [pytest.mark.timeout(1800)] if settings.default.max_examples > 100 else []


@pytest.fixture(scope="module", autouse=True)
def pool_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The shipped pools need HSMFSM_RUN (``${HSMFSM_RUN}`` in their sockets); HSM_PIN is only named."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HSMFSM_RUN", str(tmp_path_factory.mktemp("run")))
        patch.delenv("HSM_PIN", raising=False)
        yield


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the files each example writes (module-scoped: Hypothesis reruns the test body)."""
    return tmp_path_factory.mktemp("hostile")


def folder(work: Path, name: str) -> Path:
    """A subfolder of its own per test, so that a relative ``extends`` never finds another test's file."""
    path = work / name
    path.mkdir(exist_ok=True)
    return path


# --------------------------------------------------------------------------- the property


class LoadHung(BaseException):
    """Raised by the alarm inside a load that ran past TIME_LIMIT (a BaseException, so no loader swallows it)."""


def _alarm(signum: int, frame: Any) -> None:
    raise LoadHung(f"the load ran longer than {TIME_LIMIT} s")


def timed_load(kind: str, src: Any, **kwargs: Any) -> tuple[Any, float]:
    """Load ``src``; return the result (or the PolicyError) and the seconds it took.

    Any other exception propagates and fails the test. A SIGALRM interrupts a
    load that runs past TIME_LIMIT; the alarm pytest-timeout may have set is
    restored afterwards. When that alarm is due first, it is left alone, so
    that the test's own timeout is reported as one, not as a hung load.
    """
    if 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= TIME_LIMIT:
        started = time.monotonic()
        try:
            return LOADERS[kind](src, **kwargs), time.monotonic() - started
        except PolicyError as exc:
            return exc, time.monotonic() - started
    previous = signal.signal(signal.SIGALRM, _alarm)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT)
    started = time.monotonic()
    try:
        result: Any = LOADERS[kind](src, **kwargs)
    except PolicyError as exc:
        result = exc
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        elapsed = time.monotonic() - started
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - elapsed, 0.001))
    return result, elapsed


def yaml_lines(path: Path) -> int:
    """How many lines PyYAML sees in ``path``: it also breaks lines at a lone CR, NEL, LS and PS."""
    text = path.read_bytes().decode("utf-8", "replace")
    return 1 + len(re.findall("\r\n|[\r\n\x85\u2028\u2029]", text))


def assert_located(err: PolicyError, files: set[str]) -> None:
    """One line, ``FILE:LINE: FIELD: text``, FILE among ``files`` and LINE a line of FILE."""
    message = str(err)
    assert len(message.splitlines()) == 1 and "\n" not in message and "\r" not in message, repr(message)
    assert err.file in files, (err.file, files, message)
    assert isinstance(err.line, int) and err.line >= 1, message
    assert err.field and not any(c in err.field for c in "\r\n"), message
    prefix = f"{err.file}:{err.line}: {err.field}: "
    assert message.startswith(prefix) and message[len(prefix):].strip(), message
    if err.file == INLINE:
        assert err.line == 1, message  # an inline mapping has no lines of its own: it starts on line 1
    elif Path(err.file).is_file():
        assert err.line <= yaml_lines(Path(err.file)), (message, yaml_lines(Path(err.file)))


#: Labels an error inside a shipped file may carry (a pool's policy, a policy's ``extends``).
SHIPPED_LABELS = {str(p) for p in (REPO / "hsmfsm" / "config" / "shipped").glob("*.yaml")}


def check(kind: str, src: Any, files: set[str], **kwargs: Any) -> Any:
    """The property: a valid result or a located PolicyError, in time, and nothing constructed."""
    result, elapsed = timed_load(kind, src, **kwargs)
    assert elapsed < TIME_LIMIT, f"loading took {elapsed:.2f} s"
    assert not TRIPPED, f"a YAML tag constructed an object: {TRIPPED}"
    assert not MARKER_PATHS or not any(p.exists() for p in MARKER_PATHS), "a YAML tag ran a command"
    if isinstance(result, PolicyError):
        assert_located(result, files | SHIPPED_LABELS)
    else:
        assert isinstance(result, RESULTS[kind]), type(result)
    if currently_in_test_context():  # --hypothesis-show-statistics: how many loaded, and where the rest failed
        event("loaded" if not isinstance(result, PolicyError) else f"error in {result.field.split('.')[0][:20]}")
    return result


# --------------------------------------------------------------------------- object construction

#: What a constructing tag would call; the loaders must never get here.
TRIPPED: list[str] = []
#: Files the ``os.system`` payloads would create (in the module's tmp folder).
MARKER_PATHS: list[Path] = []


class Tripwire:
    """Records its own construction: ``!!python/object:...Tripwire`` must never build one."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Tripwire:
        TRIPPED.append(f"Tripwire{args}")
        return super().__new__(cls)


def trip(*args: Any) -> str:
    TRIPPED.append(f"trip{args}")
    return "tripped"


def payloads(marker: Path) -> dict[str, str]:
    """Tags that construct objects under an unsafe loader, each as one YAML value."""
    here = f"{__name__}"
    return {
        "os.system": f'!!python/object/apply:os.system ["touch {marker}"]',
        "apply": f"!!python/object/apply:{here}.trip [x]",
        "new": f"!!python/object/new:{here}.Tripwire [x]",
        "object": f"!!python/object:{here}.Tripwire {{a: 1}}",
        "name": f"!!python/name:{here}.trip",
        "module": "!!python/module:os",
        "verbatim": f'!<tag:yaml.org,2002:python/object/apply:os.system> ["touch {marker}"]',
    }


def _plain(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


#: Where a payload goes in a policy: (text with {P} for the payload, line of the payload, field).
POLICY_SPOTS = {
    "top-level value": ("version: 1\nname: x\nextends: default\nconnect: {P}\n", 4, "connect"),
    "nested value": ("version: 1\nname: x\nextends: default\nprobe:\n  interval: {P}\n", 5, "probe.interval"),
    "list item": ("version: 1\nname: x\nextends: default\noperations:\n  idempotent:\n    - sign\n    - {P}\n",
                  7, "operations.idempotent[1]"),
    "mapping key": ("version: 1\nname: x\nextends: default\ncodes:\n  ? {P}\n  : transport\n", 5, "codes"),
}
POOL_SPOTS = {
    "pool name": ("pool: {P}\npolicy: default\nmembers:\n  - {{name: a, module: /m.so, token_label: t, pin: env:P}}\n",
                  1, "pool"),
    "member field": ("pool: p\npolicy: default\nmembers:\n  - name: a\n    module: /m.so\n    token_label: {P}\n"
                     "    pin: env:P\n", 6, "members[0].token_label"),
    "inline policy": ("pool: p\npolicy:\n  version: 1\n  name: x\n  extends: default\n  degraded: {{slow_call: {P} }}\n"
                      "members:\n  - {{name: a, module: /m.so, token_label: t, pin: env:P}}\n",
                      6, "policy.degraded.slow_call"),
}


@pytest.mark.parametrize("spot", list(POLICY_SPOTS) + list(POOL_SPOTS))
@pytest.mark.parametrize("payload", list(payloads(Path("m"))))
def test_no_tag_constructs_an_object(spot: str, payload: str, work: Path) -> None:
    """Each payload is live (an unsafe load constructs it), and neither loader lets it construct anything."""
    kind = "policy" if spot in POLICY_SPOTS else "pool"
    template, line, field = {**POLICY_SPOTS, **POOL_SPOTS}[spot]
    marker = work / f"marker-{abs(hash((spot, payload)))}"
    text = template.format(P=payloads(marker)[payload])
    TRIPPED.clear()
    live = yaml.unsafe_load(text)  # the test of the test: this payload does construct something
    assert TRIPPED or marker.exists() or not _plain(live), payload
    TRIPPED.clear()
    marker.unlink(missing_ok=True)
    MARKER_PATHS[:] = [marker]
    try:
        path = folder(work, "tags") / f"{kind}.yaml"
        path.write_text(text, encoding="utf-8")
        err = check(kind, path, {str(path)})
        assert isinstance(err, PolicyError)
        assert (err.file, err.line, err.field) == (str(path), line, field), str(err)
        assert "unsupported YAML tag" in str(err) or "a key must be a plain word" in str(err), str(err)
        # and given as a node, the way a pool hands its inline policy over
        if kind == "policy":
            err = check(kind, yaml.compose(text), {"node.yaml"}, source="node.yaml")
            assert isinstance(err, PolicyError) and (err.line, err.field) == (line, field), str(err)
    finally:
        MARKER_PATHS.clear()


def test_a_tag_directive_cannot_smuggle_python_tags(work: Path) -> None:
    """``%TAG`` can make ``!!str`` mean ``python/...``; the full tag is what is checked."""
    marker = work / "tag-directive"
    text = (f"%TAG !! tag:yaml.org,2002:python/object/apply:\n---\nversion: 1\nname: x\nextends: default\n"
            f'connect: !!os.system ["touch {marker}"]\n')
    yaml.unsafe_load(text)
    assert marker.exists()  # live under an unsafe loader
    marker.unlink()
    MARKER_PATHS[:] = [marker]
    try:
        path = folder(work, "tags") / "directive.yaml"
        path.write_text(text, encoding="utf-8")
        err = check("policy", path, {str(path)})
        assert str(err).startswith(f"{path}:6: connect: unsupported YAML tag !!python/object/apply:os.system")
    finally:
        MARKER_PATHS.clear()


# --------------------------------------------------------------------------- hand-picked hostile files

MINIMAL_POLICY = """\
version: 1
name: t
classes:
  transport: {event: connection_lost, reissue: true, may_have_acted: true}
codes:
  CKR_DEVICE_ERROR: transport
default_class: transport
"""
MINIMAL_POOL = """\
pool: p
policy: network-hsm
members:
  - {name: a, module: /m.so, token_label: t, pin: env:HSM_PIN}
"""
MINIMAL = {"policy": MINIMAL_POLICY, "pool": MINIMAL_POOL}


def _laughs(levels: int = 9, width: int = 9) -> str:
    rows = ["l0: &l0 lol"] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(rows) + "\n"


#: name: (bytes, how they meet the minimal file, line, field, words in the message). The bytes
#: "replace" the file, are "prepended" (lines count from 1) or "appended" (lines count from the first
#: appended line). ``None``: any located error will do (several readings are reasonable).
HOSTILE: dict[str, tuple[bytes, str, int | None, str | None, str]] = {
    "empty": (b"", "replace", 1, None, "empty"),
    "only a comment": (b"# nothing\n", "replace", 1, None, "empty"),
    "only a BOM": (b"\xef\xbb\xbf", "replace", 1, None, "empty"),
    "a list": (b"- version: 1\n- name: x\n", "replace", 1, None, "expected a mapping, got a list"),
    "a scalar": (b"hello\n", "replace", 1, None, "expected a mapping, got 'hello'"),
    "a number": (b"42\n", "replace", 1, None, "expected a mapping, got 42"),
    "null": (b"~\n", "replace", 1, None, "expected a mapping, got null"),
    "two documents": (b"---\na: 1\n---\nb: 2\n", "replace", 3, "(yaml)", "expected a single document"),
    "too big": (b"#" * (MAX_FILE_BYTES + 1), "replace", 1, "(file)", f"larger than {MAX_FILE_BYTES} bytes"),
    "UTF-16": ("version: 1\n".encode("utf-16"), "replace", 1, "(file)", "not UTF-8"),
    "two BOMs": (b"\xef\xbb\xbf\xef\xbb\xbf", "prepend", 1, None, "unknown field"),
    "NUL byte": (b"x: a\x00b\n", "append", 1, "(file)", "control character #x00"),
    "non-UTF-8": (b"x: caf\xe9\n", "append", 1, "(file)", "not UTF-8"),
    "duplicate key": (b"x: 1\nx: 2\n", "append", 2, "x", "duplicate key (first given on line"),
    "unknown key": (b"colour: blue\n", "append", 1, "colour", "unknown field"),
    "billion laughs": (_laughs().encode(), "append", None, None, "more than 10000 values"),
    "recursive alias": (b"x: &a [*a]\n", "append", 1, "x", "nested more than 50 levels"),
    "undefined alias": (b"x: *nope\n", "append", 1, "(yaml)", "found undefined alias"),
    "merge key": (b"a: &a {x: 1}\nb:\n  <<: *a\n", "append", 3, "b", "merge keys"),
    "deep flow lists": (b"x: " + b"[" * 10_000 + b"]" * 10_000 + b"\n", "append", 1, "(yaml)",
                        "nested more than 50"),
    "deep flow mappings": (b"x: " + b"{a: " * 10_000 + b"}" * 10_000 + b"\n", "append", 1, "(yaml)",
                           "nested more than 50"),
    "deep block lists": (b"x:\n  " + b"- " * 10_000 + b"a\n", "append", 2, "(yaml)", "nested more than 50"),
    "huge int": (b"x: " + b"9" * 400 + b"\n", "append", 1, "x", "too long to be a whole number"),
    "huge hex int": (b"x: 0x" + b"f" * 5000 + b"\n", "append", 1, "x", "too long to be a whole number"),
    "huge sexagesimal int": (b"x: 1" + b":59" * 200_000 + b"\n", "append", 1, "x", "too long to be a whole number"),
    "infinity": (b"x: .inf\n", "append", 1, "x", "inf is not a finite number"),
    "not a number": (b"x: .nan\n", "append", 1, "x", "nan is not a finite number"),
    "huge float": (b"x: 1.0e+400\n", "append", 1, "x", "inf is not a finite number"),
    "bad bool": (b"x: !!bool maybe\n", "append", 1, "x", "cannot read 'maybe' as true or false"),
    "empty int": (b"x: !!int ''\n", "append", 1, "x", "cannot read '' as a whole number"),
    "empty float": (b"x: !!float\n", "append", 1, "x", "cannot read '' as a number"),
    "escape beyond Unicode": (b'x: "\\U0011FFFF"\n', "append", 1, "(yaml)", "names no Unicode character"),
    "line breaks in a key": (b'"a\\nb\\Lc\\Nd\\0": 1\n', "append", 1, "a\\nb\\u2028c\\x85d\\x00", "unknown field"),
    "huge string": (b"x: " + b"y" * 500_000 + b"\n", "append", 1, "x", "unknown field"),
    "huge key": (b"? " + b"k" * 100_000 + b"\n: 1\n", "append", 1, "k" * 61 + "...", "unknown field"),
    "set": (b"x: !!set {a}\n", "append", 1, "x", "unsupported YAML tag !!set"),
    "binary": (b"x: !!binary aGk=\n", "append", 1, "x", "unsupported YAML tag !!binary"),
    "timestamp": (b"x: 2001-12-14\n", "append", 1, "x", "unsupported YAML tag !!timestamp"),
}


@pytest.mark.parametrize("kind", ["policy", "pool"])
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_files_end_in_a_located_error(kind: str, name: str, work: Path) -> None:
    blob, mode, line, field, words = HOSTILE[name]
    base = MINIMAL[kind].encode()
    path = folder(work, "hostile") / f"{kind}.yaml"
    path.write_bytes({"replace": blob, "prepend": blob + base, "append": base + blob}[mode])
    err = check(kind, path, {str(path)})
    assert isinstance(err, PolicyError), f"{name} loaded as a {kind}"
    if line is not None:
        assert err.line == line + (base.count(b"\n") if mode == "append" else 0), str(err)
    if field is not None:
        assert err.field == field, str(err)
    assert words in str(err), str(err)


def test_the_minimal_files_are_valid(work: Path) -> None:
    """The hostile cases above fail because of what they add, not because the base is broken."""
    for kind, text in MINIMAL.items():
        path = folder(work, "hostile") / f"{kind}.yaml"
        path.write_text(text, encoding="utf-8")
        assert isinstance(check(kind, path, {str(path)}), RESULTS[kind])
        assert isinstance(check(kind, yaml.safe_load(text), {INLINE}), RESULTS[kind])


def test_a_bom_before_a_valid_file_is_accepted(work: Path) -> None:
    for kind, text in MINIMAL.items():
        path = folder(work, "hostile") / f"{kind}.yaml"
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert isinstance(check(kind, path, {str(path)}), RESULTS[kind])


@pytest.mark.parametrize("kind", ["policy", "pool"])
def test_an_alias_bomb_that_goes_off_inside_a_policy_ends_fast(kind: str, work: Path) -> None:
    """Anchors at the pool's top level, aliases deep in its inline policy: the count spans the whole file."""
    text = _laughs() + ("policy:\n  version: 1\n  name: x\n  extends: default\n  codes: {CKR_DEVICE_ERROR: *l9}\n"
                        if kind == "pool" else "codes: {CKR_DEVICE_ERROR: *l9}\n")
    path = folder(work, "hostile") / f"{kind}.yaml"
    path.write_text(text, encoding="utf-8")
    err = check(kind, path, {str(path)})
    assert isinstance(err, PolicyError) and "more than 10000 values" in str(err), str(err)


_MAPPINGS = "[" + ", ".join(f"{{a: {i}}}" for i in range(3000)) + "]"


@pytest.mark.parametrize("kind", ["policy", "pool", "inline"])
def test_thousands_of_mappings_where_unique_text_is_wanted_end_fast(kind: str, work: Path) -> None:
    """``idempotent`` must hold unique operation names; 3000 mappings there (a 40 kB file) must not
    make the uniqueness check compare every pair (jsonschema's way with items it cannot sort)."""
    policy = f"version: 1\nname: x\nextends: default\noperations:\n  idempotent: {_MAPPINGS}\n"
    if kind == "inline":
        err = check("policy", yaml.safe_load(policy), {INLINE})
        line = 1
    else:
        text = policy if kind == "policy" else \
            MINIMAL_POOL.replace("policy: network-hsm\n",
                                 "policy:\n" + "".join(f"  {row}\n" for row in policy.splitlines()))
        path = folder(work, "unique") / f"{kind}.yaml"
        path.write_text(text, encoding="utf-8")
        err = check(kind, path, {str(path)})
        line = 5 if kind == "policy" else 7
    assert isinstance(err, PolicyError) and err.line == line, str(err)
    assert err.field.endswith("operations.idempotent[0]") and "expected a string, got a mapping" in str(err), str(err)


def test_a_repeated_operation_is_still_named() -> None:
    """The faster uniqueness check still finds a repeat, among thousands of items, and names the second."""
    for items, repeat in ((["sign", "verify", "sign"], 2), (["sign", "verify"] * 3000, 2),
                          ([*(["sign"] * 3000), "verify"], 1)):
        err = check("policy", {"version": 1, "name": "x", "extends": "default", "operations": {"idempotent": items}},
                    {INLINE})
        assert str(err) == f"<inline>:1: operations.idempotent[{repeat}]: {items[repeat]!r} is listed twice", str(err)


# --------------------------------------------------------------------------- inline Python data


def _recursive_list() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


def _recursive_dict() -> dict[str, Any]:
    loop: dict[str, Any] = {}
    loop["a"] = loop
    return loop


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


#: Python values no YAML file can hold, each made afresh (the fuzzer edits what it is given).
INLINE_JUNK: dict[str, Callable[[], Any]] = {
    "10**400": lambda: 10**400,
    "-10**4000": lambda: -(10**4000),
    "nan": lambda: math.nan,
    "inf": lambda: -math.inf,
    "bytes": lambda: b"network-hsm",
    "set": lambda: {"sign"},
    "object": object,
    "complex": lambda: 1j,
    "tripwire class": lambda: Tripwire,
    "function": lambda: trip,
    "recursive list": _recursive_list,
    "recursive mapping": _recursive_dict,
    "10000 nested lists": lambda: _nested(10_000),
    "tuple key": lambda: {("a", "b"): 1},
    "None key": lambda: {None: 1},
    "bool key": lambda: {True: 1},
    "huge string": lambda: "s" * 1_000_000,
}
#: Where junk goes in an inline document (a path of keys below the top level).
INLINE_SPOTS = {"policy": [("version",), ("name",), ("connect", "max_attempts"), ("codes", "CKR_DEVICE_ERROR"),
                           ("operations", "idempotent")],
                "pool": [("pool",), ("members",), ("recovery", "max_attempts"), ("policy",),
                         ("policy", "probe", "interval")]}


def _put(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    holder = doc
    for key in path[:-1]:
        if not isinstance(holder.get(key), dict):
            holder[key] = {"version": 1, "name": "x", "extends": "default"} if key == "policy" else {}
        holder = holder[key]
    holder[path[-1]] = value
    return doc


@pytest.mark.parametrize("kind", ["policy", "pool"])
@pytest.mark.parametrize("junk", list(INLINE_JUNK))
def test_inline_junk_ends_in_a_located_error(kind: str, junk: str) -> None:
    base = yaml.safe_load(MINIMAL[kind])
    for spot in INLINE_SPOTS[kind]:
        err = check(kind, _put(base, spot, INLINE_JUNK[junk]()), {INLINE})
        assert isinstance(err, PolicyError), (junk, spot)
        assert err.field.startswith(spot[0]), str(err)
    assert not TRIPPED


@pytest.mark.parametrize("src", [None, 3, 1.5, b"default", ["default"], object(), "", "\x00",
                                 "no/such/dir/p.yaml", "x" * 5000, "a/" + "x" * 5000])
@pytest.mark.parametrize("kind", ["policy", "pool"])
def test_anything_that_is_no_source_is_a_located_error(kind: str, src: Any) -> None:
    result, _ = timed_load(kind, src)
    assert isinstance(result, PolicyError), src
    assert len(str(result).splitlines()) == 1 and result.line == 1, str(result)
    assert str(result).startswith(f"{result.file}:1: {result.field}: "), str(result)


# --------------------------------------------------------------------------- (a) structured documents

POLICY_FIELDS = ["version", "name", "extends", "connect", "backoff", "initial", "multiplier", "max", "jitter",
                 "max_attempts", "operations", "idempotent", "max_reissues", "deadline", "call_timeout", "probe",
                 "interval", "operation", "unhealthy_after", "healthy_after", "degraded", "slow_call",
                 "enter_after", "leave_after", "classes", "event", "reissue", "may_have_acted", "codes",
                 "default_class", "transport", "caller", "unknown", "CKR_DEVICE_ERROR", "0x30", "0x80000001",
                 "CKR_VENDOR_DEFINED+1", "HSMFSM_CALL_TIMEOUT", "reactions", "login", "call"]
POOL_FIELDS = ["pool", "policy", "balance", "recovery", "mode", "members", "module", "env", "token_label", "pin",
               "standby", "audit", "path", "rotate_size", "keep", "fsync", "P11_KIT_SERVER_ADDRESS"]
ODD_KEYS = ["", " ", "a\nb", "\ufeffversion", "version ", "<<", "x" * 2000, "CKR_DEVICE_ERROR ", "ckr_device_error"]
WORDS = ["10s", "250ms", "1.5m", "2h", "0s", "-1s", " 3 s ", "1e400s", "999999999999s", "9" * 30 + "s", "unlimited",
         "never", "all", "none", "connection_lost", "session_lost", "fatal", "impaired", "sign", "decrypt",
         "login_lost", "connect_failed", "probe_failed",
         "session_info", "round_robin", "least_busy", "primary", "background", "in_call", "10MiB", "3KB",
         "default", "network-hsm", "default.yaml", "ha-pool", "../policies/default.yaml", "/dev/null", "/dev/zero",
         "/", ".", "env:HSM_PIN", "env:", "file:/etc/hsm/pin", "123456", "${HSMFSM_RUN}", "${HSMFSM_RUN}/x.sock",
         "${NOPE}", "${", "${1x}", "$HOME", "yes", "no", "~", "null", ".inf", "0x30", "1:30", "2001-12-14"]
BIG = [10**400, -(10**400), 2**63, 2**64 + 1, 10**15, 10**16, 1_000_000, 1_000_001, 100_000, 4096, 1 << 40]
BIG_STRINGS = ["x" * 100_000, "9" * 5_000, " " * 20_000 + "1s", "a-" * 30_000]

# Known names and plausible values are drawn more often than junk (``one_of`` picks a branch
# uniformly), so that many documents get past the first check and reach the deeper ones.
_NAMES = st.sampled_from(POLICY_FIELDS + POOL_FIELDS)
KEYS = st.one_of(_NAMES, _NAMES, _NAMES, st.sampled_from(ODD_KEYS), st.text(max_size=8), st.integers(0, 70_000))
_PLAUSIBLE = st.sampled_from(WORDS + POLICY_FIELDS) | st.integers(-1, 12) | st.booleans()
SCALARS = st.one_of(_PLAUSIBLE, _PLAUSIBLE, _PLAUSIBLE, st.none(), st.integers(), st.sampled_from(BIG), st.floats(),
                    st.text(max_size=12), st.sampled_from(BIG_STRINGS))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                      max_leaves=10)

BASES = {
    "policy": [yaml.safe_load((SHIPPED / name).read_text(encoding="utf-8")) for name in POLICY_FILES]
    + [yaml.safe_load(MINIMAL_POLICY)],
    "pool": [yaml.safe_load((SHIPPED / name).read_text(encoding="utf-8")) for name in POOL_FILES]
    + [yaml.safe_load(MINIMAL_POOL)],
}


def _slots(value: Any) -> list[tuple[Any, Any]]:
    """Every (container, key or index) in ``value``, the root's parent included as (None, None).

    Junk may be recursive or 10 000 deep: each container is visited once, and only 20 levels down.
    """
    found: list[tuple[Any, Any]] = [(None, None)]
    seen: set[int] = set()

    def walk(node: Any, depth: int) -> None:
        if not isinstance(node, (dict, list)) or id(node) in seen or depth > 20:
            return
        seen.add(id(node))
        for slot in (list(node) if isinstance(node, dict) else range(len(node))):
            found.append((node, slot))
            walk(node[slot], depth + 1)

    walk(value, 0)
    return found


@st.composite
def edited(draw: st.DrawFn, kind: str, keys: st.SearchStrategy[Any] = KEYS,
           values: st.SearchStrategy[Any] = VALUES) -> Any:
    """A shipped (or minimal) document with 1 to 4 edits: set, delete, add, rename or duplicate a field."""
    doc: Any = copy.deepcopy(draw(st.sampled_from(BASES[kind])))
    if kind == "pool" and draw(st.booleans()):  # an inline policy, itself edited
        doc["policy"] = draw(edited("policy", keys, values))
    for _ in range(draw(st.integers(1, 4))):
        slots = _slots(doc)
        holder, slot = slots[draw(st.integers(0, 10_000)) % len(slots)]
        op = draw(st.sampled_from(["set", "set", "delete", "add", "rename", "duplicate"]))
        if holder is None:
            if op == "set":
                doc = draw(values)
            continue
        if op == "set":
            holder[slot] = draw(values)
        elif op == "delete":
            del holder[slot]
        elif op == "add" and isinstance(holder, dict):
            holder[draw(keys)] = draw(values)
        elif op == "rename" and isinstance(holder, dict):
            holder[draw(keys)] = holder.pop(slot)
        else:  # a duplicate: the same object twice, which safe_dump writes as an anchor and an alias
            value = holder[slot]
            if isinstance(holder, dict):
                holder[draw(keys)] = value
            else:
                holder.append(value)
    return doc


def _text_keys_only(value: Any) -> bool:
    """Whether every key is text (or a whole number): then YAML and inline read the same keys."""
    if isinstance(value, dict):
        return all(isinstance(k, str) or (isinstance(k, int) and not isinstance(k, bool) and k >= 0)
                   and _text_keys_only(v) for k, v in value.items())
    return all(_text_keys_only(v) for v in value) if isinstance(value, list) else True


def _comparable(result: Any) -> Any:
    """A result without what names its origin: the source label, and paths resolved from its folder."""
    if isinstance(result, PolicyError):
        return PolicyError
    if isinstance(result, PoolSpec):
        result = dataclasses.replace(result, source="", policy=dataclasses.replace(result.policy, source=""))
        return dataclasses.replace(result, audit=None) if hasattr(result, "audit") else result
    return dataclasses.replace(result, source="")


def _dump(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=False, width=120)


#: Either kind of document, edited, with its kind.
DOCUMENTS = st.one_of(edited("policy").map(lambda data: ("policy", data)),
                      edited("pool").map(lambda data: ("pool", data)))


def _shipped_with(kind: str, **changes: Any) -> Any:
    return {**copy.deepcopy(BASES[kind][0]), **changes}


@fuzz(300)
@given(case=DOCUMENTS)
# Found by the fuzz: a policy that is no file (a device) was blamed on /dev/null:1, not on the line naming it.
@example(case=("pool", _shipped_with("pool", policy="/dev/null")))
@example(case=("policy", _shipped_with("policy", extends="/dev/null")))
def test_structured_documents_load_or_fail_located(case: tuple[str, Any], work: Path) -> None:
    """(a) Edited shipped documents, written with safe_dump and given inline: the same verdict either way."""
    kind, data = case
    path = folder(work, "structured") / f"{kind}.yaml"
    path.write_text(_dump(data), encoding="utf-8")
    from_file = check(kind, path, {str(path)})
    if not isinstance(data, dict):
        return  # given directly, text is a path and anything else no source at all: not inline content
    inline = check(kind, data, {INLINE})
    if _text_keys_only(data):
        assert _comparable(from_file) == _comparable(inline), (from_file, inline)


@st.composite
def inline_junk(draw: st.DrawFn, kind: str) -> Any:
    """A document with a Python value no YAML file can hold, somewhere inside."""
    junk = st.sampled_from(list(INLINE_JUNK)).map(lambda name: INLINE_JUNK[name]()) | st.tuples(VALUES, VALUES) \
        | st.frozensets(st.integers())
    return draw(edited(kind, keys=KEYS | st.sampled_from([None, True, 1.5, ("k",), b"k"]), values=VALUES | junk))


@pytest.mark.parametrize("kind", ["policy", "pool"])
@fuzz(150)
@given(doc=st.data())
def test_inline_documents_with_python_junk_load_or_fail_located(kind: str, doc: st.DataObject) -> None:
    data = doc.draw(inline_junk(kind), label="document")
    assume(not isinstance(data, str))  # text given directly is a path, not inline content
    check(kind, data, {INLINE})


# --------------------------------------------------------------------------- (b) mutated shipped text

SNIPPETS = [b"\x00", b"\xef\xbb\xbf", b"\xff", b"\xfe\xff", b"\xc3", b"\xed\xa0\x80", b"\r", b"\r\n", b"\n", b"\t",
            b" ", b"  ", b":", b": ", b"- ", b"[", b"]", b"{", b"}", b",", b"'", b'"', b"&a ", b"*a", b"&a", b"*a\n",
            b"<<: *a\n", b"? ", b"|\n", b">-\n", b"#", b"~", b"!", b"!!", b"%", b"@", b"`", b"\\", b"---\n", b"...\n",
            b"%YAML 1.1\n---\n", b"%TAG !! tag:yaml.org,2002:python/object/apply:\n---\n",
            b"!!python/name:os.system ", b"!!set ", b"!!binary ", b"!!bool ", b"!!int ", b"!!float ", b"!!str ",
            b"!!null ", b"!!map ", b"!!seq ", b"!<tag:x> ", b"9" * 400, b".inf", b".nan", b"-.inf", b"1e400",
            b"0x" + b"f" * 300, b"1" + b":59" * 50, b"\\U0011FFFF", b'"\\U0011FFFF"', b'"\\ud800"', b'"\\0"',
            "\u2028".encode(), "\x85".encode(), "\ufeff".encode(), b"[" * 100, b"{a: " * 60,
            b"extends: ", b"extends: default\n", b"extends: network-hsm\n", b"extends: ha-pool\n", b"extends: .\n",
            b"pool: x\n", b"version: 1\n", b"version: 2\n", b"name: x\n", b"policy: default\n",
            b"CKR_DEVICE_ERROR: transport\n", b"0x30: caller\n", b"unlimited", b"10ms", b"1h", b"${", b"${NOPE}",
            b"${HSMFSM_RUN}", b"env:", b"file:", b"standby: true\n", b"  - name: hsm-a\n"]


@st.composite
def mutated(draw: st.DrawFn, original: bytes, marker: Path) -> bytes:
    """``original`` after 1 to 4 byte- and line-level edits."""
    text = original
    snippets = st.sampled_from(SNIPPETS + [f'!!python/object/apply:os.system ["touch {marker}"] '.encode()])
    pieces = st.one_of(snippets, snippets, snippets, snippets, snippets, st.binary(min_size=1, max_size=6))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, 1 << 20)) % (len(text) + 1)
        op = draw(st.sampled_from(["insert", "delete", "replace", "drop line", "copy line", "swap lines",
                                   "replace line", "indent line"]))
        lines = text.splitlines(keepends=True) or [b""]
        i, j = where % len(lines), draw(st.integers(0, 1 << 20)) % len(lines)
        if op == "insert":
            text = text[:where] + draw(pieces) + text[where:]
        elif op == "delete":
            text = text[:where] + text[where + draw(st.integers(1, 40)):]
        elif op == "replace":
            text = text[:where] + draw(pieces) + text[where + draw(st.integers(1, 10)):]
        elif op == "drop line":
            text = b"".join(lines[:i] + lines[i + 1:])
        elif op == "copy line":  # a duplicate key, usually
            text = b"".join(lines[:j] + [lines[i]] + lines[j:])
        elif op == "swap lines":
            lines[i], lines[j] = lines[j], lines[i]
            text = b"".join(lines)
        elif op == "replace line":
            text = b"".join(lines[:i] + [draw(pieces) + b"\n"] + lines[i + 1:])
        else:
            text = b"".join(lines[:i] + [b" " * draw(st.integers(1, 4)) + lines[i]] + lines[i + 1:])
    return text


def _mutation_test(kind: str, name: str, doc: st.DataObject, work: Path) -> None:
    here = folder(work, "mutation")
    marker = here / "marker"
    MARKER_PATHS[:] = [marker]
    try:
        text = doc.draw(mutated((SHIPPED / name).read_bytes(), marker), label="text")
        path = here / name
        path.write_bytes(text)
        # a mutation may make the file extend (or name as its policy) an earlier mutant next to it
        check(kind, path, {str(p) for p in here.iterdir()})
    finally:
        MARKER_PATHS.clear()


@pytest.mark.parametrize("name", POLICY_FILES)
@fuzz(250)
@given(doc=st.data())
def test_mutated_shipped_policies_load_or_fail_located(name: str, doc: st.DataObject, work: Path) -> None:
    """(b) The shipped policies' text, mutated: a policy or a located error, in time."""
    _mutation_test("policy", name, doc, work)


@pytest.mark.parametrize("name", POOL_FILES)
@fuzz(250)
@given(doc=st.data())
def test_mutated_shipped_pools_load_or_fail_located(name: str, doc: st.DataObject, work: Path) -> None:
    """(b) The shipped pool files' text, mutated: a pool or a located error, in time."""
    _mutation_test("pool", name, doc, work)


def test_the_unmutated_shipped_files_load(work: Path) -> None:
    """The mutation tests start from files that load: a failure there is the mutation's doing."""
    for name in POLICY_FILES + POOL_FILES:
        path = folder(work, "unmutated") / name
        path.write_bytes((SHIPPED / name).read_bytes())
        assert isinstance(check("policy" if name in POLICY_FILES else "pool", path, {str(path)}),
                          (Policy, PoolSpec))


@fuzz(60)
@given(depth=st.integers(1, 10_000), opens=st.lists(st.sampled_from(["[", "{a: ", "- "]), min_size=1, max_size=3),
       kind=st.sampled_from(["policy", "pool"]))
def test_deep_nesting_ends_fast(depth: int, opens: list[str], kind: str, work: Path) -> None:
    """Nested flow lists, flow mappings and block-list dashes, up to 10 000 deep, in a valid file.

    Every variant is an error on the line it is on: ``x`` is no field, a dash cannot
    start a list there, and nesting deeper than 50 is refused as such.
    """
    closes = {"[": "]", "{a: ": "}", "- ": ""}
    nest = "".join(opens[i % len(opens)] for i in range(depth))
    tail = "".join(closes[opens[i % len(opens)]] for i in reversed(range(depth)))
    path = folder(work, "deep") / f"{kind}.yaml"
    path.write_text(MINIMAL[kind] + "x: " + nest + "1" + tail + "\n", encoding="utf-8")
    err = check(kind, path, {str(path)})
    assert isinstance(err, PolicyError)
    assert err.line == MINIMAL[kind].count("\n") + 1, str(err)
    if depth > 50 and "- " not in opens:
        assert "nested more than 50 levels" in str(err), str(err)


# --------------------------------------------------------------------------- extends chains


@fuzz(60)
@given(length=st.integers(1, MAX_EXTENDS + 3), loop=st.none() | st.integers(0, MAX_EXTENDS + 3),
       edits=st.lists(st.tuples(st.integers(0, MAX_EXTENDS + 3), VALUES), max_size=3),
       data=st.data())
def test_extends_chains_load_or_fail_located(length: int, loop: int | None, edits: list[tuple[int, Any]],
                                             data: st.DataObject, work: Path) -> None:
    """Chains of files that extend the next (the last extends the shipped default, or loops back).

    Exactly MAX_EXTENDS links load; one more is refused; a loop is a cycle. With
    edits (hostile values in some files) the property is all that is promised:
    a policy, or an error located in one of the chain's files (or a shipped one).
    """
    here = folder(work, "chain")
    names = [f"c{i}.yaml" for i in range(length)]
    docs: list[Any] = [{"version": 1, "name": f"c{i}", "extends": names[i + 1] if i + 1 < length else "default"}
                       for i in range(length)]
    looped = loop is not None and loop < length
    if looped:
        docs[-1]["extends"] = names[loop]  # type: ignore[index]
    for index, value in edits:
        if index < length:
            field = data.draw(st.sampled_from(["probe", "operations", "name", "x", "extends", "codes"]))
            docs[index][field] = value
    for name, doc in zip(names, docs):
        (here / name).write_text(_dump(doc), encoding="utf-8")
    result = check("policy", here / names[0], {str(here / n) for n in names})
    if edits:
        return
    if looped:  # a long loop may first be too deep; a short one is a cycle
        words = ["cycle"] if length <= MAX_EXTENDS else ["cycle", f"more than {MAX_EXTENDS} levels"]
        assert isinstance(result, PolicyError) and any(w in str(result) for w in words), result
    elif length > MAX_EXTENDS:  # ``length`` links: the files, each extending the next, the last the default
        assert isinstance(result, PolicyError) and f"more than {MAX_EXTENDS} levels" in str(result), result
    else:
        assert isinstance(result, Policy) and result.name == "c0", result


def test_a_chain_through_a_mutated_base_points_into_the_base(work: Path) -> None:
    """An error in a file two links down names that file and its line, not the file that was loaded."""
    here = folder(work, "chain-base")
    (here / "base.yaml").write_text("version: 1\nname: base\nextends: default\nprobe:\n  interval: !!bool maybe\n",
                                    encoding="utf-8")
    (here / "mid.yaml").write_text("version: 1\nname: mid\nextends: base.yaml\n", encoding="utf-8")
    (here / "top.yaml").write_text("version: 1\nname: top\nextends: mid.yaml\n", encoding="utf-8")
    err = check("policy", here / "top.yaml", {str(here / "top.yaml"), str(here / "base.yaml")})
    assert isinstance(err, PolicyError)
    assert str(err).startswith(f"{here / 'base.yaml'}:5: probe.interval: cannot read 'maybe' as true or false")
