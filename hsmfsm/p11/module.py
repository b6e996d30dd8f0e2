"""The edge to the PKCS#11 module: loading, (re)initialising, logging in, cutting off.

Measured traps this module exists to avoid (see ``docs/FACTS.md`` and the
README's "Why it is built this way"):

1. python-pkcs11 calls C_Finalize *holding the GIL* (``lib.finalize()``,
   ``lib.reinitialize()``, and ``lib.__dealloc__``). On a hung network HSM that
   call never returns, and with the GIL held the whole interpreter freezes:
   no other thread, no watchdog, no signal handler runs. We measured it. So
   hsmfsm never lets python-pkcs11 finalize: it calls C_Finalize and
   C_Initialize itself, through ctypes (which releases the GIL), on the very
   function list python-pkcs11 uses.
2. python-pkcs11 initialises with ``C_Initialize(NULL)``, which tells a module
   the application will not call it from several threads. In-process SoftHSM
   then crashes under two threads. hsmfsm re-initialises every module with
   ``CKF_OS_LOCKING_OK``; a module that refuses (CKR_CANT_LOCK) gets
   ``NULL`` and a lock that serialises its calls.
3. ``pkcs11.lib(path)`` is cached per path string, and p11-kit-client reads
   ``P11_KIT_SERVER_ADDRESS`` when the module is loaded. Each
   :class:`ModuleInstance` therefore loads the module under a path of its own
   (a symlink), with its environment applied under a process-wide lock.

Getting at python-pkcs11's function list reads one pointer out of the Cython
object. The layout is checked before it is read (the base class must be
exactly ``PyObject_HEAD`` plus three pointers), and the pointer is checked
after (its C_GetInfo must describe the same library python-pkcs11 loaded).
``pyproject.toml`` pins python-pkcs11 to the tested series.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pkcs11

from ..core.codes import Code, code_from_value
from ..core.errors import ModuleCallError
from ..core.errors import ModuleError as _CoreModuleError
from ..core.functions import FUNCTION_NAMES

CK_RV = ctypes.c_ulong
CK_ULONG = ctypes.c_ulong
CKF_OS_LOCKING_OK = 0x2
CKU_USER = 1
CKR_OK = 0
CKR_CANT_LOCK = 0xA
CKR_DEVICE_ERROR = 0x30
CKR_BUFFER_TOO_SMALL = 0x150


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class _Info(ctypes.Structure):
    _fields_ = [("cryptokiVersion", _Version), ("manufacturerID", ctypes.c_char * 32),
                ("flags", CK_ULONG), ("libraryDescription", ctypes.c_char * 32),
                ("libraryVersion", _Version)]


class SessionInfo(ctypes.Structure):
    """CK_SESSION_INFO."""

    _fields_ = [("slotID", CK_ULONG), ("state", CK_ULONG), ("flags", CK_ULONG), ("ulDeviceError", CK_ULONG)]


class _MechanismInfo(ctypes.Structure):
    _fields_ = [("ulMinKeySize", CK_ULONG), ("ulMaxKeySize", CK_ULONG), ("flags", CK_ULONG)]


class _Attribute(ctypes.Structure):
    _fields_ = [("type", CK_ULONG), ("pValue", ctypes.c_void_p), ("ulValueLen", CK_ULONG)]


#: CK_UNAVAILABLE_INFORMATION as a CK_ULONG: the length a module writes for an attribute it cannot give.
UNAVAILABLE = ctypes.c_ulong(-1).value
CKA_KEY_TYPE, CKA_MODULUS, CKA_EC_PARAMS = 0x100, 0x120, 0x180
CKR_ATTRIBUTE_SENSITIVE = 0x11
CKR_ATTRIBUTE_TYPE_INVALID = 0x12
#: Objects read per C_FindObjects, and the most a listing reads (a token with more is refused).
_FIND_BATCH = 64
MAX_OBJECTS = 65536


class Mechanism(ctypes.Structure):
    """CK_MECHANISM."""

    _fields_ = [("mechanism", CK_ULONG), ("pParameter", ctypes.c_void_p), ("ulParameterLen", CK_ULONG)]


class PSSParams(ctypes.Structure):
    """CK_RSA_PKCS_PSS_PARAMS."""

    _fields_ = [("hashAlg", CK_ULONG), ("mgf", CK_ULONG), ("sLen", CK_ULONG)]


class OAEPParams(ctypes.Structure):
    """CK_RSA_PKCS_OAEP_PARAMS (source CKZ_DATA_SPECIFIED, the label as its data)."""

    _fields_ = [("hashAlg", CK_ULONG), ("mgf", CK_ULONG), ("source", CK_ULONG), ("pSourceData", ctypes.c_void_p),
                ("ulSourceDataLen", CK_ULONG)]


class _InitArgs(ctypes.Structure):
    _fields_ = [("CreateMutex", ctypes.c_void_p), ("DestroyMutex", ctypes.c_void_p),
                ("LockMutex", ctypes.c_void_p), ("UnlockMutex", ctypes.c_void_p),
                ("flags", CK_ULONG), ("pReserved", ctypes.c_void_p)]


#: CK_FUNCTION_LIST, in order (every entry: each pointer's offset depends on those before it).
_FUNCTIONS = list(FUNCTION_NAMES)


class _FunctionList(ctypes.Structure):
    _fields_ = [("version", _Version)] + [(name, ctypes.c_void_p) for name in _FUNCTIONS]


_PROTO = {
    "C_Initialize": ctypes.CFUNCTYPE(CK_RV, ctypes.c_void_p),
    "C_Finalize": ctypes.CFUNCTYPE(CK_RV, ctypes.c_void_p),
    "C_GetInfo": ctypes.CFUNCTYPE(CK_RV, ctypes.POINTER(_Info)),
    "C_GetSessionInfo": ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.POINTER(SessionInfo)),
    "C_Login": ctypes.CFUNCTYPE(CK_RV, CK_ULONG, CK_ULONG, ctypes.c_char_p, CK_ULONG),
    "C_Logout": ctypes.CFUNCTYPE(CK_RV, CK_ULONG),
    "C_CloseSession": ctypes.CFUNCTYPE(CK_RV, CK_ULONG),
    "C_GetMechanismList": ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.POINTER(CK_ULONG), ctypes.POINTER(CK_ULONG)),
    "C_GetMechanismInfo": ctypes.CFUNCTYPE(CK_RV, CK_ULONG, CK_ULONG, ctypes.POINTER(_MechanismInfo)),
    "C_GetAttributeValue": ctypes.CFUNCTYPE(CK_RV, CK_ULONG, CK_ULONG, ctypes.POINTER(_Attribute), CK_ULONG),
    "C_FindObjectsInit": ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.POINTER(_Attribute), CK_ULONG),
    "C_FindObjects": ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.POINTER(CK_ULONG), CK_ULONG, ctypes.POINTER(CK_ULONG)),
    "C_FindObjectsFinal": ctypes.CFUNCTYPE(CK_RV, CK_ULONG),
    "C_GenerateKeyPair": ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.POINTER(Mechanism), ctypes.POINTER(_Attribute),
                                          CK_ULONG, ctypes.POINTER(_Attribute), CK_ULONG, ctypes.POINTER(CK_ULONG),
                                          ctypes.POINTER(CK_ULONG)),
    "C_SignInit": ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.POINTER(Mechanism), CK_ULONG),
    "C_Sign": ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.c_char_p, CK_ULONG, ctypes.c_void_p, ctypes.POINTER(CK_ULONG)),
    "C_DecryptInit": ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.POINTER(Mechanism), CK_ULONG),
    "C_Decrypt": ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.c_char_p, CK_ULONG, ctypes.c_void_p,
                                  ctypes.POINTER(CK_ULONG)),
}


ModuleError = _CoreModuleError  # one class: the runtime catches it without importing this package


def _function_list_address(lib: object) -> int:
    """The CK_FUNCTION_LIST* inside a python-pkcs11 ``lib`` object, after checking the layout."""
    import pkcs11._pkcs11 as impl

    ptr = ctypes.sizeof(ctypes.c_void_p)
    base = getattr(impl, "HasFuncList", None)
    if base is None or not isinstance(lib, base) or base.__basicsize__ != object.__basicsize__ + 3 * ptr:
        raise ModuleError("unsupported python-pkcs11 object layout; hsmfsm is tested with python-pkcs11 0.10")
    address = ctypes.c_void_p.from_address(id(lib) + object.__basicsize__).value
    if not address:
        raise ModuleError("python-pkcs11 holds no function list for this module")
    return address


#: Held while a module is loaded (its environment applied; p11-kit-client's C_GetFunctionList takes
#: p11-kit's process-wide lock then), and by a fork (:func:`_before_fork`). Re-entrant, so that a
#: fork made while this thread loads a module (a host process started from a load) cannot deadlock.
_ENV_LOCK = threading.RLock()
_LINK_DIR: str | None = None
#: One lock per module server (its socket path): every C_Initialize to one server is made under it.
_SERVER_LOCKS: dict[str, threading.Lock] = {}
_SERVER_LOCKS_GUARD = threading.Lock()


class _SockaddrUn(ctypes.Structure):
    _fields_ = [("sun_family", ctypes.c_ushort), ("sun_path", ctypes.c_ubyte * 108)]


_LIBC = ctypes.CDLL(None, use_errno=True)


def _peer_path(fd: int) -> str | None:
    """The unix path the socket ``fd`` is connected to, or None. Read with getpeername(2) on ``fd``
    itself: no dup (a second fd for the socket, held even for a moment, is one another thread's
    scan would take for a socket new to its server, docs/FACTS.md), and no Python socket object
    (made on a module's fd, it would set O_NONBLOCK under ``socket.setdefaulttimeout``)."""
    addr = _SockaddrUn()
    size = ctypes.c_uint32(ctypes.sizeof(addr))
    if _LIBC.getpeername(fd, ctypes.byref(addr), ctypes.byref(size)) != 0 or addr.sun_family != socket.AF_UNIX:
        return None
    raw = bytes(addr.sun_path)[:max(0, size.value - ctypes.sizeof(ctypes.c_ushort))].split(b"\0", 1)[0]
    return os.fsdecode(raw) if raw else None


def _shut_down(fd: int) -> bool:
    """shutdown(2) of the socket ``fd`` both ways, on ``fd`` itself (see :func:`_peer_path`)."""
    return bool(_LIBC.shutdown(fd, socket.SHUT_RDWR) == 0)


def sockets_to(path: str) -> dict[int, str]:
    """This process's sockets connected to the unix socket at ``path``: fd -> its /proc link text
    ("socket:[inode]", what tells two sockets apart when fd numbers are reused or duplicated)."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc/self/fd"):
        try:
            fd = int(entry)
            name = os.readlink(f"/proc/self/fd/{entry}")
        except (OSError, ValueError):
            continue
        if name.startswith("socket:") and _peer_path(fd) == path:
            found[fd] = name
    return found


def _handshake(path: str) -> bool | None:
    """p11-kit's version handshake with the server at ``path`` on a socket of hsmfsm's own: True if
    it answered, False if it took the connection and did not (the socket was cut while waiting: a
    hung server, cut by the watchdog or a suspicion, as a load would be), None if nothing listens.

    Made before a module's first load: python-pkcs11 initialises a module as it loads it, and a
    p11-kit-client 0.24.1 whose handshake fails keeps that socket open for good (docs/FACTS.md),
    one per attempt while other members keep the client loaded. A server that answers this one
    is asked again by the load's own C_Initialize; the race is one socket, not one per attempt."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(path)
        except OSError:
            return None
        try:
            sock.sendall(b"\0")
            return len(sock.recv(1)) == 1
        except OSError:
            return False
    finally:
        sock.close()


def _close_if_still(socket_: tuple[int, str]) -> None:
    """Close fd ``socket_[0]`` if it still is the socket named ``socket_[1]`` (its /proc link text)."""
    fd, name = socket_
    try:
        if os.readlink(f"/proc/self/fd/{fd}") == name:
            os.close(fd)
    except OSError:
        pass


def server_lock(path: str) -> threading.Lock:
    """The lock under which this process makes every C_Initialize to the server at ``path`` (and loads
    every client of it), so that the one socket new to that server afterwards is known to be the
    instance's own (:meth:`ModuleInstance.cut_link`)."""
    with _SERVER_LOCKS_GUARD:
        lock = _SERVER_LOCKS.get(path)
        if lock is None:
            lock = _SERVER_LOCKS[path] = threading.Lock()
        return lock


def _private_path(module: str, name: str) -> str:
    """A path of this process's own that leads to ``module`` (python-pkcs11 caches per path)."""
    global _LINK_DIR
    if _LINK_DIR is None:
        _LINK_DIR = tempfile.mkdtemp(prefix="hsmfsm-modules-")
        atexit.register(_remove_link_dir, _LINK_DIR, os.getpid())
    fd, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".so", dir=_LINK_DIR)
    os.close(fd)
    os.unlink(path)
    os.symlink(os.path.abspath(module), path)
    return path


