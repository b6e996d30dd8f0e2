"""HA pool files: the shipped examples, the format, and every kind of mistake an operator makes.

Errors are asserted down to ``FILE:LINE: FIELD:`` because that prefix is what
an operator (or an editor's problem matcher) acts on.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import MappingProxyType
from typing import Any

import hsmfsm
import pytest
from hsmfsm.config.check import check_any_files
from hsmfsm.config.policy_file import SCHEMA_PATH, load_policy, shipped_policies
from hsmfsm.config.pool_file import (
    POOL_SCHEMA_PATH,
    POOLS_DIR,
    MemberSpec,
    PoolSpec,
    check_pool,
    is_pool_file,
    load_pool,
    pool_schema,
    shipped_pools,
)
from hsmfsm.core.policy import PolicyError
from hsmfsm.core.rules import Phase, reaction
from hsmfsm.tools import cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

REPO = Path(__file__).resolve().parent.parent


def examples(count: int) -> int:
    """``count`` examples in ``make test`` (the derandomized "ci" profile); as many as a deeper profile asks
    for under ``make fuzz``. Randomness and the database are left to the profile (conftest.py)."""
    deeper = settings.default.max_examples
    return count if deeper <= 100 else max(count, deeper)


#: Under ``make fuzz`` a test runs for minutes; ``make test``'s 120 s per-test timeout is for hangs.
pytestmark = [pytest.mark.timeout(1800)] if settings.default.max_examples > 100 else []

#: A good pool; the broken ones below are this text with one change. Line numbers matter.
GOOD = """\
pool: signer
policy: network-hsm
balance: round_robin
recovery:
  mode: background
  interval: 10s
  max_attempts: 6
members:
  - name: hsm-a
    module: /usr/lib/p11-kit-client.so
    env: {P11_KIT_SERVER_ADDRESS: "unix:path=${HSMFSM_RUN}/hsm-a.sock"}
    token_label: signer
    pin: env:HSM_PIN
  - name: hsm-b
    module: /usr/lib/p11-kit-client.so
    token_label: signer
    pin: file:/etc/hsm/pin
"""


@pytest.fixture(autouse=True)
def run_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """HSMFSM_RUN as the demo and the tests set it: the folder of the HSMs' sockets."""
    monkeypatch.setenv("HSMFSM_RUN", str(tmp_path / "run"))
    return tmp_path / "run"


