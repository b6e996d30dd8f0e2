"""ScriptedHSM / ScriptedModule: the Module shape, failing as p11-kit-client does (docs/FACTS.md)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hsmfsm.core.codes import Code, code_from_name
from hsmfsm.core.errors import ModuleCallError
from hsmfsm.runtime.clock import SYSTEM
from hsmfsm.runtime.edge import Module
from hsmfsm.testing import ScriptedHSM, ScriptedMechanism, ScriptedModule, VirtualClock

OK = code_from_name("CKR_OK")
PIN = "1234"


@pytest.fixture
def clock() -> Iterator[VirtualClock]:
    with VirtualClock(seed=1) as c:
        yield c


@pytest.fixture
def hsm(clock: VirtualClock) -> ScriptedHSM:
    return ScriptedHSM("tok", pin=PIN, clock=clock)


def connect(hsm: ScriptedHSM, clock: VirtualClock, name: str = "m", pin: str = PIN) -> tuple[ScriptedModule, Any]:
    """initialize, find_token, open_session, login: a logged-in session."""
    m = ScriptedModule(hsm, clock, name)
    assert m.initialize() == OK
    session = m.open_session(m.find_token(hsm.label))
    assert m.login(session, pin) == OK
    return m, session


def code_of(call: Callable[[], object]) -> str:
    """The code name a call raised (ModuleCallError and nothing else), or CKR_OK."""
    try:
        call()
    except ModuleCallError as exc:
        return exc.code.name
    return "CKR_OK"


def sign(m: ScriptedModule, key: Any, data: bytes = b"data", mech: str = "SHA256_RSA_PKCS") -> bytes:
    return m.sign(key, data, m.mechanism(mech), None)


# -- healthy ---------------------------------------------------------------------------


def test_sign_and_verify(hsm: ScriptedHSM, clock: VirtualClock) -> None:
    m, s = connect(hsm, clock)
    assert m.session_state(s) == (OK, 3)
    private, public = m.find_key(s, "rsa", "private"), m.find_key(s, "rsa", "public")
    mech = m.mechanism("SHA256_RSA_PKCS")
    signature = m.sign(private, b"data", mech, None)
    assert signature == m.sign(private, b"data", mech, None)  # deterministic
    assert m.verify(public, b"data", signature, mech, None) is True
    assert m.verify(public, b"other", signature, mech, None) is False
    assert hsm.verify_signature("rsa", b"data", signature, "SHA256_RSA_PKCS")
    assert not hsm.verify_signature("rsa", b"data", signature, "SHA256_RSA_PKCS_PSS")
    assert not hsm.verify_signature("ec", b"data", signature, "SHA256_RSA_PKCS")
    ec = m.find_key(s, "ec", "private")
    assert hsm.verify_signature("ec", b"d", m.sign(ec, b"d", m.mechanism("ECDSA"), None), "ECDSA")
    assert code_of(lambda: m.sign(ec, b"d", mech, None)) == "CKR_KEY_TYPE_INCONSISTENT"
    assert code_of(lambda: m.sign(public, b"d", mech, None)) == "CKR_KEY_FUNCTION_NOT_PERMITTED"
    assert code_of(lambda: m.sign(private, b"d", m.mechanism("RSA_PKCS_OAEP"), None)) == "CKR_MECHANISM_INVALID"
    assert hsm.count("verify", "CKR_SIGNATURE_INVALID") == 1


def test_decrypt_random_and_mechanisms(hsm: ScriptedHSM, clock: VirtualClock) -> None:
    m, s = connect(hsm, clock)
    key = m.find_key(s, "rsa", "private")
    oaep = m.mechanism("RSA_PKCS_OAEP")
    assert m.decrypt(key, hsm.encrypt("rsa", b"plaintext"), oaep, None) == b"plaintext"
    assert code_of(lambda: m.decrypt(key, b"garbage", oaep, None)) == "CKR_ENCRYPTED_DATA_INVALID"
    assert code_of(lambda: m.decrypt(key, hsm.encrypt("ec", b"x"), oaep, None)) == "CKR_ENCRYPTED_DATA_INVALID"
    random_bytes = m.generate_random(s, 16)
    assert len(random_bytes) == 16
    with VirtualClock() as other_clock:
        twin = ScriptedHSM("tok", pin=PIN, clock=other_clock)
        m2, s2 = connect(twin, other_clock)
        assert m2.generate_random(s2, 16) == random_bytes  # same seed, same bytes
        assert m2.generate_random(s2, 16) != random_bytes
    for name in ("SHA256_RSA_PKCS", "ECDSA", "SHA256_RSA_PKCS_PSS", "RSA_PKCS", "RSA_PKCS_OAEP"):
        value = m.mechanism(name)
        assert isinstance(value, ScriptedMechanism) and value.name == name
        assert m.mechanism(value) is value
    assert m.mechanism("CKM_ECDSA") is m.mechanism("ECDSA")
    with pytest.raises(ValueError):
        m.mechanism("NO_SUCH_MECHANISM")


def test_tokens_keys_and_logins(hsm: ScriptedHSM, clock: VirtualClock) -> None:
    m, s = connect(hsm, clock)
    assert code_of(lambda: m.find_token("other")) == "HSMFSM_NO_SUCH_TOKEN"
    assert code_of(lambda: m.find_key(s, "missing", "private")) == "HSMFSM_NO_SUCH_KEY"
    # Login is per instance and token: every session of the instance sees it, another instance does not.
    s2 = m.open_session(m.find_token("tok"))
    assert m.session_state(s2) == (OK, 3)
    assert m.login(s2, PIN).name == "CKR_USER_ALREADY_LOGGED_IN"
    other = ScriptedModule(hsm, clock, "other")
    assert other.initialize() == OK
    os_ = other.open_session(other.find_token("tok"))
    assert other.session_state(os_) == (OK, 2)
    assert code_of(lambda: other.find_key(os_, "rsa", "private")) == "HSMFSM_NO_SUCH_KEY"  # private: invisible
    assert code_of(lambda: other.find_key(os_, "rsa", "public")) == "CKR_OK"
    # Closing the last session logs the instance out (PKCS#11).
    assert m.close_session(s) == OK
    assert m.session_state(s2) == (OK, 3)
    assert m.close_session(s2) == OK
    assert m.close_session(s2).name == "CKR_SESSION_HANDLE_INVALID"
    s3 = m.open_session(m.find_token("tok"))
    assert m.session_state(s3) == (OK, 2)
    m.token_info(m.find_token("tok"))


def test_generated_keys_are_on_the_token_for_every_instance(hsm: ScriptedHSM, clock: VirtualClock) -> None:
    m1, s1 = connect(hsm, clock, "one")
    m2, s2 = connect(hsm, clock, "two")
    assert code_of(lambda: m2.find_key(s2, "fresh", "private")) == "HSMFSM_NO_SUCH_KEY"
    public = m1.generate_keypair(s1, "RSA", 2048, "fresh")
    assert public.label == "fresh"
    key = m2.find_key(s2, "fresh", "private")
    signature = sign(m2, key)
    assert hsm.verify_signature("fresh", b"data", signature, "SHA256_RSA_PKCS")
    assert m1.verify(public, b"data", signature, m1.mechanism("SHA256_RSA_PKCS"), None)
    m1.generate_keypair(s1, "EC", 256, "fresh")  # same label again: now ambiguous
    assert code_of(lambda: m2.find_key(s2, "fresh", "private")) == "HSMFSM_MULTIPLE_OBJECTS"
    m3 = ScriptedModule(hsm, clock, "three")
    m3.initialize()
    s3 = m3.open_session(m3.find_token("tok"))
    assert code_of(lambda: m3.generate_keypair(s3, "RSA", 2048, "x")) == "CKR_USER_NOT_LOGGED_IN"


def test_calls_take_latency_and_are_logged(hsm: ScriptedHSM, clock: VirtualClock) -> None:
    m, s = connect(hsm, clock)
    assert [(c.instance, c.function, c.outcome) for c in hsm.calls] == [
        ("m", "initialize", "CKR_OK"), ("m", "find_token", "CKR_OK"), ("m", "open_session", "CKR_OK"),
        ("m", "login", "CKR_OK")]
    assert [c.at for c in hsm.calls] == pytest.approx([0.0005, 0.001, 0.0015, 0.002])
    assert clock.monotonic() == pytest.approx(0.002)
    m.prepare(5.0)
    m.stop()
    assert hsm.count("prepare") == hsm.count("stop") == 1
    assert clock.monotonic() == pytest.approx(0.002)  # local calls take no time
    assert code_of(lambda: ScriptedModule(hsm, clock, "cold").find_token("tok")) == "CKR_CRYPTOKI_NOT_INITIALIZED"
    assert hsm.count("find_token") == 2 and hsm.count("find_token", "CKR_CRYPTOKI_NOT_INITIALIZED") == 1


def test_slow_adds_latency(hsm: ScriptedHSM, clock: VirtualClock) -> None:
    m, s = connect(hsm, clock)
    key = m.find_key(s, "rsa", "private")

    def duration() -> float:
        t0 = clock.monotonic()
        sign(m, key)
        return clock.monotonic() - t0

    assert duration() == pytest.approx(0.0005)
    hsm.slow(0.3)
    assert duration() == pytest.approx(0.3005)
    hsm.slow(0)
    assert duration() == pytest.approx(0.0005)


def test_for_child_is_a_fresh_instance_on_the_same_hsm(hsm: ScriptedHSM, clock: VirtualClock) -> None:
    m, _ = connect(hsm, clock)
    child = m.for_child()
    assert isinstance(child, ScriptedModule) and child is not m and child.hsm is hsm
    assert not child.initialized and child.can_cut_off == m.can_cut_off
    assert child.initialize() == OK
    cs = child.open_session(child.find_token("tok"))
    assert child.session_state(cs) == (OK, 2)  # its own application: not logged in


# -- failures ----------------------------------------------------------------------------


def test_down_breaks_connected_instances_until_reinitialised(hsm: ScriptedHSM, clock: VirtualClock) -> None:
    m, s = connect(hsm, clock)
    key = m.find_key(s, "rsa", "private")
    token = m.find_token("tok")
    hsm.down()
    for call in (lambda: sign(m, key), lambda: m.find_token("tok"), lambda: m.open_session(token),
                 lambda: m.generate_random(s, 4), lambda: m.token_info(token)):
        assert code_of(call) == "CKR_DEVICE_ERROR"
    assert m.session_state(s) == (code_from_name("CKR_DEVICE_ERROR"), 0)
    assert m.login(s, PIN).name == "CKR_DEVICE_ERROR"
    hsm.up()
    assert code_of(lambda: sign(m, key)) == "CKR_DEVICE_ERROR"  # never recovers by itself
    assert m.initialize() == OK
    assert code_of(lambda: sign(m, key)) == "CKR_SESSION_HANDLE_INVALID"  # old handles are stale
    m2s = m.open_session(m.find_token("tok"))
    assert m.login(m2s, PIN) == OK
    assert hsm.verify_signature("rsa", b"data", sign(m, m.find_key(m2s, "rsa", "private")), "SHA256_RSA_PKCS")


def test_initialize_while_down_sees_no_token_until_reinitialised(hsm: ScriptedHSM, clock: VirtualClock) -> None:
    m, _ = connect(hsm, clock)
    token = m.find_token("tok")
    hsm.down()
    assert m.initialize() == OK  # p11-kit-client: no error, just no slots
    assert code_of(lambda: m.find_token("tok")) == "HSMFSM_NO_SUCH_TOKEN"
    assert code_of(lambda: m.open_session(token)) == "CKR_SLOT_ID_INVALID"
    hsm.up()
    assert code_of(lambda: m.find_token("tok")) == "HSMFSM_NO_SUCH_TOKEN"  # slots stay empty
    assert m.finalize() == OK and not m.initialized
    assert m.initialize() == OK
    assert code_of(lambda: m.find_token("tok")) == "CKR_OK"


def _in_thread(clock: VirtualClock, call: Callable[[], object], name: str = "caller") -> dict[str, Any]:
    """Run ``call`` in a clock thread; the dict gets its outcome and the virtual time it came back."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = call()
            result["code"] = "CKR_OK"
        except ModuleCallError as exc:
            result["code"] = exc.code.name
        result["at"] = clock.monotonic()

    result["thread"] = clock.start_thread(run, name)
    return result


