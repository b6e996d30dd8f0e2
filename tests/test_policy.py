"""Policies: the shipped ones, ``extends``, and every way a policy file can be wrong.

A broken policy must come back as one line, ``FILE:LINE: FIELD: what is
wrong``, pointing at the right line, and never as a traceback: operators fix
policies during outages, from CI logs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from hsmfsm.config.check import check_files
from hsmfsm.config.policy_file import SCHEMA_PATH, SHIPPED_DIR, default_policy, load_policy
from hsmfsm.core.codes import ALL_NAMES, CKR_VENDOR_DEFINED, code_from_name
from hsmfsm.core.policy import OPERATIONS, CodeClass, PolicyError
from hsmfsm.core.rules import ALLOWED, Phase, derived_reaction, reaction
from hsmfsm.core.states import CODE_EVENTS, Event
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent


def examples(count: int) -> int:
    """``count`` examples in ``make test`` (the derandomized "ci" profile); as many as a deeper profile asks
    for under ``make fuzz``. Randomness and the database are left to the profile (conftest.py)."""
    deeper = settings.default.max_examples
    return count if deeper <= 100 else max(count, deeper)


#: Under ``make fuzz`` a test runs for minutes; ``make test``'s 120 s per-test timeout is for hangs.
pytestmark = [pytest.mark.timeout(1800)] if settings.default.max_examples > 100 else []

#: A small valid policy. Eight lines: text appended to it starts on line 9.
MINIMAL = """\
version: 1
name: t
classes:
  transport: {event: connection_lost, reissue: true, may_have_acted: true}
  caller: {event: none, reissue: false, may_have_acted: false}
codes:
  CKR_DEVICE_ERROR: transport
