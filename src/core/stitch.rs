//! `create_cache_entries`: stitching every dynamo entry with the artifacts it references.
//! Pure: reading content is the caller's `resolve`, and the structured trace events are
//! returned as values for the caller to emit.

use indexmap::map::Slice;
use indexmap::IndexMap;
use serde_json::json;

use crate::core::event::{Event, StitchBypass, StitchFailure};
use crate::core::model::{
    bypass_reason, stitch_entry, ArtifactRef, DebugInfo, DynamoCacheEntry, PrecompileCacheEntry,
};
use crate::core::state::ContextRef;

/// A structured trace event in PyTorch's shape (`trace_structured("artifact", name, json)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Structured {
    pub name: &'static str,
    pub payload: serde_json::Value,
}

/// What a stitch gives: the entries by key, `debug_info`, and what to log.
#[derive(Clone, Debug)]
pub struct Stitch<B> {
    pub entries: IndexMap<String, PrecompileCacheEntry<B>>,
    pub debug_info: DebugInfo,
    pub bypassed: Vec<StitchBypass>,
    pub failed: Vec<StitchFailure>,
    /// In the order PyTorch emits them: `dynamo_cache_entries`, then per entry any
    /// `dynamo_cache_bypass` and `dynamo_cache_exception`.
    pub trace: Vec<Structured>,
}

impl<B> Stitch<B> {
    /// The fact to log for this stitch.
    pub fn event(&self) -> Event {
        Event::Stitched {
            produced: self.entries.keys().cloned().collect(),
            bypassed: self.bypassed.clone(),
            failed: self.failed.clone(),
        }
    }
}

/// Stitches every entry of `state`. `resolve` turns a present artifact into what the result
/// holds (its content, or just the reference); an error from it makes that one key fail, the
/// rest go on. Never clears or changes anything. The structured trace events are built only
/// when `traced` (the first carries the whole debug info: tens of milliseconds for a state of
/// 100,000 artifacts, wasted when nobody logs them).
pub fn create_cache_entries<B>(
    state: ContextRef<'_>,
    traced: bool,
    resolve: impl FnMut(&str, &ArtifactRef) -> Result<B, String>,
) -> Stitch<B> {
    let mut out = Stitch::begin(state, traced);
    out.append(stitch_part(
        state,
        state.entries.as_slice(),
        traced,
        resolve,
    ));
    out
}

/// The stitched entries of a run of the state's entries, in their order, with what they
/// logged: a stitch is its [`Stitch::begin`] followed by its parts, so that the parts can be
/// stitched side by side.
pub struct Part<B> {
    entries: IndexMap<String, PrecompileCacheEntry<B>>,
    bypassed: Vec<StitchBypass>,
    failed: Vec<StitchFailure>,
    trace: Vec<Structured>,
}

impl<B> Stitch<B> {
    /// A stitch of no entries yet: the debug info, and the trace event that comes first.
    pub fn begin(state: ContextRef<'_>, traced: bool) -> Stitch<B> {
        let debug_info = state.debug_info();
        let mut trace = Vec::new();
        if traced {
            trace.push(Structured {
                name: "dynamo_cache_entries",
                payload: json!({ "num_entries": state.entries.len(), "artifacts": debug_info }),
            });
        }
        Stitch {
            entries: IndexMap::new(),
            debug_info,
            bypassed: Vec::new(),
            failed: Vec::new(),
            trace,
        }
    }

    /// Adds the part that follows the entries stitched so far.
    pub fn append(&mut self, part: Part<B>) {
        if self.entries.is_empty() {
            self.entries = part.entries;
        } else {
            self.entries.extend(part.entries);
        }
        self.bypassed.extend(part.bypassed);
        self.failed.extend(part.failed);
        self.trace.extend(part.trace);
    }
}