def test_hang_then_cut_off_by_a_watchdog(hsm: ScriptedHSM, clock: VirtualClock) -> None:
    m, s = connect(hsm, clock)
    key = m.find_key(s, "rsa", "private")
    hsm.hang()
    started = clock.monotonic()
    result = _in_thread(clock, lambda: sign(m, key))
    cuts: list[tuple[float, tuple[int, int]]] = []

    def watchdog() -> None:  # the production watchdog's shape: 20 ms ticks, cut calls that overran 0.1 s
        while "at" not in result:
            clock.sleep(0.02)
            if clock.monotonic() - started > 0.1 and not cuts:
                cuts.append((clock.monotonic(), m.cut_off()))

    clock.start_thread(watchdog, "watchdog")
    result["thread"].join()
    assert result["code"] == "CKR_DEVICE_ERROR"
    assert len(cuts) == 1 and cuts[0][1] == (0, 1)
    assert result["at"] == cuts[0][0] and 0.1 < result["at"] <= 0.125
    hsm.resume()
    assert code_of(lambda: sign(m, key)) == "CKR_DEVICE_ERROR"  # broken until re-initialised
    assert m.initialize() == OK
    s2 = m.open_session(m.find_token("tok"))
    assert m.login(s2, PIN) == OK
    assert code_of(lambda: sign(m, m.find_key(s2, "rsa", "private"))) == "CKR_OK"


