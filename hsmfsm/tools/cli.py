"""The ``hsmfsm`` command: check policies, run the demo, run the benchmark.

Every subcommand turns hsmfsm's own errors into a one-line message and an
exit code; a traceback is a bug.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..audit.diagram import DiagramError
from ..audit.record import AuditError
from ..core.errors import HSMError
from ..core.policy import PolicyError
from ..runtime.server import ServeError


def _check(args: argparse.Namespace) -> int:
    from ..config.check import check_any_files

    return check_any_files(args.files, strict=args.strict)


def _status(args: argparse.Namespace) -> int:
    import json

    from ..runtime.pool import Pool, format_status

    if args.server:
        return _server_status(args.server, args.json)
    if not args.pool:
        print("hsmfsm status: give a pool file, or --server SOCKET", file=sys.stderr)
        return 2

    with Pool.from_yaml(args.pool) as pool:
        if args.json:
            print(json.dumps({"pool": pool.name, "members": [s.as_dict() for s in pool.status()]}, indent=2))
        else:
            print(format_status(pool))
        serving = any(s.state in ("logged_in", "degraded") for s in pool.status())
    return 0 if serving else 1


def _server_status(path: str, as_json: bool) -> int:
    import json

    from ..runtime.server import query_status

    state = query_status(path)
    if as_json:
        print(json.dumps(state, indent=2))
    else:
        print(f"server {state['address']}: pool {state['pool']}, token {state['token_label']!r}, "
              f"up {state['uptime_seconds']} s")
        for m in state["members"]:
            code = f" last {m['last_code']}" if m.get("last_code") else ""
            print(f"  member {m['name']:<16} {m['role']:<8} {m['state']:<12}{code}")
        print(f"  applications: {len(state['applications'])} (refused {state['refused_connections']})")
        for app in state["applications"]:
            print(f"    uid {app['uid']} pid {app['pid']}: {app['sessions']} sessions, "
                  f"{'logged in' if app['logged_in'] else 'not logged in'}, {app['requests']} requests")
    serving = any(m["state"] in ("logged_in", "degraded") for m in state["members"])
    return 0 if serving else 1


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from ..config.pool_file import load_pool
    from ..runtime import server as serving
    from ..runtime.pool import Pool
    from ..runtime.systemd import Notifier

    spec = load_pool(args.pool)
    if spec.serve is None:
        print(f"hsmfsm serve: {spec.source} has no 'serve:' section (socket, token_label, pin); "
              "see the pool schema", file=sys.stderr)
        return 2
    metrics_at = None
    if args.metrics:
        from ..metrics import parse_address

        metrics_at = parse_address(args.metrics)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    notifier = Notifier.from_environment()
    pool = Pool.from_spec(spec)
    notifier.attach(pool)
    metrics = None
    try:
        pool.open(wait=args.wait)
        server = serving.from_spec(pool, spec.serve, socket_path=args.socket).start()
        try:
            if metrics_at is not None:
                from ..metrics import serve_metrics

                metrics = serve_metrics(pool, *metrics_at)
            print(f"P11_KIT_SERVER_ADDRESS={server.address}", flush=True)
            notifier.ready()
            notifier.start_watchdog()
            stop.wait()
            notifier.stopping()
        finally:
            server.stop()
            if metrics is not None:
                metrics.close()
    finally:
        pool.close()
        notifier.close()
    return 0


def _health(args: argparse.Namespace) -> int:
    from .health import run

    return run(args.pool, as_json=args.json, sign_test_label=args.sign_test, wait=args.wait)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(speed=args.speed, keep=args.keep, outdir=args.out)


def _bench(args: argparse.Namespace) -> int:
    from .bench import run

    run(rounds=args.rounds, seconds=args.seconds)
    return 0


def _soak(args: argparse.Namespace) -> int:
    from .soak import run

    return run(duration=args.duration, threads=args.threads, seed=args.seed, members=args.members,
               json_path=args.json, isolation=args.isolation)


def _simulate(args: argparse.Namespace) -> int:
    from .simulate import main as simulate

    return simulate(args.scenario, json=args.json)


def _diagram(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..audit import diagram
    from ..config.policy_file import load_policy, shipped_policies
    from ..config.pool_file import is_pool_file, load_pool, shipped_pools

    if args.all:
        outdir = Path(args.all)
        outdir.mkdir(parents=True, exist_ok=True)
        for name in shipped_policies():
            for ext in ("dot", "svg"):
                print(diagram.write(load_policy(name), outdir / f"{name}.{ext}"))
        for name in shipped_pools():
            spec = load_pool(name, environment=False)  # ${VAR}s are not drawn
            for ext in ("dot", "svg"):
                print(diagram.write_pool(spec, outdir / f"{name}.{ext}"))
        return 0
    target = args.live or args.source
    if not target or not args.output:
        print("hsmfsm diagram: give POLICY_OR_POOL -o FILE, --live POOL -o FILE, or --all DIR", file=sys.stderr)
        return 2
    if args.live:
        # The one place a diagram touches HSMs: connect here, and hand the drawing plain status rows.
        from ..runtime.pool import Pool

        spec = load_pool(args.live)
        with Pool.from_spec(spec) as pool:
            status = pool.status()
        print(diagram.write_pool(spec, args.output, status))
    elif is_pool_file(target) or target in shipped_pools():
        print(diagram.write_pool(load_pool(target, environment=False), args.output))
    else:
        print(diagram.write(load_policy(target), args.output))
    return 0


def _audit(args: argparse.Namespace) -> int:
    from ..audit import record as audit

    if args.action == "verify":
        verdict = audit.verify(args.logs, partial=args.partial)
        print(verdict, file=sys.stdout if verdict.ok else sys.stderr)
        for note in verdict.notes:
            print(f"  note: {note}")
        return 0 if verdict.ok else 1
    since = audit.parse_since(args.since) if args.since else None
    shown = 0
    for line in audit.timeline(args.logs, member=args.member, since=since):
        print(line)
        shown += 1
    if not shown:
        print("(no records match)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hsmfsm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every transition to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate policy and pool files; exit 2 if any is broken")
    p.add_argument("files", nargs="+")
    p.add_argument("--strict", action="store_true",
                   help="an unset ${VAR} in a pool file is an error, as when the pool is loaded "
                        "(default: a warning on stderr); for checks at deploy time")
    p.set_defaults(fn=_check)
    p = sub.add_parser("status", help="connect to a pool and print each member's state, like an HA group display")
    p.add_argument("pool", nargs="?", help="a pool file")
    p.add_argument("--server", metavar="SOCKET", help="ask a running 'hsmfsm serve' on SOCKET instead: its members "
                                                      "and connected applications")
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    p.set_defaults(fn=_status)
    p = sub.add_parser("serve", help="serve the pool as one virtual PKCS#11 slot to applications that load the "
                                     "stock p11-kit-client.so (P11_KIT_SERVER_ADDRESS)")
    p.add_argument("pool", help="a pool file with a 'serve:' section")
    p.add_argument("--socket", metavar="PATH", help="listen here instead of serve.socket")
    p.add_argument("--wait", type=float, default=10.0,
                   help="seconds to wait for the members at start (the server starts anyway; default 10)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="also serve Prometheus metrics at http://HOST:PORT/metrics (needs hsmfsm[prometheus])")
    p.set_defaults(fn=_serve)
    p = sub.add_parser("health", help="check a pool: exit 0 when every active member serves, 1 when fewer do, "
                                      "2 when none does or a member failed, 3 when the file is unusable")
    p.add_argument("pool", help="a pool file (its audit record is left to the daemon that runs the pool)")
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    p.add_argument("--sign-test", metavar="LABEL",
                   help="also sign and verify with the key LABEL (a dedicated test key) on each serving member")
    p.add_argument("--wait", type=float, metavar="SECONDS",
                   help="how long to wait for the members to serve (default: the policy's deadline)")
    p.set_defaults(fn=_health)
    p = sub.add_parser("demo", help="sign through a two-member HA pool while its HSMs are killed, hung and restarted")
    p.add_argument("--speed", type=float, default=1.0, help="script time factor (<1 is faster)")
    p.add_argument("--keep", action="store_true", help="keep the output folder (diagrams, audit record, pool file)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: a new temporary folder)")
    p.set_defaults(fn=_demo)
    p = sub.add_parser("bench", help="managed vs raw python-pkcs11 sign throughput, side by side")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=0.5, help="length of one round")
    p.set_defaults(fn=_bench)
    p = sub.add_parser("soak", help="bounded chaos run: sign through an HA pool while its HSMs fail; tally")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of signing under faults (default 120)")
    p.add_argument("--threads", type=int, default=4, help="signing threads (default 4)")
    p.add_argument("--seed", type=int, default=1, help="seed of the fault schedule (default 1)")
    p.add_argument("--members", type=int, choices=(2, 3), default=3, help="active members (default 3)")
    p.add_argument("--json", metavar="FILE", help="also write the tally as JSON to FILE")
    p.add_argument("--isolation", choices=("none", "process"), default="none",
                   help="where the active members' modules run (default none; process: in host processes)")
    p.set_defaults(fn=_soak)
    p = sub.add_parser("simulate", help="what-if: run a scenario's faults against a policy or pool on virtual "
                                        "time, with no HSM; print the timeline, failed calls, recovery and tally")
    p.add_argument("scenario", metavar="SCENARIO",
                   help="a scenario file (hsmfsm/config/scenario.schema.json), or a shipped scenario's name")
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    p.set_defaults(fn=_simulate)
    p = sub.add_parser("diagram", help="draw the slot machine under a policy, or a pool (.dot, .svg, .png)")
    p.add_argument("source", nargs="?", metavar="POLICY_OR_POOL",
                   help="a policy or pool file, or a shipped policy's or pool's name")
    p.add_argument("-o", "--output", help="output file; the format comes from the extension")
    p.add_argument("--live", metavar="POOL", help="connect to the pool and highlight each member's current state")
    p.add_argument("--all", metavar="DIR", help="write DOT and SVG for every shipped policy and pool into DIR")
    p.set_defaults(fn=_diagram)
    p = sub.add_parser("audit", help="check or read the transition record")
    audit_sub = p.add_subparsers(dest="action", required=True)
    a = audit_sub.add_parser("verify", help="exit 0 if the SHA-256 chain holds, else 1 naming the first bad line")
    a.add_argument("logs", nargs="+", metavar="LOG", help="the log and its rotated files, in any order")
    a.add_argument("--partial", action="store_true", help="the oldest rotated files were deleted: "
                   "accept a chain that starts after its first record")
    a.set_defaults(fn=_audit)
    a = audit_sub.add_parser("show", help="print the transitions as a readable timeline")
    a.add_argument("logs", nargs="+", metavar="LOG")
    a.add_argument("--member", help="only this member's records")
    a.add_argument("--since", help="only records from this time on: ISO 8601 (UTC) or an age such as 10m, 2h")
    a.set_defaults(fn=_audit)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(asctime)s %(name)s %(message)s")
    try:
        status: int = args.fn(args)
        return status
    except (PolicyError, HSMError, DiagramError, AuditError, ServeError, ValueError, OSError) as exc:
        print(f"hsmfsm: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
