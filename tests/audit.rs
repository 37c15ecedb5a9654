//! Auditing (issue 4): `log`, `history`, `state --at`, `diff`, `verify`, `export` / `import`,
//! `compact`, the same queries in the batch protocol, and what every command says on an empty
//! or a missing data directory.
//!
//! The library (`pcx::Context`, `pcx::audit`) and the real binary are both used. Every child
//! process is waited for with a timeout. Damage is made by opening the sled database of a
//! closed data directory directly (records in the pages of tree `pages`, `snapshots` keyed by
//! big-endian sequence numbers, small contents in the packs of tree `packs`).
//!
//! With `PCX_TEST_SUITE_JOURNAL=postgres` (and `PCX_TEST_PG_URL`, `--features postgres`) the
//! whole suite runs on the fleet's backend instead: every context and every `pcx` process of a
//! test uses the PostgreSQL journal standing for its data directory (`common::library`), and
//! damage is made with SQL on that journal's tables (`common::pg_damage`). The few promises
//! about sled's own files (directory sizes, content files) are said skipped there.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use pcx::actor::Answer;
use pcx::audit::query::{state_at, AuditError};
use pcx::core::model::Digest;
use pcx::store::record::{
    decode_event, decode_snapshot, encode_event, encode_snapshot_of, Envelope,
};
use pcx::Context;
use serde_json::{json, Value};
use tempfile::TempDir;

mod common;
use common::library::*;
use common::protocol::{
    append, b64, batch, cli, cli_error, cli_lines, cli_ok, cli_value, entry_with_codes, op,
    record_entry, set, take, unb64,
};
use common::*;

// ---------------------------------------------------------------------------------------------
// requests and answers

/// `record_artifact` without a `kind` (so of the default kind, `eager`).
fn record(key: &str, content: &str) -> Value {
    json!({"op":"record_artifact","key":key,"content_b64":b64(content)})
}

/// Runs `pcx batch`; every answer must be ok. Gives the answers.
fn batch_ok(dir: &Path, requests: &[Value]) -> Vec<Value> {
    let answers = batch(dir, requests);
    for (req, answer) in requests.iter().zip(&answers) {
        assert_eq!(answer["ok"], json!(true), "{req} answered {answer}");
    }
    answers
}

fn hex(content: &[u8]) -> String {
    Digest::of(content).to_hex()
}

fn seqs(lines: &[Value]) -> Vec<u64> {
    lines
        .iter()
        .map(|l| {
            l["seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("line without seq: {l}"))
        })
        .collect()
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| match s {
            Value::String(s) => s.clone(),
            other => other["key"]
                .as_str()
                .unwrap_or_else(|| panic!("neither a key nor an object with one: {other}"))
                .to_string(),
        })
        .collect()
}

fn set_of(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The sum of the sizes of every file under `dir`.
fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).expect("list the data directory") {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            dir_size(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

/// Siblings a compaction would leave behind (`DIR.compacting`, `DIR.pre-compaction`).
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    [".compacting", ".pre-compaction"]
        .iter()
        .map(|suffix| {
            let mut name = dir.file_name().unwrap().to_os_string();
            name.push(suffix);
            dir.with_file_name(name)
        })
        .filter(|p| p.exists())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// the library

/// The seq an answer wrote; an error of an allowed kind writes nothing, any other fails.
fn written<T>(answer: Answer<T>, allowed: &[&str], what: &str) -> Option<u64> {
    match answer {
        Ok(ack) => ack.seq,
        Err(e) if allowed.contains(&e.kind()) => None,
        Err(e) => panic!("{what}: unexpected error {}: {e}", e.kind()),
    }
}

fn must_write<T>(answer: Answer<T>, what: &str) -> u64 {
    written(answer, &[], what).unwrap_or_else(|| panic!("{what} wrote no event"))
}

// ---------------------------------------------------------------------------------------------
// 1. model: `state --at S` for every S is the live state right after S

const MODEL_KEYS: [&str; 4] = ["b0", "b1", "b2", "b3"];
const MODEL_ENTRIES: [&str; 2] = ["e0", "e1"];
const MODEL_CASES: usize = 12;
const MODEL_MAX_OPS: usize = 30;

#[derive(Clone, Debug)]
enum ModelOp {
    Record {
        key: usize,
        content: Vec<u8>,
    },
    Entry {
        key: usize,
        codes: Vec<Vec<usize>>,
    },
    Edit {
        key: usize,
        append: bool,
        bytes: Vec<u8>,
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
}

/// xorshift64*: a small deterministic generator, so a failing seed can be rerun.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, max_len: usize) -> Vec<u8> {
        let len = self.below(max_len + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn model_ops(seed: u64) -> Vec<ModelOp> {
    let mut rng = Rng::new(seed);
    let n = 10 + rng.below(MODEL_MAX_OPS - 10 + 1);
    (0..n)
        .map(|_| match rng.below(20) {
            0..=5 => ModelOp::Record {
                key: rng.below(MODEL_KEYS.len()),
                content: rng.bytes(5),
            },
            6..=8 => {
                // Zero codes now and then: refused, and nothing is written.
                let codes = (0..rng.below(4))
                    .map(|_| {
                        (0..rng.below(3))
                            .map(|_| rng.below(MODEL_KEYS.len()))
                            .collect()
                    })
                    .collect();
                ModelOp::Entry {
                    key: rng.below(MODEL_ENTRIES.len()),
                    codes,
                }
            }
            9..=11 => ModelOp::Edit {
                key: rng.below(MODEL_KEYS.len()),
                append: rng.below(2) == 0,
                bytes: rng.bytes(4),
            },
            12..=13 => ModelOp::Take {
                key: rng.below(MODEL_KEYS.len()),
            },
            14 => ModelOp::Clear,
            15..=16 => ModelOp::Stitch,
            17..=18 => ModelOp::Save,
            _ => ModelOp::Load {
                key: rng.below(MODEL_ENTRIES.len()),
            },
        })
        .collect()
}

/// The live context's state as its callers see it.
#[derive(Clone, Debug)]
struct Live {
    digest: String,
    debug_info: Value,
    /// Every artifact's content, in the context's order.
    contents: Vec<(String, Vec<u8>)>,
}

async fn live(ctx: &Context) -> Live {
    let info = ctx.dump_debug_info().await.expect("dump_debug_info").value;
    let digest = ctx
        .state_digest()
        .await
        .expect("state_digest")
        .value
        .to_hex();
    let mut contents = Vec::new();
    for key in &info.backends {
        let a = ctx
            .serialize_artifact_by_key(key.clone())
            .await
            .expect("serialize_artifact_by_key")
            .value
            .unwrap_or_else(|| panic!("{key} is listed but cannot be read"));
        contents.push((key.clone(), a.content));
    }
    Live {
        digest,
        debug_info: serde_json::to_value(&info).unwrap(),
        contents,
    }
}

/// Runs one operation; gives the seq of the last event it wrote, if any.
async fn apply(ctx: &Context, op: &ModelOp) -> Option<u64> {
    let what = format!("{op:?}");
    match op {
        ModelOp::Record { key, content } => written(
            ctx.record_artifact(artifact(MODEL_KEYS[*key], content))
                .await,
            &[],
            &what,
        ),
        ModelOp::Entry { key, codes } => {
            let codes: Vec<Vec<String>> = codes
                .iter()
                .map(|c| c.iter().map(|i| MODEL_KEYS[*i].to_string()).collect())
                .collect();
            written(
                ctx.record_dynamo_cache_entry(MODEL_ENTRIES[*key], entry(&codes))
                    .await,
                &["invalid_entry"],
                &what,
            )
        }
        ModelOp::Edit { key, append, bytes } => {
            let (append, bytes) = (*append, bytes.clone());
            let label = if append { "append" } else { "set" };
            written(
                ctx.edit_artifact(MODEL_KEYS[*key], label, move |mut c| {
                    if append {
                        c.extend_from_slice(&bytes);
                        c
                    } else {
                        bytes
                    }
                })
                .await,
                &["key_not_found"],
                &what,
            )
        }
        ModelOp::Take { key } => written(ctx.take_artifact(MODEL_KEYS[*key]).await, &[], &what),
        ModelOp::Clear => written(ctx.clear().await, &[], &what),
        ModelOp::Stitch => written(ctx.create_cache_entries().await, &[], &what),
        ModelOp::Save => written(ctx.save_to_dynamo_cache().await, &[], &what),
        ModelOp::Load { key } => written(
            ctx.load_cache_entry(MODEL_ENTRIES[*key], None).await,
            &["package_not_found"],
            &what,
        ),
    }
}

/// Prints the failing case when a model case panics.
struct CaseGuard {
    seed: u64,
    ops: Vec<ModelOp>,
}

impl Drop for CaseGuard {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "model case with seed {} failed; its operations: {:#?}",
                self.seed, self.ops
            );
        }
    }
}

fn model_case(seed: u64) {
    let ops = model_ops(seed);
    let _guard = CaseGuard {
        seed,
        ops: ops.clone(),
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let cfg = config(&dir, 3);

    // Run the operations, recording the live state right after every write.
    let expected: BTreeMap<u64, Live> = block_on(async {
        let ctx = open(&cfg);
        let mut expected = BTreeMap::new();
        let mut current = live(&ctx).await;
        expected.insert(0, current.clone());
        let mut last = 0u64;
        for op in &ops {
            let Some(seq) = apply(&ctx, op).await else {
                continue;
            };
            let before = std::mem::replace(&mut current, live(&ctx).await);
            if let ModelOp::Save = op {
                // A save is a stitch (which changes nothing) then the save.
                assert_eq!(seq, last + 2, "seed {seed}: a save writes two events");
                expected.insert(seq - 1, before);
            } else {
                assert_eq!(seq, last + 1, "seed {seed}: {op:?} writes one event");
            }
            expected.insert(seq, current.clone());
            last = seq;
        }
        ctx.close().await.expect("close");
        expected
    });
    let last = *expected.keys().last().unwrap();
    assert_eq!(
        expected.keys().copied().collect::<Vec<_>>(),
        (0..=last).collect::<Vec<_>>(),
        "seed {seed}: every sequence number has a recorded live state"
    );

    // The library: `state_at` on a journal opened after the context closed.
    {
        let journal = open_suite_reader(&dir);
        for (s, want) in &expected {
            let (state, head) = state_at(&*journal, *s, &mut |_| {})
                .unwrap_or_else(|e| panic!("seed {seed}: state_at({s}): {e}"));
            assert_eq!(head.seq, *s, "seed {seed}: state_at({s}) head");
            assert_eq!(
                state.digest().to_hex(),
                want.digest,
                "seed {seed}: state_at({s}) digest"
            );
            assert_eq!(
                serde_json::to_value(state.debug_info()).unwrap(),
                want.debug_info,
                "seed {seed}: state_at({s}) debug_info"
            );
            let got: Vec<(String, Digest, u64)> = state
                .artifacts
                .iter()
                .map(|(k, r)| (k.clone(), r.digest, r.size))
                .collect();
            let wanted: Vec<(String, Digest, u64)> = want
                .contents
                .iter()
                .map(|(k, c)| (k.clone(), Digest::of(c), c.len() as u64))
                .collect();
            assert_eq!(got, wanted, "seed {seed}: state_at({s}) artifacts");
        }
        assert!(
            matches!(
                state_at(&*journal, last + 1, &mut |_| {}),
                Err(AuditError::BeyondEnd { .. })
            ),
            "seed {seed}: state_at past the end is beyond_end"
        );
    }

    // The CLI: `state --at S` and `state --at S --key K`.
    for (s, want) in &expected {
        let at = s.to_string();
        let v = cli_value(&dir, &["state", "--at", &at]);
        assert_eq!(v["seq"], json!(s), "seed {seed}: state --at {s}: {v}");
        assert_eq!(
            v["state_digest"],
            json!(want.digest),
            "seed {seed}: state --at {s} digest"
        );
        assert_eq!(
            v["debug_info"], want.debug_info,
            "seed {seed}: state --at {s} debug_info"
        );
        let arts: Vec<Value> = want
            .contents
            .iter()
            .map(|(k, c)| json!({"key": k, "kind": "eager", "digest": hex(c), "size": c.len()}))
            .collect();
        assert_eq!(
            v["artifacts"],
            json!(arts),
            "seed {seed}: state --at {s} artifacts"
        );
        // One key per point (rotating over every key, so absent keys are asked for too).
        let key = MODEL_KEYS[(*s as usize) % MODEL_KEYS.len()];
        let a = cli_value(&dir, &["state", "--at", &at, "--key", key]);
        assert_eq!(a["seq"], json!(s), "seed {seed}: {a}");
        match want.contents.iter().find(|(k, _)| k == key) {
            Some((_, content)) => {
                assert_eq!(a["artifact"]["key"], json!(key), "seed {seed}: {a}");
                assert_eq!(
                    a["artifact"]["content_b64"],
                    json!(b64(content)),
                    "seed {seed}: state --at {s} --key {key}"
                );
                assert_eq!(a["artifact"]["size"], json!(content.len()));
                assert_eq!(a["artifact"]["digest"], json!(hex(content)));
            }
            None => assert!(
                a["artifact"].is_null(),
                "seed {seed}: {key} did not exist at {s}: {a}"
            ),
        }
    }
    let beyond = (last + 1).to_string();
    cli_error(&dir, &["state", "--at", &beyond], "beyond_end");
}

#[test]
fn state_at_every_point_equals_the_live_state_then() {
    let next = AtomicUsize::new(0);
    thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= MODEL_CASES {
                    break;
                }
                model_case(0xA0D1_7000 + i as u64);
            });
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 2. verify: a sound log passes; each kind of damage is found and located

/// Writes the damage tests' log through the library, 12 events, snapshots every 4 events or
/// as many as the state has items (at 4 and 9), and one at 12 from the clean close (the two
/// newest, 9 and 12, are kept). Gives the live state digest.
///
/// ```text
///  1 record a alpha    5 record d delta     9 clear
///  2 record b bravo    6 take b            10 record g golf
///  3 record c charlie  7 record e echo     11 record h hotel
///  4 edit a +"!"       8 record f foxtrot  12 edit g := golf2
/// ```
fn write_damage_log(dir: &Path) -> String {
    block_on(async {
        let ctx = open(&config(dir, 4));
        let rec = |k: &'static str, c: &'static str| ctx.record_artifact(artifact(k, c.as_bytes()));
        assert_eq!(must_write(rec("a", "alpha").await, "1"), 1);
        must_write(rec("b", "bravo").await, "2");
        must_write(rec("c", "charlie").await, "3");
        let seq = must_write(
            ctx.edit_artifact("a", "append", |mut c| {
                c.push(b'!');
                c
            })
            .await,
            "4",
        );
        assert_eq!(seq, 4);
        must_write(rec("d", "delta").await, "5");
        must_write(ctx.take_artifact("b").await, "6");
        must_write(rec("e", "echo").await, "7");
        must_write(rec("f", "foxtrot").await, "8");
        must_write(ctx.clear().await, "9");
        must_write(rec("g", "golf").await, "10");
        must_write(rec("h", "hotel").await, "11");
        let seq = must_write(
            ctx.edit_artifact("g", "set", |_| b"golf2".to_vec()).await,
            "12",
        );
        assert_eq!(seq, 12);
        let digest = ctx.state_digest().await.unwrap().value.to_hex();
        ctx.close().await.expect("close");
        digest
    })
}

// Damage, made on whichever backend the suite runs: in the sled database of a closed data
// directory, or with SQL on the tables of the PostgreSQL journal standing for it
// (`common::pg_damage`).

/// Changes the log's records, by sequence number.
fn damage_log_records(dir: &Path, change: impl FnOnce(&mut BTreeMap<u64, Vec<u8>>)) {
    if suite_on_postgres() {
        pg_damage::records(dir, change)
    } else {
        damage_records(dir, TIMEOUT, change)
    }
}

/// Changes the log's snapshots, by the sequence number they are stored under.
fn damage_log_snapshots(dir: &Path, change: impl FnOnce(&mut BTreeMap<u64, Vec<u8>>)) {
    if suite_on_postgres() {
        pg_damage::snapshots(dir, change)
    } else {
        damage_snapshots(dir, TIMEOUT, change)
    }
}

/// Changes the log's contents, by digest.
fn damage_log_contents(dir: &Path, change: impl FnOnce(&mut BTreeMap<Digest, Vec<u8>>)) {
    if suite_on_postgres() {
        pg_damage::contents(dir, change)
    } else {
        damage_contents(dir, TIMEOUT, change)
    }
}

/// True (after saying why) when the suite runs on PostgreSQL and the promise tested is about
/// sled's files only: the caller skips it.
fn sled_only(why: &str) -> bool {
    if suite_on_postgres() {
        println!("skipped on postgres: {why}");
        return true;
    }
    false
}

/// Checks that `pcx verify` fails (non-zero exit) naming `seq` and saying what is wrong
/// (every one of `words`); gives its report.
fn assert_verify_finds(dir: &Path, seq: u64, words: &[&str]) -> Value {
    let run = cli(dir, &["verify"]);
    assert!(
        !run.status.success(),
        "verify passed a damaged log: {}",
        run.stdout
    );
    let report = run.answer();
    assert_eq!(report["ok"], json!(false), "{report}");
    assert_eq!(report["seq"], json!(seq), "the first bad seq: {report}");
    let error = report["error"].as_str().unwrap_or_default();
    for w in words {
        assert!(error.contains(w), "`{w}` not in the report: {report}");
    }
    report
}

/// Writes the damage tests' log, damages it with `change`, and checks that `pcx verify`
/// fails (non-zero exit) naming `seq` and saying what is wrong (`words`), and that the batch
/// protocol's `verify` gives the same report.
fn assert_damage_found(change: impl FnOnce(&Path), seq: u64, words: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    write_damage_log(&dir);
    change(&dir);
    let report = assert_verify_finds(&dir, seq, words);
    let answers = batch(&dir, &[op("verify")]);
    assert_eq!(answers[0]["ok"], json!(true), "{}", answers[0]);
    assert_eq!(
        answers[0]["verify"], report,
        "batch verify and pcx verify agree"
    );
}

#[test]
fn verify_passes_a_sound_log_with_a_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let digest = write_damage_log(&dir);
    let v = cli_value(&dir, &["verify"]);
    assert_eq!(v["ok"], json!(true), "{v}");
    assert_eq!(v["events"], json!(12), "{v}");
    assert_eq!(v["first_seq"], json!(1), "{v}");
    assert_eq!(v["last_seq"], json!(12), "{v}");
    assert_eq!(v["anchored_at"], Value::Null, "{v}");
    assert_eq!(v["snapshots_checked"], json!(2), "{v}");
    // alpha bravo charlie alpha! delta echo foxtrot golf hotel golf2
    assert_eq!(v["blobs_checked"], json!(10), "{v}");
    assert_eq!(v["state_digest"], json!(digest), "{v}");
    assert_eq!(
        cli_value(&dir, &["state"])["state_digest"],
        json!(digest),
        "state agrees with verify"
    );
}

