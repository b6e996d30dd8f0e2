"""The two things a connection is given rather than builds: its module and its clock.

``SlotConnection`` and ``Pool`` accept any object with the shape of
:class:`Module` (what they call on a PKCS#11 module) and of :class:`Clock`
(time, and the waiting and locking that depend on it). In production the
module is :class:`hsmfsm.p11.P11Module` (python-pkcs11, or a host process for
``isolation: process``) and the clock is :data:`hsmfsm.runtime.clock.SYSTEM`.
Tests and ``hsmfsm simulate`` pass :class:`hsmfsm.testing.ScriptedModule` and
:class:`hsmfsm.testing.VirtualClock`, and run the same connection and pool code
on virtual time.

Every :class:`Module` method that talks to the HSM raises
:class:`hsmfsm.core.errors.ModuleCallError` (carrying the return code) on
failure, and nothing else: the runtime decides from the code alone
(:mod:`hsmfsm.core.rules`). Sessions, tokens and keys are opaque objects
owned by the module; the runtime never looks inside them, only hands them
back.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

from ..core.codes import Code

#: The kinds of key a call may ask for.
PRIVATE_KEY = "private"
PUBLIC_KEY = "public"


class Module(Protocol):
    """What a slot connection calls on a PKCS#11 module (one instance per connection)."""

    #: For messages and logs: the member's name.
    name: str

    @property
    def initialized(self) -> bool:
        """C_Initialize succeeded and no C_Finalize came since."""
        ...

    @property
    def parallel(self) -> bool:
        """False when the module refused CKF_OS_LOCKING_OK: calls into it must be serialised."""
        ...

    @property
    def can_cut_off(self) -> bool:
        """Whether a hung call can be made to return from outside (a socket to cut, a process to kill).

        Such modules are also called one request at a time: p11-kit-client closes a
        failed socket under another thread's read (docs/FACTS.md)."""
        ...

    def prepare(self, timeout: float) -> None:
        """Before a (re)initialisation: make sure whatever serves the module runs (a host process).
        Failures are logged, not raised: the attempt then fails with the module's own code."""
        ...

    def initialize(self) -> Code:
        """Load the module (first time) or C_Finalize + C_Initialize it. Returns C_Initialize's code."""
        ...

    def finalize(self) -> Code:
        """C_Finalize, if initialised."""
        ...

    def find_token(self, label: str) -> Any:
        """The token labelled ``label`` (raises ModuleCallError: HSMFSM_NO_SUCH_TOKEN, ...)."""
        ...

    def open_session(self, token: Any) -> Any:
        """C_OpenSession (read-write, no login: login is per application and token)."""
        ...

    def close_session(self, session: Any) -> Code:
        """C_CloseSession without C_Logout (which would log every session out)."""
        ...

    def login(self, session: Any, pin: str) -> Code:
        """Exactly one C_Login as the user. Returns its code (never raises for a rejected PIN)."""
        ...

    def session_state(self, session: Any) -> tuple[Code, int]:
        """C_GetSessionInfo: the code and the session state (CKS_*)."""
        ...

    def token_info(self, token: Any) -> None:
        """C_GetTokenInfo, as a probe."""
        ...

    def find_key(self, session: Any, label: str | None, kind: str, key_id: bytes | None = None) -> Any:
        """Exactly one key of ``kind`` (``private`` or ``public``) by label, by CKA_ID or both
        (``None`` does not constrain); the search is always finished. None found:
        HSMFSM_NO_SUCH_KEY; several: HSMFSM_MULTIPLE_OBJECTS. The detail names the lookup and,
        for several, two of the objects (their labels and ids)."""
        ...

    def key_attributes(self, session: Any, key: Any) -> dict[str, Any]:
        """The public half of ``key`` as :func:`hsmfsm.keys.public_key_from_attributes` takes it:
        ``key_type`` (``"RSA"``, ``"EC"``, ``"EC_EDWARDS"``), ``modulus`` and ``public_exponent``
        (RSA) or ``ec_params`` and ``ec_point`` (bytes as the module reports them), ``label``,
        ``id``. Read from the public key object with the key's CKA_ID (or label), else from the
        key's own attributes, else ``{"certificate": der, "label", "id"}`` of the certificate with
        the same CKA_ID; none of those: HSMFSM_NO_SUCH_KEY."""
        ...

    def mechanisms(self, token: Any) -> frozenset[str]:
        """C_GetMechanismList: the token's mechanisms as names without ``CKM_`` (``"ECDSA"``)."""
        ...

    def mechanism_infos(self, token: Any) -> dict[int, tuple[int, int, int]]:
        """C_GetMechanismList and C_GetMechanismInfo: {CKM value: (min key size, max key size, flags)}
        (what a virtual slot tells its applications)."""
        ...

    def list_objects(self, session: Any) -> list[dict[int, Any]]:
        """Every object the session sees, with the attributes of
        :data:`hsmfsm.core.attributes.CATALOG` it has: {CKA value: bool, int, bytes or a tuple of
        CKM values}, None for one the token calls sensitive. Secret key parts are never read."""
        ...

    def generate_keypair_raw(self, session: Any, mechanism: int, parameter: bytes | None,
                             public: dict[int, Any], private: dict[int, Any]) -> tuple[dict[int, Any], dict[int, Any]]:
        """C_GenerateKeyPair with an application's templates ({CKA value: bool, int or bytes}, as
        :mod:`hsmfsm.core.attributes` types them); the new public and private key's attributes, as
        :meth:`list_objects` gives them. Not idempotent."""
        ...

    def mechanism(self, mechanism: Any) -> Any:
        """The module's value for a mechanism given by name (``"SHA256_RSA_PKCS"``) or as its own value.
        Raises ValueError for a name it does not know."""
        ...

    def sign(self, key: Any, data: bytes, mechanism: Any, param: Any) -> bytes:
        """``param``: the module's own parameter value, or a :class:`hsmfsm.core.mechanisms.PSSParams`
        (``decrypt``: ``OAEPParams``), which the module turns into its own."""
        ...

    def verify(self, key: Any, data: bytes, signature: bytes, mechanism: Any, param: Any) -> bool: ...

    def decrypt(self, key: Any, data: bytes, mechanism: Any, param: Any) -> bytes: ...

    def generate_random(self, session: Any, nbytes: int) -> bytes: ...

    def generate_keypair(self, session: Any, key_type: Any, bits: int, label: str) -> Any: ...

    def cut_off(self) -> tuple[int, int]:
        """Make every call stuck in the module return: (host processes killed, sockets cut)."""
        ...

    def cut_link(self) -> bool:
        """Make the call stuck on this instance's own link return, leaving every other instance of the
        module alone (a suspected member's call; the instance is then set up afresh). False when there
        is no link of its own to cut."""
        ...

    def new_link(self) -> Module | None:
        """Another instance of this module with a link of its own to the same HSM, for one more
        session of the connection (a module that serves one request at a time per link: p11-kit-client,
        ``isolation: process``); None when sessions share this instance. No I/O: the instance
        loads at its first ``initialize``."""
        ...

    def stop(self) -> None:
        """The connection is closed for good: stop what :meth:`prepare` started."""
        ...

    def for_child(self) -> Module:
        """In a forked child: the instance to use from now on (a fresh one for a socket module)."""
        ...


