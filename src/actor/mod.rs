//! The context actor: the single writer of a data directory.
//!
//! Every request runs the same steps: **decide** (validate against the current state; may
//! reject, changes nothing) → **stage** (number and encode the events, then `apply` them) →
//! **durable** (the group commit that holds them is flushed and synced) → **answer**.
//!
//! Group commit ([`crate::committer`]): staged records collect in a queue while the previous
//! group is being made durable on the committer thread, which takes the whole queue when it
//! is free and hands the group's answers back to this thread in one go. Under load a group
//! holds everything that arrived during one sync. Reads are answered in the same order: a
//! read waits for the changes staged before it, so nobody sees a change before it is durable.
//!
//! Loads with backends of plugin kinds are the one exception to "one request at a time":
//! their plugin calls run on the plugin thread ([`crate::deserializer`]) while the actor
//! takes the next message. They are staged in arrival order, and every other request first
//! waits for them (`settle_loads`), so each request still sees the state as if every request
//! before it had been done whole.
//!
//! If a commit fails, every request of that group and of those queued behind it gets an
//! error (once the state is rebuilt from the log), and the journal takes the group back:
//! nothing half-applied, nothing answered and then lost. A panic while deciding is caught and
//! answered as an error; the actor keeps serving.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use indexmap::IndexMap;
use tokio::sync::oneshot;

use crate::committer::{Committed, Committer, Group, Intake, Waiter};
use crate::deserializer::{deserialize_all, Backend, Deserializer, Done, Job};
use crate::error::ContextError;
use crate::event::Event;
use crate::event::SavedEntry;
use crate::journal::{Journal, StoreError};
use crate::kinds::{Deserialized, Kinds};
use crate::model::{
    Artifact, ArtifactRef, DebugInfo, Digest, DynamoCacheEntry, PrecompileCacheEntry, SystemInfo,
    EAGER_KIND,
};
use crate::record::{
    encode_event, encode_saved_entry, encode_snapshot_of, Envelope, SCHEMA_VERSION,
};
use crate::replay::{recover, Head};
use crate::state::State;
use crate::stitch::{stitch_part, Stitch};

/// A successful answer: the value, and the sequence number of the last event the request
/// wrote (none for a request that changed nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack<T> {
    pub seq: Option<u64>,
    pub value: T,
}

/// What every message answers.
pub type Answer<T> = Result<Ack<T>, ContextError>;

/// A stitched entry with its backends' content.
pub type StitchedEntry = PrecompileCacheEntry<Artifact>;

/// `create_cache_entries`' value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stitched {
    pub entries: IndexMap<String, StitchedEntry>,
    pub debug_info: DebugInfo,
}

/// `load_cache_entry`'s value: the entry, and each backend's ready-to-use form.
#[derive(Clone, Debug, PartialEq)]
pub struct Loaded {
    pub entry: StitchedEntry,
    pub deserialized: IndexMap<String, Deserialized>,
}

/// Process-wide counts, as PyTorch's `counters["dynamo_cache"]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadCounters {
    pub hit: u64,
    pub miss: u64,
    pub error: u64,
}

/// What the context has done since it started, for `stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub events_appended: u64,
    /// Group commits made durable (one flush + sync each).
    pub flushes: u64,
    pub failed_commits: u64,
    pub snapshots: u64,
    pub stitches: u64,
    pub dynamo_cache_hits: u64,
    pub dynamo_cache_misses: u64,
    pub dynamo_cache_errors: u64,
    pub plugin_calls: u64,
    pub plugin_failures: u64,
    /// Changes staged and waiting for the next commit, plus those being committed now.
    pub queue_depth: u64,
    /// The last event's sequence number.
    pub head_seq: u64,
}

/// An edit's function: old content → new content, or a message saying why not.
pub type EditFn = Box<dyn FnOnce(Vec<u8>) -> Result<Vec<u8>, String> + Send>;

/// How an edit makes the new content: a Rust function, or a named edit of the plugin that
/// serves the artifact's kind.
pub enum Edit {
    Apply(EditFn),
    Plugin { op: String, args: Vec<u8> },
}

/// Settings the actor needs.
#[derive(Clone, Debug)]
pub struct ActorSettings {
    pub snapshot_every: u64,
    pub max_content_bytes: u64,
    pub origin: String,
    pub kinds: Kinds,
}

