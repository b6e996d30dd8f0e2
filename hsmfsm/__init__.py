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

from .config.pin import PinError
from .config.policy_file import load_policy
from .config.pool_file import PoolSpec, load_pool
from .core.codes import Code
from .core.errors import (
    AllMembersDown,
    CallTimeout,
    HSMError,
    KeyNotFound,
    LoginRejected,
    MechanismNotSupported,
    MemberUnavailable,
    NotExtractable,
    OperationFailed,
    OutcomeUnknown,
)
from .core.policy import Policy, PolicyError
from .core.records import CallRecord, SuspicionRecord, TransitionRecord
from .core.states import Event, IllegalTransition, State
from .p11.codes import code_of
from .runtime.aio import AsyncPool, WorkersBusy
from .runtime.connection import SlotConnection
from .runtime.health import PoolHealth
from .runtime.pool import MemberStatus, Pool

__all__ = [
    "AllMembersDown", "AsyncPool", "CallTimeout", "Code", "Event", "HSMError", "IllegalTransition", "KeyNotFound",
    "LoginRejected", "MechanismNotSupported", "MemberStatus", "MemberUnavailable", "NotExtractable",
    "OperationFailed", "OutcomeUnknown", "PinError", "Policy", "PolicyError", "Pool", "PoolSpec", "SlotConnection",
    "State", "TransitionRecord", "WorkersBusy", "code_of", "load_policy", "load_pool",
]
# Operations (issue 13): the call hook's record and Pool.health()'s answer.
__all__ += ["CallRecord", "PoolHealth"]
# Performance under faults (issue 12): what Pool.add_suspicion_listener is given.
__all__ += ["SuspicionRecord"]
