"""What the soak watches while it runs: the PINs in every text, the logs, the transitions, stray exceptions."""

from __future__ import annotations

import collections
import json
import logging
import sys
import threading
import traceback

from ...core.records import TransitionRecord


class Secrets:
    """Scans every text the soak sees for the two PINs, and keeps count of where they showed."""

    def __init__(self, *pins: str) -> None:
        self.pins = [p for p in pins if p]
        self.hits: collections.Counter[str] = collections.Counter()
        self.scanned: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def scan(self, where: str, text: str) -> None:
        found = any(p in text for p in self.pins)
        with self._lock:
            self.scanned[where] += 1
            if found:
                self.hits[where] += 1


class LogCapture(logging.Handler):
    """Everything the ``hsmfsm`` loggers say, at DEBUG: counted, scanned, the first lines kept."""

    def __init__(self, secrets: Secrets) -> None:
        super().__init__(logging.DEBUG)
        self.secrets = secrets
        self.records = 0
        self.by_level: collections.Counter[str] = collections.Counter()
        self.with_traceback: list[str] = []
        self.first: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)  # includes the formatted traceback, if any
        except Exception:
            text = f"{record.name} unformattable record {record.msg!r}"
            self.with_traceback.append(text)
        self.records += 1
        self.by_level[record.levelname] += 1
        self.secrets.scan("log", text)
        if record.exc_info or "Traceback (most recent call last)" in text:
            if len(self.with_traceback) < 20:
                self.with_traceback.append(text)
            else:
                self.with_traceback.append("...")
        if len(self.first) < 30 and record.levelno >= logging.INFO:
            self.first.append(text)


class Transitions:
    """A pool listener: every transition record counted by member and event, scanned, the last kept."""

    def __init__(self, secrets: Secrets) -> None:
        self.secrets = secrets
        self.count = 0
        self.events: collections.Counter[tuple[str, str]] = collections.Counter()
        self.last: collections.deque[str] = collections.deque(maxlen=40)
        self._lock = threading.Lock()

    def __call__(self, record: TransitionRecord) -> None:
        text = f"{record!s} {record!r} {json.dumps(record.as_dict())}"
        self.secrets.scan("transition records", text)
        with self._lock:
            self.count += 1
            self.events[(record.member, record.event)] += 1
            self.last.append(str(record))


class Watch:
    """All of the above, and the hooks that catch what no caller sees.

    :meth:`install` sends the ``hsmfsm`` loggers at DEBUG to :class:`LogCapture` only
    (DEBUG records must not reach the console's handlers) and catches uncaught thread
    exceptions and "Exception ignored" messages; :meth:`remove` puts back what was there
    when the watch was made.
    """

    def __init__(self, *pins: str) -> None:
        self.secrets = Secrets(*pins)
        self.log = LogCapture(self.secrets)
        self.transitions = Transitions(self.secrets)
        self.thread_errors: list[str] = []
        self.unraisable: list[str] = []
        self._logger = logging.getLogger("hsmfsm")
        self._saved_logger = (self._logger.level, self._logger.propagate)
        self._saved_hooks = (threading.excepthook, sys.unraisablehook)

    @property
    def unhandled(self) -> list[str]:
        """Uncaught thread exceptions and "Exception ignored" messages, in that order."""
        return self.thread_errors + self.unraisable

    def install(self) -> None:
        self._logger.addHandler(self.log)
        self._logger.setLevel(logging.DEBUG)
        self._logger.propagate = False
        threading.excepthook = self._thread_hook
        sys.unraisablehook = self._unraisable_hook

    def remove(self) -> None:
        self._logger.removeHandler(self.log)
        self._logger.setLevel(self._saved_logger[0])
        self._logger.propagate = self._saved_logger[1]
        threading.excepthook, sys.unraisablehook = self._saved_hooks

    def _thread_hook(self, args: threading.ExceptHookArgs) -> None:
        self.thread_errors.append("".join(traceback.format_exception(args.exc_type, args.exc_value,
                                                                     args.exc_traceback)))
        self._saved_hooks[0](args)

    def _unraisable_hook(self, args: sys.UnraisableHookArgs) -> None:
        self.unraisable.append(f"{args.err_msg or 'Exception ignored'}: {args.exc_type.__name__}: {args.exc_value}")
        self._saved_hooks[1](args)