def _remove_link_dir(path: str, owner: int) -> None:
    if os.getpid() == owner:  # a forked child exiting must not pull the parent's links away
        shutil.rmtree(path, True)


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_isolated(module: str, env: dict[str, str], name: str) -> Any:
    """``pkcs11.lib`` of ``module`` under a path of this process's own, loaded with ``env`` applied.

    Plain python-pkcs11 (its own initialisation, no hsmfsm on top): for the raw
    baselines in :mod:`hsmfsm.p11.raw`.
    """
    path = _private_path(module, name)
    server = _server_path(env)
    with _ENV_LOCK, _environment(env):
        if server is None:
            return pkcs11.lib(path)
        with server_lock(server):  # its socket must not be taken for an instance's own (cut_link)
            return pkcs11.lib(path)


def _server_path(env: dict[str, str]) -> str | None:
    address = env.get("P11_KIT_SERVER_ADDRESS") or ""
    return address[len("unix:path="):] if address.startswith("unix:path=") else None


def _cut_all_at_exit() -> None:
    """At exit python-pkcs11 finalises every module it loaded, holding the GIL: on a hung
    HSM the process would never exit. Cutting the sockets first makes that C_Finalize fail fast."""
    for instance in ModuleInstance._keep_alive:
        try:
            instance.cut_off()
        except Exception:
            pass


