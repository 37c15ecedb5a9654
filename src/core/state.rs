//! The folded state and `apply`, the only way it changes: live handling and replay run this
//! very function, so a replayed context is the live one.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::core::event::{Event, SavedEntry};
use crate::core::model::{self, ArtifactRef, BackendId, DebugInfo, Digest, DynamoCacheEntry};
use crate::core::scope::DEFAULT;

/// One named context: PyTorch's `PrecompileContext`, two insertion-ordered maps (Python dict
/// order: re-recording a key keeps its first position).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextState {
    pub artifacts: IndexMap<BackendId, ArtifactRef>,
    pub entries: IndexMap<String, DynamoCacheEntry>,
}

/// A context's two maps, borrowed: the default context's live in [`State`] itself.
#[derive(Clone, Copy, Debug)]
pub struct ContextRef<'a> {
    pub artifacts: &'a IndexMap<BackendId, ArtifactRef>,
    pub entries: &'a IndexMap<String, DynamoCacheEntry>,
}

impl ContextRef<'_> {
    /// `dump_debug_info` of this context.
    pub fn debug_info(&self) -> DebugInfo {
        model::dump_debug_info(self.entries, self.artifacts)
    }
}

/// Every context, and the dynamo cache of saved, stitched entries with its namespaces.
///
/// The default context's maps and the default namespace are the first three fields, stored
/// as they were before contexts and namespaces existed (the others are left out of the
/// encoding while empty), so every snapshot written before decodes, and a state with only
/// defaults encodes, and digests, exactly as it always did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub artifacts: IndexMap<BackendId, ArtifactRef>,
    pub entries: IndexMap<String, DynamoCacheEntry>,
    /// What `save_to_dynamo_cache` wrote to the default namespace; `clear` leaves it alone,
    /// as PyTorch's does.
    pub dynamo_cache: IndexMap<String, SavedEntry>,
    /// The other contexts, by name, in the order they began.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub contexts: IndexMap<String, ContextState>,
    /// The other namespaces of the dynamo cache, by name.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub namespaces: IndexMap<String, IndexMap<String, SavedEntry>>,
    /// Which context saved each entry, by namespace and key, where it was not the default.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub saved_by: IndexMap<String, IndexMap<String, String>>,
    /// The client request ids of the newest applied requests that carried one (at most
    /// [`REMEMBERED_REQUESTS`], oldest dropped first), for answering a retry "already applied".
    #[serde(default, skip_serializing_if = "indexmap::IndexSet::is_empty")]
    pub requests: indexmap::IndexSet<String>,
    /// The digest of the request each remembered id came with, where it was kept: a request
    /// under a remembered id with another digest is another request, refused.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub request_fingerprints: IndexMap<String, Digest>,
}

/// How many client request ids the state remembers: a retry comes within seconds or minutes
/// of its request, so the newest 100,000 cover any client's retries (about 5 MB at most).
pub const REMEMBERED_REQUESTS: usize = 100_000;

static EMPTY_CONTEXT: std::sync::OnceLock<ContextState> = std::sync::OnceLock::new();
static EMPTY_CACHE: std::sync::OnceLock<IndexMap<String, SavedEntry>> = std::sync::OnceLock::new();

impl State {
    /// How many items the state holds: what a snapshot of it carries.
    pub fn items(&self) -> u64 {
        let named: usize = self
            .contexts
            .values()
            .map(|c| c.artifacts.len() + c.entries.len())
            .sum();
        let cached: usize = self.namespaces.values().map(IndexMap::len).sum();
        (self.artifacts.len() + self.entries.len() + self.dynamo_cache.len() + named + cached)
            as u64
    }

    /// Every content digest the state refers to: the artifacts of every context and the
    /// backends saved in every namespace of the dynamo cache. What a compaction keeps, an
    /// export carries and `verify` checks of an anchor's state.
    pub fn content_refs(&self) -> Vec<Digest> {
        let artifacts = self
            .artifacts
            .values()
            .chain(self.contexts.values().flat_map(|c| c.artifacts.values()));
        let saved = self
            .dynamo_cache
            .values()
            .chain(self.namespaces.values().flat_map(IndexMap::values))
            .flat_map(|e| e.backends.values());
        artifacts.chain(saved).map(|r| r.digest).collect()
    }

