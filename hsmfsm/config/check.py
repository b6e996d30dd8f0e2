"""``hsmfsm check``: policy files and pool files, one line each, never a traceback.

Each file goes to the pool loader when :func:`is_pool_file` says so, else to
the policy loader. A good file prints ``OK PATH (policy NAME)`` or ``OK PATH
(pool NAME, N members)`` on stdout; a broken one prints its one-line error,
``FILE:LINE: FIELD: what is wrong``, on stderr. The exit code is 0 when every
file loads and 2 otherwise: CI logs are read by people, not debuggers.

A pool file names the deployment's environment (``${HSMFSM_RUN}`` in a socket
path), which a CI machine does not have. So by default the structure is
checked and an unset variable is a warning on stderr,
``FILE:LINE: FIELD: warning: environment variable X is not set (used as ${X})``,
which does not fail the check. With ``strict`` the pool is loaded exactly as
the daemon will load it (:func:`~hsmfsm.config.pool_file.load_pool`), so an
unset variable is the error it would be there: for checks at deploy time.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from ..core.policy import PolicyError
from .documents import FILE_FIELD, FileWarning, is_pool_file, say
from .policy_file import load_policy
from .pool_file import check_pool, load_pool

__all__ = ["check_any_files", "check_file", "check_files", "is_pool_file"]


def check_any_files(paths: list[str], out: TextIO | None = None, err: TextIO | None = None, *,
                    strict: bool = False) -> int:
    """Check policy and pool files for ``hsmfsm check``: 0 if every file loads, 2 otherwise.

    Warnings (an unset ``${VAR}`` in a pool) go to ``err`` and do not fail the
    check, unless ``strict``: then they are errors. No paths at all is an
    error (a glob that matched nothing checks nothing).
    """
    out, err = out or sys.stdout, err or sys.stderr
    if not paths:
        say(err, "no policy or pool files given")
        return 2
    results = [check_file(path, out, err, strict=strict) for path in paths]
    return 0 if all(results) else 2


def check_files(paths: list[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Check policy files only (a pool file is read as a policy, and refused as one): 0 or 2."""
    out, err = out or sys.stdout, err or sys.stderr
    if not paths:
        say(err, "no policy files given")
        return 2
    results = [_check_one(path, out, err, _policy) for path in paths]
    return 0 if all(results) else 2


def check_file(path: str, out: TextIO, err: TextIO, *, strict: bool = False) -> bool:
    """One policy or pool file: its warnings and errors on ``err``, ``OK ...`` on ``out``; True if it loads."""
    if not is_pool_file(path):
        return _check_one(path, out, err, _policy)
    return _check_one(path, out, err, _strict_pool if strict else _pool)


#: A loader for the check: the description for the OK line, and the warnings to print before it.
_Check = Callable[[Path], tuple[str, tuple[FileWarning, ...]]]


def _policy(path: Path) -> tuple[str, tuple[FileWarning, ...]]:
    return f"policy {load_policy(path).name}", ()


def _describe_pool(name: str, members: int) -> str:
    return f"pool {name}, {members} member{'' if members == 1 else 's'}"


def _pool(path: Path) -> tuple[str, tuple[FileWarning, ...]]:
    spec, warnings = check_pool(path)
    return _describe_pool(spec.name, len(spec.members)), warnings


def _strict_pool(path: Path) -> tuple[str, tuple[FileWarning, ...]]:
    spec = load_pool(path)
    return _describe_pool(spec.name, len(spec.members)), ()


def _check_one(path: str, out: TextIO, err: TextIO, load: _Check) -> bool:
    """One line, OK or the error (warnings first), never a traceback."""
    try:
        described, warnings = load(Path(path))
    except PolicyError as exc:
        say(err, str(exc))
        return False
    except Exception as exc:
        say(err, f"{path}:1: {FILE_FIELD}: internal error in hsmfsm ({type(exc).__name__}: {exc}); please report it")
        return False
    for warning in warnings:
        say(err, str(warning))
    if warnings:
        described += f"; {len(warnings)} warning{'' if len(warnings) == 1 else 's'}"
    say(out, f"OK {path} ({described})")
    return True
