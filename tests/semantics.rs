//! One test per rule of `reference/SEMANTICS.md`, through the library API ([`pcx::Context`]).
//!
//! Every test opens a context on a fresh temporary data directory; the rules about restart
//! close the context and open the same directory again. With `PCX_TEST_SUITE_JOURNAL=postgres`
//! (and pcx built with `--features postgres`) every context is a journal in the database at
//! `PCX_TEST_PG_URL` instead, one per test directory: the same rules, on the fleet's backend.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pcx::actor::{Edit, EditArtifact, Loaded, RecordArtifact, Stitched, StitchedEntry};
use pcx::core::model::Digest;
use pcx::store::error::StoreError;
use pcx::store::journal::{Commit, Journal, Records};
use pcx::store::sled_journal::SledJournal;
use pcx::{Artifact, Config, Context, DynamoCacheEntry, DynamoCodeEntry, SystemInfo};
use serde_json::{json, Value};
use tempfile::TempDir;

mod common;
use common::library::artifact;
use common::pairs;

// ---------------------------------------------------------------------------------------------
// helpers

fn config(dir: &Path) -> Config {
    let mut config = Config::load(None, std::iter::empty()).expect("the built-in config loads");
    config.data_dir = dir.to_path_buf();
    common::library::suite_journal(&mut config);
    config
}

fn open(dir: &Path) -> Context {
    open_config(&config(dir))
}

/// Opens `config`'s data directory (the product itself waits out a lock that a context
/// closed a moment ago still holds).
fn open_config(config: &Config) -> Context {
    Context::open(config).unwrap_or_else(|e| panic!("the context does not open: {e}"))
}

/// Opens a fresh context; the directory lives as long as the returned guard.
fn fresh() -> (TempDir, Context) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let ctx = open(dir.path());
    (dir, ctx)
}

/// Closes the context and opens the same directory again (a restart: state is replayed).
async fn reopen(ctx: Context, dir: &Path) -> Context {
    ctx.close().await.expect("the context closes");
    open(dir)
}

fn code(ids: &[&str]) -> DynamoCodeEntry {
    DynamoCodeEntry {
        backend_ids: ids.iter().map(|s| s.to_string()).collect(),
        python_module: "model".to_string(),
        ..Default::default()
    }
}

fn entry(fn_name: &str, codes: &[&[&str]]) -> DynamoCacheEntry {
    DynamoCacheEntry {
        codes: codes.iter().map(|ids| code(ids)).collect(),
        device_type: "cpu".to_string(),
        fn_name: Some(fn_name.to_string()),
        fn_first_lineno: Some(3),
        ..Default::default()
    }
}

/// Records an eager artifact and gives the answer's seq.
async fn record(ctx: &Context, key: &str, content: &[u8]) -> u64 {
    let ack = ctx
        .record_artifact(artifact(key, content))
        .await
        .expect("record_artifact succeeds");
    ack.seq.expect("a write carries a seq")
}

async fn record_entry(ctx: &Context, key: &str, e: DynamoCacheEntry) -> u64 {
    let ack = ctx
        .record_dynamo_cache_entry(key, e)
        .await
        .expect("record_dynamo_cache_entry succeeds");
    ack.seq.expect("a write carries a seq")
}

/// The stored content under `key`, or `None`.
async fn content_of(ctx: &Context, key: &str) -> Option<Vec<u8>> {
    let ack = ctx
        .serialize_artifact_by_key(key)
        .await
        .expect("serialize_artifact_by_key succeeds");
    ack.value.map(|a| {
        assert_eq!(a.key, key, "the artifact answered is the one asked for");
        a.content
    })
}

/// `dump_debug_info` as JSON (fields in their serialized order).
async fn debug_json(ctx: &Context) -> Value {
    let ack = ctx
        .dump_debug_info()
        .await
        .expect("dump_debug_info succeeds");
    serde_json::to_value(&ack.value).expect("debug_info serializes")
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("not a string: {v}"))
                .to_string()
        })
        .collect()
}

/// The artifact keys listed by `dump_debug_info`, in order.
async fn backend_keys(ctx: &Context) -> Vec<String> {
    let info = debug_json(ctx).await;
    info.get("backends").map(strings).unwrap_or_default()
}

/// The dynamo entry keys listed by `dump_debug_info`, in order.
async fn entry_keys(ctx: &Context) -> Vec<String> {
    let info = debug_json(ctx).await;
    match info.get("dynamo") {
        None => Vec::new(),
        Some(list) => list
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["key"].as_str().unwrap().to_string())
            .collect(),
    }
}

/// Loads the saved entry `key`, which must load.
async fn load(ctx: &Context, key: &str) -> Loaded {
    ctx.load_cache_entry(key, None)
        .await
        .unwrap_or_else(|e| panic!("{key} does not load: {e}"))
        .value
}

/// The load counters as (hit, miss, error).
async fn load_counters(ctx: &Context) -> (u64, u64, u64) {
    let c = ctx.load_counters().await.unwrap().value;
    (c.hit, c.miss, c.error)
}

async fn stitch(ctx: &Context) -> Stitched {
    ctx.create_cache_entries()
        .await
        .expect("create_cache_entries succeeds")
        .value
}

fn bypassed(e: &StitchedEntry) -> Vec<bool> {
    e.dynamo.codes.iter().map(|c| c.bypassed).collect()
}

fn reasons(e: &StitchedEntry) -> Vec<Option<String>> {
    e.dynamo
        .codes
        .iter()
        .map(|c| c.bypass_reason.clone())
        .collect()
}

/// A stitched entry's backends as (key, content text), in order.
fn backends(e: &StitchedEntry) -> Vec<(String, String)> {
    e.backends
        .iter()
        .map(|(id, a)| {
            assert_eq!(&a.key, id, "a backend is keyed by its own key");
            (id.clone(), String::from_utf8(a.content.clone()).unwrap())
        })
        .collect()
}

