//! Durability: what survives a failed commit, damage to the log, a lost snapshot or blob, and
//! a second writer; and that group commit pays one sync for many writes. (SIGKILLs: tests/crash.rs.)
//!
//! Every wait has a timeout. Damage is made by opening the sled database directly (tree
//! `events` keyed by big-endian sequence numbers, `snapshots`, `blobs` keyed by digest).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pcx::actor::{Ack, RecordArtifact};
use pcx::context::{settings, ContextOpenError};
use pcx::core::event::Event;
use pcx::core::model::Digest;
use pcx::core::state::State;
use pcx::store::error::OpenError;
use pcx::store::journal::{Commit, FaultyJournal, Journal};
use pcx::store::record::{decode_event, seq_key, DecodeError};
use pcx::store::replay::{fold, recover, Head, Recovered, ReplayError};
use pcx::store::sled_journal::SledJournal;
use pcx::{Config, Context, ContextError};
use serde_json::{json, Value};

mod common;
use common::library::*;
use common::protocol::cli;

/// How long sled may stay locked after this process closed a data directory: sled's IO
/// threads hold the locked file for a moment after a close. (`SledJournal::open` has the same
/// patience built in.)
const SLED_PATIENCE: Duration = Duration::from_secs(2);

/// Opening must fail; gives the error.
fn open_error(config: &Config) -> ContextOpenError {
    match Context::open(config) {
        Ok(_) => panic!(
            "opening {} succeeded; expected an error",
            config.data_dir.display()
        ),
        Err(e) => e,
    }
}

/// A context over a fault-injecting journal; drop the returned journal handle after closing
/// the context, so the directory is released.
fn open_faulty(config: &Config) -> (Context, Arc<FaultyJournal<SledJournal>>) {
    let journal = Arc::new(FaultyJournal::new(open_journal(&config.data_dir)));
    let ctx = Context::with_journal(journal.clone(), settings(config))
        .unwrap_or_else(|e| panic!("opening {}: {e}", config.data_dir.display()));
    (ctx, journal)
}

async fn record(ctx: &Context, key: &str, content: &[u8]) -> Ack<()> {
    ctx.record_artifact(artifact(key, content))
        .await
        .unwrap_or_else(|e| panic!("record {key}: {e}"))
}

async fn backends(ctx: &Context) -> Vec<String> {
    ctx.dump_debug_info()
        .await
        .expect("dump_debug_info")
        .value
        .backends
}

async fn content(ctx: &Context, key: &str) -> Option<Vec<u8>> {
    ctx.serialize_artifact_by_key(key)
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e}"))
        .value
        .map(|a| a.content)
}

async fn digest(ctx: &Context) -> Digest {
    ctx.state_digest().await.expect("state digest").value
}

/// Records `n` artifacts `k1..kn` one after the other (one event each, seq 1..n), then closes.
fn write_records(config: &Config, n: u64) -> Digest {
    block_on(async {
        let ctx = open(config);
        for i in 1..=n {
            record(&ctx, &format!("k{i}"), format!("content {i}").as_bytes()).await;
        }
        let d = digest(&ctx).await;
        ctx.close().await.expect("close");
        d
    })
}

/// Replays the directory's log twice: from the newest snapshot and from the first event
/// ignoring snapshots. Both must succeed and agree; gives the first.
fn replays_cleanly(dir: &Path) -> Recovered {
    let journal = open_journal(dir);
    let recovered = recover(&journal).unwrap_or_else(|e| panic!("the log does not replay: {e}"));
    let (full, head, replayed) = fold(&journal, State::default(), Head::EMPTY, None)
        .unwrap_or_else(|e| panic!("the log does not replay from its first event: {e}"));
    assert_eq!(
        head, recovered.head,
        "full replay and snapshot replay end at different records"
    );
    assert_eq!(replayed, head.seq);
    assert_eq!(
        full.digest(),
        recovered.state.digest(),
        "full replay and snapshot replay disagree"
    );
    recovered
}

