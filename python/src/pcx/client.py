"""The client: one method per operation of pcx's protocol (docs/protocol.md), over either
transport, with failures raised as typed errors.

Three ways to get one::

    Client.connect("/path/to/pcx.sock")          # a running ``pcx serve``
    Client.batch("/path/to/data", binary="pcx")  # a ``pcx batch`` child owning the directory
    Client.default()                             # the embedded default: a per-user data
                                                 # directory and a ``pcx serve`` started once
                                                 # and reused (see :mod:`pcx.server`)
    Client.follow()                              # a fleet's journal in PostgreSQL: whichever
                                                 # ``pcx serve`` holds it now

Every method sends one request and returns its answer map (``*_b64`` fields as ``bytes``).
``context`` and ``namespace``, when given to the constructor, go with every request that takes
them (named contexts and the namespaced dynamo cache); left ``None`` they are not sent, so the
client also works with a server that predates them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import hmac
import json
import os
import subprocess
import threading
import time
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

from .errors import CorruptLog, InvalidRequest, TransportError, error_from_answer
from .transport import Answer, BatchTransport, SocketTransport, Transport

__all__ = ["Client"]


def _tcp_proof(token: str, role: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """What ``role`` sends to prove it knows ``token`` (src/interface/tcp_auth.rs)."""
    message = f"pcx-tcp-auth-v1/{role}\0".encode() + client_nonce + server_nonce
    return hmac.new(token.encode(), message, hashlib.sha256).digest()

# Requests that address a context, and those that address the dynamo cache's namespace.
_CONTEXT_OPS = frozenset(
    {
        "record_artifact",
        "record_dynamo_cache_entry",
        "edit_artifact",
        "serialize_artifact_by_key",
        "take_artifact",
        "clear",
        "dump_debug_info",
        "create_cache_entries",
        "save_to_dynamo_cache",
        "load_cache_entry",
        "put_cache_entry",
        "drop_context",
    }
)
_NAMESPACE_OPS = frozenset(
    {
        "save_to_dynamo_cache",
        "load_cache_entry",
        "put_cache_entry",
        "get_cache_entry",
        "delete_cache_entry",
        "list_cache_entries",
        "clear_dynamo_cache",
    }
)


def _bytes(what: str, value: Any) -> Any:
    """``value`` if it is bytes: text sent in a ``*_b64`` field is read by pcx as base64, so
    ``"abcd"`` would be stored as the three bytes it decodes to."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, not {type(value).__name__}")
    return value