#[test]
fn verify_finds_a_record_with_an_altered_byte() {
    assert_damage_found(
        |dir| damage_log_records(dir, |r| flip_middle_byte(r.get_mut(&5).unwrap())),
        5,
        &["event 5", "damaged"],
    );
}

#[test]
fn verify_finds_a_deleted_blob_and_names_the_event_that_refers_to_it() {
    let echo = Digest::of(b"echo");
    assert_damage_found(
        |dir| {
            damage_log_contents(dir, |c| {
                assert!(c.remove(&echo).is_some(), "the echo blob exists")
            })
        },
        7,
        &[&echo.to_hex(), "missing"],
    );
}

#[test]
fn verify_finds_a_blob_whose_content_was_altered() {
    let delta = Digest::of(b"delta");
    assert_damage_found(
        |dir| {
            damage_log_contents(dir, |c| {
                c.insert(delta, b"DELTA".to_vec());
            })
        },
        5,
        &[&delta.to_hex(), "digest"],
    );
}

/// Contents are stored once by digest: a record of one already stored, whose stored copy was
/// damaged, used to be answered without writing it, and every read of it failed though the
/// caller had sent the bytes. It is written again, and the older record that refers to it
/// reads back and verifies too.
#[test]
fn a_content_recorded_again_over_a_damaged_copy_is_written_again_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    write_damage_log(&dir);
    let (golf2, hotel) = (Digest::of(b"golf2"), Digest::of(b"hotel"));
    damage_log_contents(&dir, |c| {
        c.insert(hotel, b"hot".to_vec());
        c.insert(golf2, b"GOLF2".to_vec());
    });
    assert_verify_finds(&dir, 11, &[&hotel.to_hex()]);
    block_on(async {
        let ctx = open(&config(&dir, 4));
        for key in ["g", "h"] {
            let err = ctx
                .serialize_artifact_by_key(key)
                .await
                .expect_err("damaged bytes are never served");
            assert_eq!(err.kind(), "content_unavailable", "{key}: {err}");
        }
        // 13 is written alone; 16 with a snapshot (4 events after the close's, with 4 keys),
        // which on PostgreSQL is a transaction of several statements rather than one.
        for seq in ["13", "14", "15"] {
            must_write(ctx.record_artifact(artifact("h2", b"hotel")).await, seq);
        }
        must_write(ctx.record_artifact(artifact("g2", b"golf2")).await, "16");
        for (key, want) in [
            ("h", "hotel"),
            ("h2", "hotel"),
            ("g", "golf2"),
            ("g2", "golf2"),
        ] {
            let got = ctx
                .serialize_artifact_by_key(key)
                .await
                .unwrap_or_else(|e| panic!("{key}: {e}"))
                .value
                .map(|a| a.content);
            assert_eq!(got.as_deref(), Some(want.as_bytes()), "{key}");
        }
        ctx.close().await.expect("close");
    });
    let v = cli_value(&dir, &["verify"]);
    assert_eq!(v["ok"], json!(true), "{v}");
}

/// Product bug: `pcx export --output DIR/db` truncated sled's data file before reading a byte
/// of it, and the whole log was gone ("sled's data file is damaged at byte 765" from then on);
/// `pcx salvage --output` there would finish off the directory it salvages. A path inside the
/// data directory (a link into it too), or its lock file beside it, is refused before anything
/// is opened, and nothing is left there.
#[test]
fn an_export_or_salvage_written_into_the_data_directory_is_refused_and_the_log_is_untouched() {
    if sled_only("the data directory is not the log on PostgreSQL") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    write_damage_log(&dir);
    let before = cli_value(&dir, &["verify"]);
    let entries = |d: &Path| {
        let mut names: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let files_before = entries(&dir);
    let link = tmp.path().join("link-to-db");
    std::os::unix::fs::symlink(dir.join("db"), &link).unwrap();
    for (command, output) in [
        ("export", dir.join("db")),
        ("export", dir.join("new.jsonl")),
        ("export", link.clone()),
        ("export", tmp.path().join("data.lock")),
        ("salvage", dir.join("db")),
    ] {
        let run = cli(&dir, &[command, "--output", output.to_str().unwrap()]);
        let what = format!("{command} --output {}", output.display());
        assert!(!run.status.success(), "{what} succeeded");
        assert!(
            run.stderr.contains("inside the data directory"),
            "{what}: {}",
            run.stderr
        );
    }
    assert_eq!(
        entries(&dir),
        files_before,
        "nothing was added to the data directory"
    );
    assert_eq!(cli_value(&dir, &["verify"]), before, "the log is as it was");
}

/// An export written to a pipe (or a device: `--output /dev/null`) goes into it, and one written
/// through a link replaces the file the link names, the link kept. Before, the output was
/// renamed onto the path whatever it was: as root, `--output /dev/null` replaced the machine's
/// /dev/null with a regular file, and `--output /dev/stdout` with stdout sent to a file
/// replaced the link in /dev.
#[test]
fn an_export_to_a_pipe_or_through_a_link_writes_into_it_and_replaces_neither() {
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;
    if sled_only("one layout of export is enough") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    write_damage_log(&dir);
    let fifo = tmp.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    // A writer held here, so the reader's open returns at once and its read ends only once
    // this one and pcx have both let go (and does, whatever pcx did to the path).
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let mut reader = std::fs::File::open(&fifo).unwrap();
    let read = thread::spawn(move || {
        let mut text = String::new();
        reader.read_to_string(&mut text).map(|_| text)
    });
    let run = cli(&dir, &["export", "--output", fifo.to_str().unwrap()]);
    drop(held);
    let text = read.join().unwrap().unwrap();
    run.assert_success();
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo(),
        "the pipe was replaced"
    );
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().unwrap_or("null")).unwrap();
    assert_eq!(
        (last["end"].clone(), last["events"].clone()),
        (json!(true), json!(12)),
        "{text:.200}"
    );

    let target = tmp.path().join("target.jsonl");
    std::fs::write(&target, "before").unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink("target.jsonl", &link).unwrap();
    cli(&dir, &["export", "--output", link.to_str().unwrap()]).assert_success();
    assert!(
        std::fs::symlink_metadata(&link).unwrap().is_symlink(),
        "the link was replaced"
    );
    let written = std::fs::read_to_string(&target).unwrap();
    assert_eq!(written.lines().last(), text.lines().last());
}

/// An export is written beside its `--output` file and renamed onto it once complete: one
/// that fails halfway (here on a damaged content) leaves the file it would have replaced
/// as it was, and no partial file.
#[test]
fn a_failed_export_leaves_the_file_it_would_have_replaced_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    write_damage_log(&dir);
    let file = tmp.path().join("history.jsonl");
    export(&dir, &file, "inline");
    let good = std::fs::read(&file).unwrap();
    let echo = Digest::of(b"echo");
    damage_log_contents(&dir, |c| {
        c.insert(echo, b"ECHO".to_vec());
    });
    let run = cli(&dir, &["export", "--output", file.to_str().unwrap()]);
    assert!(
        !run.status.success(),
        "an export missing a content failed: {}",
        run.stdout
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        good,
        "the earlier export is intact"
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(left.is_empty(), "partial files left: {left:?}");
}

/// Product bug: a compaction replaces the data directory whole, and deleted whatever else was
/// in it: a data directory that also held a user's files (`data_dir` pointed at a project or
/// home directory, a server's log written beside its `db`) lost them without a word. The
/// compaction is now refused naming them, before any work, and deletes nothing; once they are
/// moved out it goes through.
#[test]
fn a_compaction_of_a_data_directory_holding_other_files_is_refused_and_deletes_nothing() {
    if sled_only("the data directory is not the log on PostgreSQL") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    write_damage_log(&dir);
    let notes = dir.join("notes.txt");
    std::fs::write(&notes, "not pcx's").unwrap();
    let run = cli(&dir, &["compact", "--before", "5"]);
    assert!(!run.status.success(), "compaction went on: {}", run.stdout);
    let said = format!("{}{}", run.stdout, run.stderr);
    assert!(
        said.contains("notes.txt") && said.contains("did not write"),
        "{said}"
    );
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "not pcx's");
    let v = cli_value(&dir, &["verify"]);
    assert_eq!(
        (v["ok"].clone(), v["events"].clone()),
        (json!(true), json!(12)),
        "{v}"
    );
    std::fs::remove_file(&notes).unwrap();
    let done = cli_value(&dir, &["compact", "--before", "5"]);
    assert_eq!(done["ok"], json!(true), "{done}");
}

/// A data directory reached through a symbolic link (`pcx-data -> /disk/pcx`, to put the log
/// on a larger disk) is compacted and imported where it lives. Before, the swap renamed the new
/// copy onto the link: the link was gone, the log moved to the link's disk, and the whole old
/// log stayed behind at the link's target for whoever opened it there.
#[test]
fn a_compaction_or_import_through_a_symlinked_data_directory_swaps_the_directory_and_keeps_the_link(
) {
    if sled_only("the data directory is not the log on PostgreSQL") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let real = disk.join("pcx");
    write_damage_log(&real);
    let link = tmp.path().join("data");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    cli_ok(&link, &["compact", "--before", "5"]);
    assert!(
        std::fs::symlink_metadata(&link).unwrap().is_symlink(),
        "the link was replaced by a directory"
    );
    for dir in [&real, &link] {
        let v = cli_value(dir, &["verify"]);
        assert_eq!(
            (
                v["ok"].clone(),
                v["anchored_at"].clone(),
                v["events"].clone()
            ),
            (json!(true), json!(4), json!(8)),
            "{}: {v}",
            dir.display()
        );
    }
    let names = |d: &Path| {
        let mut n: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&disk), ["pcx"], "left beside the log");
    assert_eq!(names(tmp.path()), ["data", "disk"], "left beside the link");

    // An import through a link (relative, this time) to an empty directory fills that one.
    let export = tmp.path().join("export.jsonl");
    cli(&link, &["export", "--output", export.to_str().unwrap()]).assert_success();
    let empty = disk.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let link2 = tmp.path().join("data2");
    std::os::unix::fs::symlink("disk/empty", &link2).unwrap();
    cli_ok(&link2, &["import", "--input", export.to_str().unwrap()]);
    assert!(std::fs::symlink_metadata(&link2).unwrap().is_symlink());
    let v = cli_value(&empty, &["verify"]);
    assert_eq!(
        (v["ok"].clone(), v["events"].clone()),
        (json!(true), json!(8)),
        "{v}"
    );
}

