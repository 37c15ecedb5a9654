//! Events: the facts the log records, in the past tense. State is only ever the fold of these.
//!
//! Content is not inside events: an event carries the content's digest and size, and the
//! bytes live once in the blob store. An edit records its resulting content (and a label of
//! what made it), so replay never needs the edit's code or the plugin that ran it.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::core::model::{ArtifactRef, BackendId, Digest, DynamoCacheEntry, PrecompileCacheEntry};

/// A stitched entry as stored: backends are references into the blob store.
pub type SavedEntry = PrecompileCacheEntry<ArtifactRef>;

/// Everything that can happen to a precompile context.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// `record_artifact`: the key now holds this content (replacing any earlier one, keeping
    /// the key's first position).
    ArtifactRecorded {
        key: BackendId,
        kind: String,
        digest: Digest,
        size: u64,
    },
    /// `record_dynamo_cache_entry`.
    DynamoEntryRecorded {
        key: String,
        entry: DynamoCacheEntry,
    },
    /// `edit_artifact`: the artifact's content became this; `label` says what edit made it.
    ArtifactEdited {
        key: BackendId,
        label: String,
        digest: Digest,
        size: u64,
    },
    /// `take_artifact` removed the key.
    ArtifactTaken { key: BackendId },
    /// `clear` emptied both maps (the dynamo cache is not touched, as in PyTorch).
    Cleared,
    /// `create_cache_entries` ran: what it produced, bypassed and why, and what failed.
    Stitched {
        produced: Vec<String>,
        bypassed: Vec<StitchBypass>,
        failed: Vec<StitchFailure>,
    },
    /// `save_to_dynamo_cache` wrote these stitched entries to the dynamo cache.
    SavedToDynamoCache {
        entries: IndexMap<String, SavedEntry>,
    },
    /// `load_cache_entry` hit: the entry's backends were recorded into the context again.
    EntryLoaded {
        key: String,
        backends: IndexMap<BackendId, ArtifactRef>,
    },
    // Variants below came with named contexts and namespaces; the ones above are stored
    // exactly as before, and only events outside the default context or namespace use these.
    /// One of the events above, in a context or namespace other than the default
    /// ([`crate::core::scope`]). Never nested.
    Scoped {
        context: String,
        namespace: String,
        event: Box<Event>,
    },
    /// `drop_context`: the context and everything in it are gone (the default one is emptied).
    ContextDropped { context: String },
    /// `put_cache_entry`: one stitched entry written to a namespace of the dynamo cache, as
    /// PyTorch's `DynamoStore.write` does; `saved_by` is the context that wrote it.
    CacheEntryPut {
        namespace: String,
        key: String,
        entry: SavedEntry,
        saved_by: String,
    },
    /// `delete_cache_entry` removed a saved entry.
    CacheEntryDeleted { namespace: String, key: String },
    /// `clear_dynamo_cache` emptied a namespace.
    DynamoCacheCleared { namespace: String },
    /// `record_dynamo_cache_entry` of an entry whose first `kept` codes are those already
    /// recorded under the key: only the codes after them are stored (in `entry.codes`, with
    /// every other field of the new entry). PyTorch re-records a function's whole, growing
    /// entry after every frame it compiles; storing each whole made the log grow with the
    /// square of the number of graph breaks.
    DynamoEntryExtended {
        key: String,
        kept: u32,
        entry: DynamoCacheEntry,
    },
    /// One of the events above (perhaps [`Event::Scoped`]), made by a request that carried a
    /// client request id: a retry of that request (after a lost answer, or a takeover of the
    /// journal) is answered "already applied" instead of applying it twice.
    Requested {
        request_id: String,
        event: Box<Event>,
        /// The digest of the request ([`crate::core::scope::Scope::request_fingerprint`]);
        /// absent in events written before it was kept, and for library requests.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fingerprint: Option<crate::core::model::Digest>,
    },
}

/// A code a stitch bypassed, with the backend that was missing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StitchBypass {
    pub key: String,
    pub code_index: u32,
    pub missing_backend: BackendId,
    pub reason: String,
}

/// An entry a stitch could not produce, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StitchFailure {
    pub key: String,
    pub error: String,
}

/// Every name [`Event::name`] gives (a wrapper gives the name of the event it wraps): what
/// `log --event` may ask for.
pub const EVENT_NAMES: [&str; 13] = [
    "ArtifactRecorded",
    "DynamoEntryRecorded",
    "ArtifactEdited",
    "ArtifactTaken",
    "Cleared",
    "Stitched",
    "SavedToDynamoCache",
    "EntryLoaded",
    "ContextDropped",
    "CacheEntryPut",
    "CacheEntryDeleted",
    "DynamoCacheCleared",
    "DynamoEntryExtended",
];

impl Event {
    /// The change itself: the event without the client request id it was made under (a
    /// request id says who asked, not what changed; every reader of what changed looks here).
    pub fn change(&self) -> &Event {
        match self {
            Event::Requested { event, .. } => event.change(),
            other => other,
        }
    }

    /// [`Event::change`], with the context and namespace it was made in ([`Event::Scoped`]
    /// unwrapped too; the default ones for an event stored unscoped). The cache's own events
    /// ([`Event::CacheEntryPut`]…) name their namespace themselves and come back as they are.
    pub fn scoped_change(&self) -> (&str, &str, &Event) {
        match self.change() {
            Event::Scoped {
                context,
                namespace,
                event,
            } => (context, namespace, event.change()),
            other => (
                crate::core::scope::DEFAULT,
                crate::core::scope::DEFAULT,
                other,
            ),
        }
    }

    /// The event's name as shown to people and in JSON.
    pub fn name(&self) -> &'static str {
        match self {
            Event::ArtifactRecorded { .. } => "ArtifactRecorded",
            Event::DynamoEntryRecorded { .. } => "DynamoEntryRecorded",
            Event::ArtifactEdited { .. } => "ArtifactEdited",
            Event::ArtifactTaken { .. } => "ArtifactTaken",
            Event::Cleared => "Cleared",
            Event::Stitched { .. } => "Stitched",
            Event::SavedToDynamoCache { .. } => "SavedToDynamoCache",
            Event::EntryLoaded { .. } => "EntryLoaded",
            Event::Scoped { event, .. } | Event::Requested { event, .. } => event.name(),
            Event::ContextDropped { .. } => "ContextDropped",
            Event::CacheEntryPut { .. } => "CacheEntryPut",
            Event::CacheEntryDeleted { .. } => "CacheEntryDeleted",
            Event::DynamoCacheCleared { .. } => "DynamoCacheCleared",
            Event::DynamoEntryExtended { .. } => "DynamoEntryExtended",
        }
    }

    /// The content this event refers to that must be in the blob store.
    pub fn content_refs(&self) -> Vec<Digest> {
        match self {
            Event::ArtifactRecorded { digest, .. } | Event::ArtifactEdited { digest, .. } => {
                vec![*digest]
            }
            Event::SavedToDynamoCache { entries } => entries
                .values()
                .flat_map(|e| e.backends.values().map(|r| r.digest))
                .collect(),
            Event::EntryLoaded { backends, .. } => backends.values().map(|r| r.digest).collect(),
            Event::CacheEntryPut { entry, .. } => {
                entry.backends.values().map(|r| r.digest).collect()
            }
            Event::Scoped { event, .. } | Event::Requested { event, .. } => event.content_refs(),
            _ => Vec::new(),
        }
    }
}
