//! The request loop: the actor's state and the steps every request runs, decide → stage →
//! durable → answer, with healing after a failed commit and the content reads requests share.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use actix::prelude::*;

use super::messages::{ActorSettings, Answer, LoadCounters, Loaded, Stats};
use super::reply::{Durable, Replier, Reply};
use crate::actor::committer::{Committed, Committer, Group, Waiter};
use crate::actor::error::ContextError;
use crate::actor::plugin_thread::Done;
use crate::actor::plugin_thread::{Deserializer, EditJob, Job, PluginStop};
use crate::core::event::Event;
use crate::core::event::SavedEntry;
use crate::core::model::{Artifact, ArtifactRef, Digest};
use crate::core::scope::{Scope, DEFAULT};
use crate::core::state::State;
use crate::core::stitch::{stitch_part, Stitch};
use crate::plugins::loader::PluginError;
use crate::store::error::StoreError;
use crate::store::journal::Journal;
use crate::store::record::{
    encode_event, encode_saved_entry, encode_snapshot_of, Envelope, SCHEMA_VERSION,
};
use crate::store::replay::{recover, Head};

/// How often a broken journal is tried again.
pub(super) const HEAL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

/// The committer's report, delivered to the actor.
pub(super) struct CommittedMsg(Committed);

impl Message for CommittedMsg {
    type Result = ();
}

/// Where a load's answer goes once it is staged.
pub(super) type LoadReply = Box<dyn FnOnce(Durable<Loaded>)>;

/// A load waiting for the loads before it, or for the plugin thread.
pub(super) struct QueuedLoad {
    pub(super) ticket: u64,
    /// The scope it was asked in: it is staged later, while another request's is current.
    pub(super) scope: Scope,
    pub(super) key: String,
    pub(super) saved: SavedEntry,
    /// The system check's complaint, in `system_check = "report"` mode.
    pub(super) mismatch: Option<String>,
    /// The backends and their ready-to-use forms, once deserialized.
    pub(super) done: Option<Done>,
    pub(super) reply: LoadReply,
}

/// Tells the actor the plugin thread has results.
pub(super) struct LoadsReady;

impl Message for LoadsReady {
    type Result = ();
}

/// The actor. Its state is the fold of the log plus the changes staged after it.
pub struct ContextActor {
    pub(super) journal: Arc<dyn Journal>,
    /// The context and namespace of the request being decided ([`InScope`] sets it for one
    /// message); events staged meanwhile are wrapped in it.
    pub(super) scope: Scope,
    pub(super) settings: ActorSettings,
    pub(super) state: State,
    /// The last staged event (speculative: may not be durable yet).
    pub(super) head: Head,
    pub(super) last_snapshot: u64,
    /// About how many bytes the next snapshot takes: the last one's, plus the records staged
    /// since (each adds at most about its size to the state). Its buffer starts this large.
    pub(super) snapshot_hint: usize,
    /// What the request being handled staged before its events (content, load hits).
    pub(super) staging: Group,
    pub(super) committer: Option<Committer>,
    pub(super) counters: LoadCounters,
    pub(super) stats: Stats,
    /// Set when storage failed in a way that needs the journal reopened; cleared by `heal`.
    pub(super) broken: Option<ContextError>,
    pub(super) last_heal: Option<std::time::Instant>,
    /// Set by a read that failed in sled itself; checked after each request.
    pub(super) suspect: AtomicBool,
    /// Content staged but not yet durable, by digest, with how many staged changes hold it.
    pub(super) pending_blobs: std::collections::HashMap<Digest, (std::sync::Arc<Vec<u8>>, usize)>,
    pub(super) closed: bool,
    /// The queue of the task that sends replies (set when the actor starts).
    pub(super) replier: Option<Replier>,
    /// The plugin thread (when plugins are loaded and it could start).
    pub(super) deserializer: Option<Deserializer>,
    /// Loads not yet staged, in arrival order; tickets count up from the front.
    pub(super) loads: std::collections::VecDeque<QueuedLoad>,
    pub(super) next_ticket: u64,
    /// Jobs not yet handed to the plugin thread, and whether a [`FlushJobs`] is on its way.
    pub(super) outbox: Vec<Job>,
    pub(super) flush_sent: bool,
    /// Why the plugin thread could not start, if it could not.
    pub(super) no_plugin_thread: Option<String>,
}

