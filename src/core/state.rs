//! The folded state and `apply`, the only way it changes: live handling and replay run this
//! very function, so a replayed context is the live one.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::core::event::{Event, SavedEntry};
use crate::core::model::{self, ArtifactRef, BackendId, DebugInfo, Digest, DynamoCacheEntry};

/// The precompile context: two insertion-ordered maps (Python dict order: re-recording a key
/// keeps its first position) plus the dynamo cache of saved, stitched entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub artifacts: IndexMap<BackendId, ArtifactRef>,
    pub entries: IndexMap<String, DynamoCacheEntry>,
    /// What `save_to_dynamo_cache` wrote; `clear` leaves it alone, as PyTorch's does.
    pub dynamo_cache: IndexMap<String, SavedEntry>,
}

impl State {
    /// How many items the state holds: what a snapshot of it carries.
    pub fn items(&self) -> u64 {
        (self.artifacts.len() + self.entries.len() + self.dynamo_cache.len()) as u64
    }

    /// Folds one event in. Cannot fail: every event was decided valid before it was logged.
    /// Takes the event: its keys and entries move into the state instead of being copied
    /// (the writer and replay both own the events they fold).
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::ArtifactRecorded {
                key,
                kind,
                digest,
                size,
            } => {
                // `insert` on an existing key replaces the value in place: Python dict order.
                self.artifacts
                    .insert(key, ArtifactRef { kind, digest, size });
            }
            Event::DynamoEntryRecorded { key, entry } => {
                self.entries.insert(key, entry);
            }
            Event::ArtifactEdited {
                key, digest, size, ..
            } => {
                if let Some(a) = self.artifacts.get_mut(&key) {
                    a.digest = digest;
                    a.size = size;
                }
            }
            Event::ArtifactTaken { key } => {
                // Python's dict.pop keeps the others in order.
                self.artifacts.shift_remove(&key);
            }
            Event::Cleared => {
                self.artifacts.clear();
                self.entries.clear();
            }
            Event::Stitched { .. } => {}
            Event::SavedToDynamoCache { entries } => {
                self.dynamo_cache.extend(entries);
            }
            Event::EntryLoaded { backends, .. } => {
                self.artifacts.extend(backends);
            }
        }
    }

    /// `dump_debug_info` of the current maps.
    pub fn debug_info(&self) -> DebugInfo {
        model::dump_debug_info(&self.entries, &self.artifacts)
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