macro_rules! message {
    ($(#[$doc:meta])* $name:ident { $($field:ident : $ty:ty),* } -> $out:ty) => {
        $(#[$doc])*
        pub struct $name { $(pub $field: $ty),* }
        impl Message for $name {
            type Result = Answer<$out>;
        }
    };
}

message!(/// `record_artifact`.
    RecordArtifact { artifact: Artifact } -> ());
message!(/// `record_dynamo_cache_entry`.
    RecordEntry { key: String, entry: DynamoCacheEntry } -> ());
message!(/// `edit_artifact`: `edit` runs on the current content; `label` is logged with the result.
    EditArtifact { key: String, label: String, edit: Edit } -> ());
message!(/// `serialize_artifact_by_key`.
    GetArtifact { key: String } -> Option<Artifact>);
message!(/// `take_artifact`.
    TakeArtifact { key: String } -> Option<Artifact>);
message!(/// `clear`.
    Clear {} -> ());
message!(/// `dump_debug_info`.
    DumpDebugInfo {} -> DebugInfo);
message!(/// `create_cache_entries` (stitch).
    CreateCacheEntries {} -> Stitched);
message!(/// `save_to_dynamo_cache`.
    SaveToDynamoCache {} -> DebugInfo);
message!(/// `load_cache_entry`, with the caller's system info to check against, if given.
    LoadCacheEntry { key: String, system_info: Option<SystemInfo> } -> Loaded);
message!(/// An audit question about the log (log, history, state, diff, verify), answered once
    /// every change accepted before it is durable, on a thread of its own.
    Audit { query: crate::audit::Query } -> serde_json::Map<String, serde_json::Value>);
message!(/// What the context has done since it started.
    GetStats {} -> Stats);
message!(/// The current load counters.
    GetLoadCounters {} -> LoadCounters);
message!(/// A digest of the whole state (order included), for comparing contexts.
    StateDigest {} -> Digest);
message!(/// Waits until everything accepted is durable, then stops the actor and releases the data
    /// directory.
    Close {} -> ());

/// How often a broken journal is tried again.
const HEAL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

/// A request's answer, sent once its changes (and every change before them) are durable.
///
/// Its changes are queued for the committer as soon as the handler returns. The reply is
/// sent to actix's reply channel by the actor's replier task, not by whoever hands out the
/// answer: sending it straight from there (the committer's thread, or the task that hands
/// out a group's answers) made the caller's futures re-poll in lock step, and W1's records
/// took 4.5 s instead of 0.45 s.
pub struct Durable<T> {
    outcome: Result<(Option<u64>, T), ContextError>,
    staged: Group,
    intake: Option<Intake>,
    /// Where the reply goes to be sent, by the actor's replier task.
    replier: Option<Replier>,
    map_commit_error: Box<dyn FnOnce(ContextError) -> ContextError + Send>,
}

/// A reply ready to be sent, and the queue of the one task on the actor's thread that sends
/// them: replies reach actix's reply channels from that task, after the answers of a whole
/// group have been handed out (see [`Durable`]), at the cost of one queue push per reply,
/// not one task and one channel per request.
type Reply = Box<dyn FnOnce() + Send>;
type Replier = tokio::sync::mpsc::UnboundedSender<Reply>;

impl<T: Send + 'static> Durable<T> {
    /// Queues the staged changes; `reply` gets the answer once they are durable.
    fn send(self, reply: impl FnOnce(Answer<T>) + Send + 'static) {
        let Durable {
            outcome,
            staged,
            intake,
            replier: _,
            map_commit_error,
        } = self;
        match (outcome, intake) {
            (Err(e), _) => reply(Err(e)),
            (Ok(_), None) => reply(Err(ContextError::Closed)),
            (Ok((seq, value)), Some(intake)) => intake.push(
                staged,
                Box::new(move |r| reply(r.map(|()| Ack { seq, value }).map_err(map_commit_error))),
            ),
        }
    }

    /// The answer as a future (for the actor's own use).
    fn into_future(self) -> impl std::future::Future<Output = Answer<T>> {
        let (tx, rx) = oneshot::channel();
        self.send(move |a| {
            let _ = tx.send(a);
        });
        async move { rx.await.unwrap_or(Err(ContextError::Closed)) }
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

impl<T: Send + 'static> Durable<T> {
    /// Like [`Durable::send`], with `deliver` run by the actor's replier task.
    fn reply_with(self, deliver: impl FnOnce(Answer<T>) + Send + 'static) {
        let replier = self.replier.clone();
        self.send(move |answer| {
            let reply: Reply = Box::new(move || deliver(answer));
            match &replier {
                Some(r) => {
                    if let Err(unsent) = r.send(reply) {
                        // The replier is gone (the actor stopped): send from here.
                        (unsent.0)();
                    }
                }
                None => reply(),
            }
        });
    }
}

/// Where a pipelined request's answer goes: the pipeline's queue, with the request's tag.
/// An answer dropped unsent (the request never handled: the actor stopped) still arrives, as
/// [`ContextError::Closed`], so a pipeline never waits for an answer that cannot come.
pub struct TaggedReply<T: Send + 'static> {
    tag: u64,
    to: Option<tokio::sync::mpsc::UnboundedSender<(u64, Answer<T>)>>,
}

impl<T: Send + 'static> TaggedReply<T> {
    fn answer(mut self, answer: Answer<T>) {
        if let Some(to) = self.to.take() {
            // A pipeline that was dropped takes no answers.
            let _ = to.send((self.tag, answer));
        }
    }
}