impl ContextActor {
    /// Starts the plugin thread, if plugins are loaded (before the actor runs, so the caller
    /// has the handle that stops plugin calls from the start). Without it, every plugin call
    /// fails with `plugin_failed`: a call made on the actor's thread could not be abandoned.
    pub fn start_plugin_thread(&mut self, addr: &Addr<Self>) -> Option<PluginStop> {
        if self.settings.kinds.plugins().is_empty() {
            return None;
        }
        let weak = addr.downgrade();
        let notify = move || {
            if let Some(a) = weak.upgrade() {
                a.do_send(LoadsReady);
            }
        };
        match Deserializer::start(self.settings.kinds.clone(), notify) {
            Ok(d) => {
                let stop = d.stopper();
                self.deserializer = Some(d);
                Some(stop)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start the plugin thread: plugin calls will fail");
                self.no_plugin_thread = Some(e.to_string());
                None
            }
        }
    }

    /// Why a plugin call cannot be made, when the plugin thread could not start.
    pub(super) fn no_thread(&self) -> ContextError {
        PluginError::NoThread {
            message: self
                .no_plugin_thread
                .clone()
                .unwrap_or_else(|| "it was not started".into()),
        }
        .into()
    }

    /// Runs the plugin edit `op` on the plugin thread, waiting at most its deadline.
    pub(super) fn plugin_edit(
        &self,
        key: &str,
        kind: &str,
        op: String,
        args: Vec<u8>,
        content: Vec<u8>,
    ) -> Result<Vec<u8>, ContextError> {
        match &self.deserializer {
            Some(d) => d.edit(EditJob {
                key: key.to_string(),
                kind: kind.to_string(),
                op: Some(op),
                args,
                content,
            }),
            // No plugin loaded: the registry says no plugin serves the kind, calling nothing.
            None if self.settings.kinds.plugins().is_empty() => {
                Ok(self.settings.kinds.edit(key, kind, &op, &args, &content)?)
            }
            None => Err(self.no_thread()),
        }
    }

    /// An actor over a journal, with the state replayed from it.
    pub fn new(
        journal: Arc<dyn Journal>,
        recovered: crate::store::replay::Recovered,
        settings: ActorSettings,
    ) -> Self {
        ContextActor {
            journal,
            scope: Scope::default(),
            settings,
            state: recovered.state,
            head: recovered.head,
            last_snapshot: recovered.snapshot.unwrap_or(0),
            snapshot_hint: 0,
            staging: Group::default(),
            committer: None,
            counters: LoadCounters::default(),
            stats: Stats::default(),
            broken: None,
            last_heal: None,
            suspect: AtomicBool::new(false),
            pending_blobs: std::collections::HashMap::new(),
            closed: false,
            replier: None,
            deserializer: None,
            loads: std::collections::VecDeque::new(),
            next_ticket: 0,
            outbox: Vec::new(),
            flush_sent: false,
            no_plugin_thread: None,
        }
    }

