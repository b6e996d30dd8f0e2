"""asyncio for HA pools: ``await apool.sign(...)`` with the event loop never blocked.

PKCS#11 has no asynchronous calls, so every call of an :class:`AsyncPool` runs
the pool's own synchronous method (same arguments, same keywords) in a worker
thread, and the awaiting task waits for its outcome. Usage::

    import hsmfsm
    from pkcs11 import KeyType

    async def main() -> None:
        async with hsmfsm.Pool.from_yaml("pool.yaml").aio() as apool:   # opens the pool in a worker
            sig = await apool.sign("zsk", data, mechanism="SHA256_RSA_PKCS")
            ok = await apool.verify("zsk", data, sig, mechanism="SHA256_RSA_PKCS", deadline=0.5)
            pub, priv = await apool.generate_keypair(KeyType.RSA, 2048, "zsk-2027")  # shielded, see below
            key = apool.private_key("zsk")   # the pool's sync key object, for code that runs in threads
        # leaving the block drains the calls in flight, closes the pool, stops the workers

**Threads.** The calls run on a :class:`~concurrent.futures.ThreadPoolExecutor`
of the AsyncPool's own, never the loop's default executor (which
``asyncio.to_thread`` and every other library share). Each of its threads takes
calls from the AsyncPool's queue in order, so submitting a call costs the loop
a few microseconds. It is bounded: ``workers`` threads, so at most ``workers``
calls are in flight at once, and since hsmfsm opens one session per concurrent
caller on a member, no member ever holds more than ``workers`` sessions for
this AsyncPool. The default is :func:`default_workers`: 4 per member, at least
8, at most 32 (the default executor's own cap); 8 for a pool of two. A
p11-kit-client member serves one call at a time anyway, so more threads only
queue; fewer would leave a member idle while another one fails over.

**Deadlines.** Every call takes ``deadline=`` (seconds; default: the policy's
``operations.deadline``). Time spent waiting for a free worker counts
against it: a call still waiting when its deadline passes is withdrawn, never
sent, and raises :class:`WorkersBusy`. A call that got a worker is given the
rest of the deadline (``deadline=`` is passed on to the pool's sync method when
that method takes it), and the awaiting task never waits longer than the
deadline plus the policy's call timeout, the sync pool's own worst case: past
that an idempotent call raises :class:`~hsmfsm.core.errors.CallTimeout` and a
``generate_keypair`` :class:`~hsmfsm.core.errors.OutcomeUnknown` (its result,
when it comes, is dropped and logged as below).

**Cancellation.** A call still waiting for a worker is withdrawn: nothing is
sent and ``CancelledError`` is raised at once. An idempotent call already
running (``sign``, ``verify``, ``decrypt``, ``generate_random``,
``public_key``) raises ``CancelledError`` in the awaiting task at once; its
worker thread runs on until the pool's call returns (a hung member holds it
for at most one call timeout: the pool's watchdog cuts the call off and the
pool goes on elsewhere), and its outcome, result or error, is dropped:
counted in :attr:`AsyncPool.dropped_results` and logged at DEBUG on
``hsmfsm.aio``. ``generate_keypair`` is *shielded*: once sent, cancelling the
awaiting task does not abandon it; the task waits for the outcome (bounded as
above), the outcome is logged at WARNING (on success with the member and the
new key's label, so a created key is never silently forgotten), and only then
is ``CancelledError`` raised.

**Lifecycle.** ``async with`` opens the pool in a worker and, on the way out,
closes in a thread of its own: it drains (new calls are refused, every call
already submitted, queued or running, finishes within its own bound), then
closes the pool, then shuts the executor down. An AsyncPool is opened and
closed once. It works from any event loop, and from several: the pool is
thread-based.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..core.codes import CALL_TIMEOUT
from ..core.errors import CallTimeout, MemberUnavailable, OutcomeUnknown

if TYPE_CHECKING:
    from .pool import MemberStatus, Pool

__all__ = ["IDEMPOTENT", "SHIELDED", "AsyncPool", "WorkersBusy", "default_workers"]

log = logging.getLogger("hsmfsm.aio")

#: Calls whose awaiting task is cancelled at once (the worker runs on; its outcome is dropped).
IDEMPOTENT = frozenset({"sign", "verify", "decrypt", "generate_random", "public_key"})
#: Calls that a cancelled task still waits for, once sent: their outcome must be known.
SHIELDED = frozenset({"generate_keypair"})

WORKERS_PER_MEMBER, MIN_WORKERS, MAX_WORKERS = 4, 8, 32


def default_workers(members: int) -> int:
    """The default executor size for a pool of ``members`` members: 4 per member, within 8..32."""
    return max(MIN_WORKERS, min(MAX_WORKERS, WORKERS_PER_MEMBER * members))


class WorkersBusy(MemberUnavailable):
    """No worker thread of the AsyncPool was free within the call's deadline: nothing was sent."""

    may_have_acted = False


