//! Model-based property test: random operation sequences run against the live [`Context`]
//! and against a plain in-memory model of PyTorch's precompile context (insertion-ordered maps
//! with Python dict semantics), written here independently of the product.
//!
//! After each sequence: the live answers matched the model's all along; the live
//! `dump_debug_info`, contents and state digest equal the model's; and the state digest is the
//! same after close + reopen (newest snapshot + tail replay), after a full replay from the
//! first event ignoring snapshots, and in a context opened again on the directory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use indexmap::IndexMap;
use pcx::actor::StitchedEntry;
use pcx::core::event::SavedEntry;
use pcx::core::model::{
    ArtifactRef, DebugInfo, Digest, DynamoCacheEntry, DynamoCodeEntry, EntryDebugInfo,
};
use pcx::core::state::State;
use pcx::store::replay::{fold, recover, Head};
use pcx::store::sled_journal::SledJournal;
use pcx::Context;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

mod common;
use common::library::{artifact, config, open, open_sled_directly};

/// Artifact keys; entries may reference `b3`, which is recorded less often, and `b4`, never.
const ARTIFACT_KEYS: [&str; 5] = ["b0", "b1", "b2", "b3", "b4"];
const ENTRY_KEYS: [&str; 3] = ["e0", "e1", "e2"];
const SNAPSHOT_EVERY: u64 = 3;

#[derive(Clone, Debug)]
enum Op {
    Record {
        key: usize,
        content: Vec<u8>,
    },
    /// An entry whose codes list the artifact keys (by index) each code references.
    Entry {
        key: usize,
        codes: Vec<Vec<usize>>,
        line: i64,
    },
    Edit {
        key: usize,
        append: bool,
        bytes: Vec<u8>,
    },
    Get {
        key: usize,
    },
    Take {
        key: usize,
    },
    Clear,
    Stitch,
    Save,
    Load {
        key: usize,
    },
    /// Close the context and open it again on the same directory.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let content = prop::collection::vec(any::<u8>(), 0..6);
    let artifact_key = prop_oneof![4 => 0..3usize, 1 => Just(3usize)];
    let code = prop::collection::vec(0..ARTIFACT_KEYS.len(), 0..3);
    let codes = prop_oneof![1 => Just(Vec::new()), 8 => prop::collection::vec(code, 1..4)];
    prop_oneof![
        6 => (artifact_key.clone(), content.clone()).prop_map(|(key, content)| Op::Record { key, content }),
        3 => (0..ENTRY_KEYS.len(), codes, 1..50i64).prop_map(|(key, codes, line)| Op::Entry { key, codes, line }),
        3 => (0..ARTIFACT_KEYS.len(), any::<bool>(), content).prop_map(|(key, append, bytes)| Op::Edit { key, append, bytes }),
        1 => (0..ARTIFACT_KEYS.len()).prop_map(|key| Op::Get { key }),
        2 => (0..ARTIFACT_KEYS.len()).prop_map(|key| Op::Take { key }),
        1 => Just(Op::Clear),
        2 => Just(Op::Stitch),
        2 => Just(Op::Save),
        2 => (0..ENTRY_KEYS.len()).prop_map(|key| Op::Load { key }),
        1 => Just(Op::Restart),
    ]
}

fn dynamo_entry(codes: &[Vec<usize>], line: i64) -> DynamoCacheEntry {
    DynamoCacheEntry {
        codes: codes
            .iter()
            .enumerate()
            .map(|(i, ids)| DynamoCodeEntry {
                python_module: "model".into(),
                function_names: vec![format!("fn_{i}")],
                backend_ids: ids.iter().map(|&k| ARTIFACT_KEYS[k].to_string()).collect(),
                payload: vec![i as u8; i],
                ..Default::default()
            })
            .collect(),
        device_type: "cpu".into(),
        fn_name: Some("forward".into()),
        fn_first_lineno: Some(line),
        ..Default::default()
    }
}

/// A saved (or stitched) entry in the model: the bypass-marked copy and its backends' content.
type ModelEntry = (DynamoCacheEntry, IndexMap<String, Vec<u8>>);

/// The reference: PyTorch's two dicts, the dynamo cache, and the count of events written.
/// `IndexMap::insert` keeps an existing key's position and `shift_remove` keeps the others in
/// order: Python's dict assignment and `pop`.
#[derive(Default)]
struct Model {
    artifacts: IndexMap<String, Vec<u8>>,
    entries: IndexMap<String, DynamoCacheEntry>,
    dynamo_cache: IndexMap<String, ModelEntry>,
    events: u64,
}