impl<T: Send + 'static> Drop for TaggedReply<T> {
    fn drop(&mut self) {
        if let Some(to) = self.to.take() {
            let _ = to.send((self.tag, Err(ContextError::Closed)));
        }
    }
}

/// A request sent through a [`crate::context::Pipeline`]: answered to the pipeline's queue
/// instead of to a future of its own.
pub struct Tagged<M, T: Send + 'static> {
    msg: M,
    reply: TaggedReply<T>,
}

impl<M, T: Send + 'static> Tagged<M, T> {
    pub(crate) fn new(
        msg: M,
        tag: u64,
        to: tokio::sync::mpsc::UnboundedSender<(u64, Answer<T>)>,
    ) -> Self {
        Tagged {
            msg,
            reply: TaggedReply { tag, to: Some(to) },
        }
    }
}

impl<M, T: Send + 'static> Message for Tagged<M, T> {
    type Result = ();
}

/// The requests a pipeline takes: those that change the context, and loads.
macro_rules! pipelined {
    ($($m:ty => $t:ty),*) => {$(
        impl Handler<Tagged<$m, $t>> for ContextActor {
            type Result = ();

            fn handle(&mut self, tagged: Tagged<$m, $t>, ctx: &mut Self::Context) {
                let Tagged { msg, reply } = tagged;
                <Self as Handler<$m>>::handle(self, msg, ctx).send(move |answer| reply.answer(answer));
            }
        }
    )*};
}

pipelined!(RecordArtifact => (), RecordEntry => (), EditArtifact => ());

impl Handler<Tagged<LoadCacheEntry, Loaded>> for ContextActor {
    type Result = ();

    fn handle(&mut self, tagged: Tagged<LoadCacheEntry, Loaded>, ctx: &mut Self::Context) {
        let Tagged { msg, reply } = tagged;
        let reply: LoadReply = Box::new(move |d| d.send(move |answer| reply.answer(answer)));
        self.load(msg, reply, ctx);
    }
}

/// Where a load's answer goes once it is staged.
type LoadReply = Box<dyn FnOnce(Durable<Loaded>)>;

/// A load waiting for the loads before it, or for the plugin thread.
struct QueuedLoad {
    ticket: u64,
    key: String,
    saved: SavedEntry,
    /// The backends and their ready-to-use forms, once deserialized.
    done: Option<Done>,
    reply: LoadReply,
}

/// Tells the actor the plugin thread has results.
struct LoadsReady;

impl Message for LoadsReady {
    type Result = ();
}

/// Sent by the actor to itself behind the messages already in its mailbox: hands the jobs
/// gathered meanwhile to the plugin thread.
struct FlushJobs;

impl Message for FlushJobs {
    type Result = ();
}

/// Jobs are handed to the plugin thread in batches of at most this many. One hand-off per
/// load woke the plugin thread every time, and each wake-up took the CPU from the actor (on
/// two cores, with the committer on the other); a batch much larger leaves the plugin thread
/// idle while the actor gathers it.
const JOB_BATCH: usize = 64;

/// The committer's report, delivered to the actor.
struct CommittedMsg(Committed);

impl Message for CommittedMsg {
    type Result = ();
}

/// The actor. Its state is the fold of the log plus the changes staged after it.
pub struct ContextActor {
    journal: Arc<dyn Journal>,
    settings: ActorSettings,
    state: State,
    /// The last staged event (speculative: may not be durable yet).
    head: Head,
    last_snapshot: u64,
    /// About how many bytes the next snapshot takes: the last one's, plus the records staged
    /// since (each adds at most about its size to the state). Its buffer starts this large.
    snapshot_hint: usize,
    /// What the request being handled staged before its events (content, load hits).
    staging: Group,
    committer: Option<Committer>,
    counters: LoadCounters,
    stats: Stats,
    /// Set when storage failed in a way that needs the journal reopened; cleared by `heal`.
    broken: Option<ContextError>,
    last_heal: Option<std::time::Instant>,
    /// Set by a read that failed in sled itself; checked after each request.
    suspect: AtomicBool,
    /// Content staged but not yet durable, by digest, with how many staged changes hold it.
    pending_blobs: std::collections::HashMap<Digest, (std::sync::Arc<Vec<u8>>, usize)>,
    closed: bool,
    /// The queue of the task that sends replies (set when the actor starts).
    replier: Option<Replier>,
    /// The plugin thread (when plugins are loaded and it could start).
    deserializer: Option<Deserializer>,
    /// Loads not yet staged, in arrival order; tickets count up from the front.
    loads: std::collections::VecDeque<QueuedLoad>,
    next_ticket: u64,
    /// Jobs not yet handed to the plugin thread, and whether a [`FlushJobs`] is on its way.
    outbox: Vec<Job>,
    flush_sent: bool,
}

impl ContextActor {
    /// An actor over a journal, with the state replayed from it.
    pub fn new(
        journal: Arc<dyn Journal>,
        recovered: crate::replay::Recovered,
        settings: ActorSettings,
    ) -> Self {
        ContextActor {
            journal,
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
        }
    }

