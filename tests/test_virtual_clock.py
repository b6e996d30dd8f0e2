"""VirtualClock: a deterministic baton-passing scheduler on virtual time (hsmfsm/testing/clock.py)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hsmfsm.runtime.edge import Clock
from hsmfsm.testing import ThreadFailure, VirtualClock, VirtualClockClosed, VirtualClockError, VirtualDeadlock


@pytest.fixture
def clock() -> Iterator[VirtualClock]:
    with VirtualClock(seed=7) as c:
        yield c


def _three_threads(seed: int, jitter: bool) -> list[tuple[float, str, object]]:
    """A producer and two consumers on one condition, with random sleeps; ``jitter`` adds real
    sleeps at random (unseeded) places, which must change nothing."""
    real = random.Random()
    trace: list[tuple[float, str, object]] = []

    def jit() -> None:
        if jitter and real.random() < 0.5:
            time.sleep(real.random() * 0.002)

    with VirtualClock(seed=seed) as clock:
        cond = clock.condition(clock.lock())
        done = clock.signal()
        items = [0]

        def producer() -> None:
            for i in range(8):
                clock.sleep(round(clock.random(), 2) / 10)
                jit()
                with cond:
                    items[0] += 1
                    trace.append((clock.monotonic(), "producer", i))
                    cond.notify_all()
            done.set()

        def consumer(name: str) -> Callable[[], None]:
            def run() -> None:
                while True:
                    with cond:
                        cond.wait_for(lambda: items[0] > 0 or done.is_set(), timeout=0.03)
                        if items[0] > 0:
                            items[0] -= 1
                            trace.append((clock.monotonic(), name, "took"))
                        elif done.is_set():
                            return
                        else:
                            trace.append((clock.monotonic(), name, "timeout"))
                    jit()
                    clock.sleep(0.01)
            return run

        threads = [clock.start_thread(producer, "producer"), clock.start_thread(consumer("a"), "a"),
                   clock.start_thread(consumer("b"), "b")]
        for t in threads:
            t.join()
        assert clock.errors == []
    return trace


def test_three_threads_interleave_identically_run_after_run() -> None:
    first = _three_threads(seed=3, jitter=False)
    assert first == _three_threads(seed=3, jitter=False)
    assert first == _three_threads(seed=3, jitter=True)  # real timing does not enter the schedule
    assert _three_threads(seed=4, jitter=False) != first  # the seed does
    names = [name for _, name, _ in first]
    assert {"producer", "a", "b"} <= set(names)
    assert sum(1 for _, _, what in first if what == "took") == 8
    # Interleaved, not one thread after the other.
    assert names.index("a") < len(names) - 1 - names[::-1].index("producer")


def test_sleep_advances_virtual_time_exactly(clock: VirtualClock) -> None:
    woke: list[float] = []
    clock.start_thread(lambda: (clock.sleep(0.25), woke.append(clock.monotonic())), "sleeper")
    clock.sleep(1.5)
    assert woke == [0.25]
    assert clock.monotonic() == 1.5
    assert clock.time() == 1_700_000_000.0 + 1.5
    with VirtualClock(start=100.0, epoch=0.0) as other:
        other.sleep(2.0)
        assert other.monotonic() == 102.0 and other.time() == 102.0


def test_sleep_zero_lets_runnable_threads_go_first(clock: VirtualClock) -> None:
    order: list[str] = []
    clock.start_thread(lambda: order.append("thread"), "t")
    order.append("before")
    clock.sleep(0)
    order.append("after")
    assert order == ["before", "thread", "after"]
    assert clock.monotonic() == 0.0
    clock.sleep(0)  # nothing runnable: returns at once
    assert clock.monotonic() == 0.0


def test_condition_wait_for_times_out_at_the_exact_instant(clock: VirtualClock) -> None:
    cond = clock.condition(clock.lock())

    def nudge() -> None:  # a notify that leaves the predicate false must not restart the timeout
        clock.sleep(0.5)
        with cond:
            cond.notify_all()

    clock.start_thread(nudge, "nudge")
    with cond:
        assert cond.wait_for(lambda: False, timeout=2.0) is False
        assert clock.monotonic() == 2.0
        assert cond.wait_for(lambda: False, timeout=0) is False
        assert cond.wait(timeout=0.25) is False
        assert clock.monotonic() == 2.25


def test_wait_for_returns_the_predicate_value_when_notified(clock: VirtualClock) -> None:
    cond = clock.condition(clock.lock())
    flag = [False]
    seen: list[tuple[bool, float]] = []

    def waiter() -> None:
        with cond:
            seen.append((cond.wait_for(lambda: flag[0]), clock.monotonic()))

    t = clock.start_thread(waiter, "waiter")
    clock.sleep(3.0)
    assert seen == []  # still waiting: nothing notified it
    with cond:
        flag[0] = True
        cond.notify_all()
        assert seen == []  # the waiter needs the lock back first
    t.join()
    assert seen == [(True, 3.0)]


def test_signal_wait_and_set(clock: VirtualClock) -> None:
    sig = clock.signal()
    assert sig.wait(0.75) is False
    assert clock.monotonic() == 0.75
    woke: list[tuple[bool, float]] = []
    clock.start_thread(lambda: woke.append((sig.wait(10.0), clock.monotonic())), "waiter")
    clock.sleep(1.0)
    sig.set()
    assert sig.is_set()
    clock.sleep(0)
    assert woke == [(True, 1.75)]
    assert sig.wait() is True and clock.monotonic() == 1.75  # already set: no wait
    sig.clear()
    assert not sig.is_set()


def test_lock_acquire_times_out_at_the_exact_instant(clock: VirtualClock) -> None:
    lock = clock.lock()
    got: list[tuple[bool, float]] = []
    assert lock.acquire()
    clock.start_thread(lambda: got.append((lock.acquire(timeout=0.5), clock.monotonic())), "late")
    assert lock.acquire(blocking=False) is False
    clock.sleep(10.0)
    assert got == [(False, 0.5)]
    lock.release()
    assert not lock.locked()
    with pytest.raises(RuntimeError):
        lock.release()


def test_lock_is_not_reentrant(clock: VirtualClock) -> None:
    lock = clock.lock()
    lock.acquire()
    assert lock.acquire(timeout=1.0) is False
    assert clock.monotonic() == 1.0
    with pytest.raises(VirtualDeadlock, match="MainThread waits on Lock#1 \\(held by MainThread\\)"):
        lock.acquire()


def test_runnable_threads_and_lock_waiters_go_in_fifo_order(clock: VirtualClock) -> None:
    lock = clock.lock()
    started: list[str] = []
    acquired: list[str] = []

    def worker(name: str) -> Callable[[], None]:
        def run() -> None:
            started.append(name)
            with lock:
                acquired.append(name)
        return run

    lock.acquire()
    threads = [clock.start_thread(worker(n), n) for n in ("carol", "alice", "bob")]
    clock.sleep(1.0)
    assert started == ["carol", "alice", "bob"] and acquired == []
    lock.release()
    for t in threads:
        t.join()
    assert acquired == ["carol", "alice", "bob"]


def test_join_with_a_timeout(clock: VirtualClock) -> None:
    t = clock.start_thread(lambda: clock.sleep(5.0), "slow")
    t.join(timeout=2.0)
    assert clock.monotonic() == 2.0 and t.is_alive()
    t.join()
    assert clock.monotonic() == 5.0 and not t.is_alive()


def test_deadlock_is_reported_with_every_blocked_thread(clock: VirtualClock) -> None:
    baseline = threading.active_count()
    lock, sig = clock.lock(), clock.signal()

    def alpha() -> None:
        with lock:
            sig.wait()

    def beta() -> None:
        clock.sleep(1.0)
        lock.acquire()

    a = clock.start_thread(alpha, "alpha")
    clock.start_thread(beta, "beta")
    with pytest.raises(VirtualDeadlock) as info:
        a.join()
    message = str(info.value)
    assert "t=1.000000" in message
    assert "alpha waits on Signal#2" in message
    assert "beta waits on Lock#1 (held by alpha)" in message
    assert "MainThread waits on join(alpha)" in message
    assert clock.closed  # a deadlocked program cannot go on: the others unwind
    clock.close()
    assert threading.active_count() == baseline
    assert not a.is_alive()


def test_close_unwinds_every_blocked_thread() -> None:
    baseline = threading.active_count()
    swallowed: list[str] = []
    unwound: list[str] = []
    with VirtualClock() as clock:
        lock, sig = clock.lock(), clock.signal()
        cond = clock.condition(clock.lock())

        def guarded(name: str, body: Callable[[], object]) -> Callable[[], None]:
            def run() -> None:
                try:
                    body()
                except Exception:  # what production code does: must not catch the close
                    swallowed.append(name)
                finally:
                    unwound.append(name)
            return run

        def on_cond() -> None:
            with cond:
                cond.wait_for(lambda: False)

        lock.acquire()
        threads = [clock.start_thread(guarded("cond", on_cond), "cond"),
                   clock.start_thread(guarded("lock", lock.acquire), "lock"),
                   clock.start_thread(guarded("signal", sig.wait), "signal"),
                   clock.start_thread(guarded("sleep", lambda: clock.sleep(1e9)), "sleep"),
                   clock.start_thread(guarded("finished", lambda: None), "finished")]
        clock.sleep(0)  # every thread runs once: four block, one ends
        assert [t.is_alive() for t in threads] == [True, True, True, True, False]
        assert unwound == ["finished"]
    assert clock.closed
    assert sorted(unwound) == ["cond", "finished", "lock", "signal", "sleep"]
    assert swallowed == []
    assert all(not t.is_alive() for t in threads)
    for t in threads:
        t.join()  # after close: returns (the thread has unwound), never raises
    assert threading.active_count() == baseline
    assert clock.errors == []
    with pytest.raises(VirtualClockClosed):
        clock.sleep(1.0)


def test_close_stops_threads_that_never_got_the_baton() -> None:
    baseline = threading.active_count()
    ran: list[str] = []
    with VirtualClock() as clock:
        for i in range(3):
            clock.start_thread(lambda: ran.append("x"), f"queued-{i}")
    assert ran == []
    assert threading.active_count() == baseline


def test_an_exception_in_a_thread_is_recorded(clock: VirtualClock) -> None:
    after: list[float] = []

    def bad() -> None:
        clock.sleep(1.0)
        raise ValueError("boom")

    def good() -> None:
        clock.sleep(2.0)
        after.append(clock.monotonic())

    threads = [clock.start_thread(bad, "bad"), clock.start_thread(good, "good")]
    for t in threads:
        t.join()
    assert after == [2.0]
    assert len(clock.errors) == 1
    failure = clock.errors[0]
    assert isinstance(failure, ThreadFailure)
    assert (failure.thread, failure.at) == ("bad", 1.0)
    assert isinstance(failure.error, ValueError) and str(failure.error) == "boom"


def test_a_foreign_thread_is_refused(clock: VirtualClock) -> None:
    caught: list[BaseException] = []

    def foreign() -> None:
        try:
            clock.monotonic()
        except BaseException as exc:
            caught.append(exc)

    t = threading.Thread(target=foreign, name="stranger")
    t.start()
    t.join()
    assert len(caught) == 1 and isinstance(caught[0], VirtualClockError)
    assert "'stranger' is not a participant" in str(caught[0])


def test_misuse_raises_like_threading(clock: VirtualClock) -> None:
    cond = clock.condition(clock.lock())
    with pytest.raises(RuntimeError):
        cond.wait_for(lambda: False, timeout=1.0)  # lock not held
    with pytest.raises(TypeError):
        clock.condition(threading.Lock())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        clock.lock().acquire(blocking=False, timeout=1.0)
    with pytest.raises(ValueError):
        clock.sleep(-1)


def test_ten_virtual_minutes_of_a_20ms_poller_take_seconds(clock: VirtualClock) -> None:
    lock, wake = clock.lock(), clock.signal()
    ticks = [0]
    probes: list[float] = []

    def watchdog() -> None:  # the production watchdog's shape
        for _ in range(30_000):
            clock.sleep(0.02)
            with lock:
                ticks[0] += 1

    def supervisor() -> None:  # a probe loop that sleeps on a signal with a timeout
        while clock.monotonic() < 600.0:
            wake.wait(1.0)
            probes.append(clock.monotonic())

    real_start = time.monotonic()
    threads = [clock.start_thread(watchdog, "watchdog"), clock.start_thread(supervisor, "supervisor")]
    for t in threads:
        t.join()
    elapsed = time.monotonic() - real_start
    assert ticks[0] == 30_000
    assert clock.monotonic() == pytest.approx(600.0)
    assert len(probes) == 600 and probes[0] == 1.0
    assert elapsed < 5.0, f"{elapsed:.2f} s of real time for 600 s of virtual time"


def test_timer_entries_of_early_wakeups_do_not_pile_up(clock: VirtualClock) -> None:
    sig = clock.signal()

    def setter() -> None:
        for _ in range(2000):
            clock.sleep(0.001)
            sig.set()

    clock.start_thread(setter, "setter")
    for _ in range(2000):
        assert sig.wait(60.0)
        sig.clear()
    assert len(clock._timers) < 100


def test_virtual_clock_has_the_clock_shape(clock: VirtualClock) -> None:
    def use(c: Clock) -> float:
        c.sleep(0.5)
        return c.monotonic() + c.random() * 0

    assert use(clock) == 0.5
    r = [VirtualClock(seed=5).random() for _ in range(2)]
    assert r[0] == r[1] == random.Random(5).random()