fn system(torch: &str) -> SystemInfo {
    SystemInfo {
        python_version: "3.11.9".into(),
        torch_version: torch.into(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// record_artifact

#[actix::test]
async fn record_stores_a_copy_that_later_changes_by_the_caller_do_not_reach() {
    let (_dir, ctx) = fresh();
    let mut mine = artifact("b1", b"original");
    ctx.record_artifact(mine.clone()).await.unwrap();
    mine.content.extend_from_slice(b" changed by the caller");
    mine.content[0] = b'X';
    assert_eq!(
        content_of(&ctx, "b1").await.as_deref(),
        Some(&b"original"[..])
    );

    // What a get returns is a copy too.
    let mut got = ctx
        .serialize_artifact_by_key("b1")
        .await
        .unwrap()
        .value
        .unwrap();
    got.content.clear();
    assert_eq!(
        content_of(&ctx, "b1").await.as_deref(),
        Some(&b"original"[..])
    );

    // Two keys with the same bytes are two copies: editing or taking one leaves the other.
    record(&ctx, "b2", b"original").await;
    ctx.edit_artifact("b1", "append", |mut c| {
        c.extend_from_slice(b"!");
        c
    })
    .await
    .unwrap();
    assert_eq!(
        content_of(&ctx, "b1").await.as_deref(),
        Some(&b"original!"[..])
    );
    assert_eq!(
        content_of(&ctx, "b2").await.as_deref(),
        Some(&b"original"[..])
    );
    ctx.take_artifact("b2").await.unwrap();
    assert_eq!(
        content_of(&ctx, "b1").await.as_deref(),
        Some(&b"original!"[..])
    );
}

#[actix::test]
async fn re_recording_replaces_the_value_but_keeps_the_first_position_across_restart() {
    // Once replaying the whole log, once from a snapshot plus a tail.
    for snapshot_every in [10_000, 2] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.snapshot_every = snapshot_every;
        let ctx = open_config(&cfg);
        record(&ctx, "b1", b"aaa").await;
        record(&ctx, "b2", b"bbb").await;
        record(&ctx, "b1", b"ccc").await;
        record_entry(&ctx, "e1", entry("first", &[&["b1"]])).await;
        record_entry(&ctx, "e2", entry("second", &[&["b2"]])).await;
        record_entry(&ctx, "e1", entry("replaced", &[&["b2"], &["b1"]])).await;

        let check = |info: Value| {
            assert_eq!(
                strings(&info["backends"]),
                vec!["b1", "b2"],
                "snapshot_every={snapshot_every}"
            );
            let dynamo = info["dynamo"].as_array().unwrap();
            let keys: Vec<&str> = dynamo.iter().map(|e| e["key"].as_str().unwrap()).collect();
            assert_eq!(keys, vec!["e1", "e2"], "snapshot_every={snapshot_every}");
            assert_eq!(dynamo[0]["fn_name"], "replaced");
            assert_eq!(dynamo[0]["num_codes"], "2");
        };
        check(debug_json(&ctx).await);
        assert_eq!(content_of(&ctx, "b1").await.as_deref(), Some(&b"ccc"[..]));

        ctx.close().await.unwrap();
        let ctx = open_config(&cfg);
        check(debug_json(&ctx).await);
        assert_eq!(content_of(&ctx, "b1").await.as_deref(), Some(&b"ccc"[..]));
        ctx.close().await.unwrap();
    }
}

#[actix::test]
async fn a_taken_key_recorded_again_goes_to_the_end() {
    // Python's dict: pop then insert appends.
    let (dir, ctx) = fresh();
    for k in ["a", "b", "c"] {
        record(&ctx, k, k.as_bytes()).await;
    }
    ctx.take_artifact("a").await.unwrap();
    record(&ctx, "a", b"again").await;
    assert_eq!(backend_keys(&ctx).await, vec!["b", "c", "a"]);
    let ctx = reopen(ctx, dir.path()).await;
    assert_eq!(backend_keys(&ctx).await, vec!["b", "c", "a"]);
}

#[actix::test]
async fn empty_content_is_valid_content() {
    let (dir, ctx) = fresh();
    let ack = ctx
        .record_artifact(artifact("empty", b""))
        .await
        .expect("empty content is accepted");
    assert!(ack.seq.is_some());
    // Present with empty content: not "none".
    assert_eq!(content_of(&ctx, "empty").await, Some(Vec::new()));
    assert_eq!(backend_keys(&ctx).await, vec!["empty"]);

    record_entry(&ctx, "e", entry("f", &[&["empty"]])).await;
    let stitched = stitch(&ctx).await;
    assert_eq!(
        bypassed(&stitched.entries["e"]),
        vec![false],
        "an empty artifact is present, not missing"
    );
    assert_eq!(backends(&stitched.entries["e"]), pairs(&[("empty", "")]));

    let ctx = reopen(ctx, dir.path()).await;
    assert_eq!(content_of(&ctx, "empty").await, Some(Vec::new()));
    let taken = ctx.take_artifact("empty").await.unwrap().value;
    assert_eq!(taken, Some(artifact("empty", b"")));
}

// ---------------------------------------------------------------------------------------------
// record_dynamo_cache_entry

#[actix::test]
async fn an_entry_with_zero_codes_is_rejected_and_nothing_is_recorded() {
    let (dir, ctx) = fresh();
    record_entry(&ctx, "e1", entry("kept", &[&["b1"]])).await;
    let before = debug_json(&ctx).await;
    let digest = ctx.state_digest().await.unwrap().value;

    for key in ["new", "e1"] {
        let err = ctx
            .record_dynamo_cache_entry(key, entry("empty", &[]))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "invalid_entry", "{err}");
        assert!(
            err.to_string().contains(key),
            "the error names the key: {err}"
        );
        assert_eq!(debug_json(&ctx).await, before, "nothing recorded for {key}");
    }
    assert_eq!(ctx.state_digest().await.unwrap().value, digest);
    let ctx = reopen(ctx, dir.path()).await;
    assert_eq!(debug_json(&ctx).await, before);
    assert_eq!(entry_keys(&ctx).await, vec!["e1"]);
}

// ---------------------------------------------------------------------------------------------
// edit_artifact

#[actix::test]
async fn edit_replaces_content_with_the_edit_of_the_old_content() {
    let (dir, ctx) = fresh();
    record(&ctx, "b2", b"bbb").await;
    ctx.edit_artifact("b2", "append", |mut c| {
        c.push(b'!');
        c
    })
    .await
    .expect("edit succeeds");
    assert_eq!(content_of(&ctx, "b2").await.as_deref(), Some(&b"bbb!"[..]));
    let ctx = reopen(ctx, dir.path()).await;
    assert_eq!(content_of(&ctx, "b2").await.as_deref(), Some(&b"bbb!"[..]));
}

#[actix::test]
async fn edit_of_a_missing_key_fails_without_running_the_edit_or_changing_anything() {
    let (_dir, ctx) = fresh();
    record(&ctx, "b1", b"aaa").await;
    let digest = ctx.state_digest().await.unwrap().value;
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    let err = ctx
        .edit_artifact("nope", "set", move |_| {
            flag.store(true, Ordering::SeqCst);
            b"new".to_vec()
        })
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("Key nope not found in artifacts"),
        "{err}"
    );
    assert_eq!(err.kind(), "key_not_found");
    assert!(!ran.load(Ordering::SeqCst), "the edit was not run");
    assert_eq!(
        ctx.state_digest().await.unwrap().value,
        digest,
        "nothing changed"
    );
    assert_eq!(backend_keys(&ctx).await, vec!["b1"]);
    assert_eq!(content_of(&ctx, "nope").await, None);
}

