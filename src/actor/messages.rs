//! The actor's messages and the values they answer: one message per request of PyTorch's
//! `PrecompileContext` and `DynamoCache`, plus the context's own (audit, stats, close).

use actix::prelude::*;
use indexmap::IndexMap;

use crate::actor::error::ContextError;
use crate::core::model::{
    Artifact, DebugInfo, Digest, DynamoCacheEntry, PrecompileCacheEntry, SystemInfo,
};
use crate::plugins::kinds::{Deserialized, Kinds};

/// A successful answer: the value, and the sequence number of the last event the request
/// wrote (none for a request that changed nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack<T> {
    pub seq: Option<u64>,
    pub value: T,
}

/// What every message answers.
pub type Answer<T> = Result<Ack<T>, ContextError>;

/// A stitched entry with its backends' content.
pub type StitchedEntry = PrecompileCacheEntry<Artifact>;

/// `create_cache_entries`' value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stitched {
    pub entries: IndexMap<String, StitchedEntry>,
    pub debug_info: DebugInfo,
    /// PyTorch's structured trace events of the stitch, when asked for.
    pub trace: Vec<crate::core::stitch::Structured>,
}

/// `load_cache_entry`'s value: the entry, and each backend's ready-to-use form.
#[derive(Clone, Debug, PartialEq)]
pub struct Loaded {
    pub entry: StitchedEntry,
    pub deserialized: IndexMap<String, Deserialized>,
    /// The context that saved the entry (`default` for entries saved before contexts).
    pub saved_by: String,
    /// With `system_check = "report"`: why the entry's system differs from the caller's
    /// (the load went on, as torch's does; the caller decides).
    pub system_mismatch: Option<String>,
}

/// Process-wide counts, as PyTorch's `counters["dynamo_cache"]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadCounters {
    pub hit: u64,
    pub miss: u64,
    pub error: u64,
}

/// What the context has done since it started, for `stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub events_appended: u64,
    /// Group commits made durable (one flush + sync each).
    pub flushes: u64,
    pub failed_commits: u64,
    pub snapshots: u64,
    pub stitches: u64,
    pub dynamo_cache_hits: u64,
    pub dynamo_cache_misses: u64,
    pub dynamo_cache_errors: u64,
    pub plugin_calls: u64,
    pub plugin_failures: u64,
    /// Changes staged and waiting for the next commit, plus those being committed now.
    pub queue_depth: u64,
    /// The last event's sequence number.
    pub head_seq: u64,
    /// The journal this process holds in a fleet's database (PostgreSQL), and the epoch of its
    /// lease: `pcx client`, following a journal's holder, checks that the server at the
    /// address it found is that holder and not another journal's server (none otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<i64>,
}

/// An edit's function: old content → new content, or a message saying why not.
pub type EditFn = Box<dyn FnOnce(Vec<u8>) -> Result<Vec<u8>, String> + Send>;

/// How an edit makes the new content: a Rust function, or a named edit of the plugin that
/// serves the artifact's kind.
pub enum Edit {
    Apply(EditFn),
    Plugin { op: String, args: Vec<u8> },
}

/// Settings the actor needs.
#[derive(Clone, Debug)]
pub struct ActorSettings {
    pub snapshot_every: u64,
    pub max_content_bytes: u64,
    pub system_check: SystemCheck,
    pub origin: String,
    pub kinds: Kinds,
}

/// What a load does when the saved entry's system differs from the caller's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SystemCheck {
    /// pcx's stricter way: the load fails `system_mismatch`, and nothing is recorded.
    #[default]
    Refuse,
    /// torch's way: the load goes on and answers `system_mismatch` with the reason.
    Report,
}

/// `msg`, decided in a context and namespace other than the default ones (the protocol's
/// `"context"` and `"namespace"` fields). Answers as `msg` does.
pub struct InScope<M> {
    pub scope: crate::core::scope::Scope,
    pub msg: M,
}

impl<M: Message> Message for InScope<M> {
    type Result = M::Result;
}