/// A data directory pcx creates is readable by its user alone, as the server's socket is, and
/// a compaction keeps the mode the operator gave it. Before, it was made 0755: every user of
/// the machine could read the artifacts and model sources the 0600 socket kept from them.
#[test]
fn a_data_directory_pcx_creates_is_its_users_alone_and_a_compaction_keeps_the_mode_it_was_given() {
    use std::os::unix::fs::PermissionsExt;
    if sled_only("the data directory is not the log on PostgreSQL") {
        return;
    }
    let mode = |d: &Path| std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    write_damage_log(&dir);
    assert_eq!(mode(&dir), 0o700, "{:o}", mode(&dir));
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    cli_ok(&dir, &["compact", "--before", "5"]);
    assert_eq!(mode(&dir), 0o750, "the compaction changed the mode");
    let export = tmp.path().join("export.jsonl");
    cli(&dir, &["export", "--output", export.to_str().unwrap()]).assert_success();
    let imported = tmp.path().join("imported");
    cli_ok(&imported, &["import", "--input", export.to_str().unwrap()]);
    assert_eq!(mode(&imported), 0o700, "{:o}", mode(&imported));
}

#[test]
fn verify_finds_two_reordered_records() {
    assert_damage_found(
        |dir| {
            damage_log_records(dir, |r| {
                let three = r[&3].clone();
                let six = r[&6].clone();
                r.insert(3, six);
                r.insert(6, three);
            })
        },
        3,
        &["event 6", "key of event 3"],
    );
}

#[test]
fn verify_finds_a_removed_record() {
    assert_damage_found(
        |dir| {
            damage_log_records(dir, |r| {
                r.remove(&6).expect("record 6");
            })
        },
        6,
        &["gap", "expected event 6"],
    );
}

/// The clean close's snapshot at 12 proves the log reached 12. (The context refuses to open
/// such a log, so only `pcx verify` is asked.)
#[test]
fn verify_finds_a_removed_newest_record_by_the_snapshot_ahead_of_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    write_damage_log(&dir);
    damage_log_records(&dir, |r| {
        r.remove(&12).expect("record 12");
    });
    assert_verify_finds(&dir, 12, &["snapshot at 12", "ahead"]);
}

