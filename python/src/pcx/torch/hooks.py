"""The replacements for torch 2.10's ``PrecompileContext`` and ``DynamoCache`` storage.

``PrecompileContext``'s class methods are replaced (torch calls them through the class, from
AOTAutograd, Dynamo's ``DynamoStore`` and ``torch.compiler.save_cache_artifacts``), and the
module-level ``DynamoCache`` object gets instance attributes that shadow its ``load``,
``read``, ``write``, ``clear`` and ``_write_to_local_cache`` (torch's hot load writes through
it; every caller reaches it as that one object). Nothing of
torch's source is changed, and :meth:`Hooks.remove` puts every original back.

When pcx cannot be reached (the server died, was never there, or answers nonsense: a
:class:`pcx.TransportError`), or refuses to record what torch recorded (an artifact over its
``max_content_bytes``, say), the hooks warn once and **fall back**: torch's own precompile
context and dynamo cache are put back, holding everything this process recorded so far, and
the call that failed is made again on them. torch goes on as if pcx had never been installed,
for the rest of the process; a training run is never stopped by pcx.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections import defaultdict
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type

from ..client import Client
from ..errors import PackageNotFound, PcxError, TransportError
from . import convert

logger = logging.getLogger("pcx.torch")

_CONTEXT_METHODS = (
    "clear",
    "record_artifact",
    "record_dynamo_cache_entry",
    "edit_artifact",
    "serialize_artifact_by_key",
    "save_to_dynamo_cache",
    "create_cache_entries",
)
# ``_write_to_local_cache`` too: torch's hot load (``torch.compiler.load_cache_artifacts``)
# writes the dynamo entries it carries through it, not through ``write``.
_CACHE_METHODS = ("load", "read", "write", "clear", "_write_to_local_cache")
# What torch records: torch itself never refuses it, so pcx refusing it for any reason (an
# artifact over the server's max_content_bytes, a kind its plugin refuses…) falls back too.
_RECORDING = ("record_artifact", "record_dynamo_cache_entry")
_CONTEXT_DICTS = ("_backend_artifacts_by_key", "_dynamo_cache_entries")


class _ArtifactMirror(dict):  # type: ignore[type-arg]
    """``PrecompileContext._backend_artifacts_by_key`` while pcx is installed: this process's
    copy of what it recorded (torch and its tests read the class dict directly), whose
    removals are forwarded to pcx (``take_artifact``) so the next stitch sees them too."""

    def __init__(self, client: Client, lost: Callable[[TransportError], None]) -> None:
        super().__init__()
        self._client = client
        self._lost = lost

    def _take(self, keys: List[Any]) -> None:
        """Forwards removals already made here; with pcx gone, falls back (this dict, as it
        is now, becomes torch's own)."""
        try:
            for key in keys:
                self._client.take_artifact(str(key))
        except TransportError as e:
            self._lost(e)

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self._take([key])

    def pop(self, key: Any, *default: Any) -> Any:
        present = key in self
        value = super().pop(key, *default)
        if present:
            self._take([key])
        return value

    def popitem(self) -> Any:
        key, value = super().popitem()
        self._take([key])
        return key, value

    def clear(self) -> None:
        keys = list(self)
        super().clear()
        self._take(keys)


class Hooks:
    """pcx standing in for torch's precompile context and dynamo cache, through ``client``.

    ``torch_kinds``: record artifacts under torch kinds (served by pcx's torch-pickle plugin)
    rather than ``eager``. ``shared_cache``: the server has the namespaced cache operations
    (``put_cache_entry``…); without them ``DynamoCache.write``/``read``/``clear`` fail with a
    message saying so, while save and load (through the context) still work."""

    def __init__(
        self,
        client: Client,
        *,
        torch_kinds: bool,
        shared_cache: bool,
        namespace_of_cache_dir: Optional[Callable[[], str]] = None,
    ) -> None:
        self.client = client
        #: When no namespace was named: the one of torch's cache directory *now*, as torch's
        #: ``DynamoCache`` finds its directory at each call (a script that sets
        #: ``TORCHINDUCTOR_CACHE_DIR`` after ``PCX_TORCH=1`` installed, ``fresh_cache()``).
        self._namespace_of_cache_dir = namespace_of_cache_dir
        self.torch_kinds = torch_kinds
        self.shared_cache = shared_cache
        self._saved_context: Dict[str, Any] = {}
        self._saved_dicts: Dict[str, Any] = {}
        self._artifacts: _ArtifactMirror = _ArtifactMirror(client, self.fall_back)
        self._entries: Dict[str, Any] = {}
        self._cache: Any = None
        #: Why pcx was given up for this process (``None`` while it serves torch).
        self.fell_back: Optional[str] = None

    # -- installing -------------------------------------------------------------------------

    def apply(self) -> None:
        from torch._dynamo import package
        from torch._dynamo.precompile_context import PrecompileContext

        for name in _CONTEXT_METHODS:
            self._saved_context[name] = PrecompileContext.__dict__[name]
            hook = self._guarded(name, getattr(self, "_ctx_" + name), context=True)
            setattr(PrecompileContext, name, classmethod(hook))
        # torch (and its own tests) read and delete from these class dicts directly; keep
        # them as this process's mirror of its pcx context instead of leaving them empty.
        for name in _CONTEXT_DICTS:
            self._saved_dicts[name] = PrecompileContext.__dict__[name]
        # What torch recorded before pcx was installed (compiles made before install(), or
        # handed back by an uninstall) moves into pcx: left in torch's dicts, it was out of
        # every save made while installed, silently.
        artifacts = dict(PrecompileContext._backend_artifacts_by_key)
        entries = dict(PrecompileContext._dynamo_cache_entries)
        PrecompileContext._backend_artifacts_by_key.clear()
        PrecompileContext._dynamo_cache_entries.clear()
        PrecompileContext._backend_artifacts_by_key = self._artifacts  # type: ignore[assignment]
        PrecompileContext._dynamo_cache_entries = self._entries
        self._cache = package.DynamoCache
        for name in _CACHE_METHODS:
            hook = self._guarded(name, getattr(self, "_cache_" + name), context=False)
            setattr(self._cache, name, hook)
        # Through the class: a refusal or a lost server falls back as for any record.
        for artifact in artifacts.values():
            PrecompileContext.record_artifact(artifact)
        for key, entry in entries.items():
            PrecompileContext.record_dynamo_cache_entry(cache_entry=entry, key=key)

    def remove(self) -> None:
        """Puts torch's own methods and dicts back, the dicts holding what this process
        recorded while pcx was installed (as torch's own context would have): an uninstall
        that left them as they were before install() made every save after it miss it."""
        from torch._dynamo.precompile_context import PrecompileContext

        artifacts, entries = dict(self._artifacts), dict(self._entries)
        # Handed over once (a fall-back and then an uninstall remove twice).
        dict.clear(self._artifacts)
        self._entries.clear()
        self._unhook()
        PrecompileContext._backend_artifacts_by_key.update(artifacts)
        PrecompileContext._dynamo_cache_entries.update(entries)

    def _unhook(self) -> None:
        from torch._dynamo.precompile_context import PrecompileContext

        for name, original in self._saved_context.items():
            setattr(PrecompileContext, name, original)
        self._saved_context.clear()
        for name, original in self._saved_dicts.items():
            setattr(PrecompileContext, name, original)
        self._saved_dicts.clear()
        if self._cache is not None:
            for name in _CACHE_METHODS:
                self._cache.__dict__.pop(name, None)
            self._cache = None

    # -- falling back ---------------------------------------------------------------------------

    def _guarded(
        self, name: str, hook: Callable[..., Any], *, context: bool
    ) -> Callable[..., Any]:
        """``hook``, which on a :class:`TransportError` falls back and makes the same call on
        torch's own method (back in place by then)."""

        gives_up: Tuple[Type[PcxError], ...] = (
            (PcxError,) if context and name in _RECORDING else (TransportError,)
        )

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return hook(*args, **kwargs)
            except gives_up as e:
                self.fall_back(e)
            if context:
                from torch._dynamo.precompile_context import PrecompileContext

                # args[0] is the class the hook was called through.
                return getattr(PrecompileContext, name)(*args[1:], **kwargs)
            from torch._dynamo import package

            return getattr(package.DynamoCache, name)(*args, **kwargs)

        return call

    def fall_back(self, error: PcxError) -> None:
        """pcx is unreachable (or refused what torch recorded): puts torch's own precompile
        context (holding what this process recorded so far) and dynamo cache back, and warns
        once."""
        if self.fell_back is not None:
            return
        self.fell_back = str(error)
        logger.warning(
            "pcx.torch: pcx cannot be reached or refused what torch recorded (%s); torch falls back to its own precompile "
            "context and dynamo cache for the rest of this process, keeping the %d artifacts "
            "and %d entries recorded so far",
            error,
            len(self._artifacts),
            len(self._entries),
        )
        self.remove()
        # Closed only when broken anyway: after a refusal the connection is in step, and it
        # may be the caller's own (install(client) gives torch a view of it), shared with
        # their threads, which closing it here made fail every request.
        if isinstance(error, TransportError):
            try:
                self.client.close()
            except Exception:  # already broken; closing is a courtesy
                pass

    def _cache_client(self) -> Client:
        """The client for the dynamo cache's operations, in the namespace they are for now."""
        if self._namespace_of_cache_dir is not None:
            self.client.namespace = self._namespace_of_cache_dir()
        return self.client

    # -- PrecompileContext --------------------------------------------------------------------

    def _ctx_clear(self, cls: type) -> None:
        self.client.clear()
        dict.clear(self._artifacts)
        self._entries.clear()

    def _ctx_record_artifact(self, cls: type, artifact: Any) -> None:
        # torch deep-copies under no_dispatch (fake tensors must not be cloned); pickling is
        # the copy here, under the same guard.
        from torch.utils._mode_utils import no_dispatch

        with no_dispatch():
            content = convert.artifact_bytes(artifact)
        self.client.record_artifact(
            str(artifact.key), content, convert.artifact_kind(artifact, self.torch_kinds)
        )
        # torch keeps a deep copy; unpickling the bytes just sent is that copy.
        dict.__setitem__(self._artifacts, artifact.key, convert.artifact_from_bytes(content))

    def _ctx_record_dynamo_cache_entry(self, cls: type, cache_entry: Any, key: str) -> None:
        self.client.record_dynamo_cache_entry(key, convert.entry_to_pcx(cache_entry))
        self._entries[key] = cache_entry

    def _ctx_edit_artifact(self, cls: type, key: str, edit_fn: Callable[..., Any]) -> None:
        current = self.client.serialize_artifact_by_key(key)
        assert current is not None, f"Key {key} not found in artifacts"
        artifact = convert.artifact_from_bytes(current["content_b64"])
        artifact.edit_contents(edit_fn)
        # Only if nobody changed it since it was read (the server answers `conflict`).
        content = convert.artifact_bytes(artifact)
        self.client.edit_artifact(key, set=content, expected_digest=current.get("digest"))
        dict.__setitem__(self._artifacts, key, convert.artifact_from_bytes(content))

    def _ctx_serialize_artifact_by_key(self, cls: type, key: str) -> Optional[Any]:
        current = self.client.serialize_artifact_by_key(key)
        return None if current is None else convert.artifact_from_bytes(current["content_b64"])

    def _ctx_save_to_dynamo_cache(self, cls: type) -> Dict[str, Any]:
        answer = self._cache_client().save_to_dynamo_cache(trace=True)
        _re_emit(answer.get("trace", []))
        if self.shared_cache:
            # torch's save records each entry it writes for torch.compiler's hot load, so
            # that the bytes save_cache_artifacts() returns carry them: without this, they
            # carried none, and load_cache_artifacts() elsewhere warm-started nothing.
            for key in answer.get("saved", []):
                entry = self._cache_client().get_cache_entry(key)
                if entry is not None:
                    _record_for_hot_load(self._entry_from_pcx(entry), key)
        return _debug_info(answer)

    def _ctx_create_cache_entries(self, cls: type) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        from torch._dynamo.package import PrecompileCacheEntry

        answer = self.client.create_cache_entries(trace=True)
        _re_emit(answer.get("trace", []))
        debug_info = _debug_info(answer)
        entries = {
            key: PrecompileCacheEntry(
                dynamo=convert.entry_from_pcx(e["dynamo"]),
                backends=convert.backends_from_pcx(e["backends"]),
            )
            for key, e in answer.get("entries", {}).items()
        }
        return entries, debug_info

    # -- DynamoCache ----------------------------------------------------------------------------

    def _cache_load(self, fn: Callable[..., Any]) -> Optional[Any]:
        """torch's ``DiskDynamoCache.load``: the entry for ``fn`` with its backends recorded
        into the context (pcx's load records them), counting a hit, a miss or an error."""
        from torch._dynamo.package import CompilePackage, PrecompileCacheEntry
        from torch._dynamo.utils import counters

        key = CompilePackage.source_id_from_fn(fn)
        try:
            answer = self._cache_client().load_cache_entry(key)
            entry = answer["entry"]
            result = PrecompileCacheEntry(
                dynamo=convert.entry_from_pcx(entry["dynamo"]),
                backends=convert.backends_from_pcx(entry["backends"]),
            )
        except PackageNotFound:
            logger.info("No package found for %s", key)
            counters["dynamo_cache"]["dynamo_cache_miss"] += 1
            return None
        except TransportError:
            raise  # pcx is gone: fall back to torch's own cache (see _guarded)
        except Exception:
            counters["dynamo_cache"]["dynamo_cache_error"] += 1
            logger.warning("Failed to load package %s from pcx", key, exc_info=True)
            return None
        counters["dynamo_cache"]["dynamo_cache_hit"] += 1
        # pcx's load recorded the backends into this process's context; mirror that.
        for bid, artifact in result.backends.items():
            dict.__setitem__(self._artifacts, bid, artifact)
        return result

    def _need_shared_cache(self, what: str) -> None:
        if not self.shared_cache:
            raise RuntimeError(
                f"DynamoCache.{what} through pcx needs a server with the shared dynamo cache "
                "operations (put_cache_entry, get_cache_entry, clear_dynamo_cache); this one "
                "answers `unknown op` to them: upgrade pcx"
            )

    def _cache_write(self, entry: Any, path: str) -> None:
        self._need_shared_cache("write")
        try:
            self._put(entry, path)
        except TransportError:
            raise  # pcx is gone: fall back to torch's own cache (see _guarded)
        except PcxError as e:
            raise RuntimeError(f"Failed to save package to {path}: {e}") from e
        _record_for_hot_load(entry, path)

    def _cache__write_to_local_cache(self, pickled_content: bytes, path: str) -> None:
        """What torch's hot load writes (a pickled ``PrecompileCacheEntry``): into pcx,
        where this process's loads look. What pcx cannot take (an old server, an entry over
        its limits) goes to torch's own directory, as without pcx: a hot load never fails
        for pcx's sake."""
        if self.shared_cache:
            try:
                self._put(convert.artifact_from_bytes(pickled_content), path)
                return
            except TransportError:
                raise  # pcx is gone: fall back to torch's own cache (see _guarded)
            except PcxError as e:
                logger.warning(
                    "pcx.torch: pcx refused the hot-loaded dynamo cache entry %s (%s); it "
                    "goes to torch's own cache directory",
                    path,
                    e,
                )
        type(self._cache)._write_to_local_cache(self._cache, pickled_content, path)

    def _put(self, entry: Any, path: str) -> None:
        self._cache_client().put_cache_entry(
            path,
            {
                "dynamo": convert.entry_to_pcx(entry.dynamo),
                "backends": convert.backends_to_pcx(entry.backends, self.torch_kinds),
            },
        )

    def _cache_read(self, path: str) -> Any:
        self._need_shared_cache("read")
        entry = self._cache_client().get_cache_entry(path)
        if entry is None:
            raise RuntimeError(f"No package found with key {path}")
        return self._entry_from_pcx(entry)

    @staticmethod
    def _entry_from_pcx(entry: Mapping[str, Any]) -> Any:
        from torch._dynamo.package import PrecompileCacheEntry

        return PrecompileCacheEntry(
            dynamo=convert.entry_from_pcx(entry["dynamo"]),
            backends=convert.backends_from_pcx(entry["backends"]),
        )

    def _cache_clear(self) -> None:
        self._need_shared_cache("clear")
        self._cache_client().clear_dynamo_cache()


def _record_for_hot_load(entry: Any, key: str) -> None:
    """Records a saved entry for torch.compiler's hot load, as torch's
    ``DiskDynamoStore.write`` does (``save_cache_artifacts()`` serialises it)."""
    from torch._dynamo.package import PrecompileCacheArtifact
    from torch.compiler._cache import CacheArtifactRecorder

    CacheArtifactRecorder(PrecompileCacheArtifact.type(), key).record(
        pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL)
    )


def _debug_info(answer: Dict[str, Any]) -> Dict[str, Any]:
    """The answer's ``debug_info`` as torch returns it: a ``defaultdict(list)``, so that
    ``info["dynamo"]``/``info["backends"]`` read ``[]`` rather than raising when empty (pcx,
    like torch's JSON dump, leaves empty lists out)."""
    info: Dict[str, Any] = defaultdict(list)
    info.update(answer.get("debug_info", {}))
    return info


def _re_emit(events: List[Dict[str, Any]]) -> None:
    """Emits the structured trace events pcx's stitch answered (``dynamo_cache_entries``,
    ``dynamo_cache_bypass``, ``dynamo_cache_exception``) through torch's own
    ``trace_structured``, as torch's stitch would have, so tlparse sees them."""
    import torch

    for event in events:
        name = str(event.get("name", ""))
        payload = json.dumps(event.get("payload"))
        torch._logging.trace_structured(
            "artifact",
            metadata_fn=lambda name=name: {"name": name, "encoding": "json"},
            payload_fn=lambda payload=payload: payload,
            expect_trace_id=False,
        )