/// The CLI refuses the directory cleanly (exit 1, not a panic's 101) and says `needle`.
fn assert_cli_refuses(dir: &Path, needle: &str) {
    let out = cli(dir, &["debug-info"]);
    let stderr = &out.stderr;
    assert_eq!(
        out.status.code(),
        Some(1),
        "pcx debug-info should fail cleanly; stderr: {stderr}"
    );
    assert!(
        stderr.contains(needle),
        "stderr should say `{needle}`: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "pcx panicked: {stderr}");
}

// ---------------------------------------------------------------------------------------
// Failed commits and group commit
// ---------------------------------------------------------------------------------------

#[test]
fn a_failed_commit_answers_storage_and_changes_nothing_then_writes_work_again() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 10_000);
    block_on(async {
        let (ctx, journal) = open_faulty(&config);
        let first = record(&ctx, "a", b"one").await;
        ctx.record_dynamo_cache_entry("e1", entry(&[&["a"]]))
            .await
            .expect("record e1");
        let info_before = ctx.dump_debug_info().await.unwrap().value;
        let digest_before = digest(&ctx).await;

        journal.fail_commits(true);
        let err = ctx
            .record_artifact(artifact("b", b"two"))
            .await
            .expect_err("record while commits fail");
        assert_eq!(err.kind(), "storage", "{err}");
        let edit = ctx.edit_artifact("a", "append", |mut c| {
            c.extend_from_slice(b"!");
            c
        });
        assert_eq!(
            edit.await.expect_err("edit while commits fail").kind(),
            "storage"
        );
        assert_eq!(
            ctx.take_artifact("a")
                .await
                .expect_err("take while commits fail")
                .kind(),
            "storage"
        );
        assert_eq!(
            ctx.clear()
                .await
                .expect_err("clear while commits fail")
                .kind(),
            "storage"
        );
        // A failed save names the entry, in PyTorch's words.
        let save = ctx
            .save_to_dynamo_cache()
            .await
            .expect_err("save while commits fail");
        assert_eq!(save.kind(), "save_failed");
        assert!(
            save.to_string().starts_with("Failed to save package to e1"),
            "{save}"
        );

        assert_eq!(
            ctx.dump_debug_info().await.unwrap().value,
            info_before,
            "a failed change was applied"
        );
        assert_eq!(digest(&ctx).await, digest_before);
        assert_eq!(content(&ctx, "a").await.as_deref(), Some(&b"one"[..]));
        assert_eq!(content(&ctx, "b").await, None);
        let miss = ctx
            .load_cache_entry("e1", None)
            .await
            .expect_err("the failed save saved nothing");
        assert_eq!(miss.kind(), "package_not_found");

        journal.fail_commits(false);
        let third = record(&ctx, "c", b"three").await;
        // The log continues where the last durable event left it: no gap for the failures.
        assert_eq!(third.seq, first.seq.map(|s| s + 2));
        assert_eq!(backends(&ctx).await, vec!["a", "c"]);
        ctx.close().await.expect("close");
        drop(journal);

        let ctx = open(&config);
        assert_eq!(ctx.dump_debug_info().await.unwrap().value.dynamo.len(), 1);
        assert_eq!(backends(&ctx).await, vec!["a", "c"]);
        assert_eq!(content(&ctx, "a").await.as_deref(), Some(&b"one"[..]));
        assert_eq!(content(&ctx, "c").await.as_deref(), Some(&b"three"[..]));
        let miss = ctx
            .load_cache_entry("e1", None)
            .await
            .expect_err("nothing was saved");
        assert_eq!(miss.kind(), "package_not_found");
        ctx.close().await.expect("close");
    });
    replays_cleanly(dir.path());
}

/// sled keeps its first write error until the database is reopened: after such a failure
/// the context reopens the journal and replays on the next request, so it works again in the
/// same process, with nothing answered lost and nothing failed applied.
#[test]
fn a_storage_failure_that_sticks_is_healed_by_reopening_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 10_000);
    block_on(async {
        let (ctx, journal) = open_faulty(&config);
        ctx.record_dynamo_cache_entry("e1", entry(&[&["a"]]))
            .await
            .expect("record e1");
        record(&ctx, "a", b"one").await;
        ctx.save_to_dynamo_cache().await.expect("save");
        journal.poison();
        let err = ctx
            .load_cache_entry("e1", None)
            .await
            .expect_err("a load on a poisoned journal fails");
        assert_eq!(err.kind(), "content_unavailable", "{err}");
        assert_eq!(journal.resets(), 1, "the failed read reopened the journal");
        // A load decided, whose event then fails to become durable, is not a hit.
        journal.fail_commits(true);
        let err = ctx
            .load_cache_entry("e1", None)
            .await
            .expect_err("a load whose commit fails");
        assert_eq!(err.kind(), "storage", "{err}");
        journal.fail_commits(false);
        let hits = ctx.load_counters().await.expect("counters").value.hit;
        assert_eq!(hits, 0, "a load that did not become durable is not a hit");
        let first = record(&ctx, "a", b"one").await;
        journal.poison();
        let err = ctx
            .record_artifact(artifact("b", b"two"))
            .await
            .expect_err("a write on a poisoned journal fails");
        assert_eq!(err.kind(), "storage", "{err}");
        assert_eq!(journal.resets(), 2);
        // The next request finds the journal whole again, and the failed write not applied.
        assert_eq!(content(&ctx, "a").await.as_deref(), Some(&b"one"[..]));
        assert_eq!(content(&ctx, "b").await, None);
        let third = record(&ctx, "c", b"three").await;
        assert_eq!(
            third.seq,
            first.seq.map(|s| s + 1),
            "no gap for the failed write"
        );
        assert_eq!(backends(&ctx).await, vec!["a", "c"]);
        ctx.load_cache_entry("e1", None)
            .await
            .expect("load after healing");
        assert_eq!(ctx.load_counters().await.expect("counters").value.hit, 1);
        ctx.close().await.expect("close");
        drop(journal);

        let ctx = open(&config);
        assert_eq!(backends(&ctx).await, vec!["a", "c"]);
        assert_eq!(content(&ctx, "c").await.as_deref(), Some(&b"three"[..]));
        ctx.close().await.expect("close");
    });
    replays_cleanly(dir.path());
}