class Client:
    """A connection to pcx. Thread-safe: requests from several threads are sent one at a time
    (each waits for its answer), as torch's compile threads may record concurrently."""

    def __init__(
        self,
        transport: Transport,
        *,
        context: Optional[str] = None,
        namespace: Optional[str] = None,
    ) -> None:
        self._transport = transport
        self._lock = threading.Lock()
        #: The process the connection belongs to: a forked child inherits the object, and
        #: with it the parent's socket (or pipes), which it must not use (see :meth:`_owned`).
        self._pid = os.getpid()
        #: Why the connection was given up (``None`` while it is in step with its answers);
        #: shared with the views :meth:`scoped` makes of this connection.
        self._link: Dict[str, Optional[str]] = {"broken": None}
        self.context = context
        self.namespace = namespace
        #: Seconds spent in :meth:`request` (sending and waiting for answers), for
        #: measuring pcx's own share of a caller's time.
        self.busy_s = 0.0

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        socket_path: str,
        *,
        timeout: Optional[float] = 120.0,
        context: Optional[str] = None,
        namespace: Optional[str] = None,
    ) -> "Client":
        """Connects to a running ``pcx serve`` on its Unix socket."""
        return cls(
            SocketTransport.unix(socket_path, timeout=timeout),
            context=context,
            namespace=namespace,
        )

    @classmethod
    def tcp(
        cls,
        host: str,
        port: int,
        token: str,
        *,
        timeout: Optional[float] = 120.0,
        context: Optional[str] = None,
        namespace: Optional[str] = None,
    ) -> "Client":
        """Connects over loopback TCP and authenticates with the server's ``tcp_token``
        (:class:`pcx.Unauthorized` when it is not the server's, or when the server cannot prove
        that it knows the token). The token itself is never sent: the server proves it knows
        it first, then this client does (docs/protocol.md, TCP authentication), so a process
        that took over the address of a server that died learns nothing and is sent nothing."""
        client = cls(
            SocketTransport.tcp(host, port, timeout=timeout),
            context=context,
            namespace=namespace,
        )
        try:
            client._authenticate(token)
        except BaseException:
            client.close()
            raise
        return client

    def _authenticate(self, token: str) -> None:
        from .errors import Unauthorized

        client_nonce = os.urandom(32)
        challenge = self.request("auth_challenge", client_nonce_b64=client_nonce)
        server_nonce = challenge.get("server_nonce_b64")
        server_proof = challenge.get("server_proof_b64")
        if not (
            isinstance(server_nonce, bytes)
            and len(server_nonce) == 32
            and isinstance(server_proof, bytes)
            and hmac.compare_digest(
                server_proof, _tcp_proof(token, "server", client_nonce, server_nonce)
            )
        ):
            message = (
                "the server's proof does not match the token given, so either the token is "
                "not this server's or the address is not the pcx server meant (now another "
                "process's?); nothing but a nonce was sent to it"
            )
            # Said as the server says a refusal, so callers read it alike.
            error = {"kind": Unauthorized.KIND, "message": message}
            raise Unauthorized(Unauthorized.KIND, message, {"ok": False, "error": error})
        self.request(
            "auth_proof",
            client_proof_b64=_tcp_proof(token, "client", client_nonce, server_nonce),
        )

    @classmethod
    def batch(
        cls,
        data_dir: str,
        *,
        binary: Optional[str] = None,
        context: Optional[str] = None,
        namespace: Optional[str] = None,
    ) -> "Client":
        """Starts a ``pcx batch`` child that owns ``data_dir`` for as long as this client."""
        from .server import find_binary

        return cls(
            BatchTransport(binary or find_binary(), data_dir),
            context=context,
            namespace=namespace,
        )

    @classmethod
    def default(
        cls, *, context: Optional[str] = None, namespace: Optional[str] = None
    ) -> "Client":
        """The embedded default: connects to the per-user ``pcx serve``, starting it if no
        process serves it yet (:func:`pcx.server.ensure_server`).

        The connection answers one request (``stats``) before it is handed out: a server
        told to stop closes its listener and resets the connections still in its backlog, so
        a connect that succeeded in that moment is not yet a server. Until one answers (up
        to :data:`pcx.server.START_TIMEOUT_S`), the next server is found or started. The
        user at the other end is checked on this very connection, not on an earlier one."""
        from pathlib import Path

        from . import server

        deadline = time.monotonic() + server.START_TIMEOUT_S
        while True:
            path = server.ensure_server()
            try:
                client = cls.connect(path, context=context, namespace=namespace)
            except OSError as e:
                failure: Exception = e
            else:
                try:
                    if isinstance(client._transport, SocketTransport):
                        server.check_peer(client._transport.socket, Path(path))
                    client.request("stats")
                    return client
                except TransportError as e:
                    client.close()
                    failure = e
                except BaseException:
                    client.close()
                    raise
            if time.monotonic() >= deadline:
                raise TransportError(
                    f"no pcx server at {path} answered within {server.START_TIMEOUT_S:.0f} s "
                    f"(the last attempt: {failure})"
                )
            time.sleep(0.05)

    @classmethod
    def follow(
        cls,
        *,
        binary: Optional[str] = None,
        token: Optional[str] = None,
        timeout: Optional[float] = 120.0,
        context: Optional[str] = None,
        namespace: Optional[str] = None,
    ) -> "Client":
        """Connects to the ``pcx serve`` that holds a fleet's journal now (the journal named by
        the environment: ``PCX_JOURNAL=postgres``, ``PCX_JOURNAL_URL``, ``PCX_JOURNAL_NAME``),
        as ``pcx holder`` finds it in the database. After a takeover the address moves: call
        it again when a connection breaks, and retry with the same ``request_id``."""
        from .errors import TransportError
        from .server import find_binary

        done = subprocess.run(
            [binary or find_binary(), "holder"], capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise TransportError(f"pcx holder failed: {done.stderr.strip()}")
        found = json.loads(done.stdout)
        address: str = found["address"]
        if "/" not in address and ":" in address:
            host, port = address.rsplit(":", 1)
            client = cls.tcp(
                host,
                int(port),
                token if token is not None else os.environ.get("PCX_TCP_TOKEN", ""),
                timeout=timeout,
                context=context,
                namespace=namespace,
            )
        else:
            client = cls.connect(address, timeout=timeout, context=context, namespace=namespace)
        # The address is a socket path or a loopback port: on another machine, or after the
        # holder died and another server took its path or port, it is some other journal's
        # server. Nothing is sent before the server says it holds this journal at this epoch.
        try:
            stats = client.stats()
        except BaseException:
            client.close()
            raise
        if stats.get("journal") != found["journal"] or stats.get("epoch") != found["epoch"]:
            client.close()
            serves = (
                f"journal {stats['journal']} at epoch {stats.get('epoch')}"
                if stats.get("journal") is not None
                else "no journal in the database (a data directory of its own)"
            )
            raise TransportError(
                f"the server at {address} serves {serves}, not journal {found['journal']} as "
                f"its holder {found['holder']} at epoch {found['epoch']}: that holder is gone "
                "or the address is another machine's or another server's; nothing was sent"
            )
        return client

    def scoped(self, *, context: Optional[str], namespace: Optional[str]) -> "Client":
        """A client on this same connection (requests still go one at a time, and a failure
        gives up both) whose requests go to ``context`` and ``namespace``; this client keeps
        its own (how :func:`pcx.torch.install` uses a client it is given)."""
        view = copy.copy(self)
        view.context = context
        view.namespace = namespace
        view.busy_s = 0.0
        return view

    def close(self) -> None:
        # In a forked child the connection is the parent's: closing a `pcx batch` child's
        # pipes would flush the parent's buffered requests a second time.
        if os.getpid() != self._pid:
            return
        # Its views (see scoped) then refuse requests, saying why, on every transport.
        self._link["broken"] = self._link["broken"] or "the client was closed"
        self._transport.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one request ------------------------------------------------------------------------

    def request(self, op: str, **fields: Any) -> Answer:
        """Sends ``{"op": op, **fields}`` (fields that are ``None`` left out) and returns the
        answer, or raises the :class:`pcx.PcxError` subclass of its kind."""
        req = self._scope({"op": op, **{k: v for k, v in fields.items() if v is not None}})
        self._owned()
        with self._lock:
            started = time.perf_counter()
            with self._in_step(alone=True):
                self._transport.send(req)
                answer = self._transport.receive()
            self.busy_s += time.perf_counter() - started
        if not answer.get("ok"):
            raise error_from_answer(answer)
        return answer

    def _scope(self, request: Mapping[str, Any]) -> Dict[str, Any]:
        """``request`` with this client's context and namespace, for the ops that take them
        (one the request names itself is kept)."""
        req: Dict[str, Any] = {"op": request.get("op")}
        op = req["op"]
        if self.context is not None and op in _CONTEXT_OPS:
            req["context"] = self.context
        if self.namespace is not None and op in _NAMESPACE_OPS:
            req["namespace"] = self.namespace
        req.update(request)
        return req

    def _owned(self) -> None:
        """Refuses use in a forked child: the connection is its parent's, and two processes on
        one connection interleave their frames and read each other's answers (and the child's
        changes would land in the parent's context). Checked before the lock, which a thread
        of the parent may have held at the fork; nothing is sent, and the parent goes on."""
        if os.getpid() != self._pid:
            raise TransportError(
                f"this client's connection to {self._transport.description} belongs to process "
                f"{self._pid}, and this is its forked child {os.getpid()}: a child must not use "
                f"its parent's connection (make a new client in the child)"
            )

    @contextlib.contextmanager
    def _in_step(self, alone: bool = False) -> Iterator[None]:
        """Sending and receiving: refused on a connection given up before; a failure in the
        middle (a timeout, a closed connection, a garbage answer, an interrupt) gives this one
        up, since an answer may still be on its way and would be read as the next request's.
        With ``alone`` (one request, nothing else in flight), a request the transport refused
        before writing it (:class:`pcx.InvalidRequest`) leaves the connection in step."""
        if self._link["broken"] is not None:
            raise TransportError(
                f"the connection to {self._transport.description} was broken by an earlier "
                f"failure ({self._link['broken']}); make a new client (a change sent with a "
                f"request_id can be retried safely)"
            )
        try:
            yield
        except InvalidRequest:
            if not alone:
                self._give_up("a request refused before it was sent, with others in flight")
            raise
        except BaseException as e:
            self._give_up(f"{type(e).__name__}: {e}")
            raise

    def _give_up(self, why: str) -> None:
        self._link["broken"] = why
        try:
            self._transport.close()
        except Exception:  # already broken; closing is a courtesy
            pass

    def pipeline(self, requests: Iterable[Mapping[str, Any]], window: int = 64) -> List[Answer]:
        """Sends many request maps (with this client's context and namespace, as
        :meth:`request` does) with up to ``window`` in flight and gives every answer, in
        order, failures included (nothing is raised for them). Far faster than one request at
        a time: the server commits requests that arrive together in one group. Keep
        ``window`` at or below the server's ``max_in_flight_per_connection``."""
        answers: List[Answer] = []
        self._owned()
        with self._lock:
            started = time.perf_counter()
            in_flight = 0
            with self._in_step():
                for r in requests:
                    self._transport.send(self._scope(r))
                    in_flight += 1
                    if in_flight >= window:
                        answers.append(self._transport.receive())
                        in_flight -= 1
                for _ in range(in_flight):
                    answers.append(self._transport.receive())
            self.busy_s += time.perf_counter() - started
        return answers

    # -- the context (PyTorch's PrecompileContext) ------------------------------------------

    def record_artifact(self, key: str, content: bytes, kind: str = "eager") -> Answer:
        return self.request(
            "record_artifact", key=key, kind=kind, content_b64=_bytes("content", content)
        )

    def record_dynamo_cache_entry(self, key: str, entry: Mapping[str, Any]) -> Answer:
        return self.request("record_dynamo_cache_entry", key=key, entry=dict(entry))

    def edit_artifact(
        self,
        key: str,
        *,
        set: Optional[bytes] = None,
        append: Optional[bytes] = None,
        plugin: Optional[Tuple[str, bytes]] = None,
        expected_digest: Optional[str] = None,
    ) -> Answer:
        """Replaces (``set``) or extends (``append``) an artifact's content, or applies the
        named edit ``plugin=(op, args)`` of the plugin serving its kind. With
        ``expected_digest`` (the ``digest`` a read answered), the edit applies only if the
        content is still that one; otherwise :class:`pcx.Conflict`."""
        given = [e for e in (set, append, plugin) if e is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of set=, append= and plugin=")
        edit: Dict[str, Any]
        if set is not None:
            edit = {"set_b64": _bytes("set", set)}
        elif append is not None:
            edit = {"append_b64": _bytes("append", append)}
        else:
            assert plugin is not None
            edit = {"plugin": {"op": plugin[0], "args_b64": _bytes("plugin args", plugin[1])}}
        return self.request(
            "edit_artifact", key=key, edit=edit, expected_digest=expected_digest
        )

    def serialize_artifact_by_key(self, key: str) -> Optional[Dict[str, Any]]:
        """The artifact (``{"key","kind","content_b64"}``), or ``None``."""
        artifact: Optional[Dict[str, Any]] = self.request(
            "serialize_artifact_by_key", key=key
        ).get("artifact")
        return artifact

    def take_artifact(self, key: str) -> Optional[Dict[str, Any]]:
        artifact: Optional[Dict[str, Any]] = self.request("take_artifact", key=key).get(
            "artifact"
        )
        return artifact

    def clear(self) -> Answer:
        return self.request("clear")

    def dump_debug_info(self) -> Dict[str, Any]:
        info: Dict[str, Any] = self.request("dump_debug_info")["debug_info"]
        return info

    def create_cache_entries(self, trace: bool = False) -> Answer:
        """Stitches; with ``trace``, the answer carries PyTorch's structured trace events
        (``"trace": [{"name", "payload"}]``) for the caller to re-emit."""
        return self.request("create_cache_entries", trace=trace or None)

    def save_to_dynamo_cache(self, trace: bool = False) -> Answer:
        """Stitches and saves; answers ``debug_info``, the keys ``saved`` and, with
        ``trace``, the stitch's structured trace events."""
        return self.request("save_to_dynamo_cache", trace=trace or None)

    def load_cache_entry(
        self, key: str, system_info: Optional[Mapping[str, Any]] = None
    ) -> Answer:
        return self.request(
            "load_cache_entry",
            key=key,
            system_info=dict(system_info) if system_info is not None else None,
        )

    # -- named contexts and the shared, namespaced dynamo cache -------------------------------

    def list_contexts(self) -> List[Dict[str, Any]]:
        contexts: List[Dict[str, Any]] = self.request("list_contexts")["contexts"]
        return contexts

    def drop_context(self) -> Answer:
        return self.request("drop_context")

    def put_cache_entry(self, key: str, entry: Mapping[str, Any]) -> Answer:
        """Writes one stitched entry (``{"dynamo": ENTRY, "backends": {ID: {"kind",
        "content_b64"}}}``) to the dynamo cache, as torch's ``DynamoStore.write`` does."""
        return self.request("put_cache_entry", key=key, entry=dict(entry))

    def get_cache_entry(self, key: str) -> Optional[Dict[str, Any]]:
        """The saved entry, or ``None``; changes nothing and counts nothing."""
        entry: Optional[Dict[str, Any]] = self.request("get_cache_entry", key=key).get(
            "entry"
        )
        return entry

    def delete_cache_entry(self, key: str) -> bool:
        return bool(self.request("delete_cache_entry", key=key).get("deleted"))

    def list_cache_entries(self) -> List[Dict[str, Any]]:
        entries: List[Dict[str, Any]] = self.request("list_cache_entries")["entries"]
        return entries

    def clear_dynamo_cache(self) -> int:
        return int(self.request("clear_dynamo_cache").get("cleared", 0))

    # -- audit ------------------------------------------------------------------------------

    def log(self, **filters: Any) -> List[Dict[str, Any]]:
        """Events as log lines; filters (all optional, bounds inclusive): ``from_``, ``to``,
        ``since``, ``until`` (RFC 3339), ``key``, ``event`` (e.g. "ArtifactEdited"),
        ``limit``."""
        if "from_" in filters:
            filters["from"] = filters.pop("from_")
        events: List[Dict[str, Any]] = self.request("log", **filters)["events"]
        return events

    def history(self, key: str) -> List[Dict[str, Any]]:
        """Every event that touched ``key``, oldest first."""
        history: List[Dict[str, Any]] = self.request("history", key=key)["history"]
        return history

    def state(
        self, at: Optional[int] = None, at_time: Optional[str] = None, key: Optional[str] = None
    ) -> Dict[str, Any]:
        """The context right after event ``at`` (or the last at ``at_time``; the latest by
        default); with ``key``, that artifact's content as it was then."""
        state: Dict[str, Any] = self.request("state", at=at, at_time=at_time, key=key)["state"]
        return state

    def diff(self, from_: int, to: int) -> Dict[str, Any]:
        """What was added, changed, taken or cleared between two sequence numbers."""
        diff: Dict[str, Any] = self.request("diff", **{"from": from_, "to": to})["diff"]
        return diff

    def verify(self) -> Dict[str, Any]:
        """Checks the whole log (records, sequence, hash chain, blobs, snapshots) and gives
        its summary. A log that is not sound raises :class:`CorruptLog` naming the first bad
        event (``answer["verify"]`` holds the report): a report handed back instead would
        pass a damaged log as sound to every caller that did not look inside it."""
        answer = self.request("verify")
        report: Dict[str, Any] = answer["verify"]
        if report.get("ok") is not True:
            raise CorruptLog(
                "corrupt_log",
                f"event {report.get('seq')}: {report.get('error')}",
                answer,
            )
        return report

    def export(self, output: str, content: str = "inline") -> Dict[str, Any]:
        """Has the server write the whole log, as ``pcx export`` does, to ``output`` (an
        absolute path, written with the server's rights): a backup of a live server, which
        ``pcx import`` restores. Over a socket only the server's own user may ask.
        Gives ``{"output", "events", "last_seq", "bytes"}``."""
        exported: Dict[str, Any] = self.request("export", output=output, content=content)[
            "exported"
        ]
        return exported

    def compact(self, before: int) -> Dict[str, Any]:
        """Drops the events before ``before`` and the content only they used, keeping the
        state, while the server goes on serving (writes wait for the swap; reads go on): the
        log of a server that never stops does not grow for ever. Over a socket only the
        server's own user may ask. Gives the report (``anchored_at``, ``events_removed``,
        ``blobs_removed``, ``reclaimed_bytes``…)."""
        answer = self.request("compact", before=before)
        return {k: v for k, v in answer.items() if k not in ("ok", "id")}

    def stats(self) -> Dict[str, Any]:
        """Counters since the server started (events, flushes, stitches, cache hits…)."""
        stats: Dict[str, Any] = self.request("stats")["stats"]
        return stats