def test_hang_then_resume_completes_normally(hsm: ScriptedHSM, clock: VirtualClock) -> None:
    m, s = connect(hsm, clock)
    key = m.find_key(s, "rsa", "private")
    hsm.hang()
    result = _in_thread(clock, lambda: sign(m, key))
    other = _in_thread(clock, lambda: m.session_state(s), "prober")
    hsm.at(2.0, "resume")
    clock.sleep(1.9)
    assert "code" not in result and "code" not in other  # still blocked
    result["thread"].join()
    other["thread"].join()
    assert result["code"] == "CKR_OK" and result["at"] == 2.0
    assert hsm.verify_signature("rsa", b"data", result["value"], "SHA256_RSA_PKCS")
    assert other["value"] == (OK, 3)
    assert code_of(lambda: sign(m, key)) == "CKR_OK"


def test_initialize_hangs_too(hsm: ScriptedHSM, clock: VirtualClock) -> None:
    m = ScriptedModule(hsm, clock, "m")
    hsm.hang()
    first = _in_thread(clock, m.initialize)
    clock.sleep(1.0)
    assert "code" not in first
    assert m.cut_off() == (0, 1)
    first["thread"].join()
    assert first["value"].name == "CKR_DEVICE_ERROR" and first["at"] == 1.0
    assert not m.initialized
    assert code_of(lambda: m.find_token("tok")) == "CKR_CRYPTOKI_NOT_INITIALIZED"
    second = _in_thread(clock, m.initialize)
    hsm.at(3.0, hsm.resume)
    second["thread"].join()
    assert second["value"] == OK and second["at"] == 3.0 and m.initialized
    assert code_of(lambda: m.find_token("tok")) == "CKR_OK"


