//! A fleet on PostgreSQL (pcx built with `--features postgres`, a database at
//! `PCX_TEST_PG_URL`): two pcx processes for two journals share one dynamo cache (one saves,
//! the other loads, namespaces kept apart); a lost answer to a COMMIT is resolved from the
//! database, not guessed; a lease holder paused past its lease (SIGSTOP) is fenced once it
//! runs again, and nothing it wrote after losing the lease exists. Every wait is bounded.
#![cfg(feature = "postgres")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pcx::store::error::StoreError;
use pcx::store::journal::{Commit, Journal};
use pcx::store::pg_journal::{PgJournal, PgSettings};
use serde_json::{json, Value};

fn url() -> String {
    std::env::var("PCX_TEST_PG_URL").unwrap_or_else(|_| {
        panic!("PCX_TEST_PG_URL is not set: start a database with `scripts/pg-cluster.sh start` and export its `url`")
    })
}

fn fresh_name(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("fault-{what}-{}-{nanos}", std::process::id())
}

// ---------------------------------------------------------------------------------------------
// a TCP proxy in front of the database that loses a group's commit, or the answer to it

const PASS: u8 = 0;
/// The next group's commit (the statement that writes its records, which commits as it ends)
/// is not forwarded; both sockets close (the group never commits).
const LOSE_COMMIT: u8 = 1;
/// The next group's commit is forwarded, its answer is not; both sockets close once the
/// database has had time to commit (the group commits, the client never hears so).
const LOSE_ANSWER: u8 = 2;
/// The message carrying the marker is forwarded, and then nothing more in either direction on
/// any of the proxy's connections until its `frozen` is cleared: the writer's process paused
/// (SIGSTOP) between two statements of a transaction, its renewals stopped with it.
const FREEZE: u8 = 3;

fn wait_while_frozen(frozen: &AtomicBool) {
    while frozen.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Proxy {
    port: u16,
    mode: Arc<AtomicU8>,
    marker: Arc<std::sync::Mutex<Vec<u8>>>,
    /// While set, a new connection waits before it is forwarded (a reconnect that takes a
    /// while to get through).
    hold: Arc<AtomicBool>,
    /// While set, a new connection is closed at once (the server is down for a moment).
    refuse: Arc<AtomicBool>,
    /// Set by a [`FREEZE`]: every connection holds its bytes while it is set.
    frozen: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: (String, u16)) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let mode = Arc::new(AtomicU8::new(PASS));
        let marker: Arc<std::sync::Mutex<Vec<u8>>> = Arc::default();
        let hold = Arc::new(AtomicBool::new(false));
        let refuse = Arc::new(AtomicBool::new(false));
        let frozen = Arc::new(AtomicBool::new(false));
        let (m, k, h, r) = (mode.clone(), marker.clone(), hold.clone(), refuse.clone());
        let f = frozen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if r.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let held = Instant::now();
                while h.load(Ordering::SeqCst) && held.elapsed() < Duration::from_secs(30) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let Ok(server) = TcpStream::connect((upstream.0.as_str(), upstream.1)) else {
                    continue;
                };
                let (m, k, f1, f2) = (m.clone(), k.clone(), f.clone(), f.clone());
                let (c2, s2) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                let cut = Arc::new(AtomicU8::new(0));
                let cut2 = cut.clone();
                // client -> server, watching for a group's commit
                std::thread::spawn(move || pump_up(client, server, &m, &k, &cut, &f1));
                // server -> client, silenced once a commit's answer is to be lost
                std::thread::spawn(move || pump_down(s2, c2, &cut2, &f2));
            }
        });
        Proxy {
            port,
            mode,
            marker,
            hold,
            refuse,
            frozen,
        }
    }

    /// The next client message that carries `marker` (a group's record bytes: they travel
    /// in the message that executes the group's statement, which commits as it ends) is lost,
    /// or its answer is.
    fn arm(&self, mode: u8, marker: &[u8]) {
        *self.marker.lock().unwrap_or_else(|p| p.into_inner()) = marker.to_vec();
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn url(&self) -> String {
        let base = url();
        let kept: Vec<&str> = base
            .split_whitespace()
            .filter(|w| {
                !w.starts_with("host=")
                    && !w.starts_with("port=")
                    && !w.starts_with("target_session_attrs=")
            })
            .collect();
        format!("host=127.0.0.1 port={} {}", self.port, kept.join(" "))
    }
}