    /// The context `name` (an unknown one reads as empty, as a new PyTorch process's does).
    pub fn context(&self, name: &str) -> ContextRef<'_> {
        if name == DEFAULT {
            return ContextRef {
                artifacts: &self.artifacts,
                entries: &self.entries,
            };
        }
        let c = self
            .contexts
            .get(name)
            .unwrap_or_else(|| EMPTY_CONTEXT.get_or_init(ContextState::default));
        ContextRef {
            artifacts: &c.artifacts,
            entries: &c.entries,
        }
    }

    /// The namespace `name` of the dynamo cache (an unknown one reads as empty).
    pub fn cache(&self, name: &str) -> &IndexMap<String, SavedEntry> {
        if name == DEFAULT {
            return &self.dynamo_cache;
        }
        self.namespaces
            .get(name)
            .unwrap_or_else(|| EMPTY_CACHE.get_or_init(IndexMap::new))
    }

    /// The context that saved `key` in `namespace`.
    pub fn saver(&self, namespace: &str, key: &str) -> &str {
        self.saved_by
            .get(namespace)
            .and_then(|m| m.get(key))
            .map_or(DEFAULT, String::as_str)
    }

    /// Every context with something in it, the default first: name, artifacts, entries.
    pub fn context_names(&self) -> Vec<(&str, usize, usize)> {
        let mut all = vec![(DEFAULT, self.artifacts.len(), self.entries.len())];
        all.extend(
            self.contexts
                .iter()
                .map(|(n, c)| (n.as_str(), c.artifacts.len(), c.entries.len())),
        );
        all
    }

    fn maps_mut(
        &mut self,
        context: &str,
    ) -> (
        &mut IndexMap<BackendId, ArtifactRef>,
        &mut IndexMap<String, DynamoCacheEntry>,
    ) {
        if context == DEFAULT {
            return (&mut self.artifacts, &mut self.entries);
        }
        let c = self.contexts.entry(context.to_string()).or_default();
        (&mut c.artifacts, &mut c.entries)
    }

    fn cache_mut(&mut self, namespace: &str) -> &mut IndexMap<String, SavedEntry> {
        if namespace == DEFAULT {
            return &mut self.dynamo_cache;
        }
        self.namespaces.entry(namespace.to_string()).or_default()
    }

    fn set_saver(&mut self, namespace: &str, key: &str, context: &str) {
        if context == DEFAULT {
            if let Some(m) = self.saved_by.get_mut(namespace) {
                m.shift_remove(key);
                if m.is_empty() {
                    self.saved_by.shift_remove(namespace);
                }
            }
        } else {
            self.saved_by
                .entry(namespace.to_string())
                .or_default()
                .insert(key.to_string(), context.to_string());
        }
    }

    /// An emptied namespace other than the default is no longer kept (it reads as empty
    /// anyway), so a state holds, and encodes, only what is in it.
    fn forget_if_empty(&mut self, namespace: &str) {
        if self
            .namespaces
            .get(namespace)
            .is_some_and(IndexMap::is_empty)
        {
            self.namespaces.shift_remove(namespace);
        }
    }

    /// Folds one event in. Cannot fail: every event was decided valid before it was logged.
    /// Takes the event: its keys and entries move into the state instead of being copied
    /// (the writer and replay both own the events they fold).
    pub fn apply(&mut self, event: Event) {
        self.apply_in(DEFAULT, DEFAULT, event);
    }

    /// Whether a request carrying this client request id was applied.
    pub fn applied(&self, request_id: &str) -> bool {
        self.requests.contains(request_id)
    }

    /// The digest of the request applied under this client request id, where it was kept.
    pub fn applied_fingerprint(&self, request_id: &str) -> Option<&Digest> {
        self.request_fingerprints.get(request_id)
    }

    fn apply_in(&mut self, context: &str, namespace: &str, event: Event) {
        match event {
            Event::ArtifactRecorded {
                key,
                kind,
                digest,
                size,
            } => {
                // `insert` on an existing key replaces the value in place: Python dict order.
                self.maps_mut(context)
                    .0
                    .insert(key, ArtifactRef { kind, digest, size });
            }
            Event::DynamoEntryRecorded { key, entry } => {
                self.maps_mut(context).1.insert(key, entry);
            }
            Event::DynamoEntryExtended {
                key,
                kept,
                mut entry,
            } => {
                let entries = self.maps_mut(context).1;
                if let Some(old) = entries.get_mut(&key) {
                    let mut codes = std::mem::take(&mut old.codes);
                    codes.truncate(kept as usize);
                    codes.append(&mut entry.codes);
                    entry.codes = codes;
                }
                entries.insert(key, entry);
            }
            Event::ArtifactEdited {
                key, digest, size, ..
            } => {
                if let Some(a) = self.maps_mut(context).0.get_mut(&key) {
                    a.digest = digest;
                    a.size = size;
                }
            }
            Event::ArtifactTaken { key } => {
                // Python's dict.pop keeps the others in order.
                self.maps_mut(context).0.shift_remove(&key);
            }
            Event::Cleared => {
                let (artifacts, entries) = self.maps_mut(context);
                artifacts.clear();
                entries.clear();
            }
            Event::Stitched { .. } => {}
            Event::SavedToDynamoCache { entries } => {
                for key in entries.keys() {
                    self.set_saver(namespace, key, context);
                }
                self.cache_mut(namespace).extend(entries);
            }
            Event::EntryLoaded { backends, .. } => {
                self.maps_mut(context).0.extend(backends);
            }
            Event::Scoped {
                context,
                namespace,
                event,
            } => self.apply_in(&context, &namespace, *event),
            Event::Requested {
                request_id,
                event,
                fingerprint,
            } => {
                self.requests.shift_remove(&request_id);
                self.request_fingerprints.shift_remove(&request_id);
                if let Some(fingerprint) = fingerprint {
                    self.request_fingerprints
                        .insert(request_id.clone(), fingerprint);
                }
                self.requests.insert(request_id);
                if self.requests.len() > REMEMBERED_REQUESTS {
                    if let Some(oldest) = self.requests.shift_remove_index(0) {
                        self.request_fingerprints.shift_remove(&oldest);
                    }
                }
                self.apply_in(context, namespace, *event);
            }
            Event::ContextDropped { context } => {
                if context == DEFAULT {
                    self.artifacts.clear();
                    self.entries.clear();
                } else {
                    self.contexts.shift_remove(&context);
                }
            }
            Event::CacheEntryPut {
                namespace,
                key,
                entry,
                saved_by,
            } => {
                self.set_saver(&namespace, &key, &saved_by);
                self.cache_mut(&namespace).insert(key, entry);
            }
            Event::CacheEntryDeleted { namespace, key } => {
                self.cache_mut(&namespace).shift_remove(&key);
                self.set_saver(&namespace, &key, DEFAULT);
                self.forget_if_empty(&namespace);
            }
            Event::DynamoCacheCleared { namespace } => {
                self.cache_mut(&namespace).clear();
                self.saved_by.shift_remove(&namespace);
                self.forget_if_empty(&namespace);
            }
        }
    }

    /// `dump_debug_info` of the default context.
    pub fn debug_info(&self) -> DebugInfo {
        self.context(DEFAULT).debug_info()
    }

    /// A digest of the whole state, order included: equal digests mean equal states.
    pub fn digest(&self) -> Digest {
        // Encoding plain maps and strings cannot fail; an empty encoding would still give a
        // digest that differs from any real state's.
        let bytes = rmp_serde::to_vec_named(self).unwrap_or_default();
        Digest::of(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(key: &str, content: &[u8]) -> Event {
        Event::ArtifactRecorded {
            key: key.into(),
            kind: "eager".into(),
            digest: Digest::of(content),
            size: content.len() as u64,
        }
    }

    #[test]
    fn re_recording_keeps_the_first_position() {
        let mut s = State::default();
        s.apply(recorded("b1", b"aaa"));
        s.apply(recorded("b2", b"bbb"));
        s.apply(recorded("b1", b"ccc"));
        assert_eq!(s.artifacts.keys().collect::<Vec<_>>(), vec!["b1", "b2"]);
        assert_eq!(s.artifacts["b1"].digest, Digest::of(b"ccc"));
    }

    #[test]
    fn take_keeps_the_others_in_order() {
        let mut s = State::default();
        for k in ["a", "b", "c"] {
            s.apply(recorded(k, k.as_bytes()));
        }
        s.apply(Event::ArtifactTaken { key: "a".into() });
        assert_eq!(s.artifacts.keys().collect::<Vec<_>>(), vec!["b", "c"]);
        s.apply(recorded("a", b"a"));
        assert_eq!(s.artifacts.keys().collect::<Vec<_>>(), vec!["b", "c", "a"]);
    }

    #[test]
    fn clear_empties_both_maps_but_not_the_dynamo_cache() {
        let mut s = State::default();
        s.apply(recorded("a", b"a"));
        s.apply(Event::SavedToDynamoCache {
            entries: [(
                "e".to_string(),
                SavedEntry {
                    dynamo: DynamoCacheEntry::default(),
                    backends: IndexMap::new(),
                },
            )]
            .into_iter()
            .collect(),
        });
        s.apply(Event::Cleared);
        assert!(s.artifacts.is_empty() && s.entries.is_empty());
        assert_eq!(s.dynamo_cache.len(), 1);
        assert_eq!(serde_json::to_string(&s.debug_info()).unwrap(), "{}");
    }

    #[test]
    fn contexts_and_namespaces_are_apart_and_old_states_encode_as_before() {
        let plain = {
            let mut s = State::default();
            s.apply(recorded("a", b"a"));
            s
        };
        let before = rmp_serde::to_vec_named(&plain).unwrap();
        let mut s = plain.clone();
        let scoped = |context: &str, namespace: &str, event| Event::Scoped {
            context: context.into(),
            namespace: namespace.into(),
            event: Box::new(event),
        };
        s.apply(scoped("p1", DEFAULT, recorded("b", b"b")));
        s.apply(scoped("p1", "ns", Event::Cleared));
        assert_eq!(s.context(DEFAULT).artifacts.len(), 1);
        assert!(s.context("p1").artifacts.is_empty());
        assert!(s.context("never").artifacts.is_empty());
        let saved = SavedEntry {
            dynamo: DynamoCacheEntry::default(),
            backends: IndexMap::new(),
        };
        s.apply(scoped(
            "p1",
            "ns",
            Event::SavedToDynamoCache {
                entries: [("e".to_string(), saved)].into_iter().collect(),
            },
        ));
        assert!(s.cache(DEFAULT).is_empty());
        assert_eq!(s.cache("ns").len(), 1);
        assert_eq!(s.saver("ns", "e"), "p1");
        s.apply(Event::CacheEntryDeleted {
            namespace: "ns".into(),
            key: "e".into(),
        });
        assert!(s.cache("ns").is_empty());
        assert_eq!(s.saver("ns", "e"), DEFAULT);
        s.apply(Event::ContextDropped {
            context: "p1".into(),
        });
        // Back to only the default: encoded exactly as a state that never had the others.
        assert_eq!(rmp_serde::to_vec_named(&s).unwrap(), before);
        let decoded: State = rmp_serde::from_slice(&before).unwrap();
        assert_eq!(decoded, plain);
    }

    #[test]
    fn the_digest_sees_order() {
        let mut a = State::default();
        a.apply(recorded("x", b"1"));
        a.apply(recorded("y", b"2"));
        let mut b = State::default();
        b.apply(recorded("y", b"2"));
        b.apply(recorded("x", b"1"));
        assert_ne!(a.digest(), b.digest());
    }
}