macro_rules! message {
    ($(#[$doc:meta])* $name:ident { $($field:ident : $ty:ty),* } -> $out:ty) => {
        $(#[$doc])*
        pub struct $name { $(pub $field: $ty),* }
        impl Message for $name {
            type Result = Answer<$out>;
        }
    };
}

message!(/// `record_artifact`.
    RecordArtifact { artifact: Artifact } -> ());
message!(/// `record_dynamo_cache_entry`.
    RecordEntry { key: String, entry: DynamoCacheEntry } -> ());
message!(/// `edit_artifact`: `edit` runs on the current content; `label` is logged with the result.
    /// With `expected` (the hex digest of the content the editor read), the edit applies only
    /// if the content is still that one (compare-and-set), else [`ContextError::Conflict`].
    EditArtifact { key: String, label: String, edit: Edit, expected: Option<String> } -> ());
message!(/// `serialize_artifact_by_key`.
    GetArtifact { key: String } -> Option<Artifact>);
message!(/// `take_artifact`.
    TakeArtifact { key: String } -> Option<Artifact>);
message!(/// `clear`.
    Clear {} -> ());
message!(/// `dump_debug_info`.
    DumpDebugInfo {} -> DebugInfo);
message!(/// `create_cache_entries` (stitch).
    /// With `trace`, the structured trace events come back in the answer too (for a client
    /// that re-emits them through PyTorch's `trace_structured`).
    CreateCacheEntries { trace: bool } -> Stitched);
message!(/// `save_to_dynamo_cache`.
    /// With `trace`, the stitch's structured trace events come back in the answer.
    SaveToDynamoCache { trace: bool } -> Saved);
message!(/// `load_cache_entry`, with the caller's system info to check against, if given.
    LoadCacheEntry { key: String, system_info: Option<SystemInfo> } -> Loaded);
message!(/// An audit question about the log (log, history, state, diff, verify), answered once
    /// every change accepted before it is durable, on a thread of its own.
    Audit { query: crate::audit::query::Query } -> serde_json::Map<String, serde_json::Value>);
message!(/// `export`: the log, as of this point in the stream, written to the file `output` (a
    /// backup of a live context), once every change accepted before it is durable, on a thread
    /// of its own. Answers `{"exported": {output, events, last_seq, bytes}}`.
    ExportTo { output: std::path::PathBuf, mode: crate::audit::export::ContentMode } -> serde_json::Map<String, serde_json::Value>);
message!(/// `compact`: the log made to begin at `before`, as `pcx compact --before` does offline,
    /// in the data directory the context holds, while it goes on serving (commits wait for the
    /// swap; reads go on). Answers the compaction's report.
    CompactLog { before: u64 } -> serde_json::Map<String, serde_json::Value>);
message!(/// What the context has done since it started.
    GetStats {} -> Stats);
message!(/// The current load counters.
    GetLoadCounters {} -> LoadCounters);
message!(/// A digest of the whole state (order included), for comparing contexts.
    StateDigest {} -> Digest);
message!(/// Waits until everything accepted is durable, then stops the actor and releases the data
    /// directory.
    Close {} -> ());

/// What `save_to_dynamo_cache` did: PyTorch's debug info, and the keys it wrote to the
/// dynamo cache, in order (entries that failed to stitch are not among them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Saved {
    pub debug_info: DebugInfo,
    pub saved: Vec<String>,
    /// PyTorch's structured trace events of the stitch, when asked for.
    pub trace: Vec<crate::core::stitch::Structured>,
}

/// A context, as `list_contexts` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ContextInfo {
    pub name: String,
    pub artifacts: usize,
    pub entries: usize,
}

/// A saved entry of the dynamo cache, as `list_cache_entries` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CacheEntryInfo {
    pub key: String,
    pub saved_by: String,
    pub debug_info: crate::core::model::EntryDebugInfo,
}

/// A saved entry with its backends' contents, and the context that saved it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedCacheEntry {
    pub entry: StitchedEntry,
    pub saved_by: String,
}

message!(/// `list_contexts`: every context with something in it, the default first.
    ListContexts {} -> Vec<ContextInfo>);
message!(/// `drop_context`: the current context and everything in it go (the default is emptied).
    DropContext {} -> ());
message!(/// `put_cache_entry`: one stitched entry into the current namespace, as PyTorch's
    /// `DynamoStore.write`; its backends' contents are stored by digest.
    PutCacheEntry { key: String, entry: StitchedEntry } -> ());
message!(/// `get_cache_entry`: a saved entry of the current namespace; changes and counts nothing.
    GetCacheEntry { key: String } -> Option<SavedCacheEntry>);
message!(/// `delete_cache_entry`: whether there was one to delete.
    DeleteCacheEntry { key: String } -> bool);
message!(/// `list_cache_entries` of the current namespace.
    ListCacheEntries {} -> Vec<CacheEntryInfo>);
message!(/// `clear_dynamo_cache`: empties the current namespace; gives how many entries went.
    ClearDynamoCache {} -> u64);
