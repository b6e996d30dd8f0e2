"""The supervisor of one connection: reconnect, log in, and probe, as the rule-book says.

One thread per connection runs :meth:`Supervisor.run`. It does all recovery
I/O (C_Finalize/C_Initialize, finding the token, the anchor session, the one
C_Login of an attempt, the health probe) outside the connection's lock, then
asks :mod:`hsmfsm.core.rules` what the answer means (phases ``connect``,
``login``, ``probe``) and fires that under the lock. The connection's own
state is the only thing it shares with the callers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config.pin import PinError
from ..core import rules
from ..core.codes import CALL_TIMEOUT, CKR_OK, Code
from ..core.errors import LoginRejected, MemberUnavailable, ModuleCallError, ModuleError
from ..core.states import SERVING, Event, State
from .generation import Generation, Lease

if TYPE_CHECKING:
    from .connection import SlotConnection

log = logging.getLogger("hsmfsm.connection")

#: ``Supervisor.watched``'s default: lane 0's call lock, as it is when the call is made.
_LANE_0: Any = object()
#: Seconds before a suspected member's probe looks again for a session (its calls in flight, being
#: cut off, give theirs back within a watchdog tick or two).
_PROBE_RETRY = 0.01


class Supervisor:
    """The recovery steps of one :class:`~hsmfsm.runtime.connection.SlotConnection`."""

    def __init__(self, conn: SlotConnection) -> None:
        self.c = conn

    # -- the loop -----------------------------------------------------------

    def run(self) -> None:
        c = self.c
        c._supervisor_ident = threading.get_ident()
        next_probe = 0.0
        while True:
            with c._lock:
                if c._closing:
                    return
                state = c._machine.current
            now = c._now()
            if state is State.FAILED:
                self._sleep(None)
            elif state in SERVING:
                if (c._probe_enabled and now >= next_probe) or c._probe_now:
                    c._probe_now = False  # asked for (a suspected member): also where probes are off
                    self.probe()
                    next_probe = c._now() + c.policy.probe.interval
                if c._probe_now:  # a suspected member's probe found no session yet: look again soon
                    self._sleep(_PROBE_RETRY)
                else:
                    self._sleep(max(0.0, next_probe - c._now()) if c._probe_enabled else None)
            elif not c._auto_recover and not c._recovery_requested:
                self._sleep(None)  # in-call recovery: wait for a caller to ask
            elif c._auto_recover and not c._schedule.due(now) and not c._schedule.gave_up:
                self._sleep(max(0.0, (c._schedule.next_at or now) - now))
            else:
                self._step(state)  # a schedule that gave up: the step fires give_up
            c._flush()

    def _sleep(self, seconds: float | None) -> None:
        if self.c._wake.wait(seconds):
            self.c._wake.clear()

    def _step(self, state: State) -> None:
        c = self.c
        if state is State.DISCONNECTED:
            with c._lock:
                if not c._fire_if_legal(Event.CONNECT, None):
                    return
                if c._schedule.gave_up:  # the last attempts failed at C_Login: say so as _attempt_failed does
                    c._failure = MemberUnavailable(
                        c.name, f"gave up after {c._schedule.attempts} connect attempts", c.last_code)
                    c._fire(Event.GIVE_UP, c.last_code)
                    return
            c._flush()
            self.establish(reinitialize=True)
        elif state is State.CONNECTING:
            self.establish(reinitialize=False)
        elif state is State.OPEN:
            self.login()

    # -- calls under the watchdog --------------------------------------------

    def watched(self, fn: Callable[..., Any], *args: Any, lock: Any = _LANE_0) -> Any:
        """Run one supervisor PKCS#11 call under the watchdog and a module's call lock (lane 0's,
        unless ``lock`` is given: the lock of the lane whose instance ``fn`` calls).

        The lock is taken with the call timeout: a caller stuck in a hung call holds it
        until the watchdog cuts that call off, and the supervisor must not hang behind it.
        """
        from .connection import Busy

        c = self.c
        slot = c._supervisor_slot
        if lock is _LANE_0:
            lock = c._call_lock
        if lock is not None and not lock.acquire(timeout=c._timeout):
            slot.timed_out = True
            raise Busy()
        slot.started, slot.timed_out = c._now(), False
        try:
            return fn(*args)
        finally:
            slot.started = 0.0
            if lock is not None:
                lock.release()

    def drain(self, timeout: float, forgotten: list[Generation] | None = None) -> bool:
        """Wait until no lease of a retired generation is in use; then they can be forgotten.

        Only the generations seen at the start are forgotten: one retired meanwhile
        (the watchdog may fire during an attempt) waits for the next drain. The
        forgotten ones are appended to ``forgotten``, if given.
        """
        c = self.c
        with c._lock:
            pending = list(c._retired)
        deadline = c._now() + timeout
        while not all(g.drained() for g in pending):
            if c._now() > deadline:
                return False
            c._clock.sleep(0.002)
        with c._lock:
            c._retired = [g for g in c._retired if g not in pending]
        if forgotten is not None:
            forgotten.extend(pending)
        return True

    def _close_lost_sessions(self, generations: list[Generation]) -> bool:
        """Close the sessions of drained generations when no C_Initialize came since they were opened.

        After ``session_lost`` the connection opens a new anchor without re-initialising
        the module, so the lost generation's sessions (its anchor and every lease) are
        still open on the token: without this, every ``session_lost`` leaked them until
        the next reinitialisation (the soak counted 15 live sessions where 5 were in
        use). Closing them here is safe: they are drained (no caller holds one), they
        are handles of this very module initialisation (``epoch``), and no session of
        the new generation exists yet, so no handle can alias a new session. C_CloseSession
        without C_Logout (``Module.close_session``). False when a close overran the call
        timeout: the attempt has then failed.
        """
        from .connection import Busy

        c = self.c
        lane = c._lanes[0]
        sessions = []
        for g in generations:
            if g.module is not c._module or g.epoch != c._epoch:
                continue  # re-initialised since: the handles are stale, and may alias new ones
            # Lane 0's (the anchor is one of them); another lane's session dies with that lane's
            # next C_Initialize, which sets it up for a new generation.
            sessions += [lease.session for lease in g.leases if lease.session is not None and lease.lane is lane
                         and lease.epoch == lane.epoch]
        for session in sessions:
            try:
                self.watched(c._module.close_session, session)
            except Busy:
                self._attempt_failed(CALL_TIMEOUT, "could not close the lost sessions: a call is stuck")
                return False
            if c._supervisor_slot.timed_out:
                self._attempt_failed(CALL_TIMEOUT, "closing the lost sessions overran the call timeout")
                return False
        return True

    # -- connect --------------------------------------------------------------

    def establish(self, reinitialize: bool) -> None:
        """connecting -> open: (re)initialise the module if asked, find the token, open the anchor session."""
        c = self.c
        forgotten: list[Generation] = []
        if not self.drain(c._timeout, forgotten):
            c._cut_off()
            if not self.drain(c._timeout, forgotten):
                self._attempt_failed(CALL_TIMEOUT, "calls of the old generation did not return")
                return
        module = c._module
        if not reinitialize and module.initialized and not self._close_lost_sessions(forgotten):
            return
        if reinitialize or not module.initialized:
            module.prepare(c._timeout)
        try:
            if reinitialize or not module.initialized:
                c._epoch += 1
                code = self.watched(module.initialize)
                if not module.parallel and c._call_lock is None:
                    c._call_lock = c._clock.lock()  # refused OS locking: no session exists yet
                if code != CKR_OK:
                    self._attempt_failed(code, "C_Initialize failed")
                    return
            token = self.watched(module.find_token, c.token_label)
            anchor = self.watched(module.open_session, token)
            mechanisms = self._mechanisms(module, token)
        except ModuleError as exc:
            with c._lock:
                c._failure = MemberUnavailable(c.name, str(exc))
                c._fire_if_legal(Event.FATAL, None)
            return
        except ModuleCallError as exc:
            timed_out = c._supervisor_slot.timed_out
            self._attempt_failed(CALL_TIMEOUT if timed_out else exc.code, "could not open a session")
            return
        with c._lock:
            g = c._g
            g.token, g.anchor = token, anchor
            g.module, g.epoch = module, c._epoch
            g.mechanisms = mechanisms
            if mechanisms is not None:
                c._last_mechanisms = mechanisms
            # The anchor is lane 0's session, and a lease once the login succeeded (callers lease
            # only while the generation serves): one of the sessions.max.
            lane = c._lanes[0]
            lane.token, lane.generation, lane.stale = token, g.number, False
            lease = Lease(g, lane)
            lease.session, lease.opened = anchor, True
            g.leases.append(lease)
            g.idle.append(lease)
            if c._links:
                lane.lease = lease
            c._fire_if_legal(Event.SESSION_OPENED, None)

    def _mechanisms(self, module: Any, token: Any) -> frozenset[str] | None:
        """The token's mechanism list (C_GetMechanismList), read once per connect so that a call
        for a mechanism the token lacks is refused (or, in a pool, sent elsewhere) up front.

        A module that cannot say (no ``mechanisms``, or an error) leaves it unknown (None): calls
        then go to the token, which answers for itself. A read the watchdog cut off fails the
        attempt, as the open before it would."""
        read = getattr(module, "mechanisms", None)
        if read is None:
            return None
        try:
            return frozenset(self.watched(read, token))
        except ModuleCallError as exc:
            if self.c._supervisor_slot.timed_out:
                raise
            log.info("%s: could not read the mechanism list [%s]; calls will not be routed by mechanism",
                     self.c.name, exc.code)
            return None

    def _attempt_failed(self, code: Code, why: str) -> None:
        c = self.c
        log.info("%s: connect attempt failed: %s [%s]", c.name, why, code)
        d = rules.decide_connect(c.policy, code)
        with c._lock:
            c.last_code = code
            if d.event is Event.FATAL:
                c._failure = MemberUnavailable(c.name, f"{why}; {d.reason}", code)
                c._fire_if_legal(Event.FATAL, code)
                return
            give_up = c._schedule.failed(c._now()) is None
            c._fire_if_legal(Event.GIVE_UP if give_up else Event.CONNECT_FAILED, code)
            if give_up:
                c._failure = MemberUnavailable(
                    c.name, f"gave up after {c._schedule.attempts} connect attempts", code)

    # -- login ----------------------------------------------------------------

    def login(self) -> None:
        """open -> logged_in with exactly one C_Login; a rejected PIN is never tried again."""
        from .connection import Busy

        c = self.c
        g = c._g
        try:
            pin = c._pin.read()
        except PinError as exc:
            with c._lock:
                c._failure = LoginRejected(c.name, str(exc))
                c._fire_if_legal(Event.FATAL, None)
            return
        c.login_attempts += 1
        try:
            code = self.watched(c._module.login, g.anchor, pin)
        except Busy:
            code = CALL_TIMEOUT
        finally:
            del pin
        timed_out = c._supervisor_slot.timed_out or code is CALL_TIMEOUT
        d = rules.decide_login(c.policy, code, timed_out=timed_out)
        with c._lock:
            if g is not c._g:
                return
            c.last_code = d.code
            if d.event is Event.LOGIN_OK:
                c._schedule.succeeded()
                c._health.reset()
                c._fire_if_legal(Event.LOGIN_OK, d.code)
                return
            if d.event is Event.FATAL:
                c._failure = LoginRejected(c.name, d.reason, d.code, State.FAILED)
                c._fire(Event.FATAL, d.code)
                return
            if d.count is rules.Reaction.CONNECT_FAILED:
                c._schedule.failed(c._now())
            if d.event is not None:
                c._fire_if_legal(d.event, d.code)

    # -- the probe -------------------------------------------------------------

    def probe(self) -> None:
        """One health probe on an idle session, leased for it: proves the link, the session and the login.

        Leased, not probed where it lies: a caller that came for that session would wait behind the
        probe unseen by the watchdog's suspicion check (its call has not started), and on a hung HSM
        wait for the call timeout; it opens another session instead. A connection whose sessions are
        all leased is not probed (its calls say how it is), unless it is suspected: then a session is
        opened for the probe (its answer takes the mark away; a hung member meets the call timeout
        here, as without suspicion)."""
        c = self.c
        g = c._g
        if not g.ready:
            return
        try:
            lease = g.idle.pop()
        except IndexError:
            found = self._probe_lease(g)
            if found is None:
                if c._suspected:
                    c._probe_now = True  # every session is in a call being cut off: again in a moment
                return
            lease = found
        session_state: int | None = None
        started = c._now()
        try:
            code, session_state = self._probe_call(lease)
        except ModuleCallError as exc:
            code = exc.code
        finally:
            g.idle.append(lease)
            if c._waiting:
                c._lease_returned()
        slow = c._now() - started > c._slow
        d = rules.decide_probe(c.policy, code, timed_out=c._supervisor_slot.timed_out,
                               session_state=session_state)
        with c._lock:
            if g is not c._g:
                return  # another thread recorded the loss first (the watchdog, a caller)
            answered = d.reaction is rules.Reaction.NONE
            if answered:
                c._fire_verdict(c._health.probe_slow() if slow else c._health.probe_ok(), None)
            else:
                c.last_code = d.code
                if d.count is rules.Reaction.PROBE_FAILED:
                    c._fire_verdict(c._health.probe_failed(), d.code)
                elif d.event is not None:
                    c._fire_if_legal(d.event, d.code)
        c._flush()
        if answered:
            c._answer()

    def _probe_lease(self, g: Generation) -> Lease | None:
        """A session for the probe of a connection whose sessions are all leased: only for a suspected
        member (opened as a caller's would be, under the watchdog), else None (no probe this time)."""
        from .connection import _OpenFailed

        c = self.c
        if not c._suspected:
            return None
        with c._lock:
            # Never a new link: a module's first load holds the process's loading lock (its environment
            # is read then), and on a hung HSM the probe is to wait for the call timeout, holding it.
            lane = c._claim_lane(g, new=False) if g is c._g and g.ready else None
            if lane is None:
                return None
            lease = Lease(g, lane)
            g.leases.append(lease)
            if c._links:
                lane.lease = lease
        try:
            c._set_up(g, lease)
        except _OpenFailed:
            c._abandon(g, lease, lane)
            return None
        return lease

    def _probe_call(self, lease: Lease) -> tuple[Code, int | None]:
        c = self.c
        operation = c.policy.probe.operation
        if operation == "generate_random":
            self.watched(lease.module.generate_random, lease.session, 16, lock=lease.lock)
            return CKR_OK, None
        if operation == "token_info":
            self.watched(lease.module.token_info, lease.token, lock=lease.lock)
            return CKR_OK, None
        code, state = self.watched(lease.module.session_state, lease.session, lock=lease.lock)
        return code, state
