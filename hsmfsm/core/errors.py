"""What callers catch. Every error names the member, the state and the return code.

No message ever contains a PIN: errors are built from member names, states
and return codes only.
"""

from __future__ import annotations

from .codes import Code


class HSMError(Exception):
    """Base of the errors a slot connection raises to its caller."""

    #: May the operation go again elsewhere (an HA pool reads these)? Set from the code's class.
    reissue: bool = False
    #: Might the HSM have acted before the error? Then a non-idempotent operation must not go again.
    may_have_acted: bool = True
    #: Does a pool that goes elsewhere after this error count that against ``max_reissues``? Not
    #: after a call cut off on suspicion or a new link's failure (``rules.counts_as_reissue``).
    counts_as_reissue: bool = True

    def __init__(self, member: str, message: str, code: Code | None = None, state: str | None = None,
                 *, reissue: bool | None = None, may_have_acted: bool | None = None) -> None:
        self.member, self.code, self.state = member, code, state
        if reissue is not None:
            self.reissue = reissue
        if may_have_acted is not None:
            self.may_have_acted = may_have_acted
        detail = f" [{code}]" if code else ""
        where = f" (state {state})" if state else ""
        super().__init__(f"{member}: {message}{detail}{where}")


class OperationFailed(HSMError):
    """The HSM returned an error that the policy does not recover from for this call."""


class CallTimeout(HSMError):
    """A PKCS#11 call overran the policy's call timeout; the watchdog cut it off."""

    reissue = True


class MemberUnavailable(HSMError):
    """The member could not serve within the call's deadline (down, recovering, or failed)."""

    reissue = True


class LoginRejected(HSMError):
    """The HSM rejected the PIN (or it is locked or expired). hsmfsm does not try again:
    a retry burns the token's PIN counter and can lock it for good."""


class OutcomeUnknown(HSMError):
    """A non-idempotent operation failed after it may have reached the HSM.

    It is not re-issued: the object may exist. Check the token before trying again.
    """


class AllMembersDown(HSMError):
    """No member of an HA pool could serve within the deadline. ``members`` maps each
    member's name to its state and last return code."""

    reissue = False

    def __init__(self, pool: str, members: dict[str, tuple[str, Code | None]]) -> None:
        self.members = members
        detail = ", ".join(f"{name} {state} {code.name if code else 'no code yet'}"
                           for name, (state, code) in members.items())
        super().__init__(pool, f"all members down: {detail}")


class ModuleCallError(Exception):
    """A PKCS#11 call into a module failed with ``code``: what the edge raises to the runtime.

    The edge (``hsmfsm.p11``, or ``hsmfsm.testing.ScriptedModule``) turns whatever its
    library raises into this, so the runtime decides from a :class:`Code` alone and
    never sees python-pkcs11's exception classes. Not raised to applications.
    """

    def __init__(self, code: Code, detail: str = "") -> None:
        self.code, self.detail = code, detail
        super().__init__(f"{code}{': ' + detail if detail else ''}")


class ModuleError(RuntimeError):
    """The module could not be loaded or is of a layout hsmfsm cannot drive safely."""


class NotExtractable(HSMError, TypeError):
    """A key object bound to an HSM was asked for its private material (``private_bytes``,
    ``private_numbers``) or for an operation the HSM key does not offer (``exchange``)."""

    def __init__(self, what: str) -> None:
        super().__init__("hsmfsm", what)


class KeyNotFound(HSMError):
    """No key, or more than one, matches a lookup (label, CKA_ID or ``pkcs11:`` URI) on the members asked."""


class MechanismNotSupported(OperationFailed):
    """The token does not offer the mechanism asked for (its C_GetMechanismList, read at connect,
    lacks it), so the call was not sent; in a pool, no member offers it. ``mechanism`` names it.

    ``reissue``: a pool may send the call to a member that offers it."""

    reissue = True
    may_have_acted = False

    def __init__(self, member: str, message: str, mechanism: str, state: str | None = None) -> None:
        self.mechanism = mechanism
        super().__init__(member, message, None, state)