default_class: transport
"""

BILLION_LAUGHS = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}' if prev else 'lol'] * 9)}]\n"
    for prev, name in zip([""] + list("abcdefgh"), "abcdefghi")
)


def with_codes(*entries: str) -> str:
    """MINIMAL with more ``codes`` entries, from line 8 on."""
    return MINIMAL.replace("transport\ndefault_class", "transport\n" + "".join(f"  {e}\n" for e in entries)
                           + "default_class")


def write(tmp_path: Path, text: str | bytes, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def error_of(source: object) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        load_policy(source)  # type: ignore[arg-type]
    return info.value


def assert_located(err: PolicyError, file: str, line: int, field: str) -> None:
    """The message starts ``FILE:LINE: FIELD: `` and the attributes agree with it."""
    assert str(err).startswith(f"{file}:{line}: {field}: "), str(err)
    assert (err.file, err.line, err.field) == (file, line, field)


# --------------------------------------------------------------------------- shipped policies

DEFAULT_CLASSES = {
    "transport": (Event.CONNECTION_LOST, True, True),
    "session": (Event.SESSION_LOST, True, False),
    "login": (Event.LOGIN_LOST, True, False),
    "fatal": (Event.FATAL, False, False),
    "caller": (None, False, False),
    "capacity": (Event.IMPAIRED, True, False),
    "unknown": (Event.CONNECTION_LOST, True, True),
}

DEFAULT_CODES_BY_CLASS = {
    "transport": ["CKR_DEVICE_ERROR", "CKR_DEVICE_REMOVED", "CKR_TOKEN_NOT_PRESENT", "CKR_TOKEN_NOT_RECOGNIZED",
                  "CKR_SLOT_ID_INVALID", "CKR_CRYPTOKI_NOT_INITIALIZED", "CKR_FUNCTION_FAILED", "CKR_GENERAL_ERROR",
                  "HSMFSM_NO_SUCH_TOKEN", "HSMFSM_CALL_TIMEOUT"],
    "session": ["CKR_SESSION_HANDLE_INVALID", "CKR_SESSION_CLOSED", "CKR_OBJECT_HANDLE_INVALID",
                "CKR_KEY_HANDLE_INVALID", "CKR_OPERATION_ACTIVE", "CKR_OPERATION_NOT_INITIALIZED"],
    "login": ["CKR_USER_NOT_LOGGED_IN"],
    "fatal": ["CKR_PIN_INCORRECT", "CKR_PIN_LOCKED", "CKR_PIN_EXPIRED", "CKR_PIN_INVALID", "CKR_PIN_LEN_RANGE",
              "CKR_USER_PIN_NOT_INITIALIZED"],
    "capacity": ["CKR_DEVICE_MEMORY", "CKR_HOST_MEMORY", "CKR_SESSION_COUNT", "CKR_FUNCTION_CANCELED"],
    "caller": ["CKR_ARGUMENTS_BAD", "CKR_DATA_INVALID", "CKR_DATA_LEN_RANGE", "CKR_MECHANISM_INVALID",
               "CKR_MECHANISM_PARAM_INVALID", "CKR_KEY_TYPE_INCONSISTENT", "CKR_KEY_FUNCTION_NOT_PERMITTED",
               "CKR_KEY_SIZE_RANGE", "CKR_SIGNATURE_INVALID", "CKR_SIGNATURE_LEN_RANGE",
               "CKR_ENCRYPTED_DATA_INVALID", "CKR_ENCRYPTED_DATA_LEN_RANGE", "CKR_TEMPLATE_INCOMPLETE",
               "CKR_TEMPLATE_INCONSISTENT", "CKR_ATTRIBUTE_READ_ONLY", "CKR_ATTRIBUTE_SENSITIVE",
               "CKR_ATTRIBUTE_TYPE_INVALID", "CKR_ATTRIBUTE_VALUE_INVALID", "CKR_FUNCTION_NOT_SUPPORTED",
               "CKR_TOKEN_WRITE_PROTECTED", "CKR_USER_ALREADY_LOGGED_IN", "HSMFSM_NO_SUCH_KEY",
               "HSMFSM_MULTIPLE_OBJECTS", "HSMFSM_MULTIPLE_TOKENS"],
}
DEFAULT_CODES = {code: cls for cls, codes in DEFAULT_CODES_BY_CLASS.items() for code in codes}


def test_default_policy_has_the_reference_values() -> None:
    p = load_policy("default")
    assert p.name == "default"
    b = p.connect.backoff
    assert (b.initial, b.multiplier, b.max, b.jitter) == (0.05, 2.0, 5.0, 0.2)
    assert p.connect.max_attempts is None
    ops = p.operations
    assert ops.idempotent == frozenset({"sign", "verify", "decrypt", "generate_random"})
    assert (ops.max_reissues, ops.deadline, ops.call_timeout) == (3, 10.0, 5.0)
    assert (p.probe.interval, p.probe.operation, p.probe.unhealthy_after, p.probe.healthy_after) == \
        (1.0, "session_info", 2, 2)
    assert (p.degraded.slow_call, p.degraded.enter_after, p.degraded.leave_after) == (1.0, 3, 5)


def test_default_policy_classifies_codes_as_specified() -> None:
    p = load_policy("default")
    assert dict(p.classes) == {name: CodeClass(name, *spec) for name, spec in DEFAULT_CLASSES.items()}
    assert dict(p.codes) == DEFAULT_CODES
    assert p.default_class == "unknown"
    assert p.class_of(code_from_name("CKR_PIN_INCORRECT")).event is Event.FATAL
    assert p.class_of(code_from_name("0x80000001")).name == "unknown"


def test_network_hsm_tightens_timings_and_inherits_the_rest() -> None:
    net, base = load_policy("network-hsm"), load_policy("default")
    assert net.name == "network-hsm"
    assert (net.operations.call_timeout, net.operations.deadline) == (2.0, 8.0)
    assert net.probe.interval == 0.5
    assert net.degraded.slow_call == 0.5
    assert (net.connect.backoff.initial, net.connect.backoff.max) == (0.1, 3.0)
    # Everything it does not list comes from default.
    assert (net.connect.backoff.multiplier, net.connect.backoff.jitter) == (2.0, 0.2)
    assert net.operations.idempotent == base.operations.idempotent
    assert (dict(net.classes), dict(net.codes), net.default_class) == \
        (dict(base.classes), dict(base.codes), base.default_class)
    assert "extends: default" in (SHIPPED_DIR / "network-hsm.yaml").read_text()


def test_shipped_policies_are_reachable_by_name_and_by_path() -> None:
    by_path, by_name = load_policy(REPO / "policies" / "network-hsm.yaml"), load_policy("network-hsm")
    assert by_path.source == str(REPO / "policies" / "network-hsm.yaml")
    assert dataclasses.replace(by_path, source=by_name.source) == by_name


def test_default_policy_is_loaded_once() -> None:
    assert default_policy() is default_policy()
    assert default_policy().operations == load_policy("default").operations


def _schema_fields(schema: dict, prefix: tuple = ()) -> set[tuple]:
    """Paths of every fixed field the schema defines (not the open maps: classes, codes)."""
    fields = set()
    for name, sub in schema.get("properties", {}).items():
        fields.add(prefix + (name,))
        fields |= _schema_fields(sub, prefix + (name,))
    return fields


def _yaml_fields(data: dict, prefix: tuple = ()) -> set[tuple]:
    fields = set()
    for name, value in data.items():
        fields.add(prefix + (name,))
        if isinstance(value, dict) and name not in ("classes", "codes") and prefix != ("reactions",):
            fields |= _yaml_fields(value, prefix + (name,))
    return fields


def test_default_yaml_sets_every_field_so_dataclass_defaults_do_not_matter() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    raw = yaml.safe_load((SHIPPED_DIR / "default.yaml").read_text())
    # a call follows each class's event: the default writes no call table (see the reactions tests)
    assert _schema_fields(schema) - {("extends",), ("reactions", "call")} == _yaml_fields(raw)


# --------------------------------------------------------------------------- the schema


def _subschemas(schema: object):
    if isinstance(schema, dict):
        yield schema
        for value in schema.values():
            yield from _subschemas(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _subschemas(value)


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_schema_closes_every_object_and_describes_every_field() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    objects = [s for s in _subschemas(schema) if s.get("type") == "object"]
    assert objects and all("additionalProperties" in s for s in objects)
    assert all(s["additionalProperties"] is False for s in objects if "properties" in s)
    fields = [sub for s in objects for sub in s.get("properties", {}).values()]
    undocumented = [f for f in fields if not f.get("description")]
    assert fields and not undocumented


@pytest.mark.parametrize("name", ["default", "network-hsm"])
def test_shipped_yaml_validates_against_the_schema_with_plain_jsonschema(name: str) -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    data = yaml.safe_load((SHIPPED_DIR / f"{name}.yaml").read_text())
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(data))
    assert errors == []


def test_plain_jsonschema_applies_the_caps_to_numbers() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    data = yaml.safe_load((SHIPPED_DIR / "default.yaml").read_text())
    data["operations"]["deadline"] = 7200
    assert not jsonschema.Draft202012Validator(schema).is_valid(data)


def test_schema_enums_match_the_code() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    props = schema["properties"]
    assert set(props["classes"]["additionalProperties"]["properties"]["event"]["enum"]) == set(CODE_EVENTS)
    assert props["operations"]["properties"]["idempotent"]["items"]["enum"] == list(OPERATIONS)


# --------------------------------------------------------------------------- extends


def test_extends_merges_mappings_and_replaces_lists(tmp_path: Path) -> None:
    write(tmp_path, MINIMAL + "operations:\n  idempotent: [sign, verify]\n  deadline: 6s\n", "base.yaml")
    child = write(tmp_path, """\
