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
    from .policy_loader import check_files

    return check_files(args.files)


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
    p = sub.add_parser("check", help="validate policy files; exit 2 on the first broken one")
    p.add_argument("files", nargs="+")
    p.set_defaults(fn=_check)
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
