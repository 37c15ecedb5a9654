"""The shapes of pcx's requests and answers, as typed dictionaries (docs/protocol.md).

Fields named ``*_b64`` hold ``bytes`` on both transports. Answers may carry more keys than
listed here (a newer server adds optional ones); the types list what this package relies on.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Union

if sys.version_info >= (3, 11):
    from typing import NotRequired, TypedDict
else:  # pragma: no cover - Python 3.9/3.10
    from typing_extensions import NotRequired, TypedDict

__all__ = [
    "SystemInfo",
    "InlinedSource",
    "Code",
    "Entry",
    "Artifact",
    "BackendContent",
    "CacheEntry",
    "Deserialized",
    "LoadAnswer",
    "StitchAnswer",
    "SaveAnswer",
    "ContextInfo",
    "CacheEntryInfo",
    "TraceEvent",
]


class SystemInfo(TypedDict, total=False):
    """torch's ``SystemInfo``: ``triton_version`` as torch has it (``[3, 4]``) or a string."""

    python_version: str
    torch_version: str
    toolkit_version: Optional[str]
    triton_version: Union[str, List[int], None]
    gpu_name: Optional[str]


class InlinedSource(TypedDict):
    module: str
    firstlineno: int
    lastlineno: int
    checksum: str


class Code(TypedDict, total=False):
    """One code of an entry. ``extra_b64`` is opaque to pcx and comes back byte for byte."""

    backend_ids: List[str]
    python_module: Optional[str]
    function_names: List[str]
    code_source: Optional[str]
    install_to_global: bool
    has_compile_id: bool
    payload_b64: bytes
    extra_b64: bytes
    bypassed: bool
    bypass_reason: Optional[str]


class Entry(TypedDict, total=False):
    """A Dynamo cache entry (``record_dynamo_cache_entry``'s ``entry``; ``DYNAMO`` in answers)."""

    fn_name: Optional[str]
    fn_first_lineno: Optional[int]
    device_type: str
    system_info: SystemInfo
    source_info: Dict[str, List[InlinedSource]]
    codes: List[Code]
    extra_b64: bytes


class Artifact(TypedDict):
    """An artifact as ``serialize_artifact_by_key`` and ``take_artifact`` answer it."""

    key: str
    kind: str
    content_b64: bytes
    digest: NotRequired[str]


class BackendContent(TypedDict):
    kind: str
    content_b64: bytes


class CacheEntry(TypedDict):
    """A stitched or saved entry: the Dynamo part and its backends' stored bytes."""

    dynamo: Entry
    backends: Dict[str, BackendContent]
    saved_by: NotRequired[str]


class Deserialized(TypedDict):
    """A backend after pcx's ``after_deserialization`` (the plugin's, or ``builtin``)."""

    kind: str
    plugin: str
    description: Dict[str, Any]
    content_b64: bytes


class TraceEvent(TypedDict):
    """A structured trace event for torch's ``trace_structured``."""

    name: str
    payload: Any


class LoadAnswer(TypedDict):
    ok: bool
    seq: NotRequired[int]
    entry: CacheEntry
    deserialized: Dict[str, Deserialized]
    saved_by: NotRequired[str]
    system_mismatch: NotRequired[Optional[str]]
    trace: NotRequired[List[TraceEvent]]


class StitchAnswer(TypedDict):
    ok: bool
    seq: NotRequired[int]
    debug_info: Dict[str, Any]
    entries: Dict[str, CacheEntry]
    trace: NotRequired[List[TraceEvent]]


class SaveAnswer(TypedDict):
    ok: bool
    seq: NotRequired[int]
    debug_info: Dict[str, Any]
    saved: NotRequired[List[str]]
    trace: NotRequired[List[TraceEvent]]


class ContextInfo(TypedDict):
    name: str
    artifacts: int
    entries: int
    last_seq: int


class CacheEntryInfo(TypedDict):
    key: str
    saved_by: str
    seq: int
    debug_info: Dict[str, Any]
