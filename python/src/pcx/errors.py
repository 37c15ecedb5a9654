"""Errors: every failure pcx answers is raised as a :class:`PcxError` subclass named after its kind.

pcx answers a failed request ``{"ok": false, "error": {"kind": K, "message": M}}`` and applies
nothing of it (docs/protocol.md, "Errors"). The kind is what a caller branches on, so each kind
has a class (``except pcx.KeyNotFound``), and every class carries ``.kind``, ``.message`` and the
whole ``.answer``. A kind this package does not know yet still raises :class:`PcxError` with its
``kind`` set, so a newer server never breaks an older client.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Type

__all__ = [
    "PcxError",
    "TransportError",
    "ServerStartError",
    "BadJson",
    "UnknownOp",
    "MissingField",
    "InvalidRequest",
    "BadBase64",
    "TooLarge",
    "InvalidKind",
    "InvalidEntry",
    "KeyNotFound",
    "PackageNotFound",
    "SystemMismatch",
    "NoPlugin",
    "PluginFailed",
    "NoSuchEdit",
    "ContentUnavailable",
    "SharedEntryUnsound",
    "SaveFailed",
    "Storage",
    "NoSpace",
    "Aborted",
    "Internal",
    "Closed",
    "Conflict",
    "RequestIdReused",
    "Compacted",
    "BeyondEnd",
    "CorruptLog",
    "BadFrame",
    "Unauthorized",
    "error_from_answer",
]


class PcxError(Exception):
    """pcx answered a failure. ``kind`` is the error kind (``"key_not_found"``…), ``message``
    pcx's text, ``answer`` the whole answer map (``{}`` for failures found on this side)."""

    #: The kind this class stands for; instances carry the kind actually answered.
    KIND: str = ""

    def __init__(self, kind: str, message: str, answer: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.answer: Dict[str, Any] = dict(answer or {})


class TransportError(PcxError, ConnectionError):
    """The connection to pcx failed: the server closed it, a frame was cut short, the spawned
    ``pcx batch`` exited. Requests in flight may or may not have been applied."""

    KIND = "transport"

    def __init__(self, message: str) -> None:
        super().__init__(self.KIND, message)


class ServerStartError(PcxError):
    """The embedded default server could not be found or started (the message says why and
    where its log is)."""

    KIND = "server_start"

    def __init__(self, message: str) -> None:
        super().__init__(self.KIND, message)


class BadJson(PcxError):
    """The request is not a JSON object."""

    KIND = "bad_json"


class UnknownOp(PcxError):
    """The ``op`` is not one pcx knows (the message lists them)."""

    KIND = "unknown_op"


class MissingField(PcxError):
    """A required field is absent."""

    KIND = "missing_field"


class InvalidRequest(PcxError):
    """A field has the wrong type or an invalid value."""

    KIND = "invalid_request"


class BadBase64(PcxError):
    """A ``*_b64`` field does not decode."""

    KIND = "bad_base64"


class TooLarge(PcxError):
    """Content, a line or a frame over pcx's limits."""

    KIND = "too_large"


class InvalidKind(PcxError):
    """A kind name outside ``[a-z0-9_.-]{1,64}``, or content its plugin cannot read."""

    KIND = "invalid_kind"


class InvalidEntry(PcxError):
    """A Dynamo entry with zero codes."""

    KIND = "invalid_entry"


class KeyNotFound(PcxError):
    """An edit of a key that has no artifact."""

    KIND = "key_not_found"


class PackageNotFound(PcxError):
    """A load of a key the dynamo cache does not hold."""

    KIND = "package_not_found"


class SystemMismatch(PcxError):
    """A load refused because the entry was saved on another system."""

    KIND = "system_mismatch"


class NoPlugin(PcxError):
    """No plugin serves the artifact's kind."""

    KIND = "no_plugin"


class PluginFailed(PcxError):
    """A plugin failed, panicked or answered nonsense."""

    KIND = "plugin_failed"


class NoSuchEdit(PcxError):
    """A plugin edit the serving plugin does not offer."""

    KIND = "no_such_edit"


class ContentUnavailable(PcxError):
    """A content blob cannot be read."""

    KIND = "content_unavailable"


class SharedEntryUnsound(PcxError):
    """The cluster's shared dynamo cache row for the key is not what its saver's record saved
    (altered or forged in the database, or bound to no record); nothing was loaded."""

    KIND = "shared_entry_unsound"


class SaveFailed(PcxError):
    """Saving to the dynamo cache failed."""

    KIND = "save_failed"


class Storage(PcxError):
    """The log could not be made durable; nothing was applied."""

    KIND = "storage"


class NoSpace(PcxError):
    """The disk is full; nothing was applied."""

    KIND = "no_space"


class Aborted(PcxError):
    """An earlier change in the same commit group failed."""

    KIND = "aborted"


class Internal(PcxError):
    """A handler panicked; nothing changed."""

    KIND = "internal"


class Closed(PcxError):
    """The context was closed before the request was decided."""

    KIND = "closed"


class Conflict(PcxError):
    """An edit whose ``expected_digest`` no longer matches the content."""

    KIND = "conflict"


class RequestIdReused(PcxError):
    """A ``request_id`` an earlier, different request was applied under; nothing was applied."""

    KIND = "request_id_reused"


class Compacted(PcxError):
    """An audit query about events compacted away."""

    KIND = "compacted"


class BeyondEnd(PcxError):
    """An audit query past the last event."""

    KIND = "beyond_end"


class CorruptLog(PcxError):
    """An audit query met a damaged record, or ``verify`` found the log unsound."""

    KIND = "corrupt_log"


class BadFrame(PcxError):
    """A frame that is not one MessagePack value."""

    KIND = "bad_frame"


class Unauthorized(PcxError):
    """A TCP connection without the right token."""

    KIND = "unauthorized"


class FrameStalled(PcxError):
    """A large frame stopped arriving while it held its share of the server's frame memory
    (``frame_stall_timeout_ms``); the connection was closed."""

    KIND = "frame_stalled"



_BY_KIND: Dict[str, Type[PcxError]] = {
    cls.KIND: cls
    for cls in (
        BadJson, UnknownOp, MissingField, InvalidRequest, BadBase64, TooLarge, InvalidKind,
        InvalidEntry, KeyNotFound, PackageNotFound, SystemMismatch, NoPlugin, PluginFailed,
        NoSuchEdit, ContentUnavailable, SharedEntryUnsound, SaveFailed, Storage, NoSpace, Aborted, Internal, Closed,
        Conflict, RequestIdReused, Compacted, BeyondEnd, CorruptLog, BadFrame, Unauthorized,
        FrameStalled,
    )
}


def error_from_answer(answer: Mapping[str, Any]) -> PcxError:
    """The exception for a failed answer: the class of its kind, or :class:`PcxError`."""
    error = answer.get("error")
    if not isinstance(error, Mapping):
        error = {}
    kind = str(error.get("kind", "unknown"))
    message = str(error.get("message", ""))
    cls = _BY_KIND.get(kind, PcxError)
    return cls(kind, message, answer)
