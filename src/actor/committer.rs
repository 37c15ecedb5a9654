//! The committer thread and the queue it takes groups from: group commit with no round trip
//! through the actor.
//!
//! The actor stages each request's records (and content, cache view writes, a snapshot) into
//! the queue with the request's waiter. The committer thread takes everything queued whenever
//! it is free (whole requests, about [`MAX_GROUP_EVENTS`] events at most), commits it in one
//! go, hands the group's waiters to be answered (all at once: one wake-up of the actor's
//! thread per group, not one per request) and then reports to the actor for bookkeeping. So
//! the disk is never idle while the actor works through its mailbox, and an answer never
//! waits for the actor to read a "committed" message queued behind thousands of requests.
//!
//! A failed commit halts the queue: everything queued behind the failed group (built on its
//! state) is taken out as aborted, and so is everything pushed until the actor has rebuilt
//! its state from the log and calls [`Committer::resume`]. The failed group's waiters and the
//! aborted ones go to the actor with the report and are answered after the rebuild, so a
//! caller who sends its next request on reading the error finds the context whole again.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::actor::error::ContextError;
use crate::core::model::Digest;
use crate::store::error::StoreError;
use crate::store::journal::{Commit, Journal};
use crate::store::pack::{MAX_GROUP_BYTES, MAX_GROUP_EVENTS};

/// An answer waiting for its changes (and every change staged before them) to be durable.
pub type Waiter = Box<dyn FnOnce(Result<(), ContextError>) + Send>;

/// Staged changes and the answers waiting for them.
#[derive(Default)]
pub struct Group {
    pub commit: Commit,
    pub waiters: Vec<Waiter>,
    /// Loads in this group that hit: counted once the group is durable.
    pub hits: u64,
    /// Content bytes staged in this group.
    bytes: usize,
}

impl Group {
    fn writes(&self) -> bool {
        !self.commit.records.is_empty() || self.commit.snapshot.is_some()
    }

    fn is_empty(&self) -> bool {
        !self.writes() && self.waiters.is_empty()
    }

    fn absorb(&mut self, other: Group) {
        let Group {
            commit,
            waiters,
            hits,
            bytes: _,
        } = other;
        self.bytes += commit.blobs.iter().map(|b| b.1.len()).sum::<usize>();
        self.commit.records.extend(commit.records);
        self.commit.blobs.extend(commit.blobs);
        self.commit.cache_puts.extend(commit.cache_puts);
        self.commit.shared_cache.extend(commit.shared_cache);
        if commit.snapshot.is_some() {
            self.commit.snapshot = commit.snapshot;
        }
        self.waiters.extend(waiters);
        self.hits += hits;
    }
}

/// What the committer reports to the actor after each commit. The waiters are answered.
pub struct Committed {
    /// The error, and whether it was sled's (which keeps failing until reopened).
    pub result: Result<(), (ContextError, bool)>,
    pub events: u64,
    pub last_seq: u64,
    pub snapshot: Option<u64>,
    /// The content the group staged: it can be read from the journal now (or was refused).
    pub blobs: Vec<Digest>,
    /// After a failure: the answers to send once the state is rebuilt.
    pub refused: Vec<(Waiter, ContextError)>,
}

#[derive(Default)]
struct Queue {
    /// Full groups, oldest first.
    sealed: VecDeque<Group>,
    open: Group,
    /// Records being committed now.
    inflight_events: u64,
    busy: bool,
    /// Set by a failed commit until the actor has reloaded.
    halted: bool,
    closing: bool,
    /// The committer is asleep on the condition variable: only then does a push wake it
    /// (a wake-up is a system call, and W1 pushes 100,000 times while the committer works).
    sleeping: bool,
    /// While the committer gathers a group (see [`Gathering`]): how many requests it waits
    /// for. A push wakes it only once the group has them (or a group is sealed), not for
    /// each request on the way: W6's committer woke two to three times a group, and each
    /// wake-up took the queue's lock from under the server's thread's next push (both then
    /// switched out), about a sixth of a pcx process's CPU.
    gathering_for: Option<usize>,
}

impl Queue {
    /// Whether a push that left the queue as it is should wake the committer: only when it
    /// sleeps, and, while it gathers, only once what it gathers for is there.
    fn push_wakes_committer(&self) -> bool {
        self.sleeping
            && (self
                .gathering_for
                .is_none_or(|n| self.open.waiters.len() >= n)
                || !self.sealed.is_empty())
    }

