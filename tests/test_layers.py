"""The layers import one way, and the core stays pure.

    core  <-  config  <-  audit  <-  runtime  <-  testing  <-  tools
      ^-------  p11  <--------------'   ^                         |
      ^-------  keys <--------------'   '-------  metrics  <------'
      ^-------  rpc  <--------------'
                (keys: the key objects; rpc: p11-kit's RPC codec; runtime, testing and tools use both)

``core`` imports nothing else of hsmfsm and none of the modules that would
give it I/O, a clock or threads; ``rpc`` (the p11-kit RPC codec) imports only
``core``, and is held to the same purity; ``p11`` is the only package that imports
python-pkcs11; ``keys`` (the cryptography key objects bound to a pool) imports
only ``core``, never the runtime it is bound to; the library never imports
``testing`` or ``tools``; nothing imports ``tools`` but the command line's entry
points. ``metrics`` (the Prometheus collector) is the only package that imports
prometheus_client, an optional dependency: ``import hsmfsm`` never loads it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hsmfsm"

#: What each layer may import of hsmfsm.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "config": {"core"},
    "p11": {"core"},
    "keys": {"core"},
    "rpc": {"core"},
    "audit": {"core", "config"},
    "runtime": {"core", "config", "p11", "audit", "keys", "rpc"},
    "testing": {"core", "config", "p11", "audit", "runtime", "keys", "rpc"},
    "metrics": {"core", "config", "audit", "runtime"},
    "tools": {"core", "config", "p11", "audit", "runtime", "testing", "tools", "keys", "metrics", "rpc"},
}
#: The layers that must stay pure: no I/O, clock or threads (CORE_FORBIDDEN).
PURE_LAYERS = {"core", "rpc"}
#: Modules the pure core must not import (I/O, clock, threads, the PKCS#11 library).
CORE_FORBIDDEN = {"pkcs11", "threading", "time", "socket", "os", "subprocess", "asyncio", "random",
                  "multiprocessing", "select", "signal", "ctypes"}


#: Programs that stand for a *user's* application and run in an interpreter of their own (by path,
#: with ``python -I``): they use python-pkcs11 as any application does, and import nothing of hsmfsm.
APPLICATIONS = {PACKAGE / "testing" / "lab" / "app.py"}


def _imports(path: Path) -> list[tuple[str, int]]:
    """Absolute module names imported by ``path`` (relative imports resolved), with their lines."""
    tree = ast.parse(path.read_text(), str(path))
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    if path.name == "__init__.py":
        module = module.rsplit(".", 1)[0] if module.endswith(".__init__") else module
        package = module
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            if node.module is None or node.level and target.count(".") == 1:
                found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _layer(path: Path) -> str | None:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else None


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_lives_in_a_layer() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py"], top
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")} == set(ALLOWED)


def test_the_applications_import_nothing_of_hsmfsm() -> None:
    for path in APPLICATIONS:
        assert not [n for n, _ in _imports(path) if n == "hsmfsm" or n.startswith("hsmfsm.")], path


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_one_way(path: Path) -> None:
    layer = _layer(path)
    wrong = []
    for name, line in _imports(path):
        if not name.startswith("hsmfsm.") and name != "hsmfsm":
            if layer in PURE_LAYERS and name.split(".")[0] in CORE_FORBIDDEN:
                wrong.append(f"line {line}: {layer} imports {name}")
            if name.split(".")[0] == "pkcs11" and layer != "p11" and path not in APPLICATIONS:
                wrong.append(f"line {line}: only hsmfsm.p11 imports python-pkcs11, not {layer or 'the top'}")
            if name.split(".")[0] == "prometheus_client" and layer != "metrics":
                wrong.append(f"line {line}: only hsmfsm.metrics imports prometheus_client, not {layer or 'the top'}")
            continue
        target = name.split(".")[1] if name.count(".") else None
        if target is None or target not in ALLOWED:
            continue  # the package itself, or a top-level module
        if layer is None:  # hsmfsm/__init__ and __main__
            if path.name == "__init__.py" and target in ("tools", "testing", "metrics"):
                wrong.append(f"line {line}: the package imports {name}")
            continue
        if target != layer and target not in ALLOWED[layer]:
            wrong.append(f"line {line}: {layer} imports {name}")
    assert not wrong, f"{path.relative_to(PACKAGE)}: " + "; ".join(wrong)


def test_the_checker_sees_a_wrong_import(tmp_path: Path) -> None:
    """The walk above must be able to fail: a core module that imports the runtime is caught."""
    bad = PACKAGE / "core" / "_probe_for_layers_test.py"
    bad.write_text("from ..runtime import connection\nimport threading\n")
    try:
        names = [n for n, _ in _imports(bad)]
        assert "hsmfsm.runtime" in names and "threading" in names
        with pytest.raises(AssertionError, match="core imports hsmfsm.runtime"):
            test_imports_flow_one_way(bad)
    finally:
        bad.unlink()


def test_public_names_stay_importable_from_the_package() -> None:
    import hsmfsm

    for name in ("SlotConnection", "Pool", "load_policy", "load_pool", "PolicyError", "State", "Event",
                 "HSMError", "CallTimeout", "AllMembersDown", "OutcomeUnknown", "TransitionRecord", "code_of"):
        assert hasattr(hsmfsm, name), name