fn pump_up(
    mut from: TcpStream,
    mut to: TcpStream,
    mode: &AtomicU8,
    marker: &std::sync::Mutex<Vec<u8>>,
    cut: &AtomicU8,
    frozen: &AtomicBool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let is_commit = {
            let m = marker.lock().unwrap_or_else(|p| p.into_inner());
            !m.is_empty() && chunk.windows(m.len()).any(|w| w == m.as_slice())
        };
        let armed = if is_commit {
            mode.swap(PASS, Ordering::SeqCst)
        } else {
            PASS
        };
        wait_while_frozen(frozen);
        match armed {
            FREEZE => {
                if to.write_all(chunk).is_err() {
                    break;
                }
                frozen.store(true, Ordering::SeqCst);
            }
            LOSE_COMMIT => break,
            LOSE_ANSWER => {
                cut.store(1, Ordering::SeqCst);
                let _ = to.write_all(chunk);
                // The database commits and answers; the answer goes nowhere.
                std::thread::sleep(Duration::from_millis(500));
                break;
            }
            _ => {
                if to.write_all(chunk).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

fn pump_down(mut from: TcpStream, mut to: TcpStream, cut: &AtomicU8, frozen: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        wait_while_frozen(frozen);
        if cut.load(Ordering::SeqCst) == 1 {
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// The first host and port of `PCX_TEST_PG_URL` (the primary the cluster script starts).
fn upstream() -> (String, u16) {
    let base = url();
    let field = |name: &str| {
        base.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .map(|v| v.split(',').next().unwrap_or("").to_string())
    };
    let host = field("host=").unwrap_or_else(|| "127.0.0.1".into());
    let port = field("port=").and_then(|p| p.parse().ok()).unwrap_or(5432);
    (host, port)
}

fn settings(url: String, name: &str) -> PgSettings {
    PgSettings {
        url,
        journal: name.to_string(),
        holder: format!("fault test pid {}", std::process::id()),
        address: String::new(),
        lease: Duration::from_secs(60),
        wait: Duration::ZERO,
    }
}

fn group(seq: u64, bytes: &[u8]) -> Commit {
    Commit {
        records: vec![(seq, bytes.to_vec())],
        ..Commit::default()
    }
}

fn records(j: &dyn Journal) -> Vec<(u64, Vec<u8>)> {
    j.records(1)
        .collect::<Result<Vec<_>, _>>()
        .expect("records read")
}

#[test]
fn a_commit_whose_answer_was_lost_is_found_to_have_landed_and_is_answered_ok() {
    let proxy = Proxy::start(upstream());
    let name = fresh_name("lost-answer");
    let j = PgJournal::open(settings(proxy.url(), &name)).expect("opens through the proxy");
    j.commit(&group(1, b"before")).unwrap();
    proxy.arm(LOSE_ANSWER, b"answer lost");
    // The database committed; the connection broke before its answer: pcx must learn that
    // the group landed (and answer ok), not report a failure for a stored write.
    j.commit(&group(2, b"answer lost"))
        .expect("a landed group is answered ok");
    j.commit(&group(3, b"after"))
        .expect("the journal goes on at the right head");
    let direct = PgJournal::open_reader(settings(url(), &name)).expect("a reader");
    assert_eq!(
        records(&direct),
        vec![
            (1, b"before".to_vec()),
            (2, b"answer lost".to_vec()),
            (3, b"after".to_vec())
        ]
    );
}

/// The thread committing a group: the journal, and the commit's outcome.
type Committing = std::thread::JoinHandle<(PgJournal, Result<(), StoreError>)>;

/// A writer's group 2 whose commit answer is lost, and, while its reconnect waits at the
/// proxy (`proxy.hold`, still set), its lease runs out (as when its renewals could not get
/// through) and another holder takes the journal over and writes group 3. Gives the proxy, the
/// thread committing (its journal and the commit's outcome), a reader and an SQL client.
fn lose_an_answer_then_take_over(what: &str) -> (Proxy, Committing, PgJournal, postgres::Client) {
    let proxy = Proxy::start(upstream());
    let name = fresh_name(what);
    let j = PgJournal::open(settings(proxy.url(), &name)).expect("opens through the proxy");
    j.commit(&group(1, b"before")).unwrap();
    proxy.arm(LOSE_ANSWER, b"answer lost");
    proxy.hold.store(true, Ordering::SeqCst);
    let committing = std::thread::spawn(move || {
        let outcome = j.commit(&group(2, b"answer lost"));
        (j, outcome)
    });
    let direct = PgJournal::open_reader(settings(url(), &name)).expect("a reader");
    let deadline = Instant::now() + Duration::from_secs(30);
    while records(&direct).len() < 2 {
        assert!(Instant::now() < deadline, "the group never landed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut sql = postgres::Client::connect(&url(), postgres::NoTls).expect("connect");
    sql.execute(
        "UPDATE pcx_heads SET lease_until = clock_timestamp() WHERE journal = $1",
        &[&name],
    )
    .expect("the lease runs out");
    let taker = PgJournal::open(settings(url(), &name)).expect("the journal is taken over");
    taker
        .commit(&group(3, b"taken over"))
        .expect("the new holder writes on");
    (proxy, committing, direct, sql)
}

/// Regression (a stored write reported as not stored): a commit whose answer was lost is
/// resolved from the database, but it took the group for landed only if the head was still
/// at the group's end. When the journal was taken over meanwhile (this writer's lease ran
/// out while it reconnected) and the new holder wrote on, the head was past it, and the group,
/// stored and replayed by the new holder, was reported "did not land: nothing of it was
/// stored": a client retrying without a request id applied it twice.
#[test]
fn a_commit_whose_answer_was_lost_while_the_journal_was_taken_over_is_found_to_have_landed() {
    let (proxy, committing, direct, _sql) = lose_an_answer_then_take_over("lost-answer-takeover");
    proxy.hold.store(false, Ordering::SeqCst);
    let (j, outcome) = committing.join().expect("the commit's thread");
    outcome.expect("a group that landed is answered ok, whatever came after it");
    assert_eq!(
        records(&direct),
        vec![
            (1, b"before".to_vec()),
            (2, b"answer lost".to_vec()),
            (3, b"taken over".to_vec())
        ]
    );
    // The old writer is fenced from here on.
    match j.commit(&group(3, b"late")) {
        Err(StoreError::Fenced { .. }) => {}
        other => panic!("the old writer must be fenced, got {other:?}"),
    }
}

/// The primary's WAL senders, stopped (SIGSTOP) until this is dropped: commits on the primary
/// still happen and are seen there, but no standby receives them, so a commit that waits for
/// its synchronous standbys waits. The rest of the cluster's writers wait meanwhile too.
struct ReplicationPaused(Vec<i32>);

impl ReplicationPaused {
    fn now(sql: &mut postgres::Client) -> ReplicationPaused {
        let pids: Vec<i32> = sql
            .query("SELECT pid FROM pg_stat_replication", &[])
            .expect("the WAL senders")
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        assert!(!pids.is_empty(), "the test cluster has no standbys");
        for pid in &pids {
            // SAFETY: kill only sends a signal.
            assert_eq!(
                unsafe { libc::kill(*pid, libc::SIGSTOP) },
                0,
                "SIGSTOP {pid}"
            );
        }
        ReplicationPaused(pids)
    }
}

impl Drop for ReplicationPaused {
    fn drop(&mut self) {
        for pid in &self.0 {
            // SAFETY: as above.
            unsafe { libc::kill(*pid, libc::SIGCONT) };
        }
    }
}

/// Product bug: once a lost answer was resolved as landed, the group was to be answered only
/// after one more synchronous commit, so that its WAL was on the standbys as well as on the
/// primary. That commit touched the head row under the writer's epoch, which after a takeover
/// matched no row: it wrote no WAL, waited for no standby, and the group was answered while
/// the primary alone might have it (a failover then would lose an answered write).
#[test]
fn a_commit_whose_answer_was_lost_during_a_takeover_is_answered_only_once_the_standbys_have_it() {
    let (proxy, committing, _direct, mut sql) =
        lose_an_answer_then_take_over("lost-answer-replicated");
    let paused = ReplicationPaused::now(&mut sql);
    proxy.hold.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(3));
    let answered_early = committing.is_finished();
    drop(paused);
    let (_j, outcome) = committing.join().expect("the commit's thread");
    assert!(
        !answered_early,
        "the group was answered while no standby could have received it"
    );
    outcome.expect("a group that landed is answered ok once the standbys have it");
}

/// Product bug: PostgreSQL ends a commit's wait for its synchronous standbys when an operator
/// cancels the statement (`pg_cancel_backend`, on commits that seemed stuck while standbys
/// were away), with only a WARNING ("the transaction has already committed locally, but might
/// not have been replicated to the standby") and a success: the group was answered while the
/// primary alone had it, and a failover then lost an answered write.
#[test]
fn a_commit_whose_wait_for_the_standbys_was_cancelled_is_answered_only_once_they_have_it() {
    let name = fresh_name("cancelled-sync-wait");
    let j = PgJournal::open(settings(url(), &name)).expect("opens");
    j.commit(&group(1, b"before")).expect("a group commits");
    let mut sql = postgres::Client::connect(&url(), postgres::NoTls).expect("connect");
    let paused = ReplicationPaused::now(&mut sql);
    let committing = std::thread::spawn(move || {
        let outcome = j.commit(&group(2, b"while no standby could have it"));
        (j, outcome)
    });
    // The careless operator: every commit waiting for a standby is cancelled, again and again.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        sql.execute(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity \
             WHERE wait_event = 'SyncRep' AND pid <> pg_backend_pid()",
            &[],
        )
        .expect("cancel the waiting commits");
        std::thread::sleep(Duration::from_millis(100));
    }
    let answered_early = committing.is_finished();
    drop(paused);
    let (j, outcome) = committing.join().expect("the commit's thread");
    assert!(
        !answered_early,
        "the group was answered while no standby could have received it: {:?}",
        outcome
    );
    outcome.expect("the group is answered ok once the standbys have it");
    j.commit(&group(3, b"after"))
        .expect("the journal goes on at the right head");
    let direct = PgJournal::open_reader(settings(url(), &name)).expect("a reader");
    assert_eq!(records(&direct).len(), 3);
}

/// The first standby's replay (its startup process) stopped until this is dropped: it still
/// receives and flushes WAL (so commits waiting for it pass), but shows none of it.
struct ReplayPaused(i32);

impl ReplayPaused {
    fn on(standby: &str) -> ReplayPaused {
        let mut sql = postgres::Client::connect(standby, postgres::NoTls).expect("the standby");
        let pid: i32 = sql
            .query_one(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'startup'",
                &[],
            )
            .expect("the standby's startup process")
            .get(0);
        // SAFETY: kill only sends a signal.
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGSTOP) },
            0,
            "SIGSTOP {pid}"
        );
        ReplayPaused(pid)
    }
}

impl Drop for ReplayPaused {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// Product bug: a URL of several hosts without `target_session_attrs=read-write` reconnects,
/// after a commit's answer was lost, to whichever host answers first. A standby reached so was
/// asked whether the group landed; having flushed but not yet applied its WAL, it showed the
/// head as before the group, and a group stored on the primary was answered "did not land:
/// nothing of it was stored" (a client retrying without a request id applied it twice).
#[test]
fn a_lost_answer_is_not_resolved_from_a_standby_that_has_not_applied_the_group() {
    let proxy = Proxy::start(upstream());
    let base = url();
    let field = |name: &str, i: usize| {
        base.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.split(',').nth(i).map(str::to_string))
            .expect("the test cluster's URL names its hosts and ports")
    };
    let (standby_host, standby_port) = (field("host=", 1), field("port=", 1));
    let rest: Vec<&str> = base
        .split_whitespace()
        .filter(|w| {
            !w.starts_with("host=")
                && !w.starts_with("port=")
                && !w.starts_with("target_session_attrs=")
        })
        .collect();
    // The careless operator's URL: the primary (through the proxy), then a standby, and no
    // target_session_attrs.
    let careless = format!(
        "host=127.0.0.1,{standby_host} port={},{standby_port} {}",
        proxy.port,
        rest.join(" ")
    );
    let standby = format!("host={standby_host} port={standby_port} {}", rest.join(" "));
    let name = fresh_name("resolved-on-a-standby");
    let j = PgJournal::open(settings(careless, &name)).expect("opens through the proxy");
    j.commit(&group(1, b"before")).expect("a group commits");
    let replay = ReplayPaused::on(&standby);
    proxy.arm(LOSE_ANSWER, b"answer lost");
    proxy.refuse.store(true, Ordering::SeqCst);
    let committing = std::thread::spawn(move || {
        let outcome = j.commit(&group(2, b"answer lost"));
        (j, outcome)
    });
    // The primary is back a little later.
    std::thread::sleep(Duration::from_secs(3));
    proxy.refuse.store(false, Ordering::SeqCst);
    let (j, outcome) = committing.join().expect("the commit's thread");
    drop(replay);
    outcome.expect("a group stored on the primary is answered ok");
    j.commit(&group(3, b"after"))
        .expect("the journal goes on at the right head");
    let direct = PgJournal::open_reader(settings(url(), &name)).expect("a reader");
    assert_eq!(records(&direct).len(), 3);
}

/// Product bug: a holder paused (SIGSTOP, a frozen VM) between two statements of a
/// transaction (a group with a snapshot or a shared cache change, a compaction) left its
/// session idle in that transaction, holding the lock on the journal's head row: the standby's
/// request for the lease waited on that lock, so no one took the journal over however long the
/// lease had run out, until the paused process ran again or died.
#[test]
fn a_holder_paused_inside_a_transaction_does_not_keep_the_standby_from_taking_over() {
    let proxy = Proxy::start(upstream());
    let name = fresh_name("paused-in-a-transaction");
    let lease = Duration::from_millis(1_500);
    let a = PgJournal::open(PgSettings {
        lease,
        ..settings(proxy.url(), &name)
    })
    .expect("opens through the proxy");
    a.commit(&group(1, b"before")).expect("a group commits");
    proxy.arm(FREEZE, b"paused in its transaction");
    let _paused = std::thread::spawn(move || {
        // Its answer never comes while frozen; the thread is left behind if the test fails.
        let outcome = a.commit(&Commit {
            snapshot: Some((2, b"a snapshot".to_vec())),
            ..group(2, b"paused in its transaction")
        });
        (a, outcome)
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy.frozen.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the group never reached the proxy"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let name2 = name.clone();
    std::thread::spawn(move || {
        let b = PgJournal::open(PgSettings {
            lease,
            wait: Duration::from_secs(60),
            ..settings(url(), &name2)
        });
        let _ = tx.send(b.map(|b| b.epoch()));
    });
    let took = rx.recv_timeout(lease * 2 + Duration::from_secs(5));
    proxy.frozen.store(false, Ordering::SeqCst);
    let epoch = took.unwrap_or_else(|_| {
        panic!(
            "the standby did not take the journal over within {:?} of the holder's pause",
            started.elapsed()
        )
    });
    assert!(epoch.expect("the standby opens").is_some());
    let direct = PgJournal::open_reader(settings(url(), &name)).expect("a reader");
    assert_eq!(
        records(&direct),
        vec![(1, b"before".to_vec())],
        "the paused group's transaction was rolled back whole"
    );
}

#[test]
fn a_commit_that_never_reached_the_database_is_found_not_to_have_landed() {
    let proxy = Proxy::start(upstream());
    let name = fresh_name("lost-commit");
    let j = PgJournal::open(settings(proxy.url(), &name)).expect("opens through the proxy");
    j.commit(&group(1, b"before")).unwrap();
    proxy.arm(LOSE_COMMIT, b"never committed");
    match j.commit(&group(2, b"never committed")) {
        Err(StoreError::Database { what, .. }) => {
            assert!(
                what.contains("did not land"),
                "the error says nothing was stored: {what}"
            )
        }
        other => panic!("a group that did not land must fail, got {other:?}"),
    }
    // Nothing of it exists, and the journal goes on from the same head.
    j.commit(&group(2, b"instead"))
        .expect("the next group takes the same place");
    let direct = PgJournal::open_reader(settings(url(), &name)).expect("a reader");
    assert_eq!(
        records(&direct),
        vec![(1, b"before".to_vec()), (2, b"instead".to_vec())]
    );
}

// ---------------------------------------------------------------------------------------------
// writes outside a group (a compaction, an import's takeover, the cache view) whose connection
// breaks as they commit: resolved from the database, as a group's commit is

/// The message that commits a write outside a group (its transaction's `COMMIT`).
const COMMIT: &[u8] = b"COMMIT";

/// A journal through `proxy` holding events 1..=3.
fn three_events(proxy: &Proxy, what: &str) -> (String, PgJournal) {
    let name = fresh_name(what);
    let j = PgJournal::open(settings(proxy.url(), &name)).expect("opens through the proxy");
    for seq in 1..=3u64 {
        j.commit(&group(seq, format!("event {seq}").as_bytes()))
            .expect("a group");
    }
    (name, j)
}

/// Regression (a landed write reported failed): a compaction whose COMMIT the database
/// carried out but whose answer was lost was reported failed, though the anchor was set and
/// the events before it gone.
#[test]
fn a_compaction_whose_answer_was_lost_is_found_to_have_landed_and_is_answered_ok() {
    let proxy = Proxy::start(upstream());
    let (name, j) = three_events(&proxy, "compact-lost-answer");
    proxy.arm(LOSE_ANSWER, COMMIT);
    let removed = j
        .compact_before(2, b"the anchor")
        .expect("a compaction that landed is answered ok");
    assert_eq!(removed, (2, 0), "its counts are the transaction's");
    let direct = PgJournal::open_reader(settings(url(), &name)).expect("a reader");
    assert_eq!(direct.anchor().unwrap(), Some(b"the anchor".to_vec()));
    assert_eq!(records(&direct), vec![(3, b"event 3".to_vec())]);
    j.commit(&group(4, b"after"))
        .expect("the journal goes on through a new connection");
}

/// The same, when the journal was taken over while the compaction's outcome was in doubt and
/// the new holder wrote outside a group too (its own token then came after this one's): the
/// compaction, stored, must still be answered as landed.
#[test]
fn a_compaction_whose_answer_was_lost_while_the_journal_was_taken_over_is_found_to_have_landed() {
    let proxy = Proxy::start(upstream());
    let (name, j) = three_events(&proxy, "compact-lost-answer-takeover");
    proxy.arm(LOSE_ANSWER, COMMIT);
    // The reconnect that resolves the compaction waits at the proxy until the takeover is done.
    proxy.hold.store(true, Ordering::SeqCst);
    let compacting = std::thread::spawn(move || {
        let outcome = j.compact_before(2, b"the anchor");
        (j, outcome)
    });
    let direct = PgJournal::open_reader(settings(url(), &name)).expect("a reader");
    let deadline = Instant::now() + Duration::from_secs(30);
    while direct.anchor().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the compaction never landed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut sql = postgres::Client::connect(&url(), postgres::NoTls).expect("connect");
    sql.execute(
        "UPDATE pcx_heads SET lease_until = clock_timestamp() WHERE journal = $1",
        &[&name],
    )
    .expect("the lease runs out");
    let taker = PgJournal::open(settings(url(), &name)).expect("the journal is taken over");
    taker
        .rewrite_cache_view(&[("k".to_string(), b"the taker's view".to_vec())])
        .expect("the new holder writes outside a group");
    proxy.hold.store(false, Ordering::SeqCst);
    let (_j, outcome) = compacting.join().expect("the compaction's thread");
    assert_eq!(
        outcome.expect("a compaction that landed is answered ok, whatever came after it"),
        (2, 0)
    );
}

#[test]
fn a_compaction_whose_commit_never_reached_the_database_is_found_not_to_have_landed() {
    let proxy = Proxy::start(upstream());
    let (name, j) = three_events(&proxy, "compact-lost-commit");
    proxy.arm(LOSE_COMMIT, COMMIT);
    match j.compact_before(2, b"the anchor") {
        Err(StoreError::Database { what, .. }) => assert!(
            what.contains("did not land"),
            "the error says nothing was stored: {what}"
        ),
        other => panic!("a compaction that did not land must fail, got {other:?}"),
    }
    let direct = PgJournal::open_reader(settings(url(), &name)).expect("a reader");
    assert_eq!(direct.anchor().unwrap(), None);
    assert_eq!(records(&direct).len(), 3, "nothing was removed");
    j.compact_before(2, b"the anchor")
        .expect("the compaction is made again");
}

/// Regression (a landed import reported failed): the takeover of an import's side journal
/// whose answer was lost was reported failed, though the journal held the imported log and
/// the side journal was gone (an import then said it failed and tried to remove it).
#[test]
fn an_imports_takeover_whose_answer_was_lost_is_found_to_have_landed() {
    let proxy = Proxy::start(upstream());
    let name = fresh_name("adopt-lost-answer");
    let side = format!("{name}.importing");
    let s = PgJournal::open(settings(url(), &side)).expect("the side journal");
    s.commit(&group(1, b"imported 1")).unwrap();
    s.commit(&group(2, b"imported 2")).unwrap();
    drop(s);
    let j = PgJournal::open(settings(proxy.url(), &name)).expect("opens through the proxy");
    proxy.arm(LOSE_ANSWER, COMMIT);
    let head = j
        .adopt_log_of(&side)
        .expect("a takeover that landed is answered ok");
    assert_eq!(head, Ok(2), "the journal holds the imported log");
    j.commit(&group(3, b"after the import"))
        .expect("the journal goes on at the imported head");
    let direct = PgJournal::open_reader(settings(url(), &name)).expect("a reader");
    assert_eq!(records(&direct).len(), 3);
    let gone = PgJournal::open_reader(settings(url(), &side)).expect("a reader");
    assert!(!gone.exists().unwrap(), "the side journal is gone");
}

#[test]
fn a_cache_view_rewrite_whose_answer_was_lost_is_found_to_have_landed() {
    let proxy = Proxy::start(upstream());
    let (name, j) = three_events(&proxy, "view-lost-answer");
    proxy.arm(LOSE_ANSWER, COMMIT);
    j.rewrite_cache_view(&[("k".to_string(), b"the view".to_vec())])
        .expect("a rewrite that landed is answered ok");
    let direct = PgJournal::open_reader(settings(url(), &name)).expect("a reader");
    assert_eq!(
        direct.cache_view().unwrap(),
        vec![("k".to_string(), b"the view".to_vec())]
    );
}

// ---------------------------------------------------------------------------------------------
// a lease holder paused past its lease

struct Batch {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Batch {
    fn start(dir: &std::path::Path, name: &str, lease_ms: u64, wait_ms: u64) -> Batch {
        Batch::start_on(&url(), dir, name, lease_ms, wait_ms)
    }

    fn start_on(
        url: &str,
        dir: &std::path::Path,
        name: &str,
        lease_ms: u64,
        wait_ms: u64,
    ) -> Batch {
        let mut child = common::pcx(dir, &["batch"])
            .env("PCX_JOURNAL", "postgres")
            .env("PCX_JOURNAL_URL", url)
            .env("PCX_JOURNAL_NAME", name)
            .env("PCX_JOURNAL_LEASE_MS", lease_ms.to_string())
            .env("PCX_JOURNAL_WAIT_MS", wait_ms.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pcx batch starts");
        let stdin = Some(child.stdin.take().expect("stdin"));
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let stderr = child.stderr.take().map(common::drain);
        Batch {
            child,
            stdin,
            stdout,
            stderr,
        }
    }

    /// Sends one request and reads its answer (bounded by the reader thread's timeout).
    fn ask(&mut self, request: Value) -> Value {
        let stdin = self.stdin.as_mut().expect("pcx batch's stdin is open");
        writeln!(stdin, "{request}").expect("write a request");
        stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read an answer");
        if line.is_empty() {
            // The process ended: say why.
            let _ = self.child.kill();
            let stderr = self
                .stderr
                .take()
                .and_then(|h| h.join().ok())
                .unwrap_or_default();
            panic!("pcx batch ended without answering {request}: {stderr}");
        }
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not an answer ({e}): {line:?}"))
    }

    /// Ends the input, as a user's pipe does, and waits for the clean close (which writes a
    /// snapshot at the last event).
    fn finish(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "pcx batch exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("pcx batch did not exit within 30 s of the end of its input");
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_entry_one_pcx_saves_is_loaded_by_another_on_the_cluster_in_its_namespace_only() {
    use common::protocol::{entry_with_codes, record_entry};
    let (name_a, name_b) = (fresh_name("share-a"), fresh_name("share-b"));
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("a dir"),
        tempfile::tempdir().expect("a dir"),
    );
    let mut a = Batch::start(dir_a.path(), &name_a, 10_000, 0);
    let mut b = Batch::start(dir_b.path(), &name_b, 10_000, 0);
    let in_ns = |mut v: Value, ns: &str| {
        v["namespace"] = json!(ns);
        v
    };
    for request in [
        record("b1", "kernel one"),
        record("b2", "kernel two"),
        record_entry("f", entry_with_codes(&[&["b1", "b2"]])),
        // Under a request id: the save still reaches the cluster (regression: the shared
        // cache's changes were read off the event without looking inside the id).
        in_ns(
            json!({"op": "save_to_dynamo_cache", "request_id": "save-1"}),
            "job1",
        ),
    ] {
        let answer = a.ask(request);
        assert_eq!(answer["ok"], true, "{answer}");
    }
    // B never recorded anything: its hit comes from the cluster.
    let loaded = b.ask(in_ns(json!({"op": "load_cache_entry", "key": "f"}), "job1"));
    assert_eq!(loaded["ok"], true, "{loaded}");
    assert_eq!(
        loaded["saved_by"],
        format!("{name_a}/default"),
        "the answer names the saver: {loaded}"
    );
    let text = loaded.to_string();
    for content in ["kernel one", "kernel two"] {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(content);
        assert!(
            text.contains(&b64),
            "the loaded backends carry {content:?}: {text}"
        );
    }
    // Another namespace does not see it.
    let other = b.ask(in_ns(json!({"op": "load_cache_entry", "key": "f"}), "job2"));
    assert_eq!(other["ok"], false, "{other}");
    assert_eq!(other["error"]["kind"], "package_not_found", "{other}");
    // Deleted where it was saved, it is gone for B too, though B holds a copy.
    let deleted = a.ask(in_ns(
        json!({"op": "delete_cache_entry", "key": "f"}),
        "job1",
    ));
    assert_eq!(deleted["deleted"], true, "{deleted}");
    let gone = b.ask(in_ns(json!({"op": "load_cache_entry", "key": "f"}), "job1"));
    assert_eq!(gone["error"]["kind"], "package_not_found", "{gone}");
    drop(b);
    drop(a);
    // B's own log says what it loaded, and from whom, and verifies (its contents are the
    // cluster's, stored once).
    let env = |cmd: &mut std::process::Command| {
        cmd.env("PCX_JOURNAL", "postgres")
            .env("PCX_JOURNAL_URL", url())
            .env("PCX_JOURNAL_NAME", &name_b);
    };
    let mut log = common::pcx(dir_b.path(), &["log"]);
    env(&mut log);
    let log = String::from_utf8(log.output().expect("pcx log").stdout).unwrap_or_default();
    assert!(
        log.contains("CacheEntryPut") && log.contains(&format!("{name_a}/default")),
        "{log}"
    );
    assert!(log.contains("EntryLoaded"), "{log}");
    let mut verify = common::pcx(dir_b.path(), &["verify"]);
    env(&mut verify);
    let v: Value =
        serde_json::from_slice(&verify.output().expect("pcx verify").stdout).expect("JSON");
    assert_eq!(v["ok"], true, "{v}");
}

/// Runs `pcx ARGS` on journal `name` (data directory `dir`): its exit code and stdout.
fn pcx_on_journal(dir: &std::path::Path, name: &str, args: &[&str]) -> (Option<i32>, String) {
    pcx_on_journal_at(&url(), dir, name, args)
}

/// [`pcx_on_journal`] on the database `url`.
fn pcx_on_journal_at(
    url: &str,
    dir: &std::path::Path,
    name: &str,
    args: &[&str],
) -> (Option<i32>, String) {
    let out = common::pcx(dir, args)
        .env("PCX_JOURNAL", "postgres")
        .env("PCX_JOURNAL_URL", url)
        .env("PCX_JOURNAL_NAME", name)
        .output()
        .expect("pcx runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Journal A saves entry `f` (from backends b1, b2) into namespace `job1` with `system_info`;
/// journal B is started. Both are answered before this returns.
fn saved_by_a_then_b(
    name_a: &str,
    name_b: &str,
    dir_a: &std::path::Path,
    dir_b: &std::path::Path,
    system_info: Value,
) -> (Batch, Batch) {
    use common::protocol::{entry_with_codes, record_entry};
    let mut a = Batch::start(dir_a, name_a, 10_000, 0);
    let b = Batch::start(dir_b, name_b, 10_000, 0);
    let mut entry = entry_with_codes(&[&["b1", "b2"]]);
    if !system_info.is_null() {
        entry["system_info"] = system_info;
    }
    for request in [
        record("b1", "kernel one"),
        record("b2", "kernel two"),
        record_entry("f", entry),
        json!({"op": "save_to_dynamo_cache", "namespace": "job1"}),
    ] {
        let answer = a.ask(request);
        assert_eq!(answer["ok"], true, "{answer}");
    }
    (a, b)
}

/// After B's clean close: `pcx verify` passes, and B's journal opens again (a load's change
/// that never reached the log left a snapshot past its end: exit 3 on every open).
fn journal_verifies_and_opens_again(dir: &std::path::Path, name: &str) -> String {
    let (code, verify) = pcx_on_journal(dir, name, &["verify"]);
    assert_eq!(code, Some(0), "pcx verify on {name}: {verify}");
    let (code, info) = pcx_on_journal(dir, name, &["debug-info"]);
    assert_eq!(code, Some(0), "{name} opens again: {info}");
    let (code, log) = pcx_on_journal(dir, name, &["log"]);
    assert_eq!(code, Some(0), "pcx log on {name}: {log}");
    log
}

/// Product bug (found following docs/fleet.md): a load that found the cluster's entry deleted
/// applied a `CacheEntryDeleted` to the state and answered the miss, but the event never
/// reached the log; the clean close then wrote a snapshot one past the log's end and the
/// journal was refused at every later open as having lost acknowledged events (exit 3).
#[test]
fn after_the_cluster_deletes_an_adopted_entry_the_loading_journal_logs_the_deletion_and_still_opens(
) {
    let (name_a, name_b) = (fresh_name("gone-a"), fresh_name("gone-b"));
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("a dir"),
        tempfile::tempdir().expect("a dir"),
    );
    let (mut a, mut b) =
        saved_by_a_then_b(&name_a, &name_b, dir_a.path(), dir_b.path(), json!(null));
    let load = json!({"op": "load_cache_entry", "key": "f", "namespace": "job1"});
    let loaded = b.ask(load.clone());
    assert_eq!(loaded["ok"], true, "{loaded}");
    let deleted = a.ask(json!({"op": "delete_cache_entry", "key": "f", "namespace": "job1"}));
    assert_eq!(deleted["deleted"], true, "{deleted}");
    let gone = b.ask(load);
    assert_eq!(gone["error"]["kind"], "package_not_found", "{gone}");
    b.finish();
    a.finish();
    let log = journal_verifies_and_opens_again(dir_b.path(), &name_b);
    assert!(
        log.contains("CacheEntryDeleted"),
        "B's log records the deletion it took up: {log}"
    );
}

/// The same bug by another path: an entry adopted from the cluster by a load that is then
/// refused (`system_mismatch`) was applied but never logged.
#[test]
fn an_entry_adopted_by_a_refused_load_is_in_the_loading_journals_log_and_it_still_opens() {
    let (name_a, name_b) = (fresh_name("refused-a"), fresh_name("refused-b"));
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("a dir"),
        tempfile::tempdir().expect("a dir"),
    );
    let saved_on = json!({"python_version": "3.11", "torch_version": "2.10.0"});
    let (a, mut b) = saved_by_a_then_b(&name_a, &name_b, dir_a.path(), dir_b.path(), saved_on);
    let refused = b.ask(json!({
        "op": "load_cache_entry", "key": "f", "namespace": "job1",
        "system_info": {"python_version": "3.11", "torch_version": "2.99.0"},
    }));
    assert_eq!(refused["error"]["kind"], "system_mismatch", "{refused}");
    b.finish();
    a.finish();
    let log = journal_verifies_and_opens_again(dir_b.path(), &name_b);
    assert!(
        log.contains("CacheEntryPut"),
        "B's log records the entry it adopted: {log}"
    );
}

// ---------------------------------------------------------------------------------------------
// the shared dynamo cache's rows bound to their saver's record

/// Two journals, A and B, in a schema of their own (a cluster of their own, as far as the
/// shared cache and the schema version go), A having recorded and saved entries f (backends
/// b1, b2) and g (b3) in its namespace.
struct SavedFG {
    name_a: String,
    name_b: String,
    namespace: String,
    schema: String,
    db: String,
    dir_a: tempfile::TempDir,
    dir_b: tempfile::TempDir,
    a: Batch,
    b: Batch,
}

fn a_saves_f_and_g(what: &str) -> SavedFG {
    use common::protocol::{entry_with_codes, record_entry};
    let (name_a, name_b) = (
        fresh_name(&format!("{what}-a")),
        fresh_name(&format!("{what}-b")),
    );
    let namespace = fresh_name(&format!("{what}-ns"));
    let schema = fresh_schema(what);
    let db = url_in_schema(&schema);
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("a dir"),
        tempfile::tempdir().expect("a dir"),
    );
    let mut a = Batch::start_on(&db, dir_a.path(), &name_a, 10_000, 0);
    let b = Batch::start_on(&db, dir_b.path(), &name_b, 10_000, 0);
    for request in [
        record("b1", "kernel one"),
        record("b2", "kernel two"),
        record("b3", "kernel three"),
        record_entry("f", entry_with_codes(&[&["b1", "b2"]])),
        record_entry("g", entry_with_codes(&[&["b3"]])),
        json!({"op": "save_to_dynamo_cache", "namespace": namespace}),
    ] {
        let answer = a.ask(request);
        assert_eq!(answer["ok"], true, "{answer}");
    }
    SavedFG {
        name_a,
        name_b,
        namespace,
        schema,
        db,
        dir_a,
        dir_b,
        a,
        b,
    }
}

fn load(b: &mut Batch, key: &str, namespace: &str) -> Value {
    b.ask(json!({"op": "load_cache_entry", "key": key, "namespace": namespace}))
}

/// A refused load of a row: the typed error, and nothing of it in the loader's log.
fn assert_refused_not_adopted(answer: &Value, db: &str, dir_b: &std::path::Path, name_b: &str) {
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(
        answer["error"]["kind"], "shared_entry_unsound",
        "a row its saver's record does not vouch for is refused: {answer}"
    );
    let (code, log) = pcx_on_journal_at(db, dir_b, name_b, &["log"]);
    assert_eq!(code, Some(0), "{log}");
    assert!(
        !log.contains("CacheEntryPut") && !log.contains("EntryLoaded"),
        "nothing of the refused row is recorded in the loader's log: {log}"
    );
}

/// Regression (a forged row taken up as sound): a row of `pcx_dynamo_cache` whose `saved_by`
/// was changed in the database (to another context of its saver, or to another journal) was
/// taken up by the next load in every other journal, recorded there as saved by whoever the
/// row named, and answered with that `saved_by`.
#[test]
fn a_dynamo_cache_row_whose_saver_was_altered_is_refused_not_adopted() {
    let SavedFG {
        name_a,
        name_b,
        namespace,
        schema,
        db,
        dir_a: _dir_a,
        dir_b,
        a,
        mut b,
    } = a_saves_f_and_g("saver");
    let mut sql = postgres::Client::connect(&db, postgres::NoTls).expect("connect");
    // f now claims another context of A, g another journal (which has records of its own).
    let (name_c, dir_c) = (fresh_name("saver-c"), tempfile::tempdir().expect("a dir"));
    let mut c = Batch::start_on(&db, dir_c.path(), &name_c, 10_000, 0);
    for key in ["c1", "c2", "c3", "c4", "c5", "c6", "c7"] {
        let answer = c.ask(record(key, "unrelated"));
        assert_eq!(answer["ok"], true, "{answer}");
    }
    c.finish();
    for (key, saver) in [
        ("f", format!("{name_a}/forged")),
        ("g", format!("{name_c}/default")),
    ] {
        let changed = sql
            .execute(
                "UPDATE pcx_dynamo_cache SET saved_by = $3 WHERE namespace = $1 AND key = $2",
                &[&namespace, &key, &saver],
            )
            .expect("alter the row");
        assert_eq!(changed, 1);
    }
    let f = load(&mut b, "f", &namespace);
    let g = load(&mut b, "g", &namespace);
    b.finish();
    a.finish();
    assert_refused_not_adopted(&f, &db, dir_b.path(), &name_b);
    assert_refused_not_adopted(&g, &db, dir_b.path(), &name_b);
    let message = f["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("{name_a}/forged")) && message.contains("f"),
        "the error says which row and whom it names: {f}"
    );
    let _ = sql.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"));
}

/// Regression (an altered entry taken up as sound): a row whose entry was re-framed in the
/// database (decoded, changed, encoded again with its hash recomputed, so it decodes) was
/// taken up by the next load in every other journal and answered as the saver's.
#[test]
fn a_reframed_dynamo_cache_row_is_refused_not_adopted() {
    use pcx::store::record::{decode_saved_entry, encode_saved_entry};
    let SavedFG {
        name_a,
        name_b,
        namespace,
        schema,
        db,
        dir_a: _dir_a,
        dir_b,
        a,
        mut b,
    } = a_saves_f_and_g("reframed");
    let mut sql = postgres::Client::connect(&db, postgres::NoTls).expect("connect");
    let bytes: Vec<u8> = sql
        .query_one(
            "SELECT entry FROM pcx_dynamo_cache WHERE namespace = $1 AND key = 'f'",
            &[&namespace],
        )
        .expect("the saved row")
        .get(0);
    let mut entry = decode_saved_entry(&bytes).expect("a sound entry");
    assert!(entry.backends.pop().is_some(), "f has two backends");
    let reframed = encode_saved_entry(&entry).expect("encodes");
    assert!(decode_saved_entry(&reframed).is_ok(), "the forgery decodes");
    sql.execute(
        "UPDATE pcx_dynamo_cache SET entry = $2 WHERE namespace = $1 AND key = 'f'",
        &[&namespace, &reframed],
    )
    .expect("re-frame the row");
    let f = load(&mut b, "f", &namespace);
    // The untouched row still loads, saved by A.
    let g = load(&mut b, "g", &namespace);
    assert_eq!(g["ok"], true, "a genuine row keeps working: {g}");
    assert_eq!(g["saved_by"], format!("{name_a}/default"), "{g}");
    b.finish();
    a.finish();
    assert_eq!(f["error"]["kind"], "shared_entry_unsound", "{f}");
    let (_, log) = pcx_on_journal_at(&db, dir_b.path(), &name_b, &["log"]);
    assert_eq!(
        log.matches("CacheEntryPut").count(),
        1,
        "only g was adopted: {log}"
    );
    let _ = sql.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"));
}

/// A schema name of its own for a test: a cluster of its own (its schema version, its shared
/// cache), as another test's does not concern it.
fn fresh_schema(what: &str) -> String {
    fresh_name(what).replace('-', "_").to_lowercase()
}

/// A row pointed at a record slipped into its saver's records past the saver's head (a record
/// of its own, hash and all, saving an altered entry) is refused: that record is no part of
/// the saver's log (no replay reads it, `verify` reports it), so it vouches for nothing.
#[test]
fn a_dynamo_cache_row_bound_to_a_forged_record_past_its_savers_head_is_refused() {
    use pcx::core::event::Event;
    use pcx::store::record::{decode_event, encode_event, encode_saved_entry};
    let SavedFG {
        name_a,
        name_b,
        namespace,
        schema,
        db,
        dir_a: _dir_a,
        dir_b,
        a,
        mut b,
    } = a_saves_f_and_g("past");
    let mut sql = postgres::Client::connect(&db, postgres::NoTls).expect("connect");
    let row = sql
        .query_one(
            "SELECT c.saver_seq, r.bytes, h.head FROM pcx_dynamo_cache c \
             JOIN pcx_records r ON r.journal = $2 AND r.seq = c.saver_seq \
             JOIN pcx_heads h ON h.journal = $2 \
             WHERE c.namespace = $1 AND c.key = 'f'",
            &[&namespace, &name_a],
        )
        .expect("f's row and its record");
    let (bytes, head): (Vec<u8>, i64) = (row.get(1), row.get(2));
    let (mut envelope, _) = decode_event(&bytes).expect("the save's record");
    fn altered(event: &mut Event) -> Option<Vec<u8>> {
        match event {
            Event::Scoped { event, .. } | Event::Requested { event, .. } => altered(event),
            Event::SavedToDynamoCache { entries } => {
                let (_, entry) = entries.iter_mut().find(|(key, _)| key.as_str() == "f")?;
                entry.backends.pop()?;
                encode_saved_entry(entry).ok()
            }
            _ => None,
        }
    }
    let forged_entry = altered(&mut envelope.event).expect("the save holds f");
    let past = head + 100;
    envelope.seq = u64::try_from(past).expect("a sequence number");
    let (forged, hash) = encode_event(&envelope).expect("encodes");
    sql.execute(
        "INSERT INTO pcx_records (journal, seq, bytes) VALUES ($1, $2, $3)",
        &[&name_a, &past, &forged],
    )
    .expect("slip a record in past the head");
    sql.execute(
        "UPDATE pcx_dynamo_cache SET entry = $2, saver_seq = $3, saver_hash = $4 \
         WHERE namespace = $1 AND key = 'f'",
        &[&namespace, &forged_entry, &past, &hash.0.as_slice()],
    )
    .expect("point the row at it");
    let f = load(&mut b, "f", &namespace);
    b.finish();
    a.finish();
    assert_refused_not_adopted(&f, &db, dir_b.path(), &name_b);
    let _ = sql.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"));
}

/// A genuine row whose saver's record was compacted away keeps loading: it is checked against
/// the saver's anchor (the entry and the context that saved it, in the state there), while a
/// row altered after the compaction is still refused.
#[test]
fn a_genuine_dynamo_cache_row_still_loads_after_its_saver_compacted_its_log() {
    let SavedFG {
        name_a,
        name_b,
        namespace,
        schema,
        db,
        dir_a,
        dir_b,
        mut a,
        b,
    } = a_saves_f_and_g("compacted");
    let answer = a.ask(record("later", "after the save"));
    assert_eq!(answer["ok"], true, "{answer}");
    a.finish();
    b.finish();
    // The compaction's anchor is `later`, past the save: the save's record is gone.
    let mut sql = postgres::Client::connect(&db, postgres::NoTls).expect("connect");
    let saved_at: i64 = sql
        .query_one(
            "SELECT saver_seq FROM pcx_dynamo_cache WHERE namespace = $1 AND key = 'f'",
            &[&namespace],
        )
        .expect("f's binding")
        .get(0);
    let before = (saved_at + 2).to_string();
    let (code, compacted) = pcx_on_journal_at(
        &db,
        dir_a.path(),
        &name_a,
        &["compact", "--before", &before],
    );
    assert_eq!(code, Some(0), "{compacted}");
    assert!(
        compacted.contains(&format!("\"anchored_at\":{}", saved_at + 1)),
        "{compacted}"
    );
    sql.execute(
        "UPDATE pcx_dynamo_cache SET saved_by = $2 WHERE namespace = $1 AND key = 'g'",
        &[&namespace, &format!("{name_a}/forged")],
    )
    .expect("alter g");
    let mut b = Batch::start_on(&db, dir_b.path(), &name_b, 10_000, 0);
    let f = load(&mut b, "f", &namespace);
    assert_eq!(f["ok"], true, "a genuine row keeps loading: {f}");
    assert_eq!(f["saved_by"], format!("{name_a}/default"), "{f}");
    let g = load(&mut b, "g", &namespace);
    assert_eq!(g["error"]["kind"], "shared_entry_unsound", "{g}");
    b.finish();
    let _ = sql.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"));
}

/// `PCX_TEST_PG_URL` with the schema `schema` (made here) first on the search path.
fn url_in_schema(schema: &str) -> String {
    let mut sql = postgres::Client::connect(&url(), postgres::NoTls).expect("connect");
    sql.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .expect("the schema is made");
    let base = url();
    if base.starts_with("postgres://") || base.starts_with("postgresql://") {
        let glue = if base.contains('?') { '&' } else { '?' };
        format!("{base}{glue}options=-csearch_path%3D{schema}")
    } else {
        format!("{base} options=-csearch_path={schema}")
    }
}

/// A version 1 database (rows with no binding) is upgraded by the first pcx that opens it,
/// in one transaction, however many open it at once: a row its saver's log vouches for is
/// bound to the record that saved it and keeps loading; a row it does not (altered while
/// version 1 trusted rows as they were, or naming a journal with no such record) stays
/// unbound and is refused, never taken up as sound.
#[test]
fn a_version_1_database_is_upgraded_binding_the_rows_their_savers_log_vouches_for_and_refusing_the_rest(
) {
    let SavedFG {
        name_a,
        name_b,
        namespace,
        schema,
        db,
        dir_a: _dir_a,
        dir_b,
        a,
        b,
    } = a_saves_f_and_g("v1");
    b.finish();
    a.finish();
    // Back to version 1 as it was: no binding columns; g altered as version 1 allowed, and a
    // row naming a journal that saved nothing.
    let mut sql = postgres::Client::connect(&db, postgres::NoTls).expect("connect");
    sql.batch_execute(&format!(
        "ALTER TABLE pcx_dynamo_cache DROP COLUMN saver_seq, DROP COLUMN saver_hash; \
         UPDATE pcx_schema SET version = 1; \
         UPDATE pcx_dynamo_cache SET saved_by = '{name_a}/forged' WHERE key = 'g'; \
         INSERT INTO pcx_dynamo_cache (namespace, key, entry, saved_by) \
           SELECT namespace, 'h', entry, 'nobody/default' FROM pcx_dynamo_cache WHERE key = 'f'"
    ))
    .expect("a version 1 database");
    // Four pcx open it at once: one upgrades it, the others find version 2.
    let openers: Vec<_> = (0..4)
        .map(|i| {
            let settings = settings(db.clone(), &format!("{name_b}-reader-{i}"));
            std::thread::spawn(move || PgJournal::open_reader(settings).map(|_| ()))
        })
        .collect();
    for opener in openers {
        opener
            .join()
            .expect("an opener's thread")
            .expect("every opener opens the upgraded database");
    }
    let version: i32 = sql
        .query_one("SELECT max(version) FROM pcx_schema", &[])
        .expect("the version")
        .get(0);
    let versions: i64 = sql
        .query_one("SELECT count(*) FROM pcx_schema", &[])
        .expect("the versions")
        .get(0);
    assert_eq!((version, versions), (2, 1), "upgraded once, to version 2");
    let bound: Vec<(String, bool)> = sql
        .query(
            "SELECT key, saver_seq IS NOT NULL AND saver_hash IS NOT NULL FROM pcx_dynamo_cache \
             WHERE namespace = $1 ORDER BY key",
            &[&namespace],
        )
        .expect("the rows")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        bound,
        vec![
            ("f".to_string(), true),
            ("g".to_string(), false),
            ("h".to_string(), false)
        ]
    );
    let mut b = Batch::start_on(&db, dir_b.path(), &name_b, 10_000, 0);
    let f = load(&mut b, "f", &namespace);
    assert_eq!(
        f["ok"], true,
        "a row its saver's log vouches for loads: {f}"
    );
    assert_eq!(f["saved_by"], format!("{name_a}/default"), "{f}");
    for key in ["g", "h"] {
        let refused = load(&mut b, key, &namespace);
        assert_eq!(
            refused["error"]["kind"], "shared_entry_unsound",
            "an unbound row is refused: {refused}"
        );
    }
    b.finish();
    let _ = sql.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"));
}

fn record(key: &str, content: &str) -> Value {
    use base64::Engine as _;
    json!({"op": "record_artifact", "key": key, "kind": "eager",
           "content_b64": base64::engine::general_purpose::STANDARD.encode(content)})
}

#[test]
fn a_holder_paused_past_its_lease_is_fenced_when_it_runs_again_and_its_late_write_does_not_exist() {
    let name = fresh_name("sigstop");
    let dir_a = tempfile::tempdir().expect("a dir");
    let dir_b = tempfile::tempdir().expect("a dir");
    let mut a = Batch::start(dir_a.path(), &name, 1_500, 0);
    let first = a.ask(record("a1", "written by A"));
    assert_eq!(first["ok"], true, "{first}");
    a.signal(libc::SIGSTOP);
    // B waits as a standby and takes over once A's lease has run out (about 1.5 s).
    let started = Instant::now();
    let mut b = Batch::start(dir_b.path(), &name, 1_500, 30_000);
    let b1 = b.ask(record("b1", "written by B"));
    let took = started.elapsed();
    assert_eq!(b1["ok"], true, "{b1}");
    assert!(
        took < Duration::from_millis(1_500 + 5_000),
        "the takeover took {took:?}"
    );
    a.signal(libc::SIGCONT);
    let late = a.ask(record("a2", "A after losing its lease"));
    assert_eq!(
        late["ok"], false,
        "A's write after the takeover must fail: {late}"
    );
    let message = late["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("fenced"), "the error says why: {message}");
    // What B sees: A's first write and its own, and nothing A tried later.
    let state = b.ask(json!({"op": "serialize_artifact_by_key", "key": "a2"}));
    assert!(
        state["artifact"].is_null(),
        "A's late write exists: {state}"
    );
    let a1 = b.ask(json!({"op": "serialize_artifact_by_key", "key": "a1"}));
    assert!(
        !a1["artifact"].is_null(),
        "A's answered write was lost: {a1}"
    );
    drop(b);
    drop(a);
    let verify = common::pcx(dir_b.path(), &["verify"])
        .env("PCX_JOURNAL", "postgres")
        .env("PCX_JOURNAL_URL", url())
        .env("PCX_JOURNAL_NAME", &name)
        .output()
        .expect("pcx verify runs");
    let answer: Value = serde_json::from_slice(&verify.stdout).expect("verify answers JSON");
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["events"], 2, "{answer}");
}

#[test]
fn a_holder_paused_past_its_lease_does_not_answer_reads_from_its_stale_state_when_it_runs_again() {
    let name = fresh_name("stale-read");
    let dir_a = tempfile::tempdir().expect("a dir");
    let dir_b = tempfile::tempdir().expect("a dir");
    let mut a = Batch::start(dir_a.path(), &name, 1_500, 0);
    let first = a.ask(record("k", "old, written by A"));
    assert_eq!(first["ok"], true, "{first}");
    a.signal(libc::SIGSTOP);
    // B takes over once A's lease has run out and replaces k.
    let mut b = Batch::start(dir_b.path(), &name, 1_500, 30_000);
    let taken = b.ask(json!({"op": "take_artifact", "key": "k"}));
    assert_eq!(taken["ok"], true, "{taken}");
    let again = b.ask(record("k", "new, written by B"));
    assert_eq!(again["ok"], true, "{again}");
    a.signal(libc::SIGCONT);
    // At once, before A's lease thread has run: A's state is stale, and A must not serve it.
    for _ in 0..3 {
        let read = a.ask(json!({"op": "serialize_artifact_by_key", "key": "k"}));
        assert_eq!(
            read["ok"], false,
            "a holder whose lease ran out answered a read from its stale state: {read}"
        );
        let message = read["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("fenced"), "the error says why: {read}");
        std::thread::sleep(Duration::from_millis(700));
    }
    let fresh = b.ask(json!({"op": "serialize_artifact_by_key", "key": "k"}));
    assert_eq!(fresh["ok"], true, "{fresh}");
}

// ---------------------------------------------------------------------------------------------
// clients follow the holder

/// `pcx serve` for a journal, on a socket of its own; killed when dropped.
struct Serve(Child);

impl Serve {
    fn start(dir: &std::path::Path, name: &str, wait_ms: u64) -> (Serve, std::path::PathBuf) {
        let socket = dir.join("s.sock");
        let child = common::pcx(dir, &["serve", "--socket"])
            .arg(&socket)
            .env("PCX_JOURNAL", "postgres")
            .env("PCX_JOURNAL_URL", url())
            .env("PCX_JOURNAL_NAME", name)
            .env("PCX_JOURNAL_LEASE_MS", "1500")
            .env("PCX_JOURNAL_WAIT_MS", wait_ms.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pcx serve starts");
        (Serve(child), socket)
    }

    fn wait_listening(socket: &std::path::Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "the server did not listen on {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `pcx client` with no address: it asks the database where the journal's holder serves.
fn client_following(name: &str, request: &Value) -> Value {
    let out = client_following_output(name, request);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "pcx client answered no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn pcx_client_finds_the_journals_holder_in_the_database_and_follows_a_takeover() {
    let name = fresh_name("follow");
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("a dir"),
        tempfile::tempdir().expect("a dir"),
    );
    let (a, socket_a) = Serve::start(dir_a.path(), &name, 0);
    Serve::wait_listening(&socket_a);
    let first = client_following(&name, &record("k1", "through A"));
    assert_eq!(first["ok"], true, "{first}");
    // B waits as a standby; A dies; B takes over and records its own address.
    let (_b, socket_b) = Serve::start(dir_b.path(), &name, 30_000);
    drop(a);
    Serve::wait_listening(&socket_b);
    let second = client_following(&name, &record("k2", "through B"));
    assert_eq!(second["ok"], true, "{second}");
    let both = client_following(
        &name,
        &json!({"op": "serialize_artifact_by_key", "key": "k1"}),
    );
    assert!(
        !both["artifact"].is_null(),
        "B serves what A recorded: {both}"
    );
}

/// `pcx client` following the journal's holder, with its whole output.
fn client_following_output(name: &str, request: &Value) -> std::process::Output {
    let elsewhere = tempfile::tempdir().expect("a dir");
    let mut child = common::pcx(elsewhere.path(), &["client"])
        .env("PCX_JOURNAL", "postgres")
        .env("PCX_JOURNAL_URL", url())
        .env("PCX_JOURNAL_NAME", name)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pcx client starts");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{request}").expect("write");
    drop(stdin);
    child.wait_with_output().expect("pcx client ends")
}

#[test]
fn pcx_client_does_not_write_into_another_journals_server_found_at_its_holders_old_address() {
    let (alpha, beta) = (fresh_name("alpha"), fresh_name("beta"));
    let (dir_a, elsewhere) = (
        tempfile::tempdir().expect("a dir"),
        tempfile::tempdir().expect("a dir"),
    );
    let (a, socket_a) = Serve::start(dir_a.path(), &alpha, 0);
    Serve::wait_listening(&socket_a);
    let first = client_following(&alpha, &record("k1", "into alpha"));
    assert_eq!(first["ok"], true, "{first}");
    // alpha's holder dies; a server of another journal now listens at the same address (the
    // same path on this machine, as on every machine of a fleet with the same layout).
    drop(a);
    let (_b, socket_b) = Serve::start(dir_a.path(), &beta, 0);
    assert_eq!(socket_a, socket_b);
    Serve::wait_listening(&socket_b);
    let out = client_following_output(&alpha, &record("k2", "meant for alpha"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "pcx client for {alpha} wrote through {beta}'s server: {} {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains(&beta) && stderr.contains(&alpha),
        "the refusal names both journals: {stderr}"
    );
    // Nothing meant for alpha went into beta.
    let state = common::pcx(elsewhere.path(), &["log"])
        .env("PCX_JOURNAL", "postgres")
        .env("PCX_JOURNAL_URL", url())
        .env("PCX_JOURNAL_NAME", &beta)
        .output()
        .expect("pcx log runs");
    let log = String::from_utf8_lossy(&state.stdout);
    assert!(!log.contains("k2"), "beta's log holds alpha's write: {log}");
}

#[test]
fn compaction_of_a_journal_in_postgres_is_one_transaction_that_verify_accepts() {
    let name = fresh_name("compact");
    let dir = tempfile::tempdir().expect("a dir");
    {
        // Killed at the end of this block: its short lease lets compaction take over soon.
        let mut a = Batch::start(dir.path(), &name, 1_000, 0);
        for i in 1..=10 {
            let answer = a.ask(record(&format!("k{i}"), &format!("content {i}")));
            assert_eq!(answer["ok"], true, "{answer}");
        }
    }
    let run = |args: &[&str]| -> Value {
        let out = common::pcx(dir.path(), args)
            .env("PCX_JOURNAL", "postgres")
            .env("PCX_JOURNAL_URL", url())
            .env("PCX_JOURNAL_NAME", &name)
            .env("PCX_JOURNAL_WAIT_MS", "10000")
            .output()
            .expect("pcx runs");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?} answered no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    let compacted = run(&["compact", "--before", "6"]);
    assert_eq!(compacted["ok"], true, "{compacted}");
    assert_eq!(compacted["anchored_at"], 5, "{compacted}");
    assert_eq!(compacted["events_removed"], 5, "{compacted}");
    let verify = run(&["verify"]);
    assert_eq!(verify["ok"], true, "{verify}");
    assert_eq!(verify["anchored_at"], 5, "{verify}");
    assert_eq!(verify["events"], 5, "the events from 6 on remain: {verify}");
    // The state before the anchor is the anchor's: k1 still reads.
    let k1 = run(&["state", "--key", "k1"]);
    assert!(!k1["artifact"].is_null(), "{k1}");
}

/// Product bug: `pcx verify` read each page of records (and each snapshot and content) as the
/// database was at that moment, so a compaction committed while it walked the log (deleting
/// the events before its anchor) made a sound journal fail verify with "event log has a gap:
/// expected event 4097, found 15000", which an operator would take for damage.
#[test]
fn verify_while_a_compaction_commits_reads_one_snapshot_and_finds_the_journal_sound() {
    let name = fresh_name("verify-during-compaction");
    let dir = tempfile::tempdir().expect("a dir");
    let events = 6_000;
    let lines: String = (0..events)
        .map(|i| {
            format!(
                "{}\n",
                record(&format!("k{}", i % 50), &format!("content {i}"))
            )
        })
        .collect();
    let on_journal = |args: &[&str]| {
        let mut command = common::pcx(dir.path(), args);
        command
            .env("PCX_JOURNAL", "postgres")
            .env("PCX_JOURNAL_URL", url())
            .env("PCX_JOURNAL_NAME", &name)
            .env("PCX_JOURNAL_WAIT_MS", "10000");
        command
    };
    let mut batch = on_journal(&["batch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("pcx batch starts");
    batch
        .stdin
        .take()
        .expect("stdin")
        .write_all(lines.as_bytes())
        .expect("write the requests");
    assert!(batch.wait().expect("pcx batch ends").success());
    let verify = on_journal(&["verify"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("pcx verify starts");
    // Once verify has walked part of the log, it stops (SIGSTOP) while a compaction commits.
    std::thread::sleep(Duration::from_millis(1_500));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(verify.id() as i32, libc::SIGSTOP) };
    let compacted = on_journal(&["compact", "--before", &(events - 100).to_string()])
        .output()
        .expect("pcx compact runs");
    // SAFETY: as above.
    unsafe { libc::kill(verify.id() as i32, libc::SIGCONT) };
    let compacted: Value = serde_json::from_slice(&compacted.stdout).expect("compact answers");
    assert_eq!(compacted["ok"], true, "{compacted}");
    let out = verify.wait_with_output().expect("pcx verify ends");
    let answer: Value = serde_json::from_slice(&out.stdout).expect("verify answers JSON");
    assert_eq!(
        answer["ok"], true,
        "a sound journal failed verify while a compaction committed: {answer}"
    );
    assert_eq!(
        answer["events"], events,
        "the log as it was when verify began: {answer}"
    );
    let after: Value = serde_json::from_slice(
        &on_journal(&["verify"])
            .output()
            .expect("pcx verify runs")
            .stdout,
    )
    .expect("verify answers JSON");
    assert_eq!(after["ok"], true, "{after}");
    assert_eq!(after["anchored_at"], events - 101, "{after}");
}

/// A take retried under its request id at the holder that took over (its first answer lost
/// with the holder that made it) is answered `already_applied` with the artifact the first
/// take took, read back from the cluster's log, and takes nothing again.
#[test]
fn a_take_retried_at_the_next_holder_hands_over_what_the_first_took() {
    let name = fresh_name("retried-take");
    let dir = tempfile::tempdir().expect("a dir");
    let take = json!({"op": "take_artifact", "key": "k", "request_id": "take-k"});
    let first = {
        let mut a = Batch::start(dir.path(), &name, 1_000, 0);
        for request in [record("k", "taken once"), record("other", "stays")] {
            let answer = a.ask(request);
            assert_eq!(answer["ok"], true, "{answer}");
        }
        let first = a.ask(take.clone());
        assert_eq!(first["ok"], true, "{first}");
        // The holder dies (SIGKILL on drop) with its lease still running.
        first
    };
    let mut b = Batch::start(dir.path(), &name, 1_000, 30_000);
    let retry = b.ask(take);
    assert_eq!(retry["already_applied"], true, "{retry}");
    assert_eq!(retry["artifact"], first["artifact"], "{retry}");
    let state = b.ask(json!({"op": "dump_debug_info"}));
    assert_eq!(
        state["debug_info"]["backends"],
        json!(["other"]),
        "taken once: {state}"
    );
}

/// The holder of a journal in PostgreSQL compacts it while it serves (`compact` to the holder,
/// as a long-running server would be asked): one transaction beside its own commits, the state
/// kept, and the journal verifying and opening again from the anchor.
#[test]
fn the_holder_of_a_journal_compacts_it_in_place_and_keeps_serving() {
    use common::protocol::{record, take};
    let name = fresh_name("compact-live");
    let dir = tempfile::tempdir().unwrap();
    let mut holder = Batch::start(dir.path(), &name, 2_000, 10_000);
    for i in 0..12 {
        let answer = holder.ask(record(&format!("k{i}"), format!("content {i}")));
        assert_eq!(answer["ok"], true, "{answer}");
    }
    let answer = holder.ask(take("k0"));
    assert_eq!(answer["ok"], true, "{answer}");
    let digest = holder.ask(json!({"op": "state"}))["state"]["state_digest"].clone();
    let compacted = holder.ask(json!({"op": "compact", "before": 10}));
    assert_eq!(compacted["ok"], true, "{compacted}");
    assert_eq!(compacted["anchored_at"], json!(9), "{compacted}");
    assert_eq!(compacted["events_removed"], json!(9), "{compacted}");
    let answer = holder.ask(record("after", "written after"));
    assert_eq!(answer["seq"], json!(14), "{answer}");
    let answer = holder.ask(take("after"));
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(
        holder.ask(json!({"op": "state"}))["state"]["state_digest"],
        digest
    );
    let verified = holder.ask(json!({"op": "verify"}));
    assert_eq!(verified["verify"]["ok"], true, "{verified}");
    assert_eq!(verified["verify"]["anchored_at"], json!(9), "{verified}");
    holder.finish();
    journal_verifies_and_opens_again(dir.path(), &name);
}

/// `pcx compact` on a journal a live `pcx serve` holds: instead of "served by …", the holder
/// (found in the database, as `pcx client` finds it) compacts in place.
#[test]
fn pcx_compact_on_a_journal_a_server_holds_has_the_holder_compact_it() {
    let name = fresh_name("compact-cli");
    let dir = tempfile::tempdir().expect("a dir");
    let (_server, socket) = Serve::start(dir.path(), &name, 0);
    Serve::wait_listening(&socket);
    for i in 0..6 {
        let answer = client_following(&name, &record(&format!("k{i}"), "x"));
        assert_eq!(answer["ok"], true, "{answer}");
    }
    let (code, out) = pcx_on_journal(dir.path(), &name, &["compact", "--before", "4"]);
    assert_eq!(code, Some(0), "{out}");
    let report: Value = serde_json::from_str(out.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(report["anchored_at"], json!(3), "{report}");
    let verified = client_following(&name, &json!({"op": "verify"}));
    assert_eq!(verified["verify"]["anchored_at"], json!(3), "{verified}");
}
