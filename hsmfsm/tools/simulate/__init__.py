"""``hsmfsm simulate``: what a policy or a pool would do if its HSMs failed, on virtual time.

- :mod:`.model`: the fault schedule and what a run records;
- :mod:`.run`: the production connection or pool on scripted HSMs and a virtual clock;
- :mod:`.report`: recovery times, the tally, and the text and JSON output;
- :mod:`.compare`: sequences of transitions normalised for comparing a simulated run with a real one.

The scenario format is :mod:`hsmfsm.config.scenario_file` (``scenario.schema.json``).
"""

from __future__ import annotations

import sys
from typing import TextIO

from ...config.documents import say
from ...config.scenario_file import Scenario, load_scenario
from ...core.policy import PolicyError
from .model import Outcome
from .report import Report, analyse, as_json, as_text
from .run import SimulationError, simulate

__all__ = ["Outcome", "Report", "Scenario", "SimulationError", "analyse", "as_json", "as_text", "load_scenario",
           "main", "report", "simulate"]


def report(scenario: Scenario, *, json: bool = False) -> str:
    """Run ``scenario`` and return what ``hsmfsm simulate`` prints."""
    result = analyse(simulate(scenario))
    return as_json(result) if json else as_text(result)


def main(path: str, *, json: bool = False, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``hsmfsm simulate PATH [--json]``: 0 when the run completed (whatever the tally says), 2 for a
    scenario (or the policy or pool file it names) that does not load, 1 when the run could not complete.
    Errors are one line on ``err``, never a traceback."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        scenario = load_scenario(path)
    except PolicyError as exc:
        say(err, str(exc))
        return 2
    try:
        text = report(scenario, json=json)
    except SimulationError as exc:
        say(err, f"hsmfsm simulate: {scenario.source}: the run could not complete: {exc}")
        return 1
    out.write(text)
    return 0