/// On PostgreSQL: the damage log with its snapshots changed by `snapshots`, then records 11
/// and 12 deleted (its directory, and the temporary directory holding it). On sled, None,
/// after saying why the caller is skipped.
fn postgres_log_missing_records_11_and_12(
    snapshots: impl FnOnce(&mut BTreeMap<u64, Vec<u8>>),
    skipped_on_sled: &str,
) -> Option<(tempfile::TempDir, PathBuf)> {
    if !suite_on_postgres() {
        eprintln!("skipped on sled: {skipped_on_sled}");
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    write_damage_log(&dir);
    damage_log_snapshots(&dir, snapshots);
    damage_log_records(&dir, |r| {
        r.remove(&12).expect("record 12");
        r.remove(&11).expect("record 11");
    });
    Some((tmp, dir))
}

/// Regression (data loss): on PostgreSQL the journal's head row moves in the same transaction
/// as its records, so a log whose newest records were deleted together with every snapshot
/// that proved them is still known to be short. `verify` passed such a log as sound, and a
/// writer opening it moved the head back and numbered its next events over the lost ones.
/// (sled has no second account of its end: there the snapshots are the proof, above.)
#[test]
fn a_postgres_log_whose_newest_records_and_snapshots_were_deleted_is_found_by_its_head_and_refused()
{
    let Some((_tmp, dir)) = postgres_log_missing_records_11_and_12(
        |s| s.clear(),
        "its log has no head row apart from the records",
    ) else {
        return;
    };
    assert_verify_finds(&dir, 11, &["11..=12", "head says the log reached event 12"]);
    let refused = block_on(async { Context::open(&config(&dir, 4)).err() })
        .expect("opening the short log is refused");
    assert!(
        refused
            .to_string()
            .contains("the journal's head says the log reached event 12"),
        "{refused}"
    );
    // The refused open wrote nothing: the gap is still there for the auditor.
    assert_verify_finds(&dir, 11, &["head says the log reached event 12"]);
}

/// On PostgreSQL, opening the damage log with records 11 and 12 deleted (the snapshot at 12
/// kept), and the head row set to `head` if given: the refusal's words, checked to name
/// PostgreSQL's remedies (restore, or export and import) and `expected`, never `pcx recover`,
/// which PostgreSQL refuses. Skipped on sled, where `pcx recover --accept-lost-tail` is the remedy.
fn postgres_refusal_of_a_log_missing_its_newest_records(head: Option<u64>, expected: &[&str]) {
    let Some((_tmp, dir)) = postgres_log_missing_records_11_and_12(
        |s| assert!(s.contains_key(&12), "a snapshot at 12"),
        "there `pcx recover --accept-lost-tail` is the remedy",
    ) else {
        return;
    };
    if let Some(head) = head {
        pg_damage::set_head(&dir, head);
    }
    let refused = block_on(async { Context::open(&config(&dir, 4)).err() })
        .expect("opening the short log is refused")
        .to_string();
    for words in expected
        .iter()
        .chain(&["restore the database", "pcx export"])
    {
        assert!(refused.contains(words), "`{words}` not in: {refused}");
    }
    assert!(!refused.contains("pcx recover"), "{refused}");
}

/// With the snapshot that proved them still there, deleted records are a lost tail on either
/// journal; on PostgreSQL the refusal is told by the head and names what can be done there.
#[test]
fn a_postgres_log_missing_its_newest_records_is_refused_with_postgres_remedies() {
    postgres_refusal_of_a_log_missing_its_newest_records(
        None,
        &["the journal's head says the log reached event 12"],
    );
}

/// The head row moved back with the deleted records: only the snapshot still says how far
/// the log went, and the refusal still names PostgreSQL's remedies.
#[test]
fn a_postgres_log_whose_head_was_moved_back_with_its_records_is_refused_with_postgres_remedies() {
    postgres_refusal_of_a_log_missing_its_newest_records(
        Some(10),
        &[
            "snapshot 12 proves the log reached event 12",
            "the journal's head says 10",
        ],
    );
}

#[test]
fn verify_finds_a_snapshot_that_no_longer_matches_its_events() {
    assert_damage_found(
        |dir| {
            damage_log_snapshots(dir, |s| {
                let bytes = s.get(&12).expect("a snapshot at 12");
                let mut snap = decode_snapshot(bytes).expect("the snapshot decodes");
                assert_eq!(snap.seq, 12);
                // A well-formed snapshot (its own hash holds) of a state the events do not give.
                let (_, first) = snap
                    .state
                    .artifacts
                    .shift_remove_index(0)
                    .expect("artifacts");
                snap.state.artifacts.insert("forged".into(), first);
                let forged = encode_snapshot_of(snap.seq, snap.head, &snap.state, 0).unwrap();
                s.insert(12, forged);
            })
        },
        12,
        &["snapshot at 12", "does not match"],
    );
}

#[test]
fn verify_finds_a_snapshot_with_an_altered_byte() {
    assert_damage_found(
        |dir| {
            damage_log_snapshots(dir, |s| {
                flip_middle_byte(s.get_mut(&9).expect("a snapshot at 9"))
            })
        },
        9,
        &["snapshot at 9"],
    );
}

/// Regression (a forged log passed as sound): on PostgreSQL the head row moves in the same
/// transaction as the records, so a record past the head was not committed by the journal's
/// writer: a row inserted by hand (a forged event appended, chained to the last real one), or
/// the head restored from an older backup than the records. `verify` passed such a log, and a
/// writer opening it took the rows for its own: its next commit moved the head past them,
/// and the evidence was gone. (sled keeps no head apart from its records.)
#[test]
fn a_postgres_log_with_records_past_its_head_is_found_and_refused() {
    if !suite_on_postgres() {
        println!("skipped on sled: its log has no head row apart from the records");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    write_damage_log(&dir);
    pg_damage::set_head(&dir, 10);
    assert_verify_finds(
        &dir,
        11,
        &["events 11..=12", "past the journal's head", "10"],
    );
    let refused = block_on(async { Context::open(&config(&dir, 4)).err() })
        .expect("opening a log with records past its head is refused")
        .to_string();
    assert!(
        refused.contains("events 11..=12") && refused.contains("the journal's head says 10"),
        "{refused}"
    );
    // The refused open wrote nothing: the evidence is still there for the auditor.
    assert_verify_finds(&dir, 11, &["past the journal's head"]);
}

/// Regression: the head row of a journal in PostgreSQL deleted (an operator clearing what
/// looked like a stuck lease), its records all there. Every audit command said the journal
/// did not exist (`no_data_directory`), and a writer opening it made a head row at 0, below
/// the records it then replayed. Now the journal is found by its records, and a writer's new
/// head row starts at its last record: the log opens and goes on, `verify` passes.
#[test]
fn a_postgres_journal_whose_head_row_was_deleted_is_found_and_goes_on_from_its_records() {
    if !suite_on_postgres() {
        println!("skipped on sled: its log has no head row apart from the records");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let digest = write_damage_log(&dir);
    pg_damage::delete_head(&dir);
    let v = cli_value(&dir, &["verify"]);
    assert_eq!(v["ok"], json!(true), "{v}");
    assert_eq!(v["last_seq"], json!(12), "{v}");
    assert_eq!(v["state_digest"], json!(digest), "{v}");
    block_on(async {
        let ctx = open(&config(&dir, 4));
        assert_eq!(
            must_write(ctx.record_artifact(artifact("i", b"india")).await, "13"),
            13
        );
        ctx.close().await.expect("close");
    });
    let v = cli_value(&dir, &["verify"]);
    assert_eq!(v["ok"], json!(true), "{v}");
    assert_eq!(v["last_seq"], json!(13), "{v}");
}

/// Sets the log's compaction anchor: in the sled database's `meta` tree, or in `pcx_meta`.
fn damage_log_anchor(dir: &Path, bytes: &[u8]) {
    if suite_on_postgres() {
        pg_damage::set_anchor(dir, bytes)
    } else {
        damage(dir, "meta", TIMEOUT, |t| {
            t.insert(b"anchor", bytes).unwrap();
        })
    }
}

/// Regression (a forged log passed as sound): a compaction anchor stands for the events it
/// replaced, which compaction removes (on sled it writes a new directory without them, on
/// PostgreSQL it deletes them in the anchor's transaction). A forged anchor put in beside
/// those events (a state they do not give, pointing at the real hash of event 5), with the
/// snapshots that would contradict it deleted, passed `verify` (`anchored_at` 5) and was
/// served by an open, while the events that refute it were still in the log.
#[test]
fn a_forged_anchor_over_events_still_in_the_log_is_found_and_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    write_damage_log(&dir);
    let mut hash5 = None;
    damage_log_records(&dir, |r| {
        hash5 = Some(decode_event(&r[&5]).expect("record 5 decodes").1);
    });
    let mut forged = None;
    damage_log_snapshots(&dir, |s| {
        let nine = decode_snapshot(&s[&9]).expect("the snapshot at 9 decodes");
        forged = Some(encode_snapshot_of(5, hash5.unwrap(), &nine.state, 0).unwrap());
        s.clear();
    });
    damage_log_anchor(&dir, &forged.unwrap());
    assert_verify_finds(&dir, 1, &["event 1", "compaction anchor at event 5"]);
    let refused = block_on(async { Context::open(&config(&dir, 4)).err() })
        .expect("opening a log with a forged anchor is refused")
        .to_string();
    assert!(
        refused.contains("compaction anchor at event 5"),
        "{refused}"
    );
    assert_verify_finds(&dir, 1, &["compaction anchor at event 5"]);
}

// ---------------------------------------------------------------------------------------------
// a story used by several tests

/// Writes, in two `pcx batch` processes (so the two phases have different times):
///
/// ```text
///  1 record b1 aaa             8 clear
///  2 record b2 bbb             9 load e1        (b1 aaa, b2 bbb!)
///  3 entry e1 [[b1,b2],[b3,b1]] 10 edit b1 := zzz
///  4 edit b2 +"!"              11 take b2
///  5 stitch (e1; code 1 bypassed for b3)  12 record b3 ccc
///  6 stitch, 7 save (e1)
/// ```
fn write_story(dir: &Path) {
    let answers = batch_ok(
        dir,
        &[
            record("b1", "aaa"),
            record("b2", "bbb"),
            record_entry("e1", entry_with_codes(&[&["b1", "b2"], &["b3", "b1"]])),
            append("b2", "!"),
            op("create_cache_entries"),
            op("save_to_dynamo_cache"),
        ],
    );
    assert_eq!(
        answers.iter().map(|a| a["seq"].clone()).collect::<Vec<_>>(),
        vec![json!(1), json!(2), json!(3), json!(4), json!(5), json!(7)]
    );
    let answers = batch_ok(
        dir,
        &[
            op("clear"),
            json!({"op":"load_cache_entry","key":"e1"}),
            set("b1", "zzz"),
            take("b2"),
            record("b3", "ccc"),
        ],
    );
    assert_eq!(
        answers.iter().map(|a| a["seq"].clone()).collect::<Vec<_>>(),
        vec![json!(8), json!(9), json!(10), json!(11), json!(12)]
    );
}

/// A fresh temporary directory holding, as `name`, a data directory with the story.
fn story(name: &str) -> (TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    write_story(&dir);
    (tmp, dir)
}

// ---------------------------------------------------------------------------------------------
// 5. log

#[test]
fn log_lines_carry_seq_time_event_keys_content_labels_and_outcomes() {
    let (_tmp, dir) = story("data");
    let all = cli_lines(&dir, &["log"]);
    assert_eq!(seqs(&all), (1..=12).collect::<Vec<_>>());
    for line in &all {
        let time = line["time"].as_str().unwrap_or_else(|| panic!("{line}"));
        assert!(
            time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "an RFC 3339 time with milliseconds: {line}"
        );
        assert!(line["keys"].is_array(), "{line}");
    }
    let by_seq = |s: usize| &all[s - 1];
    let keys = |s: usize| strings(&by_seq(s)["keys"]);
    let event = |s: usize| by_seq(s)["event"].as_str().unwrap().to_string();
    let content = |s: usize, c: &str| {
        let l = by_seq(s);
        assert_eq!(l["digest"], json!(hex(c.as_bytes())), "{l}");
        assert_eq!(l["size"], json!(c.len()), "{l}");
    };

    assert_eq!(event(1), "ArtifactRecorded");
    assert_eq!(keys(1), set_of(&["b1"]));
    assert_eq!(by_seq(1)["kind"], json!("eager"));
    content(1, "aaa");
    content(2, "bbb");
    assert_eq!(event(3), "DynamoEntryRecorded");
    assert_eq!(keys(3), set_of(&["e1"]));
    assert_eq!(by_seq(3)["num_codes"], json!(2));
    assert_eq!(event(4), "ArtifactEdited");
    assert_eq!(keys(4), set_of(&["b2"]));
    assert_eq!(by_seq(4)["label"], json!("append"));
    content(4, "bbb!");
    for s in [5, 6] {
        assert_eq!(event(s), "Stitched");
        let outcome = &by_seq(s)["outcome"];
        assert_eq!(outcome["produced"], json!(["e1"]), "{outcome}");
        assert_eq!(outcome["failed"], json!([]), "{outcome}");
        let bypassed = outcome["bypassed"].as_array().unwrap();
        assert_eq!(bypassed.len(), 1, "{outcome}");
        assert_eq!(bypassed[0]["key"], json!("e1"));
        assert_eq!(bypassed[0]["code_index"], json!(1));
        assert_eq!(bypassed[0]["missing_backend"], json!("b3"));
        assert!(keys(s).contains("e1"), "{}", by_seq(s));
    }
    assert_eq!(event(7), "SavedToDynamoCache");
    assert_eq!(by_seq(7)["saved"], json!(["e1"]));
    assert!(keys(7).contains("e1"));
    assert_eq!(event(8), "Cleared");
    assert!(by_seq(8).get("digest").is_none(), "a clear has no content");
    assert_eq!(event(9), "EntryLoaded");
    assert!(
        keys(9).is_superset(&set_of(&["e1", "b1", "b2"])),
        "{}",
        by_seq(9)
    );
    let backends = &by_seq(9)["backends"];
    assert_eq!(backends["b1"]["digest"], json!(hex(b"aaa")), "{backends}");
    assert_eq!(backends["b2"]["digest"], json!(hex(b"bbb!")), "{backends}");
    assert_eq!(backends["b2"]["size"], json!(4), "{backends}");
    assert_eq!(by_seq(10)["label"], json!("set"));
    content(10, "zzz");
    assert_eq!(event(11), "ArtifactTaken");
    assert_eq!(keys(11), set_of(&["b2"]));
    assert!(by_seq(11).get("digest").is_none());
    content(12, "ccc");
}

#[test]
fn log_filters_by_range_time_key_event_and_limit() {
    let (_tmp, dir) = story("data");
    let all = cli_lines(&dir, &["log"]);
    let log = |args: &[&str]| {
        let mut full = vec!["log"];
        full.extend_from_slice(args);
        cli_lines(&dir, &full)
    };
    let pick = |f: &dyn Fn(&Value) -> bool| -> Vec<Value> {
        all.iter().filter(|l| f(l)).cloned().collect::<Vec<_>>()
    };

    // Ranges, inclusive at both ends.
    assert_eq!(seqs(&log(&["--from", "3", "--to", "6"])), vec![3, 4, 5, 6]);
    assert_eq!(seqs(&log(&["--from", "10"])), vec![10, 11, 12]);
    assert_eq!(seqs(&log(&["--to", "2"])), vec![1, 2]);
    assert_eq!(seqs(&log(&["--from", "4", "--to", "4"])), vec![4]);
    assert_eq!(seqs(&log(&["--from", "12", "--to", "99"])), vec![12]);
    // The lines are the same lines whatever the filter.
    assert_eq!(log(&["--from", "3", "--to", "6"]), all[2..6].to_vec());

    // Empty answers, exit 0.
    assert!(log(&["--from", "6", "--to", "3"]).is_empty());
    assert!(log(&["--limit", "0"]).is_empty());
    assert!(log(&["--from", "13"]).is_empty());
    // (An event name that is no event's is refused, not an empty answer:
    // `a_log_filtered_by_a_misspelt_event_name_is_refused_not_answered_empty`.)
    assert!(log(&["--event", "ContextDropped"]).is_empty());

    // Limit: the first N matches.
    assert_eq!(seqs(&log(&["--limit", "2"])), vec![1, 2]);
    assert_eq!(seqs(&log(&["--from", "5", "--limit", "3"])), vec![5, 6, 7]);
    assert_eq!(
        seqs(&log(&["--event", "ArtifactRecorded", "--limit", "2"])),
        vec![1, 2]
    );

    // Event name.
    assert_eq!(seqs(&log(&["--event", "ArtifactEdited"])), vec![4, 10]);
    assert_eq!(seqs(&log(&["--event", "Stitched"])), vec![5, 6]);

    // Key: every event naming the key; beyond those, at most clears.
    for key in ["b1", "b2", "b3", "e1"] {
        let got = log(&["--key", key]);
        let naming = pick(&|l| strings(&l["keys"]).contains(key));
        assert!(!naming.is_empty());
        for l in &naming {
            assert!(got.contains(l), "--key {key} misses {l}");
        }
        for l in &got {
            assert!(
                naming.contains(l) || l["event"] == json!("Cleared"),
                "--key {key} shows an event that does not touch it: {l}"
            );
        }
        assert!(seqs(&got).windows(2).all(|w| w[0] < w[1]), "oldest first");
    }
    let recorded_b1 = log(&["--key", "b1", "--event", "ArtifactRecorded"]);
    assert_eq!(seqs(&recorded_b1), vec![1]);

    // Time: --since / --until are inclusive; times compare as their RFC 3339 text.
    let time = |s: usize| all[s - 1]["time"].as_str().unwrap().to_string();
    let t8 = time(8);
    let at_or_after = pick(&|l| l["time"].as_str().unwrap() >= t8.as_str());
    let at_or_before = pick(&|l| l["time"].as_str().unwrap() <= t8.as_str());
    let exactly = pick(&|l| l["time"].as_str().unwrap() == t8.as_str());
    assert!(seqs(&at_or_after).contains(&8) && seqs(&at_or_before).contains(&8));
    assert_eq!(log(&["--since", &t8]), at_or_after);
    assert_eq!(log(&["--until", &t8]), at_or_before);
    assert_eq!(log(&["--since", &t8, "--until", &t8]), exactly);
    assert_eq!(log(&["--since", "2000-01-01T00:00:00Z"]), all);
    assert!(log(&["--until", "2000-01-01T00:00:00Z"]).is_empty());
    assert!(log(&["--since", "2999-01-01T00:00:00Z"]).is_empty());
    let t1 = time(1);
    assert_eq!(
        log(&[
            "--since",
            &t1,
            "--until",
            &time(12),
            "--event",
            "ArtifactTaken"
        ]),
        pick(&|l| l["event"] == json!("ArtifactTaken"))
    );

    // A time that is not RFC 3339 is refused, clearly.
    let message = cli_error(&dir, &["log", "--since", "yesterday"], "invalid_request");
    assert!(message.contains("yesterday"), "{message}");
    // `state --at-time`: the last event at or before the time.
    let at_t8 = cli_value(&dir, &["state", "--at-time", &t8]);
    assert_eq!(at_t8["seq"], json!(*seqs(&at_or_before).last().unwrap()));
}

#[test]
fn log_of_an_unknown_key_is_empty_even_when_the_log_has_clears() {
    let (_tmp, dir) = story("data");
    assert_eq!(
        cli_lines(&dir, &["log", "--event", "Cleared"]).len(),
        1,
        "the story has a clear"
    );
    let run = cli(&dir, &["log", "--key", "no_such_key"]);
    run.assert_success();
    assert!(
        run.stdout.trim().is_empty(),
        "a key that never existed has no events, yet `log --key no_such_key` shows: {}",
        run.stdout
    );
    // Likewise a key that did not exist when the clear happened (b3 is recorded after it).
    let b3 = cli_lines(&dir, &["log", "--key", "b3"]);
    assert!(
        b3.iter().all(|l| l["event"] != json!("Cleared")),
        "b3 did not exist at the clear (seq 8): {b3:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. history

#[test]
fn history_of_an_artifact_shows_every_version_and_every_stitch_that_included_or_bypassed_it() {
    let (_tmp, dir) = story("data");

    let b1 = cli_lines(&dir, &["history", "b1"]);
    assert_eq!(seqs(&b1), vec![1, 5, 6, 7, 8, 9, 10], "{b1:#?}");
    for l in &b1 {
        assert!(l["time"].is_string() && l["event"].is_string(), "{l}");
    }
    assert_eq!(b1[0]["event"], json!("ArtifactRecorded"));
    assert_eq!(b1[0]["content"]["digest"], json!(hex(b"aaa")));
    assert_eq!(b1[0]["content"]["size"], json!(3));
    for l in &b1[1..3] {
        assert_eq!(l["event"], json!("Stitched"));
        assert_eq!(l["included_in"], json!(["e1"]), "{l}");
        assert_eq!(l["bypassed_in"], json!([]), "{l}");
    }
    assert_eq!(b1[3]["event"], json!("SavedToDynamoCache"));
    assert_eq!(b1[3]["saved_in"], json!(["e1"]));
    assert_eq!(b1[4]["event"], json!("Cleared"));
    assert_eq!(b1[5]["event"], json!("EntryLoaded"));
    assert_eq!(b1[5]["loaded_from"], json!("e1"));
    assert_eq!(b1[5]["content"]["digest"], json!(hex(b"aaa")));
    assert_eq!(b1[6]["event"], json!("ArtifactEdited"));
    assert_eq!(b1[6]["label"], json!("set"));
    assert_eq!(b1[6]["content"]["digest"], json!(hex(b"zzz")));
    assert_eq!(b1[6]["content"]["size"], json!(3));

    let b2 = cli_lines(&dir, &["history", "b2"]);
    assert_eq!(seqs(&b2), vec![2, 4, 5, 6, 7, 8, 9, 11], "{b2:#?}");
    assert_eq!(b2[0]["content"]["digest"], json!(hex(b"bbb")));
    assert_eq!(b2[1]["label"], json!("append"));
    assert_eq!(b2[1]["content"]["digest"], json!(hex(b"bbb!")));
    assert_eq!(b2[1]["content"]["size"], json!(4));
    assert_eq!(b2[2]["included_in"], json!(["e1"]));
    assert_eq!(b2[6]["content"]["digest"], json!(hex(b"bbb!")), "loaded");
    assert_eq!(b2[7]["event"], json!("ArtifactTaken"));

    // b3 was missing when e1 was stitched: its code 1 was bypassed for lack of it.
    let b3 = cli_lines(&dir, &["history", "b3"]);
    assert_eq!(seqs(&b3), vec![5, 6, 12], "{b3:#?}");
    for l in &b3[..2] {
        assert_eq!(l["included_in"], json!([]), "{l}");
        assert_eq!(
            l["bypassed_in"],
            json!([{"entry": "e1", "code_index": 1}]),
            "{l}"
        );
    }
    assert_eq!(b3[2]["content"]["digest"], json!(hex(b"ccc")));

    // A key that never existed: an empty history, exit 0.
    assert!(cli_lines(&dir, &["history", "never"]).is_empty());
}

#[test]
fn history_of_an_entry_shows_recorded_stitched_bypassed_saved_and_loaded() {
    let (_tmp, dir) = story("data");
    let e1 = cli_lines(&dir, &["history", "e1"]);
    assert_eq!(seqs(&e1), vec![3, 5, 6, 7, 8, 9], "{e1:#?}");
    assert_eq!(e1[0]["event"], json!("DynamoEntryRecorded"));
    assert_eq!(e1[0]["num_codes"], json!(2));
    assert_eq!(e1[0]["backend_ids"], json!(["b1", "b2", "b3"]));
    for l in &e1[1..3] {
        assert_eq!(l["stitch"], json!("produced"), "{l}");
        let codes = l["bypassed_codes"].as_array().unwrap();
        assert_eq!(codes.len(), 1, "{l}");
        assert_eq!(codes[0]["code_index"], json!(1));
        assert_eq!(codes[0]["missing_backend"], json!("b3"));
    }
    assert_eq!(e1[3]["saved"], json!(true));
    assert_eq!(e1[4]["event"], json!("Cleared"));
    assert_eq!(e1[5]["loaded"], json!(true));
}

// ---------------------------------------------------------------------------------------------
// 7. diff

#[test]
fn diff_classifies_added_changed_taken_and_cleared() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    batch_ok(
        &dir,
        &[
            record("x", "x1"),                                       // 1
            record("y", "y1"),                                       // 2
            record("z", "z1"),                                       // 3
            record("w", "w1"),                                       // 4
            record("v", "v1"),                                       // 5
            take("y"),                                               // 6
            append("x", "+"),                                        // 7
            op("clear"),                                             // 8
            record("x", "x2"),                                       // 9
            record("w", "w1"),                                       // 10: as it was at 5
            record("n", "n1"),                                       // 11
            record("v", "v2"),                                       // 12: cleared, then back
            take("v"),                                               // 13: ... and taken
            record_entry("e1", entry_with_codes(&[&["x"]])),         // 14
            op("save_to_dynamo_cache"),                              // 15, 16
            record_entry("e1", entry_with_codes(&[&["x"], &["n"]])), // 17
            op("clear"),                                             // 18
        ],
    );
    let diff = |from: u64, to: u64| {
        let d = cli_value(
            &dir,
            &["diff", "--from", &from.to_string(), "--to", &to.to_string()],
        );
        assert_eq!(d["from"], json!(from));
        assert_eq!(d["to"], json!(to));
        d
    };
    let classes = |d: &Value| {
        let a = &d["artifacts"];
        (
            strings(&a["added"]),
            strings(&a["changed"]),
            strings(&a["taken"]),
            strings(&a["cleared"]),
        )
    };
    let none = BTreeSet::new;

    let d = diff(5, 13);
    assert_eq!(
        classes(&d),
        (
            set_of(&["n"]),
            set_of(&["x"]),
            set_of(&["y", "v"]),
            set_of(&["z"])
        ),
        "{d}"
    );
    assert_eq!(d["artifacts"]["added"][0]["digest"], json!(hex(b"n1")));
    assert_eq!(d["artifacts"]["added"][0]["size"], json!(2));
    let x = &d["artifacts"]["changed"][0];
    assert_eq!(x["from"]["digest"], json!(hex(b"x1")), "{x}");
    assert_eq!(x["to"]["digest"], json!(hex(b"x2")), "{x}");
    assert_eq!(d["clears"], json!([8]));

    let d = diff(5, 7);
    assert_eq!(
        classes(&d),
        (none(), set_of(&["x"]), set_of(&["y"]), none()),
        "{d}"
    );
    assert_eq!(
        d["artifacts"]["changed"][0]["to"]["digest"],
        json!(hex(b"x1+"))
    );
    assert_eq!(d["clears"], json!([]));

    let d = diff(5, 12);
    assert_eq!(
        classes(&d),
        (
            set_of(&["n"]),
            set_of(&["x", "v"]),
            set_of(&["y"]),
            set_of(&["z"])
        ),
        "{d}"
    );

    let d = diff(0, 5);
    assert_eq!(
        classes(&d),
        (set_of(&["x", "y", "z", "w", "v"]), none(), none(), none()),
        "{d}"
    );

    let d = diff(13, 13);
    assert_eq!(classes(&d), (none(), none(), none(), none()), "{d}");
    assert_eq!(d["clears"], json!([]));

    let d = diff(13, 16);
    assert_eq!(classes(&d), (none(), none(), none(), none()), "{d}");
    assert_eq!(strings(&d["entries"]["added"]), set_of(&["e1"]), "{d}");
    assert_eq!(strings(&d["dynamo_cache"]["added"]), set_of(&["e1"]), "{d}");

    let d = diff(16, 17);
    assert_eq!(strings(&d["entries"]["changed"]), set_of(&["e1"]), "{d}");
    assert_eq!(strings(&d["entries"]["added"]), none(), "{d}");

    let d = diff(17, 18);
    assert_eq!(
        classes(&d),
        (none(), none(), none(), set_of(&["x", "w", "n"])),
        "{d}"
    );
    assert_eq!(strings(&d["entries"]["removed"]), set_of(&["e1"]), "{d}");
    assert_eq!(strings(&d["dynamo_cache"]["changed"]), none(), "{d}");
    assert_eq!(d["clears"], json!([18]));

    cli_error(
        &dir,
        &["diff", "--from", "7", "--to", "5"],
        "invalid_request",
    );
    cli_error(&dir, &["diff", "--from", "5", "--to", "99"], "beyond_end");
}

// ---------------------------------------------------------------------------------------------
// 8. the batch protocol asks the same questions

#[test]
fn batch_queries_answer_as_the_cli_does_and_see_the_write_before_them() {
    let (_tmp, dir) = story("data");

    let queries: Vec<(Value, Vec<&str>, &str)> = vec![
        (op("log"), vec!["log"], "events"),
        (
            json!({"op":"log","from":3,"to":6}),
            vec!["log", "--from", "3", "--to", "6"],
            "events",
        ),
        (
            json!({"op":"log","key":"b2","event":"ArtifactEdited"}),
            vec!["log", "--key", "b2", "--event", "ArtifactEdited"],
            "events",
        ),
        (
            json!({"op":"log","limit":0}),
            vec!["log", "--limit", "0"],
            "events",
        ),
        (
            json!({"op":"history","key":"b1"}),
            vec!["history", "b1"],
            "history",
        ),
        (
            json!({"op":"history","key":"e1"}),
            vec!["history", "e1"],
            "history",
        ),
        (op("state"), vec!["state"], "state"),
        (
            json!({"op":"state","at":5}),
            vec!["state", "--at", "5"],
            "state",
        ),
        (
            json!({"op":"state","at":9,"key":"b2"}),
            vec!["state", "--at", "9", "--key", "b2"],
            "state",
        ),
        (
            json!({"op":"diff","from":2,"to":11}),
            vec!["diff", "--from", "2", "--to", "11"],
            "diff",
        ),
        (op("verify"), vec!["verify"], "verify"),
    ];
    let requests: Vec<Value> = queries.iter().map(|(r, _, _)| r.clone()).collect();
    let answers = batch_ok(&dir, &requests);
    for ((request, args, field), answer) in queries.iter().zip(&answers) {
        let got = &answer[*field];
        let want = match *field {
            "events" | "history" => Value::Array(cli_lines(&dir, args)),
            _ => cli_value(&dir, args),
        };
        assert_eq!(got, &want, "batch {request} vs pcx {args:?}");
    }
    assert_eq!(answers[5]["key"], json!("e1"));
    assert_eq!(
        answers[8]["state"]["artifact"]["content_b64"],
        json!(b64(b"bbb!"))
    );

    // Queries right after a write in the same stream see that write.
    let answers = batch_ok(
        &dir,
        &[
            record("q", "qqq"),
            json!({"op":"log","from":13}),
            json!({"op":"history","key":"q"}),
            json!({"op":"state","key":"q"}),
            op("verify"),
            json!({"op":"diff","from":12,"to":13}),
        ],
    );
    assert_eq!(answers[0]["seq"], json!(13));
    assert_eq!(seqs(answers[1]["events"].as_array().unwrap()), vec![13]);
    assert_eq!(seqs(answers[2]["history"].as_array().unwrap()), vec![13]);
    assert_eq!(answers[3]["state"]["seq"], json!(13));
    assert_eq!(
        answers[3]["state"]["artifact"]["content_b64"],
        json!(b64(b"qqq"))
    );
    assert_eq!(answers[4]["verify"]["ok"], json!(true));
    assert_eq!(answers[4]["verify"]["last_seq"], json!(13));
    assert_eq!(
        strings(&answers[5]["diff"]["artifacts"]["added"]),
        set_of(&["q"])
    );

    // An audit question that cannot be answered is an error answer, and the stream goes on.
    let answers = batch(
        &dir,
        &[
            json!({"op":"state","at":99}),
            json!({"op":"diff","from":3,"to":2}),
            json!({"op":"log","since":"not a time"}),
            op("verify"),
        ],
    );
    assert_eq!(
        answers[0]["error"]["kind"],
        json!("beyond_end"),
        "{}",
        answers[0]
    );
    assert_eq!(answers[1]["error"]["kind"], json!("invalid_request"));
    assert_eq!(answers[2]["error"]["kind"], json!("invalid_request"));
    assert_eq!(answers[3]["verify"]["ok"], json!(true));
}

/// docs/protocol.md promises that one request file gives the same answers in one `pcx batch` as
/// split over several; so a query answers as of its place in the stream: it sees every write
/// before it and none after it, however the writes are grouped into commits.
#[test]
fn a_batch_query_answers_as_of_its_place_in_the_stream() {
    let (_tmp, dir) = story("data");
    let mut requests: Vec<Value> = (0..5).map(|i| record(&format!("p{i}"), "p")).collect();
    requests.extend([
        json!({"op":"log","from":13}),
        op("state"),
        op("verify"),
        json!({"op":"history","key":"p0"}),
        json!({"op":"state","key":"p0"}),
    ]);
    requests.extend((0..5).map(|_| append("p0", "!")));
    let answers = batch_ok(&dir, &requests);
    assert_eq!(answers[4]["seq"], json!(17));
    assert_eq!(answers[14]["seq"], json!(22));
    let log = seqs(answers[5]["events"].as_array().unwrap());
    let state = &answers[6]["state"];
    let verify = &answers[7]["verify"];
    let history = seqs(answers[8]["history"].as_array().unwrap());
    let p0 = &answers[9]["state"];
    assert_eq!(
        (
            log,
            state["seq"].clone(),
            verify["last_seq"].clone(),
            history,
            p0["seq"].clone()
        ),
        (
            (13..=17).collect::<Vec<_>>(),
            json!(17),
            json!(17),
            vec![13],
            json!(17)
        ),
        "queries after event 17 and before event 18 answered with later events; \
         state: {state}\nverify: {verify}\np0: {p0}"
    );
    assert_eq!(p0["artifact"]["content_b64"], json!(b64(b"p")));
}

// ---------------------------------------------------------------------------------------------
// 3. export and import

/// The facts of a log that must survive a round trip.
fn summary(dir: &Path) -> Value {
    let v = cli_value(dir, &["verify"]);
    assert_eq!(v["ok"], json!(true), "{v}");
    json!({
        "events": v["events"], "first_seq": v["first_seq"], "last_seq": v["last_seq"],
        "anchored_at": v["anchored_at"], "state_digest": v["state_digest"],
        "state": cli_value(dir, &["state"]),
        "log": cli_lines(dir, &["log"]),
        "history_b1": cli_lines(dir, &["history", "b1"]),
    })
}

fn export(dir: &Path, file: &Path, content: &str) {
    let run = cli(
        dir,
        &[
            "export",
            "--content",
            content,
            "--output",
            file.to_str().unwrap(),
        ],
    );
    run.assert_success();
    assert!(run.stdout.trim().is_empty(), "{}", run.stdout);
}

fn import(dir: &Path, file: &Path) -> Value {
    cli_value(dir, &["import", "--input", file.to_str().unwrap()])
}

fn import_refused(dir: &Path, file: &Path) -> String {
    cli_error(
        dir,
        &["import", "--input", file.to_str().unwrap()],
        "import_failed",
    )
}

#[test]
fn export_then_import_gives_the_same_log_and_state_plain_and_compacted() {
    let (tmp, src) = story("src");
    let before = summary(&src);

    let file = tmp.path().join("plain.jsonl");
    export(&src, &file, "inline");
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["pcx_export"], json!(1), "{}", lines[0]);
    assert_eq!(lines[0]["content"], json!("inline"));
    assert_eq!(lines.last().unwrap()["end"], json!(true));
    assert_eq!(
        lines.last().unwrap()["state_digest"],
        before["state_digest"]
    );
    // The same export on stdout.
    let stdout = cli(&src, &["export"]);
    stdout.assert_success();
    assert_eq!(stdout.stdout, text, "export to stdout and to a file agree");

    let dst = tmp.path().join("imported");
    let imported = import(&dst, &file);
    assert_eq!(imported["ok"], json!(true));
    assert_eq!(imported["events"], json!(12));
    assert_eq!(imported["last_seq"], json!(12));
    assert_eq!(imported["state_digest"], before["state_digest"]);
    assert_eq!(summary(&dst), before, "the imported log is the same log");
    // It is a working data directory: it takes new writes where the log left off.
    let answers = batch_ok(
        &dst,
        &[
            record("new", "n"),
            json!({"op":"load_cache_entry","key":"e1"}),
        ],
    );
    assert_eq!(answers[0]["seq"], json!(13));
    assert_eq!(
        answers[1]["entry"]["backends"]["b2"]["content_b64"],
        json!(b64(b"bbb!"))
    );
    assert_eq!(cli_value(&dst, &["verify"])["last_seq"], json!(14));

    // Compacted: the anchor travels with the export.
    let report = cli_value(&src, &["compact", "--before", "9"]);
    assert_eq!(report["anchored_at"], json!(8), "{report}");
    let compacted = summary(&src);
    assert_eq!(compacted["anchored_at"], json!(8));
    assert_eq!(compacted["state_digest"], before["state_digest"]);
    let file = tmp.path().join("compacted.jsonl");
    export(&src, &file, "inline");
    let dst = tmp.path().join("imported-compacted");
    let imported = import(&dst, &file);
    assert_eq!(imported["state_digest"], before["state_digest"]);
    assert_eq!(imported["last_seq"], json!(12));
    assert_eq!(summary(&dst), compacted, "the imported compacted log");
    cli_error(&dst, &["log", "--from", "1"], "compacted");
    let answers = batch_ok(&dst, &[record("new", "n")]);
    assert_eq!(answers[0]["seq"], json!(13));
    assert_eq!(cli_value(&dst, &["verify"])["ok"], json!(true));
}

/// The export `text` with its records rewritten by `change`, which gets each record's sequence
/// number, envelope and the hash of the record before it as the forged export has it, and
/// gives the record's new bytes (None: the record is kept as it was).
fn forge_export(
    text: &str,
    mut change: impl FnMut(u64, Envelope, Digest) -> Option<Vec<u8>>,
) -> String {
    let mut prev = None;
    let mut out = String::new();
    for l in text.lines() {
        let mut v: Value = serde_json::from_str(l).unwrap();
        if let Some(seq) = v["seq"].as_u64() {
            let bytes = unb64(&v["record_b64"]);
            let (env, _) = decode_event(&bytes).unwrap();
            let before = prev.unwrap_or(env.prev);
            let new = change(seq, env, before).unwrap_or(bytes);
            v["record_b64"] = json!(b64(&new));
            // A record's hash is that of its bytes before the trailing hash.
            prev = Some(Digest::of(&new[..new.len() - 32]));
        }
        out.push_str(&format!("{v}\n"));
    }
    out
}

/// What docs/auditing.md says the hash chain proves, on an import (and on `verify`): an export
/// edited in part is refused naming the event, but one rewritten from an altered event on with
/// every later hash recomputed imports and verifies (the chain is unkeyed), and is told only
/// by the hash of its last event pinned at the source (`verify`'s `last_hash`, `log`'s `hash`).
#[test]
fn an_import_of_a_partly_forged_export_is_refused_and_a_wholly_forged_one_is_told_by_its_pinned_hash(
) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_damage_log(&src);
    let source = cli_value(&src, &["verify"]);
    let pinned = source["last_hash"].clone();
    assert!(pinned.is_string(), "{source}");
    let log_line = |dir: &Path, seq: &str| {
        cli_lines(dir, &["log", "--from", seq, "--to", seq])
            .pop()
            .expect("one line")
    };
    assert_eq!(log_line(&src, "12")["hash"], pinned);
    let file = tmp.path().join("export.jsonl");
    export(&src, &file, "inline");
    let text = std::fs::read_to_string(&file).unwrap();
    let forger = |mut env: Envelope| {
        env.origin = "forger@pcx".into();
        env
    };
    let write = |name: &str, text: String| {
        let f = tmp.path().join(name);
        std::fs::write(&f, text).unwrap();
        f
    };

    // A byte of event 5 changed: its own hash fails.
    let flipped = forge_export(&text, |seq, env, _| {
        (seq == 5).then(|| {
            let mut b = encode_event(&env).unwrap().0;
            flip_middle_byte(&mut b);
            b
        })
    });
    let why = import_refused(&tmp.path().join("a"), &write("flipped.jsonl", flipped));
    assert!(why.contains("event 5"), "{why}");

    // Event 5 rewritten with its own hash recomputed: event 6 no longer follows it.
    let rehashed = forge_export(&text, |seq, env, _| {
        (seq == 5).then(|| encode_event(&forger(env)).unwrap().0)
    });
    let why = import_refused(&tmp.path().join("b"), &write("rehashed.jsonl", rehashed));
    assert!(why.contains("event 6 does not follow"), "{why}");

    // Every hash from event 5 on recomputed: it imports and verifies, as documented (the
    // origin changes no state, so even the closing line's state digest holds) ...
    let whole = forge_export(&text, |seq, env, prev| {
        (seq >= 5).then(|| {
            let mut env = if seq == 5 { forger(env) } else { env };
            env.prev = prev;
            encode_event(&env).unwrap().0
        })
    });
    let dst = tmp.path().join("c");
    import(&dst, &write("whole.jsonl", whole));
    let forged = cli_value(&dst, &["verify"]);
    assert_eq!(forged["ok"], json!(true), "{forged}");
    assert_eq!(forged["last_seq"], source["last_seq"]);
    assert_eq!(forged["state_digest"], source["state_digest"]);
    assert_eq!(log_line(&dst, "5")["origin"], json!("forger@pcx"));
    // ... and only the pinned hash tells: it differs from event 5 on, not before.
    assert_ne!(forged["last_hash"], pinned, "{forged}");
    assert_ne!(log_line(&dst, "5")["hash"], log_line(&src, "5")["hash"]);
    assert_eq!(log_line(&dst, "4")["hash"], log_line(&src, "4")["hash"]);
}

/// Regression (a damaged export imported as sound): the closing line says how many events
/// the export holds and the last one's number, but import checked only its state digest. An
/// export whose last events were cut out with the closing line kept (a bad copy, a hand edit)
/// imported as a shorter log, answered ok, whenever the cut events left the state as it was
/// (a stitch records what was produced and changes no state).
#[test]
fn an_import_of_an_export_missing_its_last_events_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    batch_ok(
        &src,
        &[
            record("b1", "aaa"),
            record("b2", "bbb"),
            record_entry("e1", entry_with_codes(&[&["b1", "b2"]])),
            op("create_cache_entries"),
        ],
    );
    let file = tmp.path().join("full.jsonl");
    export(&src, &file, "inline");
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = lines
        .iter()
        .rfind(|v| v["seq"].is_u64())
        .expect("a record line")
        .clone();
    assert_eq!(last["event"], json!("Stitched"), "{last}");
    let end = lines.last().unwrap();
    assert_eq!(end["events"], last["seq"], "{end}");
    let cut_file = tmp.path().join("cut.jsonl");
    let cut: String = text
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).unwrap()["seq"] != last["seq"])
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&cut_file, cut).unwrap();
    let dst = tmp.path().join("dst");
    let why = import_refused(&dst, &cut_file);
    let n = last["seq"].as_u64().unwrap();
    assert!(
        why.contains(&format!("{} events", n - 1))
            && why.contains(&format!("closing line says {n}")),
        "{why}"
    );
    // Nothing of it stayed: the whole export goes in afterwards.
    assert_eq!(import(&dst, &file)["events"], json!(n));
}