class Lock(Protocol):
    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool: ...

    def release(self) -> None: ...

    def __enter__(self) -> bool: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None, /) -> None: ...


class Condition(Protocol):
    def __enter__(self) -> bool: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None, /) -> None: ...

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool: ...

    def notify_all(self) -> None: ...


class Signal(Protocol):
    """A wake-up flag (``threading.Event``'s shape)."""

    def set(self) -> None: ...

    def clear(self) -> None: ...

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class Thread(Protocol):
    def join(self, timeout: float | None = None) -> None: ...

    def is_alive(self) -> bool: ...


class Clock(Protocol):
    """Time, and everything in the runtime that waits on it.

    Waiting and time cannot be injected apart: a virtual clock has to know
    when every thread is blocked to move time on. So the runtime makes its
    locks, conditions, wake-up signals, threads and sleeps through its clock.
    """

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (deadlines, back-off, the watchdog)."""
        ...

    def time(self) -> float:
        """UNIX time, for records."""
        ...

    def sleep(self, seconds: float) -> None: ...

    def random(self) -> float:
        """A float in [0, 1): the back-off's jitter."""
        ...

    def lock(self) -> Lock: ...

    def condition(self, lock: Lock) -> Condition: ...

    def signal(self) -> Signal: ...

    def start_thread(self, target: Callable[[], None], name: str) -> Thread:
        """Start a daemon thread running ``target``."""
        ...