#[actix::test]
async fn a_panicking_edit_is_an_internal_error_changes_nothing_and_the_context_keeps_serving() {
    let (dir, ctx) = fresh();
    record(&ctx, "b1", b"aaa").await;
    let digest = ctx.state_digest().await.unwrap().value;
    let err = ctx
        .edit_artifact("b1", "boom", |_| -> Vec<u8> {
            panic!("edit exploded on purpose")
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "internal", "{err}");
    assert_eq!(
        ctx.state_digest().await.unwrap().value,
        digest,
        "state unchanged"
    );
    assert_eq!(content_of(&ctx, "b1").await.as_deref(), Some(&b"aaa"[..]));

    // Still serving writes and edits.
    record(&ctx, "b2", b"bbb").await;
    ctx.edit_artifact("b1", "set", |_| b"after".to_vec())
        .await
        .expect("a later edit works");
    assert_eq!(content_of(&ctx, "b1").await.as_deref(), Some(&b"after"[..]));
    let ctx = reopen(ctx, dir.path()).await;
    assert_eq!(content_of(&ctx, "b1").await.as_deref(), Some(&b"after"[..]));
    assert_eq!(backend_keys(&ctx).await, vec!["b1", "b2"]);
}

// ---------------------------------------------------------------------------------------------
// serialize_artifact_by_key, take_artifact, clear

#[actix::test]
async fn serialize_of_an_unknown_key_is_none_not_an_error() {
    let (_dir, ctx) = fresh();
    record(&ctx, "b1", b"aaa").await;
    let got = ctx
        .serialize_artifact_by_key("zz")
        .await
        .expect("not an error");
    assert_eq!(got.value, None);
    let got = ctx.serialize_artifact_by_key("b1").await.unwrap().value;
    assert_eq!(got, Some(artifact("b1", b"aaa")));
}

#[actix::test]
async fn take_removes_and_returns_and_a_second_take_gives_none() {
    let (dir, ctx) = fresh();
    record(&ctx, "b1", b"aaa").await;
    record(&ctx, "b2", b"bbb").await;
    let first = ctx.take_artifact("b1").await.unwrap().value;
    assert_eq!(first, Some(artifact("b1", b"aaa")));
    assert_eq!(ctx.take_artifact("b1").await.unwrap().value, None);
    assert_eq!(content_of(&ctx, "b1").await, None);
    assert_eq!(backend_keys(&ctx).await, vec!["b2"]);
    let ctx = reopen(ctx, dir.path()).await;
    assert_eq!(ctx.take_artifact("b1").await.unwrap().value, None);
    assert_eq!(backend_keys(&ctx).await, vec!["b2"]);
}

#[actix::test]
async fn clear_empties_both_maps_but_a_saved_entry_can_still_be_loaded() {
    let (dir, ctx) = fresh();
    record(&ctx, "b1", b"aaa").await;
    record_entry(&ctx, "e1", entry("f", &[&["b1"]])).await;
    ctx.save_to_dynamo_cache().await.unwrap();
    ctx.clear().await.expect("clear succeeds");
    assert_eq!(
        serde_json::to_string(&ctx.dump_debug_info().await.unwrap().value).unwrap(),
        "{}"
    );
    assert_eq!(content_of(&ctx, "b1").await, None);
    assert!(
        stitch(&ctx).await.entries.is_empty(),
        "no entry is left to stitch"
    );

    let ctx = reopen(ctx, dir.path()).await;
    assert_eq!(debug_json(&ctx).await, json!({}));
    // The saved entry survives clear.
    let loaded = load(&ctx, "e1").await;
    assert_eq!(backends(&loaded.entry), pairs(&[("b1", "aaa")]));
}

// ---------------------------------------------------------------------------------------------
// dump_debug_info

#[actix::test]
async fn dump_debug_info_has_the_exact_shape() {
    let (_dir, ctx) = fresh();
    assert_eq!(
        serde_json::to_string(&ctx.dump_debug_info().await.unwrap().value).unwrap(),
        "{}"
    );

    // Only artifacts: the empty "dynamo" list is left out; unreferenced keys are listed too.
    record(&ctx, "b1", b"1").await;
    record(&ctx, "x", b"unreferenced").await;
    assert_eq!(
        debug_json(&ctx).await.to_string(),
        r#"{"backends":["b1","x"]}"#
    );

    record(&ctx, "b2", b"2").await;
    record_entry(&ctx, "e1", entry("f", &[&["b1", "b2"], &["b3", "b1"]])).await;
    let anonymous = DynamoCacheEntry {
        codes: vec![code(&[])],
        device_type: "cuda".into(),
        fn_name: None,
        fn_first_lineno: None,
        ..Default::default()
    };
    record_entry(&ctx, "e0", anonymous).await;

    let info = debug_json(&ctx).await;
    let top: Vec<&String> = info.as_object().unwrap().keys().collect();
    assert_eq!(top, vec!["dynamo", "backends"]);
    assert_eq!(strings(&info["backends"]), vec!["b1", "x", "b2"]);
    let dynamo = info["dynamo"].as_array().unwrap();
    assert_eq!(dynamo.len(), 2);
    for e in dynamo {
        let fields: Vec<&String> = e.as_object().unwrap().keys().collect();
        assert_eq!(
            fields,
            vec![
                "num_codes",
                "fn_name",
                "fn_first_lineno",
                "device_type",
                "backend_ids",
                "key"
            ],
            "field order of {e}"
        );
    }
    let mut ids = strings(&dynamo[0]["backend_ids"]);
    ids.sort();
    assert_eq!(ids, vec!["b1", "b2", "b3"], "the set union over all codes");
    assert_eq!(dynamo[0]["num_codes"], json!("2"), "num_codes is a string");
    assert_eq!(dynamo[0]["fn_name"], json!("f"));
    assert_eq!(dynamo[0]["fn_first_lineno"], json!(3));
    assert_eq!(dynamo[0]["device_type"], json!("cpu"));
    assert_eq!(dynamo[0]["key"], json!("e1"));
    assert_eq!(
        dynamo[1],
        json!({"num_codes":"1","fn_name":null,"fn_first_lineno":null,"device_type":"cuda","backend_ids":[],"key":"e0"})
    );

    // Only entries: the empty "backends" list is left out.
    for k in ["b1", "x", "b2"] {
        ctx.take_artifact(k).await.unwrap();
    }
    let info = debug_json(&ctx).await;
    let top: Vec<&String> = info.as_object().unwrap().keys().collect();
    assert_eq!(top, vec!["dynamo"]);
}

// ---------------------------------------------------------------------------------------------
// create_cache_entries

/// The worked example's state: b1 "ccc", b2 "bbb!", e1 with codes [[b1,b2],[b3,b1]].
async fn worked_example(ctx: &Context) {
    record(ctx, "b1", b"aaa").await;
    record(ctx, "b2", b"bbb").await;
    record(ctx, "b1", b"ccc").await;
    ctx.edit_artifact("b2", "append", |mut c| {
        c.push(b'!');
        c
    })
    .await
    .unwrap();
    record_entry(ctx, "e1", entry("f", &[&["b1", "b2"], &["b3", "b1"]])).await;
}

#[actix::test]
async fn stitch_gives_the_worked_example() {
    let (_dir, ctx) = fresh();
    worked_example(&ctx).await;
    let out = stitch(&ctx).await;
    assert_eq!(
        out.entries.keys().collect::<Vec<_>>(),
        vec!["e1"],
        "an entry with a missing backend is produced"
    );
    let e1 = &out.entries["e1"];
    assert_eq!(backends(e1), pairs(&[("b1", "ccc"), ("b2", "bbb!")]));
    assert_eq!(bypassed(e1), vec![false, true]);
    assert_eq!(
        reasons(e1),
        vec![
            None,
            Some("backend artifact b3 missing at save time".to_string())
        ]
    );
    assert_eq!(
        serde_json::to_value(&out.debug_info).unwrap(),
        debug_json(&ctx).await
    );
}

/// Every request sent through a pipeline is answered once, under its tag: changes in the
/// order sent, a refused one with its own error; what was answered is durable.
#[actix::test]
async fn a_pipeline_answers_each_request_once_under_its_tag() {
    let (dir, ctx) = fresh();
    let mut p = ctx.pipeline::<()>();
    let n = 3_000u64;
    for i in 0..n {
        let mut a = artifact(&format!("k{i}"), format!("v{i}").as_bytes());
        if i % 1_000 == 7 {
            a.kind = "Not A Kind".into();
        }
        assert_eq!(p.send(RecordArtifact { artifact: a }), i);
    }
    let edit = p.send(EditArtifact {
        key: "k1".into(),
        label: "append".into(),
        edit: Edit::Apply(Box::new(|mut c: Vec<u8>| {
            c.push(b'!');
            Ok(c)
        })),
        expected: None,
    });
    let mut answers = Vec::new();
    while p.answers(&mut answers, 500).await > 0 {}
    assert_eq!(p.in_flight(), 0);
    let mut tags: Vec<u64> = answers.iter().map(|(t, _)| *t).collect();
    let durable: Vec<u64> = answers
        .iter()
        .filter(|(_, a)| a.is_ok())
        .map(|(t, _)| *t)
        .collect();
    assert!(
        durable.windows(2).all(|w| w[0] < w[1]),
        "changes answer in the order sent"
    );
    tags.sort_unstable();
    assert_eq!(
        tags,
        (0..=edit).collect::<Vec<_>>(),
        "each tag answered once"
    );
    for (tag, answer) in &answers {
        match answer {
            Err(pcx::ContextError::InvalidKind { .. }) => assert_eq!(tag % 1_000, 7),
            Err(e) => panic!("request {tag}: {e}"),
            Ok(ack) => assert!(ack.seq.is_some(), "request {tag} wrote nothing"),
        }
    }
    let ctx = reopen(ctx, dir.path()).await;
    assert_eq!(content_of(&ctx, "k1").await.as_deref(), Some(&b"v1!"[..]));
    assert_eq!(
        content_of(&ctx, "k2999").await.as_deref(),
        Some(&b"v2999"[..])
    );
    assert_eq!(content_of(&ctx, "k7").await, None);
}

/// Requests sent all at once and then awaited one by one, oldest first (the plainest way to
/// have many in flight), share commits: none waits inside its own future to be delivered.
#[actix::test]
async fn requests_sent_together_and_awaited_in_order_share_commits() {
    let (_dir, ctx) = fresh();
    let n = 5_000;
    let sent: Vec<_> = (0..n)
        .map(|i| {
            ctx.addr().send(RecordArtifact {
                artifact: artifact(&format!("k{i}"), b"v"),
            })
        })
        .collect();
    for s in sent {
        s.await.expect("delivered").expect("recorded");
    }
    let stats = ctx.stats().await.expect("stats").value;
    assert_eq!(stats.events_appended, n);
    assert!(
        stats.flushes <= n / 10,
        "{} commits for {n} requests sent together",
        stats.flushes
    );
}

/// A pipeline whose context closes under it still gets an answer for every request.
#[actix::test]
async fn a_pipeline_is_answered_closed_once_its_context_is_closed() {
    let (_dir, ctx) = fresh();
    let mut p = ctx.pipeline::<()>();
    for i in 0..2_000 {
        p.send(RecordArtifact {
            artifact: artifact(&format!("k{i}"), b"v"),
        });
    }
    ctx.close().await.expect("the context closes");
    for i in 0..10 {
        p.send(RecordArtifact {
            artifact: artifact(&format!("late{i}"), b"v"),
        });
    }
    let mut answers = Vec::new();
    let taken = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while p.answers(&mut answers, 500).await > 0 {}
    })
    .await;
    assert!(
        taken.is_ok(),
        "answers stopped coming: {} of 2,010",
        answers.len()
    );
    assert_eq!(answers.len(), 2_010);
    let late: Vec<_> = answers.iter().filter(|(t, _)| *t >= 2_000).collect();
    assert!(
        late.iter()
            .all(|(_, a)| matches!(a, Err(pcx::ContextError::Closed))),
        "sent after the close: {late:?}"
    );
}