    /// Runs one request: decide (panics caught) and stage; the answer is sent once durable.
    /// Queued loads are finished first, so the request sees their changes.
    pub(super) fn run<T: Send + 'static>(
        &mut self,
        decide: impl FnOnce(&mut Self) -> Result<(Vec<Event>, T), ContextError>,
        map_commit_error: impl FnOnce(ContextError) -> ContextError + Send + 'static,
    ) -> Durable<T> {
        self.settle_loads();
        let decided = self.decide(decide);
        self.finish(decided, map_commit_error)
    }

    /// Decides a request against the current state: refused while closed or broken, and a
    /// panic is caught and becomes an error.
    pub(super) fn decide<T>(
        &mut self,
        decide: impl FnOnce(&mut Self) -> Result<T, ContextError>,
    ) -> Result<T, ContextError> {
        let decided = if self.closed {
            Err(ContextError::Closed)
        } else if let Err(e) = self.heal() {
            Err(e)
        } else if let Err(e) = self.journal.check_held() {
            // A fleet's holder whose lease may have run out: its state may be stale.
            Err(ContextError::from(e))
        } else {
            catch_unwind(AssertUnwindSafe(|| decide(self))).unwrap_or_else(|panic| {
                let message = crate::actor::error::panic_message(&panic);
                tracing::error!(%message, "request handler panicked; nothing was changed");
                Err(ContextError::Panicked { message })
            })
        };
        if self.suspect.swap(false, Ordering::Relaxed) && self.broken.is_none() {
            self.broken = Some(ContextError::Storage {
                message: "a read failed in the storage layer".into(),
                no_space: false,
            });
            self.last_heal = None;
            let _ = self.heal();
        }
        decided
    }

    /// Stages a decided request's events; its answer is sent once they are durable.
    pub(super) fn finish<T: Send + 'static>(
        &mut self,
        decided: Result<(Vec<Event>, T), ContextError>,
        map_commit_error: impl FnOnce(ContextError) -> ContextError + Send + 'static,
    ) -> Durable<T> {
        let outcome = decided.and_then(|(events, value)| Ok((self.stage(events)?, value)));
        let staged = std::mem::take(&mut self.staging);
        if outcome.is_err() {
            self.release_blobs(staged.commit.blobs.iter().map(|b| b.0).collect());
        }
        Durable {
            outcome,
            staged,
            intake: self.committer.as_ref().map(Committer::intake),
            replier: self.replier.clone(),
            map_commit_error: Box::new(map_commit_error),
            recover: None,
        }
    }

    /// Numbers, encodes and applies events. Encoding comes first, so a failure applies none.
    pub(super) fn stage(&mut self, events: Vec<Event>) -> Result<Option<u64>, ContextError> {
        if events.is_empty() {
            return Ok(None);
        }
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let origin = match &self.scope.peer {
            Some(peer) => format!("{} via {peer}", self.settings.origin),
            None => self.settings.origin.clone(),
        };
        let mut head = self.head;
        let mut records = Vec::with_capacity(events.len());
        let mut cache_puts = Vec::new();
        let mut shared = Vec::new();
        for event in events {
            let mut event = self.in_scope(event);
            if let Some(request_id) = &self.scope.request_id {
                event = Event::Requested {
                    request_id: request_id.clone(),
                    event: Box::new(event),
                    fingerprint: self.scope.request_fingerprint,
                };
            }
            let envelope = Envelope {
                schema: SCHEMA_VERSION,
                seq: head.seq + 1,
                time_ms,
                origin: origin.clone(),
                prev: head.hash,
                event,
            };
            let (bytes, hash) = encode_event(&envelope)?;
            // Told to the cluster bound to this record (its place and hash), which the
            // loaders in other journals check the row against.
            if let Some(journal) = self.journal.cluster_name() {
                shared.extend(crate::store::journal::SharedCacheOp::of_event(
                    &envelope.event,
                    journal,
                    &self.scope.context,
                    &self.scope.namespace,
                    (envelope.seq, hash),
                )?);
            }
            self.snapshot_hint = self.snapshot_hint.saturating_add(bytes.len());
            // sled's view of the default namespace (other namespaces live in the log and
            // snapshots only; the view is checked against the log at every open).
            match envelope.event.change() {
                Event::SavedToDynamoCache { entries } => {
                    for (key, entry) in entries {
                        cache_puts.push((key.clone(), encode_saved_entry(entry)?));
                    }
                }
                Event::CacheEntryPut {
                    namespace,
                    key,
                    entry,
                    ..
                } if namespace == DEFAULT => {
                    cache_puts.push((key.clone(), encode_saved_entry(entry)?));
                }
                _ => {}
            }
            head = Head {
                seq: envelope.seq,
                hash,
            };
            records.push((envelope.seq, bytes, envelope.event));
        }
        for (seq, bytes, event) in records {
            self.state.apply(event);
            self.staging.commit.records.push((seq, bytes));
        }
        self.staging.commit.cache_puts.extend(cache_puts);
        self.staging.commit.shared_cache.extend(shared);
        self.head = head;
        // A snapshot costs about as much as its items, so they are written no more often
        // than once per that many events: a constant cost per event at any state size. (Every
        // 10,000 events was a third of W1's time.)
        let due = self.settings.snapshot_every.max(self.state.items());
        if head.seq - self.last_snapshot >= due {
            self.snapshot_now();
        }
        Ok(Some(head.seq))
    }

    /// Stages a snapshot of the state at the head, with the group that holds the head's event
    /// (or after it), so it is never durable before that event.
    pub(super) fn snapshot_now(&mut self) {
        match encode_snapshot_of(
            self.head.seq,
            self.head.hash,
            &self.state,
            self.snapshot_hint,
        ) {
            Ok(bytes) => {
                self.snapshot_hint = bytes.len();
                self.staging.commit.snapshot = Some((self.head.seq, bytes));
                self.last_snapshot = self.head.seq;
            }
            Err(e) => tracing::warn!(error = %e, "snapshot skipped"),
        }
    }

    /// Calls `waiter` once everything staged so far is durable.
    /// Load hits made durable so far.
    pub(super) fn hits(&self) -> u64 {
        self.committer.as_ref().map_or(0, |c| {
            c.hit_counter().load(std::sync::atomic::Ordering::SeqCst)
        })
    }

    /// Queues what this request staged with its answer, which is sent once it (and all
    /// before it) is durable.
    pub(super) fn when_durable(&mut self, waiter: Waiter) {
        let staged = std::mem::take(&mut self.staging);
        match &self.committer {
            Some(c) => c.intake().push(staged, waiter),
            None => waiter(Err(ContextError::Closed)),
        }
    }

    /// After a failed commit: the log is the truth, so rebuild from it.
    pub(super) fn reload(&mut self) {
        // Queued loads were decided on the state being dropped: they may name an entry or
        // content that was never made durable.
        self.fail_queued_loads(&ContextError::Aborted {
            message: "the context was rebuilt from the log after a failed commit".into(),
        });
        match recover(self.journal.as_ref()) {
            Ok(r) => {
                self.state = r.state;
                self.head = r.head;
                self.last_snapshot = r.snapshot.unwrap_or(0);
                self.broken = None;
                if let Err(e) = sync_cache_view(self.journal.as_ref(), &self.state) {
                    tracing::error!(error = %e, "could not rebuild the dynamo cache view");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot replay the log after a failed commit; will retry on the next request");
                self.broken = Some(match e {
                    crate::store::replay::ReplayError::Store(s) => ContextError::from(s),
                    other => ContextError::Storage {
                        message: other.to_string(),
                        no_space: false,
                    },
                });
            }
        }
    }

    /// After a storage failure that left the journal unusable: reopen it and replay, at most
    /// a few times a second, so the context works again once the cause (a full disk) is gone.
    pub(super) fn heal(&mut self) -> Result<(), ContextError> {
        let Some(err) = self.broken.clone() else {
            return Ok(());
        };
        let now = std::time::Instant::now();
        if self
            .last_heal
            .is_some_and(|t| now.duration_since(t) < HEAL_INTERVAL)
        {
            return Err(err);
        }
        self.last_heal = Some(now);
        if let Err(e) = self.journal.reset() {
            tracing::warn!(error = %e, "the event log cannot be reopened yet");
            let e = ContextError::from(e);
            self.broken = Some(e.clone());
            return Err(e);
        }
        self.reload();
        match &self.broken {
            None => {
                tracing::info!("the context works again");
                Ok(())
            }
            Some(e) => Err(e.clone()),
        }
    }

    pub(super) fn content(&self, key: &str, r: &ArtifactRef) -> Result<Vec<u8>, ContextError> {
        self.reader().read(key, r)
    }

    pub(super) fn reader(&self) -> ContentReader<'_> {
        ContentReader {
            pending: &self.pending_blobs,
            journal: self.journal.as_ref(),
            suspect: &self.suspect,
        }
    }

    /// The context the request being decided acts in.
    pub(super) fn here(&self) -> crate::core::state::ContextRef<'_> {
        self.state.context(&self.scope.context)
    }

    pub(super) fn artifact(&self, key: &str) -> Result<Option<Artifact>, ContextError> {
        match self.here().artifacts.get(key) {
            None => Ok(None),
            Some(r) => Ok(Some(Artifact {
                key: key.to_string(),
                kind: r.kind.clone(),
                content: self.content(key, r)?,
            })),
        }
    }

    /// Stores content and gives the reference an event carries.
    /// Stages content for the open group (written with its events, in one batch) and gives
    /// the reference an event carries. Until durable it is read from memory.
    pub(super) fn store_content(
        &mut self,
        key: &str,
        kind: &str,
        content: Vec<u8>,
    ) -> Result<ArtifactRef, ContextError> {
        let size = content.len() as u64;
        if size > self.settings.max_content_bytes {
            return Err(ContextError::TooLarge {
                key: key.to_string(),
                size,
                limit: self.settings.max_content_bytes,
            });
        }
        let digest = Digest::of(&content);
        let content = std::sync::Arc::new(content);
        self.pending_blobs
            .entry(digest)
            .or_insert_with(|| (content.clone(), 0))
            .1 += 1;
        self.staging.commit.blobs.push((digest, content));
        Ok(ArtifactRef {
            kind: kind.to_string(),
            digest,
            size,
        })
    }

    /// Forgets staged content once its group is done (durable or failed).
    pub(super) fn release_blobs(&mut self, digests: Vec<Digest>) {
        for d in digests {
            if let std::collections::hash_map::Entry::Occupied(mut e) = self.pending_blobs.entry(d)
            {
                e.get_mut().1 -= 1;
                if e.get().1 == 0 {
                    e.remove();
                }
            }
        }
    }

    /// Stitches the state; a large one in two halves side by side, the second on a thread of
    /// its own. A stitch reads contents back and builds its result, work that waits on memory
    /// more than it computes, and the committer has nothing to do meanwhile: W1's stitch of
    /// 10,000 entries took 0.135 s on one thread.
    pub(super) fn stitch<B: Send>(
        &self,
        answer_trace: bool,
        resolve: impl Fn(&ContentReader<'_>, &str, &ArtifactRef) -> Result<B, String> + Sync,
    ) -> Stitch<B> {
        let traced = answer_trace || crate::actor::structured::enabled();
        let state = self.state.context(&self.scope.context);
        let mut out = Stitch::begin(state, traced);
        let reader = self.reader();
        let part = |entries: &indexmap::map::Slice<_, _>| {
            stitch_part(state, entries, traced, |id, r| resolve(&reader, id, r))
        };
        let all = state.entries.as_slice();
        if all.len() < SPLIT_STITCH_FROM {
            out.append(part(all));
        } else {
            let (first, second) = all.split_at(all.len() / 2);
            // The helper logs where this thread does.
            let logs = tracing::dispatcher::get_default(|d| d.clone());
            std::thread::scope(|s| {
                let helper = std::thread::Builder::new()
                    .name("pcx-stitch".into())
                    .spawn_scoped(s, || {
                        tracing::dispatcher::with_default(&logs, || part(second))
                    });
                out.append(part(first));
                let rest = match helper {
                    Ok(h) => h
                        .join()
                        // The request's own panic handling reports it.
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                    Err(e) => {
                        tracing::debug!(error = %e, "no thread for half the stitch: one does it all");
                        part(second)
                    }
                };
                out.append(rest);
            });
        }
        for t in &out.trace {
            crate::actor::structured::emit(t);
        }
        out
    }
}