impl Model {
    /// One event written: the sequence number the answer must carry.
    fn wrote(&mut self, n: u64) -> Option<u64> {
        self.events += n;
        Some(self.events)
    }

    /// `PrecompileCacheEntry.from_cache_entry` for every entry: per code, take backends in
    /// order until the first missing one, which bypasses that code.
    fn stitch(&self) -> IndexMap<String, ModelEntry> {
        let mut out = IndexMap::new();
        for (key, entry) in &self.entries {
            let mut dynamo = entry.clone();
            let mut backends = IndexMap::new();
            for code in &mut dynamo.codes {
                for id in &code.backend_ids {
                    match self.artifacts.get(id) {
                        Some(content) => {
                            backends
                                .entry(id.clone())
                                .or_insert_with(|| content.clone());
                        }
                        None => {
                            code.bypassed = true;
                            code.bypass_reason =
                                Some(format!("backend artifact {id} missing at save time"));
                            break;
                        }
                    }
                }
            }
            out.insert(key.clone(), (dynamo, backends));
        }
        out
    }

    fn debug_info(&self) -> DebugInfo {
        DebugInfo {
            dynamo: self
                .entries
                .iter()
                .map(|(key, e)| {
                    let mut ids: Vec<String> = Vec::new();
                    for id in e.codes.iter().flat_map(|c| &c.backend_ids) {
                        if !ids.contains(id) {
                            ids.push(id.clone());
                        }
                    }
                    EntryDebugInfo {
                        num_codes: e.codes.len().to_string(),
                        fn_name: e.fn_name.clone(),
                        fn_first_lineno: e.fn_first_lineno,
                        device_type: e.device_type.clone(),
                        backend_ids: ids,
                        key: Some(key.clone()),
                    }
                })
                .collect(),
            backends: self.artifacts.keys().cloned().collect(),
        }
    }

    /// The model as the product's state value, to compare digests (order included).
    fn state(&self) -> State {
        let refs = |m: &IndexMap<String, Vec<u8>>| -> IndexMap<String, ArtifactRef> {
            m.iter()
                .map(|(k, c)| {
                    (
                        k.clone(),
                        ArtifactRef {
                            kind: "eager".into(),
                            digest: Digest::of(c),
                            size: c.len() as u64,
                        },
                    )
                })
                .collect()
        };
        State {
            artifacts: refs(&self.artifacts),
            entries: self.entries.clone(),
            dynamo_cache: self
                .dynamo_cache
                .iter()
                .map(|(k, (dynamo, backends))| {
                    (
                        k.clone(),
                        SavedEntry {
                            dynamo: dynamo.clone(),
                            backends: refs(backends),
                        },
                    )
                })
                .collect(),
            ..State::default()
        }
    }
}

/// A stitched entry in a comparable form: IndexMap equality ignores order, this does not.
fn flat_live(e: &StitchedEntry) -> (DynamoCacheEntry, Vec<(String, Vec<u8>)>) {
    (
        e.dynamo.clone(),
        e.backends
            .iter()
            .map(|(k, a)| (k.clone(), a.content.clone()))
            .collect(),
    )
}

fn flat_model(e: &ModelEntry) -> (DynamoCacheEntry, Vec<(String, Vec<u8>)>) {
    (
        e.0.clone(),
        e.1.iter().map(|(k, c)| (k.clone(), c.clone())).collect(),
    )
}