/// A large stitch is done in two halves side by side: the result is the same as one pass
/// would give, in the entries' order, bypasses in either half included.
#[actix::test]
async fn a_large_stitch_keeps_every_entry_in_order_with_its_bypasses() {
    let (_dir, ctx) = fresh();
    let n = 1_500;
    let records =
        (0..n).map(|i| ctx.record_artifact(artifact(&format!("b{i}"), format!("c{i}").as_bytes())));
    for r in futures::future::join_all(records).await {
        r.expect("record_artifact succeeds");
    }
    let entries = 1_100;
    let ids = |i: usize| {
        let first = vec![format!("b{}", 2 * i % n), format!("b{}", (2 * i + 1) % n)];
        // Every 97th entry's second code names a backend never recorded.
        let second = vec![if i % 97 == 0 {
            format!("gone{i}")
        } else {
            format!("b{i}")
        }];
        [first, second]
    };
    let recorded = (0..entries).map(|i| {
        let [a, b] = ids(i);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let b: Vec<&str> = b.iter().map(String::as_str).collect();
        ctx.record_dynamo_cache_entry(format!("e{i}"), entry(&format!("f{i}"), &[&a, &b]))
    });
    for r in futures::future::join_all(recorded).await {
        r.expect("record_dynamo_cache_entry succeeds");
    }
    let out = stitch(&ctx).await;
    let keys: Vec<String> = (0..entries).map(|i| format!("e{i}")).collect();
    assert_eq!(out.entries.keys().cloned().collect::<Vec<_>>(), keys);
    for (i, key) in keys.iter().enumerate() {
        let e = &out.entries[key];
        let [first, second] = ids(i);
        let mut want: Vec<(String, String)> = Vec::new();
        for id in first
            .iter()
            .chain(if i % 97 == 0 { None } else { second.first() })
        {
            if !want.iter().any(|(k, _)| k == id) {
                want.push((id.clone(), format!("c{}", &id[1..])));
            }
        }
        assert_eq!(backends(e), want, "{key}");
        assert_eq!(bypassed(e), vec![false, i % 97 == 0], "{key}");
        assert_eq!(e.dynamo.fn_name.as_deref(), Some(format!("f{i}").as_str()));
    }
    assert_eq!(
        serde_json::to_value(&out.debug_info).unwrap(),
        debug_json(&ctx).await
    );
}