/// A stitch of fewer entries runs on the actor's thread alone: a thread costs tens of
/// microseconds, an entry about ten.
pub(super) const SPLIT_STITCH_FROM: usize = 512;

/// Reads contents for a request: staged ones from memory, the rest from the journal. It
/// borrows only what reading needs, so the threads of a split stitch can share it.
pub(super) struct ContentReader<'a> {
    pub(super) pending: &'a std::collections::HashMap<Digest, (std::sync::Arc<Vec<u8>>, usize)>,
    pub(super) journal: &'a dyn Journal,
    /// The actor's flag for a read that failed in sled itself.
    pub(super) suspect: &'a AtomicBool,
}

impl ContentReader<'_> {
    pub(super) fn read(&self, key: &str, r: &ArtifactRef) -> Result<Vec<u8>, ContextError> {
        if let Some((c, _)) = self.pending.get(&r.digest) {
            return Ok(c.as_ref().clone());
        }
        let unavailable = |message: String| ContextError::ContentUnavailable {
            key: key.to_string(),
            digest: r.digest.to_hex(),
            message,
        };
        match self.journal.blob(&r.digest) {
            Ok(Some(c)) => Ok(c),
            Ok(None) => Err(unavailable("missing from the blob store".into())),
            Err(e) => {
                // sled fails reads too once it has kept a write error: reopen after this request.
                if matches!(
                    e,
                    StoreError::Sled { .. }
                        | StoreError::SledRead { .. }
                        | StoreError::SledEvents { .. }
                ) {
                    self.suspect.store(true, Ordering::Relaxed);
                }
                Err(unavailable(e.to_string()))
            }
        }
    }
}