def test_down_while_hung_fails_the_stuck_call(hsm: ScriptedHSM, clock: VirtualClock) -> None:
    m, s = connect(hsm, clock)
    hsm.hang()
    result = _in_thread(clock, lambda: m.generate_random(s, 8))
    hsm.at(1.5, hsm.down)
    result["thread"].join()
    assert (result["code"], result["at"]) == ("CKR_DEVICE_ERROR", 1.5)


def test_a_module_that_cannot_cut_off_stays_stuck(hsm: ScriptedHSM, clock: VirtualClock) -> None:
    m = ScriptedModule(hsm, clock, "m", can_cut_off=False)
    assert m.initialize() == OK
    s = m.open_session(m.find_token("tok"))
    hsm.hang()
    hung_at = clock.monotonic()
    result = _in_thread(clock, lambda: m.generate_random(s, 8))
    clock.sleep(1.0)
    assert m.cut_off() == (0, 0)
    clock.sleep(1.0)
    assert "code" not in result
    hsm.resume()
    result["thread"].join()
    assert (result["code"], result["at"]) == ("CKR_OK", hung_at + 2.0)


def test_restart_drops_sessions_and_logins(hsm: ScriptedHSM, clock: VirtualClock) -> None:
    m, s = connect(hsm, clock)
    key = m.find_key(s, "rsa", "private")
    hsm.restart()
    assert hsm.state == "up"
    assert code_of(lambda: sign(m, key)) == "CKR_DEVICE_ERROR"
    assert m.session_state(s)[0].name == "CKR_DEVICE_ERROR"
    assert m.initialize() == OK
    assert m.session_state(s)[0].name == "CKR_SESSION_HANDLE_INVALID"
    assert code_of(lambda: sign(m, key)) == "CKR_SESSION_HANDLE_INVALID"
    assert m.close_session(s).name == "CKR_SESSION_HANDLE_INVALID"
    s2 = m.open_session(m.find_token("tok"))
    assert m.session_state(s2) == (OK, 2)
    assert m.login(s2, PIN) == OK
    assert m.session_state(s2) == (OK, 3)