version: 1
name: child
extends: base.yaml
operations:
  idempotent: [decrypt]
classes:
  caller: {reissue: true}
codes:
  0x30: caller
""", "child.yaml")
    p = load_policy(child)
    assert p.name == "child" and p.source == str(child)
    assert p.operations.idempotent == frozenset({"decrypt"})  # list replaced
    assert p.operations.deadline == 6.0  # sibling kept
    assert p.classes["caller"] == CodeClass("caller", None, True, False)  # one field overridden
    assert dict(p.codes) == {"CKR_DEVICE_ERROR": "caller"}  # 0x30 is CKR_DEVICE_ERROR: overridden


def test_extends_a_shipped_policy_by_name(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\nname: mine\nextends: network-hsm\nprobe:\n  interval: 2s\n")
    p = load_policy(path)
    assert (p.name, p.probe.interval, p.operations.call_timeout) == ("mine", 2.0, 2.0)
    assert p.codes == load_policy("default").codes


def test_extends_cycle_is_an_error_at_the_extends_line(tmp_path: Path) -> None:
    a = write(tmp_path, "version: 1\nname: a\nextends: b.yaml\n", "a.yaml")
    b = write(tmp_path, "# b\nversion: 1\nname: b\nextends: ./a.yaml\n", "b.yaml")
    err = error_of(a)
    assert_located(err, str(b), 4, "extends")
    assert "cycle" in str(err) and f"{a} -> {b} -> {a}" in str(err)


def test_a_policy_extending_itself_is_a_cycle(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\nname: me\nextends: p.yaml\n")
    assert_located(error_of(path), str(path), 3, "extends")


def test_extends_a_missing_policy_suggests_the_shipped_one(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\nname: x\nextends: defualt\n")
    err = error_of(path)
    assert_located(err, str(path), 3, "extends")
    assert "did you mean default?" in str(err)


def test_errors_in_a_base_point_into_the_base(tmp_path: Path) -> None:
    base = write(tmp_path, MINIMAL + "probe:\n  interval: 1ms\n", "base.yaml")
    child = write(tmp_path, "version: 1\nname: c\nextends: base.yaml\n", "child.yaml")
    assert_located(error_of(child), str(base), 10, "probe.interval")


def test_a_child_must_complete_what_its_base_lacks(tmp_path: Path) -> None:
    write(tmp_path, MINIMAL, "base.yaml")
    child = write(tmp_path, "version: 1\nname: c\nextends: base.yaml\nclasses:\n  new: {event: fatal}\n",
                  "child.yaml")
    err = error_of(child)
    assert_located(err, str(child), 5, "classes.new.reissue")
    assert str(err).endswith("missing required field")


def test_a_conflict_is_blamed_on_the_field_the_child_set(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\nname: c\nextends: default\noperations:\n  deadline: 1s\n")
    err = error_of(path)
    assert_located(err, str(path), 5, "operations.deadline")
    assert "shorter than operations.call_timeout (5s)" in str(err)


# --------------------------------------------------------------------------- reactions

#: The phases the shipped default writes out in full; a call is left to each class's event.
WRITTEN_PHASES = (Phase.CONNECT, Phase.LOGIN, Phase.PROBE)


@pytest.mark.parametrize("name", ["default", "network-hsm"])
def test_the_shipped_reactions_are_the_derived_ones_written_out(name: str) -> None:
    """Today's behaviour made explicit: every (connect|login|probe, class) is written, equal to the derivation."""
    p = load_policy(name)
    assert set(p.reactions) == {phase.value for phase in WRITTEN_PHASES}  # no call table
    for phase in WRITTEN_PHASES:
        written = dict(p.reactions[phase.value])
        assert set(written) == set(p.classes), phase
        assert written == {cls: derived_reaction(phase, spec.event).value for cls, spec in p.classes.items()}, phase
        assert all(r in ALLOWED[phase] for r in written.values()), phase
    for phase in Phase:  # what the runtime asks: the same as with no reactions at all
        bare = dataclasses.replace(p, reactions={})
        assert {c: reaction(p, phase, c) for c in p.classes} == {c: reaction(bare, phase, c) for c in p.classes}


