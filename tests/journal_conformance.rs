//! The `Journal` contract, one suite run against every backend: the sled data directory
//! always, and the PostgreSQL journal when pcx is built with `--features postgres` (then
//! `PCX_TEST_PG_URL` must name a database: `.ci/run` starts a 3-node cluster for it with
//! `scripts/pg-cluster.sh`; these tests fail, not skip, without one).
//!
//! Each case says what a user of the store relies on: a group reads back exactly, in order,
//! after a reopen; contents come back by digest, large ones too; two snapshots are kept;
//! the cache view is replaced whole; a second writer is refused while the first lives.

use std::sync::Arc;

use pcx::core::model::Digest;
use pcx::store::journal::{Commit, Journal};

/// A backend under test: opens (and reopens) one journal as its writer.
trait Backend {
    fn name(&self) -> &'static str;
    fn open(&self) -> Box<dyn Journal>;
    /// Opening a second writer while `first` is open must fail: the error's text.
    fn second_writer_refused(&self, first: &dyn Journal) -> String;
}

struct Sled(tempfile::TempDir);

impl Backend for Sled {
    fn name(&self) -> &'static str {
        "sled"
    }
    fn open(&self) -> Box<dyn Journal> {
        Box::new(
            pcx::store::sled_journal::SledJournal::open(self.0.path(), 4 << 20)
                .expect("sled opens"),
        )
    }
    fn second_writer_refused(&self, _: &dyn Journal) -> String {
        let started = std::time::Instant::now();
        let second = pcx::store::sled_journal::SledJournal::open(self.0.path(), 4 << 20);
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
        match second {
            Ok(_) => panic!("a second sled writer opened the same directory"),
            Err(e) => e.to_string(),
        }
    }
}

fn commit(records: &[(u64, &[u8])]) -> Commit {
    Commit {
        records: records.iter().map(|(s, b)| (*s, b.to_vec())).collect(),
        ..Commit::default()
    }
}

fn all(j: &dyn Journal, from: u64) -> Vec<(u64, Vec<u8>)> {
    j.records(from)
        .collect::<Result<Vec<_>, _>>()
        .expect("records read")
}

/// Groups read back exactly and in order, from any point, and after a reopen.
fn groups_read_back_in_order_after_reopen(b: &dyn Backend) {
    let j = b.open();
    assert_eq!(
        j.last_seq().unwrap(),
        None,
        "{}: a new journal is empty",
        b.name()
    );
    j.commit(&commit(&[(1, b"one"), (2, b"two")])).unwrap();
    // More than one page of rows (the PostgreSQL journal reads 1,024 at a time).
    let many: Vec<(u64, Vec<u8>)> = (3..=2100)
        .map(|s| (s, format!("r{s}").into_bytes()))
        .collect();
    j.commit(&Commit {
        records: many.clone(),
        ..Commit::default()
    })
    .unwrap();
    assert_eq!(j.last_seq().unwrap(), Some(2100), "{}", b.name());
    drop(j);
    let j = b.open();
    let read = all(j.as_ref(), 1);
    assert_eq!(read.len(), 2100, "{}", b.name());
    assert_eq!(read[0], (1, b"one".to_vec()));
    assert_eq!(read[1], (2, b"two".to_vec()));
    assert_eq!(&read[2..], &many[..], "{}", b.name());
    let tail = all(j.as_ref(), 2099);
    assert_eq!(
        tail.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![2099, 2100]
    );
    assert!(all(j.as_ref(), 2101).is_empty());
}

/// Contents come back by digest, byte for byte, small, empty and larger than a part.
fn contents_come_back_by_digest(b: &dyn Backend) {
    let j = b.open();
    let small = b"a small artifact".to_vec();
    let large: Vec<u8> = (0..(3 << 20) + 17).map(|i| (i * 7 % 251) as u8).collect();
    let empty = Vec::new();
    let blobs: Vec<(Digest, Arc<Vec<u8>>)> = [&small, &large, &empty]
        .iter()
        .map(|c| (Digest::of(c), Arc::new((*c).clone())))
        .collect();
    j.commit(&Commit {
        blobs: blobs.clone(),
        records: vec![(1, b"refers to them".to_vec())],
        ..Commit::default()
    })
    .unwrap();
    drop(j);
    let j = b.open();
    for (digest, content) in &blobs {
        assert_eq!(
            j.blob(digest).unwrap().as_deref(),
            Some(content.as_slice()),
            "{}",
            b.name()
        );
    }
    assert_eq!(
        j.blob(&Digest::of(b"never stored")).unwrap(),
        None,
        "{}",
        b.name()
    );
}

