"""Where PINs come from, and how they are kept out of every log, record and error.

A PIN is given as ``env:NAME``, ``file:PATH`` or a callable that returns it.
It is read at each login (so a rotated PIN file is picked up) and never
stored: :class:`PinSource` keeps only where the PIN comes from, and its repr
says so and no more.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

PinSpec = str | Callable[[], str]


class PinError(ValueError):
    """The PIN source is unusable. The message names the source, never the PIN."""


class PinSource:
    """A PIN's origin. ``read()`` fetches the PIN now; nothing else ever sees it."""

    __slots__ = ("_spec", "_describe")

    def __init__(self, spec: PinSpec) -> None:
        if callable(spec):
            self._spec: PinSpec = spec
            self._describe = f"callable {getattr(spec, '__qualname__', type(spec).__name__)}"
        elif isinstance(spec, str) and spec.startswith(("env:", "file:")) and len(spec.split(":", 1)[1]) > 0:
            self._spec = spec
            self._describe = spec
        else:
            raise PinError("pin must be 'env:NAME', 'file:PATH' or a callable returning the PIN; "
                           "a literal PIN in code or configuration is refused")

    def read(self) -> str:
        spec = self._spec
        if callable(spec):
            pin = spec()
        elif spec.startswith("env:"):
            name = spec[4:]
            if name not in os.environ:
                raise PinError(f"pin source {spec}: environment variable {name} is not set")
            pin = os.environ[name]
        else:
            pin = _read_pin_file(spec[5:])
        if not isinstance(pin, str) or not pin:
            raise PinError(f"pin source {self._describe} gave no PIN")
        return pin

    def __repr__(self) -> str:
        return f"<PinSource {self._describe}>"

    __str__ = __repr__


def _read_pin_file(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise PinError(f"pin file {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PinError(f"pin file {path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                       f"run: chmod 600 {path}")
    with open(path, encoding="utf-8") as fh:
        return fh.read().strip()
