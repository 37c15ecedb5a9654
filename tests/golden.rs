//! Golden byte fixtures of the on-disk format at schema version 1.
//!
//! `tests/fixtures/v1/` holds, as checked-in binary files:
//! - one event record per variant of [`Event`] (`event_<variant>.bin`), made by
//!   [`record::encode_event`]; the eight records form one hash-chained log, seq 1 to 8;
//! - `snapshot.bin`: the snapshot of the state after that log ([`record::encode_snapshot_of`]);
//! - `saved_entry.bin`: one entry of the dynamo cache view ([`record::encode_saved_entry`]).
//!
//! The tests decode every file and compare it with the value built below (so a change that
//! stops old logs from decoding fails), check that encoding that value today gives the same
//! bytes (so a change of the format is noticed, not slipped in), and replay the eight records
//! through a real journal.
//!
//! To (re)generate the files, run `PCX_BLESS=1 cargo test --test golden`: the tests then write
//! the files instead of comparing. Regenerate only for a new schema version, in a new
//! directory (`v2/`), keeping `v1/` as it is: data written at version 1 must keep decoding.

use std::path::PathBuf;
use std::sync::Arc;

use indexmap::IndexMap;
use pcx::core::event::{Event, SavedEntry, StitchBypass, StitchFailure};
use pcx::core::model::{
    ArtifactRef, Digest, DynamoCacheEntry, DynamoCodeEntry, InlinedSource, SourceInfo, SystemInfo,
};
use pcx::core::state::State;
use pcx::store::journal::{Commit, Journal};
use pcx::store::record::{self, Envelope, GENESIS, SCHEMA_VERSION};
use pcx::store::replay::{fold, recover, Head};
use pcx::store::sled_journal::SledJournal;

const TIME_MS: u64 = 1_700_000_000_000;
const ORIGIN: &str = "golden@pcx";

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1")
}

fn blessing() -> bool {
    std::env::var("PCX_BLESS").is_ok_and(|v| v == "1")
}

fn read_fixture(name: &str) -> Vec<u8> {
    let path = fixture_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read fixture {}: {e} (generate it with PCX_BLESS=1)",
            path.display()
        )
    })
}

/// In bless mode writes `encoded_today` as fixture `name`. Otherwise reads the stored
/// fixture, runs `check_decoded` on it (does old data still decode to the expected value?),
/// then checks that today's encoding is the same bytes. Returns the fixture's bytes.
fn fixture(name: &str, encoded_today: Vec<u8>, check_decoded: impl FnOnce(&[u8])) -> Vec<u8> {
    if blessing() {
        std::fs::create_dir_all(fixture_dir()).unwrap();
        std::fs::write(fixture_dir().join(name), &encoded_today).unwrap();
        return encoded_today;
    }
    let stored = read_fixture(name);
    check_decoded(&stored);
    assert!(
        stored == encoded_today,
        "encoding {name} today gives different bytes than the v1 fixture: the on-disk format \
         changed; bump SCHEMA_VERSION and add new fixtures instead of changing v1"
    );
    stored
}

fn artifact_ref(content: &[u8]) -> ArtifactRef {
    ArtifactRef {
        kind: "eager".into(),
        digest: Digest::of(content),
        size: content.len() as u64,
    }
}

fn code(ids: &[&str], payload: &[u8]) -> DynamoCodeEntry {
    DynamoCodeEntry {
        python_module: "model".into(),
        function_names: vec!["forward".into(), "__resume_at_12".into()],
        backend_ids: ids.iter().map(|s| s.to_string()).collect(),
        code_source: Some("def forward(x): return x + 1".into()),
        install_to_global: true,
        has_compile_id: true,
        bypassed: false,
        bypass_reason: None,
        payload: payload.to_vec(),
    }
}

/// The recorded entry `e1`: every field set, codes `[b1]` and `[b3, b1]`.
fn entry() -> DynamoCacheEntry {
    DynamoCacheEntry {
        codes: vec![
            code(&["b1"], &[0x00, 0x01, 0xfe, 0xff]),
            code(&["b3", "b1"], b""),
        ],
        source_info: SourceInfo {
            inlined_sources: vec![InlinedSource {
                module: "model".into(),
                firstlineno: 3,
                lastlineno: 9,
                checksum: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
            }],
        },
        device_type: "cuda".into(),
        system_info: SystemInfo {
            python_version: "3.11.9".into(),
            torch_version: "2.10.0".into(),
            toolkit_version: Some("12.8".into()),
            triton_version: Some("3.4.0".into()),
            gpu_name: None,
        },
        fn_name: Some("forward".into()),
        fn_first_lineno: Some(3),
        extra: Vec::new(),
    }
}

/// `e1` as stitched and saved: code 1 bypassed (b3 missing), backend b1 as edited.
fn saved_entry() -> SavedEntry {
    let mut dynamo = entry();
    dynamo.codes[1].bypassed = true;
    dynamo.codes[1].bypass_reason = Some("backend artifact b3 missing at save time".into());
    SavedEntry {
        dynamo,
        backends: [("b1".to_string(), artifact_ref(b"aaa!"))]
            .into_iter()
            .collect(),
    }
}