/// The newest two snapshots are kept, newest first; a snapshot reads back exactly.
fn two_snapshots_are_kept(b: &dyn Backend) {
    let j = b.open();
    for seq in 1..=3u64 {
        j.commit(&Commit {
            records: vec![(seq, vec![seq as u8])],
            snapshot: Some((seq, format!("snapshot at {seq}").into_bytes())),
            ..Commit::default()
        })
        .unwrap();
    }
    drop(j);
    let j = b.open();
    assert_eq!(j.snapshot_seqs().unwrap(), vec![3, 2], "{}", b.name());
    assert_eq!(
        j.snapshot(3).unwrap().map(|b| b.to_vec()),
        Some(b"snapshot at 3".to_vec())
    );
    assert_eq!(
        j.snapshot(1).unwrap(),
        None,
        "{}: the oldest is dropped",
        b.name()
    );
}

/// The cache view takes puts, is replaced whole by a rewrite, and lists in key order.
fn cache_view_is_replaced_whole(b: &dyn Backend) {
    let j = b.open();
    j.commit(&Commit {
        records: vec![(1, b"e".to_vec())],
        cache_puts: vec![("b".into(), b"2".to_vec()), ("a".into(), b"1".to_vec())],
        ..Commit::default()
    })
    .unwrap();
    assert_eq!(
        j.cache_view().unwrap(),
        vec![
            ("a".to_string(), b"1".to_vec()),
            ("b".to_string(), b"2".to_vec())
        ],
        "{}",
        b.name()
    );
    j.rewrite_cache_view(&[("Z".into(), b"z".to_vec()), ("c".into(), b"3".to_vec())])
        .unwrap();
    drop(j);
    let j = b.open();
    // Byte order, as sled keeps keys: "Z" (0x5a) before "c" (0x63).
    assert_eq!(
        j.cache_view().unwrap(),
        vec![
            ("Z".to_string(), b"z".to_vec()),
            ("c".to_string(), b"3".to_vec())
        ],
        "{}",
        b.name()
    );
    assert_eq!(
        j.anchor().unwrap(),
        None,
        "{}: no compaction, no anchor",
        b.name()
    );
}

/// While one writer has the journal open, a second is refused, saying why.
fn a_second_writer_is_refused(b: &dyn Backend) {
    let j = b.open();
    j.commit(&commit(&[(1, b"first")])).unwrap();
    let why = b.second_writer_refused(j.as_ref());
    assert!(
        why.contains("in use") || why.contains("served by"),
        "{}: the refusal says why: {why}",
        b.name()
    );
    // The first writer goes on undisturbed.
    j.commit(&commit(&[(2, b"second")])).unwrap();
    assert_eq!(all(j.as_ref(), 1).len(), 2);
}

fn suite(make: &dyn Fn() -> Box<dyn Backend>) {
    groups_read_back_in_order_after_reopen(make().as_ref());
    contents_come_back_by_digest(make().as_ref());
    two_snapshots_are_kept(make().as_ref());
    cache_view_is_replaced_whole(make().as_ref());
    a_second_writer_is_refused(make().as_ref());
}