#[test]
fn a_data_directory_removed_under_a_running_context_refuses_writes_instead_of_losing_them() {
    // `rm -rf` of a live data directory: sled writes on through its open file, every flush
    // succeeds, and each write was answered and gone.
    let parent = tempfile::tempdir().unwrap();
    let data = parent.path().join("data");
    let config = config(&data, 10_000);
    block_on(async {
        let ctx = open(&config);
        record(&ctx, "a", b"one").await;
        std::fs::remove_dir_all(&data).expect("removing the data directory");
        let err = ctx
            .record_artifact(artifact("b", b"two"))
            .await
            .expect_err("a write into a removed data directory is refused");
        assert_eq!(err.kind(), "storage", "{err}");
        assert!(
            err.to_string().contains("deleted while in use"),
            "the error says what happened: {err}"
        );
        // Not healed into an empty log while the directory is gone, however often it tries.
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(300));
            let err = ctx
                .record_artifact(artifact("c", b"three"))
                .await
                .expect_err("still refused");
            assert_eq!(err.kind(), "storage", "{err}");
        }
        assert!(!data.exists(), "the removed data directory was made again");
        let _ = ctx.close().await;
    });
}

#[test]
fn many_records_in_flight_share_a_few_group_commits() {
    const N: usize = 500;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 10_000);
    let keys: Vec<String> = (0..N).map(|i| format!("g{i:03}")).collect();
    block_on(async {
        let (ctx, journal) = open_faulty(&config);
        backends(&ctx).await; // the actor is running
        let before = journal.commits();
        // Sent at once, as `pcx batch` does: each send is queued before any answer is awaited.
        let sends: Vec<_> = keys
            .iter()
            .map(|k| {
                ctx.addr().clone().send(RecordArtifact {
                    artifact: artifact(k, k.as_bytes()),
                })
            })
            .collect();
        let answers = futures::future::join_all(sends).await;
        for (i, answer) in answers.into_iter().enumerate() {
            let ack = answer
                .expect("the actor is alive")
                .unwrap_or_else(|e| panic!("record {i}: {e}"));
            assert_eq!(
                ack.seq,
                Some(i as u64 + 1),
                "records are numbered in send order"
            );
        }
        let commits = journal.commits() - before;
        assert!(commits >= 1);
        assert!(
            commits <= 20,
            "{N} in-flight records took {commits} commits (flush + fdatasync each)"
        );
        assert_eq!(backends(&ctx).await, keys);
        ctx.close().await.expect("close");
        drop(journal);

        let ctx = open(&config);
        assert_eq!(backends(&ctx).await, keys);
        assert_eq!(content(&ctx, "g499").await.as_deref(), Some(&b"g499"[..]));
        ctx.close().await.expect("close");
    });
}

/// The files sled wrote under `blobs/` in `dir`.
fn sled_files(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir.join("blobs")) {
        Ok(listing) => listing
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("listing blobs/: {e}"),
    }
}

/// W1's shape: groups of about a thousand records with 1 KiB of content each. Every part of
/// a group that goes into sled must stay inside sled's log, synced with it in the one
/// `fdatasync` of `db`: sled writes a node too large for its log segment to a file of its
/// own under `blobs/`, which the journal then syncs on its own, one device round trip each.
/// With pages and index values of 64–96 KiB, every W1 group wrote two such files.
#[test]
fn groups_of_a_compile_session_stay_inside_sleds_log() {
    if suite_on_postgres() {
        return eprintln!("skipped on PostgreSQL: about sled's files");
    }
    const N: usize = 8_192;
    let dir = tempfile::tempdir().unwrap();
    // No snapshot: a snapshot of the whole state is one value, and big ones are files.
    let config = config(dir.path(), 1_000_000);
    let keys: Vec<String> = (0..N)
        .map(|i| format!("__compiled_fn_{i}_{:016x}", i as u64 * 0x9e37_79b9))
        .collect();
    let files = block_on(async {
        let ctx = open(&config);
        let sends: Vec<_> = keys
            .iter()
            .map(|k| {
                let mut content = k.as_bytes().to_vec();
                content.resize(1024, b'.');
                ctx.addr().clone().send(RecordArtifact {
                    artifact: artifact(k, &content),
                })
            })
            .collect();
        for (i, answer) in futures::future::join_all(sends)
            .await
            .into_iter()
            .enumerate()
        {
            answer
                .expect("the actor is alive")
                .unwrap_or_else(|e| panic!("record {i}: {e}"));
        }
        // Looked at before closing: closing writes a snapshot of the whole state, one value.
        let files = sled_files(dir.path());
        ctx.close().await.expect("close");
        files
    });
    assert!(
        files.is_empty(),
        "{N} records of 1 KiB made sled write {} files of their own: {files:?}",
        files.len()
    );
    block_on(async {
        let ctx = open(&config);
        assert_eq!(backends(&ctx).await.len(), N);
        ctx.close().await.expect("close");
    });
}

/// Bytes in the data directory's content files.
fn content_file_bytes(dir: &Path) -> u64 {
    content_files(dir)
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum()
}