class _Call:
    """One submitted call. ``started`` and ``abandoned`` change under the AsyncPool's lock,
    ``settled`` and ``waiter`` only on the caller's loop. The outcome is kept here, not in a
    future, so that the awaiting task can be woken (by its outcome, its deadline or its bound)
    and cancelled without touching it."""

    __slots__ = ("abandoned", "args", "bound", "ctx", "error", "expires", "kwargs", "limit", "loop", "method", "op",
                 "result", "settled", "started", "waiter")

    def __init__(self, op: str, method: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 loop: asyncio.AbstractEventLoop, limit: float, call_timeout: float) -> None:
        now = time.monotonic()
        self.op, self.method, self.args, self.kwargs = op, method, args, kwargs
        self.loop = loop
        self.limit = limit
        #: The deadline: a call not started by then is withdrawn, never sent.
        self.expires = now + limit
        #: The most the awaiting task waits: the deadline plus one call timeout.
        self.bound = self.expires + call_timeout
        self.ctx = contextvars.copy_context()
        self.started = self.abandoned = self.settled = False
        self.waiter: asyncio.Future[None] | None = None
        self.result: Any = None
        self.error: BaseException | None = None


class AsyncPool:
    """An asyncio facade over a :class:`~hsmfsm.runtime.pool.Pool` (see the module's docstring).

    Build it with :meth:`Pool.aio() <hsmfsm.runtime.pool.Pool.aio>` or directly. ``workers``: the
    size of its thread pool (default :func:`default_workers` of the pool's member count).
    """

    def __init__(self, pool: Pool, *, workers: int | None = None) -> None:
        if workers is None:
            workers = default_workers(len(pool.status()))
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._pool = pool
        self.name: str = pool.name
        #: The executor's size: the most calls in flight at once.
        self.workers = workers
        ops = pool.policy.operations
        self._deadline, self._call_timeout = ops.deadline, ops.call_timeout
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"hsmfsm-aio-{pool.name}")
        self._lock = threading.Lock()
        #: Notified when a call finishes (close() drains on it) ...
        self._idle = threading.Condition(self._lock)
        #: ... and when a call is queued for an idle worker.
        self._work = threading.Condition(self._lock)
        #: Calls waiting for a worker, in order. Each worker of the executor runs one loop that
        #: takes calls from here: submitting a call costs the loop a deque append, not a
        #: concurrent.futures.Future (with its Condition and RLock) per call.
        self._queue: collections.deque[_Call] = collections.deque()
        self._threads = self._idle_workers = 0
        self._stopping = False
        #: Submitted calls not yet finished (queued or running): what close() drains.
        self._pending: set[_Call] = set()
        self._closing = False
        self._closed: concurrent.futures.Future[None] | None = None
        self._takes_deadline: dict[str, bool] = {}
        #: Outcomes (results or errors) of calls that had started when their caller left
        #: (cancelled, or past its bound): the worker's work, thrown away. Calls withdrawn
        #: before they started sent nothing and are not counted.
        self.dropped_results = 0

    # -- lifecycle ------------------------------------------------------------

    @property
    def pool(self) -> Pool:
        return self._pool

    async def open(self, wait: float | None = None) -> AsyncPool:
        """``Pool.open(wait)`` in a worker: starts every member, waits up to ``wait`` (default: the
        deadline) for them to serve. Members that are down do not make it fail (as ``Pool.open``)."""
        await self._call("open", (wait,), {}, self._deadline if wait is None else max(wait, 0.001))
        return self

    async def close(self) -> None:
        """Drain, close the pool, shut the executor down; in a thread of its own. Idempotent, and
        callable from any loop. Cancelling the awaiting task does not stop the close."""
        with self._lock:
            self._closing = True
            closed, start = self._closed, self._closed is None
            if closed is None:
                closed = self._closed = concurrent.futures.Future()
        if start:
            threading.Thread(target=self._close_in_thread, args=(closed,), name=f"hsmfsm-aio-{self.name}-close",
                             daemon=True).start()
        await asyncio.shield(asyncio.wrap_future(closed))

    def _close_in_thread(self, closed: concurrent.futures.Future[None]) -> None:
        try:
            self._close_sync()
        except BaseException as exc:
            closed.set_exception(exc)
        else:
            closed.set_result(None)

    def _close_sync(self) -> None:
        with self._idle:
            while self._pending:
                remaining = max(c.bound for c in self._pending) - time.monotonic()
                if remaining <= 0:
                    break
                self._idle.wait(remaining)
            stuck = len(self._pending)
        if stuck:
            log.warning("%s: closing with %d call(s) still running past their bound", self.name, stuck)
        try:
            self._pool.close()
        finally:
            with self._lock:
                self._stopping = True
                self._idle_workers = 0
                self._work.notify_all()
            self._executor.shutdown(wait=not stuck)

    async def __aenter__(self) -> AsyncPool:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- operations -----------------------------------------------------------

    async def sign(self, key_label: Any, data: bytes, mechanism: Any = None, mechanism_param: Any = None, *,
                   deadline: float | None = None, **kwargs: Any) -> bytes:
        """``Pool.sign`` in a worker. Idempotent: cancelling the awaiting task returns at once."""
        result: bytes = await self._call("sign", (key_label, data, mechanism, mechanism_param), kwargs, deadline)
        return result

    async def verify(self, key_label: Any, data: bytes, signature: bytes, mechanism: Any = None,
                     mechanism_param: Any = None, *, deadline: float | None = None, **kwargs: Any) -> bool:
        """``Pool.verify`` in a worker. Idempotent."""
        result: bool = await self._call("verify", (key_label, data, signature, mechanism, mechanism_param),
                                        kwargs, deadline)
        return result

    async def decrypt(self, key_label: Any, data: bytes, mechanism: Any = None, mechanism_param: Any = None, *,
                      deadline: float | None = None, **kwargs: Any) -> bytes:
        """``Pool.decrypt`` in a worker. Idempotent."""
        result: bytes = await self._call("decrypt", (key_label, data, mechanism, mechanism_param), kwargs,
                                         deadline)
        return result

    async def generate_random(self, nbytes: int, *, deadline: float | None = None, **kwargs: Any) -> bytes:
        """``Pool.generate_random`` in a worker. Idempotent."""
        result: bytes = await self._call("generate_random", (nbytes,), kwargs, deadline)
        return result

    async def generate_keypair(self, key_type: Any, bits: int, label: str, *, deadline: float | None = None,
                               **kwargs: Any) -> Any:
        """``Pool.generate_keypair`` in a worker, *shielded*: once sent, a cancelled caller still waits
        for the outcome (at most deadline + call timeout), which is logged at WARNING (the member and
        the label of a key that was made); then ``CancelledError`` is raised."""
        return await self._call("generate_keypair", (key_type, bits, label), kwargs, deadline)

    async def public_key(self, *args: Any, deadline: float | None = None, **kwargs: Any) -> Any:
        """``Pool.public_key`` in a worker (a ``cryptography`` public key). Idempotent."""
        return await self._call("public_key", args, kwargs, deadline)

    def private_key(self, *args: Any, **kwargs: Any) -> Any:
        """``Pool.private_key``, synchronously: the pool's key object (a ``cryptography`` private key).

        Its methods block on the HSM: use it in threads (``loop.run_in_executor``), or with
        libraries that call it from threads, never on the event loop itself."""
        return self._method("private_key")(*args, **kwargs)

    def status(self) -> list[MemberStatus]:
        """``Pool.status()``: cheap and synchronous (no HSM call)."""
        return self._pool.status()

    def __repr__(self) -> str:
        with self._lock:
            queued = sum(1 for c in self._pending if not c.started)
            running = len(self._pending) - queued
        closed = self._closed
        state = "open" if not self._closing else "closed" if closed is not None and closed.done() else "closing"
        return (f"<AsyncPool {self.name} workers={self.workers} running={running} queued={queued} "
                f"dropped={self.dropped_results} {state}>")

    # -- the call path --------------------------------------------------------

    def _method(self, op: str) -> Callable[..., Any]:
        method: Callable[..., Any] | None = getattr(self._pool, op, None)
        if method is None:
            raise AttributeError(f"{type(self._pool).__name__} has no {op}()")
        return method

    def _passes_deadline(self, op: str, method: Callable[..., Any]) -> bool:
        known = self._takes_deadline.get(op)
        if known is None:
            try:
                known = "deadline" in inspect.signature(method).parameters
            except (TypeError, ValueError):
                known = False
            self._takes_deadline[op] = known
        return known

    async def _call(self, op: str, args: tuple[Any, ...], kwargs: dict[str, Any], deadline: float | None) -> Any:
        if deadline is not None and not (deadline > 0 and math.isfinite(deadline)):
            raise ValueError(f"deadline must be a positive number of seconds, not {deadline!r}")
        loop = asyncio.get_running_loop()
        call = _Call(op, self._method(op), args, kwargs, loop, self._deadline if deadline is None else deadline,
                     self._call_timeout)
        spawn = False
        with self._lock:
            if self._closing:
                raise MemberUnavailable(self.name, f"{op}: the async pool is closed", may_have_acted=False)
            self._pending.add(call)
            self._queue.append(call)
            if self._idle_workers:
                self._idle_workers -= 1
                self._work.notify()
            elif self._threads < self.workers:
                self._threads += 1
                spawn = True
        if spawn:
            self._executor.submit(self._worker)
        # Wait for the outcome; wake at the deadline while the call waits for a worker, then at the bound.
        shielded = op in SHIELDED
        cancelled = False
        while not call.settled:
            timeout = (call.bound if call.started else call.expires) - time.monotonic()
            if timeout > 0:
                waiter = call.waiter = loop.create_future()
                timer = loop.call_later(timeout, _wake, waiter)
                try:
                    await waiter
                except asyncio.CancelledError:
                    if shielded and not self._withdraw(call):
                        cancelled = True  # sent: wait for the outcome, then raise
                        continue
                    self._abandon(call)
                    raise
                finally:
                    timer.cancel()
                    call.waiter = None
                if call.settled:
                    break
            now = time.monotonic()
            if now >= call.expires and self._withdraw(call):
                raise self._busy(call)
            if now >= call.bound:
                self._abandon(call)
                raise self._overran(call, cancelled)
        if cancelled:
            self._log_outcome(call, "cancelled by its caller after it was sent")
            raise asyncio.CancelledError()
        if call.error is not None:
            raise call.error
        return call.result

    def _overran(self, call: _Call, cancelled: bool) -> BaseException:
        limits = f"deadline {call.limit:g}s + call timeout {self._call_timeout:g}s"
        if call.op not in SHIELDED:
            return CallTimeout(self.name, f"{call.op}: no outcome within {limits}; abandoned", CALL_TIMEOUT)
        if cancelled:
            log.warning("%s: generate_keypair was cancelled by its caller and has no outcome within %s; "
                        "it is logged when it comes", self.name, limits)
            return asyncio.CancelledError()
        return OutcomeUnknown(self.name, f"generate_keypair: no outcome within {limits}; look for "
                              f"{_keygen_label(call)!r} on the members before trying again", CALL_TIMEOUT)

    def _worker(self) -> None:
        """One thread of the executor: runs calls from the queue until the AsyncPool closes."""
        while True:
            with self._lock:
                while not self._queue:
                    if self._stopping:
                        self._threads -= 1
                        return
                    self._idle_workers += 1
                    self._work.wait()  # whoever notifies takes this worker off the idle count
                call = self._queue.popleft()
            self._run(call)

    def _run(self, call: _Call) -> None:
        """In a worker thread."""
        with self._lock:
            if call.abandoned:  # withdrawn while queued: nothing is sent
                self._pending.discard(call)
                self._idle.notify_all()
                return
            call.started = True
        try:
            remaining = call.expires - time.monotonic()
            if remaining <= 0:
                raise self._busy(call)
            kwargs = call.kwargs
            if self._passes_deadline(call.op, call.method):
                kwargs = {**kwargs, "deadline": remaining}
            call.result = call.ctx.run(call.method, *call.args, **kwargs)
        except BaseException as exc:  # raised in the awaiting task as it is
            call.error = exc
        self._finish(call)
        try:
            call.loop.call_soon_threadsafe(self._settle, call)
        except RuntimeError:  # the loop is closed: nobody will read this outcome
            self._dropped(call, "its event loop is closed")

    def _finish(self, call: _Call) -> None:
        with self._lock:
            self._pending.discard(call)
            self._idle.notify_all()

    def _busy(self, call: _Call) -> WorkersBusy:
        return WorkersBusy(self.name, f"{call.op}: no worker free within the deadline of {call.limit:g}s "
                           f"({self.workers} workers)", may_have_acted=False)

    def _settle(self, call: _Call) -> None:
        """On the caller's loop: the outcome is in; wake the caller, or drop it if the caller left."""
        call.settled = True
        if call.abandoned:
            self._dropped(call, "its caller was cancelled or gave up")
        else:
            _wake(call.waiter)

    def _withdraw(self, call: _Call) -> bool:
        """Abandon a call that has not started (True: it never will; nothing is sent)."""
        with self._lock:
            if call.started:
                return False
            call.abandoned = True
            return True

    def _abandon(self, call: _Call) -> None:
        """On the loop: the caller leaves. An outcome already in is dropped now, a running call's
        when it comes in; a call not started is never sent."""
        with self._lock:
            call.abandoned = True
        if call.settled:
            self._dropped(call, "its caller was cancelled or gave up")

    def _dropped(self, call: _Call, why: str) -> None:
        with self._lock:
            self.dropped_results += 1
        if call.op in SHIELDED:
            self._log_outcome(call, f"abandoned ({why})")
        else:
            log.debug("%s: %s %s dropped: %s", self.name, call.op, "error" if call.error else "result", why)

    def _log_outcome(self, call: _Call, how: str) -> None:
        """A generate_keypair nobody waits for: the outcome goes to the log, at WARNING."""
        label = _keygen_label(call)
        if call.error is None:
            member = _member_of(self._pool, call.result)
            log.warning("%s: generate_keypair %s: it succeeded: key pair %r created on member %s "
                        "(the key exists; its caller was not told)", self.name, how, label,
                        member or "unknown (the key object names no member session)")
        else:
            log.warning("%s: generate_keypair %s: it failed: %s", self.name, how, call.error)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _keygen_label(call: _Call) -> Any:
    return call.kwargs.get("label", call.args[2] if len(call.args) > 2 else None)


def _member_of(pool: Pool, result: Any) -> str | None:
    """The member whose session made ``result`` (a key, or a tuple of keys): a key object keeps
    the session it was made in, and each session belongs to one member's generation."""
    keys = result if isinstance(result, tuple) else (result,)
    sessions = {id(s) for k in keys if (s := getattr(k, "session", None)) is not None}
    if not sessions:
        return None
    try:
        for status in pool.status():
            conn: Any = pool.member(status.name)
            for g in (conn._g, *conn._retired):
                if any(id(lease.session) in sessions for lease in list(g.leases)):
                    return status.name
    except Exception:  # best effort, for a log line: the label is logged anyway
        log.debug("could not tell the member of a generated key", exc_info=True)
    return None