def test_the_default_writes_each_reaction_on_its_own_commented_line() -> None:
    text = (SHIPPED_DIR / "default.yaml").read_text()
    section = text[text.index("\nreactions:\n"):]
    assert "call:" not in section.replace("`call:`", "")  # only mentioned in a comment
    for phase in WRITTEN_PHASES:
        assert f"\n  {phase.value}:\n" in section, phase


def test_reactions_load_as_written(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "reactions:\n  connect: {transport: fatal}\n  call:\n    caller: impaired\n"
                                     "  probe: {}\n")
    p = load_policy(path)
    assert {k: dict(v) for k, v in p.reactions.items()} == {"connect": {"transport": "fatal"},
                                                            "call": {"caller": "impaired"}, "probe": {}}
    assert reaction(p, Phase.CONNECT, "transport") == "fatal"
    assert reaction(p, Phase.CALL, "caller") == "impaired"
    assert reaction(p, Phase.LOGIN, "caller") == derived_reaction(Phase.LOGIN, None)  # not written: derived
    with pytest.raises(TypeError):
        p.reactions["connect"]["caller"] = "fatal"  # type: ignore[index]


def test_extends_merges_reactions_per_phase_and_per_class(tmp_path: Path) -> None:
    write(tmp_path, MINIMAL + "reactions:\n  connect: {transport: fatal, caller: connect_failed}\n"
                              "  probe: {caller: fatal}\n", "base.yaml")
    child = write(tmp_path, """\
version: 1
name: child
extends: base.yaml
classes:
  busy: {event: impaired, reissue: true, may_have_acted: false}
reactions:
  connect: {transport: connect_failed}
  login: {busy: session_lost}
""", "child.yaml")
    p = load_policy(child)
    assert {k: dict(v) for k, v in p.reactions.items()} == {
        "connect": {"transport": "connect_failed", "caller": "connect_failed"},  # one class overridden
        "probe": {"caller": "fatal"},  # a phase the child does not name is inherited
        "login": {"busy": "session_lost"},  # a class the child defines
    }