#[actix::test]
async fn stitch_never_clears_and_is_repeatable() {
    let (_dir, ctx) = fresh();
    worked_example(&ctx).await;
    let digest = ctx.state_digest().await.unwrap().value;
    let before = debug_json(&ctx).await;
    let first = stitch(&ctx).await;
    let second = stitch(&ctx).await;
    assert_eq!(first, second);
    assert_eq!(debug_json(&ctx).await, before);
    assert_eq!(
        ctx.state_digest().await.unwrap().value,
        digest,
        "a stitch changes no state"
    );
    assert_eq!(content_of(&ctx, "b1").await.as_deref(), Some(&b"ccc"[..]));
}

#[actix::test]
async fn a_later_stitch_after_the_missing_backend_is_recorded_is_not_bypassed() {
    let (dir, ctx) = fresh();
    worked_example(&ctx).await;
    assert_eq!(
        bypassed(&stitch(&ctx).await.entries["e1"]),
        vec![false, true]
    );
    // The bypass marked only the returned copy: the recorded entry is clean.
    record(&ctx, "b3", b"ddd").await;
    let out = stitch(&ctx).await;
    let e1 = &out.entries["e1"];
    assert_eq!(bypassed(e1), vec![false, false]);
    assert_eq!(reasons(e1), vec![None, None]);
    assert_eq!(
        backends(e1),
        pairs(&[("b1", "ccc"), ("b2", "bbb!"), ("b3", "ddd")])
    );

    // Also after a restart (the stitch event must not have been folded into the entry).
    ctx.take_artifact("b3").await.unwrap();
    assert_eq!(
        bypassed(&stitch(&ctx).await.entries["e1"]),
        vec![false, true]
    );
    let ctx = reopen(ctx, dir.path()).await;
    record(&ctx, "b3", b"ddd").await;
    assert_eq!(
        bypassed(&stitch(&ctx).await.entries["e1"]),
        vec![false, false]
    );
}