def test_scripted_faults_then_healthy(hsm: ScriptedHSM, clock: VirtualClock) -> None:
    m, s = connect(hsm, clock)
    key = m.find_key(s, "rsa", "private")
    hsm.fail("sign", "CKR_DEVICE_MEMORY", times=2)
    assert [code_of(lambda: sign(m, key)) for _ in range(3)] == ["CKR_DEVICE_MEMORY", "CKR_DEVICE_MEMORY", "CKR_OK"]
    hsm.fail("session_state", "CKR_SESSION_CLOSED")
    assert m.session_state(s) == (code_from_name("CKR_SESSION_CLOSED"), 0)
    assert m.session_state(s) == (OK, 3)
    hsm.fail("generate_random", "CKR_GENERAL_ERROR", times=None)
    assert {code_of(lambda: m.generate_random(s, 1)) for _ in range(5)} == {"CKR_GENERAL_ERROR"}
    hsm.clear_faults()
    assert code_of(lambda: m.generate_random(s, 1)) == "CKR_OK"
    hsm.fail("initialize", "CKR_DEVICE_ERROR")
    assert m.initialize().name == "CKR_DEVICE_ERROR"
    assert not m.initialized
    assert m.initialize() == OK
    s2 = m.open_session(m.find_token("tok"))
    hsm.fail("login", "CKR_PIN_LOCKED")
    assert m.login(s2, PIN).name == "CKR_PIN_LOCKED"  # returned, not raised
    assert m.login(s2, PIN) == OK
    with pytest.raises(ValueError):
        hsm.fail("no_such_function", "CKR_DEVICE_ERROR")
    with pytest.raises(KeyError):
        hsm.fail("sign", "CKR_NO_SUCH_CODE")