/// The committer writes a sealed group's contents ahead of it while the group before it
/// commits (`Journal::prewrite`). Those bytes count once the group that stores them commits,
/// and only then: written ahead, they are not stored; committed, they are not written again
/// and read back after a reopen; written ahead for a group that never commits, they stay
/// unknown.
#[test]
fn contents_written_ahead_of_their_group_are_stored_once_and_only_by_it() {
    if suite_on_postgres() {
        return eprintln!("skipped on PostgreSQL: about sled's content files");
    }
    let dir = tempfile::tempdir().unwrap();
    let contents = |salt: u8| -> Vec<(Digest, Arc<Vec<u8>>)> {
        (0..100u8)
            .map(|i| {
                let c: Vec<u8> = (0..1024u32).map(|n| (n as u8) ^ i ^ salt).collect();
                (Digest::of(&c), Arc::new(c))
            })
            .collect()
    };
    let (stored, abandoned) = (contents(0), contents(0x80));
    let group_bytes = 100 * 1024;

    let j = open_journal(dir.path());
    j.prewrite(&stored);
    assert_eq!(content_file_bytes(dir.path()), group_bytes, "written ahead");
    assert_eq!(
        j.blob(&stored[0].0).unwrap(),
        None,
        "not stored before its group"
    );
    j.commit(&Commit {
        blobs: stored.clone(),
        records: vec![(1, b"the group".to_vec())],
        ..Commit::default()
    })
    .expect("commit");
    assert_eq!(
        content_file_bytes(dir.path()),
        group_bytes,
        "its group did not write them again"
    );
    j.prewrite(&abandoned);
    assert_eq!(content_file_bytes(dir.path()), 2 * group_bytes);
    drop(j);
    std::thread::sleep(SLED_PATIENCE / 4);

    let j = open_journal(dir.path());
    for (d, c) in &stored {
        assert_eq!(j.blob(d).unwrap().as_deref(), Some(c.as_slice()));
    }
    for (d, _) in &abandoned {
        assert_eq!(j.blob(d).unwrap(), None, "no group stored {}", d.to_hex());
    }
    let records: Vec<(u64, Vec<u8>)> = j.records(1).map(|r| r.unwrap()).collect();
    assert_eq!(records, vec![(1, b"the group".to_vec())]);
}

/// The child of the next test: set by the parent to the data directory to write.
const WRITE_AHEAD_CHILD: &str = "PCX_TEST_WRITE_AHEAD_CHILD";

/// W1's records in the child: 3 full groups and some.
const WRITE_AHEAD_RECORDS: usize = 3_500;

fn write_ahead_key(i: usize) -> String {
    format!("k{i:05}")
}

fn write_ahead_content(i: usize) -> Vec<u8> {
    (0..1024u32)
        .map(|n| (n as usize * 31 + i * 7919) as u8)
        .chain((i as u32).to_be_bytes())
        .collect()
}

/// Run by the next test in a process of its own (ignored otherwise): sends W1's records
/// through a pipeline to a context whose commits take 300 ms, so that the groups behind the
/// first fill (1,024 events) and the contents of the one behind the committing one are
/// written ahead. Once the answers of the second group have come, the process aborts:
/// the third group's contents are written ahead and its commit has not happened.
#[test]
#[ignore = "run by a_process_killed_after_writing_contents_ahead_keeps_every_answered_record"]
fn write_ahead_child() {
    let Ok(dir) = std::env::var(WRITE_AHEAD_CHILD) else {
        return;
    };
    let config = config(Path::new(&dir), 1_000_000);
    let journal = Arc::new(FaultyJournal::new(open_journal(&config.data_dir)));
    journal.act_remote(300);
    block_on(async {
        let ctx = Context::with_journal(journal.clone(), settings(&config)).expect("open");
        let mut pipeline = ctx.pipeline::<()>();
        for i in 0..WRITE_AHEAD_RECORDS {
            pipeline.send(RecordArtifact {
                artifact: artifact(&write_ahead_key(i), &write_ahead_content(i)),
            });
        }
        let mut answered = 0;
        let mut answers = Vec::new();
        while answered <= 1_024 {
            answers.clear();
            answered += pipeline.answers(&mut answers, usize::MAX).await;
            for (tag, answer) in &answers {
                if let Err(e) = answer {
                    panic!("record {tag}: {e}");
                }
            }
        }
        std::fs::write(Path::new(&dir).join("answered"), answered.to_string()).unwrap();
        // The third group's contents are being written ahead while its commit waits 300 ms:
        // abort once they are in the content file.
        let answered_bytes = answered as u64 * write_ahead_content(0).len() as u64;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while content_file_bytes(Path::new(&dir)) <= answered_bytes
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::process::abort();
    });
}

/// A SIGABRT while a full group's contents have been written ahead of it and its own commit
/// has not happened: the log is sound, holds every answered record with its content, and the
/// contents written ahead are bytes nothing refers to.
#[test]
fn a_process_killed_after_writing_contents_ahead_keeps_every_answered_record() {
    if suite_on_postgres() {
        return eprintln!("skipped on PostgreSQL: about sled's content files");
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "write_ahead_child", "--ignored", "--nocapture"])
        .env(WRITE_AHEAD_CHILD, &dir)
        .output()
        .expect("the child runs");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        child.status.signal(),
        Some(6),
        "the child aborts once its second group is answered: {}\n{}",
        child.status,
        String::from_utf8_lossy(&child.stderr)
    );
    let answered: usize = std::fs::read_to_string(dir.join("answered"))
        .unwrap()
        .parse()
        .unwrap();

    let verify = cli(&dir, &["verify"]).answer();
    assert_eq!(verify["ok"], json!(true), "{verify}");
    let logged = verify["last_seq"].as_u64().unwrap() as usize;
    assert!(
        (answered..WRITE_AHEAD_RECORDS).contains(&logged),
        "{answered} answered, {logged} logged"
    );
    let referenced = logged as u64 * write_ahead_content(0).len() as u64;
    assert!(
        content_file_bytes(&dir) > referenced,
        "the third group's contents were written ahead before the abort: {} bytes in content \
         files, {referenced} referred to",
        content_file_bytes(&dir)
    );
    let config = config(&dir, 1_000_000);
    block_on(async {
        let ctx = open(&config);
        assert_eq!(backends(&ctx).await.len(), logged);
        for i in (0..logged).step_by(97).chain([logged - 1]) {
            assert_eq!(
                content(&ctx, &write_ahead_key(i)).await,
                Some(write_ahead_content(i)),
                "record {i}"
            );
        }
        ctx.close().await.expect("close");
    });
}

