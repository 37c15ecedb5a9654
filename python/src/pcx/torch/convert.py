"""torch's precompile objects ↔ pcx's protocol maps.

A ``_DynamoCacheEntry`` becomes a pcx entry whose first-class fields are the ones pcx reads
(function, device, system info, inlined sources' checksums, each code's backends and names:
what ``debug_info``, stitching and the audit commands use), while everything else travels as
opaque bytes pcx keeps exactly: each code pickled whole in its ``payload_b64`` (its
``SerializedCode``, guarded codes and import sources) and the entry without its codes pickled
in ``extra_b64`` (inlined sources' text, the exact ``SystemInfo``). Rebuilding unpickles the
same objects, so torch gets back exactly what it recorded, with pcx's stitch outcome (a code
bypassed because a backend was missing) applied.

A backend artifact is pickled whole; its kind names its class (``torch.bundled_aot_autograd``
for AOTAutograd's bundled artifacts, ``torch.pickle`` for any other) when the server has a
plugin for those kinds, else the built-in pass-through kind ``eager``.

Pickles are read back from pcx as torch reads its own cache files: the store is trusted like
torch's cache directory is. Do not point this at a pcx you would not let write your cache dir.
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any, Dict, Mapping, Optional

__all__ = [
    "BUNDLED_KIND",
    "PICKLE_KIND",
    "artifact_kind",
    "artifact_bytes",
    "artifact_from_bytes",
    "entry_to_pcx",
    "entry_from_pcx",
    "system_info_to_pcx",
]

BUNDLED_KIND = "torch.bundled_aot_autograd"
PICKLE_KIND = "torch.pickle"


def artifact_kind(artifact: Any, torch_kinds: bool) -> str:
    """The pcx kind for a torch ``BackendCacheArtifact``: derived from its class (2.10 has no
    ``type()`` on it) when the server serves torch kinds, else ``eager``."""
    if not torch_kinds:
        return "eager"
    if type(artifact).__name__ == "BundledAOTAutogradCacheArtifact":
        return BUNDLED_KIND
    return PICKLE_KIND


def artifact_bytes(artifact: Any) -> bytes:
    """The artifact, pickled whole (its key and live ``content``), as torch pickles it into a
    cache entry."""
    return pickle.dumps(artifact, protocol=pickle.HIGHEST_PROTOCOL)


def artifact_from_bytes(content: bytes) -> Any:
    return pickle.loads(content)


def system_info_to_pcx(info: Any) -> Dict[str, Any]:
    """torch's ``SystemInfo`` as pcx's: Triton as torch prints it (``"(3, 4)"``), ``None`` for
    torch's ``(0, 0)`` (no Triton), so pcx's check skips it as torch's does."""
    triton = getattr(info, "triton_version", None)
    return {
        "python_version": info.python_version,
        "torch_version": info.torch_version,
        "toolkit_version": info.toolkit_version,
        "triton_version": None if triton in (None, (0, 0)) else str(tuple(triton)),
        "gpu_name": info.gpu_name,
    }


def _lineno(value: Any) -> Optional[int]:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def entry_to_pcx(entry: Any) -> Dict[str, Any]:
    """A torch ``_DynamoCacheEntry`` as a pcx ``ENTRY``."""
    codes = []
    for code in entry.codes:
        codes.append(
            {
                "backend_ids": [str(b) for b in code.backend_ids],
                "python_module": code.python_module,
                "function_names": [str(f) for f in code.function_names],
                "code_source": code.code_source,
                "install_to_global": bool(code.install_to_global),
                "has_compile_id": bool(getattr(code, "has_compile_id", False)),
                # torch's `bypass_current_entry` marks a code at record time; pcx keeps it.
                "bypassed": bool(getattr(code, "bypassed", False)),
                "bypass_reason": "bypassed by torch at record" if getattr(code, "bypassed", False) else None,
                "payload_b64": pickle.dumps(code, protocol=pickle.HIGHEST_PROTOCOL),
            }
        )
    shell = dataclasses.replace(entry, codes=[])
    sources = [
        {
            "module": s.module,
            "firstlineno": int(s.firstlineno),
            "lastlineno": int(s.lastlineno),
            "checksum": s.checksum,
        }
        for s in sorted(
            entry.source_info.inlined_sources, key=lambda s: (s.module, s.firstlineno)
        )
    ]
    return {
        "fn_name": entry.fn_name,
        "fn_first_lineno": _lineno(entry.fn_first_lineno),
        "device_type": entry.device_type,
        "system_info": system_info_to_pcx(entry.system_info),
        "source_info": {"inlined_sources": sources},
        "codes": codes,
        "extra_b64": pickle.dumps(shell, protocol=pickle.HIGHEST_PROTOCOL),
    }


def entry_from_pcx(dynamo: Mapping[str, Any]) -> Any:
    """The torch ``_DynamoCacheEntry`` a pcx entry was made from (by :func:`entry_to_pcx`),
    with pcx's ``bypassed`` flags applied to its codes."""
    extra = dynamo.get("extra_b64")
    if not extra:
        raise ValueError(
            "this dynamo cache entry was not recorded by pcx.torch (it has no extra_b64), so "
            "torch's entry cannot be rebuilt from it"
        )
    shell = pickle.loads(extra)
    codes = []
    for wire in dynamo.get("codes", []):
        code = pickle.loads(wire["payload_b64"])
        if wire.get("bypassed"):
            code.bypassed = True
        codes.append(code)
    shell.codes = codes
    return shell


def backends_from_pcx(backends: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """``{ID: artifact}`` from a pcx ``{ID: {"kind", "content_b64"}}`` map."""
    return {bid: artifact_from_bytes(b["content_b64"]) for bid, b in backends.items()}


def backends_to_pcx(backends: Mapping[str, Any], torch_kinds: bool) -> Dict[str, Any]:
    return {
        str(bid): {"kind": artifact_kind(a, torch_kinds), "content_b64": artifact_bytes(a)}
        for bid, a in backends.items()
    }