/// Runs one operation live and in the model, and checks the answers agree.
async fn step(ctx: &Context, model: &mut Model, op: &Op) -> Result<(), TestCaseError> {
    match op {
        Op::Record { key, content } => {
            let key = ARTIFACT_KEYS[*key];
            let ack = ctx
                .record_artifact(artifact(key, content))
                .await
                .map_err(|e| TestCaseError::fail(format!("record {key}: {e}")))?;
            model.artifacts.insert(key.into(), content.clone());
            prop_assert_eq!(ack.seq, model.wrote(1));
        }
        Op::Entry { key, codes, line } => {
            let key = ENTRY_KEYS[*key];
            let answer = ctx
                .record_dynamo_cache_entry(key, dynamo_entry(codes, *line))
                .await;
            if codes.is_empty() {
                let err = answer.expect_err("an entry without codes is rejected");
                prop_assert_eq!(err.kind(), "invalid_entry");
            } else {
                let ack = answer.map_err(|e| TestCaseError::fail(format!("entry {key}: {e}")))?;
                model.entries.insert(key.into(), dynamo_entry(codes, *line));
                prop_assert_eq!(ack.seq, model.wrote(1));
            }
        }
        Op::Edit { key, append, bytes } => {
            let key = ARTIFACT_KEYS[*key];
            let ran = Arc::new(AtomicBool::new(false));
            let (ran2, bytes2, append) = (ran.clone(), bytes.clone(), *append);
            let answer = ctx
                .edit_artifact(key, if append { "append" } else { "set" }, move |mut c| {
                    ran2.store(true, Ordering::SeqCst);
                    if append {
                        c.extend_from_slice(&bytes2);
                        c
                    } else {
                        bytes2
                    }
                })
                .await;
            match model.artifacts.get_mut(key) {
                None => {
                    let err = answer.expect_err("editing a missing key fails");
                    prop_assert_eq!(err.to_string(), format!("Key {key} not found in artifacts"));
                    prop_assert!(
                        !ran.load(Ordering::SeqCst),
                        "the edit of missing {} ran",
                        key
                    );
                }
                Some(content) => {
                    if append {
                        content.extend_from_slice(bytes);
                    } else {
                        *content = bytes.clone();
                    }
                    let ack =
                        answer.map_err(|e| TestCaseError::fail(format!("edit {key}: {e}")))?;
                    prop_assert_eq!(ack.seq, model.wrote(1));
                }
            }
        }
        Op::Get { key } => {
            let key = ARTIFACT_KEYS[*key];
            let ack = ctx
                .serialize_artifact_by_key(key)
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(ack.seq, None);
            prop_assert_eq!(
                ack.value.map(|a| a.content),
                model.artifacts.get(key).cloned()
            );
        }
        Op::Take { key } => {
            let key = ARTIFACT_KEYS[*key];
            let ack = ctx
                .take_artifact(key)
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let expected = model.artifacts.shift_remove(key);
            let seq = if expected.is_some() {
                model.wrote(1)
            } else {
                None
            };
            prop_assert_eq!(ack.seq, seq);
            prop_assert_eq!(ack.value.map(|a| a.content), expected);
        }
        Op::Clear => {
            let ack = ctx
                .clear()
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            model.artifacts.clear();
            model.entries.clear();
            prop_assert_eq!(ack.seq, model.wrote(1));
        }
        Op::Stitch => {
            let ack = ctx
                .create_cache_entries()
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(ack.seq, model.wrote(1));
            prop_assert_eq!(&ack.value.debug_info, &model.debug_info());
            let live: Vec<_> = ack
                .value
                .entries
                .iter()
                .map(|(k, e)| (k.clone(), flat_live(e)))
                .collect();
            let expected: Vec<_> = model
                .stitch()
                .iter()
                .map(|(k, e)| (k.clone(), flat_model(e)))
                .collect();
            prop_assert_eq!(live, expected);
        }
        Op::Save => {
            let ack = ctx
                .save_to_dynamo_cache()
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&ack.value, &model.debug_info());
            for (key, entry) in model.stitch() {
                model.dynamo_cache.insert(key, entry);
            }
            // The stitch is logged, then the save.
            prop_assert_eq!(ack.seq, model.wrote(2));
        }
        Op::Load { key } => {
            let key = ENTRY_KEYS[*key];
            let answer = ctx.load_cache_entry(key, None).await;
            match model.dynamo_cache.get(key).cloned() {
                None => {
                    let err = answer.expect_err("loading an unsaved key fails");
                    prop_assert_eq!(err.kind(), "package_not_found");
                    prop_assert_eq!(err.to_string(), format!("No package found with key {key}"));
                }
                Some(saved) => {
                    let ack =
                        answer.map_err(|e| TestCaseError::fail(format!("load {key}: {e}")))?;
                    prop_assert_eq!(flat_live(&ack.value.entry), flat_model(&saved));
                    let deserialized: Vec<_> = ack
                        .value
                        .deserialized
                        .iter()
                        .map(|(k, d)| (k.clone(), d.content.clone()))
                        .collect();
                    prop_assert_eq!(deserialized, flat_model(&saved).1);
                    for (id, content) in saved.1 {
                        model.artifacts.insert(id, content);
                    }
                    prop_assert_eq!(ack.seq, model.wrote(1));
                }
            }
        }
        Op::Restart => unreachable!("restarts are handled by run_ops, which owns the context"),
    }
    Ok(())
}