#[actix::test]
async fn a_missing_backend_keeps_ids_before_it_skips_ids_after_it_and_leaves_other_codes_alone() {
    let (_dir, ctx) = fresh();
    for k in ["b1", "b2", "b4"] {
        record(&ctx, k, k.as_bytes()).await;
    }
    record_entry(
        &ctx,
        "e",
        entry("f", &[&["b1", "gone", "b2"], &["b4"], &["b4", "b1"]]),
    )
    .await;
    let e = stitch(&ctx).await.entries.shift_remove("e").unwrap();
    assert_eq!(bypassed(&e), vec![true, false, false]);
    assert_eq!(
        reasons(&e),
        vec![
            Some("backend artifact gone missing at save time".to_string()),
            None,
            None
        ]
    );
    // b1 (before the missing id) is in; b2 (after it, referenced nowhere else) is skipped.
    assert_eq!(backends(&e), pairs(&[("b1", "b1"), ("b4", "b4")]));
    // The other fields of the codes are carried over.
    assert!(e.dynamo.codes.iter().all(|c| c.python_module == "model"));
    assert_eq!(e.dynamo.codes[0].backend_ids, vec!["b1", "gone", "b2"]);
}

#[actix::test]
async fn a_bypass_reason_is_at_most_2048_chars() {
    let (_dir, ctx) = fresh();
    let long = "m".repeat(3000);
    record_entry(&ctx, "e", entry("f", &[&[long.as_str()]])).await;
    let e = stitch(&ctx).await.entries.shift_remove("e").unwrap();
    let reason = e.dynamo.codes[0].bypass_reason.clone().unwrap();
    assert_eq!(reason.chars().count(), 2048);
    assert!(reason.starts_with("backend artifact mmm"));
}

/// JSON log lines captured on one thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// The payloads of the structured events named `artifact`, parsed.
    fn payloads(&self, artifact: &str) -> Vec<Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
            })
            .filter(|v| v["fields"]["artifact"] == artifact)
            .map(|v| serde_json::from_str(v["fields"]["payload"].as_str().unwrap()).unwrap())
            .collect()
    }
}

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<Captured>> = const { std::cell::RefCell::new(None) };
}

/// Writes to the capture of the current thread, if it has one.
struct ThreadWriter;

impl std::io::Write for ThreadWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CAPTURE.with(|c| {
            if let Some(logs) = &*c.borrow() {
                logs.0.lock().unwrap().extend_from_slice(buf);
            }
        });
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `body` in an actix system on this thread and captures the JSON log lines it emits.
///
/// One global subscriber (installed once) writes each thread's events to that thread's
/// capture: scoped subscribers (`with_default`) race with other tests over tracing's global
/// callsite cache and would lose events now and then.
fn with_logs<F: std::future::Future<Output = ()>>(body: impl FnOnce() -> F) -> Captured {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::INFO)
            .with_writer(|| ThreadWriter)
            .try_init()
            .expect("the test's global subscriber installs");
    });
    let logs = Captured::default();
    CAPTURE.with(|c| *c.borrow_mut() = Some(logs.clone()));
    // The actor runs on the system's arbiter, which is this thread.
    actix::System::new().block_on(body());
    CAPTURE.with(|c| *c.borrow_mut() = None);
    logs
}

#[test]
fn a_stitch_emits_dynamo_cache_entries_then_one_dynamo_cache_bypass_per_missing_backend() {
    let dir = tempfile::tempdir().unwrap();
    let logs = with_logs(|| async {
        let ctx = open(dir.path());
        worked_example(&ctx).await;
        record_entry(&ctx, "e2", entry("g", &[&["b1"]])).await;
        stitch(&ctx).await;
        ctx.close().await.unwrap();
    });

    let entries = logs.payloads("dynamo_cache_entries");
    assert_eq!(entries.len(), 1, "one dynamo_cache_entries per stitch");
    assert_eq!(entries[0]["num_entries"], json!(2));
    assert_eq!(
        strings(&entries[0]["artifacts"]["backends"]),
        vec!["b1", "b2"]
    );
    assert_eq!(entries[0]["artifacts"]["dynamo"][0]["key"], "e1");
    assert_eq!(entries[0]["artifacts"]["dynamo"][1]["key"], "e2");

    let bypasses = logs.payloads("dynamo_cache_bypass");
    assert_eq!(
        bypasses.len(),
        1,
        "only e1's second code misses a backend: {bypasses:?}"
    );
    let b = &bypasses[0];
    let fields: Vec<&String> = b.as_object().unwrap().keys().collect();
    assert_eq!(fields, vec!["entry", "missing_backend"]);
    assert_eq!(b["missing_backend"], "b3");
    assert_eq!(b["entry"]["num_codes"], "2");
    assert_eq!(b["entry"]["fn_name"], "f");
    assert_eq!(b["entry"]["device_type"], "cpu");
    assert!(
        b["entry"].get("key").is_none(),
        "the entry's own debug_info, without a key: {b}"
    );
}

/// A sled journal that can be told to fail: hide blobs (as if their content were lost) or
/// refuse commits that write the dynamo cache.
struct Faulty {
    inner: SledJournal,
    hidden: Mutex<Vec<Digest>>,
    fail_cache_writes: AtomicBool,
}

impl Journal for Faulty {
    fn blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        if self.hidden.lock().unwrap().contains(digest) {
            return Ok(None);
        }
        self.inner.blob(digest)
    }
    fn commit(&self, commit: &Commit) -> Result<(), StoreError> {
        if !commit.cache_puts.is_empty() && self.fail_cache_writes.load(Ordering::SeqCst) {
            return Err(StoreError::Io {
                op: "writing",
                path: "dynamo_cache".into(),
                source: std::io::Error::other("injected write failure"),
            });
        }
        self.inner.commit(commit)
    }
    fn records(&self, from: u64) -> Records<'_> {
        self.inner.records(from)
    }
    fn snapshot_seqs(&self) -> Result<Vec<u64>, StoreError> {
        self.inner.snapshot_seqs()
    }
    fn snapshot(&self, seq: u64) -> Result<Option<pcx::store::journal::Bytes>, StoreError> {
        self.inner.snapshot(seq)
    }
    fn rewrite_cache_view(&self, entries: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        self.inner.rewrite_cache_view(entries)
    }
    fn reset(&self) -> Result<(), StoreError> {
        self.inner.reset()
    }
    fn anchor(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.anchor()
    }
    fn last_seq(&self) -> Result<Option<u64>, StoreError> {
        self.inner.last_seq()
    }
    fn cache_view(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.cache_view()
    }
}