/// The fixture name of each variant; the exhaustive match makes a new variant fail to compile
/// here until it has a fixture.
fn fixture_name(event: &Event) -> &'static str {
    match event {
        Event::ArtifactRecorded { .. } => "event_artifact_recorded.bin",
        Event::DynamoEntryRecorded { .. } => "event_dynamo_entry_recorded.bin",
        Event::ArtifactEdited { .. } => "event_artifact_edited.bin",
        Event::ArtifactTaken { .. } => "event_artifact_taken.bin",
        Event::Cleared => "event_cleared.bin",
        Event::Stitched { .. } => "event_stitched.bin",
        Event::SavedToDynamoCache { .. } => "event_saved_to_dynamo_cache.bin",
        Event::EntryLoaded { .. } => "event_entry_loaded.bin",
        Event::Scoped { .. } => "event_scoped.bin",
        Event::ContextDropped { .. } => "event_context_dropped.bin",
        Event::CacheEntryPut { .. } => "event_cache_entry_put.bin",
        Event::CacheEntryDeleted { .. } => "event_cache_entry_deleted.bin",
        Event::DynamoCacheCleared { .. } => "event_dynamo_cache_cleared.bin",
        Event::DynamoEntryExtended { .. } => "event_dynamo_entry_extended.bin",
        Event::Requested { .. } => "event_requested.bin",
    }
}

/// One event of each variant that came with named contexts and namespaces (after the v1 log
/// was frozen; still schema 1, since the variants before them are stored as they were).
fn scope_events() -> Vec<Event> {
    vec![
        Event::Scoped {
            context: "torch@host:1:2".into(),
            namespace: "torch-0123456789abcdef".into(),
            event: Box::new(Event::ArtifactTaken { key: "b1".into() }),
        },
        Event::ContextDropped {
            context: "torch@host:1:2".into(),
        },
        Event::CacheEntryPut {
            namespace: "ns".into(),
            key: "e2".into(),
            entry: saved_entry(),
            saved_by: "torch@host:1:2".into(),
        },
        Event::CacheEntryDeleted {
            namespace: "ns".into(),
            key: "e2".into(),
        },
        Event::DynamoCacheCleared {
            namespace: "ns".into(),
        },
        Event::DynamoEntryExtended {
            key: "e1".into(),
            kept: 1,
            entry: entry(),
        },
        Event::Requested {
            request_id: "job-7:rec-b1".into(),
            event: Box::new(Event::Scoped {
                context: "torch@host:1:2".into(),
                namespace: "default".into(),
                event: Box::new(Event::ArtifactTaken { key: "b1".into() }),
            }),
            // Events written before request digests were kept have none, and still decode.
            fingerprint: None,
        },
    ]
}

/// One event of each variant, in the order of the fixture log (seq 1 to 8).
fn events() -> Vec<Event> {
    vec![
        Event::ArtifactRecorded {
            key: "b1".into(),
            kind: "eager".into(),
            digest: Digest::of(b"aaa"),
            size: 3,
        },
        Event::DynamoEntryRecorded {
            key: "e1".into(),
            entry: entry(),
        },
        Event::ArtifactEdited {
            key: "b1".into(),
            label: "append".into(),
            digest: Digest::of(b"aaa!"),
            size: 4,
        },
        Event::Stitched {
            produced: vec!["e1".into()],
            bypassed: vec![StitchBypass {
                key: "e1".into(),
                code_index: 1,
                missing_backend: "b3".into(),
                reason: "backend artifact b3 missing at save time".into(),
            }],
            failed: vec![StitchFailure {
                key: "e0".into(),
                error: "content of b0 is missing".into(),
            }],
        },
        Event::SavedToDynamoCache {
            entries: [("e1".to_string(), saved_entry())].into_iter().collect(),
        },
        Event::ArtifactTaken { key: "b1".into() },
        Event::Cleared,
        Event::EntryLoaded {
            key: "e1".into(),
            backends: [("b1".to_string(), artifact_ref(b"aaa!"))]
                .into_iter()
                .collect(),
        },
    ]
}

/// The state after the fixture log, written out by hand (not by `State::apply`).
fn final_state() -> State {
    State {
        artifacts: [("b1".to_string(), artifact_ref(b"aaa!"))]
            .into_iter()
            .collect(),
        entries: IndexMap::new(),
        dynamo_cache: [("e1".to_string(), saved_entry())].into_iter().collect(),
        ..State::default()
    }
}