#[test]
fn the_sled_journal_keeps_the_contract() {
    suite(&|| Box::new(Sled(tempfile::tempdir().expect("a temporary directory"))));
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use pcx::store::error::StoreError;
    use pcx::store::pg_journal::{PgJournal, PgSettings};
    use std::time::Duration;

    /// The database the tests use: `PCX_TEST_PG_URL` (`.ci/run` sets it).
    pub fn url() -> String {
        std::env::var("PCX_TEST_PG_URL").unwrap_or_else(|_| {
            panic!(
                "PCX_TEST_PG_URL is not set: the postgres feature's tests need a database \
                 (start one with `scripts/pg-cluster.sh start` and export its `url`)"
            )
        })
    }

    /// A journal name no earlier run used.
    pub fn fresh_name(what: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("test-{what}-{}-{nanos}", std::process::id())
    }

    pub fn settings(name: &str, lease_ms: u64) -> PgSettings {
        PgSettings {
            url: url(),
            journal: name.to_string(),
            holder: format!("test pid {}", std::process::id()),
            address: String::new(),
            lease: Duration::from_millis(lease_ms),
            wait: Duration::ZERO,
        }
    }

    struct Pg(String);

    impl Backend for Pg {
        fn name(&self) -> &'static str {
            "postgres"
        }
        fn open(&self) -> Box<dyn Journal> {
            Box::new(
                PgJournal::open(settings(&self.0, 10_000)).expect("the postgres journal opens"),
            )
        }
        fn second_writer_refused(&self, _: &dyn Journal) -> String {
            match PgJournal::open(settings(&self.0, 10_000)) {
                Ok(_) => panic!("a second writer took a live journal's lease"),
                Err(e) => e.to_string(),
            }
        }
    }

    #[test]
    fn the_postgres_journal_keeps_the_contract() {
        suite(&|| Box::new(Pg(fresh_name("contract"))));
    }

    /// Regression: contents are shared by every journal of the cluster, and two writers that
    /// stored the same new contents in different orders deadlocked in PostgreSQL, which broke
    /// the tie by failing one writer's commit (seen in W6: clients answered `storage failed:
    /// deadlock detected`, and the lease of the writer left waiting ran out). Both commit now.
    #[test]
    fn two_writers_storing_the_same_contents_in_opposite_orders_both_commit() {
        use std::sync::{Arc, Barrier};
        const ROUNDS: u64 = 15;
        let run = pcx::core::model::Digest::of(fresh_name("contents").as_bytes()).to_hex();
        let barrier = Arc::new(Barrier::new(2));
        let writers: Vec<_> = [false, true]
            .into_iter()
            .map(|reversed| {
                let barrier = barrier.clone();
                let run = run.clone();
                std::thread::spawn(move || {
                    let j = PgJournal::open(settings(&fresh_name("order"), 60_000))
                        .expect("the journal opens");
                    for round in 1..=ROUNDS {
                        // 64 contents new to the cluster, the same for both writers.
                        let mut blobs: Vec<(Digest, Arc<Vec<u8>>)> = (0..64)
                            .map(|i| {
                                let c = format!("{run} round {round} content {i}").into_bytes();
                                (Digest::of(&c), Arc::new(c))
                            })
                            .collect();
                        if reversed {
                            blobs.reverse();
                        }
                        barrier.wait();
                        j.commit(&Commit {
                            blobs,
                            records: vec![(round, format!("round {round}").into_bytes())],
                            ..Commit::default()
                        })
                        .unwrap_or_else(|e| panic!("round {round} (reversed: {reversed}): {e}"));
                    }
                    j.last_seq().expect("the head reads")
                })
            })
            .collect();
        for w in writers {
            assert_eq!(w.join().expect("a writer panicked"), Some(ROUNDS));
        }
    }

    /// Moves a journal's lease into the past, as if its holder had stopped renewing it
    /// (paused, or cut off from the database) for longer than the lease.
    fn expire_lease(name: &str) {
        let url = url();
        let name = name.to_string();
        // The postgres client runs its own runtime: keep it off any test runtime's thread.
        std::thread::spawn(move || {
            let mut c = ::postgres::Client::connect(&url, ::postgres::NoTls).expect("connect");
            c.execute(
                "UPDATE pcx_heads SET lease_until = clock_timestamp() - interval '1 second' WHERE journal = $1",
                &[&name],
            )
            .expect("expire the lease");
        })
        .join()
        .expect("the admin thread");
    }

    #[test]
    fn a_writer_whose_lease_was_taken_over_is_fenced_and_writes_nothing() {
        let name = fresh_name("fenced");
        let a = PgJournal::open(settings(&name, 60_000)).expect("A opens");
        a.commit(&commit(&[(1, b"from A")])).unwrap();
        expire_lease(&name);
        let b = PgJournal::open(settings(&name, 60_000)).expect("B takes over an expired lease");
        assert!(b.epoch() > a.epoch(), "a takeover is a new epoch");
        // A still believes it holds the journal: its next group is refused by the database.
        match a.commit(&commit(&[(2, b"A after losing the lease")])) {
            Err(StoreError::Fenced { why, .. }) => {
                assert!(why.contains("took it over"), "{why}")
            }
            other => panic!("A's write after a takeover must be fenced, got {other:?}"),
        }
        // And so is every later one, without asking the database again.
        assert!(matches!(
            a.commit(&commit(&[(2, b"again")])),
            Err(StoreError::Fenced { .. })
        ));
        b.commit(&commit(&[(2, b"from B")])).unwrap();
        let records = all(&b, 1);
        assert_eq!(
            records,
            vec![(1, b"from A".to_vec()), (2, b"from B".to_vec())]
        );
    }

    /// A stale holder (its lease taken over) writes nothing by any path, each checked by the
    /// database itself (every stale holder here tries one write only, so none is refused by
    /// what it already knew): a group of records, a group of a snapshot, of the cache view or
    /// of the shared dynamo cache only, the cache view rewritten, an anchor, a compaction, a
    /// wipe, an import's takeover; and its release does not end the new holder's lease.
    #[test]
    fn a_writer_whose_lease_was_taken_over_writes_nothing_by_any_path() {
        use pcx::store::journal::SharedCacheOp;
        type Write = Box<dyn Fn(&PgJournal) -> Result<(), StoreError>>;
        let name = fresh_name("stale");
        let namespace = fresh_name("stale-ns");
        let put = |who: &str| SharedCacheOp::Put {
            namespace: namespace.clone(),
            key: "k".into(),
            entry: format!("{who} entry").into_bytes(),
            saved_by: format!("{who}/ctx"),
            saver_seq: 1,
            saver_hash: pcx::core::model::Digest([0; 32]),
        };
        let b = PgJournal::open(settings(&name, 60_000)).expect("B opens");
        b.commit(&Commit {
            records: vec![(1, b"from B".to_vec())],
            snapshot: Some((1, b"B's snapshot".to_vec())),
            cache_puts: vec![("k".into(), b"B's view".to_vec())],
            shared_cache: vec![put("B")],
            ..Commit::default()
        })
        .unwrap();
        drop(b);
        let (ns, stale_put) = (namespace.clone(), put("A"));
        let writes: Vec<(&str, Write)> = vec![
            (
                "a group of records",
                Box::new(|a| a.commit(&commit(&[(2, b"A")]))),
            ),
            (
                "a snapshot",
                Box::new(|a| {
                    a.commit(&Commit {
                        snapshot: Some((1, b"A's snapshot".to_vec())),
                        ..Commit::default()
                    })
                }),
            ),
            (
                "the cache view in a group",
                Box::new(|a| {
                    a.commit(&Commit {
                        cache_puts: vec![("k".into(), b"A's view".to_vec())],
                        ..Commit::default()
                    })
                }),
            ),
            (
                "the shared dynamo cache",
                Box::new(move |a| {
                    a.commit(&Commit {
                        shared_cache: vec![
                            stale_put.clone(),
                            SharedCacheOp::Clear {
                                namespace: ns.clone(),
                            },
                        ],
                        ..Commit::default()
                    })
                }),
            ),
            (
                "the cache view rewritten",
                Box::new(|a| a.rewrite_cache_view(&[("k".into(), b"A's view".to_vec())])),
            ),
            ("an anchor", Box::new(|a| a.set_anchor(b"A's anchor"))),
            (
                "a compaction",
                Box::new(|a| a.compact_before(1, b"A's anchor").map(|_| ())),
            ),
            ("a wipe", Box::new(|a| a.wipe(false))),
            ("a removal", Box::new(|a| a.wipe(true))),
            (
                "an import's takeover",
                Box::new(|a| a.adopt_log_of("nowhere").map(|_| ())),
            ),
        ];
        let lease_of = |name: &str| -> String {
            let (url, name) = (url(), name.to_string());
            std::thread::spawn(move || {
                let mut c = ::postgres::Client::connect(&url, ::postgres::NoTls).expect("connect");
                c.query_one(
                    "SELECT lease_until::text FROM pcx_heads WHERE journal = $1",
                    &[&name],
                )
                .expect("the lease reads")
                .get(0)
            })
            .join()
            .expect("the admin thread")
        };
        for (what, write) in &writes {
            let a = PgJournal::open(settings(&name, 60_000)).expect("A opens");
            expire_lease(&name);
            let c = PgJournal::open(settings(&name, 60_000)).expect("C takes over");
            match write(&a) {
                Err(StoreError::Fenced { why, .. }) => {
                    assert!(why.contains("took it over"), "{what}: {why}")
                }
                other => panic!("{what} by a stale holder must be fenced, got {other:?}"),
            }
            let lease = lease_of(&name);
            drop(a);
            assert_eq!(
                lease_of(&name),
                lease,
                "A's release ended C's lease ({what})"
            );
            drop(c);
        }
        let reader = PgJournal::open_reader(settings(&name, 60_000)).expect("a reader");
        assert_eq!(all(&reader, 1), vec![(1, b"from B".to_vec())]);
        assert_eq!(reader.committed_end().unwrap(), Some(1));
        assert_eq!(reader.snapshot_seqs().unwrap(), vec![1]);
        assert_eq!(
            reader.snapshot(1).unwrap().map(|s| s.to_vec()),
            Some(b"B's snapshot".to_vec())
        );
        assert_eq!(
            reader.cache_view().unwrap(),
            vec![("k".to_string(), b"B's view".to_vec())]
        );
        assert_eq!(reader.anchor().unwrap(), None);
        assert_eq!(
            reader
                .shared_cache_entry(&namespace, "k")
                .unwrap()
                .map(|e| (e.entry, e.saved_by)),
            Some((b"B entry".to_vec(), "B/ctx".to_string()))
        );
    }

    /// Regression (two writers of one epoch): a journal's head row deleted under its live
    /// holder A (an operator clearing what looked like a stuck lease) is made again by the next
    /// writer B, at the last record. Epochs started at 1 again, so B got A's epoch and A's next
    /// group passed the head's compare-and-set: A went on writing while B, named as the holder,
    /// was fenced. A new head row over records already there now takes an epoch no earlier
    /// holder had.
    #[test]
    fn a_holder_whose_head_row_was_deleted_is_fenced_by_the_next_holder() {
        let name = fresh_name("row-deleted");
        let a = PgJournal::open(settings(&name, 60_000)).expect("A opens");
        a.commit(&commit(&[(1, b"A 1"), (2, b"A 2")])).unwrap();
        let (url, n) = (url(), name.clone());
        std::thread::spawn(move || {
            let mut c = ::postgres::Client::connect(&url, ::postgres::NoTls).expect("connect");
            c.execute("DELETE FROM pcx_heads WHERE journal = $1", &[&n])
                .expect("delete the head row");
        })
        .join()
        .expect("the admin thread");
        let b = PgJournal::open(settings(&name, 60_000)).expect("B opens");
        assert_ne!(b.epoch(), a.epoch(), "B's epoch is not A's");
        assert_eq!(
            b.committed_end().unwrap(),
            Some(2),
            "B's head row starts at the last record"
        );
        match a.commit(&commit(&[(3, b"A 3")])) {
            Err(StoreError::Fenced { .. }) => {}
            other => panic!("A, whose head row was deleted, must be fenced, got {other:?}"),
        }
        b.commit(&commit(&[(3, b"B 3")]))
            .expect("B, the holder, writes");
        assert_eq!(
            all(&b, 1),
            vec![
                (1, b"A 1".to_vec()),
                (2, b"A 2".to_vec()),
                (3, b"B 3".to_vec())
            ]
        );
    }

    /// Regression (two writers of one epoch): a database restored from a backup taken before
    /// the live holder A took the journal over gives the head row the epoch before A's; the
    /// next holder B's takeover was that epoch plus one, A's own, and once B's head reached
    /// where A had left its own (as here, one group each), A's next group (its renewals
    /// paused meanwhile) passed the compare-and-set and was written into B's log. A takeover
    /// now takes an epoch past the database clock's milliseconds too, so no epoch repeats
    /// after a restore.
    #[test]
    fn a_holder_is_fenced_after_the_database_is_restored_from_a_backup_older_than_its_takeover() {
        let name = fresh_name("restored");
        let before = PgJournal::open(settings(&name, 60_000)).expect("W opens");
        before.commit(&commit(&[(1, b"W 1")])).unwrap();
        // The backup: the journal as W left it.
        let (db, n) = (url(), name.clone());
        let backup: (i64, i64) = std::thread::spawn(move || {
            let mut c = ::postgres::Client::connect(&db, ::postgres::NoTls).expect("connect");
            let row = c
                .query_one(
                    "SELECT epoch, head FROM pcx_heads WHERE journal = $1",
                    &[&n],
                )
                .expect("the head row");
            (row.get(0), row.get(1))
        })
        .join()
        .expect("the admin thread");
        drop(before);
        let a = PgJournal::open(settings(&name, 60_000)).expect("A takes over");
        a.commit(&commit(&[(2, b"A 2")])).unwrap();
        // The database is restored from the backup under A (its renewals paused meanwhile).
        let (db, n) = (url(), name.clone());
        std::thread::spawn(move || {
            let mut c = ::postgres::Client::connect(&db, ::postgres::NoTls).expect("connect");
            c.execute(
                "UPDATE pcx_heads SET epoch = $2, head = $3, \
                 lease_until = clock_timestamp() - interval '1 second' WHERE journal = $1",
                &[&n, &backup.0, &backup.1],
            )
            .expect("restore the head row");
            c.execute(
                "DELETE FROM pcx_records WHERE journal = $1 AND seq > $2",
                &[&n, &backup.1],
            )
            .expect("restore the records");
        })
        .join()
        .expect("the admin thread");
        let b = PgJournal::open(settings(&name, 60_000)).expect("B takes over");
        b.commit(&commit(&[(2, b"B 2")])).expect("B writes");
        match a.commit(&commit(&[(3, b"A 3")])) {
            Err(StoreError::Fenced { .. }) => {}
            other => panic!("A must be fenced after the restore, got {other:?}"),
        }
        assert_eq!(
            all(&b, 1),
            vec![(1, b"W 1".to_vec()), (2, b"B 2".to_vec())],
            "only B writes the journal"
        );
        assert_ne!(b.epoch(), a.epoch(), "B's epoch is not A's");
    }

    /// Regression (a journal no one could take over): a holder refused a write because the
    /// journal's head was not where it left it (the database restored under it from a backup
    /// taken during its own tenure, with the lease still running) knew it was fenced, but its
    /// lease thread went on renewing the lease (its epoch still matched): while that process
    /// ran, no standby could take the journal over. The renewals now stop once the lease is
    /// known lost.
    #[test]
    fn a_holder_fenced_by_a_restored_head_stops_renewing_so_a_standby_takes_over() {
        let name = fresh_name("restored-own-tenure");
        let lease = 1_500;
        let a = PgJournal::open(settings(&name, lease)).expect("A opens");
        a.commit(&commit(&[(1, b"A 1")])).unwrap();
        a.commit(&commit(&[(2, b"A 2")])).unwrap();
        // Restored from a backup taken after A's first group: same epoch, live lease.
        let (db, n) = (url(), name.clone());
        std::thread::spawn(move || {
            let mut c = ::postgres::Client::connect(&db, ::postgres::NoTls).expect("connect");
            c.execute("UPDATE pcx_heads SET head = 1 WHERE journal = $1", &[&n])
                .expect("restore the head row");
            c.execute(
                "DELETE FROM pcx_records WHERE journal = $1 AND seq > 1",
                &[&n],
            )
            .expect("restore the records");
        })
        .join()
        .expect("the admin thread");
        match a.commit(&commit(&[(3, b"A 3")])) {
            Err(StoreError::Fenced { .. }) => {}
            other => panic!("A's head is not where it left it: fenced, got {other:?}"),
        }
        let started = std::time::Instant::now();
        let b = PgJournal::open(PgSettings {
            wait: Duration::from_millis(lease * 4),
            ..settings(&name, lease)
        });
        assert!(
            b.is_ok(),
            "no standby took over from a fenced holder in {:?}: {:?}",
            started.elapsed(),
            b.err()
        );
        drop(a);
    }

    #[test]
    fn a_writer_whose_lease_ran_out_cannot_write_even_before_anyone_takes_over() {
        let name = fresh_name("expired");
        let a = PgJournal::open(settings(&name, 60_000)).expect("A opens");
        expire_lease(&name);
        match a.commit(&commit(&[(1, b"too late")])) {
            Err(StoreError::Fenced { why, .. }) => assert!(why.contains("ran out"), "{why}"),
            other => panic!("a write after the lease ran out must be fenced, got {other:?}"),
        }
        drop(a);
        let reader = PgJournal::open_reader(settings(&name, 60_000)).expect("a reader opens");
        assert_eq!(
            reader.last_seq().unwrap(),
            None,
            "nothing of the refused group exists"
        );
    }

    #[test]
    fn a_standby_takes_over_when_the_holder_lets_go() {
        let name = fresh_name("standby");
        let a = PgJournal::open(settings(&name, 60_000)).expect("A opens");
        a.commit(&commit(&[(1, b"A")])).unwrap();
        let name2 = name.clone();
        let standby = std::thread::spawn(move || {
            let mut s = settings(&name2, 60_000);
            s.wait = Duration::from_secs(30);
            PgJournal::open(s)
        });
        std::thread::sleep(Duration::from_millis(300));
        drop(a); // a clean shutdown gives the lease up at once
        let b = standby
            .join()
            .expect("the standby thread")
            .expect("the standby takes over");
        b.commit(&commit(&[(2, b"B")])).unwrap();
        assert_eq!(all(&b, 1).len(), 2);
    }
}