#[test]
fn imports_are_refused_for_digest_exports_non_empty_directories_and_truncated_exports() {
    let (tmp, src) = story("src");
    let good = tmp.path().join("good.jsonl");
    export(&src, &good, "inline");
    let text = std::fs::read_to_string(&good).unwrap();

    // By digest: an audit trail without content.
    let digests = tmp.path().join("digests.jsonl");
    export(&src, &digests, "digest");
    let d = std::fs::read_to_string(&digests).unwrap();
    assert!(!d.contains("\"blob\""), "a digest export carries no blobs");
    assert!(d.lines().next().unwrap().contains("\"content\":\"digest\""));
    let dst = tmp.path().join("from-digests");
    let message = import_refused(&dst, &digests);
    assert!(message.contains("content"), "{message}");

    // Truncated: the closing line is missing, or the file stops inside a line.
    let truncated = tmp.path().join("truncated.jsonl");
    let without_end: String = text
        .lines()
        .take(text.lines().count() - 1)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&truncated, &without_end).unwrap();
    let dst2 = tmp.path().join("from-truncated");
    let message = import_refused(&dst2, &truncated);
    assert!(message.contains("truncated"), "{message}");
    let cut = tmp.path().join("cut.jsonl");
    std::fs::write(&cut, &text[..text.len() * 2 / 3]).unwrap();
    let dst3 = tmp.path().join("from-cut");
    import_refused(&dst3, &cut);

    // A refused import leaves the directory empty (on PostgreSQL: the journal, and no side
    // journal beside it): the good export still goes in.
    for dir in [&dst, &dst2, &dst3] {
        assert!(cli_lines(dir, &["log"]).is_empty(), "{}", dir.display());
        if suite_on_postgres() {
            assert_eq!(pg_damage::journals(dir), vec![suite_journal_name(dir)]);
        }
        import(dir, &good);
        assert_eq!(summary(dir), summary(&src));
    }

    // Into a directory that already holds a log: refused, and the log is untouched.
    let before = summary(&src);
    let message = import_refused(&src, &good);
    assert!(message.contains("already holds a log"), "{message}");
    assert_eq!(summary(&src), before);
}

