"""The pool the soak signs through: its policy, its members and the PINs they read."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from ...config.policy_file import load_policy
from ...core.policy import Policy
from ...core.records import TransitionRecord
from ...runtime.connection import SlotConnection
from ...runtime.pool import Pool
from ...testing.lab import find_module
from .lab import WRONG, Lab

PIN_ENV = "HSMFSM_SOAK_PIN"
WRONG_PIN_ENV = "HSMFSM_SOAK_WRONG_PIN"
#: Seconds between background recovery attempts of a member.
RECOVERY_INTERVAL = 0.5


def soak_policy(call_timeout: float = 1.0, deadline: float = 6.0) -> Policy:
    """The shipped network-hsm policy with the test suite's short timings."""
    p = load_policy("network-hsm")
    return dataclasses.replace(
        p,
        operations=dataclasses.replace(p.operations, call_timeout=call_timeout, deadline=deadline),
        probe=dataclasses.replace(p.probe, interval=0.2),
        connect=dataclasses.replace(p.connect, backoff=dataclasses.replace(p.connect.backoff, initial=0.05, max=0.4)),
    )


class PinEnvironment:
    """The two environment variables the members read their PINs from; :meth:`restore` puts back
    what they held when this was made."""

    def __init__(self) -> None:
        self._saved = {k: os.environ.get(k) for k in (PIN_ENV, WRONG_PIN_ENV)}

    def set(self, pin: str, wrong_pin: str) -> None:
        os.environ[PIN_ENV] = pin
        os.environ[WRONG_PIN_ENV] = wrong_pin

    def restore(self) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_pool(lab: Lab, token_label: str, policy: Policy, isolation: str,
               listener: Callable[[TransitionRecord], None]) -> Pool:
    """The pool over the lab, not opened yet: one active member per relay (``isolation`` applies to
    them), and the standby on its own server, reading the wrong PIN. Background recovery, no cap."""
    assert lab.wrong is not None
    member_policy = Pool.member_policy(policy, "background", RECOVERY_INTERVAL, None)
    client = find_module("p11-kit-client")
    conns = [(SlotConnection(module=client, token_label=token_label, pin=f"env:{PIN_ENV}", policy=member_policy,
                             name=m.name, env={"P11_KIT_SERVER_ADDRESS": m.relay.address}, probe=True,
                             wait_for_recovery=False, auto_recover=True, isolation=isolation), False)
             for m in lab.members]
    conns.append((SlotConnection(module=client, token_label=token_label, pin=f"env:{WRONG_PIN_ENV}",
                                 policy=member_policy, name=WRONG, env=lab.wrong.client_env, probe=True,
                                 wait_for_recovery=False, auto_recover=True), True))
    pool = Pool("soak", conns, policy, recovery_mode="background", recovery_interval=RECOVERY_INTERVAL,
                recovery_max_attempts=None)
    pool.add_listener(listener)
    return pool
