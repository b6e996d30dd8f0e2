"""Load what-if scenarios for ``hsmfsm simulate``, checked the way policies and pool files are.

A scenario says what runs (one connection under a policy, or an HA pool from a
pool file), for how long in virtual time, the calls an application makes, and
the faults injected at given times. It is read by the same people as a policy,
so every mistake comes back as one line, ``FILE:LINE: FIELD: what is wrong``,
through the same machinery (:mod:`hsmfsm.config.documents`): the YAML is
composed with line numbers and the size, depth and alias guards, validated
against ``scenario.schema.json`` (the one definition of the format), and what
a schema cannot say is checked here: exactly one of ``policy`` and ``pool``,
fault members that exist, faults that start before the run ends, faults of
one kind on one member that do not overlap, repeats that do not overlap
themselves, and return codes that are codes.

A policy written inline keeps the scenario's line numbers; a referenced policy
or pool file keeps its own. A pool file is loaded without expanding its
``${VAR}`` references (:func:`~hsmfsm.config.pool_file.load_pool` with
``environment=False``): the simulator replaces every member's module and
supplies its PIN, so the deployment's environment is never needed or read.

:class:`~hsmfsm.core.policy.PolicyError` is the only exception that leaves this
module, whatever the input. Nothing here runs a simulation
(:mod:`hsmfsm.tools.simulate` does).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, cast

import yaml
from jsonschema import ValidationError

from ..core.codes import CALL_TIMEOUT, CKR_OK, code_from_name
from ..core.policy import Policy, PolicyError
from .documents import (
    ROOT_FIELD,
    SHIPPED_DIR,
    Builder,
    Doc,
    FieldPath,
    Issue,
    Origin,
    UnreadableFile,
    compose,
    did_you_mean,
    fail,
    fail_first,
    is_pool_file,
    issues,
    load_schema,
    make_validator,
    missing,
    origin,
    read_text,
    seconds,
    shipped_file,
    show,
    show_seconds,
    unknown_code_message,
)
from .documents import (
    validate as validate_against,
)
from .policy_file import load_policy, referenced_policy
from .pool_file import PoolSpec, load_pool, shipped_pools

__all__ = [
    "FAULT_KINDS", "LASTING", "MAX_CALLS", "MAX_OCCURRENCES", "MODULE_FUNCTIONS", "OPERATIONS", "SCENARIOS_DIR",
    "SCENARIO_FIELD", "SCENARIO_SCHEMA_PATH", "Fault", "PolicyError", "Scenario", "ScenarioSource", "Workload",
    "load_scenario", "scenario_schema", "shipped_scenarios",
]

SCENARIO_SCHEMA_PATH = Path(__file__).parent / "scenario.schema.json"
#: Shipped example scenarios: a folder of their own under the shipped policies, which the
#: policy and pool listings (``*.yaml`` at the top only) and ``hsmfsm check policies/*.yaml`` never see.
SCENARIOS_DIR = SHIPPED_DIR / "scenarios"
#: The FIELD part of messages about the scenario's top level.
SCENARIO_FIELD = "(scenario)"

#: Fault kinds, in the schema's order.
FAULT_KINDS: tuple[str, ...] = ("down", "hang", "restart", "return", "slow", "logout", "wrong_pin")
#: The kinds that last (``for``): each occurrence is a window, undone at its end.
LASTING: frozenset[str] = frozenset({"down", "hang", "slow"})
#: The operations a workload can make (the schema's enum).
OPERATIONS: tuple[str, ...] = ("sign", "verify", "decrypt", "generate_random", "generate_keypair")
#: The module functions a ``return`` fault can name: the calls a connection makes on a module
#: (``hsmfsm.runtime.edge.Module``); the schema lists the same, and a test holds them equal to
#: what the scripted HSM can fail.
MODULE_FUNCTIONS: tuple[str, ...] = (
    "initialize", "finalize", "find_token", "open_session", "close_session", "login", "session_state",
    "token_info", "find_key", "sign", "verify", "decrypt", "generate_random", "generate_keypair",
)
#: The one connection's name when a scenario with ``policy`` does not give ``member``.
DEFAULT_MEMBER = "hsm"
#: Fault occurrences in one scenario (each repeat on each member counts): a run is a few seconds, not hours.
MAX_OCCURRENCES = 100_000
#: Calls in one run (``rate`` times ``duration``): about a minute of real time.
MAX_CALLS = 2_000_000
#: In ``member``: every member.
EVERY_MEMBER = "*"
_BARE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")

ScenarioSource = Union[str, "os.PathLike[str]", Mapping[str, Any]]
"""What :func:`load_scenario` accepts: a path, a shipped scenario's name, or inline content."""


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Workload:
    """The calls the application makes: ``rate`` per second in all, ``operation``, on ``threads`` threads."""

    rate: float = 10.0
    operation: str = "sign"
    threads: int = 1


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault as the scenario writes it, with its members resolved to names.

    ``duration`` is the file's ``for`` (down, hang, slow); ``code`` the canonical
    name of a ``return`` fault's code; ``every`` and ``count`` its ``repeat``
    (``count`` 1: once). ``index`` is its place in the file's list, ``line`` its line.
    """

    kind: str
    members: tuple[str, ...]
    at: float = 0.0
    duration: float | None = None
    code: str | None = None
    call: str | None = None
    times: int = 1
    by: float | None = None
    every: float | None = None
    count: int = 1
    index: int = 0
    line: int = 1

    def starts(self) -> tuple[float, ...]:
        """The start of every occurrence, the first at ``at``."""
        step = self.every or 0.0
        return tuple(self.at + k * step for k in range(self.count))

    def describe(self) -> str:
        """What happens, in the words of the scenario format: ``down for 5s``."""
        if self.kind == "down" or self.kind == "hang":
            return f"{self.kind} for {show_seconds(self.duration or 0.0)}"
        if self.kind == "slow":
            return f"slow by {show_seconds(self.by or 0.0)} for {show_seconds(self.duration or 0.0)}"
        if self.kind == "return":
            return f"return {self.code} on {self.call} {self.times} time{'' if self.times == 1 else 's'}"
        if self.kind == "wrong_pin":
            return "wrong PIN"
        return self.kind


@dataclass(frozen=True, slots=True)
class Scenario:
    """A whole scenario, checked: what :mod:`hsmfsm.tools.simulate` runs.

    ``policy`` is the one connection's policy, or (with ``pool``) the pool's.
    ``members`` are the names of the connections, in order (the pool file's order).
    """

    name: str
    source: str
    duration: float
    seed: int
    latency: float
    workload: Workload
    faults: tuple[Fault, ...]
    members: tuple[str, ...]
    policy: Policy
    pool: PoolSpec | None = None
    description: str = ""


# --------------------------------------------------------------------------- public API


def load_scenario(src: ScenarioSource, /, *, source: str | None = None) -> Scenario:
    """Load and check a scenario.

    ``src`` is a path, the name of a shipped scenario (``"network-blip"``), or
    an already-parsed scenario (a mapping; ``source`` names it in messages and
    its folder resolves relative ``policy`` and ``pool`` paths).

    Raises :class:`PolicyError` (and nothing else) when the scenario, or the
    policy or pool file it names, is wrong.
    """
    here = origin(src, source, 1, "scenario", _shipped_scenario, shipped_scenarios)
    doc, policy_node = _read(here)
    validate_against(doc, make_validator(SCENARIO_SCHEMA_PATH), rephrase=_scenario_issues)
    data = _with_defaults(doc.data, _schema())
    workload = Workload(**_with_defaults(data.get("workload", {}), _schema()["properties"]["workload"]))
    policy, pool, members = _target(doc, here, policy_node)
    duration = seconds(data["duration"])
    faults = tuple(_fault(doc, index, given, members) for index, given in enumerate(data["faults"]))
    _check_size(doc, faults, workload, duration)
    _check_times(doc, faults, duration)
    return Scenario(name=data["scenario"], source=doc.label, duration=duration, seed=data["seed"],
                    latency=seconds(data["latency"]), workload=workload, faults=faults, members=members,
                    policy=policy, pool=pool, description=data.get("description", ""))


def shipped_scenarios() -> list[str]:
    """Names of the example scenarios shipped with hsmfsm (``policies/scenarios/``)."""
    return sorted(p.stem for p in SCENARIOS_DIR.glob("*.yaml"))


def scenario_schema() -> dict[str, Any]:
    """A copy of the JSON Schema of the scenario format (``scenario.schema.json``)."""
    return copy.deepcopy(_schema())


# --------------------------------------------------------------------------- reading and the schema


def _schema() -> dict[str, Any]:
    return load_schema(SCENARIO_SCHEMA_PATH)


def _shipped_scenario(name: str) -> Path | None:
    """The shipped scenario of that name, if ``name`` is a bare name (as for policies and pools) and one exists."""
    if not _BARE_NAME.fullmatch(name):
        return None
    path = SCENARIOS_DIR / f"{name}.yaml"
    try:
        return path if path.is_file() else None
    except OSError:  # a name too long for the file system names no shipped scenario
        return None


def _read(here: Origin) -> tuple[Doc, yaml.Node | None]:
    """The scenario as plain data with the line of every field, and the YAML node of its ``policy``
    (so that an inline policy keeps the scenario's line numbers)."""
    builder = Builder(here.label)
    if here.path is None:
        return Doc(builder.from_plain(here.content, here.line), builder.where, here.label, SCENARIO_FIELD), None
    node = compose(read_text(here.path, here.label), here.label)
    if node is None:
        fail(here.label, 1, SCENARIO_FIELD, "the file is empty; a scenario needs at least version, scenario, "
                                            "duration, and a policy or a pool")
    doc = Doc(builder.from_node(node), builder.where, here.label, SCENARIO_FIELD)
    entries = node.value if isinstance(node, yaml.MappingNode) else []
    policy = next((value for key, value in entries if key.value == "policy"), None)
    return doc, policy


def _with_defaults(given: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` with the schema's documented ``default`` for every field it leaves out."""
    defaults = {key: spec["default"] for key, spec in schema.get("properties", {}).items() if "default" in spec}
    return {**copy.deepcopy(defaults), **given}


def _fault_fields() -> list[str]:
    return list(_schema()["$defs"]["fault"]["properties"])


def _scenario_issues(error: ValidationError) -> list[Issue]:
    """The shared wording, except for a field a fault of this kind does not take."""
    kind = error.schema.get("x-fault") if isinstance(error.schema, Mapping) else None
    if kind is None or error.validator != "additionalProperties":
        return issues(error)
    path = tuple(error.absolute_path)
    takes = list(cast(Mapping[str, Any], error.schema)["properties"])
    known = _fault_fields()
    given = cast(Mapping[str, Any], error.instance)
    # A field no fault takes is the outer schema's "unknown field"; here only the ones of other kinds.
    return [(path + (key,), f"a {kind} fault does not take {key} (it takes: {', '.join(takes)})")
            for key in given if key in known and key not in takes]


# --------------------------------------------------------------------------- what runs


def _target(doc: Doc, here: Origin, policy_node: yaml.Node | None) -> tuple[Policy, PoolSpec | None,
                                                                          tuple[str, ...]]:
    """The policy (one connection) or the pool, and the members' names."""
    data = doc.data
    if "policy" in data and "pool" in data:
        second = max(("policy", "pool"), key=lambda name: doc.locate((name,))[1])
        doc.fail((second,), "give either policy (one connection) or pool (an HA pool), not both")
    if "pool" in data:
        if "member" in data:
            doc.fail(("member",), "names the one connection of a policy scenario; a pool's members are "
                                  "named in its pool file")
        pool = _pool_file(doc, data["pool"], here.base_dir)
        return pool.policy, pool, tuple(m.name for m in pool.members)
    if "policy" not in data:
        doc.fail((), "give policy (one connection under a policy) or pool (an HA pool from a pool file)")
    policy = _policy(doc, here, data["policy"], policy_node)
    return policy, None, (data.get("member", DEFAULT_MEMBER),)


def _policy(doc: Doc, here: Origin, given: str | Mapping[str, Any], node: yaml.Node | None) -> Policy:
    """A shipped policy, a policy file next to the scenario, or one written inline."""
    if isinstance(given, str):
        return referenced_policy(doc, given, here.base_dir, shipped_pool_hint=f"write pool: {given} to simulate "
                                 "the pool; ", pool_file_hint=f" (write pool: {given} to simulate it)")
    where = str(here.path) if here.path is not None else doc.label
    content: yaml.Node | Mapping[str, Any] = node if isinstance(node, yaml.MappingNode) else given
    try:
        policy = load_policy(content, source=where, line=doc.locate(("policy",))[1])
    except PolicyError as exc:
        if exc.file != where:  # in a file the inline policy extends: that file's location stands
            raise
        text = str(exc)[len(f"{exc.file}:{exc.line}: {exc.field}: "):]
        name = "policy" if exc.field == ROOT_FIELD else f"policy.{exc.field}"
        fail(doc.label, exc.line or 1, name, text)
    return dataclasses.replace(policy, source=doc.label)


def _pool_file(doc: Doc, name: str, base_dir: Path) -> PoolSpec:
    """A shipped pool by name, else a pool file relative to the scenario, loaded without its environment."""
    shipped = shipped_file(name)
    if shipped is not None:
        if not is_pool_file(shipped):
            doc.fail(("pool",), f"{name!r} is a shipped policy, not a pool (write policy: {name} to simulate one "
                                f"connection; shipped pools: {', '.join(shipped_pools())})")
        return load_pool(shipped, source=str(shipped), environment=False)
    path = base_dir / name
    if missing(path):
        names = shipped_pools()
        doc.fail(("pool",), f"no shipped pool and no pool file {str(path)!r} "
                            f"({did_you_mean(name, names)}shipped pools: {', '.join(names)})")
    try:
        if path.is_file() and not is_pool_file(path):
            doc.fail(("pool",), f"{str(path)!r} is not a pool file (it has no top-level 'pool' key; "
                                f"for a policy, write policy: {name})")
    except OSError:
        pass  # the loader reports what is wrong with the file
    try:
        return load_pool(path, environment=False)
    except UnreadableFile as exc:
        if exc.file != str(path):
            raise
        doc.fail(("pool",), f"cannot read {str(path)!r} as a pool file: {exc.reason}")


# --------------------------------------------------------------------------- faults


def _fault(doc: Doc, index: int, given: Mapping[str, Any], members: tuple[str, ...]) -> Fault:
    at: FieldPath = ("faults", index)
    fault = _with_defaults(given, _schema()["$defs"]["fault"])
    kind = fault["fault"]
    code: str | None = None
    if kind == "return":
        code = _code(doc, at + ("code",), fault["code"])
    repeat = fault.get("repeat", {})
    duration = seconds(fault["for"]) if "for" in fault else None
    every = seconds(repeat["every"]) if "every" in repeat else None
    count = int(repeat.get("count", 1))
    if every is not None and duration is not None and count > 1 and every <= duration:
        doc.fail(at + ("repeat", "every"), f"{show_seconds(every)} is not longer than the fault's for "
                                           f"({show_seconds(duration)}); each occurrence must end before the next")
    return Fault(kind=kind, members=_members(doc, at + ("member",), fault.get("member"), members),
                 at=seconds(fault.get("at", 0.0)), duration=duration, code=code, call=fault.get("call"),
                 times=int(fault["times"]), by=seconds(fault["by"]) if "by" in fault else None,
                 every=every, count=count, index=index, line=doc.locate(at)[1])


def _code(doc: Doc, path: FieldPath, text: str) -> str:
    try:
        code = code_from_name(text)
    except (KeyError, ValueError):
        doc.fail(path, unknown_code_message(text))
    if code == CKR_OK:
        doc.fail(path, "CKR_OK is no failure; name the code the calls should answer")
    if code.name == CALL_TIMEOUT.name:
        doc.fail(path, f"{code.name} is what the watchdog records for a call that never answers: "
                       "write a hang fault instead")
    return code.name


def _members(doc: Doc, path: FieldPath, given: str | list[str] | None, members: tuple[str, ...]) -> tuple[str, ...]:
    """The names a fault's ``member`` stands for, in the members' order."""
    if given is None:
        if len(members) == 1:
            return members
        doc.fail(path, f"missing required field: the pool has {len(members)} members; name one, a list, "
                       f"or '*' for all ({', '.join(members)})")
    if given == EVERY_MEMBER:
        return members
    names = [given] if isinstance(given, str) else list(given)
    for position, name in enumerate(names):
        if name not in members:
            here = path if isinstance(given, str) else path + (position,)
            doc.fail(here, f"no member named {show(name)} ({did_you_mean(name, list(members))}"
                           f"members: {', '.join(members)}; or '*' for all)")
    return tuple(m for m in members if m in names)


def _check_size(doc: Doc, faults: tuple[Fault, ...], workload: Workload, duration: float) -> None:
    """What a schema cannot cap: the work a run is, in fault occurrences and calls."""
    occurrences = 0
    for fault in faults:
        occurrences += fault.count * len(fault.members)
        if occurrences > MAX_OCCURRENCES:
            doc.fail(("faults", fault.index), f"makes more than {MAX_OCCURRENCES} fault occurrences in all "
                                             "(each repeat on each member counts); this is not a scenario")
    calls = workload.rate * duration
    if calls > MAX_CALLS:
        doc.fail(("workload", "rate"), f"{show(workload.rate)} calls/s for {show_seconds(duration)} is "
                                       f"{calls:.0f} calls; the limit is {MAX_CALLS} in one run "
                                       "(about a minute of real time)")


def _check_times(doc: Doc, faults: tuple[Fault, ...], duration: float) -> None:
    """Every occurrence starts before the end; one wrong PIN per member; windows of one kind on one
    member do not overlap (the second one would end the first early, or never take effect)."""
    found: list[Issue] = []
    windows: dict[tuple[str, str], list[tuple[float, float, Fault]]] = {}
    for fault in faults:
        at: FieldPath = ("faults", fault.index)
        last = fault.starts()[-1]
        if fault.kind != "wrong_pin" and last >= duration:
            where = at + ("at",) if fault.count == 1 else at + ("repeat",)
            what = show_seconds(last) if fault.count == 1 else f"the last occurrence ({show_seconds(last)})"
            found.append((where, f"{what} is not before the end of the run (duration {show_seconds(duration)})"))
        length = fault.duration if fault.kind in LASTING else 0.0
        for member in fault.members:
            for start in fault.starts():
                windows.setdefault((fault.kind, member), []).append((start, start + (length or 0.0), fault))
    for (kind, member), spans in windows.items():
        spans.sort(key=lambda span: (span[0], span[2].index))
        for (start, end, first), (later, _, second) in zip(spans, spans[1:]):
            if kind == "wrong_pin" and first is not second:
                found.append((("faults", second.index, "fault"),
                              f"{member} already has a wrong PIN (faults[{first.index}], line {first.line})"))
            elif kind in LASTING and later < end and first is not second:
                found.append((("faults", second.index, "at"),
                              f"overlaps the {kind} fault of line {first.line} on {member} "
                              f"({show_seconds(start)} to {show_seconds(end)}); faults of one kind on one member "
                              "may not overlap"))
    fail_first(doc, found)