def write(tmp_path: Path, text: str, name: str = "pool.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(src: Any, **kwargs: Any) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        load_pool(src, **kwargs)
    return info.value


# --------------------------------------------------------------------------- shipped pools


def test_the_shipped_pools_are_listed_and_the_policy_glob_does_not_see_them() -> None:
    assert shipped_pools() == ["ha-pool", "luna-ha"]
    assert POOLS_DIR == Path(hsmfsm.__file__).parent / "config" / "shipped"
    assert not set(shipped_pools()) & set(shipped_policies())
    for name in shipped_policies():  # what `make diagrams` and the policy tests do
        load_policy(name)


def test_ha_pool_loads_with_background_recovery(run_dir: Path) -> None:
    pool = load_pool("ha-pool")
    assert isinstance(pool, PoolSpec)
    assert (pool.name, pool.balance, pool.policy.name) == ("signer", "round_robin", "network-hsm")
    assert (pool.recovery.mode, pool.recovery.interval, pool.recovery.max_attempts) == ("background", 10.0, 6)
    assert [m.name for m in pool.members] == ["hsm-a", "hsm-b"]
    for member in pool.members:
        assert member.module.endswith("/p11-kit-client.so")
        assert member.env == {"P11_KIT_SERVER_ADDRESS": f"unix:path={run_dir}/{member.name}.sock"}
        assert (member.token_label, member.pin, member.standby) == ("signer", "env:HSM_PIN", False)
    assert pool.source == str(POOLS_DIR / "ha-pool.yaml")


def test_luna_ha_loads_with_in_call_recovery(run_dir: Path) -> None:
    pool = load_pool(POOLS_DIR / "luna-ha.yaml")
    assert (pool.name, pool.balance, pool.policy.name) == ("luna-ha", "round_robin", "network-hsm")
    assert (pool.recovery.mode, pool.recovery.interval, pool.recovery.max_attempts) == ("in_call", 60.0, 10)
    assert [m.env["P11_KIT_SERVER_ADDRESS"] for m in pool.members] == [
        f"unix:path={run_dir}/hsm-a.sock", f"unix:path={run_dir}/hsm-b.sock"]


def test_the_shipped_pools_are_found_by_check_in_the_repository() -> None:
    out, err = io.StringIO(), io.StringIO()
    paths = [str(REPO / "policies" / f"{name}.yaml") for name in shipped_pools()]
    assert check_any_files(paths, out=out, err=err) == 0, err.getvalue()
    assert out.getvalue().splitlines() == [f"OK {paths[0]} (pool signer, 2 members)",
                                           f"OK {paths[1]} (pool luna-ha, 2 members)"]


def test_an_unknown_bare_name_lists_the_shipped_pools() -> None:
    assert str(error_of("ha-pol")) == "ha-pol:1: (file): no such file, and no shipped pool of that name " \
                                      "(shipped: ha-pool, luna-ha)"


# --------------------------------------------------------------------------- the format


def test_a_spec_is_frozen_and_its_env_read_only(tmp_path: Path) -> None:
    pool = load_pool(write(tmp_path, GOOD))
    assert isinstance(pool.members[0].env, MappingProxyType)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pool.members[0].name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        pool.members[0].env["X"] = "y"  # type: ignore[index]
    assert pool.members[1] == MemberSpec("hsm-b", "/usr/lib/p11-kit-client.so", "signer", "file:/etc/hsm/pin", {})


def test_optional_fields_take_the_documented_defaults(tmp_path: Path) -> None:
    pool = load_pool(write(tmp_path, "pool: p\nmembers:\n  - {name: a, module: /m.so, token_label: t, pin: env:P}\n"))
    assert (pool.balance, pool.recovery.mode, pool.recovery.interval, pool.recovery.max_attempts) == \
        ("round_robin", "background", 10.0, 6)
    assert pool.policy.name == "default"
    assert pool.members[0].standby is False
    schema = pool_schema()
    assert schema["properties"]["balance"]["default"] == pool.balance
    assert {k: v.get("default") for k, v in schema["properties"]["recovery"]["properties"].items()} == \
        {"mode": "background", "interval": 10, "max_attempts": 6}


def test_standby_unlimited_and_durations(tmp_path: Path) -> None:
    text = GOOD.replace("max_attempts: 6", "max_attempts: unlimited").replace("10s", "2m") \
        .replace("pin: file:/etc/hsm/pin", "pin: file:/etc/hsm/pin\n    standby: true")
    pool = load_pool(write(tmp_path, text))
    assert (pool.recovery.max_attempts, pool.recovery.interval) == (None, 120.0)
    assert [m.standby for m in pool.members] == [False, True]


def test_a_policy_file_is_found_next_to_the_pool_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    write(tmp_path / "conf", "version: 1\nname: mine\nextends: network-hsm\noperations: {max_reissues: 1}\n",
          "mine.yaml")
    pool = load_pool(write(tmp_path / "conf", GOOD.replace("policy: network-hsm", "policy: mine.yaml")))
    assert (pool.policy.name, pool.policy.operations.max_reissues) == ("mine", 1)


def test_an_inline_policy_that_extends(tmp_path: Path) -> None:
    text = GOOD.replace("policy: network-hsm\n", textwrap.dedent("""\
        policy:
          version: 1
          name: signer-policy
          extends: network-hsm
          operations: {deadline: 5s}
        """))
    pool = load_pool(write(tmp_path, text))
    assert (pool.policy.name, pool.policy.operations.deadline) == ("signer-policy", 5.0)
    assert pool.policy.operations.call_timeout == load_policy("network-hsm").operations.call_timeout
    assert pool.policy.source == str(tmp_path / "pool.yaml")


def test_an_inline_policy_extends_relative_to_the_pool_file(tmp_path: Path) -> None:
    write(tmp_path, "version: 1\nname: base\nextends: default\nprobe: {interval: 3s}\n", "base.yaml")
    text = GOOD.replace("policy: network-hsm", "policy: {version: 1, name: child, extends: base.yaml}")
    assert load_pool(write(tmp_path, text)).policy.probe.interval == 3.0


def test_a_complete_inline_policy(tmp_path: Path) -> None:
    full = (REPO / "policies" / "default.yaml").read_text(encoding="utf-8")
    text = GOOD.replace("policy: network-hsm\n", "policy:\n" + textwrap.indent(full, "  "))
    pool = load_pool(write(tmp_path, text))
    assert dataclasses.replace(pool.policy, source="x") == dataclasses.replace(load_policy("default"), source="x")


def test_a_pool_given_as_a_mapping_with_an_inline_policy() -> None:
    pool = load_pool({
        "pool": "p",
        "policy": {"version": 1, "name": "q", "extends": "default", "probe": {"interval": "2s"}},
        "members": [{"name": "a", "module": "/m.so", "token_label": "t", "pin": "env:P",
                     "env": {"X": "${HSMFSM_RUN}"}}],
    })
    assert (pool.name, pool.policy.name, pool.policy.probe.interval, pool.source) == ("p", "q", 2.0, "<inline>")
    assert error_of({"pool": "p"}, source="conf.yaml").args[0] == "conf.yaml:1: members: missing required field"


def test_only_braced_references_are_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIBDIR", "/opt/vendor/lib")
    text = GOOD.replace("module: /usr/lib/p11-kit-client.so\n    env", "module: ${LIBDIR}/libCryptoki2.so\n    env") \
        .replace("hsm-a.sock", "$HOME-${LIBDIR}${LIBDIR}")
    member = load_pool(write(tmp_path, text)).members[0]
    assert member.module == "/opt/vendor/lib/libCryptoki2.so"
    assert member.env["P11_KIT_SERVER_ADDRESS"].endswith("/$HOME-/opt/vendor/lib/opt/vendor/lib")


# --------------------------------------------------------------------------- broken pools


def _add(after: str, new: str) -> tuple[str, str]:
    return after, after + new


BROKEN = {
    # kind: ((old, new) in GOOD, line, field, start of the message)
    "unknown field": (_add("balance: round_robin\n", "colour: blue\n"), 4, "colour",
                      "unknown field (known: pool, policy, balance, recovery, audit, serve, members)"),
    "unknown member field": (_add("    token_label: signer\n", "    slot: 3\n"), 13, "members[0].slot",
                             "unknown field"),
    "bad balance": (("balance: round_robin", "balance: random"), 3, "balance",
                    "unknown balance strategy 'random' (known: round_robin, least_busy, primary)"),
    "bad mode": (("mode: background", "mode: in_cal"), 5, "recovery.mode",
                 "unknown recovery mode 'in_cal' (did you mean in_call? known: background, in_call)"),
    "interval too short": (("interval: 10s", "interval: 10ms"), 6, "recovery.interval",
                           "'10ms' is below the minimum of 50ms"),
    "interval too long": (("interval: 10s", "interval: 7200"), 6, "recovery.interval",
                          "7200 (seconds) is above the hard cap of 1h"),
    "bad max_attempts": (("max_attempts: 6", "max_attempts: 0"), 7, "recovery.max_attempts",
                         "0 is below the minimum of 1"),
    "duplicate member name": (("name: hsm-b", "name: hsm-a"), 14, "members[1].name",
                              "duplicate member name 'hsm-a' (also members[0].name, line 9)"),
    "bad member name": (("name: hsm-b", "name: hsm b"), 14, "members[1].name",
                        "'hsm b' is not a valid member name"),
    "no active member": ((GOOD[GOOD.index("members:"):], "members:\n"
                          "  - {name: a, module: /m.so, token_label: t, pin: env:P, standby: true}\n"
                          "  - {name: b, module: /m.so, token_label: t, pin: env:P, standby: true}\n"), 8,
                         "members", "every member is a standby; at least one must be active"),
    "no members": (("members:\n", "members: []\nx:\n"), 8, "members", "must not be empty"),
    "literal pin": (("pin: env:HSM_PIN", "pin: '123456'"), 13, "members[0].pin",
                    "must be env:NAME, file:PATH or credential:NAME; a literal PIN is refused"),
    "numeric pin": (("pin: env:HSM_PIN", "pin: 123456"), 13, "members[0].pin",
                    "must be env:NAME, file:PATH or credential:NAME"),
    "empty env pin": (("pin: env:HSM_PIN", "pin: 'env:'"), 13, "members[0].pin",
                      "must be env:NAME, file:PATH or credential:NAME"),
    "missing pin": (("    pin: env:HSM_PIN\n", ""), 9, "members[0].pin", "missing required field"),
    "unset variable": (("${HSMFSM_RUN}", "${HSMFSM_NOPE}"), 11, "members[0].env.P11_KIT_SERVER_ADDRESS",
                       "environment variable HSMFSM_NOPE is not set (used as ${HSMFSM_NOPE})"),
    "unset variable in module": (("module: /usr/lib/p11-kit-client.so\n    token", "module: ${NOPE}/x.so\n    token"),
                                 15, "members[1].module", "environment variable NOPE is not set"),
    "unclosed reference": (("${HSMFSM_RUN}", "${HSMFSM_RUN"), 11, "members[0].env.P11_KIT_SERVER_ADDRESS",
                           "'${' without a closing '}'"),
    "bad reference": (("${HSMFSM_RUN}", "${1x}"), 11, "members[0].env.P11_KIT_SERVER_ADDRESS",
                      "'${1x}' is not a variable reference"),
    "bad env name": (("{P11_KIT_SERVER_ADDRESS:", "{P11 KIT:"), 11, "members[0].env.P11 KIT",
                     "'P11 KIT' is not a valid environment variable name"),
    "env value not text": (('"unix:path=${HSMFSM_RUN}/hsm-a.sock"', "12"), 11,
                           "members[0].env.P11_KIT_SERVER_ADDRESS", "expected a string, got 12"),
    "unknown policy": (("policy: network-hsm", "policy: network-hsn"), 2, "policy",
                       "no shipped policy and no policy file"),
    "policy of the wrong type": (("policy: network-hsm", "policy: 3"), 2, "policy",
                                 "expected a string or a mapping, got 3"),
    "error in an inline policy": (("policy: network-hsm\n", "policy:\n  version: 1\n  name: x\n"
                                   "  extends: network-hsm\n  operations:\n    max_reissues: 1000\n"), 7,
                                  "policy.operations.max_reissues", "1000 is above the hard cap of 10"),
    "inline policy with an unknown field": (("policy: network-hsm", "policy: {version: 1, extends: default,\n"
                                             "  colour: blue}"), 3, "policy.colour", "unknown field (known: version"),
    "incomplete inline policy": (("policy: network-hsm", "policy: {version: 1, name: x}"), 2,
                                 "policy.classes", "missing required field"),
    "bad pool name": (("pool: signer", "pool: -signer"), 1, "pool", "'-signer' is not a valid pool name"),
    # a missing field is blamed on its parent's line: the top level starts after the comment
    "missing pool name": (("pool: signer\n", "# no name\n"), 2, "pool", "missing required field"),
    "duplicate key": (("balance: round_robin\n", "balance: round_robin\nbalance: primary\n"), 4, "balance",
                      "duplicate key (first given on line 3)"),
    "yaml syntax": (("balance: round_robin", "balance: [round_robin"), 4, "(yaml)", ""),
    "not a mapping": ((GOOD, "- pool: signer\n"), 1, "(pool)", "expected a mapping, got a list"),
    "empty file": ((GOOD, ""), 1, "(pool)", "the file is empty"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_pool_names_file_line_and_field(kind: str, tmp_path: Path) -> None:
    (old, new), line, field, message = BROKEN[kind]
    assert old in GOOD, kind
    path = write(tmp_path, GOOD.replace(old, new, 1))
    exc = error_of(path)
    assert str(exc).startswith(f"{path}:{line}: {field}: {message}"), str(exc)
    assert (exc.file, exc.line, exc.field) == (str(path), line, field)
    assert "123456" not in str(exc)  # a literal PIN is never echoed


def test_an_error_inside_a_referenced_policy_keeps_that_files_location(tmp_path: Path) -> None:
    bad = write(tmp_path, "version: 1\nname: bad\nextends: default\nprobe:\n  interval: 1ms\n", "bad.yaml")
    exc = error_of(write(tmp_path, GOOD.replace("policy: network-hsm", "policy: bad.yaml")))
    assert str(exc).startswith(f"{bad}:5: probe.interval: '1ms' is below the minimum of 50ms"), str(exc)


def test_an_error_in_a_file_an_inline_policy_extends_keeps_that_files_location(tmp_path: Path) -> None:
    bad = write(tmp_path, "version: 1\nname: bad\nextends: default\noperations: {max_reissues: 99}\n", "b.yaml")
    inline = "policy: {version: 1, name: x, extends: b.yaml}"
    exc = error_of(write(tmp_path, GOOD.replace("policy: network-hsm", inline)))
    assert str(exc).startswith(f"{bad}:4: operations.max_reissues: 99 is above the hard cap of 10"), str(exc)


def test_a_pool_file_is_not_a_policy(tmp_path: Path) -> None:
    write(tmp_path, GOOD, "other.yaml")
    path = write(tmp_path, GOOD.replace("policy: network-hsm", "policy: other.yaml"))
    assert str(error_of(path)).startswith(f"{path}:2: policy: {str(tmp_path / 'other.yaml')!r} is a pool file")


@pytest.mark.parametrize("given, shown, why", [
    ("/dev/null", "/dev/null", "it is not a regular file"),  # found by hypothesis: was blamed on /dev/null:1
    (".", None, "it is a directory"),
])
def test_a_policy_that_cannot_be_read_is_the_pool_files_mistake(tmp_path: Path, given: str, shown: str | None,
                                                                 why: str) -> None:
    path = write(tmp_path, GOOD.replace("policy: network-hsm", f"policy: {given}"))
    exc = error_of(path)
    assert (exc.file, exc.line, exc.field) == (str(path), 2, "policy"), str(exc)
    assert str(exc) == f"{path}:2: policy: cannot read {shown or str(tmp_path)!r} as a policy: {why}"


def test_an_unreadable_policy_named_inline_is_the_pool_files_mistake_too() -> None:
    base = {"pool": "p", "members": [{"name": "a", "module": "/m.so", "token_label": "t", "pin": "env:P"}]}
    assert str(error_of({**base, "policy": "/dev/null"}, source="conf.yaml")) == \
        "conf.yaml:1: policy: cannot read '/dev/null' as a policy: it is not a regular file"
    inline = {"version": 1, "name": "x", "extends": "/dev/null"}
    assert str(error_of({**base, "policy": inline}, source="conf.yaml")) == \
        "conf.yaml:1: policy.extends: cannot read '/dev/null' as a policy: it is not a regular file"


def test_an_inline_policy_with_reactions(tmp_path: Path) -> None:
    text = GOOD.replace("policy: network-hsm\n", textwrap.dedent("""\
        policy:
          version: 1
          name: signer-policy
          extends: network-hsm
          reactions:
            connect: {capacity: fatal}
            call:
              caller: impaired
        """))
    pool = load_pool(write(tmp_path, text))
    assert reaction(pool.policy, Phase.CONNECT, "capacity") == "fatal"
    assert reaction(pool.policy, Phase.CALL, "caller") == "impaired"
    assert dict(pool.policy.reactions["connect"]) == {**load_policy("network-hsm").reactions["connect"],
                                                      "capacity": "fatal"}  # merged over the base's table
    as_mapping = load_pool({"pool": "p", "policy": {"version": 1, "name": "q", "extends": "default",
                                                    "reactions": {"probe": {"caller": "connection_lost"}}},
                            "members": [{"name": "a", "module": "/m.so", "token_label": "t", "pin": "env:P"}]})
    assert reaction(as_mapping.policy, Phase.PROBE, "caller") == "connection_lost"


def test_a_mistake_in_inline_reactions_is_located_in_the_pool_file(tmp_path: Path) -> None:
    text = GOOD.replace("policy: network-hsm\n", "policy:\n  version: 1\n  name: x\n  extends: default\n"
                                                  "  reactions:\n    login:\n      trnasport: connection_lost\n")
    path = write(tmp_path, text)
    assert str(error_of(path)) == (f"{path}:8: policy.reactions.login.trnasport: unknown class 'trnasport' "
                                   "(did you mean transport? known: transport, session, login, fatal, caller, "
                                   "capacity, unknown)")


def test_alias_bombs_and_odd_tags_end_as_errors(tmp_path: Path) -> None:
    rows = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + \
        [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    bomb = write(tmp_path, GOOD.replace("pool: signer", "pool: signer\n" + "\n".join(rows)), "bomb.yaml")
    assert "more than 10000 values" in str(error_of(bomb))
    tagged = write(tmp_path, GOOD.replace("pool: signer", "pool: !!python/object:os.system signer"), "tag.yaml")
    assert str(error_of(tagged)).startswith(f"{tagged}:1: pool: unsupported YAML tag")


@pytest.mark.parametrize("src", [None, 3, b"pool.yaml", ["pool"], object(), "", "no/such/pool.yaml"])
def test_anything_that_is_no_pool_is_a_policy_error(src: Any, tmp_path: Path) -> None:
    error_of(src)
    error_of(tmp_path)  # a directory


# --------------------------------------------------------------------------- fuzzing

_WORDS = st.sampled_from(["pool", "policy", "balance", "recovery", "mode", "interval", "max_attempts",
                          "members", "name", "module", "env", "token_label", "pin", "standby", "extends",
                          "version", "x", "${HSMFSM_RUN}", "${", "env:P", "10s", "unlimited", ""])
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2_000_000) | st.floats(allow_nan=True) | _WORDS | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_WORDS | st.integers(0, 3), inner, max_size=5),
    max_leaves=25,
)


@settings(max_examples=examples(300), deadline=None)
@given(st.dictionaries(_WORDS, _VALUES, max_size=6), st.data())
def test_fuzzed_mappings_load_or_raise_policy_error(data: dict[str, Any], draw: st.DataObject) -> None:
    base = {"pool": "p", "members": [{"name": "a", "module": "/m.so", "token_label": "t", "pin": "env:P"}]}
    for candidate in (data, {**base, **data}, {**base, "members": [draw.draw(_VALUES)]}):
        try:
            assert isinstance(load_pool(candidate), PoolSpec)
        except PolicyError:
            pass


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, len(GOOD)), st.integers(0, 20), st.text(alphabet="\n :-[]{}&*!'\"$#ab0\t|>%@`,?\x00",
                                                               max_size=6))