async fn digest(ctx: &Context) -> Digest {
    ctx.state_digest().await.expect("state digest").value
}

/// `dump_debug_info` is the model's, and every artifact key reads back as the model holds it
/// (content, or none).
async fn check_against_model(
    ctx: &Context,
    model: &Model,
    when: &str,
) -> Result<(), TestCaseError> {
    let info = ctx
        .dump_debug_info()
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?
        .value;
    prop_assert_eq!(&info, &model.debug_info());
    for key in ARTIFACT_KEYS {
        let got = ctx
            .serialize_artifact_by_key(key)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(
            got.value.map(|a| a.content),
            model.artifacts.get(key).cloned(),
            "{} {}",
            when,
            key
        );
    }
    Ok(())
}

async fn run_ops(ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), SNAPSHOT_EVERY);
    let mut model = Model::default();
    let mut ctx = open(&config);
    for op in ops {
        if let Op::Restart = op {
            ctx.close()
                .await
                .map_err(|e| TestCaseError::fail(format!("close: {e}")))?;
            ctx = open(&config);
            continue;
        }
        step(&ctx, &mut model, op).await?;
    }

    // Live against the model.
    check_against_model(&ctx, &model, "live").await?;
    let live = digest(&ctx).await;
    prop_assert_eq!(
        live,
        model.state().digest(),
        "the live state differs from the model's"
    );
    ctx.close()
        .await
        .map_err(|e| TestCaseError::fail(format!("close: {e}")))?;

    // (a) snapshot + tail replay, (b) full replay from the first event, on a reopened journal.
    {
        let (journal, recovered) = reopen_and_recover(dir.path(), &config)?;
        prop_assert_eq!(recovered.head.seq, model.events);
        prop_assert_eq!(
            recovered.state.digest(),
            live,
            "snapshot + tail replay differs from live"
        );
        if model.events > 0 {
            prop_assert_eq!(
                recovered.snapshot,
                Some(model.events),
                "a clean close leaves a snapshot at the last event"
            );
            prop_assert_eq!(recovered.replayed, 0);
        } else {
            prop_assert_eq!(recovered.snapshot, None);
        }
        let (full, head, replayed) = fold(&journal, State::default(), Head::EMPTY, None)
            .map_err(|e| TestCaseError::fail(format!("full replay: {e}")))?;
        prop_assert_eq!(replayed, model.events);
        prop_assert_eq!(head, recovered.head);
        prop_assert_eq!(full.digest(), live, "a full replay differs from live");
    }

    // (a') as after a crash: without the close's snapshot, the one before it (if any) and
    // the events after it.
    {
        let db = open_sled_directly(dir.path(), std::time::Duration::from_secs(10));
        let snapshots = db.open_tree("snapshots").expect("the snapshots tree");
        if let Some((newest, _)) = snapshots.last().expect("read snapshots") {
            snapshots
                .remove(newest)
                .expect("remove the newest snapshot");
        }
        db.flush().expect("flush");
    }
    {
        let (_, recovered) = reopen_and_recover(dir.path(), &config)?;
        prop_assert_eq!(recovered.head.seq, model.events);
        prop_assert_eq!(
            recovered.snapshot.unwrap_or(0) + recovered.replayed,
            model.events
        );
        prop_assert_eq!(
            recovered.state.digest(),
            live,
            "an older snapshot + tail replay differs from live"
        );
    }

    // (c) a context opened again reads back the same state and contents.
    let ctx = open(&config);
    prop_assert_eq!(
        digest(&ctx).await,
        live,
        "the reopened context differs from live"
    );
    check_against_model(&ctx, &model, "reopened").await?;
    ctx.close()
        .await
        .map_err(|e| TestCaseError::fail(format!("close: {e}")))?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        // Failures are shrunk and printed; no regression file is written into tests/.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn live_replayed_and_reopened_states_equal_the_model(ops in prop::collection::vec(op(), 1..40)) {
        actix::System::new().block_on(run_ops(&ops))?;
    }
}

/// Opens the journal of a closed data directory and recovers its state.
fn reopen_and_recover(
    dir: &std::path::Path,
    config: &pcx::Config,
) -> Result<(SledJournal, pcx::store::replay::Recovered), TestCaseError> {
    let journal = SledJournal::open(dir, config.cache_capacity_bytes).expect("reopen the journal");
    let recovered = recover(&journal).map_err(|e| TestCaseError::fail(format!("recover: {e}")))?;
    Ok((journal, recovered))
}
