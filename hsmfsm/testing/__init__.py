"""Test doubles for the runtime's edge: virtual time and a scripted HSM.

:class:`VirtualClock` (the :class:`~hsmfsm.runtime.edge.Clock` shape) runs the
runtime's threads one at a time on virtual time, deterministically;
:class:`ScriptedModule` (the :class:`~hsmfsm.runtime.edge.Module` shape) talks
to a :class:`ScriptedHSM` that fails the way a network HSM behind
p11-kit-client fails (docs/FACTS.md). Together they let a ``SlotConnection``
or a ``Pool`` be tested, and simulated, on virtual time.

The real-parts lab (SoftHSM, p11-kit server, the relay) is
:mod:`hsmfsm.testing.lab`; it is not imported from here.
"""

from .clock import ThreadFailure, VirtualClock, VirtualClockClosed, VirtualClockError, VirtualDeadlock
from .scripted import Call, ScriptedHSM, ScriptedKey, ScriptedMechanism, ScriptedModule, ScriptedSession, ScriptedToken

__all__ = [
    "Call", "ScriptedHSM", "ScriptedKey", "ScriptedMechanism", "ScriptedModule", "ScriptedSession", "ScriptedToken",
    "ThreadFailure", "VirtualClock", "VirtualClockClosed", "VirtualClockError", "VirtualDeadlock",
]