def test_fuzzed_files_load_or_raise_policy_error(tmp_path: Path, start: int, length: int, insert: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(GOOD[:start] + insert + GOOD[start + length:], encoding="utf-8")
    try:
        load_pool(path)
    except PolicyError as exc:
        assert str(exc).startswith(f"{path}:"), str(exc)


# --------------------------------------------------------------------------- the schema


def test_the_schema_is_valid_documented_and_closed() -> None:
    schema = json.loads(POOL_SCHEMA_PATH.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, where
                for name, spec in node["properties"].items():
                    assert spec.get("description"), f"{where}.{name} has no description"
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}[{index}]")

    walk(schema, "$")


def test_durations_are_written_exactly_as_in_policies() -> None:
    policy_schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert pool_schema()["$defs"]["duration"]["anyOf"] == policy_schema["$defs"]["duration"]["anyOf"]


def test_the_shipped_pools_validate_against_the_schema_alone() -> None:
    import yaml

    validator = Draft202012Validator(pool_schema())
    for name in shipped_pools():
        assert not list(validator.iter_errors(yaml.safe_load((POOLS_DIR / f"{name}.yaml").read_text()))), name


# --------------------------------------------------------------------------- hsmfsm check


def test_is_pool_file(tmp_path: Path) -> None:
    assert is_pool_file(POOLS_DIR / "ha-pool.yaml")
    assert is_pool_file(write(tmp_path, "\ufeff# c\n'pool' : x\n[broken", "b.yaml"))
    assert not is_pool_file(REPO / "policies" / "default.yaml")
    assert not is_pool_file(write(tmp_path, "name: x\nnotes: |\n  pool: y\n", "p.yaml"))
    for odd in (tmp_path, tmp_path / "missing.yaml", None, 3, "a\0b"):
        assert not is_pool_file(odd)


@pytest.fixture
def mix(tmp_path: Path) -> list[str]:
    broken = write(tmp_path, GOOD.replace("name: hsm-b", "name: hsm-a"), "broken.yaml")
    return [str(REPO / "policies" / "network-hsm.yaml"), str(write(tmp_path, GOOD)), str(broken)]


def test_check_any_files_reports_policies_and_pools(mix: list[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert check_any_files(mix, out=out, err=err) == 2
    assert out.getvalue().splitlines() == [f"OK {mix[0]} (policy network-hsm)", f"OK {mix[1]} (pool signer, 2 members)"]
    assert err.getvalue().splitlines() == [
        f"{mix[2]}:14: members[1].name: duplicate member name 'hsm-a' (also members[0].name, line 9)"]
    assert check_any_files(mix[:2], out=io.StringIO(), err=io.StringIO()) == 0
    assert check_any_files([], out=io.StringIO(), err=err) == 2


def test_check_any_files_in_a_subprocess_never_prints_a_traceback(mix: list[str], tmp_path: Path) -> None:
    junk = write(tmp_path, "pool: [\x01", "junk.yaml")
    code = "import sys; from hsmfsm.config.check import check_any_files; sys.exit(check_any_files(sys.argv[1:]))"
    run = subprocess.run([sys.executable, "-c", code, *mix, str(junk), str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "Traceback" not in run.stdout + run.stderr
    assert run.stdout.count("OK ") == 2
    assert len(run.stderr.splitlines()) == 3, run.stderr
    assert f"{mix[2]}:14: members[1].name: duplicate member name 'hsm-a'" in run.stderr


def test_a_shipped_pool_named_as_the_policy_is_refused_clearly(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("policy: network-hsm", "policy: ha-pool", 1))
    exc = error_of(path)
    assert (exc.field, str(exc).split(": ", 2)[-1]) == (
        "policy", "'ha-pool' is a shipped pool, not a policy (shipped policies: default, network-hsm)")


# --------------------------------------------------------------------------- hsmfsm check: unset variables


def _warning(path: Path, line: int, field: str, name: str) -> str:
    return f"{path}:{line}: {field}: warning: environment variable {name} is not set (used as ${{{name}}})"


def test_check_pool_keeps_an_unset_reference_and_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HSMFSM_RUN")
    monkeypatch.setenv("LIBDIR", "/opt/lib")
    text = GOOD.replace("module: /usr/lib/p11-kit-client.so\n    token", "module: ${LIBDIR}/${NOPE}.so\n    token")
    path = write(tmp_path, text + "audit: {path: '${LOGS}/t.jsonl'}\n")
    spec, warnings = check_pool(path)
    assert spec.members[0].env["P11_KIT_SERVER_ADDRESS"] == "unix:path=${HSMFSM_RUN}/hsm-a.sock"  # as written
    assert spec.members[1].module == "/opt/lib/${NOPE}.so"  # a set variable is still expanded
    assert [str(w) for w in warnings] == [
        _warning(path, 11, "members[0].env.P11_KIT_SERVER_ADDRESS", "HSMFSM_RUN"),
        _warning(path, 15, "members[1].module", "NOPE"),
        _warning(path, 18, "audit.path", "LOGS"),
    ]
    exc = error_of(path)  # loading it for real still fails, at the first one
    assert str(exc) == (f"{path}:11: members[0].env.P11_KIT_SERVER_ADDRESS: environment variable HSMFSM_RUN is "
                        "not set (used as ${HSMFSM_RUN})")


def test_check_pool_reports_errors_as_load_pool_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HSMFSM_RUN")
    path = write(tmp_path, GOOD.replace("name: hsm-b", "name: hsm-a"))
    with pytest.raises(PolicyError) as info:
        check_pool(path)
    assert str(info.value).startswith(f"{path}:14: members[1].name: duplicate member name 'hsm-a'")
    monkeypatch.setenv("EMPTY", "")
    text = GOOD.replace("module: /usr/lib/p11-kit-client.so\n    token", "module: ${EMPTY}\n    token")
    empty = write(tmp_path, text, "empty.yaml")
    with pytest.raises(PolicyError) as info:
        check_pool(empty)
    assert str(info.value) == f"{empty}:15: members[1].module: '${{EMPTY}}' is empty once expanded"


def test_check_warns_about_an_unset_variable_and_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HSMFSM_RUN")
    path = write(tmp_path, GOOD)
    out, err = io.StringIO(), io.StringIO()
    assert check_any_files([str(path)], out=out, err=err) == 0
    assert err.getvalue().splitlines() == [_warning(path, 11, "members[0].env.P11_KIT_SERVER_ADDRESS", "HSMFSM_RUN")]
    assert out.getvalue().splitlines() == [f"OK {path} (pool signer, 2 members; 1 warning)"]


def test_check_strict_makes_an_unset_variable_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HSMFSM_RUN")
    path = write(tmp_path, GOOD)
    out, err = io.StringIO(), io.StringIO()
    assert check_any_files([str(path), str(REPO / "policies" / "default.yaml")], out=out, err=err, strict=True) == 2
    assert err.getvalue().splitlines() == [
        f"{path}:11: members[0].env.P11_KIT_SERVER_ADDRESS: environment variable HSMFSM_RUN is not set "
        "(used as ${HSMFSM_RUN})"]
    assert out.getvalue().splitlines() == [f"OK {REPO / 'policies' / 'default.yaml'} (policy default)"]
    monkeypatch.setenv("HSMFSM_RUN", "/run/x")  # set: strict passes, with nothing on stderr
    out, err = io.StringIO(), io.StringIO()
    assert check_any_files([str(path)], out=out, err=err, strict=True) == 0
    assert (out.getvalue(), err.getvalue()) == (f"OK {path} (pool signer, 2 members)\n", "")


def test_the_shipped_pools_check_without_their_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `make check` runs: every shipped file, HSMFSM_RUN unset, passes with a warning per socket."""
    monkeypatch.delenv("HSMFSM_RUN")
    paths = sorted(str(p) for p in (REPO / "policies").glob("*.yaml"))
    out, err = io.StringIO(), io.StringIO()
    assert check_any_files(paths, out=out, err=err) == 0, err.getvalue()
    expected = []
    for path in paths:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        uses = [(n, line) for n, line in enumerate(lines, 1) if "${HSMFSM_RUN}" in line]
        members = [n for n, line in uses if "P11_KIT_SERVER_ADDRESS" in line]
        expected += [_warning(Path(path), number, f"members[{index}].env.P11_KIT_SERVER_ADDRESS", "HSMFSM_RUN")
                     for index, number in enumerate(members)]
        expected += [_warning(Path(path), n, "serve.socket", "HSMFSM_RUN") for n, line in uses
                     if line.strip().startswith("socket:")]
    assert err.getvalue().splitlines() == expected and len(expected) == 5
    assert len(out.getvalue().splitlines()) == len(paths)
    assert f"OK {REPO / 'policies' / 'ha-pool.yaml'} (pool signer, 2 members; 3 warnings)" in out.getvalue()
    assert check_any_files(paths, out=io.StringIO(), err=io.StringIO(), strict=True) == 2


def test_the_check_command_has_strict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("HSMFSM_RUN")
    path = write(tmp_path, GOOD)
    assert cli.main(["check", str(path)]) == 0
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == (f"OK {path} (pool signer, 2 members; 1 warning)\n",
                                            _warning(path, 11, "members[0].env.P11_KIT_SERVER_ADDRESS",
                                                     "HSMFSM_RUN") + "\n")
    assert cli.main(["check", "--strict", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "warning" not in captured.err
    assert captured.err.startswith(f"{path}:11: members[0].env.P11_KIT_SERVER_ADDRESS: environment variable")


def test_make_check_passes_without_hsmfsm_run() -> None:
    """`make check`: `hsmfsm check policies/*.yaml` in a shell with no HSMFSM_RUN."""
    env = {k: v for k, v in os.environ.items() if k != "HSMFSM_RUN"}
    paths = sorted(str(p.relative_to(REPO)) for p in (REPO / "policies").glob("*.yaml"))
    run = subprocess.run([sys.executable, "-m", "hsmfsm", "check", *paths], capture_output=True, text=True,
                         timeout=60, cwd=REPO, env=env)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    assert run.stdout.count("OK ") == len(paths)
    assert run.stderr.count(": warning: environment variable HSMFSM_RUN is not set") == 5, run.stderr
    strict = subprocess.run([sys.executable, "-m", "hsmfsm", "check", "--strict", *paths], capture_output=True,
                            text=True, timeout=60, cwd=REPO, env=env)
    assert strict.returncode == 2 and "warning" not in strict.stderr, strict.stderr


# -- the serve section ---------------------------------------------------------------------------

SERVE = """\
serve:
  socket: "${HSMFSM_RUN}/serve/signer.sock"
  token_label: signer-ha
  pin: env:APP_PIN
"""


def test_a_serve_section_is_loaded_with_its_defaults(tmp_path: Path, run_dir: Path) -> None:
    spec = load_pool(write(tmp_path, GOOD + SERVE))
    serve = spec.serve
    assert serve is not None
    assert serve.socket == run_dir / "serve" / "signer.sock"
    assert (serve.token_label, serve.pin, serve.allow_uids) == ("signer-ha", "env:APP_PIN", None)
    assert (serve.outage_codes, serve.keygen, serve.max_operation_bytes, serve.max_connections, serve.workers) == \
        ("device_error", "refuse", 1024 * 1024, 256, 16)
    relative = load_pool(write(tmp_path, GOOD + SERVE.replace('"${HSMFSM_RUN}/serve/signer.sock"', "s/x.sock")))
    assert relative.serve is not None and relative.serve.socket == tmp_path / "s" / "x.sock"
    assert load_pool(write(tmp_path, GOOD)).serve is None


@pytest.mark.parametrize(("change", "line", "message"), [
    (("pin: env:APP_PIN", "pin: 123456"), 21, "serve.pin: must be env:NAME, file:PATH or credential:NAME"),
    (("pin: env:APP_PIN", "pin: '123456'"), 21, "serve.pin: must be env:NAME, file:PATH or credential:NAME"),
    (("token_label: signer-ha", "token_label: " + "x" * 33), 20, "serve.token_label: has 33 characters"),
    (("token_label: signer-ha", "token_label: signer-ha\n  colour: blue"), 21, "serve.colour: unknown field"),
    (("token_label: signer-ha", "token_label: signer-ha\n  outage_codes: sometimes"), 21,
     "serve.outage_codes: unknown value 'sometimes'"),
    (("token_label: signer-ha", "token_label: signer-ha\n  allow_uids: [-1]"), 21, "serve.allow_uids[0]"),
    (('"${HSMFSM_RUN}/serve/signer.sock"', "/" + "d" * 120 + "/s.sock"), 19, "serve.socket: has 128 characters"),
    (('"${HSMFSM_RUN}/serve/signer.sock"', "d" * 100 + "/s.sock"), 19, "longer than 107 bytes"),  # once made absolute
])
def test_a_broken_serve_section_names_file_line_and_field(tmp_path: Path, change: tuple[str, str], line: int,
                                                          message: str) -> None:
    path = write(tmp_path, GOOD + SERVE.replace(*change))
    with pytest.raises(PolicyError) as info:
        load_pool(path)
    text = str(info.value)
    assert text.startswith(f"{path}:{line}: "), text
    assert message in text, text
    assert "123456" not in text  # a refused PIN is never echoed