fn faulty(dir: &Path) -> (Arc<Faulty>, Context) {
    let cfg = config(dir);
    let inner = SledJournal::open(dir, cfg.cache_capacity_bytes).expect("the journal opens");
    let journal = Arc::new(Faulty {
        inner,
        hidden: Mutex::default(),
        fail_cache_writes: AtomicBool::new(false),
    });
    let ctx = Context::with_journal(journal.clone(), pcx::context::settings(&cfg))
        .expect("the context opens");
    (journal, ctx)
}

#[test]
fn a_key_that_fails_to_stitch_is_left_out_with_dynamo_cache_exception_and_the_rest_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut stitched = None;
    let logs = with_logs(|| async {
        let (journal, ctx) = faulty(dir.path());
        record(&ctx, "b1", b"lost content").await;
        record(&ctx, "b2", b"fine").await;
        record_entry(&ctx, "e1", entry("f", &[&["b1"]])).await;
        record_entry(&ctx, "e2", entry("g", &[&["b2"]])).await;
        journal
            .hidden
            .lock()
            .unwrap()
            .push(Digest::of(b"lost content"));
        stitched = Some(stitch(&ctx).await);
        ctx.close().await.unwrap();
    });
    let out = stitched.expect("the stitch answered");
    assert_eq!(
        out.entries.keys().collect::<Vec<_>>(),
        vec!["e2"],
        "e1 is left out, e2 goes on"
    );
    assert_eq!(backends(&out.entries["e2"]), pairs(&[("b2", "fine")]));
    assert_eq!(
        out.debug_info.dynamo.len(),
        2,
        "debug_info still lists every entry"
    );

    let exceptions = logs.payloads("dynamo_cache_exception");
    assert_eq!(exceptions.len(), 1, "{exceptions:?}");
    let fields: Vec<&String> = exceptions[0].as_object().unwrap().keys().collect();
    assert_eq!(fields, vec!["key", "error"]);
    assert_eq!(exceptions[0]["key"], "e1");
    assert!(
        exceptions[0]["error"].as_str().unwrap().contains("b1"),
        "the error says what failed: {}",
        exceptions[0]
    );
}

#[actix::test]
async fn a_failed_cache_write_is_an_error_naming_the_key_and_saves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, ctx) = faulty(dir.path());
    record(&ctx, "b1", b"aaa").await;
    record_entry(&ctx, "e1", entry("f", &[&["b1"]])).await;
    let digest = ctx.state_digest().await.unwrap().value;
    journal.fail_cache_writes.store(true, Ordering::SeqCst);
    let err = ctx.save_to_dynamo_cache().await.unwrap_err();
    assert_eq!(err.kind(), "save_failed", "{err}");
    assert!(
        err.to_string()
            .starts_with("Failed to save package to e1: "),
        "{err}"
    );
    assert_eq!(
        ctx.state_digest().await.unwrap().value,
        digest,
        "nothing of the save remains"
    );
    assert_eq!(
        ctx.load_cache_entry("e1", None).await.unwrap_err().kind(),
        "package_not_found"
    );

    // The context keeps serving, and a later save works.
    journal.fail_cache_writes.store(false, Ordering::SeqCst);
    ctx.save_to_dynamo_cache()
        .await
        .expect("the save works once writes do");
    ctx.clear().await.unwrap();
    let loaded = load(&ctx, "e1").await;
    assert_eq!(backends(&loaded.entry), pairs(&[("b1", "aaa")]));
}

// ---------------------------------------------------------------------------------------------
// save_to_dynamo_cache and load_cache_entry

#[actix::test]
async fn saved_entries_load_after_restart_and_their_backends_are_recorded_again() {
    let (dir, ctx) = fresh();
    record(&ctx, "b1", b"one").await;
    record(&ctx, "b2", b"two").await;
    record(&ctx, "unused", b"zzz").await;
    record_entry(&ctx, "e1", entry("f", &[&["b1"], &["b2", "b1"]])).await;
    record_entry(&ctx, "e2", entry("g", &[&["b2"]])).await;
    let saved = ctx
        .save_to_dynamo_cache()
        .await
        .expect("save succeeds")
        .value;
    assert_eq!(
        serde_json::to_value(&saved).unwrap(),
        debug_json(&ctx).await,
        "save returns debug_info"
    );
    assert_eq!(
        entry_keys(&ctx).await,
        vec!["e1", "e2"],
        "saving does not clear"
    );

    // What was saved is what loads, whatever happens to the context afterwards.
    ctx.edit_artifact("b1", "set", |_| b"edited later".to_vec())
        .await
        .unwrap();
    ctx.clear().await.unwrap();
    let ctx = reopen(ctx, dir.path()).await;
    assert_eq!(debug_json(&ctx).await, json!({}));

    let loaded = load(&ctx, "e1").await;
    assert_eq!(
        backends(&loaded.entry),
        pairs(&[("b1", "one"), ("b2", "two")])
    );
    assert_eq!(loaded.entry.dynamo.fn_name.as_deref(), Some("f"));
    assert_eq!(
        loaded.deserialized.keys().collect::<Vec<_>>(),
        vec!["b1", "b2"]
    );
    for (id, d) in &loaded.deserialized {
        assert_eq!(d.kind, "eager");
        assert_eq!(
            d.content, loaded.entry.backends[id].content,
            "eager's after_deserialization is the identity"
        );
    }
    // The backends are in the context again.
    assert_eq!(backend_keys(&ctx).await, vec!["b1", "b2"]);
    assert_eq!(content_of(&ctx, "b1").await.as_deref(), Some(&b"one"[..]));

    let e2 = load(&ctx, "e2").await;
    assert_eq!(backends(&e2.entry), pairs(&[("b2", "two")]));
    assert_eq!(load_counters(&ctx).await, (2, 0, 0));

    // The re-recorded backends survive another restart.
    let ctx = reopen(ctx, dir.path()).await;
    assert_eq!(backend_keys(&ctx).await, vec!["b1", "b2"]);
}