    /// Runs one request: decide (panics caught) and stage; the answer is sent once durable.
    /// Queued loads are finished first, so the request sees their changes.
    fn run<T: Send + 'static>(
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
    fn decide<T>(
        &mut self,
        decide: impl FnOnce(&mut Self) -> Result<T, ContextError>,
    ) -> Result<T, ContextError> {
        let decided = if self.closed {
            Err(ContextError::Closed)
        } else if let Err(e) = self.heal() {
            Err(e)
        } else {
            catch_unwind(AssertUnwindSafe(|| decide(self))).unwrap_or_else(|panic| {
                let message = panic_message(&panic);
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
    fn finish<T: Send + 'static>(
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
        }
    }

    /// Numbers, encodes and applies events. Encoding comes first, so a failure applies none.
    fn stage(&mut self, events: Vec<Event>) -> Result<Option<u64>, ContextError> {
        if events.is_empty() {
            return Ok(None);
        }
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut head = self.head;
        let mut records = Vec::with_capacity(events.len());
        let mut cache_puts = Vec::new();
        for event in events {
            let envelope = Envelope {
                schema: SCHEMA_VERSION,
                seq: head.seq + 1,
                time_ms,
                origin: self.settings.origin.clone(),
                prev: head.hash,
                event,
            };
            let (bytes, hash) = encode_event(&envelope)?;
            self.snapshot_hint = self.snapshot_hint.saturating_add(bytes.len());
            if let Event::SavedToDynamoCache { entries } = &envelope.event {
                for (key, entry) in entries {
                    cache_puts.push((key.clone(), encode_saved_entry(entry)?));
                }
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
    fn snapshot_now(&mut self) {
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
    fn hits(&self) -> u64 {
        self.committer.as_ref().map_or(0, |c| {
            c.hit_counter().load(std::sync::atomic::Ordering::SeqCst)
        })
    }

    /// Queues what this request staged with its answer, which is sent once it (and all
    /// before it) is durable.
    fn when_durable(&mut self, waiter: Waiter) {
        let staged = std::mem::take(&mut self.staging);
        match &self.committer {
            Some(c) => c.intake().push(staged, waiter),
            None => waiter(Err(ContextError::Closed)),
        }
    }

    /// After a failed commit: the log is the truth, so rebuild from it.
    fn reload(&mut self) {
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
                    crate::replay::ReplayError::Store(s) => ContextError::from(s),
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
    fn heal(&mut self) -> Result<(), ContextError> {
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

    fn content(&self, key: &str, r: &ArtifactRef) -> Result<Vec<u8>, ContextError> {
        self.reader().read(key, r)
    }

    fn reader(&self) -> ContentReader<'_> {
        ContentReader {
            pending: &self.pending_blobs,
            journal: self.journal.as_ref(),
            suspect: &self.suspect,
        }
    }

    fn artifact(&self, key: &str) -> Result<Option<Artifact>, ContextError> {
        match self.state.artifacts.get(key) {
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
    fn store_content(
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
    fn release_blobs(&mut self, digests: Vec<Digest>) {
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
    fn stitch<B: Send>(
        &self,
        resolve: impl Fn(&ContentReader<'_>, &str, &ArtifactRef) -> Result<B, String> + Sync,
    ) -> Stitch<B> {
        let traced = crate::trace::structured_enabled();
        let mut out = Stitch::begin(&self.state, traced);
        let reader = self.reader();
        let state = &self.state;
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
            crate::trace::structured(t);
        }
        out
    }
}

/// A stitch of fewer entries runs on the actor's thread alone: a thread costs tens of
/// microseconds, an entry about ten.
const SPLIT_STITCH_FROM: usize = 512;

/// Reads contents for a request: staged ones from memory, the rest from the journal. It
/// borrows only what reading needs, so the threads of a split stitch can share it.
struct ContentReader<'a> {
    pending: &'a std::collections::HashMap<Digest, (std::sync::Arc<Vec<u8>>, usize)>,
    journal: &'a dyn Journal,
    /// The actor's flag for a read that failed in sled itself.
    suspect: &'a AtomicBool,
}

impl ContentReader<'_> {
    fn read(&self, key: &str, r: &ArtifactRef) -> Result<Vec<u8>, ContextError> {
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
        .collect::<Result<Vec<_>, crate::record::EncodeError>>()?;
    journal.rewrite_cache_view(&entries)?;
    Ok(())
}

/// Kind names are `[a-z0-9_.-]{1,64}`: they name plugins' kinds in logs, paths and JSON.
fn validate_kind(kind: &str) -> Result<(), ContextError> {
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

pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

fn same(e: ContextError) -> ContextError {
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
        if !self.settings.kinds.plugins().is_empty() {
            let weak = addr.downgrade();
            let notify = move || {
                if let Some(a) = weak.upgrade() {
                    a.do_send(LoadsReady);
                }
            };
            match Deserializer::start(self.settings.kinds.clone(), notify) {
                Ok(d) => self.deserializer = Some(d),
                // Loads then call their plugins on this thread.
                Err(e) => tracing::warn!(error = %e, "cannot start the plugin thread"),
            }
        }
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

impl Handler<RecordArtifact> for ContextActor {
    type Result = Durable<()>;

    fn handle(&mut self, msg: RecordArtifact, _: &mut Self::Context) -> Self::Result {
        self.run(
            move |this| {
                let a = msg.artifact;
                validate_kind(&a.kind)?;
                let r = this.store_content(&a.key, &a.kind, a.content)?;
                Ok((
                    vec![Event::ArtifactRecorded {
                        key: a.key,
                        kind: r.kind,
                        digest: r.digest,
                        size: r.size,
                    }],
                    (),
                ))
            },
            same,
        )
    }
}

impl Handler<RecordEntry> for ContextActor {
    type Result = Durable<()>;

    fn handle(&mut self, msg: RecordEntry, _: &mut Self::Context) -> Self::Result {
        self.run(
            move |_| {
                msg.entry
                    .validate()
                    .map_err(|reason| ContextError::InvalidEntry {
                        key: msg.key.clone(),
                        reason,
                    })?;
                Ok((
                    vec![Event::DynamoEntryRecorded {
                        key: msg.key,
                        entry: msg.entry,
                    }],
                    (),
                ))
            },
            same,
        )
    }
}

impl Handler<EditArtifact> for ContextActor {
    type Result = Durable<()>;

    fn handle(&mut self, msg: EditArtifact, _: &mut Self::Context) -> Self::Result {
        self.run(
            move |this| {
                let EditArtifact { key, label, edit } = msg;
                let Some(current) = this.state.artifacts.get(&key).cloned() else {
                    return Err(ContextError::KeyNotFound { key });
                };
                let content = this.content(&key, &current)?;
                // A panicking edit is caught by `run`, like any panic while deciding.
                let edited = match edit {
                    Edit::Apply(f) => f(content).map_err(|message| ContextError::EditFailed {
                        key: key.clone(),
                        message,
                    })?,
                    Edit::Plugin { op, args } => {
                        this.settings
                            .kinds
                            .edit(&key, &current.kind, &op, &args, &content)?
                    }
                };
                let r = this.store_content(&key, &current.kind, edited)?;
                Ok((
                    vec![Event::ArtifactEdited {
                        key,
                        label,
                        digest: r.digest,
                        size: r.size,
                    }],
                    (),
                ))
            },
            same,
        )
    }
}

impl Handler<GetArtifact> for ContextActor {
    type Result = Durable<Option<Artifact>>;

    fn handle(&mut self, msg: GetArtifact, _: &mut Self::Context) -> Self::Result {
        self.run(move |this| Ok((Vec::new(), this.artifact(&msg.key)?)), same)
    }
}

impl Handler<TakeArtifact> for ContextActor {
    type Result = Durable<Option<Artifact>>;

    fn handle(&mut self, msg: TakeArtifact, _: &mut Self::Context) -> Self::Result {
        self.run(
            move |this| match this.artifact(&msg.key)? {
                None => Ok((Vec::new(), None)),
                Some(a) => Ok((vec![Event::ArtifactTaken { key: msg.key }], Some(a))),
            },
            same,
        )
    }
}

impl Handler<Clear> for ContextActor {
    type Result = Durable<()>;

    fn handle(&mut self, _: Clear, _: &mut Self::Context) -> Self::Result {
        self.run(|_| Ok((vec![Event::Cleared], ())), same)
    }
}

impl Handler<DumpDebugInfo> for ContextActor {
    type Result = Durable<DebugInfo>;

    fn handle(&mut self, _: DumpDebugInfo, _: &mut Self::Context) -> Self::Result {
        self.run(|this| Ok((Vec::new(), this.state.debug_info())), same)
    }
}

impl Handler<CreateCacheEntries> for ContextActor {
    type Result = Durable<Stitched>;

    fn handle(&mut self, _: CreateCacheEntries, _: &mut Self::Context) -> Self::Result {
        self.run(
            |this| {
                this.stats.stitches += 1;
                let out = this.stitch(|contents, id, r| {
                    contents
                        .read(id, r)
                        .map(|content| Artifact {
                            key: id.to_string(),
                            kind: r.kind.clone(),
                            content,
                        })
                        .map_err(|e| e.to_string())
                });
                let event = out.event();
                Ok((
                    vec![event],
                    Stitched {
                        entries: out.entries,
                        debug_info: out.debug_info,
                    },
                ))
            },
            same,
        )
    }
}

impl Handler<SaveToDynamoCache> for ContextActor {
    type Result = Durable<DebugInfo>;

    fn handle(&mut self, _: SaveToDynamoCache, _: &mut Self::Context) -> Self::Result {
        let first_key = self
            .state
            .entries
            .keys()
            .next()
            .cloned()
            .unwrap_or_default();
        self.run(
            |this| {
                // The saved entry refers to content by digest; check that each blob is there.
                this.stats.stitches += 1;
                let out = this.stitch(|contents, id, r| {
                    contents
                        .read(id, r)
                        .map(|_| r.clone())
                        .map_err(|e| e.to_string())
                });
                let events = vec![
                    out.event(),
                    Event::SavedToDynamoCache {
                        entries: out.entries.clone(),
                    },
                ];
                Ok((events, out.debug_info))
            },
            // A failed write names an entry, in PyTorch's words.
            move |e| match e {
                ContextError::Storage { message, .. } => ContextError::SaveFailed {
                    key: first_key,
                    message,
                },
                e => e,
            },
        )
    }
}

impl Handler<LoadCacheEntry> for ContextActor {
    type Result = ResponseFuture<Answer<Loaded>>;

    fn handle(&mut self, msg: LoadCacheEntry, ctx: &mut Self::Context) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        let reply: LoadReply = Box::new(move |d| {
            d.reply_with(move |answer| {
                let _ = tx.send(answer);
            })
        });
        self.load(msg, reply, ctx);
        Box::pin(async move { rx.await.unwrap_or(Err(ContextError::Closed)) })
    }
}

impl Handler<LoadsReady> for ContextActor {
    type Result = ();

    fn handle(&mut self, _: LoadsReady, _: &mut Self::Context) {
        self.collect_loads(false);
    }
}

impl Handler<FlushJobs> for ContextActor {
    type Result = ();

    fn handle(&mut self, _: FlushJobs, _: &mut Self::Context) {
        self.flush_sent = false;
        // Nothing arrived behind these jobs. One job alone, with nothing else waiting for the
        // plugin thread, is done here: with nothing to overlap, the two thread hand-offs cost
        // more than the calls (a lone plugin load took 15 % longer through the thread).
        let waiting = self.loads.iter().filter(|q| q.done.is_none()).count();
        if self.outbox.len() == 1 && waiting == 1 {
            self.deserialize_here();
            self.collect_loads(false);
        } else {
            self.flush_jobs();
        }
    }
}

impl ContextActor {
    /// `load_cache_entry`. The entry is looked up and its contents read now. A load with
    /// backends of plugin kinds, or one behind such a load, is queued and its plugin calls run
    /// on the plugin thread; it is staged (and so answered) in arrival order, before any other
    /// request is decided. Everything else is done at once.
    fn load(&mut self, msg: LoadCacheEntry, reply: LoadReply, ctx: &mut Context<Self>) {
        self.collect_loads(false);
        let LoadCacheEntry { key, system_info } = msg;
        let found = self.decide(|this| this.find_load(&key, system_info.as_ref()));
        let (saved, backends) = match found {
            Ok(found) => found,
            Err(e) => return reply(self.finish(Err(e), same)),
        };
        let needs_plugin = backends.iter().any(|b| b.kind != EAGER_KIND);
        if self.deserializer.is_none() || (self.loads.is_empty() && !needs_plugin) {
            let durable = self.decide(|this| {
                let result = deserialize_all(&this.settings.kinds, &backends);
                this.conclude_load(key, saved, backends, result)
            });
            return reply(self.finish(durable, same));
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let done = if !needs_plugin {
            // Nothing for the plugin thread: it only waits its turn.
            let result = deserialize_all(&self.settings.kinds, &backends);
            Some(Done {
                ticket,
                backends,
                result,
            })
        } else {
            self.outbox.push(Job { ticket, backends });
            if self.outbox.len() >= JOB_BATCH {
                self.flush_jobs();
            } else if !self.flush_sent {
                self.flush_sent = true;
                ctx.address().do_send(FlushJobs);
            }
            None
        };
        tracing::debug!(key = %key, ticket, "load queued for the plugin thread");
        self.loads.push_back(QueuedLoad {
            ticket,
            key,
            saved,
            done,
            reply,
        });
        self.collect_loads(false);
    }

    /// The saved entry for `key` and its backends' contents. A miss or a failure counts.
    fn find_load(
        &mut self,
        key: &str,
        system_info: Option<&SystemInfo>,
    ) -> Result<(SavedEntry, Vec<Backend>), ContextError> {
        let Some(saved) = self.state.dynamo_cache.get(key).cloned() else {
            self.counters.miss += 1;
            tracing::info!(key = %key, counter = "dynamo_cache_miss", "no package found");
            return Err(ContextError::PackageNotFound { key: key.into() });
        };
        let backends = (|| {
            if let Some(current) = system_info {
                saved
                    .dynamo
                    .system_info
                    .check_compatibility(current, &saved.dynamo.device_type)
                    .map_err(|message| ContextError::SystemMismatch {
                        key: key.into(),
                        message,
                    })?;
            }
            saved
                .backends
                .iter()
                .map(|(id, r)| {
                    Ok(Backend {
                        id: id.clone(),
                        kind: r.kind.clone(),
                        content: self.content(id, r)?,
                    })
                })
                .collect::<Result<Vec<_>, ContextError>>()
        })();
        match backends {
            Ok(b) => Ok((saved, b)),
            Err(e) => Err(self.load_failed(key, e)),
        }
    }

    fn load_failed(&mut self, key: &str, e: ContextError) -> ContextError {
        self.counters.error += 1;
        tracing::warn!(key = %key, counter = "dynamo_cache_error", error = %e, "failed to load package");
        e
    }

    /// A load's answer and event, once its backends are deserialized.
    fn conclude_load(
        &mut self,
        key: String,
        saved: SavedEntry,
        backends: Vec<Backend>,
        result: Result<Vec<Deserialized>, ContextError>,
    ) -> Result<(Vec<Event>, Loaded), ContextError> {
        let deserialized = match result {
            Ok(d) => d,
            Err(e) => return Err(self.load_failed(&key, e)),
        };
        let ids = backends.iter().map(|b| b.id.clone());
        let value = Loaded {
            deserialized: ids.zip(deserialized).collect(),
            entry: PrecompileCacheEntry {
                dynamo: saved.dynamo,
                backends: backends
                    .into_iter()
                    .map(|b| {
                        let artifact = Artifact {
                            key: b.id.clone(),
                            kind: b.kind,
                            content: b.content,
                        };
                        (b.id, artifact)
                    })
                    .collect(),
            },
        };
        // Counted when its EntryLoaded event is durable, not before.
        self.staging.hits += 1;
        tracing::info!(key = %key, counter = "dynamo_cache_hit", "loaded package");
        Ok((
            vec![Event::EntryLoaded {
                key,
                backends: saved.backends,
            }],
            value,
        ))
    }

    /// Hands the gathered jobs to the plugin thread (or, if it is gone, does them here).
    fn flush_jobs(&mut self) {
        let jobs = std::mem::take(&mut self.outbox);
        if jobs.is_empty() {
            return;
        }
        // What the plugin thread cannot take (it is gone) is done here.
        self.outbox = match &self.deserializer {
            Some(d) => d.submit(jobs).err().unwrap_or_default(),
            None => jobs,
        };
        self.deserialize_here();
    }

    /// Does the gathered jobs on this thread.
    fn deserialize_here(&mut self) {
        for Job { ticket, backends } in std::mem::take(&mut self.outbox) {
            let result = deserialize_all(&self.settings.kinds, &backends);
            self.fill(Done {
                ticket,
                backends,
                result,
            });
        }
    }

    /// Puts a finished job with its load; false if no queued load has its ticket. A ticket
    /// before the first queued one belongs to a load failed by a rebuild (see `reload`):
    /// nobody waits for it.
    fn fill(&mut self, done: Done) -> bool {
        let Some(first) = self.loads.front().map(|q| q.ticket) else {
            return true;
        };
        if done.ticket < first {
            return true;
        }
        let slot = usize::try_from(done.ticket - first)
            .ok()
            .and_then(|i| self.loads.get_mut(i));
        match slot {
            Some(q) => {
                q.done = Some(done);
                true
            }
            None => false,
        }
    }

    /// Stages the queued loads that are ready at the front, in order; with `wait`, waits for
    /// the plugin thread until none is left.
    fn collect_loads(&mut self, wait: bool) {
        if wait {
            self.flush_jobs();
        }
        loop {
            while self.loads.front().is_some_and(|q| q.done.is_some()) {
                if let Some(q) = self.loads.pop_front() {
                    self.stage_load(q);
                }
            }
            if self.loads.is_empty() {
                return;
            }
            // `Err(true)`: the plugin thread is gone; `Err(false)`: nothing ready yet.
            let next = match &self.deserializer {
                Some(d) if wait => d.wait_done().map_err(|_| true),
                Some(d) => d
                    .try_done()
                    .map_err(|e| e == std::sync::mpsc::TryRecvError::Disconnected),
                None => Err(true),
            };
            let lost = match next {
                Err(false) => return,
                Err(true) => "the plugin thread stopped",
                Ok(done) => {
                    if self.fill(done) {
                        continue;
                    }
                    "the plugin thread answered a load that is not queued"
                }
            };
            // Nothing more will come for the loads still queued.
            tracing::error!(queued = self.loads.len(), "{lost}");
            self.fail_queued_loads(&ContextError::Panicked {
                message: lost.into(),
            });
            self.deserializer = None;
            return;
        }
    }

    /// Answers every queued load with `e`, in order, staging nothing.
    fn fail_queued_loads(&mut self, e: &ContextError) {
        self.outbox.clear();
        for q in std::mem::take(&mut self.loads) {
            tracing::warn!(key = %q.key, error = %e, "queued load not applied");
            (q.reply)(self.finish(Err(e.clone()), same));
        }
    }

    /// Finishes every queued load before a request that may see their changes.
    fn settle_loads(&mut self) {
        if !self.loads.is_empty() {
            self.collect_loads(true);
        }
    }

    fn stage_load(&mut self, q: QueuedLoad) {
        let QueuedLoad {
            key,
            saved,
            done,
            reply,
            ..
        } = q;
        let (backends, result) = match done {
            Some(Done {
                backends, result, ..
            }) => (backends, result),
            None => {
                let message = "a load was staged before its plugin calls ran".into();
                (Vec::new(), Err(ContextError::Panicked { message }))
            }
        };
        let decided = self.decide(|this| this.conclude_load(key, saved, backends, result));
        reply(self.finish(decided, same));
    }
}

impl Handler<Audit> for ContextActor {
    type Result = ResponseFuture<Answer<serde_json::Map<String, serde_json::Value>>>;

    fn handle(&mut self, msg: Audit, _: &mut Self::Context) -> Self::Result {
        self.settle_loads();
        let (tx, rx) = oneshot::channel();
        if self.closed {
            let _ = tx.send(Err(ContextError::Closed));
        } else {
            let journal = self.journal.clone();
            // Answer as of this point in the stream: later writes may be durable by the time
            // the query runs.
            let cap = self.head.seq;
            self.when_durable(Box::new(move |ready| match ready {
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
                Ok(()) => {
                    // A long verify must not stall the writer: the journal is read on its own
                    // thread while the actor goes on serving.
                    let spawned =
                        std::thread::Builder::new()
                            .name("pcx-audit".into())
                            .spawn(move || {
                                let view = crate::audit::Capped {
                                    inner: journal,
                                    cap,
                                };
                                let answer = msg.query.run(&view, &mut |_| {});
                                let _ = tx.send(
                                    answer
                                        .map(|value| Ack { seq: None, value })
                                        .map_err(ContextError::from),
                                );
                            });
                    if let Err(e) = spawned {
                        tracing::error!(error = %e, "cannot start an audit thread");
                    }
                }
            }));
        }
        Box::pin(async move { rx.await.unwrap_or(Err(ContextError::Closed)) })
    }
}

impl Handler<GetStats> for ContextActor {
    type Result = ResponseFuture<Answer<Stats>>;

    fn handle(&mut self, _: GetStats, _: &mut Self::Context) -> Self::Result {
        self.settle_loads();
        let (calls, failures) = self.settings.kinds.call_counts();
        let stats = Stats {
            dynamo_cache_hits: self.hits(),
            dynamo_cache_misses: self.counters.miss,
            dynamo_cache_errors: self.counters.error,
            plugin_calls: calls,
            plugin_failures: failures,
            queue_depth: self.committer.as_ref().map_or(0, Committer::queued_events),
            head_seq: self.head.seq,
            ..self.stats
        };
        // Answered at once: stats describe the moment, not a durable change.
        Box::pin(std::future::ready(Ok(Ack {
            seq: None,
            value: stats,
        })))
    }
}

impl Handler<GetLoadCounters> for ContextActor {
    type Result = ResponseFuture<Answer<LoadCounters>>;

    fn handle(&mut self, _: GetLoadCounters, _: &mut Self::Context) -> Self::Result {
        self.settle_loads();
        // Answered once the loads before it are durable, with the hits counted by then.
        let (tx, rx) = oneshot::channel();
        let LoadCounters { miss, error, .. } = self.counters;
        let hits = self.committer.as_ref().map(Committer::hit_counter);
        self.when_durable(Box::new(move |ready| {
            let hit = hits.map_or(0, |h| h.load(std::sync::atomic::Ordering::SeqCst));
            let value = LoadCounters { hit, miss, error };
            let _ = tx.send(ready.map(|()| Ack { seq: None, value }));
        }));
        Box::pin(async move { rx.await.unwrap_or(Err(ContextError::Closed)) })
    }
}

impl Handler<StateDigest> for ContextActor {
    type Result = Durable<Digest>;

    fn handle(&mut self, _: StateDigest, _: &mut Self::Context) -> Self::Result {
        self.run(|this| Ok((Vec::new(), this.state.digest())), same)
    }
}

impl Handler<Close> for ContextActor {
    type Result = ResponseActFuture<Self, Answer<()>>;

    fn handle(&mut self, _: Close, _: &mut Self::Context) -> Self::Result {
        // Wait for everything accepted so far, and refuse what arrives meanwhile, so nothing
        // is committed after `Close` is answered. A snapshot at the last event goes with it,
        // so the next open replays nothing.
        let barrier = self.run(
            |this| {
                if this.head.seq > this.last_snapshot && this.broken.is_none() {
                    this.snapshot_now();
                }
                Ok((Vec::new(), ()))
            },
            same,
        );
        self.closed = true;
        Box::pin(
            actix::fut::wrap_future::<_, Self>(barrier.into_future()).map(|answer, this, ctx| {
                if let Some(c) = this.committer.take() {
                    c.close();
                }
                // Release the journal (and sled's lock on the directory) now, not whenever the
                // actor is dropped.
                this.journal = Arc::new(crate::journal::ClosedJournal);
                ctx.stop();
                answer
            }),
        )
    }
}

pub mod committer;
pub mod plugin_thread;