def test_a_wrong_pin_is_rejected_once(clock: VirtualClock) -> None:
    hsm = ScriptedHSM("tok", pin="right", clock=clock, pin_retries=2)
    m = ScriptedModule(hsm, clock, "m")
    m.initialize()
    s = m.open_session(m.find_token("tok"))
    assert m.login(s, "wrong").name == "CKR_PIN_INCORRECT"
    assert hsm.count("login") == 1 and hsm.count("login", "CKR_PIN_INCORRECT") == 1
    assert m.session_state(s) == (OK, 2)
    assert code_of(lambda: m.find_key(s, "rsa", "private")) == "HSMFSM_NO_SUCH_KEY"
    assert m.login(s, "wrong").name == "CKR_PIN_INCORRECT"
    assert m.login(s, "right").name == "CKR_PIN_LOCKED"  # two wrong in a row locked it


def test_logout_all(hsm: ScriptedHSM, clock: VirtualClock) -> None:
    m, s = connect(hsm, clock)
    key = m.find_key(s, "rsa", "private")
    hsm.logout_all()
    assert m.session_state(s) == (OK, 2)
    assert code_of(lambda: sign(m, key)) == "CKR_USER_NOT_LOGGED_IN"
    assert m.login(s, PIN) == OK
    assert code_of(lambda: sign(m, key)) == "CKR_OK"


def test_at_schedules_a_fault_at_a_virtual_instant(hsm: ScriptedHSM, clock: VirtualClock) -> None:
    m, s = connect(hsm, clock)
    hsm.at(5.0, hsm.down)
    hsm.at(7.0, "up")
    clock.sleep(4.9)
    assert code_of(lambda: m.generate_random(s, 4)) == "CKR_OK"
    clock.sleep(0.2)
    assert hsm.state == "down"
    assert code_of(lambda: m.generate_random(s, 4)) == "CKR_DEVICE_ERROR"
    clock.sleep(2.0)
    assert hsm.state == "up" and clock.errors == []


def test_only_module_call_errors_escape(hsm: ScriptedHSM, clock: VirtualClock) -> None:
    """Every call, with live, stale and foreign objects, in every state: a result or ModuleCallError."""
    m, s = connect(hsm, clock)
    token, key, public = m.find_token("tok"), m.find_key(s, "rsa", "private"), m.find_key(s, "rsa", "public")
    mech = m.mechanism("SHA256_RSA_PKCS")
    calls: list[Callable[[], object]] = [
        lambda: m.sign(key, b"x", "bogus", None), lambda: m.find_token("tok"), lambda: m.open_session(token),
        lambda: m.close_session(s),
        lambda: m.login(s, PIN), lambda: m.session_state(s), lambda: m.token_info(token),
        lambda: m.find_key(s, "rsa", "public"), lambda: m.sign(key, b"x", mech, None),
        lambda: m.verify(public, b"x", b"sig", mech, None), lambda: m.decrypt(key, b"x", None, None),
        lambda: m.generate_random(s, 2), lambda: m.generate_keypair(s, "RSA", 2048, "k"),
        lambda: m.sign("not a key", b"x", mech, None), lambda: m.open_session("not a token"),
        lambda: m.session_state(object()), m.finalize, m.initialize,
    ]
    outcomes: set[str] = set()
    for script in (lambda: None, hsm.down, hsm.up, m.initialize, hsm.restart, m.finalize, hsm.logout_all):
        script()
        for call in calls:
            try:
                result = call()
            except ModuleCallError as exc:
                outcomes.add(exc.code.name)
            else:
                if isinstance(result, Code):
                    outcomes.add(result.name)
    assert {"CKR_DEVICE_ERROR", "CKR_SESSION_HANDLE_INVALID", "CKR_CRYPTOKI_NOT_INITIALIZED",
            "CKR_SLOT_ID_INVALID", "CKR_KEY_HANDLE_INVALID", "CKR_MECHANISM_INVALID", "CKR_OK"} <= outcomes