/// Stitches `entries`, a run of `state.entries` (see [`create_cache_entries`]).
pub fn stitch_part<B>(
    state: ContextRef<'_>,
    entries: &Slice<String, DynamoCacheEntry>,
    traced: bool,
    mut resolve: impl FnMut(&str, &ArtifactRef) -> Result<B, String>,
) -> Part<B> {
    let mut part = Part {
        entries: IndexMap::with_capacity(entries.len()),
        bypassed: Vec::new(),
        failed: Vec::new(),
        trace: Vec::new(),
    };
    for (key, entry) in entries {
        // References, not copies: each is resolved once below, and its id moves into the
        // result (a stitch of W1's 90,000 backends spent a fifth of its time copying).
        let (stitched, bypasses) = stitch_entry(entry, |id| state.artifacts.get(id));
        for b in &bypasses {
            if traced {
                part.trace.push(Structured {
                    name: "dynamo_cache_bypass",
                    payload: json!({ "entry": entry.debug_info(), "missing_backend": b.missing_backend }),
                });
            }
            part.bypassed.push(StitchBypass {
                key: key.clone(),
                code_index: b.code_index,
                missing_backend: b.missing_backend.clone(),
                reason: bypass_reason(&b.missing_backend),
            });
        }
        let mut backends = IndexMap::with_capacity(stitched.backends.len());
        let resolved = stitched.backends.into_iter().try_for_each(|(id, r)| {
            let b = resolve(&id, r)?;
            backends.insert(id, b);
            Ok(())
        });
        match resolved {
            Ok(()) => {
                part.entries.insert(
                    key.clone(),
                    PrecompileCacheEntry {
                        dynamo: stitched.dynamo,
                        backends,
                    },
                );
            }
            Err(error) => {
                tracing::warn!(key = %key, error = %error, "Failed to create cache entry {key}");
                if traced {
                    part.trace.push(Structured {
                        name: "dynamo_cache_exception",
                        payload: json!({ "key": key, "error": error }),
                    });
                }
                part.failed.push(StitchFailure {
                    key: key.clone(),
                    error,
                });
            }
        }
    }
    part
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::{Digest, DynamoCacheEntry, DynamoCodeEntry};
    use crate::core::scope::DEFAULT;
    use crate::core::state::State;

    fn state() -> State {
        let mut s = State::default();
        for (k, c) in [("b1", &b"ccc"[..]), ("b2", b"bbb!")] {
            s.apply(Event::ArtifactRecorded {
                key: k.into(),
                kind: "eager".into(),
                digest: Digest::of(c),
                size: c.len() as u64,
            });
        }
        let code = |ids: &[&str]| DynamoCodeEntry {
            backend_ids: ids.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        s.apply(Event::DynamoEntryRecorded {
            key: "e1".into(),
            entry: DynamoCacheEntry {
                codes: vec![code(&["b1", "b2"]), code(&["b3", "b1"])],
                device_type: "cpu".into(),
                fn_name: Some("f".into()),
                fn_first_lineno: Some(3),
                ..Default::default()
            },
        });
        s
    }

    #[test]
    fn the_worked_example_stitches_with_one_bypassed_code_and_traces_it() {
        let s = state();
        let out = create_cache_entries(s.context(DEFAULT), true, |_, r| Ok(r.digest));
        let e1 = &out.entries["e1"];
        assert_eq!(e1.backends.keys().collect::<Vec<_>>(), vec!["b1", "b2"]);
        let flags: Vec<bool> = e1.dynamo.codes.iter().map(|c| c.bypassed).collect();
        assert_eq!(flags, vec![false, true]);
        let names: Vec<&str> = out.trace.iter().map(|t| t.name).collect();
        assert_eq!(names, vec!["dynamo_cache_entries", "dynamo_cache_bypass"]);
        assert_eq!(out.trace[0].payload["num_entries"], 1);
        assert_eq!(out.trace[1].payload["missing_backend"], "b3");
        assert_eq!(out.trace[1].payload["entry"]["num_codes"], "2");
        // Repeatable, and the state's entry is not marked.
        assert!(s.entries["e1"].codes.iter().all(|c| !c.bypassed));
        let again = create_cache_entries(s.context(DEFAULT), true, |_, r| Ok(r.digest));
        assert_eq!(again.entries["e1"], out.entries["e1"]);
        // Untraced: the same result and the same fact, no trace events built.
        let quiet = create_cache_entries(s.context(DEFAULT), false, |_, r| Ok(r.digest));
        assert!(quiet.trace.is_empty());
        assert_eq!(quiet.entries, out.entries);
        assert_eq!(quiet.event(), out.event());
    }

    #[test]
    fn a_failing_key_is_left_out_with_an_exception_and_the_rest_go_on() {
        let mut s = state();
        s.apply(Event::DynamoEntryRecorded {
            key: "e2".into(),
            entry: DynamoCacheEntry {
                codes: vec![DynamoCodeEntry {
                    backend_ids: vec!["b2".into()],
                    ..Default::default()
                }],
                ..Default::default()
            },
        });
        let out = create_cache_entries(s.context(DEFAULT), true, |id, _| {
            if id == "b1" {
                Err("blob gone".into())
            } else {
                Ok(())
            }
        });
        assert_eq!(out.entries.keys().collect::<Vec<_>>(), vec!["e2"]);
        assert_eq!(
            out.failed,
            vec![StitchFailure {
                key: "e1".into(),
                error: "blob gone".into()
            }]
        );
        let exc = out
            .trace
            .iter()
            .find(|t| t.name == "dynamo_cache_exception")
            .unwrap();
        assert_eq!(exc.payload, json!({"key": "e1", "error": "blob gone"}));
    }
}