// ---------------------------------------------------------------------------------------
// One writer per data directory
// ---------------------------------------------------------------------------------------

#[test]
fn a_second_writer_on_an_open_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 10_000);
    block_on(async {
        let ctx = open(&config);
        record(&ctx, "a", b"one").await;

        let err = match Context::open(&config) {
            Ok(_) => panic!("a second context opened the same directory"),
            Err(e) => e,
        };
        assert!(
            matches!(err, ContextOpenError::Open(OpenError::Locked { .. })),
            "{err:?}"
        );
        assert!(err.to_string().contains("in use"), "{err}");
        // Another process: a clean error, not a panic and not a corrupt log.
        let out = cli(dir.path(), &["record-artifact", "x", "--text", "intruder"]);
        assert_eq!(out.status.code(), Some(1), "stderr: {}", out.stderr);
        assert!(out.stderr.contains("in use"), "{}", out.stderr);

        // The first writer is unharmed.
        record(&ctx, "b", b"two").await;
        assert_eq!(backends(&ctx).await, vec!["a", "b"]);
        ctx.close().await.expect("close");
    });
    let recovered = replays_cleanly(dir.path());
    assert_eq!(recovered.head.seq, 2);
}

/// Found following the README's torch tour: `pcx log` on the directory the embedded server
/// holds answered only "in use", with nothing to say that the server answers the same
/// queries. The refusal now says how to ask it (`pcx client`), for the audit commands and the
/// others alike.
#[test]
fn a_command_refused_because_a_server_holds_the_directory_says_to_ask_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 10_000);
    block_on(async {
        let ctx = open(&config);
        record(&ctx, "a", b"one").await;
        let log = cli(dir.path(), &["log"]);
        assert_eq!(log.status.code(), Some(1), "{}", log.stdout);
        let batch = cli(dir.path(), &["get", "a"]);
        assert_eq!(batch.status.code(), Some(1), "{}", batch.stderr);
        for said in [&log.stdout, &batch.stderr] {
            assert!(
                said.contains("in use") && said.contains("client"),
                "names the way through the server: {said}"
            );
        }
        ctx.close().await.expect("close");
    });
}

// ---------------------------------------------------------------------------------------
// Damaged records
// ---------------------------------------------------------------------------------------

/// Writes 8 records, damages the log, and gives the error of reopening it. The snapshot the
/// clean close left at record 8 goes too, so that opening replays every record.
fn damaged_log(
    change: impl FnOnce(&mut BTreeMap<u64, Vec<u8>>),
) -> (tempfile::TempDir, ContextOpenError) {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 10_000);
    write_records(&config, 8);
    damage_records(dir.path(), SLED_PATIENCE, change);
    damage(dir.path(), "snapshots", SLED_PATIENCE, |t| {
        t.clear().unwrap()
    });
    let err = block_on(async { open_error(&config) });
    (dir, err)
}