/// Walks the fixture log: for each record, builds the expected envelope (chained to the
/// previous stored record), checks or blesses it, and returns the stored bytes with the head.
fn fixture_log() -> (Vec<(u64, Vec<u8>)>, Head) {
    let mut head = Head::EMPTY;
    let mut records = Vec::new();
    for event in events() {
        let name = fixture_name(&event);
        let expected = Envelope {
            schema: SCHEMA_VERSION,
            seq: head.seq + 1,
            time_ms: TIME_MS + head.seq,
            origin: ORIGIN.into(),
            prev: head.hash,
            event,
        };
        let (today, _) = record::encode_event(&expected).unwrap();
        let stored = fixture(name, today, |stored| {
            let decoded = record::decode_event(stored)
                .unwrap_or_else(|e| panic!("fixture {name} does not decode: {e}"));
            assert_eq!(
                decoded.0, expected,
                "fixture {name} decodes to a different envelope"
            );
        });
        let (_, hash) = record::decode_event(&stored).unwrap();
        head = Head {
            seq: expected.seq,
            hash,
        };
        records.push((expected.seq, stored));
    }
    (records, head)
}

#[test]
fn schema_version_is_still_1() {
    // The fixtures below are version 1; a new version needs its own fixtures next to them.
    assert_eq!(SCHEMA_VERSION, 1);
}

#[test]
fn every_event_variant_decodes_from_its_v1_fixture() {
    let (records, head) = fixture_log();
    let names: Vec<&str> = events().iter().map(fixture_name).collect();
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 8, "one fixture per variant: {names:?}");
    assert_eq!(records.len(), 8);
    assert_eq!(head.seq, 8);
    // The first record starts the chain.
    let (first, _) = record::decode_event(&records[0].1).unwrap();
    assert_eq!(first.prev, GENESIS);
}

#[test]
fn every_context_and_namespace_variant_decodes_from_its_fixture() {
    for (i, event) in scope_events().into_iter().enumerate() {
        let name = fixture_name(&event);
        let expected = Envelope {
            schema: SCHEMA_VERSION,
            seq: 100 + i as u64,
            time_ms: TIME_MS,
            origin: ORIGIN.into(),
            prev: GENESIS,
            event,
        };
        let (today, _) = record::encode_event(&expected).unwrap();
        fixture(name, today, |stored| {
            let decoded = record::decode_event(stored)
                .unwrap_or_else(|e| panic!("fixture {name} does not decode: {e}"));
            assert_eq!(decoded.0, expected, "fixture {name} decodes differently");
        });
    }
}

#[test]
fn the_v1_snapshot_decodes_to_the_state_after_the_fixture_log() {
    let (_, head) = fixture_log();
    let state = final_state();
    let today = record::encode_snapshot_of(head.seq, head.hash, &state, 0).unwrap();
    fixture("snapshot.bin", today, |stored| {
        let snapshot = record::decode_snapshot(stored).expect("the v1 snapshot decodes");
        assert_eq!(snapshot.schema, 1);
        assert_eq!(snapshot.seq, 8);
        assert_eq!(snapshot.head, head.hash);
        assert_eq!(snapshot.state, state);
        // IndexMap equality ignores order; the order is part of the state.
        assert_eq!(
            snapshot.state.artifacts.keys().collect::<Vec<_>>(),
            vec!["b1"]
        );
        assert_eq!(
            snapshot.state.dynamo_cache.keys().collect::<Vec<_>>(),
            vec!["e1"]
        );
    });
}

#[test]
fn the_v1_dynamo_cache_view_entry_decodes() {
    let today = record::encode_saved_entry(&saved_entry()).unwrap();
    fixture("saved_entry.bin", today, |stored| {
        let decoded = record::decode_saved_entry(stored).expect("the v1 saved entry decodes");
        assert_eq!(decoded, saved_entry());
        let flags: Vec<bool> = decoded.dynamo.codes.iter().map(|c| c.bypassed).collect();
        assert_eq!(flags, vec![false, true]);
        assert_eq!(
            decoded.dynamo.codes[0].payload,
            vec![0x00, 0x01, 0xfe, 0xff]
        );
        assert_eq!(decoded.backends.keys().collect::<Vec<_>>(), vec!["b1"]);
    });
}

#[test]
fn a_v1_log_replays_through_a_journal_with_and_without_its_snapshot() {
    if blessing() {
        return;
    }
    let (records, head) = fixture_log();
    let dir = tempfile::tempdir().unwrap();
    let journal = Arc::new(SledJournal::open(dir.path(), 1 << 20).unwrap());
    journal
        .commit(&Commit {
            records,
            snapshot: Some((8, read_fixture("snapshot.bin"))),
            ..Commit::default()
        })
        .unwrap();

    let recovered = recover(journal.as_ref()).expect("the v1 log replays");
    assert_eq!(recovered.snapshot, Some(8));
    assert_eq!(recovered.head, head);
    assert_eq!(recovered.state, final_state());

    let (state, full_head, replayed) =
        fold(journal.as_ref(), State::default(), Head::EMPTY, None).unwrap();
    assert_eq!(replayed, 8);
    assert_eq!(full_head, head);
    assert_eq!(state, final_state());
    assert_eq!(state.digest(), recovered.state.digest());
}
