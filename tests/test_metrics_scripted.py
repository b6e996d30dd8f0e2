"""The Prometheus collector on ScriptedHSMs and a VirtualClock: the exposition, parsed back.

The real-token acceptance run (a member killed and restarted, scraped over HTTP) is in
tests/test_operations.py.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hsmfsm import AllMembersDown, OperationFailed
from hsmfsm.testing import VirtualClock

from scripted_helpers import MECH, PIN, guarded_clock, pool, replicas

prometheus_client = pytest.importorskip("prometheus_client")
from hsmfsm.metrics import PrometheusCollector, parse_address  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.timeout(20)
ROOT = Path(__file__).resolve().parent.parent

#: The metric set of issue 13 (family names as the parser gives them: counters without _total).
REQUIRED = {
    "hsmfsm_member_up": "gauge", "hsmfsm_member_state": "gauge",
    "hsmfsm_member_state_change_timestamp_seconds": "gauge", "hsmfsm_member_recovery_attempts": "gauge",
    "hsmfsm_member_sessions": "gauge", "hsmfsm_member_inflight_calls": "gauge",
    "hsmfsm_transitions": "counter", "hsmfsm_calls": "counter", "hsmfsm_call_duration_seconds": "histogram",
    "hsmfsm_member_errors": "counter", "hsmfsm_reissues": "counter", "hsmfsm_call_timeouts": "counter",
    "hsmfsm_audit_dropped_records": "counter", "hsmfsm_pool_serving_members": "gauge",
}


@pytest.fixture
def clock() -> Iterator[VirtualClock]:
    yield from guarded_clock()


def scrape(collector: PrometheusCollector) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """family -> {(sample name, sorted labels): value}, from the text exposition parsed back."""
    registry = prometheus_client.CollectorRegistry()
    registry.register(collector)
    text = prometheus_client.generate_latest(registry).decode()
    out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    types = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        out[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    out["__types__"] = types  # type: ignore[assignment]
    return out


def value(m: dict, family: str, sample: str | None = None, **labels: str) -> float:
    key = (sample or family, tuple(sorted(labels.items())))
    return m[family][key]


def test_importing_hsmfsm_does_not_need_prometheus_client() -> None:
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "import hsmfsm, hsmfsm.tools.cli, hsmfsm.runtime.systemd, hsmfsm.runtime.health\n"
            "try:\n    import hsmfsm.metrics\nexcept ImportError as exc:\n    print('refused:', exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "refused: hsmfsm.metrics needs prometheus_client: pip install 'hsmfsm[prometheus]'" in proc.stdout


def test_a_suspected_member_shows_in_a_gauge_a_counter_and_its_cut_off_calls(clock) -> None:
    from scripted_helpers import Caller

    hsms = replicas(clock, "hsm-a", "hsm-b")
    p = pool(clock, hsms, interval=1.0)
    collector = PrometheusCollector(p)
    with p:
        for i in range(6):
            p.sign("rsa", b"%d" % i, MECH)
        m = scrape(collector)
        assert value(m, "hsmfsm_member_suspected", pool="signer", member="hsm-a") == 0
        assert value(m, "hsmfsm_member_suspicions", "hsmfsm_member_suspicions_total", pool="signer",
                     member="hsm-a") == 0
        hsms["hsm-a"].hang()
        callers = [Caller(clock, lambda i=i: p.sign("rsa", b"h%d" % i, MECH)) for i in range(2)]
        assert all(c.join(1.0) and c.error is None for c in callers)  # one of them cut off on hsm-a, re-issued
        m = scrape(collector)
        assert value(m, "hsmfsm_member_suspected", pool="signer", member="hsm-a") == 1
        assert value(m, "hsmfsm_member_suspicions", "hsmfsm_member_suspicions_total", pool="signer",
                     member="hsm-a") == 1
        assert value(m, "hsmfsm_member_errors", "hsmfsm_member_errors_total", pool="signer", member="hsm-a",
                     ckr="HSMFSM_SUSPECTED", **{"class": "suspicion"}) >= 1
        hsms["hsm-a"].resume()
        clock.sleep(0.1)
        assert value(scrape(collector), "hsmfsm_member_suspected", pool="signer", member="hsm-a") == 0


def test_a_new_links_failure_and_the_links_logins_are_counted(clock) -> None:
    """hsm-a's one session held by a slow call, primary balance: the next call needs a new link, whose
    C_Login fails once (that link's alone: it goes to hsm-b); the one after sets a link up and logs in."""
    import dataclasses

    from scripted_helpers import Caller, policy

    base = policy(probe_interval=100.0)
    hsms = replicas(clock, "hsm-a", "hsm-b")
    p = pool(clock, hsms, dataclasses.replace(base, sessions=dataclasses.replace(base.sessions, max=3)),
             balance="primary")
    collector = PrometheusCollector(p)
    a = hsms["hsm-a"]
    with p:
        p.sign("rsa", b"warm", MECH)
        clock.sleep(0.01)
        member = p.member("hsm-a")
        logins = value(scrape(collector), "hsmfsm_member_link_logins", "hsmfsm_member_link_logins_total",
                       pool="signer", member="hsm-a")
        assert logins == member.links - 1
        a.slow(0.1)
        holders = [Caller(clock, lambda i=i: p.sign("rsa", b"held %d" % i, MECH)) for i in range(member.links)]
        clock.sleep(0.01)
        a.slow(0)
        a.fail("login", "CKR_GENERAL_ERROR", times=1)
        p.sign("rsa", b"needs a new link", MECH)
        p.sign("rsa", b"and another", MECH)
        assert all(c.join(1.0) and c.error is None for c in holders)
        m = scrape(collector)
        assert value(m, "hsmfsm_member_link_failures", "hsmfsm_member_link_failures_total", pool="signer",
                     member="hsm-a") == 1
        assert value(m, "hsmfsm_member_link_failures", "hsmfsm_member_link_failures_total", pool="signer",
                     member="hsm-b") == 0
        assert value(m, "hsmfsm_member_link_logins", "hsmfsm_member_link_logins_total", pool="signer",
                     member="hsm-a") == logins + 2  # the failed one and the next
        assert value(m, "hsmfsm_member_generation", pool="signer", member="hsm-a") == 1


def test_the_exposition_has_the_metric_set_every_state_and_counts_by_outcome(clock) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    p = pool(clock, hsms, interval=1.0)
    collector = PrometheusCollector(p)  # before open: the first connects are counted
    with p:
        for i in range(6):
            p.sign("rsa", b"%d" % i, MECH)
        with pytest.raises(OperationFailed):
            p.sign("no-such-key", b"x", MECH)
        m = scrape(collector)
        assert {name: m["__types__"][name] for name in REQUIRED} == REQUIRED
        for member in ("hsm-a", "hsm-b"):
            states = {dict(k[1])["state"]: v for k, v in m["hsmfsm_member_state"].items()
                      if dict(k[1])["member"] == member}
            assert states == {"disconnected": 0, "connecting": 0, "open": 0, "logged_in": 1, "degraded": 0,
                              "failed": 0}
            assert value(m, "hsmfsm_member_up", pool="signer", member=member) == 1
            assert value(m, "hsmfsm_member_sessions", pool="signer", member=member) == p.member(member).sessions >= 1
            assert value(m, "hsmfsm_call_timeouts", "hsmfsm_call_timeouts_total", pool="signer", member=member) == 0
            assert value(m, "hsmfsm_transitions", "hsmfsm_transitions_total", pool="signer", member=member,
                         **{"from": "open", "to": "logged_in", "event": "login_ok"}) == 1
            since = value(m, "hsmfsm_member_state_change_timestamp_seconds", pool="signer", member=member)
            assert since == p.member(member).since and since > 1_700_000_000
        assert value(m, "hsmfsm_calls", "hsmfsm_calls_total", pool="signer", op="sign", outcome="ok") == 6
        assert value(m, "hsmfsm_calls", "hsmfsm_calls_total", pool="signer", op="sign",
                     outcome="OperationFailed") == 1
        assert value(m, "hsmfsm_calls", "hsmfsm_calls_total", pool="signer", op="verify", outcome="ok") == 0
        assert value(m, "hsmfsm_call_duration_seconds", "hsmfsm_call_duration_seconds_count", pool="signer",
                     op="sign") == 7
        assert value(m, "hsmfsm_call_duration_seconds", "hsmfsm_call_duration_seconds_bucket", pool="signer",
                     op="sign", le="+Inf") == 7
        errors = {dict(k[1])["ckr"]: (dict(k[1])["class"], v) for k, v in m["hsmfsm_member_errors"].items()}
        assert errors == {"HSMFSM_NO_SUCH_KEY": ("caller", 1)}
        assert value(m, "hsmfsm_pool_serving_members", pool="signer") == 2
        assert value(m, "hsmfsm_pool_healthy", pool="signer") == 1
        assert value(m, "hsmfsm_audit_dropped_records", "hsmfsm_audit_dropped_records_total", pool="signer") == 0
        # A member lost: up 0, its state series move, the loss is counted, and the call that met it re-issued.
        hsms["hsm-a"].down()
        for i in range(4):
            p.sign("rsa", b"after %d" % i, MECH)
        m = scrape(collector)
        assert value(m, "hsmfsm_member_up", pool="signer", member="hsm-a") == 0
        assert value(m, "hsmfsm_member_state", pool="signer", member="hsm-a", state="logged_in") == 0
        assert value(m, "hsmfsm_transitions", "hsmfsm_transitions_total", pool="signer", member="hsm-a",
                     **{"from": "logged_in", "to": "disconnected", "event": "connection_lost"}) == 1
        assert value(m, "hsmfsm_reissues", "hsmfsm_reissues_total", pool="signer", op="sign") == 1
        assert value(m, "hsmfsm_member_errors", "hsmfsm_member_errors_total", pool="signer", member="hsm-a",
                     ckr="CKR_DEVICE_ERROR", **{"class": "transport"}) == 1
        assert value(m, "hsmfsm_member_calls", "hsmfsm_member_calls_total", pool="signer", member="hsm-a",
                     op="sign", outcome="MemberUnavailable") == 1
        assert value(m, "hsmfsm_calls", "hsmfsm_calls_total", pool="signer", op="sign", outcome="ok") == 10
        assert value(m, "hsmfsm_pool_serving_members", pool="signer") == 1
        assert value(m, "hsmfsm_pool_healthy", pool="signer") == 0
        assert value(m, "hsmfsm_member_recovery_attempts", pool="signer", member="hsm-a") >= 1
        assert value(m, "hsmfsm_member_recovery_max_attempts", pool="signer", member="hsm-a") == 6


def test_a_cut_off_call_and_all_members_down_are_counted(clock) -> None:
    hsms = replicas(clock, "hsm-a", "hsm-b")
    with pool(clock, hsms, max_attempts=None) as p:
        collector = PrometheusCollector(p)
        hsms["hsm-a"].hang()
        hsms["hsm-b"].down()
        with pytest.raises(AllMembersDown):
            p.sign("rsa", b"x", MECH)
        m = scrape(collector)
        timeouts = {dict(k[1])["member"]: v for k, v in m["hsmfsm_call_timeouts"].items()
                    if k[0] == "hsmfsm_call_timeouts_total"}
        assert timeouts["hsm-a"] >= 1 and timeouts["hsm-b"] == 0
        assert value(m, "hsmfsm_calls", "hsmfsm_calls_total", pool="signer", op="sign", outcome="AllMembersDown") == 1
        assert value(m, "hsmfsm_member_recovery_max_attempts", pool="signer", member="hsm-a") == float("inf")
        assert value(m, "hsmfsm_pool_serving_members", pool="signer") == 0
        hsms["hsm-a"].resume()


def test_two_pools_of_one_name_are_refused(clock) -> None:
    a = pool(clock, replicas(clock, "hsm-a"))
    b = pool(clock, replicas(clock, "hsm-b"))
    with pytest.raises(ValueError, match="names of their own"):
        PrometheusCollector(a, b)


def test_describe_does_not_read_the_pools(clock, monkeypatch) -> None:
    p = pool(clock, replicas(clock, "hsm-a"))
    collector = PrometheusCollector(p)
    monkeypatch.setattr(p, "status", lambda: pytest.fail("describe() read the pool"))
    names = {f.name for f in collector.describe()}
    assert set(REQUIRED) <= names and all(not f.samples for f in collector.describe())
    assert PIN  # the scripted PIN; the real-token test scans the exposition for the real one


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:9464", ("::1", 9464)), (":9464", ("127.0.0.1", 9464)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
])
def test_metrics_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9464", "host:", "host:port", "host:70000"])
def test_bad_metrics_addresses(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address(text)


def test_the_readme_alert_rules_use_metrics_the_collector_exposes(clock) -> None:
    import re

    import yaml

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(groups:\n.*?)```", readme, re.S)
    assert block, "the README's alert rules"
    rules = yaml.safe_load(block.group(1))["groups"][0]["rules"]
    assert [(r["alert"], r["labels"]["severity"], r.get("for")) for r in rules] == [
        ("HsmfsmNoMemberServes", "page", "1m"), ("HsmfsmPoolDegraded", "ticket", "10m"),
        ("HsmfsmMemberFailed", "ticket", None)]
    hsms = replicas(clock, "hsm-a", "hsm-b")
    with pool(clock, hsms, pins={"hsm-b": "999999"}) as p:
        m = scrape(PrometheusCollector(p))
        exposed = {name for family, samples in m.items() if family != "__types__" for (name, _) in samples}
        for rule in rules:
            used = set(re.findall(r"hsmfsm_[a-z_]+", rule["expr"]))
            assert used and used <= exposed, (rule["alert"], used - exposed)
        # And they say what they should, here: b failed (fires), fewer than all serve (fires), one serves.
        assert value(m, "hsmfsm_member_state", pool="signer", member="hsm-b", state="failed") == 1
        assert value(m, "hsmfsm_pool_serving_members", pool="signer") == 1 < value(m, "hsmfsm_pool_members",
                                                                                     pool="signer")