#[test]
fn a_flipped_byte_in_a_record_is_reported_with_its_seq() {
    let (dir, err) = damaged_log(|r| flip_middle_byte(r.get_mut(&5).unwrap()));
    assert!(
        matches!(
            err,
            ContextOpenError::Replay(ReplayError::Corrupt {
                seq: 5,
                source: DecodeError::HashMismatch
            })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("event 5 is damaged"), "{err}");
    assert_cli_refuses(dir.path(), "event 5 is damaged");
}

#[test]
fn a_deleted_record_is_reported_as_a_gap_naming_the_missing_seq() {
    let (dir, err) = damaged_log(|r| {
        r.remove(&5).expect("record 5 existed");
    });
    assert!(
        matches!(
            err,
            ContextOpenError::Replay(ReplayError::Gap {
                expected: 5,
                found: 6
            })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("expected event 5"), "{err}");
    assert_cli_refuses(dir.path(), "expected event 5");
}

#[test]
fn swapped_records_are_reported_naming_both() {
    let (dir, err) = damaged_log(|r| {
        let four = r[&4].clone();
        let five = r[&5].clone();
        r.insert(4, five);
        r.insert(5, four);
    });
    assert!(
        matches!(
            err,
            ContextOpenError::Replay(ReplayError::MisplacedRecord { seq: 5, key: 4 })
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("event 5 is stored under the key of event 4"),
        "{err}"
    );
    assert_cli_refuses(dir.path(), "event 5 is stored under the key of event 4");
}

#[test]
fn a_cut_last_record_is_reported_as_truncated() {
    let (dir, err) = damaged_log(|r| {
        r.get_mut(&8).unwrap().truncate(10);
    });
    assert!(
        matches!(
            err,
            ContextOpenError::Replay(ReplayError::Corrupt {
                seq: 8,
                source: DecodeError::Truncated { len: 10 }
            })
        ),
        "{err:?}"
    );
    assert_cli_refuses(dir.path(), "event 8 is damaged: record is truncated");
}

// ---------------------------------------------------------------------------------------
// Snapshots
// ---------------------------------------------------------------------------------------

#[test]
fn a_corrupt_newest_snapshot_falls_back_to_the_older_one_and_then_to_the_events() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 3);
    let before = write_records(&config, 10);
    {
        let journal = open_journal(dir.path());
        // Once 3 events and as many events as the state has items have passed: at 3 (then
        // 3 items), not again by 10 (3 + 10 items); and at the last event, 10, from the
        // clean close. The two newest are kept.
        assert_eq!(journal.snapshot_seqs().unwrap(), vec![10, 3]);
    }

    damage(dir.path(), "snapshots", SLED_PATIENCE, |t| {
        flip_a_byte(t, seq_key(10))
    });
    let recovered = replays_cleanly(dir.path());
    assert_eq!(
        recovered.snapshot,
        Some(3),
        "the damaged snapshot 10 is skipped"
    );
    assert_eq!(recovered.replayed, 7);
    assert_eq!(recovered.state.digest(), before);
    block_on(async {
        let ctx = open(&config);
        assert_eq!(digest(&ctx).await, before);
        assert_eq!(
            content(&ctx, "k10").await.as_deref(),
            Some(&b"content 10"[..])
        );
        ctx.close().await.expect("close");
    });

    // The context's clean close wrote snapshot 10 afresh: damage both.
    damage(dir.path(), "snapshots", SLED_PATIENCE, |t| {
        assert_eq!(t.len(), 2);
        flip_a_byte(t, seq_key(10));
        flip_a_byte(t, seq_key(3));
    });
    let recovered = replays_cleanly(dir.path());
    assert_eq!(
        recovered.snapshot, None,
        "with no usable snapshot, every event is replayed"
    );
    assert_eq!(recovered.replayed, 10);
    assert_eq!(recovered.state.digest(), before);
    block_on(async {
        let ctx = open(&config);
        assert_eq!(digest(&ctx).await, before);
        ctx.close().await.expect("close");
    });
}

// ---------------------------------------------------------------------------------------
// Missing content
// ---------------------------------------------------------------------------------------

/// The `failed` keys of every `Stitched` event in the log.
fn stitch_failures_in_log(dir: &Path) -> Vec<Vec<String>> {
    let journal = open_journal(dir);
    let mut out = Vec::new();
    for item in journal.records(1) {
        let (_, bytes) = item.unwrap();
        let (envelope, _) = decode_event(&bytes).unwrap();
        if let Event::Stitched { failed, .. } = envelope.event {
            out.push(failed.into_iter().map(|f| f.key).collect());
        }
    }
    out
}

#[test]
fn a_missing_blob_fails_only_the_entries_that_reference_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 10_000);
    block_on(async {
        let ctx = open(&config);
        record(&ctx, "b1", b"blob one").await;
        record(&ctx, "b2", b"blob two").await;
        ctx.record_dynamo_cache_entry("e1", entry(&[&["b1"]]))
            .await
            .unwrap();
        ctx.record_dynamo_cache_entry("e2", entry(&[&["b2"]]))
            .await
            .unwrap();
        ctx.close().await.expect("close");
    });
    damage_contents(dir.path(), SLED_PATIENCE, |c| {
        c.remove(&Digest::of(b"blob one"))
            .expect("the blob existed");
    });

    block_on(async {
        let ctx = open(&config);
        let stitched = ctx
            .create_cache_entries()
            .await
            .expect("the stitch itself succeeds")
            .value;
        assert_eq!(stitched.entries.keys().collect::<Vec<_>>(), vec!["e2"]);
        assert_eq!(stitched.entries["e2"].backends["b2"].content, b"blob two");
        let err = ctx
            .serialize_artifact_by_key("b1")
            .await
            .expect_err("b1's content is gone");
        assert_eq!(err.kind(), "content_unavailable");
        assert!(err.to_string().contains("b1"), "{err}");

        ctx.save_to_dynamo_cache()
            .await
            .expect("save the entries that stitch");
        assert_eq!(
            ctx.load_cache_entry("e1", None)
                .await
                .expect_err("e1 was not saved")
                .kind(),
            "package_not_found"
        );
        let loaded = ctx
            .load_cache_entry("e2", None)
            .await
            .expect("e2 was saved")
            .value;
        assert_eq!(loaded.entry.backends["b2"].content, b"blob two");
        ctx.close().await.expect("close");
    });
    // The create_cache_entries and save stitches both logged e1 as failed.
    assert_eq!(
        stitch_failures_in_log(dir.path()),
        vec![vec!["e1".to_string()], vec!["e1".to_string()]]
    );

    // Through the CLI, as JSON logs: the exception is traced and the other entry produced.
    let out = cli(dir.path(), &["--log-format", "json", "stitch"]);
    let stderr = &out.stderr;
    out.assert_success();
    let answer = out.answer();
    assert_eq!(answer["ok"], json!(true));
    assert!(
        answer["entries"].get("e1").is_none() && answer["entries"].get("e2").is_some(),
        "{answer}"
    );
    let exceptions: Vec<Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["fields"]["artifact"] == json!("dynamo_cache_exception"))
        .map(|l| serde_json::from_str(l["fields"]["payload"].as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(exceptions.len(), 1, "stderr: {stderr}");
    assert_eq!(exceptions[0]["key"], json!("e1"));
    assert!(
        exceptions[0]["error"].as_str().unwrap().contains("b1"),
        "{}",
        exceptions[0]
    );
}

#[test]
fn unreadable_blobs_fail_the_entries_and_reads_but_not_the_context() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 10_000);
    block_on(async {
        let (ctx, journal) = open_faulty(&config);
        record(&ctx, "b1", b"one").await;
        ctx.record_dynamo_cache_entry("e1", entry(&[&["b1"]]))
            .await
            .unwrap();

        journal.fail_blob_reads(true);
        let stitched = ctx
            .create_cache_entries()
            .await
            .expect("the stitch itself succeeds")
            .value;
        assert!(stitched.entries.is_empty(), "e1's content cannot be read");
        let err: ContextError = ctx
            .serialize_artifact_by_key("b1")
            .await
            .expect_err("unreadable");
        assert_eq!(err.kind(), "content_unavailable");
        ctx.save_to_dynamo_cache()
            .await
            .expect("save what stitches (nothing)");
        assert_eq!(
            ctx.load_cache_entry("e1", None)
                .await
                .expect_err("not saved")
                .kind(),
            "package_not_found"
        );

        journal.fail_blob_reads(false);
        let stitched = ctx.create_cache_entries().await.expect("stitch").value;
        assert_eq!(stitched.entries["e1"].backends["b1"].content, b"one");
        ctx.close().await.expect("close");
        drop(journal);
    });
    replays_cleanly(dir.path());
}