/// Makes the sled dynamo cache view hold exactly the state's saved entries.
pub fn sync_cache_view(journal: &dyn Journal, state: &State) -> Result<(), ContextError> {
    let entries = state
        .dynamo_cache
        .iter()
        .map(|(k, e)| Ok((k.clone(), encode_saved_entry(e)?)))
        .collect::<Result<Vec<_>, crate::store::record::EncodeError>>()?;
    journal.rewrite_cache_view(&entries)?;
    Ok(())
}

/// Kind names are `[a-z0-9_.-]{1,64}`: they name plugins' kinds in logs, paths and JSON.
pub(super) fn validate_kind(kind: &str) -> Result<(), ContextError> {
    let ok = (1..=64).contains(&kind.len())
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ContextError::InvalidKind {
            kind: kind.to_string(),
        })
    }
}

pub(super) fn same(e: ContextError) -> ContextError {
    e
}

impl Actor for ContextActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let addr = ctx.address();
        // Answers are sent from this thread, where the callers' futures live (a wake-up from
        // another thread per answer cost W1 five times its time); the committer hands over
        // each group's answers in one go.
        let (replier, mut replies) = tokio::sync::mpsc::unbounded_channel::<Reply>();
        actix_rt::spawn(async move {
            while let Some(reply) = replies.recv().await {
                reply();
            }
        });
        self.replier = Some(replier);
        let (answers, mut to_answer) = tokio::sync::mpsc::unbounded_channel::<Vec<Waiter>>();
        actix_rt::spawn(async move {
            while let Some(waiters) = to_answer.recv().await {
                for w in waiters {
                    w(Ok(()));
                }
            }
        });
        let answer = move |waiters: Vec<Waiter>| {
            if let Err(unsent) = answers.send(waiters) {
                // The actor's thread is gone: answer from here.
                for w in unsent.0 {
                    w(Ok(()));
                }
            }
        };
        let report = move |c| addr.do_send(CommittedMsg(c));
        match Committer::start(self.journal.clone(), answer, report) {
            Ok(c) => self.committer = Some(c),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the committer thread");
                self.closed = true;
            }
        }
    }
}

