"""Where PINs come from, and how they are kept out of every log, record and error.

A PIN is given as ``env:NAME``, ``file:PATH``, ``credential:NAME`` (systemd's
``LoadCredential=``: the file ``$CREDENTIALS_DIRECTORY/NAME``) or a callable
that returns it.
It is read at each login (so a rotated PIN file is picked up) and never
stored: :class:`PinSource` keeps only where the PIN comes from, and its repr
says so and no more.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

PinSpec = str | Callable[[], str]
#: The written forms of a PIN source.
PREFIXES = ("env:", "file:", "credential:")


class PinError(ValueError):
    """The PIN source is unusable. The message names the source, never the PIN."""


class PinSource:
    """A PIN's origin. ``read()`` fetches the PIN now; nothing else ever sees it."""

    __slots__ = ("_spec", "_describe")

    def __init__(self, spec: PinSpec) -> None:
        if callable(spec):
            self._spec: PinSpec = spec
            self._describe = f"callable {getattr(spec, '__qualname__', type(spec).__name__)}"
        elif isinstance(spec, str) and spec.startswith(PREFIXES) and len(spec.split(":", 1)[1]) > 0:
            self._spec = spec
            self._describe = spec
        else:
            raise PinError("pin must be 'env:NAME', 'file:PATH', 'credential:NAME' or a callable returning "
                           "the PIN; a literal PIN in code or configuration is refused")

    def read(self) -> str:
        spec = self._spec
        if callable(spec):
            pin = spec()
        elif spec.startswith("env:"):
            name = spec[4:]
            if name not in os.environ:
                raise PinError(f"pin source {spec}: environment variable {name} is not set")
            pin = os.environ[name]
        elif spec.startswith("credential:"):
            pin = _read_credential(spec[len("credential:"):])
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


def _read_credential(name: str) -> str:
    """A systemd credential (``LoadCredential=NAME:...`` in the unit): ``$CREDENTIALS_DIRECTORY/NAME``.

    systemd makes that directory readable by the service alone, so the file's own mode is not
    checked as a PIN file's is; a name with a path separator is refused (it would leave the folder).
    """
    if "/" in name or name in (".", ".."):
        raise PinError(f"pin source credential:{name}: a credential name has no '/' and is not . or ..")
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    if not folder:
        raise PinError(f"pin source credential:{name}: CREDENTIALS_DIRECTORY is not set (run under systemd "
                       f"with LoadCredential={name}:PATH, or set it to the folder that holds {name})")
    path = os.path.join(folder, name)
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError as exc:
        raise PinError(f"pin source credential:{name}: cannot read {path} (CREDENTIALS_DIRECTORY): "
                       f"{exc.strerror}") from None