#[test]
fn a_refused_import_of_a_compacted_export_leaves_the_directory_empty() {
    let (tmp, src) = story("src");
    cli_value(&src, &["compact", "--before", "9"]);
    let good = tmp.path().join("good.jsonl");
    export(&src, &good, "inline");
    let text = std::fs::read_to_string(&good).unwrap();
    let digests = tmp.path().join("digests.jsonl");
    export(&src, &digests, "digest");
    // Only the header (which carries the anchor) and one more line.
    let truncated = tmp.path().join("truncated.jsonl");
    let head: String = text.lines().take(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(&truncated, head).unwrap();

    let mut problems = Vec::new();
    for (name, bad) in [("digest", &digests), ("truncated", &truncated)] {
        let dst = tmp.path().join(format!("from-{name}"));
        import_refused(&dst, bad);
        let verify = cli(&dst, &["verify"]);
        if !(verify.status.success() && verify.answer()["events"] == json!(0)) {
            problems.push(format!(
                "after a refused import ({name} export) the directory should hold no log; \
                 verify says: {}",
                verify.stdout.trim()
            ));
        }
        let again = cli(&dst, &["import", "--input", good.to_str().unwrap()]);
        if !again.status.success() {
            problems.push(format!(
                "after a refused import ({name} export) the good export should import; it \
                 says: {}",
                again.stdout.trim()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn a_digest_export_of_a_compacted_log_is_refused_even_when_its_kept_events_carry_no_content() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    batch_ok(
        &src,
        &[
            record("a", "alpha"),
            record("b", "bravo"),
            take("b"),
            take("zz"),
        ],
    );
    // The kept event (3: take b) refers to no content; the anchor's state (a, b) does.
    cli_value(&src, &["compact", "--before", "3"]);
    let digests = tmp.path().join("digests.jsonl");
    export(&src, &digests, "digest");
    let dst = tmp.path().join("dst");
    let run = cli(&dst, &["import", "--input", digests.to_str().unwrap()]);
    let verify = cli(&dst, &["verify"]);
    assert!(
        !run.status.success(),
        "a digest export cannot be imported (it carries no content), yet the import said {} \
         and verify of the result says {}",
        run.stdout.trim(),
        verify.stdout.trim()
    );
}

/// Into PostgreSQL too: the import's log is written into a side journal and taken over in
/// one transaction, so a kill while it writes leaves the journal without a log, not a part
/// of one.
#[test]
fn a_killed_import_leaves_no_log_and_the_next_import_goes_in_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    // More than one import chunk (1024 events): the import is killed after the first.
    let requests: Vec<Value> = (0..1100)
        .map(|i| record(&format!("k{}", i % 40), &format!("v{i}")))
        .collect();
    batch_ok(&src, &requests);
    let file = tmp.path().join("export.jsonl");
    export(&src, &file, "inline");

    let dst = tmp.path().join("dst");
    let pause = tmp.path().join("pause");
    let mut cmd = pcx(&dst, &["import", "--input", file.to_str().unwrap()]);
    cmd.env("PCX_TEST_PAUSE", "import:writing")
        .env("PCX_TEST_PAUSE_FILE", &pause)
        // On PostgreSQL the killed importer's leases then run out soon.
        .env("PCX_JOURNAL_LEASE_MS", "1000")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut killed = Guard(cmd.spawn().expect("pcx import starts"));
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !pause.exists() {
        assert!(
            killed.wait_for(std::time::Duration::ZERO).is_none(),
            "the import ended before it had written 1024 events"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the import did not write 1024 events within {TIMEOUT:?}"
        );
        thread::sleep(std::time::Duration::from_millis(5));
    }
    killed.0.kill().expect("SIGKILL the import");
    killed.0.wait().expect("reap the import");

    // No log, not even the part written: verify and log see none (or no directory at all).
    let verify = cli(&dst, &["verify"]);
    let v = verify.answer();
    if v["ok"] == json!(false) {
        assert_eq!(v["error"]["kind"], json!("no_data_directory"), "{v}");
    } else {
        assert_eq!(
            v["events"],
            json!(0),
            "a killed import left part of its log: {v}"
        );
        assert!(cli_lines(&dst, &["log"]).is_empty());
    }
    let imported = import(&dst, &file);
    assert_eq!(imported["events"], json!(1100), "{imported}");
    assert_eq!(summary(&dst), summary(&src));
    if suite_on_postgres() {
        // The side journal the killed import left was taken over and is gone.
        assert_eq!(pg_damage::journals(&dst), vec![suite_journal_name(&dst)]);
    }
}

/// On PostgreSQL, `recover` and `salvage` (about sled's files) are refused saying why, and
/// what to do instead; the journal is untouched.
#[test]
fn recover_and_salvage_on_postgres_say_why_they_do_not_apply() {
    if !suite_on_postgres() {
        println!("skipped on sled: both work on a sled data directory (tests/integrity.rs)");
        return;
    }
    let (tmp, dir) = story("data");
    let before = summary(&dir);
    let message = cli_error(&dir, &["recover", "--accept-lost-tail"], "unsupported");
    for words in [
        "sled data directory",
        "PostgreSQL",
        "one replicated transaction",
        "pcx import",
    ] {
        assert!(message.contains(words), "`{words}` not in: {message}");
    }
    let output = tmp.path().join("salvaged.jsonl");
    let message = cli_error(
        &dir,
        &["salvage", "--output", output.to_str().unwrap()],
        "unsupported",
    );
    for words in [
        "sled data directory",
        "PostgreSQL",
        "pcx verify",
        "pcx export",
    ] {
        assert!(message.contains(words), "`{words}` not in: {message}");
    }
    assert!(!output.exists(), "salvage wrote {}", output.display());
    assert_eq!(summary(&dir), before);
}

// ---------------------------------------------------------------------------------------------
// 4. compaction

#[test]
fn compaction_keeps_the_state_shrinks_the_directory_and_every_command_still_works() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    const JUNK: usize = 20;
    const JUNK_BYTES: usize = 32 * 1024;
    let junk: Vec<Vec<u8>> = (0..JUNK).map(|i| vec![i as u8 + 1; JUNK_BYTES]).collect();

    // 1 record b1 v1, 2 entry e1 [[b1]], 3-4 save (e1 keeps b1 v1), 5..44 junk recorded and
    // taken, 45 edit b1 (v1+2), 46 record b2, 47 record b3, 48 edit b2. Compact before 46.
    let (before, last) = block_on(async {
        let ctx = open(&config(&dir, 5));
        must_write(ctx.record_artifact(artifact("b1", b"v1")).await, "b1");
        must_write(
            ctx.record_dynamo_cache_entry("e1", entry(&[&["b1"]])).await,
            "e1",
        );
        assert_eq!(must_write(ctx.save_to_dynamo_cache().await, "save"), 4);
        for (i, content) in junk.iter().enumerate() {
            let key = format!("junk{i}");
            must_write(ctx.record_artifact(artifact(&key, content)).await, &key);
            must_write(ctx.take_artifact(key.clone()).await, &key);
        }
        let edit = must_write(
            ctx.edit_artifact("b1", "append", |mut c| {
                c.extend_from_slice(b"+2");
                c
            })
            .await,
            "edit b1",
        );
        assert_eq!(edit, 45);
        let before = must_write(ctx.record_artifact(artifact("b2", b"keep")).await, "b2");
        must_write(ctx.record_artifact(artifact("b3", b"three")).await, "b3");
        let last = must_write(
            ctx.edit_artifact("b2", "append", |mut c| {
                c.push(b'!');
                c
            })
            .await,
            "edit b2",
        );
        ctx.close().await.expect("close");
        (before, last)
    });
    let anchor = before - 1;
    let (s_before, s_anchor, s_last) = (before.to_string(), anchor.to_string(), last.to_string());

    // What the commands say before compaction.
    let state = cli_value(&dir, &["state"]);
    let state_at_anchor = cli_value(&dir, &["state", "--at", &s_anchor]);
    let diff = cli_value(&dir, &["diff", "--from", &s_anchor, "--to", &s_last]);
    let log_kept = cli_lines(&dir, &["log", "--from", &s_before]);
    let kept = |lines: Vec<Value>| -> Vec<Value> {
        lines
            .into_iter()
            .filter(|l| l["seq"].as_u64().unwrap() >= before)
            .collect()
    };
    let history_b1 = kept(cli_lines(&dir, &["history", "b1"]));
    let history_b2 = kept(cli_lines(&dir, &["history", "b2"]));
    let debug_info = cli_value(&dir, &["debug-info"]);
    let verified = cli_value(&dir, &["verify"]);
    assert_eq!(verified["ok"], json!(true));

    let on_sled = !sled_only(
        "compaction's removed contents, reclaimed bytes and directory size: on PostgreSQL \
         contents are the cluster's and stay (docs/fleet.md)",
    );
    let size_before = on_sled.then(|| dir_size(&dir));
    let report = cli_value(&dir, &["compact", "--before", &s_before]);
    assert_eq!(report["ok"], json!(true), "{report}");
    assert_eq!(report["anchored_at"], json!(anchor), "{report}");
    assert_eq!(report["events_removed"], json!(anchor), "{report}");
    if let Some(size_before) = size_before {
        let size_after = dir_size(&dir);
        assert_eq!(report["events_kept"], json!(last - anchor), "{report}");
        assert_eq!(report["blobs_removed"], json!(JUNK), "{report}");
        assert_eq!(
            report["blob_bytes_removed"],
            json!(JUNK * JUNK_BYTES),
            "{report}"
        );
        let reclaimed = report["reclaimed_bytes"].as_u64().expect("reclaimed_bytes");
        assert!(reclaimed > 0, "{report}");
        assert!(
            size_before.saturating_sub(size_after) >= reclaimed,
            "the directory went from {size_before} to {size_after} bytes, less than the \
             {reclaimed} reclaimed bytes reported: {report}"
        );
        assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
    }

    // The state and the rest of the chain are intact.
    let v = cli_value(&dir, &["verify"]);
    assert_eq!(v["ok"], json!(true), "{v}");
    assert_eq!(v["anchored_at"], json!(anchor), "{v}");
    assert_eq!(v["first_seq"], json!(before), "{v}");
    assert_eq!(v["last_seq"], json!(last), "{v}");
    assert_eq!(v["events"], json!(last - anchor), "{v}");
    assert_eq!(v["state_digest"], verified["state_digest"], "{v}");
    assert_eq!(cli_value(&dir, &["state"]), state);
    assert_eq!(
        cli_value(&dir, &["state", "--at", &s_anchor]),
        state_at_anchor
    );
    assert_eq!(
        cli_value(&dir, &["diff", "--from", &s_anchor, "--to", &s_last]),
        diff
    );
    assert_eq!(cli_lines(&dir, &["log"]), log_kept);
    assert_eq!(cli_lines(&dir, &["log", "--from", &s_before]), log_kept);
    assert_eq!(cli_lines(&dir, &["history", "b1"]), history_b1);
    assert_eq!(cli_lines(&dir, &["history", "b2"]), history_b2);
    assert_eq!(cli_value(&dir, &["debug-info"]), debug_info);
    let export = cli(&dir, &["export"]);
    export.assert_success();
    let header: Value = serde_json::from_str(export.stdout.lines().next().unwrap()).unwrap();
    assert!(header["anchor_b64"].is_string(), "{header}");

    // A compacted range says so.
    for args in [
        vec!["log", "--from", "1"],
        vec!["log", "--from", &s_anchor],
        vec!["state", "--at", "1"],
        vec!["diff", "--from", "1", "--to", &s_last],
    ] {
        let message = cli_error(&dir, &args, "compacted");
        assert!(message.contains("compacted"), "{args:?}: {message}");
    }
    // Compacting the same range again: nothing to do, said clearly.
    let message = cli_error(&dir, &["compact", "--before", &s_before], "compact_failed");
    assert!(message.contains("nothing to compact"), "{message}");
    // Compacting past the log's end: said with the log's last event, not an event nobody asked for.
    let past = last + 5;
    let message = cli_error(
        &dir,
        &["compact", "--before", &past.to_string()],
        "compact_failed",
    );
    assert!(
        message.contains(&format!("cannot compact before {past}"))
            && message.contains(&format!("last event is {s_last}")),
        "{message}"
    );

    // Content: live artifacts, and the saved entry's (older) content, still load.
    assert_eq!(
        cli_value(&dir, &["get", "b1"])["artifact"]["content_b64"],
        json!(b64(b"v1+2"))
    );
    let answers = batch_ok(
        &dir,
        &[
            json!({"op":"load_cache_entry","key":"e1"}),
            record("b4", "four"),
            json!({"op":"serialize_artifact_by_key","key":"b2"}),
            op("verify"),
        ],
    );
    assert_eq!(
        answers[0]["entry"]["backends"]["b1"]["content_b64"],
        json!(b64(b"v1")),
        "the saved entry's content survives compaction"
    );
    assert_eq!(answers[0]["seq"], json!(last + 1));
    assert_eq!(answers[1]["seq"], json!(last + 2));
    assert_eq!(answers[2]["artifact"]["content_b64"], json!(b64(b"keep!")));
    assert_eq!(answers[3]["verify"]["ok"], json!(true), "{}", answers[3]);
    assert_eq!(answers[3]["verify"]["last_seq"], json!(last + 2));
    // Reopened (a new process): the writes are there.
    assert_eq!(
        cli_value(&dir, &["get", "b4"])["artifact"]["content_b64"],
        json!(b64(b"four"))
    );
    let v = cli_value(&dir, &["verify"]);
    assert_eq!(v["ok"], json!(true), "{v}");
    assert_eq!(v["anchored_at"], json!(anchor), "{v}");

    // The junk blobs are gone from the store (on sled); the live and saved ones are there.
    let kept = [&b"v1"[..], b"v1+2", b"keep", b"three", b"keep!", b"four"];
    let stored = if on_sled {
        let stored = stored_digests(&dir, TIMEOUT);
        for content in &junk {
            assert!(
                !stored.contains(&Digest::of(content)),
                "a blob only compacted events referred to is still stored"
            );
        }
        stored
    } else {
        pg_damage::stored_digests(&dir)
    };
    for content in kept {
        assert!(
            stored.contains(&Digest::of(content)),
            "blob of {:?} is missing",
            String::from_utf8_lossy(content)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 9. empty and missing data directories

#[test]
fn every_audit_command_on_a_missing_directory_says_so_and_creates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("missing");
    for args in [
        vec!["log"],
        vec!["history", "k"],
        vec!["state"],
        vec!["state", "--at", "0"],
        vec!["diff", "--from", "0", "--to", "0"],
        vec!["verify"],
        vec!["export"],
        vec!["compact", "--before", "2"],
    ] {
        let message = cli_error(&dir, &args, "no_data_directory");
        assert!(message.contains("does not exist"), "{args:?}: {message}");
        assert!(!dir.exists(), "pcx {args:?} created the data directory");
        assert!(leftovers(&dir).is_empty(), "pcx {args:?}");
        if suite_on_postgres() {
            assert!(
                message.contains(&suite_journal_name(&dir)),
                "the message names the journal: {message}"
            );
            assert!(
                !pg_damage::journal_exists(&dir),
                "pcx {args:?} created the journal"
            );
        }
    }
}

#[test]
fn every_audit_command_on_an_empty_directory_gives_an_empty_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("empty");
    if suite_on_postgres() {
        // An empty journal: opened by a writer (which made it), closed before any change.
        block_on(async { open(&config(&dir, 4)).close().await.expect("close") });
        assert!(pg_damage::journal_exists(&dir));
    } else {
        std::fs::create_dir(&dir).unwrap();
    }

    assert!(cli_lines(&dir, &["log"]).is_empty());
    assert!(cli_lines(&dir, &["log", "--from", "1", "--to", "5"]).is_empty());
    assert!(cli_lines(&dir, &["history", "k"]).is_empty());
    let state = cli_value(&dir, &["state"]);
    assert_eq!(state["seq"], json!(0), "{state}");
    assert_eq!(state["debug_info"], json!({}), "{state}");
    assert_eq!(state["artifacts"], json!([]), "{state}");
    assert_eq!(cli_value(&dir, &["state", "--at", "0"]), state);
    let diff = cli_value(&dir, &["diff", "--from", "0", "--to", "0"]);
    assert_eq!(diff["artifacts"]["added"], json!([]), "{diff}");
    let v = cli_value(&dir, &["verify"]);
    assert_eq!(v["ok"], json!(true), "{v}");
    assert_eq!(v["events"], json!(0), "{v}");
    assert_eq!(v["last_seq"], json!(0), "{v}");
    assert_eq!(v["state_digest"], state["state_digest"], "{v}");
    let export = cli_lines(&dir, &["export"]);
    assert_eq!(export.len(), 2, "a header and a closing line: {export:?}");
    assert_eq!(export[1]["events"], json!(0));
    // Nothing to compact: a clear error, not a panic, and nothing left behind.
    cli_error(&dir, &["compact", "--before", "2"], "compact_failed");
    assert!(leftovers(&dir).is_empty());
    cli_error(&dir, &["state", "--at", "1"], "beyond_end");
    // Still an empty, working data directory.
    assert_eq!(cli_value(&dir, &["verify"])["events"], json!(0));
    let answers = batch_ok(&dir, &[record("k", "v"), json!({"op":"history","key":"k"})]);
    assert_eq!(answers[0]["seq"], json!(1));
    assert_eq!(answers[1]["history"].as_array().unwrap().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// 10. no progress bar into a pipe

#[test]
fn no_progress_bar_is_drawn_when_stderr_is_a_pipe() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let requests: Vec<Value> = (0..300)
        .map(|i| record(&format!("k{}", i % 17), &format!("content {i}")))
        .collect();
    batch_ok(&dir, &requests);
    let export_file = tmp.path().join("e.jsonl");
    let export_path = export_file.to_str().unwrap();
    for args in [
        vec!["verify"],
        vec!["state", "--at", "150"],
        vec!["history", "k3"],
        vec!["export", "--output", export_path],
    ] {
        let run = cli(&dir, &args);
        run.assert_success();
        assert!(
            !run.stderr.contains('\r') && !run.stderr.contains("events ("),
            "pcx {args:?} drew a progress bar into a pipe: {:?}",
            run.stderr
        );
    }
    let v = cli_value(&dir, &["verify"]);
    assert_eq!(v["events"], json!(300));
}

/// A log of two events: a small content, then `big` (stored in a content file on sled, in
/// parts on PostgreSQL), in a fresh data directory under `tmp`. Gives the directory.
fn write_big_content_log(tmp: &TempDir, big: &[u8]) -> PathBuf {
    let dir = tmp.path().join("data");
    block_on(async {
        let ctx = open(&config(&dir, 100));
        must_write(ctx.record_artifact(artifact("a", b"alpha")).await, "1");
        must_write(ctx.record_artifact(artifact("big", big)).await, "2");
        ctx.close().await.expect("close");
    });
    dir
}

fn big_content(len: u32) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect()
}

/// On PostgreSQL the same promise for a byte of one of the content's parts: a content's read
/// checks its digest.
#[test]
fn verify_finds_a_content_file_with_an_altered_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let big = big_content(150_000);
    let dir = write_big_content_log(&tmp, &big);
    let digest = Digest::of(&big);
    if suite_on_postgres() {
        pg_damage::content_parts(&dir, &digest, |parts| {
            flip_middle_byte(parts.get_mut(&0).expect("part 0"))
        });
        assert_verify_finds(&dir, 2, &[&digest.to_hex(), "damaged", "digest differs"]);
        return;
    }
    let file = std::fs::read_dir(dir.join("content"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "pack"))
        .expect("a content file");
    let mut bytes = std::fs::read(&file).unwrap();
    flip_middle_byte(&mut bytes);
    std::fs::write(&file, bytes).unwrap();
    assert_verify_finds(&dir, 2, &[&digest.to_hex(), "checksum"]);
}

/// A large content is kept in parts on PostgreSQL (`pcx_content_parts`, 1 MiB each): one
/// lost (a partial restore, a stray DELETE) is damage `verify` names, as it names a missing
/// content. (sled keeps a large content whole, in a content file: the test above.)
#[test]
fn verify_finds_a_large_content_missing_a_part() {
    if !suite_on_postgres() {
        println!("skipped on sled: contents are kept in parts on PostgreSQL only");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let big = big_content(5 << 19);
    let dir = write_big_content_log(&tmp, &big);
    let digest = Digest::of(&big);
    assert_eq!(
        pg_damage::part_count(&dir, &digest),
        3,
        "2.5 MiB is stored in 3 parts"
    );
    pg_damage::content_parts(&dir, &digest, |parts| {
        parts.remove(&1).expect("part 1");
    });
    assert_verify_finds(&dir, 2, &[&digest.to_hex(), "damaged", "2 of 3 parts"]);
    // The last part too: the content is then short of its length as well.
    pg_damage::content_parts(&dir, &digest, |parts| {
        parts.remove(&2).expect("part 2");
    });
    assert_verify_finds(&dir, 2, &[&digest.to_hex(), "damaged", "1 of 3 parts"]);
}

/// Regression: `state`, `history` and `diff` asked with a `context` (over the socket or
/// batch) answered for the default context without a word, and the CLI had no way to ask of
/// another. torch's changes all live in named contexts (`torch@HOST:PID:MS`), so an auditor
/// saw an empty or another context's history as if it were the one asked about. Now they
/// answer for the request's context and namespace (`--context`, `--namespace` in the CLI),
/// and say which; `log` and `verify` still read every context.
#[test]
fn audit_questions_asked_of_a_named_context_answer_for_it_not_the_default() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let in_c = |mut request: Value| {
        request["context"] = json!("c");
        request["namespace"] = json!("n");
        request
    };
    let answers = batch(
        dir,
        &[
            common::protocol::record("a", "default's"),
            in_c(common::protocol::record("a", "c's")),
            in_c(record_entry("e", entry_with_codes(&[&["a"]]))),
            in_c(common::protocol::save()),
            in_c(take("a")),
            in_c(common::protocol::record("a", "c's again")),
            in_c(op("drop_context")),
        ],
    );
    assert!(answers.iter().all(|a| a["ok"] == true), "{answers:#?}");
    let ask = |request: Value| -> Value {
        let answer = batch(dir, &[request]).remove(0);
        assert_eq!(answer["ok"], true, "{answer}");
        answer
    };
    // The artifact as context c held it after event 2, by the protocol and by the CLI.
    let at = ask(in_c(json!({"op":"state","at":2,"key":"a"})));
    assert_eq!(at["state"]["artifact"]["content_b64"], b64("c's"), "{at}");
    let cli_at = cli_value(dir, &["state", "--at", "2", "--key", "a", "--context", "c"]);
    assert_eq!(cli_at["artifact"]["content_b64"], b64("c's"), "{cli_at}");
    // The default context's is its own.
    let default_at = cli_value(dir, &["state", "--at", "2", "--key", "a"]);
    assert_eq!(default_at["artifact"]["content_b64"], b64("default's"));
    // After the save (a stitch, 4, then the save, 5): c's entry and backend, n's entry.
    let saved = ask(in_c(json!({"op":"state","at":5})))["state"].clone();
    assert_eq!(saved["context"], "c", "{saved}");
    assert_eq!(saved["artifacts"][0]["key"], "a", "{saved}");
    assert_eq!(saved["dynamo_cache"], json!(["e"]), "{saved}");
    assert_eq!(saved["debug_info"]["backends"], json!(["a"]), "{saved}");
    let default_state = cli_value(dir, &["state", "--at", "5"]);
    assert_eq!(default_state["dynamo_cache"], json!([]), "{default_state}");
    // c's history of `a`: recorded, stitched into e, saved in it, taken, recorded again,
    // dropped with the context.
    let history = ask(in_c(json!({"op":"history","key":"a"})));
    let seqs: Vec<u64> = history["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [2, 4, 5, 6, 7, 8], "{history}");
    let cli_history = cli_lines(dir, &["history", "a", "--context", "c"]);
    assert_eq!(cli_history.len(), 6, "{cli_history:#?}");
    let default_history = cli_lines(dir, &["history", "a"]);
    assert_eq!(default_history.len(), 1, "{default_history:#?}");
    assert_eq!(default_history[0]["seq"], 1);
    // What changed in c and n between 1 and 5: `a` and `e` added, `e` saved.
    let diff = ask(in_c(json!({"op":"diff","from":1,"to":5})))["diff"].clone();
    assert_eq!(diff["artifacts"]["added"][0]["key"], "a", "{diff}");
    assert_eq!(diff["entries"]["added"], json!(["e"]), "{diff}");
    assert_eq!(diff["dynamo_cache"]["added"], json!(["e"]), "{diff}");
    let cli_diff = cli_value(
        dir,
        &[
            "diff",
            "--from",
            "1",
            "--to",
            "5",
            "--context",
            "c",
            "--namespace",
            "n",
        ],
    );
    assert_eq!(
        cli_diff["dynamo_cache"]["added"],
        json!(["e"]),
        "{cli_diff}"
    );
    let default_diff = cli_value(dir, &["diff", "--from", "1", "--to", "5"]);
    assert_eq!(
        default_diff["artifacts"]["added"],
        json!([]),
        "{default_diff}"
    );
    // Dropping c cleared what it held: `a`, recorded again.
    let dropped = ask(in_c(json!({"op":"diff","from":7,"to":8})))["diff"].clone();
    assert_eq!(dropped["artifacts"]["cleared"], json!(["a"]), "{dropped}");
    assert_eq!(dropped["clears"], json!([8]), "{dropped}");
}

#[test]
fn a_compaction_keeps_the_content_of_named_contexts_and_namespaces_and_an_export_carries_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let in_c = |mut request: Value| {
        request["context"] = json!("c");
        request["namespace"] = json!("n");
        request
    };
    let answers = batch(
        &dir,
        &[
            in_c(common::protocol::record("a", "c's a")),
            in_c(common::protocol::record("b", "c's b, saved in n")),
            in_c(record_entry("e", entry_with_codes(&[&["b"]]))),
            in_c(common::protocol::save()),
            // From here on only namespace n's saved entry refers to b's content.
            in_c(take("b")),
            common::protocol::record("d", "default's"),
        ],
    );
    assert!(answers.iter().all(|a| a["ok"] == true), "{answers:#?}");
    let last = answers.last().unwrap()["seq"].as_u64().unwrap();
    let compacted = cli_value(&dir, &["compact", "--before", &last.to_string()]);
    // (PostgreSQL's compaction removes no content, and says nothing of it.)
    assert_eq!(
        compacted["blobs_removed"].as_u64().unwrap_or(0),
        0,
        "{compacted}"
    );
    let content_of_a = |dir: &Path| {
        cli_value(dir, &["state", "--key", "a", "--context", "c"])["artifact"]["content_b64"]
            .clone()
    };
    let loaded_b = |dir: &Path| {
        let mut load = op("load_cache_entry");
        load["key"] = json!("e");
        load["context"] = json!("elsewhere");
        load["namespace"] = json!("n");
        let answer = batch(dir, &[load]).remove(0);
        assert_eq!(answer["ok"], true, "{answer}");
        answer["entry"]["backends"]["b"]["content_b64"].clone()
    };
    assert_eq!(content_of_a(&dir), b64("c's a"));
    assert_eq!(loaded_b(&dir), b64("c's b, saved in n"));
    let verified = cli_value(&dir, &["verify"]);
    assert_eq!(verified["ok"], true, "{verified}");
    // The anchor's content is checked too: a, b and the default's d.
    assert_eq!(verified["blobs_checked"], 3, "{verified}");
    // An export of the compacted log carries it, and its import serves it.
    let file = tmp.path().join("export.jsonl");
    export(&dir, &file, "inline");
    let copy = tmp.path().join("copy");
    assert_eq!(import(&copy, &file)["ok"], true);
    assert_eq!(content_of_a(&copy), b64("c's a"));
    assert_eq!(loaded_b(&copy), b64("c's b, saved in n"));
}

#[test]
fn state_of_an_artifact_whose_content_is_missing_or_altered_is_refused_not_answered_null_or_wrong()
{
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    write_damage_log(&dir);
    let (echo, delta) = (Digest::of(b"echo"), Digest::of(b"delta"));
    damage_log_contents(&dir, |c| {
        assert!(c.remove(&echo).is_some(), "the echo blob exists");
        c.insert(delta, b"DELTA".to_vec());
    });
    for (key, at, digest, what) in [("d", "5", delta, "digest"), ("e", "7", echo, "missing")] {
        let run = cli(&dir, &["state", "--at", at, "--key", key]);
        assert!(
            !run.status.success(),
            "state --key {key} answered damaged content: {}",
            run.stdout
        );
        let error = run.answer();
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&digest.to_hex()) && message.contains(what) && message.contains(key),
            "{error}"
        );
        // The protocol's `state` says the same.
        let asked = batch(
            &dir,
            &[json!({"op":"state","at":at.parse::<u64>().unwrap(),"key":key})],
        );
        assert_eq!(asked[0]["ok"], false, "{}", asked[0]);
    }
    // The state without content still answers: digests only.
    assert_eq!(cli_value(&dir, &["state", "--at", "7"])["seq"], 7);
}

#[test]
fn an_export_of_a_log_missing_a_content_fails_naming_it_not_a_backup_that_cannot_be_imported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    write_damage_log(&dir);
    let echo = Digest::of(b"echo");
    damage_log_contents(&dir, |c| {
        assert!(c.remove(&echo).is_some(), "the echo blob exists");
    });
    let file = tmp.path().join("backup.jsonl");
    let run = cli(&dir, &["export", "--output", file.to_str().unwrap()]);
    assert!(
        !run.status.success(),
        "an export without the content of event 7 was written as a backup: {}",
        run.stdout
    );
    let error = run.answer();
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&echo.to_hex()) && message.contains("event 7"),
        "{error}"
    );
    assert!(!file.exists(), "no file is left behind");
    // A digest export carries no content, so it is written as before.
    let digests = tmp.path().join("digests.jsonl");
    export(&dir, &digests, "digest");
}