// ---------------------------------------------------------------------------------------
// Content files and the first layout
// ---------------------------------------------------------------------------------------

/// `n` bytes that do not repeat in any short period.
fn big_content(n: usize, salt: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_add(salt).wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

#[test]
fn large_content_goes_to_a_content_file_and_reads_back_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 10_000);
    let big = big_content(300_000, 1);
    block_on(async {
        let ctx = open(&config);
        record(&ctx, "big", &big).await;
        record(&ctx, "small", b"small").await;
        ctx.close().await.expect("close");
    });
    let files = content_files(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    let len = std::fs::metadata(&files[0]).unwrap().len();
    assert_eq!(
        len, 300_000,
        "the big content, and only it, is in the content file"
    );
    block_on(async {
        let ctx = open(&config);
        assert_eq!(content(&ctx, "big").await.as_deref(), Some(&big[..]));
        assert_eq!(content(&ctx, "small").await.as_deref(), Some(&b"small"[..]));
        ctx.close().await.expect("close");
    });
    replays_cleanly(dir.path());
}

#[test]
fn a_damaged_content_file_gives_an_error_naming_the_content_never_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 10_000);
    let big = big_content(200_000, 2);
    block_on(async {
        let ctx = open(&config);
        record(&ctx, "big", &big).await;
        record(&ctx, "small", b"small").await;
        ctx.close().await.expect("close");
    });
    let file = content_files(dir.path()).remove(0);
    let mut bytes = std::fs::read(&file).unwrap();
    flip_middle_byte(&mut bytes);
    std::fs::write(&file, &bytes).unwrap();
    let hex = Digest::of(&big).to_hex();
    block_on(async {
        let ctx = open(&config);
        let err = ctx
            .serialize_artifact_by_key("big")
            .await
            .expect_err("damaged content is not served");
        assert_eq!(err.kind(), "content_unavailable", "{err}");
        let text = err.to_string();
        assert!(text.contains(&hex) && text.contains("checksum"), "{text}");
        assert_eq!(content(&ctx, "small").await.as_deref(), Some(&b"small"[..]));
        ctx.close().await.expect("close");
    });
    // Cut short: the read itself fails, and says where.
    std::fs::write(&file, &bytes[..1000]).unwrap();
    block_on(async {
        let ctx = open(&config);
        let err = ctx
            .serialize_artifact_by_key("big")
            .await
            .expect_err("a cut content file is not served");
        let text = err.to_string();
        assert!(
            text.contains(&hex) && text.contains("cannot read bytes 0..200000"),
            "{text}"
        );
        ctx.close().await.expect("close");
    });
}

/// Keys `first` and `again` both read back as `want`.
async fn both_read_back(ctx: &Context, want: &[u8], label: &str) {
    for key in ["first", "again"] {
        assert_eq!(
            content(ctx, key).await.as_deref(),
            Some(want),
            "{label}: {key}"
        );
    }
}