impl Handler<CommittedMsg> for ContextActor {
    type Result = ();

    fn handle(&mut self, msg: CommittedMsg, _ctx: &mut Self::Context) {
        let msg = msg.0;
        self.release_blobs(msg.blobs);
        match msg.result {
            Ok(()) => {
                tracing::debug!(last_seq = msg.last_seq, "group durable");
                if msg.snapshot.is_some() {
                    self.stats.snapshots += 1;
                }
                self.stats.events_appended += msg.events;
                self.stats.flushes += 1;
            }
            Err((err, reopen)) => {
                self.stats.failed_commits += 1;
                tracing::error!(error = %err, last_seq = msg.last_seq, "commit failed; its changes were not applied");
                // Everything staged since is refused by the halted queue: none of it stays.
                self.pending_blobs.clear();
                if reopen {
                    // sled keeps its first write error until reopened: take it up afresh.
                    self.broken = Some(err);
                    self.last_heal = None;
                    let _ = self.heal();
                } else {
                    self.reload();
                }
                if let Some(c) = &self.committer {
                    c.resume();
                }
                for (w, e) in msg.refused {
                    w(Err(e));
                }
            }
        }
    }
}

impl<T, M> actix::dev::MessageResponse<ContextActor, M> for Durable<T>
where
    T: Send + 'static,
    M: Message<Result = Answer<T>>,
{
    fn handle(
        self,
        _: &mut Context<ContextActor>,
        tx: Option<actix::dev::OneshotSender<Answer<T>>>,
    ) {
        match tx {
            Some(tx) => self.reply_with(move |answer| {
                let _ = tx.send(answer);
            }),
            // Nobody waits for the answer: the changes are still queued.
            None => self.send(drop),
        }
    }
}
