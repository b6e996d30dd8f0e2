"""How often a new link to SoftHSM behind `p11-kit server` fails its set-up while others are set up.

Each of THREADS threads re-sets up its own p11-kit-client instance over and over for SECONDS:
C_Initialize, the token by label, a session, and (unless --no-login) C_Login. Prints the count of
set-ups that went through and of those that failed, by step and error. docs/FACTS.md has the figures.

    .venv/bin/python scripts/measure_link_setups.py 4 8
    .venv/bin/python scripts/measure_link_setups.py 4 8 --no-login
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import threading
import time
from pathlib import Path

from hsmfsm.p11.module import ModuleInstance
from hsmfsm.testing.lab.hsm import NetworkHSM, SoftHSMToken, find_module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("threads", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("--no-login", action="store_true", help="set links up without C_Login")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hsmfsm-links-"))
    token = SoftHSMToken(root / "token", label="links").provision()
    hsm = NetworkHSM(token, root / "hsm.sock").start()
    client = find_module("p11-kit-client")
    failed: collections.Counter[tuple[str, str]] = collections.Counter()
    done = [0]
    lock = threading.Lock()
    stop = time.monotonic() + args.seconds

    def work(i: int) -> None:
        instance = ModuleInstance(client, hsm.client_env, f"link-{i}")
        while time.monotonic() < stop:
            step = "C_Initialize"
            try:
                code = instance.initialize()
                if code.value:
                    raise RuntimeError(code.name)
                step = "token"
                session = instance.lib.get_token(token_label=token.label).open(rw=True)
                if not args.no_login:
                    step = "C_Login"
                    code = instance.login(session.handle, token.pin)
                    if code.value:
                        raise RuntimeError(code.name)
                with lock:
                    done[0] += 1
            except Exception as exc:  # counted: the figure this script is for
                with lock:
                    failed[(step, f"{type(exc).__name__} {exc}"[:80])] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    hsm.kill()
    print(f"{done[0]} set up, {sum(failed.values())} failed ({args.threads} threads, {args.seconds:g} s, "
          f"{'no login' if args.no_login else 'with C_Login'})")
    for (step, error), n in failed.most_common():
        print(f"{n:6d}  {step:13s} {error}")


if __name__ == "__main__":
    main()