#[test]
fn an_import_of_two_exports_concatenated_or_of_lines_after_the_closing_one_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (first, second) = (tmp.path().join("first"), tmp.path().join("second"));
    batch_ok(&first, &[record("a", "first's")]);
    batch_ok(
        &second,
        &[record("b", "second's"), record("c", "second's too")],
    );
    let (one, two) = (tmp.path().join("one.jsonl"), tmp.path().join("two.jsonl"));
    export(&first, &one, "inline");
    export(&second, &two, "inline");
    let one_text = std::fs::read_to_string(&one).unwrap();
    let both = tmp.path().join("both.jsonl");
    std::fs::write(
        &both,
        format!("{one_text}{}", std::fs::read_to_string(&two).unwrap()),
    )
    .unwrap();
    let trailing = tmp.path().join("trailing.jsonl");
    std::fs::write(&trailing, format!("{one_text}{{\"seq\":2}}\n")).unwrap();
    for (file, words, into) in [
        (&both, "another export", "into-both"),
        (&trailing, "after its closing line", "into-trailing"),
    ] {
        let target = tmp.path().join(into);
        let error = import_refused(&target, file);
        assert!(error.contains(words), "{error}");
        // Nothing of it was imported: the directory still takes an import.
        assert_eq!(import(&target, &one)["events"], 1);
    }
    // Blank lines after it are no content.
    let blank = tmp.path().join("blank.jsonl");
    std::fs::write(&blank, format!("{one_text}\n\n")).unwrap();
    assert_eq!(import(&tmp.path().join("into-blank"), &blank)["events"], 1);
}