def test_a_child_may_react_to_a_class_of_its_base(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\nname: c\nextends: default\nreactions:\n  call: {capacity: connection_lost}\n")
    p = load_policy(path)
    assert reaction(p, Phase.CALL, "capacity") == "connection_lost"
    assert dict(p.reactions["probe"]) == dict(load_policy("default").reactions["probe"])


def test_an_unknown_class_in_an_inherited_reaction_is_found_in_the_base(tmp_path: Path) -> None:
    base = write(tmp_path, MINIMAL + "reactions:\n  probe:\n    capacity: probe_failed\n", "base.yaml")
    child = write(tmp_path, "version: 1\nname: c\nextends: base.yaml\n", "child.yaml")
    err = error_of(child)
    assert_located(err, str(base), 11, "reactions.probe.capacity")
    assert str(err).endswith("unknown class 'capacity' (known: transport, caller)")


def test_inline_reactions_errors_are_located() -> None:
    with pytest.raises(PolicyError) as info:
        load_policy({"version": 1, "name": "x", "extends": "default",
                     "reactions": {"login": {"caller": "probe_failed"}}}, source="pool.yaml", line=4)
    assert str(info.value) == ("pool.yaml:4: reactions.login.caller: 'probe_failed' is not a reaction of the login "
                               "phase (allowed there: connection_lost, session_lost, fatal)")


def test_the_schema_lists_and_documents_every_phase_and_reaction() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    phases = schema["properties"]["reactions"]["properties"]
    assert set(phases) == {phase.value for phase in Phase}
    for phase in Phase:
        spec = phases[phase.value]
        assert "derived_reaction" in spec["description"], phase
        ref = spec["additionalProperties"]["$ref"].rsplit("/", 1)[1]
        values = schema["$defs"][ref]
        assert values["enum"] == [r.value for r in ALLOWED[phase]], phase
        assert len(values["enumDescriptions"]) == len(values["enum"]) and all(values["enumDescriptions"]), phase
        for r in ALLOWED[phase]:  # each reaction the phase allows is explained in the phase's own words
            assert f"{r.value}:" in spec["description"], (phase, r)


# --------------------------------------------------------------------------- broken policies

BROKEN = [
    # (id, policy text, line, field, text the message must contain)
    ("yaml syntax", MINIMAL + "operations:\n  deadline: 2s\n   call_timeout: 1s\n", 11, "(yaml)",
     "mapping values are not allowed here"),
    ("unknown field", MINIMAL + "connect:\n  backoff:\n    colour: red\n", 11, "connect.backoff.colour",
     "unknown field (known: initial, multiplier, max, jitter)"),
    ("unknown top-level field", MINIMAL + "retries: 3\n", 9, "retries", "unknown field (known: version, name,"),
    ("wrong type", MINIMAL + "operations:\n  max_reissues: three\n", 10, "operations.max_reissues",
     "expected a whole number, got 'three'"),
    ("above the cap", MINIMAL + "operations:\n  max_reissues: 1000\n", 10, "operations.max_reissues",
     "1000 is above the hard cap of 10"),
    ("duration above the cap", MINIMAL + "operations:\n  deadline: 2h\n", 10, "operations.deadline",
     "'2h' is above the hard cap of 1h"),
    ("duration below the minimum", MINIMAL + "probe:\n  interval: 1ms\n", 10, "probe.interval",
     "'1ms' is below the minimum of 50ms"),
    ("not a duration", MINIMAL + "operations:\n  deadline: 5 seconds\n", 10, "operations.deadline",
     "'5 seconds' is not a valid duration"),
    ("attempts out of range", MINIMAL + "connect:\n  max_attempts: 0\n", 10, "connect.max_attempts",
     "0 is below the minimum of 1"),
    ("not a finite number", MINIMAL + "connect:\n  backoff:\n    jitter: .nan\n", 11, "connect.backoff.jitter",
     "not a finite number"),
    ("unknown CKR name", MINIMAL.replace("CKR_DEVICE_ERROR", "CKR_DEVICE_EROR"), 7, "codes.CKR_DEVICE_EROR",
     "unknown return code (did you mean CKR_DEVICE_ERROR?)"),
    ("code repeated as a number", with_codes("0x30: caller"), 8, "codes.0x30",
     "already listed on line 7"),
    ("unknown event", MINIMAL.replace("event: none", "event: reconnect"), 5, "classes.caller.event",
     "unknown event 'reconnect' (known: connection_lost, fatal, impaired, login_lost, none, session_lost)"),
    ("unknown class in codes", MINIMAL.replace("ERROR: transport", "ERROR: transprt"), 7,
     "codes.CKR_DEVICE_ERROR", "unknown class 'transprt' (did you mean transport?"),
    ("unknown default class", MINIMAL.replace("default_class: transport", "default_class: nope"), 8,
     "default_class", "unknown class 'nope'"),
    ("unknown operation", MINIMAL + "operations:\n  idempotent: [sign, sing]\n", 10,
     "operations.idempotent[1]", "unknown operation 'sing' (did you mean sign?"),
    ("missing required field", MINIMAL.replace("name: t\n", ""), 1, "name", "missing required field"),
    ("missing nested field", MINIMAL.replace(", may_have_acted: false", ""), 5, "classes.caller.may_have_acted",
     "missing required field"),
    ("wrong version", MINIMAL.replace("version: 1", "version: 2"), 1, "version", "2 is not supported"),
    ("duplicate key", MINIMAL + "name: again\n", 9, "name", "duplicate key (first given on line 2)"),
    ("python tag", MINIMAL + "x: !!python/object/apply:os.system ['echo pwned']\n", 9, "x",
     "unsupported YAML tag !!python/object/apply:os.system"),
    ("merge key", MINIMAL + "probe:\n  <<: {interval: 1s}\n", 10, "probe", "merge keys (<<) are not supported"),
    ("timeout longer than deadline", MINIMAL + "operations:\n  deadline: 3s\n  call_timeout: 4s\n", 11,
     "operations.call_timeout", "4s is longer than operations.deadline (3s)"),
    ("backoff initial above max", MINIMAL + "connect:\n  backoff: {initial: 10s, max: 1s}\n", 10,
     "connect.backoff.initial", "10s is longer than connect.backoff.max (1s)"),
    ("not a mapping", "- version\n- 1\n", 1, "(policy)", "expected a mapping, got a list"),
    ("empty file", "", 1, "(policy)", "the file is empty"),
    ("control character", MINIMAL + "x: \x01\n", 9, "(file)", "control character #x01"),
    ("extends a file that is no file", "version: 1\nname: x\nextends: /dev/null\n", 3, "extends",
     "cannot read '/dev/null' as a policy: it is not a regular file"),
    ("unknown class in reactions", MINIMAL + "reactions:\n  login:\n    trnasport: connection_lost\n", 11,
     "reactions.login.trnasport", "unknown class 'trnasport' (did you mean transport? known: transport, caller)"),
    ("unknown phase", MINIMAL + "reactions:\n  logon:\n    transport: connection_lost\n", 10, "reactions.logon",
     "unknown phase 'logon' (did you mean login? known: connect, login, probe, call)"),
    ("reaction not allowed in its phase", MINIMAL + "reactions:\n  connect:\n    transport: connection_lost\n", 11,
     "reactions.connect.transport",
     "'connection_lost' is not a reaction of the connect phase (allowed there: connect_failed, fatal)"),
    ("unknown reaction", MINIMAL + "reactions:\n  probe: {caller: probe_fail}\n", 10, "reactions.probe.caller",
     "unknown probe reaction 'probe_fail' (did you mean probe_failed? known: connection_lost, session_lost, "
     "login_lost, fatal, probe_failed)"),
    ("class name that cannot be one", MINIMAL + "reactions:\n  call:\n    Transport: none\n", 11,
     "reactions.call.Transport", "'Transport' is not a valid class name"),
    ("reactions not a mapping", MINIMAL + "reactions: [connect]\n", 9, "reactions", "expected a mapping, got a list"),
]


@pytest.mark.parametrize("text, line, field, fragment", [case[1:] for case in BROKEN],
                         ids=[case[0] for case in BROKEN])
def test_broken_policy_names_file_line_and_field(tmp_path: Path, text: str, line: int, field: str,
                                                 fragment: str) -> None:
    path = write(tmp_path, text)
    err = error_of(path)
    assert_located(err, str(path), line, field)
    assert fragment in str(err)


def test_the_minimal_policy_itself_is_valid(tmp_path: Path) -> None:
    """The broken cases above differ from it by one mistake each."""
    p = load_policy(write(tmp_path, MINIMAL))
    assert (p.name, dict(p.codes), p.default_class) == ("t", {"CKR_DEVICE_ERROR": "transport"}, "transport")
    assert p.operations.call_timeout == 5.0  # a missing section takes the dataclass default


def test_code_keys_are_normalised(tmp_path: Path) -> None:
    p = load_policy(write(tmp_path, with_codes("0x80000001: caller", "CKR_VENDOR_DEFINED+5: caller",
                                               "0xA0: caller", "HSMFSM_UNKNOWN_ERROR: caller")))
    assert {"CKR_VENDOR_DEFINED+0x1", "CKR_VENDOR_DEFINED+0x5", "CKR_PIN_INCORRECT",
            "HSMFSM_UNKNOWN_ERROR"} <= set(p.codes)
    assert p.class_of(code_from_name(hex(CKR_VENDOR_DEFINED + 5))).name == "caller"


def test_non_utf8_bytes_are_reported_at_their_line(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.encode() + b"name: caf\xe9\n")
    err = error_of(path)
    assert_located(err, str(path), 9, "(file)")
    assert "not UTF-8" in str(err) and "0xe9" in str(err)


def test_alias_bomb_ends_fast(tmp_path: Path) -> None:
    path = write(tmp_path, BILLION_LAUGHS)
    started = time.monotonic()
    err = error_of(path)
    assert time.monotonic() - started < 2.0
    assert "more than 10000 values" in str(err)
    assert str(err).startswith(f"{path}:") and err.line is not None and 1 <= err.line <= 9


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\na: &a [*a]\n")
    err = error_of(path)
    assert_located(err, str(path), 2, "a")
    assert "nested more than 50 levels" in str(err)


def test_a_directory_is_not_a_policy(tmp_path: Path) -> None:
    err = error_of(tmp_path)
    assert_located(err, str(tmp_path), 1, "(file)")
    assert "is a directory" in str(err)


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    err = error_of(path)
    assert_located(err, str(path), 1, "(file)")
    assert "no such file" in str(err)


def test_an_unknown_bare_name_lists_the_shipped_policies() -> None:
    err = error_of("no-such-policy-here")
    assert_located(err, "no-such-policy-here", 1, "(file)")
    assert "default" in str(err) and "network-hsm" in str(err)


@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(max_size=200), cut=st.integers(min_value=0, max_value=len(MINIMAL)))
def test_only_policy_errors_escape(tmp_path: Path, junk: bytes, cut: int) -> None:
    """Whatever the bytes, the loader answers with a located PolicyError (or a policy)."""
    path = write(tmp_path, MINIMAL.encode()[:cut] + junk + MINIMAL.encode()[cut:])
    try:
        load_policy(path)
    except PolicyError as err:
        assert str(err).startswith(f"{path}:{err.line}: {err.field}: ")