atexit.register(_cut_all_at_exit)


def _before_fork() -> None:
    """A fork waits for any module load in progress in this process, and none starts until it is made.

    p11-kit's fork handler only counts forks (docs/FACTS.md): a lock p11-kit-client's
    C_GetFunctionList holds (``p11_library_mutex``) stays held for good in a child forked while
    another thread was inside it, and the child's first load of a client waits for ever. Every load
    runs under ``_ENV_LOCK``, so holding it across the fork means no thread of this process is in
    a load when it forks (nor has ``os.environ`` half-changed). A load on a hung HSM holds it until
    that link is cut (the suspicion ceiling in a pool, else the call timeout): a fork waits as long.
    """
    _ENV_LOCK.acquire()


def _after_fork_in_parent() -> None:
    _ENV_LOCK.release()


def _after_fork_in_child() -> None:
    """Runs in a forked child before anything else (``os.register_at_fork``); only this thread exists.

    Every socket to a module server that the child inherited is shared with the
    parent: a C_CloseSession, C_Logout or C_Finalize sent on it (by python-pkcs11's
    deallocator at exit, by a stray finaliser, by anything) would act on the
    parent's sessions on the server, and ``shutdown()`` on it would cut the
    parent off. So the child's copy of each such descriptor is replaced with
    ``/dev/null`` (``dup2``: closing the child's copy, which the parent never
    notices, while keeping the number taken so that no new socket of the
    child can be mistaken for it). The inherited instances are marked, never
    called again, never deallocated (``_keep_alive``).
    """
    global _ENV_LOCK, _LINK_DIR, _SERVER_LOCKS_GUARD
    _ENV_LOCK = threading.RLock()  # the fork held it (_before_fork): the child's own, free
    _SERVER_LOCKS_GUARD = threading.Lock()
    _SERVER_LOCKS.clear()
    _LINK_DIR = None  # the parent's; the child makes its own
    paths = set()
    for instance in ModuleInstance._keep_alive:
        if instance._server_path is not None:
            instance.inherited = True
            instance.initialized = False
            paths.add(instance._server_path)
    if paths:
        _detach_inherited_sockets(paths)


