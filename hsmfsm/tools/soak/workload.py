"""The signing threads: every call timed, every signature verified, every outcome counted."""

from __future__ import annotations

import collections
import hashlib
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from ...core.errors import HSMError
from .watch import Secrets

_now = time.monotonic

#: The label of the ECDSA P-256 key pair the soak provisions and signs with.
KEY = "ec"
#: Upper bounds (seconds) of the call latency histogram; a longer call counts under infinity.
BUCKETS = (0.01, 0.1, 0.5, 1.0, 2.0, 4.0, 6.0, 8.0)


class Signer(Protocol):
    """What the workload signs through: a :class:`~hsmfsm.runtime.pool.Pool` (a fake, in the tests)."""

    def sign(self, key_label: str, data: bytes, mechanism: str) -> bytes: ...


@dataclass
class Failure:
    """One call that raised an :class:`HSMError` (monotonic times)."""

    ended: float
    started: float
    klass: str
    message: str


class Workload:
    """Signing threads: every call timed, every signature verified, every outcome counted.

    A call is *lost* when it takes longer than ``lost_after``: flagged when it returns,
    or by :meth:`watch` while it still runs (once per call).
    """

    def __init__(self, pool: Signer, public: ec.EllipticCurvePublicKey, threads: int, seed: int,
                 secrets: Secrets, lost_after: float) -> None:
        self.pool, self.public, self.seed = pool, public, seed
        self.secrets = secrets
        self.lost_after = lost_after
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.calls = self.ok = self.wrong = 0
        self.failures: list[Failure] = []
        self.failed_by_class: collections.Counter[str] = collections.Counter()
        self.messages: dict[str, int] = {}
        self.unhandled: list[str] = []
        self.worst = 0.0
        self.lost: list[str] = []
        self.buckets: collections.Counter[float] = collections.Counter()
        #: thread index -> start of the call in progress (0.0 when none), for the lost-call watchdog.
        self.inflight = [0.0] * threads
        self._flagged = [0.0] * threads
        self.threads = [threading.Thread(target=self._work, args=(i,), daemon=True, name=f"soak-signer-{i}")
                        for i in range(threads)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _work(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            data = f"soak {self.seed} thread {i} record {n}".encode()
            n += 1
            digest = hashlib.sha256(data).digest()
            t0 = _now()
            self.inflight[i] = t0
            try:
                sig = self.pool.sign(KEY, digest, mechanism="ECDSA")
            except HSMError as exc:
                t1 = _now()
                self.inflight[i] = 0.0
                self._failed(exc, t0, t1)
                self._timed(i, t0, t1)
                continue
            except BaseException as exc:
                t1 = _now()
                self.inflight[i] = 0.0
                self._unhandled(exc)
                self._timed(i, t0, t1)
                continue
            t1 = _now()
            self.inflight[i] = 0.0
            good = self._verified(digest, sig)
            with self._lock:
                self.calls += 1
                if good:
                    self.ok += 1
                else:
                    self.wrong += 1
            self._timed(i, t0, t1)

    def _verified(self, digest: bytes, sig: bytes) -> bool:
        r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
        try:
            self.public.verify(utils.encode_dss_signature(r, s), digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        except (InvalidSignature, ValueError):
            return False
        return True

    def _failed(self, exc: HSMError, t0: float, t1: float) -> None:
        self.secrets.scan("exception messages", f"{exc} {exc!r}")
        message = str(exc)
        with self._lock:
            self.calls += 1
            self.failures.append(Failure(t1, t0, type(exc).__name__, message))
            self.failed_by_class[type(exc).__name__] += 1
            if len(self.messages) < 200 or message in self.messages:
                self.messages[message] = self.messages.get(message, 0) + 1

    def _unhandled(self, exc: BaseException) -> None:
        text = "".join(traceback.format_exception(exc))
        self.secrets.scan("exception messages", text)
        with self._lock:
            self.calls += 1
            self.unhandled.append(text)

    def _timed(self, i: int, t0: float, t1: float) -> None:
        took = t1 - t0
        bucket = next((b for b in BUCKETS if took <= b), float("inf"))
        with self._lock:
            self.worst = max(self.worst, took)
            self.buckets[bucket] += 1
            if took > self.lost_after and self._flagged[i] != t0:
                self.lost.append(f"signer {i}: a call took {took:.2f}s")

    def watch(self, now: float) -> None:
        """The lost-call watchdog: flag a call still running past the bound (once per call)."""
        for i, t0 in enumerate(self.inflight):
            if t0 and now - t0 > self.lost_after and self._flagged[i] != t0:
                self._flagged[i] = t0
                with self._lock:
                    self.lost.append(f"signer {i}: a call still running after {now - t0:.2f}s")

    def join(self, timeout: float) -> list[str]:
        """Stop the threads; the names of those still alive after ``timeout`` seconds."""
        self.stop.set()
        limit = _now() + timeout
        for t in self.threads:
            t.join(max(0.0, limit - _now()))
        return [t.name for t in self.threads if t.is_alive()]