# --------------------------------------------------------------------------- inline policies


def test_inline_policy_errors_name_inline() -> None:
    err = error_of({"version": 1, "name": "x", "extends": "default", "probe": {"interval": "10ms"}})
    assert_located(err, "<inline>", 1, "probe.interval")


def test_inline_policy_with_a_source_and_line() -> None:
    with pytest.raises(PolicyError) as info:
        load_policy({"version": 1, "name": "x", "extends": "default", "degraded": {"enter_after": 0}},
                    source="pool.yaml", line=12)
    assert_located(info.value, "pool.yaml", 12, "degraded.enter_after")


def test_inline_yaml_node_keeps_exact_lines() -> None:
    pool = yaml.compose("members: []\npolicy:\n  version: 1\n  name: x\n  extends: default\n  probe: {interval: 2ms}\n")
    node = pool.value[1][1]
    with pytest.raises(PolicyError) as info:
        load_policy(node, source="pool.yaml")
    assert_located(info.value, "pool.yaml", 6, "probe.interval")


def test_inline_policy_loads() -> None:
    p = load_policy({"version": 1, "name": "inline", "extends": "network-hsm", "operations": {"deadline": 3}})
    assert (p.name, p.source, p.operations.deadline, p.operations.call_timeout) == ("inline", "<inline>", 3.0, 2.0)