    fn idle(&self) -> bool {
        !self.busy && self.sealed.is_empty() && self.open.is_empty()
    }

    fn queued_events(&self) -> u64 {
        let staged = |g: &Group| g.commit.records.len() as u64;
        staged(&self.open) + self.sealed.iter().map(staged).sum::<u64>() + self.inflight_events
    }
}

type Shared = Arc<(Mutex<Queue>, Condvar)>;

fn lock(shared: &Shared) -> MutexGuard<'_, Queue> {
    // The queue holds no invariant a panic elsewhere could break halfway.
    shared.0.lock().unwrap_or_else(|p| p.into_inner())
}

/// The committer thread's handle.
pub struct Committer {
    shared: Shared,
    thread: Option<JoinHandle<()>>,
    hits: Arc<AtomicU64>,
}

impl Committer {
    /// Starts the thread. `answer` gets the waiters of each durable group, to answer with
    /// `Ok`; `report` runs after each commit.
    pub fn start(
        journal: Arc<dyn Journal>,
        answer: impl Fn(Vec<Waiter>) + Send + 'static,
        report: impl Fn(Committed) + Send + 'static,
    ) -> std::io::Result<Committer> {
        let shared: Shared = Arc::default();
        let hits = Arc::new(AtomicU64::new(0));
        let (theirs, their_hits) = (shared.clone(), hits.clone());
        let thread = std::thread::Builder::new()
            .name("pcx-committer".into())
            .spawn(move || commit_loop(&theirs, &journal, &their_hits, &answer, &report))?;
        Ok(Committer {
            shared,
            thread: Some(thread),
            hits,
        })
    }

    /// Load hits made durable so far: counted before their answers are sent, so an answer
    /// that waits for them (see `push`) sees them.
    pub fn hit_counter(&self) -> Arc<AtomicU64> {
        self.hits.clone()
    }

    /// Where requests are queued from.
    pub fn intake(&self) -> Intake {
        Intake {
            shared: self.shared.clone(),
        }
    }

    /// Changes queued or being committed.
    pub fn queued_events(&self) -> u64 {
        lock(&self.shared).queued_events()
    }

    /// Takes changes again after a failed commit, once the actor's state is the log's.
    pub fn resume(&self) {
        lock(&self.shared).halted = false;
    }

    /// Commits what is queued, then stops the thread.
    pub fn close(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        lock(&self.shared).closing = true;
        self.shared.1.notify_all();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the committer thread panicked");
            }
        }
    }
}

/// A handle for queueing requests, cheap to clone: a reply can carry it out of the actor.
#[derive(Clone)]
pub struct Intake {
    shared: Shared,
}

