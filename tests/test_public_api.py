"""The names the README tells users to reach as ``hsmfsm.X`` exist, with the documented signature."""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path

import hsmfsm

README = Path(__file__).parent.parent / "README.md"


def test_every_hsmfsm_name_the_readme_uses_is_exported():
    names = set(re.findall(r"\bhsmfsm\.([A-Za-z_]\w*)\b", README.read_text()))
    names -= {"transitions", "host", "calls"}  # loggers (hsmfsm.transitions, .host, .calls), not attributes
    assert {"Pool", "AllMembersDown", "SlotConnection", "load_policy"} <= names
    subpackages = {n for n in names if n.islower() and importlib.util.find_spec(f"hsmfsm.{n}") is not None}
    missing = sorted(n for n in names - subpackages if not hasattr(hsmfsm, n))
    assert missing == [], f"README names hsmfsm.{missing} but the package does not export them"
    assert set(hsmfsm.__all__) <= set(dir(hsmfsm))


def test_slot_connection_takes_the_keywords_the_readme_shows():
    params = inspect.signature(hsmfsm.SlotConnection).parameters
    for keyword in ("module", "token_label", "pin", "policy", "name", "env", "isolation", "clock"):
        assert keyword in params, keyword
    assert params["isolation"].default == "none"
