"""hsmfsm: PKCS#11 slot connections as explicit state machines, recovered by YAML policies.

The public API::

    import hsmfsm
    policy = hsmfsm.load_policy("policies/network-hsm.yaml")
    with hsmfsm.SlotConnection(module=..., token_label="hsm-a", pin="env:HSM_PIN",
                               policy=policy, name="hsm-a", env={...}) as conn:
        conn.sign("zsk", b"data", mechanism="SHA256_RSA_PKCS")

    with hsmfsm.Pool.from_yaml("pool.yaml") as pool:   # several HSMs, one virtual session
        pool.sign("zsk", b"data", mechanism="SHA256_RSA_PKCS")
"""

from .codes import Code, code_of
from .connection import SlotConnection
from .errors import (AllMembersDown, CallTimeout, HSMError, LoginRejected, MemberUnavailable, OperationFailed,
                     OutcomeUnknown)
from .pin import PinError
from .policy import Policy, PolicyError
from .policy_loader import load_policy
from .pool import MemberStatus, Pool
from .pool_config import PoolSpec, load_pool
from .records import TransitionRecord
from .states import Event, IllegalTransition, State

__all__ = [
    "AllMembersDown", "CallTimeout", "Code", "Event", "HSMError", "IllegalTransition", "LoginRejected", "MemberStatus",
    "MemberUnavailable", "OperationFailed", "OutcomeUnknown", "PinError", "Policy", "PolicyError", "Pool",
    "PoolSpec", "SlotConnection", "State", "TransitionRecord", "code_of", "load_policy", "load_pool",
]