#[actix::test]
async fn loading_an_unknown_key_is_a_miss() {
    let (_dir, ctx) = fresh();
    record(&ctx, "b1", b"aaa").await;
    let digest = ctx.state_digest().await.unwrap().value;
    let err = ctx.load_cache_entry("nope", None).await.unwrap_err();
    assert_eq!(err.to_string(), "No package found with key nope");
    assert_eq!(err.kind(), "package_not_found");
    assert_eq!(load_counters(&ctx).await, (0, 1, 0));
    assert_eq!(ctx.state_digest().await.unwrap().value, digest);
}

#[actix::test]
async fn a_system_info_mismatch_is_an_error_in_pytorchs_words() {
    let (_dir, ctx) = fresh();
    record(&ctx, "b1", b"aaa").await;
    let mut e = entry("f", &[&["b1"]]);
    e.system_info = system("2.10.0");
    record_entry(&ctx, "e1", e).await;
    ctx.save_to_dynamo_cache().await.unwrap();
    ctx.clear().await.unwrap();

    let err = ctx
        .load_cache_entry("e1", Some(system("2.9.1")))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Compile package was created with a different PyTorch version: 2.10.0"
    );
    assert_eq!(load_counters(&ctx).await, (0, 0, 1));
    assert_eq!(
        debug_json(&ctx).await,
        json!({}),
        "a failed load records nothing"
    );

    ctx.load_cache_entry("e1", Some(system("2.10.0")))
        .await
        .expect("the same system loads");
    assert_eq!(load_counters(&ctx).await, (1, 0, 1));
}

/// A kind no plugin serves is refused at record (its content could never be loaded), naming
/// the kind; nothing is written. (A kind whose plugin is gone by load time fails there:
/// tests/plugins.rs, `aot_bundle_record_edit_stitch_save_restart_load_and_without_plugins`.)
#[actix::test]
async fn recording_a_kind_without_a_plugin_is_refused_naming_the_kind() {
    let (_dir, ctx) = fresh();
    let err = ctx
        .record_artifact(Artifact {
            key: "b1".into(),
            kind: "example.aot_bundle".into(),
            content: b"graph".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "no_plugin", "{err}");
    assert!(err.to_string().contains("example.aot_bundle"), "{err}");
    assert_eq!(
        debug_json(&ctx).await,
        json!({}),
        "a refused record records nothing"
    );
}

// ---------------------------------------------------------------------------------------------
// seq

#[actix::test]
async fn every_write_answer_carries_a_seq_that_grows_by_one_per_event() {
    let (dir, ctx) = fresh();
    let s1 = record(&ctx, "b1", b"aaa").await;
    let s2 = record(&ctx, "b2", b"bbb").await;
    assert_eq!(s2, s1 + 1);

    // Reads and failures write nothing and carry no seq.
    assert_eq!(ctx.serialize_artifact_by_key("b1").await.unwrap().seq, None);
    assert_eq!(ctx.dump_debug_info().await.unwrap().seq, None);
    ctx.edit_artifact("nope", "set", |c| c).await.unwrap_err();
    ctx.load_cache_entry("nope", None).await.unwrap_err();
    ctx.record_dynamo_cache_entry("bad", entry("f", &[]))
        .await
        .unwrap_err();

    let s3 = ctx
        .edit_artifact("b2", "set", |_| b"x".to_vec())
        .await
        .unwrap()
        .seq
        .unwrap();
    assert_eq!(s3, s2 + 1, "reads and failures did not use a seq");
    let s4 = record_entry(&ctx, "e1", entry("f", &[&["b1", "b2"]])).await;
    assert_eq!(s4, s3 + 1);
    let s5 = ctx
        .create_cache_entries()
        .await
        .unwrap()
        .seq
        .expect("a stitch is logged");
    assert_eq!(s5, s4 + 1);
    let s6 = ctx
        .save_to_dynamo_cache()
        .await
        .unwrap()
        .seq
        .expect("a save is logged");
    assert!(s6 > s5, "{s6} > {s5}");
    let s7 = ctx
        .load_cache_entry("e1", None)
        .await
        .unwrap()
        .seq
        .expect("a load hit records backends");
    assert_eq!(s7, s6 + 1);
    let s8 = ctx
        .take_artifact("b1")
        .await
        .unwrap()
        .seq
        .expect("a take that removed something is a write");
    assert_eq!(s8, s7 + 1);
    let s9 = ctx.clear().await.unwrap().seq.unwrap();
    assert_eq!(s9, s8 + 1);

    let ctx = reopen(ctx, dir.path()).await;
    assert_eq!(
        record(&ctx, "b3", b"c").await,
        s9 + 1,
        "the seq goes on after a restart"
    );
}

// ---------------------------------------------------------------------------------------------
// the library API's own promise

#[test]
fn close_releases_the_data_directory_so_it_can_be_reopened_at_once() {
    // `Context::close`: "releases the data directory (so it can be opened again, by this
    // process or another)". Many contexts closing and reopening at once, as in a busy
    // orchestrator (or a parallel test suite), must each be able to reopen at once.
    const THREADS: usize = 16;
    const ROUNDS: usize = 120;
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            std::thread::spawn(|| {
                actix::System::new().block_on(async {
                    let dir = tempfile::tempdir().unwrap();
                    let cfg = config(dir.path());
                    let mut ctx = open_config(&cfg);
                    let mut refused = Vec::new();
                    for round in 0..ROUNDS {
                        record(&ctx, &format!("k{round}"), b"content").await;
                        ctx.close().await.expect("the context closes");
                        ctx = match Context::open(&cfg) {
                            Ok(ctx) => ctx,
                            Err(e) => {
                                refused.push(e.to_string());
                                open_config(&cfg)
                            }
                        };
                    }
                    assert_eq!(backend_keys(&ctx).await.len(), ROUNDS);
                    ctx.close().await.unwrap();
                    refused
                })
            })
        })
        .collect();
    let refused: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("a worker finished"))
        .collect();
    assert!(
        refused.is_empty(),
        "{} of {} opens right after close() were refused, e.g.: {}",
        refused.len(),
        THREADS * ROUNDS,
        refused[0]
    );
}