/// Contents are stored once by digest, so a record of a content already stored used to be
/// answered without writing anything: when the stored copy had been damaged, the new record
/// was acknowledged and every read of it failed, though the caller had sent the bytes. The
/// stored copy is now compared with what is recorded, and written again when it differs or
/// cannot be read, in a content file and in a sled pack alike.
#[test]
fn a_content_recorded_again_over_a_damaged_copy_is_written_again_and_reads_back() {
    let big = big_content(200_000, 7);
    let small = b"a small content kept in a sled pack".to_vec();
    let flip_in_file = |dir: &Path| {
        let file = content_files(dir).remove(0);
        let mut bytes = std::fs::read(&file).unwrap();
        flip_middle_byte(&mut bytes);
        std::fs::write(&file, &bytes).unwrap();
    };
    let alter_in_pack = |dir: &Path| {
        damage_contents(dir, SLED_PATIENCE, |c| {
            let stored = c
                .get_mut(&Digest::of(&small))
                .expect("the content is in a pack");
            stored[0] ^= 0xff;
        })
    };
    type Damage<'a> = &'a dyn Fn(&Path);
    // The pack's bytes altered through sled, its index (and the checksum in it) left as is.
    let flip_in_pack = |dir: &Path| {
        let db = open_sled_directly(dir, SLED_PATIENCE);
        let packs = db.open_tree("packs").unwrap();
        let (key, pack) = packs.last().unwrap().expect("a pack");
        let mut pack = pack.to_vec();
        flip_middle_byte(&mut pack);
        packs.insert(key, pack).unwrap();
        db.flush().unwrap();
    };
    let cases: [(&str, &Vec<u8>, Damage); 3] = [
        ("in a content file", &big, &flip_in_file),
        (
            "in a sled pack, its index rewritten",
            &small,
            &alter_in_pack,
        ),
        ("in a sled pack, its checksum kept", &small, &flip_in_pack),
    ];
    for (place, stored, damage) in cases {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), 10_000);
        block_on(async {
            let ctx = open(&config);
            record(&ctx, "first", stored).await;
            ctx.close().await.expect("close");
        });
        damage(dir.path());
        block_on(async {
            let ctx = open(&config);
            let err = ctx
                .serialize_artifact_by_key("first")
                .await
                .expect_err("damaged bytes are never served");
            assert_eq!(err.kind(), "content_unavailable", "{place}: {err}");
            record(&ctx, "again", stored).await;
            both_read_back(&ctx, stored, place).await;
            ctx.close().await.expect("close");
        });
        block_on(async {
            let ctx = open(&config);
            both_read_back(&ctx, stored, &format!("{place}, after reopening")).await;
            ctx.close().await.expect("close");
        });
        let verify = cli(dir.path(), &["verify"]).answer();
        assert_eq!(verify["ok"], json!(true), "{place}: {verify}");
    }
}

/// A data directory written before pages and packs (one record per key in tree `events`,
/// one content per digest in tree `blobs`) opens with its whole history, and new records
/// follow it.
#[test]
fn a_data_directory_in_the_first_layout_opens_with_its_history() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 10_000);
    let before = write_records(&config, 5);
    {
        let db = open_sled_directly(dir.path(), SLED_PATIENCE);
        let (pages, packs, index) = (
            db.open_tree("pages").unwrap(),
            db.open_tree("packs").unwrap(),
            db.open_tree("pack_index").unwrap(),
        );
        let (events, blobs) = (
            db.open_tree("events").unwrap(),
            db.open_tree("blobs").unwrap(),
        );
        for page in pages.iter() {
            let (k, v) = page.unwrap();
            let first = pcx::store::record::key_seq(&k).unwrap();
            for (seq, record) in pcx::store::pack::page_records(&v, first) {
                events.insert(seq_key(seq), record).unwrap();
            }
        }
        for entry in index.iter() {
            let (_, v) = entry.unwrap();
            for (digest, loc) in pcx::store::pack::index_entries(&v).unwrap() {
                let pack = packs.get(seq_key(loc.pack)).unwrap().unwrap();
                blobs.insert(digest.0, loc.slice(&pack).unwrap()).unwrap();
            }
        }
        for tree in [&pages, &packs, &index, &db.open_tree("snapshots").unwrap()] {
            tree.clear().unwrap();
        }
        db.flush().unwrap();
    }
    let recovered = replays_cleanly(dir.path());
    assert_eq!((recovered.head.seq, recovered.replayed), (5, 5));
    assert_eq!(recovered.state.digest(), before);
    block_on(async {
        let ctx = open(&config);
        assert_eq!(
            content(&ctx, "k3").await.as_deref(),
            Some(&b"content 3"[..])
        );
        let ack = record(&ctx, "k6", b"content 6").await;
        assert_eq!(ack.seq, Some(6));
        ctx.close().await.expect("close");
    });
    let recovered = replays_cleanly(dir.path());
    assert_eq!(recovered.head.seq, 6);
    block_on(async {
        let ctx = open(&config);
        assert_eq!(
            content(&ctx, "k1").await.as_deref(),
            Some(&b"content 1"[..])
        );
        assert_eq!(
            content(&ctx, "k6").await.as_deref(),
            Some(&b"content 6"[..])
        );
        ctx.close().await.expect("close");
    });
}

/// A damaged content index is refused at open, saying which value and what is wrong, by the
/// library and by the CLI alike (no panic).
#[test]
fn a_damaged_content_index_is_refused_naming_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 10_000);
    write_records(&config, 3);
    damage(dir.path(), "pack_index", SLED_PATIENCE, |t| {
        let (k, v) = t.first().unwrap().expect("an index value");
        t.insert(k, &v[..v.len() - 1]).unwrap();
    });
    let err = block_on(async { open_error(&config) });
    let text = err.to_string();
    assert!(
        text.contains("content index") && text.contains("not a whole number"),
        "{text}"
    );
    assert_cli_refuses(dir.path(), "content index");
}