# --------------------------------------------------------------------------- the check command


def test_check_files_reports_ok_for_the_shipped_policies() -> None:
    out, err = io.StringIO(), io.StringIO()
    paths = [str(REPO / "policies" / "default.yaml"), str(REPO / "policies" / "network-hsm.yaml")]
    assert check_files(paths, out=out, err=err) == 0
    assert out.getvalue().splitlines() == [f"OK {paths[0]} (policy default)", f"OK {paths[1]} (policy network-hsm)"]
    assert err.getvalue() == ""


def test_check_files_reports_the_location_of_a_broken_file(tmp_path: Path) -> None:
    bad = write(tmp_path, MINIMAL + "operations:\n  max_reissues: 1000\n")
    out, err = io.StringIO(), io.StringIO()
    assert check_files([str(bad), str(REPO / "policies" / "default.yaml")], out=out, err=err) == 2
    assert err.getvalue() == f"{bad}:10: operations.max_reissues: 1000 is above the hard cap of 10\n"
    assert "(policy default)" in out.getvalue()


def test_check_files_with_nothing_to_check_fails() -> None:
    err = io.StringIO()
    assert check_files([], out=io.StringIO(), err=err) == 2
    assert "no policy files" in err.getvalue()


def _run_check(*paths: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from hsmfsm.config.check import check_files; sys.exit(check_files(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=60,
                          cwd=REPO)


def test_check_command_never_prints_a_traceback(tmp_path: Path) -> None:
    nasty = {
        "junk.yaml": bytes(range(256)) * 4,
        "latin1.yaml": MINIMAL.encode() + b"name: caf\xe9\n",
        "tag.yaml": (MINIMAL + "x: !!python/object/apply:os.system ['echo pwned']\n").encode(),
        "bomb.yaml": BILLION_LAUGHS.encode(),
        "syntax.yaml": b"version: 1\nname: [unclosed\n",
    }
    paths = [str(write(tmp_path, content, name)) for name, content in nasty.items()]
    paths += [str(tmp_path), str(tmp_path / "missing.yaml")]
    result = _run_check(*paths)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "pwned" not in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == len(paths)
    for path, line in zip(paths, lines):
        assert line.startswith(f"{path}:"), line


def test_check_command_passes_the_shipped_policies() -> None:
    result = _run_check("policies/default.yaml", "policies/network-hsm.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["OK policies/default.yaml (policy default)",
                                          "OK policies/network-hsm.yaml (policy network-hsm)"]


def test_every_code_name_in_the_default_is_known() -> None:
    assert set(DEFAULT_CODES) <= ALL_NAMES
