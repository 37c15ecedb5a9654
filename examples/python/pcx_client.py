"""A small client for ``pcx serve``, written as documentation by example.

The wire format
---------------
A connection carries *frames* both ways. A frame is a 4-byte big-endian length followed by
that many bytes holding exactly one MessagePack value. Requests and answers are the maps of
``pcx batch``'s JSON lines (same keys, same answers, see docs/protocol.md), except that every field
whose name ends in ``_b64`` carries **bytes**: send them as MessagePack binary (``bytes``
here; base64 text is accepted too) and they come back as binary. Answers arrive in the order
the requests were sent, each once its change is durable.

Every answer has ``"ok"``. A failure is ``{"ok": false, "error": {"kind": K, "message": M}}``;
this client raises it as :class:`PcxError`. On TCP (loopback only, off by default) the first
frame must be ``{"op": "auth", "token": T}``; the server answers ``{"ok": true}`` or refuses
with ``unauthorized`` and closes the connection.

Example::

    from pcx_client import PcxClient

    with PcxClient.unix("pcx-data/pcx.sock") as pcx:
        pcx.record_artifact("b1", b"compiled bytes")
        pcx.record_dynamo_cache_entry("e1", {"device_type": "cpu",
                                             "codes": [{"backend_ids": ["b1"]}]})
        pcx.save_to_dynamo_cache()
        entry = pcx.load_cache_entry("e1")
        assert entry["entry"]["backends"]["b1"]["content_b64"] == b"compiled bytes"

Needs the ``msgpack`` package (``python3 -m pip install msgpack``).
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Dict, Iterable, List, Optional

import msgpack

__all__ = ["PcxClient", "PcxError", "Answer"]

#: An answer map, as the server sent it (``*_b64`` fields hold ``bytes``).
Answer = Dict[str, Any]

_HEADER = struct.Struct(">I")


class PcxError(Exception):
    """The server answered ``{"ok": false, ...}``: ``kind`` is the error kind (for example
    ``key_not_found``), ``message`` the text, ``answer`` the whole answer."""

    def __init__(self, kind: str, message: str, answer: Answer) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.answer = answer


class PcxClient:
    """One connection to ``pcx serve``. Not thread-safe: use one client per thread or process
    (the server takes many connections at once and commits their changes together)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    # -- connecting -----------------------------------------------------------------------

    @classmethod
    def unix(cls, path: str, timeout: Optional[float] = 60.0) -> "PcxClient":
        """Connects to the server's Unix socket (``socket_path``, by default
        ``<data_dir>/pcx.sock``)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        return cls(sock)

    @classmethod
    def tcp(cls, host: str, port: int, token: str, timeout: Optional[float] = 60.0) -> "PcxClient":
        """Connects over loopback TCP and authenticates with the server's ``tcp_token``."""
        sock = socket.create_connection((host, port), timeout=timeout)
        client = cls(sock)
        try:
            client.request("auth", token=token)
        except BaseException:
            client.close()
            raise
        return client

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "PcxClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- frames ---------------------------------------------------------------------------

    def send(self, request: Dict[str, Any]) -> None:
        """Writes one request frame without waiting for its answer."""
        body = msgpack.packb(request, use_bin_type=True)
        self._sock.sendall(_HEADER.pack(len(body)) + body)

    def receive(self) -> Answer:
        """Reads the next answer frame (answers come in request order)."""
        (length,) = _HEADER.unpack(self._read_exactly(_HEADER.size))
        return msgpack.unpackb(self._read_exactly(length), raw=False)

    def _read_exactly(self, n: int) -> bytes:
        chunks: List[bytes] = []
        while n > 0:
            chunk = self._sock.recv(min(n, 1 << 20))
            if not chunk:
                raise ConnectionError("the pcx server closed the connection")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def request(self, op: str, **fields: Any) -> Answer:
        """Sends ``{"op": op, **fields}`` and gives its answer; raises :class:`PcxError` when
        the answer is a failure."""
        self.send({"op": op, **fields})
        return _checked(self.receive())

    def pipeline(self, requests: Iterable[Dict[str, Any]], window: int = 64) -> List[Answer]:
        """Sends many requests with up to ``window`` in flight and gives every answer, in
        order, failures included (nothing is raised for them). Far faster than one
        ``request`` at a time: the server commits requests that arrive together in one group.
        Keep ``window`` at or below the server's ``max_in_flight_per_connection``."""
        answers: List[Answer] = []
        in_flight = 0
        for r in requests:
            self.send(r)
            in_flight += 1
            if in_flight >= window:
                answers.append(self.receive())
                in_flight -= 1
        for _ in range(in_flight):
            answers.append(self.receive())
        return answers

    # -- the requests (one method each; see docs/protocol.md for the answers) ----------------------

    def record_artifact(self, key: str, content: bytes, kind: str = "eager") -> int:
        """Records (or replaces) a backend artifact; gives the event's ``seq``."""
        return self.request("record_artifact", key=key, kind=kind, content_b64=content)["seq"]

    def record_dynamo_cache_entry(self, key: str, entry: Dict[str, Any]) -> int:
        """Records a Dynamo cache entry: ``{"device_type", "codes": [{"backend_ids": [...],
        "payload_b64": bytes?, ...}], "fn_name"?, "fn_first_lineno"?, "system_info"?,
        "source_info"?}``; gives ``seq``."""
        return self.request("record_dynamo_cache_entry", key=key, entry=entry)["seq"]

    def edit_artifact_set(self, key: str, content: bytes) -> int:
        """Replaces an artifact's content (``key_not_found`` if there is none)."""
        return self.request("edit_artifact", key=key, edit={"set_b64": content})["seq"]

    def edit_artifact_append(self, key: str, suffix: bytes) -> int:
        """Appends to an artifact's content."""
        return self.request("edit_artifact", key=key, edit={"append_b64": suffix})["seq"]

    def edit_artifact_plugin(self, key: str, op: str, args: bytes = b"") -> int:
        """Applies a named edit of the plugin serving the artifact's kind."""
        edit = {"plugin": {"op": op, "args_b64": args}}
        return self.request("edit_artifact", key=key, edit=edit)["seq"]

    def serialize_artifact_by_key(self, key: str) -> Optional[Answer]:
        """Gives ``{"key", "kind", "content_b64": bytes}``, or None if there is no such artifact."""
        return self.request("serialize_artifact_by_key", key=key)["artifact"]

    def take_artifact(self, key: str) -> Optional[Answer]:
        """Removes an artifact and gives it (None if there was none)."""
        return self.request("take_artifact", key=key)["artifact"]

    def clear(self) -> int:
        """Empties the context (the dynamo cache is kept)."""
        return self.request("clear")["seq"]

    def dump_debug_info(self) -> Dict[str, Any]:
        """PyTorch's debug info: ``{"dynamo": [...], "backends": [...]}`` (empty lists left out)."""
        return self.request("dump_debug_info")["debug_info"]

    def create_cache_entries(self) -> Answer:
        """Stitches every entry with its artifacts: ``{"debug_info", "entries": {KEY:
        {"dynamo", "backends"}}}``; a code naming a missing artifact comes back with
        ``"bypassed": True`` and a ``bypass_reason``."""
        return self.request("create_cache_entries")

    def save_to_dynamo_cache(self) -> Answer:
        """Stitches and saves every entry to the dynamo cache; the answer has ``debug_info``."""
        return self.request("save_to_dynamo_cache")

    def load_cache_entry(self, key: str, system_info: Optional[Dict[str, Any]] = None) -> Answer:
        """Loads a saved entry: ``{"entry": {"dynamo", "backends"}, "deserialized": {ID:
        {"kind", "plugin", "description", "content_b64"}}}``. Raises ``package_not_found`` or,
        when ``system_info`` differs from the saved one, ``system_mismatch``."""
        fields: Dict[str, Any] = {"key": key}
        if system_info is not None:
            fields["system_info"] = system_info
        return self.request("load_cache_entry", **fields)

    def stats(self) -> Dict[str, Any]:
        """Counters since the server started: events, flushes, events per flush, stitches,
        dynamo cache hits/misses/errors, plugin calls, connections, queue depth, ..."""
        return self.request("stats")["stats"]

    # -- audit queries ----------------------------------------------------------------------

    def log(self, **filters: Any) -> List[Dict[str, Any]]:
        """Events as log lines; filters (all optional, bounds inclusive): ``from_``, ``to``,
        ``since``, ``until`` (RFC 3339), ``key``, ``event`` (e.g. "ArtifactEdited"), ``limit``."""
        if "from_" in filters:
            filters["from"] = filters.pop("from_")
        return self.request("log", **filters)["events"]

    def history(self, key: str) -> List[Dict[str, Any]]:
        """Every event that touched ``key``, oldest first."""
        return self.request("history", key=key)["history"]

    def state(
        self, at: Optional[int] = None, at_time: Optional[str] = None, key: Optional[str] = None
    ) -> Dict[str, Any]:
        """The context right after event ``at`` (or the last event at ``at_time``; the latest
        by default); with ``key``, that artifact's content as it was then."""
        fields = {k: v for k, v in (("at", at), ("at_time", at_time), ("key", key)) if v is not None}
        return self.request("state", **fields)["state"]

    def diff(self, from_: int, to: int) -> Dict[str, Any]:
        """What was added, changed, taken or cleared between two sequence numbers."""
        return self.request("diff", **{"from": from_, "to": to})["diff"]

    def verify(self) -> Dict[str, Any]:
        """Checks the whole log (records, sequence, hash chain, blobs, snapshots)."""
        return self.request("verify")["verify"]


def _checked(answer: Answer) -> Answer:
    if answer.get("ok") is True:
        return answer
    error = answer.get("error") or {}
    raise PcxError(str(error.get("kind", "unknown")), str(error.get("message", "")), answer)