def _mini_connection(seed: int) -> list[tuple[float, str, str, str]]:
    """A small supervisor and watchdog on the Module and Clock shapes, through down, hang and restart."""
    with VirtualClock(seed=seed) as clock:
        hsm = ScriptedHSM("tok", pin=PIN, clock=clock, seed=seed)
        module: Module = ScriptedModule(hsm, clock, "member")
        stamp: list[float | None] = [None]

        def watched(call: Callable[[], Any]) -> Any:
            stamp[0] = clock.monotonic()
            try:
                return call()
            finally:
                stamp[0] = None

        def supervisor() -> None:
            session: Any = None
            backoff = 0.1
            while clock.monotonic() < 60.0:
                if session is None:
                    try:
                        if watched(module.initialize) != OK:
                            raise ModuleCallError(code_from_name("CKR_DEVICE_ERROR"))
                        session = watched(lambda: module.open_session(module.find_token("tok")))
                        assert watched(lambda s=session: module.login(s, PIN)) == OK
                        backoff = 0.1
                    except ModuleCallError:
                        session = None
                        clock.sleep(backoff * (1 + clock.random()))
                        backoff = min(backoff * 2, 2.0)
                    continue
                code, state = watched(lambda s=session: module.session_state(s))
                if code != OK or state != 3:
                    session = None
                    continue
                clock.sleep(1.0)

        def watchdog() -> None:
            while clock.monotonic() < 60.0:
                clock.sleep(0.02)
                started = stamp[0]
                if started is not None and clock.monotonic() - started > 0.5:
                    module.cut_off()

        clock.start_thread(supervisor, "supervisor")
        clock.start_thread(watchdog, "watchdog")
        hsm.at(10.0, "down")
        hsm.at(13.0, "up")
        hsm.at(20.0, "hang")
        hsm.at(30.0, "resume")
        hsm.at(40.0, "restart")
        clock.sleep(61.0)
        assert clock.errors == []
    return [(round(c.at, 9), c.instance, c.function, c.outcome) for c in hsm.calls]


def test_a_recovery_scenario_is_deterministic_and_fast() -> None:
    t0 = time.monotonic()
    first = _mini_connection(seed=2)
    assert first == _mini_connection(seed=2)
    assert time.monotonic() - t0 < 5.0
    assert first != _mini_connection(seed=3)  # the back-off's jitter comes from the clock's seed
    by_fn = [(fn, outcome) for _, _, fn, outcome in first]
    assert ("session_state", "CKR_DEVICE_ERROR") in by_fn  # the down, the cut hang and the restart all seen
    assert ("cut_off", "CKR_OK") in by_fn
    logins = [at for at, _, fn, outcome in first if fn == "login" and outcome == "CKR_OK"]
    assert len(logins) == 4  # the first, then once after each outage
    assert 13.0 < logins[1] < 16.0  # up at 13: back within the back-off
    assert 30.0 <= logins[2] < 33.0  # hung 20-30: reconnects keep hanging until the resume
    assert 40.0 < logins[3] < 41.0


def test_it_runs_on_the_system_clock_too() -> None:
    hsm = ScriptedHSM("tok", pin=PIN, latency=0.0, clock=SYSTEM)
    m = ScriptedModule(hsm, SYSTEM, "real")
    assert m.initialize() == OK
    s = m.open_session(m.find_token("tok"))
    assert m.login(s, PIN) == OK
    key = m.find_key(s, "ec", "private")
    assert hsm.verify_signature("ec", b"d", m.sign(key, b"d", m.mechanism("ECDSA"), None), "ECDSA")