def _detach_inherited_sockets(paths: set[str]) -> int:
    try:
        entries = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    detached = 0
    try:
        for entry in entries:
            try:
                fd = int(entry)
                if fd == null or not os.readlink(f"/proc/self/fd/{entry}").startswith("socket:"):
                    continue
            except (OSError, ValueError):
                continue
            if _peer_path(fd) in paths:
                os.dup2(null, fd, inheritable=False)  # a close of the child's copy, never a shutdown
                detached += 1
    finally:
        os.close(null)
    return detached


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


class ModuleInstance:
    """One loaded instance of a PKCS#11 module, owned by one slot connection.

    Never closed or garbage-collected while the process runs: python-pkcs11's
    deallocator would call C_Finalize with the GIL held (trap 1 above).
    """

    _keep_alive: list[ModuleInstance] = []

    def __init__(self, module: str, env: dict[str, str] | None = None, name: str = "module") -> None:
        if not os.path.exists(module):
            raise ModuleError(f"{name}: PKCS#11 module {module} does not exist")
        self.module = module
        self.env = dict(env or {})
        self.name = name
        self.lib: object | None = None
        self.initialized = False
        #: False when the module refused CKF_OS_LOCKING_OK: calls must then be serialised.
        self.parallel = True
        self._fl: _FunctionList | None = None
        self._fn: dict[str, Any] = {}
        self._server_path = _server_path(self.env)
        #: This instance's own socket to its server, as (fd, its /proc link text "socket:[inode]"),
        #: found at each C_Initialize: what :meth:`cut_link` shuts, and nothing else.
        self._link: tuple[int, str] | None = None
        #: The socket of this instance's last C_Initialize whose version handshake failed (a cut): p11-kit
        #: 0.24.1 leaves it open and keeps it as its transport's socket until its next connect
        #: (``rpc_C_Initialize`` disconnects only once the handshake succeeded). Closed here once a
        #: later connect has replaced it, so each instance holds at most one such socket.
        self._orphan: tuple[int, str] | None = None
        #: While a C_Initialize of this instance runs: the server's sockets before it began (the one it
        #: opens is the one not among them).
        self._init_before: dict[int, str] | None = None
        #: While this instance asks its server for the version byte before its first load
        #: (:func:`_handshake`, on a socket of hsmfsm's own: cutting it costs nothing).
        self._probing = False
        #: While this instance waits for another instance's C_Initialize to its server (or a first
        #: load's lock): :meth:`cut_link` ends the wait (``_wait_cut``) instead of a socket.
        self._waiting = False
        self._wait_cut = False
        #: C_SignInit/C_Sign/C_DecryptInit/C_Decrypt, once loaded (the signing path's own references).
        self._sign_init: Any = None
        self._sign: Any = None
        self._decrypt_init: Any = None
        self._decrypt: Any = None
        #: True in a forked child for an instance the parent loaded: its socket belonged to the
        #: parent, so it is never called, finalised or cut off here (see :func:`_after_fork_in_child`).
        self.inherited = False

    # -- loading and (re)initialising --------------------------------------

    def initialize(self) -> Code:
        """Load (first time) or re-initialise the module. Returns the code of C_Initialize.

        Re-initialising drops every session of the previous generation on the
        module side; the caller must already have drained and abandoned them.
        """
        # Modules read their environment at load (p11-kit-client: its server's address) or at
        # C_Initialize (SoftHSM's SOFTHSM2_CONF), so both happen with it applied, under the process-wide
        # environment lock. A socket module's re-initialisation reads none (measured: p11-kit-client
        # keeps the address it read at load), so it runs under its server's lock alone: a member
        # whose HSM hangs in C_Initialize holds up no other member's links. Every C_Initialize to one
        # server is serialised, so the socket new to that server afterwards is this instance's
        # (p11-kit-client opens one per instance, at C_Initialize). A hung one holds its locks until
        # the watchdog (or a suspicion's cut_link, which finds the socket it is opening) cuts it off.
        path = self._server_path
        self._wait_cut = False
        if self.lib is not None and path is not None:
            return self._initialize_under(path)
        self._wait_for(_ENV_LOCK, path)
        try:
            with _environment(self.env):
                return self._initialize_now() if path is None else self._initialize_under(path)
        finally:
            _ENV_LOCK.release()

    def _initialize_under(self, path: str) -> Code:
        """:meth:`_initialize_now` under the lock of the server at ``path``."""
        lock = server_lock(path)
        self._wait_for(lock, path)
        try:
            return self._initialize_now()
        finally:
            lock.release()

    def _wait_for(self, lock: Any, path: str | None) -> None:
        """Take ``lock``, waiting as long as it takes unless :meth:`cut_link` cuts this instance off
        meanwhile (another link's C_Initialize to a hung server holds it): then ModuleCallError, as a
        cut link's call returns, and this link's call can go to another member at once."""
        if lock.acquire(blocking=False):
            return
        self._waiting = True
        try:
            while not lock.acquire(timeout=0.005):
                if self._wait_cut:
                    raise ModuleCallError(code_from_value(CKR_DEVICE_ERROR),
                                          f"{self.name}: cut off while waiting for another link's C_Initialize "
                                          f"to {path or 'its module'}")
        finally:
            self._waiting = False

    def _initialize_now(self) -> Code:
        """(Under the locks :meth:`initialize` takes.)"""
        before = self._sockets()
        self._init_before = before
        try:
            if self.lib is None:
                self._probing = True
                try:
                    answered = self._server_path is None or _handshake(self._server_path)
                finally:
                    self._probing = False
                if answered is False:
                    raise ModuleCallError(code_from_value(CKR_DEVICE_ERROR),
                                          f"{self.name}: the server at {self._server_path} took the connection "
                                          "but did not answer its version byte")
                self._load()
            else:
                self.finalize()
            code = self._initialize_with_locking()
        finally:
            self._init_before = None
        if self._server_path is not None:
            new = self._new_socket(before)
            if new is None:  # no connect (no server, already initialised), or connected and closed again
                self._link = None
            else:  # a connect replaced the transport's socket: the one it held before is no one's now
                replaced, self._orphan = self._orphan, (new if code.value != CKR_OK else None)
                self._link = new if code.value == CKR_OK else None
                if replaced is not None:
                    _close_if_still(replaced)
        return code

    def _new_socket(self, before: dict[int, str]) -> tuple[int, str] | None:
        """The one socket to the server that is not among ``before`` (by socket, not fd number), or
        None. Two fds for it means some thread of the process holds a passing dup of it (a scan of
        /proc/self/fd by an application or a test, say): look again, for up to 10 ms."""
        known = set(before.values())
        for _ in range(20):
            new = [(fd, name) for fd, name in self._sockets().items() if name not in known]
            if len(new) == 1:
                return new[0]
            if len({name for _, name in new}) != 1:
                return None  # none (no connect, or closed again), or two sockets: nothing to tell
            time.sleep(0.0005)
        return None

    def _load(self) -> None:
        path = _private_path(self.module, self.name)
        try:
            self.lib = pkcs11.lib(path)  # C_Initialize(NULL) + C_GetInfo, GIL released
        except pkcs11.PKCS11Error as exc:
            if "already initialized" in str(exc):
                raise ModuleError(
                    f"{self.name}: {self.module} is already initialised in this process by another "
                    "connection; an in-process module (SoftHSM) is one instance per process: open one "
                    "SlotConnection to it, or reach it through p11-kit-client or p11-kit-proxy") from None
            raise
        ModuleInstance._keep_alive.append(self)
        address = _function_list_address(self.lib)
        self._fl = _FunctionList.from_address(address)
        self._fn = {name: proto(getattr(self._fl, name)) for name, proto in _PROTO.items()}
        fn = self._fn
        self._sign_init, self._sign = fn["C_SignInit"], fn["C_Sign"]
        self._decrypt_init, self._decrypt = fn["C_DecryptInit"], fn["C_Decrypt"]
        self.initialized = True  # python-pkcs11's NULL initialisation: finalised below, or by the next attempt
        info = _Info()
        rv = self._fn["C_GetInfo"](ctypes.byref(info))
        if rv != CKR_OK:  # the link failed under it (a cut-off): an attempt that failed, not a refused module
            raise ModuleCallError(code_from_value(rv), f"{self.name}: C_GetInfo failed")
        described = info.manufacturerID.decode("utf-8", "replace").rstrip()
        if described != self.lib.manufacturer_id:
            raise ModuleError(f"{self.name}: function list check failed; refusing to drive {self.module}")
        self.finalize()  # python-pkcs11's NULL initialisation: replaced below with OS locking

    def _initialize_with_locking(self) -> Code:
        args = _InitArgs(flags=CKF_OS_LOCKING_OK)
        rv = self._fn["C_Initialize"](ctypes.byref(args))
        if rv == CKR_CANT_LOCK:
            self.parallel = False
            rv = self._fn["C_Initialize"](None)
        self.initialized = rv == CKR_OK
        return code_from_value(rv)

    def finalize(self) -> Code:
        """C_Finalize with the GIL released. Safe to call when not initialised."""
        if not self.initialized or not self._fn or self.inherited:
            return code_from_value(CKR_OK)
        self.initialized = False
        return code_from_value(self._fn["C_Finalize"](None))

    # -- calls python-pkcs11 does not offer, or offers with traps -----------

    def login(self, session_handle: int, pin: str) -> Code:
        """Exactly one C_Login. python-pkcs11 only logs in inside ``token.open``, which
        leaks the session it opened when the PIN is wrong."""
        data = pin.encode("utf-8")
        rv = self._fn["C_Login"](session_handle, CKU_USER, data, len(data))
        return code_from_value(rv)

    def session_state(self, session_handle: int) -> tuple[Code, int]:
        """C_GetSessionInfo: the probe. Returns the code and the session state (CKS_*)."""
        info = SessionInfo()
        rv = self._fn["C_GetSessionInfo"](session_handle, ctypes.byref(info))
        return code_from_value(rv), int(info.state)

    def close_session(self, session_handle: int) -> Code:
        """C_CloseSession without the C_Logout that python-pkcs11's ``Session.close`` adds
        (a logout there would log every other session out)."""
        return code_from_value(self._fn["C_CloseSession"](session_handle))

    def mechanism_list(self, slot_id: int) -> tuple[Code, list[int]]:
        """C_GetMechanismList, keeping only the count the second call returns. python-pkcs11's
        ``get_mechanisms`` keeps the first call's count: through p11-kit-client (0.24.1), which
        drops the mechanisms its RPC cannot carry on the second call (SHA256_RSA_PKCS_PSS, EDDSA
        ...), the tail of its buffer is uninitialised memory read as mechanisms (measured)."""
        fn = self._fn["C_GetMechanismList"]
        count = CK_ULONG(0)
        rv = fn(slot_id, None, ctypes.byref(count))
        for _ in range(3):  # the list can grow between the two calls (CKR_BUFFER_TOO_SMALL): ask again
            if rv != CKR_OK:
                return code_from_value(rv), []
            buffer = (CK_ULONG * max(1, count.value))()
            rv = fn(slot_id, buffer, ctypes.byref(count))
            if rv != CKR_BUFFER_TOO_SMALL:
                break
        if rv != CKR_OK:
            return code_from_value(rv), []
        return code_from_value(rv), [int(buffer[i]) for i in range(count.value)]

    def mechanism_infos(self, slot_id: int, mechanisms: list[int]) -> tuple[Code, dict[int, tuple[int, int, int]]]:
        """C_GetMechanismInfo for each mechanism: (min key size, max key size, flags)."""
        fn = self._fn["C_GetMechanismInfo"]
        out: dict[int, tuple[int, int, int]] = {}
        for mechanism in mechanisms:
            info = _MechanismInfo()
            rv = fn(slot_id, mechanism, ctypes.byref(info))
            if rv != CKR_OK:
                return code_from_value(rv), out
            out[mechanism] = (int(info.ulMinKeySize), int(info.ulMaxKeySize), int(info.flags))
        return code_from_value(CKR_OK), out

    def list_objects(self, session_handle: int, types: tuple[int, ...], skip: Any = None
                     ) -> tuple[Code, list[dict[int, bytes | None]]]:
        """Every object the session sees, with the raw bytes (C memory: CK_BBOOL, native CK_ULONG ...)
        of each attribute in ``types`` it has: ``None`` for one the token calls sensitive, absent for
        one it does not have. ``skip(object_class_bytes)`` returns the types not to read for an object
        of that class (a private key's secret parts are never asked for).

        Raw, not python-pkcs11's ``get_objects``: a virtual slot serves these bytes to applications
        as the token gave them, and python-pkcs11 only reads the attributes it has a decoder for.
        Two C_GetAttributeValue per object (lengths, then values); a CKR_ATTRIBUTE_* answer
        still fills the entries it could (PKCS#11 2.40 §5.7.5), anything else fails the listing."""
        handles: list[int] = []
        rv = self._fn["C_FindObjectsInit"](session_handle, None, 0)
        if rv != CKR_OK:
            return code_from_value(rv), []
        try:
            batch = (CK_ULONG * _FIND_BATCH)()
            while len(handles) < MAX_OBJECTS:
                found = CK_ULONG(0)
                rv = self._fn["C_FindObjects"](session_handle, batch, _FIND_BATCH, ctypes.byref(found))
                if rv != CKR_OK:
                    return code_from_value(rv), []
                handles += [int(batch[i]) for i in range(found.value)]
                if found.value < _FIND_BATCH:
                    break
        finally:
            final = self._fn["C_FindObjectsFinal"](session_handle)
        if final != CKR_OK:
            return code_from_value(final), []
        out: list[dict[int, bytes | None]] = []
        for handle in handles:
            code, klass = self._attributes(session_handle, handle, (0,))  # CKA_CLASS
            if code.value != CKR_OK:
                return code, []
            wanted = types if skip is None else tuple(t for t in types if t not in skip(klass.get(0)))
            code, values = self._attributes(session_handle, handle, wanted)
            if code.value != CKR_OK:
                return code, []
            out.append(values)
        return code_from_value(CKR_OK), out

    def generate_keypair(self, session_handle: int, mechanism: int, parameter: bytes | None,
                         public: dict[int, bytes], private: dict[int, bytes]) -> tuple[Code, int, int]:
        """C_GenerateKeyPair with templates of raw (C memory) values: (code, public handle, private
        handle). Not python-pkcs11's ``generate_keypair``: a virtual slot passes an application's
        templates through as they are, not the few attributes python-pkcs11 knows."""
        keep: list[Any] = []

        def template(values: dict[int, bytes]) -> Any:
            array = (_Attribute * max(1, len(values)))()
            for i, (t, raw) in enumerate(values.items()):
                buf = ctypes.create_string_buffer(raw, max(1, len(raw)))
                keep.append(buf)
                array[i].type, array[i].pValue, array[i].ulValueLen = t, ctypes.cast(buf, ctypes.c_void_p), len(raw)
            return array

        mech = Mechanism()
        mech.mechanism = mechanism
        if parameter:
            pbuf = ctypes.create_string_buffer(parameter, len(parameter))
            keep.append(pbuf)
            mech.pParameter, mech.ulParameterLen = ctypes.cast(pbuf, ctypes.c_void_p), len(parameter)
        pub, priv = CK_ULONG(0), CK_ULONG(0)
        rv = self._fn["C_GenerateKeyPair"](session_handle, ctypes.byref(mech), template(public), len(public),
                                           template(private), len(private), ctypes.byref(pub), ctypes.byref(priv))
        return code_from_value(rv), int(pub.value), int(priv.value)

    def object_attributes(self, session_handle: int, handle: int, types: tuple[int, ...]
                          ) -> tuple[Code, dict[int, bytes | None]]:
        """The raw attributes of one object (as :meth:`list_objects` reads them)."""
        return self._attributes(session_handle, handle, types)

    def _attributes(self, session_handle: int, handle: int, types: tuple[int, ...]
                    ) -> tuple[Code, dict[int, bytes | None]]:
        fn = self._fn["C_GetAttributeValue"]
        template = (_Attribute * max(1, len(types)))()
        for i, t in enumerate(types):
            template[i].type, template[i].pValue, template[i].ulValueLen = t, None, 0
        rv = fn(session_handle, handle, template, len(types))
        if rv not in (CKR_OK, CKR_ATTRIBUTE_SENSITIVE, CKR_ATTRIBUTE_TYPE_INVALID):
            return code_from_value(rv), {}
        sizes = [int(template[i].ulValueLen) for i in range(len(types))]
        sensitive: set[int] = set()
        missing = [i for i, n in enumerate(sizes) if n == UNAVAILABLE]
        if rv == CKR_ATTRIBUTE_SENSITIVE and missing:
            # The length (-1) is the same for "sensitive" and "no such attribute": ask each alone.
            if len(missing) == 1:
                sensitive.add(types[missing[0]])
            else:
                for i in missing:
                    one = (_Attribute * 1)()
                    one[0].type, one[0].pValue, one[0].ulValueLen = types[i], None, 0
                    if fn(session_handle, handle, one, 1) == CKR_ATTRIBUTE_SENSITIVE:
                        sensitive.add(types[i])
        buffers = [ctypes.create_string_buffer(max(1, n)) if n != UNAVAILABLE else None for n in sizes]
        for i, buf in enumerate(buffers):
            template[i].pValue = ctypes.cast(buf, ctypes.c_void_p) if buf is not None else None
            template[i].ulValueLen = sizes[i] if buf is not None else 0
        rv = fn(session_handle, handle, template, len(types))
        if rv not in (CKR_OK, CKR_ATTRIBUTE_SENSITIVE, CKR_ATTRIBUTE_TYPE_INVALID):
            return code_from_value(rv), {}
        values: dict[int, bytes | None] = dict.fromkeys(sensitive)
        for i, t in enumerate(types):
            buf = buffers[i]
            n = int(template[i].ulValueLen)
            if buf is not None and n != UNAVAILABLE:
                values[t] = buf.raw[:n]
        return code_from_value(CKR_OK), values

    def sign(self, session_handle: int, key_handle: int, mechanism: Mechanism, data: bytes,
             size: int) -> tuple[int, bytes]:
        """C_SignInit, then C_Sign into a buffer of ``size`` bytes (the signature's length, known from
        the key): two round trips where python-pkcs11 takes three (it asks the length first). Only
        an answer of CKR_BUFFER_TOO_SMALL (the size was wrong) costs a third: the operation stays
        active after it (PKCS#11 2.40, 5.2), and C_Sign goes again with the length the module named.
        Returns (CK_RV, signature); ctypes releases the GIL around each call."""
        rv: int = self._sign_init(session_handle, mechanism, key_handle)
        if rv != CKR_OK:
            return rv, b""
        return _output(self._sign, session_handle, data, size)

    def decrypt(self, session_handle: int, key_handle: int, mechanism: Mechanism, data: bytes,
                size: int) -> tuple[int, bytes]:
        """C_DecryptInit, then C_Decrypt into ``size`` bytes (an RSA key's modulus length bounds its
        plaintext): as :meth:`sign`."""
        rv: int = self._decrypt_init(session_handle, mechanism, key_handle)
        if rv != CKR_OK:
            return rv, b""
        return _output(self._decrypt, session_handle, data, size)

    def key_info(self, session_handle: int, key_handle: int) -> tuple[int | None, int | None, bytes | None]:
        """(CKA_KEY_TYPE, the length of CKA_MODULUS, CKA_EC_PARAMS) of a key, each None where the key
        has none: what :func:`hsmfsm.core.mechanisms.signature_length` needs. Two round trips, made
        once per key and session (the key lookup's)."""
        code, values = self._attributes(session_handle, key_handle, (CKA_KEY_TYPE, CKA_MODULUS, CKA_EC_PARAMS))
        if code.value != CKR_OK:
            return None, None, None
        raw_type, modulus, params = values.get(CKA_KEY_TYPE), values.get(CKA_MODULUS), values.get(CKA_EC_PARAMS)
        key_type = int.from_bytes(raw_type, sys.byteorder) if raw_type else None
        return key_type, (len(modulus) if modulus else None), params

    def function(self, name: str) -> Any:
        """A function of the module's list, as ctypes calls it (those declared here), or None
        before the module was first loaded."""
        return self._fn.get(name)

    def logout(self, session_handle: int) -> Code:
        return code_from_value(self._fn["C_Logout"](session_handle))

    # -- the watchdog's lever -----------------------------------------------

    @property
    def can_cut_off(self) -> bool:
        """Whether a hung call into this module can be unblocked from outside (p11-kit-client)."""
        return self._server_path is not None

    def cut_off(self) -> int:
        """Shut down this process's sockets to the module's server; returns how many.

        A call blocked on a hung network HSM then returns CKR_DEVICE_ERROR
        (docs/FACTS.md). The sockets are found by their peer address, so this also
        catches the socket a C_Initialize in progress just opened. Other
        connections to the *same* server are cut too: they hang on it as well.
        """
        if self._server_path is None or self.inherited:
            return 0
        return sum(_shut_down(fd) for fd in self._sockets())

    def cut_link(self) -> bool:
        """Shut down this instance's own socket to its server, and no other: a call stuck on it returns
        (CKR_DEVICE_ERROR) and the instance is broken until re-initialised, while every other instance
        on the same server goes on. False when there is nothing to cut: no socket module, or the socket
        is no longer the one found at C_Initialize (p11-kit-client closed it, the number was reused)."""
        if self.inherited:
            return False
        if self._waiting:  # for another link's C_Initialize: end the wait
            self._wait_cut = True
            return True
        before = self._init_before
        if before is not None and self.lib is None and not self._probing:
            # A first load, in python-pkcs11's hands: a socket cut in its handshake is one nobody can
            # close again (docs/FACTS.md). Its server answered hsmfsm's own version byte a moment ago
            # (:func:`_handshake`, which is cut), so this load is quick, or left to the call timeout.
            return False
        if before is not None:  # a C_Initialize is under way (the connect, or its handshake, hangs)
            # New by socket, not by fd number: another thread's scan (:meth:`_sockets`, of another
            # member's C_Initialize) holds a passing dup of some other link's socket under a new number.
            known = set(before.values())
            return self._cut_sockets({fd: name for fd, name in self._sockets().items() if name not in known})
        link = self._link
        if link is None:
            return False
        return self._cut_sockets(dict([link]))

    @staticmethod
    def _cut_sockets(sockets: dict[int, str]) -> bool:
        """Shut each fd down that still is the socket named (its /proc link text); True if any was."""
        cut = False
        for fd, name in sockets.items():
            try:
                if os.readlink(f"/proc/self/fd/{fd}") != name:
                    continue
            except OSError:
                continue
            cut = _shut_down(fd) or cut
        return cut

    def _sockets(self) -> dict[int, str]:
        """This process's sockets to this instance's server: fd -> its /proc link text."""
        return {} if self._server_path is None else sockets_to(self._server_path)

    def for_child(self) -> ModuleInstance:
        """In a forked child: the instance to use from now on.

        A module that talks to its HSM over a socket (p11-kit-client) gets a
        fresh instance: a new load under a path of its own, so a new
        C_GetFunctionList and C_Initialize and a socket of the child's own.
        The inherited instance is left alone for good. An in-process module
        (SoftHSM) is one instance per process and its state is the child's own
        copy: the same instance is re-initialised by the next connect.
        """
        if self.inherited or self._server_path is not None:
            return ModuleInstance(self.module, self.env, self.name)
        return self

    def __repr__(self) -> str:
        return f"<ModuleInstance {self.name} {self.module} initialized={self.initialized} parallel={self.parallel}>"


def _output(fn: Any, session_handle: int, data: bytes, size: int) -> tuple[int, bytes]:
    """The second half of a single-part operation (C_Sign, C_Decrypt): the output into ``size`` bytes,
    and again into the length the module names if it answers CKR_BUFFER_TOO_SMALL."""
    length = CK_ULONG(size)
    out = ctypes.create_string_buffer(size)
    rv: int = fn(session_handle, data, len(data), out, length)
    if rv == CKR_BUFFER_TOO_SMALL:
        out = ctypes.create_string_buffer(length.value)
        rv = fn(session_handle, data, len(data), out, length)
    if rv != CKR_OK:
        return rv, b""
    return rv, out.raw[:length.value]


_SessionInfo = SessionInfo  # the soak's old name
