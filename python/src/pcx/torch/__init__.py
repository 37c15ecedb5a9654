"""PyTorch's precompile context and dynamo cache, stored in pcx: one line, no edits to torch.

::

    import pcx.torch; pcx.torch.install()     # or PCX_TORCH=1, or pytest -p pcx.torch

Then, with ``torch._dynamo.config.caching_precompile`` on (``TORCH_CACHING_PRECOMPILE=1``),
every artifact and dynamo entry torch records goes to pcx as a durable event,
``torch.compiler.save_cache_artifacts()`` stitches and saves in pcx, and the next process's
``torch.compile`` warm-starts from pcx (torch's own ``after_deserialization`` runs in Python on
the bytes pcx returns). With no client given, the embedded default is used: a per-user data
directory and a ``pcx serve`` started once and reused (:mod:`pcx.server`).

Works with torch 2.10 (the precompile API is private and changes between releases; ``install``
refuses a torch without it).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import socket
import threading
import time
from typing import Any, Optional

from ..client import Client
from ..transport import SocketTransport
from ..errors import UnknownOp
from .hooks import Hooks

__all__ = ["install", "uninstall", "installed", "default_namespace"]

_hooks: Optional[Hooks] = None
#: How long the drop of this process's context may take at exit.
_DROP_TIMEOUT_S = 5.0
#: Serialises install and uninstall: threads of a pool that each called ``install()`` at
#: once all found nothing installed, and each put its hooks over the one before, saving
#: those as torch's own, so ``uninstall()`` (or a fall-back) put pcx's hooks back, not torch's.
_installing = threading.Lock()


def default_namespace() -> str:
    """One namespace per torch cache directory, as torch's ``DynamoCache`` is one directory
    per cache dir (torch's tests isolate by cache directory)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    digest = hashlib.sha256(os.path.abspath(cache_dir()).encode()).hexdigest()[:16]
    return f"torch-{digest}"


def _process_context() -> str:
    """This process's own context, as torch's PrecompileContext is per process."""
    host = re.sub(r"[^A-Za-z0-9_.:@+-]", "-", socket.gethostname())[:64]
    return f"torch@{host}:{os.getpid()}:{int(time.time() * 1000)}"


def _supports(client: Client, op: str) -> bool:
    try:
        client.request(op)
    except UnknownOp:
        return False
    except Exception:
        # Known to the server (it refused the request itself, e.g. a missing field).
        return True
    return True


def install(
    client: Optional[Client] = None,
    *,
    namespace: Optional[str] = None,
    torch_kinds: Optional[bool] = None,
) -> Client:
    """Makes torch's precompile context and dynamo cache use pcx through ``client`` (the
    embedded default when ``None``), and returns the client torch uses: a view of the same
    connection in this process's own context and torch's namespace (the client given keeps
    its own). Idempotent: a second call returns the client in use.

    ``namespace``: the dynamo cache namespace, used when the server has namespaces; default
    ``$PCX_TORCH_NAMESPACE``, else one per torch cache directory (as torch's own cache is one
    directory), the directory torch's cache is in at each call, as torch finds it. Processes on several machines share a cache by naming the same namespace. ``torch_kinds``: record artifacts as
    ``torch.bundled_aot_autograd``/``torch.pickle`` (needs pcx's torch-pickle plugin in the
    server's plugin directory) instead of ``eager``; default from ``PCX_TORCH_KINDS=1``."""
    with _installing:
        return _install(client, namespace=namespace, torch_kinds=torch_kinds)


def _install(
    client: Optional[Client], *, namespace: Optional[str], torch_kinds: Optional[bool]
) -> Client:
    global _hooks
    if _hooks is not None:
        return _hooks.client
    try:
        from torch._dynamo import package, precompile_context  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            f"pcx.torch needs torch with the precompile API (torch 2.10): {e}"
        ) from e
    if client is None:
        client = Client.default()
    named = _supports(client, "list_contexts")
    own_context = named and client.context is None
    namespace = namespace or client.namespace or os.environ.get("PCX_TORCH_NAMESPACE")
    if named:
        # A view of the connection: the client given keeps its own context and namespace
        # for the caller's own requests.
        client = client.scoped(
            context=client.context or _process_context(),
            namespace=namespace or default_namespace(),
        )
    if torch_kinds is None:
        torch_kinds = os.environ.get("PCX_TORCH_KINDS") == "1"
    hooks = Hooks(
        client,
        torch_kinds=torch_kinds,
        shared_cache=named,
        # None named: the namespace follows torch's cache directory, as its DynamoCache does.
        namespace_of_cache_dir=default_namespace if named and not namespace else None,
    )
    hooks.apply()
    _hooks = hooks
    if own_context:
        atexit.register(_drop_context_at_exit, hooks, os.getpid())
    return client


def _drop_context_at_exit(hooks: Hooks, pid: int) -> None:
    """Drops the context :func:`install` made for this process, as torch's own precompile
    context ends with its process: otherwise every rank of every run (every notebook kernel
    restarted) left its artifacts and entries in the shared server for good, growing its
    state, snapshots and restarts without bound. What was saved is in the dynamo cache, and
    the log keeps the history. Skipped in a forked child (the context is its parent's) and on
    a broken connection (a fall-back because pcx could not be reached: the request fails at
    once), and bounded: a server that does not answer within a few seconds does not hold up
    the exit."""
    if os.getpid() != pid:
        return
    transport = hooks.client._transport
    try:
        if isinstance(transport, SocketTransport):
            transport.socket.settimeout(_DROP_TIMEOUT_S)
        # Only a context that holds something: a drop is an event in the log, and a process
        # that recorded nothing (it only loaded from the cache, or compiled nothing) would
        # leave one at every exit.
        if any(c.get("name") == hooks.client.context for c in hooks.client.list_contexts()):
            hooks.client.drop_context()
    except Exception:  # the server gone, or the client closed: nothing to tidy up there
        pass


def uninstall() -> None:
    """Puts torch's own precompile context and dynamo cache back."""
    global _hooks
    with _installing:
        if _hooks is not None:
            _hooks.remove()
            _hooks = None


def installed() -> Optional[Client]:
    """The client in use, or ``None`` when not installed (or fallen back to torch's own
    context and cache because pcx could not be reached)."""
    return None if _hooks is None or _hooks.fell_back is not None else _hooks.client


def pytest_configure(config: Any) -> None:
    """``pytest -p pcx.torch``: the whole session's torch runs on pcx."""
    install()


def pytest_unconfigure(config: Any) -> None:
    uninstall()
