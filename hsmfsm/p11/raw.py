"""Plain python-pkcs11, with no hsmfsm in between: the baseline of ``hsmfsm bench`` and wire tests.

The lab and the benchmark need a raw session to compare against and to talk
to a server past hsmfsm; this keeps python-pkcs11 inside ``hsmfsm.p11`` all
the same. Nothing here recovers from anything: that is the point.
"""

from __future__ import annotations

from typing import Any

import pkcs11

from .module import load_isolated


def load_raw_client(client_module: str, address: str, name: str = "raw-client") -> Any:
    """A plain python-pkcs11 ``lib`` on a p11-kit-client instance of its own (its own socket).

    It loads under a path of its own, because python-pkcs11 caches per path,
    with ``P11_KIT_SERVER_ADDRESS`` applied under hsmfsm's environment lock,
    because p11-kit-client reads it at load time (docs/FACTS.md). ``Any``:
    python-pkcs11 ships no type information.
    """
    return load_isolated(client_module, {"P11_KIT_SERVER_ADDRESS": address}, name)


def raw_session(lib: Any, token_label: str, pin: str) -> Any:
    """A logged-in python-pkcs11 session on the token labelled ``token_label``."""
    return lib.get_token(token_label=token_label).open(user_pin=pin)


def raw_private_key(session: Any, label: str) -> Any:
    """The private key labelled ``label`` (python-pkcs11's own lookup)."""
    return session.get_key(label=label, object_class=pkcs11.ObjectClass.PRIVATE_KEY)


def mechanism(name: str) -> Any:
    """python-pkcs11's value of a mechanism name such as ``SHA256_RSA_PKCS``."""
    return pkcs11.Mechanism[name]
