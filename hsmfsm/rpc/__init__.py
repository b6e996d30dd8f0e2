"""p11-kit's RPC protocol, the part a virtual PKCS#11 slot needs that does no I/O.

- :mod:`hsmfsm.rpc.wire`: the codec. Frames into values and values into frames, as
  bookworm's ``p11-kit-client.so`` (0.24.1) and later releases write them.
- :mod:`hsmfsm.rpc.catalog`: the virtual token's objects (stable handles, cached public
  attributes, template matching).

Pure: no sockets, threads or clock; it imports only :mod:`hsmfsm.core` and the standard
library (``tests/test_layers.py``). The server that uses it is :mod:`hsmfsm.runtime.server`.
"""

from __future__ import annotations

from . import catalog, wire

__all__ = ["catalog", "wire"]
