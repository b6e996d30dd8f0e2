"""Prometheus metrics of HA pools: a custom collector for ``prometheus_client``.

::

    from prometheus_client import REGISTRY, start_http_server
    from hsmfsm.metrics import PrometheusCollector

    REGISTRY.register(PrometheusCollector(pool))
    start_http_server(9464, addr="127.0.0.1")

or :func:`serve_metrics` (what ``hsmfsm serve --metrics HOST:PORT`` runs). This
module needs ``prometheus_client`` (``pip install hsmfsm[prometheus]``);
``import hsmfsm`` does not.

State is read from each pool at scrape time (``Pool.status()``); transitions
and calls are counted by listeners registered when the collector is made
(``Pool.add_listener``, ``Pool.add_call_listener``). Labels are ``pool`` and
``member`` (and what a metric names); never a key label, a PIN or anything
of unbounded cardinality. Every state series of every member is present
(0 or 1), and the counters of the pool's operations, its re-issues and each
member's timeouts start at 0, so an alert never waits for a first event.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

try:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("hsmfsm.metrics needs prometheus_client: pip install 'hsmfsm[prometheus]'") from exc

from ..core.codes import SUSPECTED
from ..core.records import CallRecord, SuspicionRecord, TransitionRecord
from ..core.states import SERVING, Event, State
from ..runtime.pool import Pool

__all__ = ["BUCKETS", "POOL_OPERATIONS", "MetricsServer", "PrometheusCollector", "parse_address", "serve_metrics"]

#: The operations a pool call can be (``hsmfsm_calls_total`` starts at 0 for each).
POOL_OPERATIONS = ("sign", "verify", "decrypt", "generate_random", "generate_keypair")
#: Histogram buckets of call durations, in seconds: 1 ms to 30 s.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (``0.001``, ``30.0``, ``+Inf``)."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one: +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, n in zip((*BUCKETS, float("inf")), self.counts):
            total += n
            out.append((_le(bound), float(total)))
        return out


def _build_info() -> dict[str, str]:
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {"version": version("hsmfsm"), "python_pkcs11": version("python-pkcs11"),
            "cryptography": version("cryptography")}


class PrometheusCollector(Collector):
    """The metrics of one or more pools (each name once). Register it with a registry:
    ``REGISTRY.register(PrometheusCollector(pool))``.

    Counting starts when the collector is made: make it before the pool opens to count
    the first connects.
    """

    def __init__(self, *pools: Pool) -> None:
        names = [p.name for p in pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pools of one collector need names of their own: {', '.join(names)}")
        self._pools = pools
        self._info = _build_info()
        self._lock = threading.Lock()
        self._transitions: Counter[tuple[str, str, str, str, str]] = Counter()
        self._calls: Counter[tuple[str, str, str]] = Counter()
        self._member_calls: Counter[tuple[str, str, str, str]] = Counter()
        self._errors: Counter[tuple[str, str, str, str]] = Counter()
        self._reissues: Counter[tuple[str, str]] = Counter()
        self._timeouts: Counter[tuple[str, str]] = Counter()
        self._suspicions: Counter[tuple[str, str]] = Counter()
        self._duration: dict[tuple[str, str], _Histogram] = {}
        self._member_duration: dict[tuple[str, str, str], _Histogram] = {}
        for pool in pools:
            for op in POOL_OPERATIONS:
                self._calls[(pool.name, op, "ok")] = 0
                self._reissues[(pool.name, op)] = 0
                self._duration[(pool.name, op)] = _Histogram()
            for row in pool.status():
                self._timeouts[(pool.name, row.name)] = 0
                self._suspicions[(pool.name, row.name)] = 0
            pool.add_listener(_TransitionCounter(self, pool.name))
            pool.add_call_listener(self._on_call)
            pool.add_suspicion_listener(self._on_suspicion)

    # -- the listeners (never under a lock of hsmfsm's; each takes the collector's briefly) --

    def _on_transition(self, pool: str, r: TransitionRecord) -> None:
        with self._lock:
            self._transitions[(pool, r.member, str(r.source), str(r.dest), str(r.event))] += 1
            if r.event is Event.CALL_TIMEOUT:  # a caller's, a probe's, a login's or a connect's call
                self._timeouts[(pool, r.member)] += 1

    def _on_suspicion(self, r: SuspicionRecord) -> None:
        if r.kind == "suspected":
            with self._lock:
                self._suspicions[(r.pool, r.member)] += 1

    def _on_call(self, r: CallRecord) -> None:
        pool = r.pool or ""
        if r.kind == "call":
            with self._lock:
                self._calls[(pool, r.operation, r.outcome)] += 1
                h = self._duration.get((pool, r.operation))
                if h is None:
                    h = self._duration[(pool, r.operation)] = _Histogram()
                h.observe(r.seconds)
                if r.attempt > 1:
                    self._reissues[(pool, r.operation)] += r.attempt - 1
            return
        member = r.member or ""
        klass = self._class_of(pool, member, r.code_name) if r.code_name else None
        with self._lock:
            self._member_calls[(pool, member, r.operation, r.outcome)] += 1
            mh = self._member_duration.get((pool, member, r.operation))
            if mh is None:
                mh = self._member_duration[(pool, member, r.operation)] = _Histogram()
            mh.observe(r.seconds)
            if r.code_name and klass is not None:
                self._errors[(pool, member, r.code_name, klass)] += 1

    def _class_of(self, pool: str, member: str, code: str) -> str:
        """The policy class of a return code (``transport``, ``session``, ...), as the member's policy has it;
        ``suspicion`` for a call cut off because its member was suspected (no policy classifies that)."""
        if code == SUSPECTED.name:
            return "suspicion"
        for p in self._pools:
            if p.name == pool:
                try:
                    policy = p.member(member).policy
                except KeyError:
                    policy = p.policy
                return policy.codes.get(code, policy.default_class)
        return "unknown"

    # -- the scrape ------------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        """The families, without samples: registering does not read the pools."""
        return list(self._families(sampled=False))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(sampled=True))

    def _families(self, sampled: bool) -> Iterator[Metric]:
        pm = ["pool", "member"]
        g = {
            "build": GaugeMetricFamily("hsmfsm_build_info", "hsmfsm and the libraries it runs on (always 1)",
                                       labels=list(self._info)),
            "members": GaugeMetricFamily("hsmfsm_pool_members", "Members of the pool", labels=["pool"]),
            "active": GaugeMetricFamily("hsmfsm_pool_active_members", "Active (non-standby) members of the pool",
                                        labels=["pool"]),
            "serving": GaugeMetricFamily("hsmfsm_pool_serving_members",
                                         "Members that serve calls now (standbys included)", labels=["pool"]),
            "healthy": GaugeMetricFamily("hsmfsm_pool_healthy", "1 when every active member serves",
                                         labels=["pool"]),
            "info": GaugeMetricFamily("hsmfsm_member_info", "A member's role and isolation (always 1)",
                                      labels=[*pm, "role", "isolation"]),
            "up": GaugeMetricFamily("hsmfsm_member_up", "1 when the member serves calls (logged_in or degraded, "
                                    "not kept out by the replica check)", labels=pm),
            "state": GaugeMetricFamily("hsmfsm_member_state", "1 for the member's current state, 0 for the others",
                                       labels=[*pm, "state"]),
            "since": GaugeMetricFamily("hsmfsm_member_state_change_timestamp_seconds",
                                       "UNIX time the member entered its current state", labels=pm),
            "attempts": GaugeMetricFamily("hsmfsm_member_recovery_attempts",
                                          "Consecutive failed recovery attempts of the member", labels=pm),
            "max_attempts": GaugeMetricFamily("hsmfsm_member_recovery_max_attempts",
                                              "Attempts before the member gives up (+Inf: never)", labels=pm),
            "sessions": GaugeMetricFamily("hsmfsm_member_sessions", "Sessions open on the member", labels=pm),
            "inflight": GaugeMetricFamily("hsmfsm_member_inflight_calls", "Calls in progress on the member",
                                          labels=pm),
            "suspected": GaugeMetricFamily("hsmfsm_member_suspected", "1 while the pool suspects the member (it "
                                           "gets no new calls while another serves)", labels=pm),
            "generation": GaugeMetricFamily("hsmfsm_member_generation",
                                            "The member's session generation (one more after each loss)",
                                            labels=pm),
        }
        c = {
            "transitions": CounterMetricFamily("hsmfsm_transitions", "State changes of members",
                                               labels=[*pm, "from", "to", "event"]),
            "calls": CounterMetricFamily("hsmfsm_calls", "Calls of the pool by outcome (ok or the error class)",
                                         labels=["pool", "op", "outcome"]),
            "member_calls": CounterMetricFamily("hsmfsm_member_calls",
                                                "Attempts on each member by outcome (ok or the error class)",
                                                labels=[*pm, "op", "outcome"]),
            "errors": CounterMetricFamily("hsmfsm_member_errors",
                                          "Attempts that failed with a return code, by code and policy class",
                                          labels=[*pm, "ckr", "class"]),
            "reissues": CounterMetricFamily("hsmfsm_reissues", "Calls of the pool re-issued to another attempt",
                                            labels=["pool", "op"]),
            "timeouts": CounterMetricFamily("hsmfsm_call_timeouts",
                                            "PKCS#11 calls (a caller's, a probe's, a login's) the watchdog cut "
                                            "off at the call timeout, ending the member's session generation",
                                            labels=pm),
            "suspicions": CounterMetricFamily("hsmfsm_member_suspicions",
                                              "Times the pool suspected the member (operations.suspicion)",
                                              labels=pm),
            "link_logins": CounterMetricFamily("hsmfsm_member_link_logins",
                                               "C_Login calls made by the member's further links (one per link "
                                               "set up; the member's own login is not counted)", labels=pm),
            "link_failures": CounterMetricFamily("hsmfsm_member_link_failures",
                                                 "New links of the member whose set-up failed while its other "
                                                 "links served (each that link's alone: no state change)",
                                                 labels=pm),
            "dropped": CounterMetricFamily("hsmfsm_audit_dropped_records",
                                           "Transition records the audit record could not keep", labels=["pool"]),
        }
        h = {
            "duration": HistogramMetricFamily("hsmfsm_call_duration_seconds",
                                              "Duration of pool calls as the application sees them (failover "
                                              "included)", labels=["pool", "op"]),
            "member_duration": HistogramMetricFamily("hsmfsm_member_call_duration_seconds",
                                                     "Duration of each attempt on a member", labels=[*pm, "op"]),
        }
        if sampled:
            self._sample(g, c, h)
        yield from g.values()
        yield from c.values()
        yield from h.values()

    def _sample(self, g: dict[str, GaugeMetricFamily], c: dict[str, CounterMetricFamily],
                h: dict[str, HistogramMetricFamily]) -> None:
        g["build"].add_metric(list(self._info.values()), 1)
        for pool in self._pools:
            rows = pool.status()
            p = pool.name
            up = {r.name: r.state in SERVING and r.error is None for r in rows}
            g["members"].add_metric([p], len(rows))
            g["active"].add_metric([p], sum(r.role == "active" for r in rows))
            g["serving"].add_metric([p], sum(up.values()))
            g["healthy"].add_metric([p], float(all(up[r.name] for r in rows if r.role == "active")))
            for r in rows:
                labels = [p, r.name]
                conn = pool.member(r.name)
                g["info"].add_metric([*labels, r.role, r.isolation], 1)
                g["up"].add_metric(labels, float(up[r.name]))
                for state in State:
                    g["state"].add_metric([*labels, str(state)], float(r.state == state))
                g["since"].add_metric(labels, r.since if r.since is not None else float("nan"))
                g["attempts"].add_metric(labels, r.recovery_attempts)
                g["max_attempts"].add_metric(labels, float("inf") if r.max_attempts is None else r.max_attempts)
                g["sessions"].add_metric(labels, r.sessions)
                g["inflight"].add_metric(labels, r.inflight)
                g["suspected"].add_metric(labels, float(r.suspected))
                g["generation"].add_metric(labels, conn.generation)
                c["link_logins"].add_metric(labels, conn.link_logins)
                c["link_failures"].add_metric(labels, conn.link_failures)
            c["dropped"].add_metric([p], pool.audit.lost if pool.audit is not None else 0)
        with self._lock:
            for key, n in sorted(self._transitions.items()):
                c["transitions"].add_metric(list(key), n)
            for key3, n in sorted(self._calls.items()):
                c["calls"].add_metric(list(key3), n)
            for key4, n in sorted(self._member_calls.items()):
                c["member_calls"].add_metric(list(key4), n)
            for key4, n in sorted(self._errors.items()):
                c["errors"].add_metric(list(key4), n)
            for key2, n in sorted(self._reissues.items()):
                c["reissues"].add_metric(list(key2), n)
            for key2, n in sorted(self._timeouts.items()):
                c["timeouts"].add_metric(list(key2), n)
            for key2, n in sorted(self._suspicions.items()):
                c["suspicions"].add_metric(list(key2), n)
            for key2, hist in sorted(self._duration.items()):
                h["duration"].add_metric(list(key2), hist.buckets(), hist.sum)
            for key3, hist in sorted(self._member_duration.items()):
                h["member_duration"].add_metric(list(key3), hist.buckets(), hist.sum)


class _TransitionCounter:
    """A transition listener that counts for one pool of a collector."""

    __slots__ = ("collector", "pool")

    def __init__(self, collector: PrometheusCollector, pool: str) -> None:
        self.collector, self.pool = collector, pool

    def __call__(self, record: TransitionRecord) -> None:
        self.collector._on_transition(self.pool, record)

    def __repr__(self) -> str:
        return f"<hsmfsm metrics transition counter of pool {self.pool}>"


# -- the HTTP endpoint -------------------------------------------------------------------------


@dataclass
class MetricsServer:
    """A running metrics endpoint (:func:`serve_metrics`); :meth:`close` stops it."""

    host: str
    port: int
    registry: CollectorRegistry
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_metrics(pools: Pool | Sequence[Pool], host: str = "127.0.0.1", port: int = 9464) -> MetricsServer:
    """Serve the metrics of ``pools`` over HTTP at ``http://HOST:PORT/metrics`` from a thread of its own
    (``port`` 0: any free port; the handle's ``port`` says which), on a registry of its own that
    holds only hsmfsm's collector. Bind to loopback unless a scraper elsewhere needs it."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(PrometheusCollector(*([pools] if isinstance(pools, Pool) else pools)))
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(host, int(server.server_address[1]), registry, server, thread)


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6; ``:9464`` for loopback) as ``serve --metrics`` takes it."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "127.0.0.1", int(port)