impl Intake {
    /// Queues one request's staged changes with its waiter. A request that wrote nothing is
    /// answered at once when nothing is queued or being committed; otherwise after what is.
    pub fn push(&self, staged: Group, waiter: Waiter) {
        let mut q = lock(&self.shared);
        if q.halted || q.closing {
            drop(q);
            waiter(Err(ContextError::Aborted {
                message: "an earlier change in the same commit failed".into(),
            }));
            return;
        }
        if !staged.writes() && q.idle() {
            drop(q);
            waiter(Ok(()));
            return;
        }
        q.open.absorb(staged);
        q.open.waiters.push(waiter);
        if q.open.commit.records.len() >= MAX_GROUP_EVENTS || q.open.bytes >= MAX_GROUP_BYTES {
            let full = std::mem::take(&mut q.open);
            q.sealed.push_back(full);
        }
        let wake = q.push_wakes_committer();
        drop(q);
        if wake {
            self.shared.1.notify_one();
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The longest a commit waits for its group to fill (see [`Gathering`]).
const MAX_GATHER: Duration = Duration::from_millis(20);

/// Group gathering for a journal that [`Journal::gathers_groups`]: after a group of N
/// requests, the next commit waits for N requests to be queued, but no longer than half the
/// last commit took (and [`MAX_GATHER`]). Closed-loop clients answered together come back
/// together within a socket round trip or two; without the wait the first to come back is
/// committed alone and the rest wait a whole commit behind it. Half a commit is the most the
/// wait can cost a request, against the whole commit it saves; a group that does not fill
/// in time is committed as it is and sets the next target, so clients that went away cost
/// one short wait.
#[derive(Default)]
struct Gathering {
    on: bool,
    last_waiters: usize,
    last_commit: Duration,
}

impl Gathering {
    /// Until when a group whose first request was queued `since` waits for more.
    fn until(&self, since: Instant) -> Option<Instant> {
        (self.on && self.last_waiters > 1).then(|| since + (self.last_commit / 2).min(MAX_GATHER))
    }
}

fn commit_loop(
    shared: &Shared,
    journal: &Arc<dyn Journal>,
    hit_count: &AtomicU64,
    answer: &dyn Fn(Vec<Waiter>),
    report: &dyn Fn(Committed),
) {
    let mut gathering = Gathering {
        on: journal.gathers_groups(),
        ..Gathering::default()
    };
    let mut ahead = WriteAhead::start(journal.clone());
    loop {
        let (group, next_blobs) = {
            let mut q = lock(shared);
            let mut gather_until = None;
            let group = loop {
                if let Some(g) = q.sealed.pop_front() {
                    break g;
                }
                if !q.open.is_empty() {
                    let until =
                        *gather_until.get_or_insert_with(|| gathering.until(Instant::now()));
                    let now = Instant::now();
                    match until {
                        Some(until)
                            if !q.closing
                                && now < until
                                && q.open.waiters.len() < gathering.last_waiters =>
                        {
                            q.sleeping = true;
                            q.gathering_for = Some(gathering.last_waiters);
                            q = shared
                                .1
                                .wait_timeout(q, until - now)
                                .map_or_else(|p| p.into_inner().0, |r| r.0);
                            q.sleeping = false;
                            q.gathering_for = None;
                            continue;
                        }
                        _ => break std::mem::take(&mut q.open),
                    }
                }
                if q.closing {
                    return;
                }
                q.sleeping = true;
                q = shared.1.wait(q).unwrap_or_else(|p| p.into_inner());
                q.sleeping = false;
            };
            q.busy = true;
            q.inflight_events = group.commit.records.len() as u64;
            // A sealed group takes no more requests: its contents can be written ahead.
            let next_blobs = q
                .sealed
                .front()
                .filter(|g| !g.commit.blobs.is_empty())
                .map(|g| g.commit.blobs.clone());
            (group, next_blobs)
        };
        gathering.last_waiters = group.waiters.len();
        let Group {
            commit,
            waiters,
            hits,
            ..
        } = group;
        if commit.records.is_empty() && commit.snapshot.is_none() {
            // Only answers waiting for what was committed before them.
            answer(waiters);
            finish(shared, false);
            continue;
        }
        if let Some(a) = &mut ahead {
            // This group's contents, if handed over last time, are written before it commits.
            a.wait();
            if let Some(blobs) = next_blobs {
                a.hand(blobs);
            }
        }
        let started = Instant::now();
        let result = journal.commit(&commit);
        gathering.last_commit = started.elapsed();
        tracing::debug!(
            requests = waiters.len(),
            events = commit.records.len(),
            contents = commit.blobs.len(),
            commit_us = gathering.last_commit.as_micros() as u64,
            ok = result.is_ok(),
            "group committed"
        );
        let mut committed = Committed {
            events: commit.records.len() as u64,
            last_seq: commit.records.last().map_or(0, |r| r.0),
            snapshot: commit.snapshot.as_ref().map(|s| s.0),
            blobs: commit.blobs.iter().map(|b| b.0).collect(),
            refused: Vec::new(),
            result: result.map_err(|e| {
                let reopen = matches!(
                    e,
                    StoreError::Sled { .. }
                        | StoreError::SledRead { .. }
                        | StoreError::SledEvents { .. }
                );
                (ContextError::from(e), reopen)
            }),
        };
        drop(commit);
        match &committed.result {
            Ok(()) => {
                hit_count.fetch_add(hits, Ordering::SeqCst);
                answer(waiters);
                finish(shared, false);
            }
            Err((err, _)) => {
                let aborted = ContextError::Aborted {
                    message: err.to_string(),
                };
                let mut refused: Vec<(Waiter, ContextError)> =
                    waiters.into_iter().map(|w| (w, err.clone())).collect();
                refused.extend(
                    finish(shared, true)
                        .into_iter()
                        .map(|w| (w, aborted.clone())),
                );
                committed.refused = refused;
            }
        }
        report(committed);
    }
}

/// Contents handed to the write-ahead thread.
type Blobs = Vec<(Digest, Arc<Vec<u8>>)>;

/// The thread that writes a sealed group's contents ahead of its commit
/// ([`Journal::prewrite`]) while the committer commits the group before it, so that the
/// sync of one overlaps the other's: W1's groups each sync a content file and then sled's
/// log, one after the other.
struct WriteAhead {
    to: Option<mpsc::Sender<Blobs>>,
    done: mpsc::Receiver<()>,
    busy: bool,
    thread: Option<JoinHandle<()>>,
}

impl WriteAhead {
    /// None if the thread cannot be started: groups then write their contents themselves.
    fn start(journal: Arc<dyn Journal>) -> Option<WriteAhead> {
        let (to, handed) = mpsc::channel::<Blobs>();
        let (finished, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("pcx-write-ahead".into())
            .spawn(move || {
                for blobs in handed {
                    journal.prewrite(&blobs);
                    if finished.send(()).is_err() {
                        return;
                    }
                }
            })
            .ok()?;
        Some(WriteAhead {
            to: Some(to),
            done,
            busy: false,
            thread: Some(thread),
        })
    }

    /// Waits until the contents handed over last are written (or given up).
    fn wait(&mut self) {
        if self.busy {
            let _ = self.done.recv();
            self.busy = false;
        }
    }

    fn hand(&mut self, blobs: Blobs) {
        self.wait();
        if let Some(to) = &self.to {
            self.busy = to.send(blobs).is_ok();
        }
    }
}

impl Drop for WriteAhead {
    /// Ends the thread, and with it its hold on the journal (and so on the data directory).
    fn drop(&mut self) {
        self.to = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Marks the committer free; after a failure, halts the queue and gives back the waiters
/// of everything queued behind the failed group.
fn finish(shared: &Shared, failed: bool) -> Vec<Waiter> {
    let mut q = lock(shared);
    q.busy = false;
    q.inflight_events = 0;
    if !failed {
        return Vec::new();
    }
    q.halted = true;
    let sealed = std::mem::take(&mut q.sealed);
    let open = std::mem::take(&mut q.open);
    sealed
        .into_iter()
        .chain([open])
        .flat_map(|g| g.waiters)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::journal::FaultyJournal;
    use crate::store::sled_journal::SledJournal;
    use std::sync::mpsc;
    use std::time::Duration;

    type Answer = (u64, Result<(), ContextError>);

    /// A committer over a faulty journal; answers arrive on `answers` (with the waiter's
    /// tag), reports on `reports`.
    struct Rig {
        _dir: tempfile::TempDir,
        journal: Arc<FaultyJournal<SledJournal>>,
        c: Committer,
        tx: mpsc::Sender<Answer>,
        answers: mpsc::Receiver<Answer>,
        reports: mpsc::Receiver<Committed>,
    }

    fn committer() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let journal = Arc::new(FaultyJournal::new(
            SledJournal::open(dir.path(), 1 << 20).unwrap(),
        ));
        let (tx, answers) = mpsc::channel();
        let (report_tx, reports) = mpsc::channel();
        let report_tx = Mutex::new(report_tx);
        let c = Committer::start(
            journal.clone(),
            |waiters: Vec<Waiter>| waiters.into_iter().for_each(|w| w(Ok(()))),
            move |c| {
                let _ = report_tx.lock().unwrap().send(c);
            },
        )
        .unwrap();
        Rig {
            _dir: dir,
            journal,
            c,
            tx,
            answers,
            reports,
        }
    }

    fn staged(seq: u64) -> Group {
        let mut g = Group::default();
        g.commit
            .records
            .push((seq, format!("record {seq}").into_bytes()));
        g
    }

    fn waiter(tag: u64, tx: &mpsc::Sender<Answer>) -> Waiter {
        let tx = tx.clone();
        Box::new(move |r| {
            let _ = tx.send((tag, r));
        })
    }

    const PATIENCE: Duration = Duration::from_secs(10);

    /// A full group of 1,024 records with `contents` 1 KiB contents of its own.
    fn full_group(first_seq: u64, contents: u8) -> Group {
        let mut g = Group::default();
        for seq in first_seq..first_seq + MAX_GROUP_EVENTS as u64 {
            g.commit.records.push((seq, seq.to_be_bytes().to_vec()));
        }
        for i in 0..contents {
            let salt = (first_seq / MAX_GROUP_EVENTS as u64) as u8;
            let c: Vec<u8> = (0..1024u32)
                .map(|n| (n as u8) ^ i.wrapping_mul(7) ^ salt.wrapping_mul(131))
                .chain([i, salt])
                .collect();
            g.bytes += c.len();
            g.commit.blobs.push((Digest::of(&c), Arc::new(c)));
        }
        g
    }

    /// The contents of a sealed group are written while the group before it commits, and
    /// not again by their own group: every group's contents are stored once and read back.
    #[test]
    fn a_sealed_groups_contents_are_written_while_the_group_before_it_commits() {
        let rig = committer();
        // Slow commits, so that the later groups are sealed and queued behind the first.
        rig.journal.act_remote(200);
        let intake = rig.c.intake();
        let groups: Vec<Group> = (0..3)
            .map(|g| full_group(1 + g * MAX_GROUP_EVENTS as u64, 100))
            .collect();
        let digests: Vec<Digest> = groups
            .iter()
            .flat_map(|g| g.commit.blobs.iter().map(|b| b.0))
            .collect();
        let total: u64 = groups.iter().map(|g| g.bytes as u64).sum();
        for (tag, g) in groups.into_iter().enumerate() {
            intake.push(g, waiter(tag as u64, &rig.tx));
        }
        for _ in 0..3 {
            let (tag, answer) = rig.answers.recv_timeout(PATIENCE).unwrap();
            assert!(answer.is_ok(), "group {tag}: {answer:?}");
        }
        assert!(
            rig.journal.prewrites() >= 1,
            "no group's contents were written ahead"
        );
        let content_bytes: u64 = std::fs::read_dir(rig._dir.path().join("content"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(content_bytes, total, "each content written once");
        for d in &digests {
            assert!(rig.journal.blob(d).unwrap().is_some(), "{}", d.to_hex());
        }
    }

    /// A remote journal's committer waits for as many requests as its last group had (the
    /// closed-loop clients it answered coming back), up to half a commit, instead of
    /// committing the first to come back alone and the rest a whole commit later.
    #[test]
    fn a_remote_journal_gathers_as_many_requests_as_its_last_group_had() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Arc::new(FaultyJournal::new(
            SledJournal::open(dir.path(), 1 << 20).unwrap(),
        ));
        journal.act_remote(300);
        let (tx, answers) = mpsc::channel();
        let (sizes_tx, sizes) = mpsc::channel();
        let sizes_tx = Mutex::new(sizes_tx);
        let c = Committer::start(
            journal.clone(),
            |waiters: Vec<Waiter>| waiters.into_iter().for_each(|w| w(Ok(()))),
            move |c: Committed| {
                let _ = sizes_tx.lock().unwrap().send(c.events);
            },
        )
        .unwrap();
        let intake = c.intake();
        // A group of one, then four queued while it commits (300 ms): a group of 4.
        intake.push(staged(1), waiter(1, &tx));
        std::thread::sleep(Duration::from_millis(100));
        let mut seq = 1;
        for _ in 0..4 {
            seq += 1;
            intake.push(staged(seq), waiter(seq, &tx));
        }
        for _ in 0..5 {
            assert!(answers.recv_timeout(PATIENCE).unwrap().1.is_ok());
        }
        assert_eq!(sizes.recv_timeout(PATIENCE).unwrap(), 1);
        assert_eq!(sizes.recv_timeout(PATIENCE).unwrap(), 4);
        // The four come back 2 ms apart, well within the wait (half a commit, at most 20 ms).
        for _ in 0..4 {
            seq += 1;
            intake.push(staged(seq), waiter(seq, &tx));
            std::thread::sleep(Duration::from_millis(2));
        }
        for _ in 0..4 {
            assert!(answers.recv_timeout(PATIENCE).unwrap().1.is_ok());
        }
        assert_eq!(
            sizes.recv_timeout(PATIENCE).unwrap(),
            4,
            "the second group waited for all four"
        );
        // Two of them go away: the group that does not fill is committed when the wait ends.
        for _ in 0..2 {
            seq += 1;
            intake.push(staged(seq), waiter(seq, &tx));
        }
        for _ in 0..2 {
            assert!(answers.recv_timeout(PATIENCE).unwrap().1.is_ok());
        }
        assert_eq!(sizes.recv_timeout(PATIENCE).unwrap(), 2);
        c.close();
        assert_eq!(journal.commits(), 4);
    }

    #[test]
    fn a_gathering_committer_is_woken_once_its_group_is_there_not_by_each_request() {
        let one = || -> Waiter { Box::new(|_| {}) };
        let mut q = Queue {
            sleeping: true,
            gathering_for: Some(3),
            ..Queue::default()
        };
        for n in 1..3 {
            q.open.waiters.push(one());
            assert!(!q.push_wakes_committer(), "woken at {n} of 3");
        }
        q.open.waiters.push(one());
        assert!(q.push_wakes_committer(), "not woken when the third came");
        // A sealed group is committed whatever the committer gathers for.
        let mut sealed = Queue {
            sleeping: true,
            gathering_for: Some(100),
            ..Queue::default()
        };
        sealed.sealed.push_back(Group::default());
        assert!(sealed.push_wakes_committer());
        // Not gathering, a push wakes a sleeping committer; an awake one is never woken.
        let mut idle = Queue {
            sleeping: true,
            ..Queue::default()
        };
        idle.open.waiters.push(one());
        assert!(idle.push_wakes_committer());
        idle.sleeping = false;
        assert!(!idle.push_wakes_committer());
    }

    #[test]
    fn changes_are_committed_in_order_and_a_read_waits_for_them() {
        let rig = committer();
        let intake = rig.c.intake();
        for seq in 1..=3 {
            intake.push(staged(seq), waiter(seq, &rig.tx));
        }
        intake.push(Group::default(), waiter(100, &rig.tx));
        let mut tags = Vec::new();
        for _ in 0..4 {
            let (tag, r) = rig.answers.recv_timeout(PATIENCE).unwrap();
            assert!(r.is_ok(), "{r:?}");
            tags.push(tag);
        }
        assert_eq!(
            tags.last(),
            Some(&100),
            "the read is answered after the writes"
        );
        let committed: u64 = (0..)
            .map_while(|_| rig.reports.recv_timeout(Duration::from_millis(200)).ok())
            .map(|r| r.events)
            .sum();
        assert_eq!(committed, 3);
        assert_eq!(rig.journal.last_seq().unwrap(), Some(3));
        // Nothing queued now: a read is answered at once, on the caller's thread.
        intake.push(Group::default(), waiter(101, &rig.tx));
        assert_eq!(rig.answers.try_recv().map(|a| a.0), Ok(101));
    }

    #[test]
    fn a_failed_commit_halts_the_queue_until_resumed() {
        let rig = committer();
        let intake = rig.c.intake();
        rig.journal.fail_commits(true);
        intake.push(staged(1), waiter(1, &rig.tx));
        let report = rig.reports.recv_timeout(PATIENCE).unwrap();
        let (err, _) = report.result.as_ref().expect_err("the commit failed");
        assert_eq!(err.kind(), "storage");
        assert_eq!(
            report.refused.len(),
            1,
            "the failed group's answer waits for the actor"
        );
        assert!(
            rig.answers.try_recv().is_err(),
            "nobody is answered before the rebuild"
        );
        // Halted: what is pushed now is refused at once.
        intake.push(staged(1), waiter(2, &rig.tx));
        let (tag, r) = rig.answers.recv_timeout(PATIENCE).unwrap();
        assert_eq!((tag, r.map_err(|e| e.kind())), (2, Err("aborted")));
        rig.journal.fail_commits(false);
        rig.c.resume();
        intake.push(staged(1), waiter(3, &rig.tx));
        let (tag, r) = rig.answers.recv_timeout(PATIENCE).unwrap();
        assert_eq!(tag, 3);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(rig.journal.last_seq().unwrap(), Some(1));
    }

    #[test]
    fn groups_are_cut_at_the_event_limit_between_requests() {
        let rig = committer();
        let intake = rig.c.intake();
        // Pushed far faster than one commit takes: most queue behind the first group.
        let n = MAX_GROUP_EVENTS as u64 * 2 + 10;
        for seq in 1..=n {
            intake.push(staged(seq), waiter(seq, &rig.tx));
        }
        for _ in 0..n {
            rig.answers.recv_timeout(PATIENCE).unwrap().1.unwrap();
        }
        let sizes: Vec<u64> = (0..)
            .map_while(|_| rig.reports.recv_timeout(Duration::from_millis(200)).ok())
            .map(|r| r.events)
            .collect();
        assert_eq!(sizes.iter().sum::<u64>(), n);
        assert!(
            sizes.iter().all(|s| *s <= MAX_GROUP_EVENTS as u64),
            "groups: {sizes:?}"
        );
    }
}