#[test]
fn state_at_a_snapshot_swapped_in_from_another_log_is_refused_not_answered() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    write_damage_log(&dir);
    // Another log's snapshot at the same sequence number: its own hash holds, its head is
    // that log's event 12, its state that log's.
    damage_log_snapshots(&dir, |s| {
        let mut snap = decode_snapshot(s.get(&12).expect("a snapshot at 12")).unwrap();
        let (_, first) = snap.state.artifacts.shift_remove_index(0).unwrap();
        snap.state
            .artifacts
            .insert("from_another_log".into(), first);
        let other = encode_snapshot_of(12, Digest::of(b"another log's event 12"), &snap.state, 0);
        s.insert(12, other.unwrap());
    });
    for args in [
        &["state", "--at", "12"][..],
        &["state"],
        &["state", "--at", "12", "--key", "from_another_log"],
    ] {
        let error = cli_error(&dir, args, "corrupt_log");
        assert!(error.contains("snapshot 12"), "pcx {args:?}: {error}");
    }
    // `diff` replays from the state at 9 and so answers what the log holds.
    let diff = cli_value(&dir, &["diff", "--from", "9", "--to", "12"]);
    assert_eq!(
        diff["artifacts"]["added"].as_array().unwrap().len(),
        2,
        "{diff}"
    );
    // The query itself, as the protocol's `state` asks it.
    let journal = open_suite_reader(&dir);
    let refused = state_at(journal.as_ref(), 12, &mut |_| {});
    assert!(
        matches!(refused, Err(AuditError::Replay(_))),
        "{:?}",
        refused.map(|(s, _)| s.artifacts.keys().cloned().collect::<Vec<_>>())
    );
}

#[test]
fn a_compaction_over_a_forged_snapshot_is_refused_not_laundered_into_an_anchor_that_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    write_damage_log(&dir);
    // A well-formed snapshot at 9 (its own hash holds, it names event 9's real hash) of a
    // state the events do not give, and the later snapshot that would contradict what
    // follows from it removed.
    damage_log_snapshots(&dir, |s| {
        let mut snap = decode_snapshot(s.get(&9).expect("a snapshot at 9")).unwrap();
        let forged = pcx::core::model::ArtifactRef {
            kind: "eager".into(),
            digest: Digest::of(b"golf"),
            size: 4,
        };
        snap.state.artifacts.insert("forged".into(), forged);
        s.insert(9, encode_snapshot_of(9, snap.head, &snap.state, 0).unwrap());
        s.remove(&12);
    });
    assert_verify_finds(&dir, 9, &["snapshot at 9", "does not match"]);
    let error = cli_error(&dir, &["compact", "--before", "10"], "compact_failed");
    assert!(error.contains("snapshot at 9"), "{error}");
    // Nothing was compacted: the events that refute the snapshot are still there.
    let report = assert_verify_finds(&dir, 9, &["snapshot at 9", "does not match"]);
    assert!(report.get("anchored_at").is_none(), "{report}");
    assert_eq!(cli_lines(&dir, &["log", "--to", "1"]).len(), 1);
}

#[test]
fn a_state_request_giving_both_at_and_at_time_is_refused_not_answered_for_one_of_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    batch_ok(&dir, &[record("a", "1"), record("b", "2")]);
    let answers = batch(
        &dir,
        &[json!({"op":"state","at":1,"at_time":"2100-01-01T00:00:00Z"})],
    );
    assert_eq!(answers[0]["ok"], false, "{}", answers[0]);
    assert_eq!(
        answers[0]["error"]["kind"], "invalid_request",
        "{}",
        answers[0]
    );
    let message = answers[0]["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("at_time"), "{message}");
    // The command line refuses the same (its arguments conflict).
    let run = cli(
        &dir,
        &["state", "--at", "1", "--at-time", "2100-01-01T00:00:00Z"],
    );
    assert!(!run.status.success(), "{}", run.stdout);
}

/// An anchor stands for the events a compaction removed, so it is at event 1 or later: one at
/// event 0, with the empty log's hash, continues into the real event 1 and so passed every
/// check of the chain, while its state (anything at all) was served as what the events give.
#[test]
fn a_forged_anchor_at_event_0_under_the_real_events_is_refused_not_served_with_the_pinned_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    batch_ok(&src, &[record("a", "alpha"), record("b", "bravo")]);
    let source = cli_value(&src, &["verify"]);
    let file = tmp.path().join("export.jsonl");
    export(&src, &file, "inline");
    let text = std::fs::read_to_string(&file).unwrap();
    // The anchor's state: an artifact no event recorded (its content one the log carries).
    let mut injected = pcx::core::state::State::default();
    injected.artifacts.insert(
        "injected".into(),
        pcx::core::model::ArtifactRef {
            kind: "eager".into(),
            digest: Digest::of(b"alpha"),
            size: 5,
        },
    );
    let anchor = encode_snapshot_of(0, pcx::store::record::GENESIS, &injected, 0).unwrap();
    let mut state = injected.clone();
    let mut forged = String::new();
    for l in text.lines() {
        let mut v: Value = serde_json::from_str(l).unwrap();
        if v.get("pcx_export").is_some() {
            v["anchor_b64"] = json!(b64(&anchor));
        } else if v.get("record_b64").is_some() {
            state.apply(decode_event(&unb64(&v["record_b64"])).unwrap().0.event);
        } else if v["end"] == true {
            v["state_digest"] = json!(state.digest().to_hex());
        }
        forged.push_str(&format!("{v}\n"));
    }
    let forged_file = tmp.path().join("forged.jsonl");
    std::fs::write(&forged_file, forged).unwrap();
    let dst = tmp.path().join("dst");
    let why = import_refused(&dst, &forged_file);
    assert!(why.contains("event 0"), "{why}");
    // Put into the store itself (the snapshots that would contradict it removed), it is
    // refused by `verify` and every reader.
    damage_log_anchor(&src, &anchor);
    damage_log_snapshots(&src, |s| s.clear());
    let report = assert_verify_finds(&src, 0, &["anchor", "event 0"]);
    assert_ne!(report["ok"], source["ok"]);
    for args in [&["state"][..], &["log"], &["export"]] {
        let run = cli(&src, args);
        assert!(
            !run.status.success(),
            "pcx {args:?} answered: {}",
            run.stdout
        );
    }
}

#[test]
fn a_compaction_over_a_damaged_record_behind_a_snapshot_is_refused_not_removed_unseen() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    write_damage_log(&dir);
    // Event 3 damaged; the snapshot at 9 lets a reader start past it.
    damage_log_records(&dir, |r| flip_middle_byte(r.get_mut(&3).expect("event 3")));
    assert_verify_finds(&dir, 3, &["event 3"]);
    let error = cli_error(&dir, &["compact", "--before", "10"], "compact_failed");
    assert!(error.contains("event 3"), "{error}");
    // The damaged record is still there to be found.
    assert_verify_finds(&dir, 3, &["event 3"]);
}

#[test]
fn a_log_asked_up_to_a_compacted_event_says_compacted_not_an_empty_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    batch_ok(
        &dir,
        &[record("a", "1"), record("b", "2"), record("c", "3")],
    );
    cli_value(&dir, &["compact", "--before", "3"]);
    let error = cli_error(&dir, &["log", "--to", "2"], "compacted");
    assert!(error.contains("2"), "{error}");
    let asked = batch(&dir, &[json!({"op":"log","to":1})]);
    assert_eq!(asked[0]["error"]["kind"], "compacted", "{}", asked[0]);
    // A range reaching past the anchor shows what is kept.
    assert_eq!(cli_lines(&dir, &["log", "--to", "3"]).len(), 1);
    assert_eq!(cli_lines(&dir, &["log"]).len(), 1);
}

#[test]
fn a_log_filtered_by_a_misspelt_event_name_is_refused_not_answered_empty() {
    let (_tmp, dir) = story("data");
    let error = cli_error(&dir, &["log", "--event", "ArtifactEdit"], "invalid_request");
    assert!(
        error.contains("ArtifactEdit") && error.contains("ArtifactEdited"),
        "{error}"
    );
    let asked = batch(&dir, &[json!({"op":"log","event":"artifactrecorded"})]);
    assert_eq!(asked[0]["error"]["kind"], "invalid_request", "{}", asked[0]);
    // Every name the log shows is one it can be filtered by.
    for line in cli_lines(&dir, &["log"]) {
        let name = line["event"].as_str().unwrap();
        let matching = cli_lines(&dir, &["log", "--event", name]);
        assert!(matching.iter().any(|l| l["seq"] == line["seq"]), "{name}");
    }
}
