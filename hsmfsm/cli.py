"""The ``hsmfsm`` command: check policies, run the demo, run the benchmark.

Every subcommand turns hsmfsm's own errors into a one-line message and an
exit code; a traceback is a bug.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .diagram import DiagramError
from .errors import HSMError
from .policy import PolicyError


def _check(args: argparse.Namespace) -> int:
    from .pool_config import check_any_files

    return check_any_files(args.files)


def _status(args: argparse.Namespace) -> int:
    import json

    from .pool import Pool, format_status

    with Pool.from_yaml(args.pool) as pool:
        if args.json:
            print(json.dumps({"pool": pool.name, "members": [s.as_dict() for s in pool.status()]}, indent=2))
        else:
            print(format_status(pool))
        serving = any(s.state in ("logged_in", "degraded") for s in pool.status())
    return 0 if serving else 1


def _demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(speed=args.speed)


def _bench(args: argparse.Namespace) -> int:
    from .bench import run

    run(rounds=args.rounds, seconds=args.seconds)
    return 0


def _diagram(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import diagram
    from .policy_loader import load_policy, shipped_policies

    if args.all:
        outdir = Path(args.all)
        outdir.mkdir(parents=True, exist_ok=True)
        for name in shipped_policies():
            policy = load_policy(name)
            for ext in ("dot", "svg"):
                print(diagram.write(policy, outdir / f"{name}.{ext}"))
        return 0
    if not args.policy or not args.output:
        print("hsmfsm diagram: give POLICY -o FILE, or --all DIR", file=sys.stderr)
        return 2
    print(diagram.write(load_policy(args.policy), args.output))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hsmfsm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every transition to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate policy and pool files; exit 2 if any is broken")
    p.add_argument("files", nargs="+")
    p.set_defaults(fn=_check)
    p = sub.add_parser("status", help="connect to a pool and print each member's state, like an HA group display")
    p.add_argument("pool", help="a pool file")
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    p.set_defaults(fn=_status)
    p = sub.add_parser("demo", help="sign through a network HSM that is killed, hung and restarted")
    p.add_argument("--speed", type=float, default=1.0, help="script time factor (<1 is faster)")
    p.set_defaults(fn=_demo)
    p = sub.add_parser("bench", help="managed vs raw python-pkcs11 sign throughput, side by side")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=0.5, help="length of one round")
    p.set_defaults(fn=_bench)
    p = sub.add_parser("diagram", help="draw the slot machine under a policy (.dot, .svg, .png)")
    p.add_argument("policy", nargs="?", help="a policy file or a shipped policy's name")
    p.add_argument("-o", "--output", help="output file; the format comes from the extension")
    p.add_argument("--all", metavar="DIR", help="write DOT and SVG for every shipped policy into DIR")
    p.set_defaults(fn=_diagram)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(asctime)s %(name)s %(message)s")
    try:
        return args.fn(args)
    except (PolicyError, HSMError, DiagramError) as exc:
        print(f"hsmfsm: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
