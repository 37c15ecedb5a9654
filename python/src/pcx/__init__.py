"""pcx's Python side: a client for pcx (the durable, event-sourced store of PyTorch's
precompile context) and :mod:`pcx.torch`, which makes torch itself record into pcx and
warm-start from it.

::

    import pcx
    with pcx.Client.default() as client:      # the per-user server, started once
        client.record_artifact("b1", b"compiled bytes")

Errors are raised as :class:`pcx.PcxError` subclasses named after the error kind.
"""

from __future__ import annotations

from .client import Client
from .errors import *  # noqa: F401,F403  (one class per error kind)
from .errors import PcxError, ServerStartError, TransportError, error_from_answer
from .server import default_data_dir, ensure_server, find_binary

__all__ = [
    "Client",
    "PcxError",
    "ServerStartError",
    "TransportError",
    "error_from_answer",
    "default_data_dir",
    "ensure_server",
    "find_binary",
]
__version__ = "0.1.0"
