//! The library API for Rust orchestrators that embed pcx: [`Context`] opens a data
//! directory, replays it, starts the context actor, and offers PyTorch's operations as async
//! methods. Must be used inside an actix system (`actix::System::new().block_on(…)` or
//! `#[actix::main]`).

use std::sync::Arc;

use actix::prelude::*;

use crate::actor::error::ContextError;
use crate::actor::plugin_thread::PluginStop;
use crate::actor::{
    sync_cache_view, Ack, ActorSettings, Answer, Clear, Close, ContextActor, CreateCacheEntries,
    DumpDebugInfo, Edit, EditArtifact, GetArtifact, GetLoadCounters, GetStats, LoadCacheEntry,
    LoadCounters, Loaded, RecordArtifact, RecordEntry, SaveToDynamoCache, Saved, StateDigest,
    Stats, Stitched, Tagged, TakeArtifact,
};
use crate::config::{Config, JournalBackend};
use crate::core::model::{Artifact, DebugInfo, Digest, DynamoCacheEntry, SystemInfo};
use crate::core::state::State;
use crate::plugins::kinds::Kinds;
use crate::store::error::OpenError;
use crate::store::journal::Journal;
use crate::store::record::encode_saved_entry;
use crate::store::replay::{recover, ReplayError};
use crate::store::sled_journal::SledJournal;

/// Why a context could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ContextOpenError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("cannot replay the event log: {0}")]
    Replay(#[from] ReplayError),
    #[error("cannot rebuild the dynamo cache view: {0}")]
    CacheView(ContextError),
}

/// A handle to a running context actor. Cheap to clone; all clones talk to one actor.
#[derive(Clone)]
pub struct Context {
    addr: Addr<ContextActor>,
    /// Stops the plugin thread's calls (when plugins are loaded).
    plugin_stop: Option<PluginStop>,
}

impl Context {
    /// Opens the configured journal (the data directory, created if missing, or a journal in
    /// PostgreSQL, taking its lease) and replays its log.
    pub fn open(config: &Config) -> Result<Context, ContextOpenError> {
        Context::with_journal(open_journal(config)?, settings(config))
    }

    /// Starts a context over any journal (tests pass a fault-injecting one).
    pub fn with_journal(
        journal: Arc<dyn Journal>,
        settings: ActorSettings,
    ) -> Result<Context, ContextOpenError> {
        let recovered = recover(journal.as_ref())?;
        tracing::info!(
            head = recovered.head.seq,
            snapshot = ?recovered.snapshot,
            replayed = recovered.replayed,
            "replayed the event log"
        );
        // The sled view of the dynamo cache may differ from the log after a crash (it is
        // written after the events of its group); the log wins.
        if !cache_view_matches(journal.as_ref(), &recovered.state)? {
            sync_cache_view(journal.as_ref(), &recovered.state)
                .map_err(ContextOpenError::CacheView)?;
        }
        let mut actor = ContextActor::new(journal, recovered, settings);
        let mut plugin_stop = None;
        // An unbounded mailbox, from the first message on. With a bound, actix keeps a
        // message sent past it inside its `send` future until that future is polled: a
        // caller that sends many and then awaits them in order delivers them one at a time,
        // each in a commit of its own (W1's records took 31 s that way instead of 0.4 s).
        // A bound would hold no memory back anyway: the message waits in the caller's
        // future instead. Requests waiting here while a group is synced make the next group.
        let addr = ContextActor::create(|ctx| {
            ctx.set_mailbox_capacity(0);
            plugin_stop = actor.start_plugin_thread(&ctx.address());
            actor
        });
        Ok(Context { addr, plugin_stop })
    }

    /// Abandons the plugin call under way, if any, and refuses plugin calls from now on,
    /// without going through the actor (which may be the one waiting for that call): for
    /// shutdown, so that no plugin can hold the process up. Requests that need a plugin fail
    /// (`plugin_failed` for the abandoned call, `closed` for the rest); nothing else changes.
    pub fn stop_plugin_calls(&self) {
        if let Some(s) = &self.plugin_stop {
            s.stop();
        }
    }

    /// The actor's address, for sending messages directly.
    pub fn addr(&self) -> &Addr<ContextActor> {
        &self.addr
    }

    /// A pipeline: requests sent without waiting, their answers taken from one queue.
    pub fn pipeline<T: Send + 'static>(&self) -> Pipeline<T> {
        let (to, answers) = tokio::sync::mpsc::unbounded_channel();
        Pipeline {
            addr: self.addr.clone(),
            to,
            answers,
            next_tag: 0,
            in_flight: 0,
        }
    }

    async fn ask<M, T>(&self, msg: M) -> Answer<T>
    where
        M: Message<Result = Answer<T>> + Send + 'static,
        T: Send + 'static,
        ContextActor: Handler<M>,
    {
        self.addr
            .send(msg)
            .await
            .unwrap_or(Err(ContextError::Closed))
    }

    /// `record_artifact`: stores a copy of the artifact under its key.
    pub async fn record_artifact(&self, artifact: Artifact) -> Answer<()> {
        self.ask(RecordArtifact { artifact }).await
    }

    /// `record_dynamo_cache_entry`.
    pub async fn record_dynamo_cache_entry(
        &self,
        key: impl Into<String>,
        entry: DynamoCacheEntry,
    ) -> Answer<()> {
        self.ask(RecordEntry {
            key: key.into(),
            entry,
        })
        .await
    }

    /// `edit_artifact`: `content = edit(content)`; `label` is logged with the result.
    pub async fn edit_artifact(
        &self,
        key: impl Into<String>,
        label: impl Into<String>,
        edit: impl FnOnce(Vec<u8>) -> Vec<u8> + Send + 'static,
    ) -> Answer<()> {
        self.ask(EditArtifact {
            key: key.into(),
            label: label.into(),
            edit: Edit::Apply(Box::new(move |c| Ok(edit(c)))),
            expected: None,
        })
        .await
    }

    /// `edit_artifact` with the named edit `op` of the plugin serving the artifact's kind.
    /// The event stores the result, so replay never needs the plugin.
    pub async fn edit_artifact_with_plugin(
        &self,
        key: impl Into<String>,
        op: impl Into<String>,
        args: Vec<u8>,
    ) -> Answer<()> {
        let op = op.into();
        self.ask(EditArtifact {
            key: key.into(),
            label: format!("plugin:{op}"),
            edit: Edit::Plugin { op, args },
            expected: None,
        })
        .await
    }

    /// `serialize_artifact_by_key`: the artifact, or none.
    pub async fn serialize_artifact_by_key(
        &self,
        key: impl Into<String>,
    ) -> Answer<Option<Artifact>> {
        self.ask(GetArtifact { key: key.into() }).await
    }

    /// `take_artifact`: removes and returns it, or none.
    pub async fn take_artifact(&self, key: impl Into<String>) -> Answer<Option<Artifact>> {
        self.ask(TakeArtifact { key: key.into() }).await
    }

    /// `clear`: empties both maps.
    pub async fn clear(&self) -> Answer<()> {
        self.ask(Clear {}).await
    }

    /// What the context has done since it started (commits, snapshots, plugin calls, …).
    pub async fn stats(&self) -> Answer<Stats> {
        self.ask(GetStats {}).await
    }

    /// `dump_debug_info`.
    pub async fn dump_debug_info(&self) -> Answer<DebugInfo> {
        self.ask(DumpDebugInfo {}).await
    }

    /// `create_cache_entries`: stitches every entry (logged as an event).
    pub async fn create_cache_entries(&self) -> Answer<Stitched> {
        self.ask(CreateCacheEntries { trace: false }).await
    }

    /// `save_to_dynamo_cache`: stitches and saves every entry; returns `debug_info`.
    pub async fn save_to_dynamo_cache(&self) -> Answer<DebugInfo> {
        self.save_to_dynamo_cache_keys().await.map(|ack| Ack {
            seq: ack.seq,
            value: ack.value.debug_info,
        })
    }

    /// [`Context::save_to_dynamo_cache`], also giving the keys it wrote.
    pub async fn save_to_dynamo_cache_keys(&self) -> Answer<Saved> {
        self.ask(SaveToDynamoCache { trace: false }).await
    }

    /// `load_cache_entry`: reads a saved entry, records its backends again and deserializes
    /// each by its kind.
    pub async fn load_cache_entry(
        &self,
        key: impl Into<String>,
        system_info: Option<SystemInfo>,
    ) -> Answer<Loaded> {
        self.ask(LoadCacheEntry {
            key: key.into(),
            system_info,
        })
        .await
    }

    /// PyTorch's `dynamo_cache_hit/miss/error` counts in this process.
    pub async fn load_counters(&self) -> Answer<LoadCounters> {
        self.ask(GetLoadCounters {}).await
    }

    /// A digest of the whole state, order included.
    pub async fn state_digest(&self) -> Answer<Digest> {
        self.ask(StateDigest {}).await
    }

    /// Drops the events before `before` and the content only they used, keeping the state, in
    /// the data directory this context holds, while it goes on serving: `pcx compact` for a
    /// process that never stops. Commits wait while the copy is made; reads go on. Answers
    /// the compaction's report (`anchored_at`, `events_removed`, `blobs_removed`, …).
    pub async fn compact(&self, before: u64) -> Answer<serde_json::Map<String, serde_json::Value>> {
        self.ask(crate::actor::CompactLog { before }).await
    }

    /// Waits for everything accepted to be durable, stops the actor and releases the data
    /// directory (so it can be opened again, by this process or another).
    pub async fn close(self) -> Answer<()> {
        self.ask(Close {}).await
    }
}

/// True when the dynamo cache view holds exactly the state's saved entries.
/// The configured journal, opened as its one writer.
pub fn open_journal(config: &Config) -> Result<Arc<dyn Journal>, OpenError> {
    match config.journal {
        JournalBackend::Sled => Ok(Arc::new(SledJournal::open(
            &config.data_dir,
            config.cache_capacity_bytes,
        )?)),
        #[cfg(feature = "postgres")]
        JournalBackend::Postgres => Ok(Arc::new(crate::store::pg_journal::PgJournal::open(
            pg_settings(config),
        )?)),
        #[cfg(not(feature = "postgres"))]
        JournalBackend::Postgres => Err(OpenError::NoPostgresSupport),
    }
}

/// Where the PostgreSQL journal is and who this writer is (its holder name says which
/// process, on which machine, and where it serves).
#[cfg(feature = "postgres")]
pub fn pg_settings(config: &Config) -> crate::store::pg_journal::PgSettings {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let address = if config.tcp_listen.is_empty() {
        let socket = config.socket();
        std::path::absolute(&socket)
            .unwrap_or(socket)
            .display()
            .to_string()
    } else {
        config.tcp_listen.clone()
    };
    crate::store::pg_journal::PgSettings {
        url: config.journal_url.clone(),
        journal: config.journal_name.clone(),
        holder: format!("{} pid {} on {host}", config.origin(), std::process::id()),
        address,
        lease: std::time::Duration::from_millis(config.journal_lease_ms),
        wait: std::time::Duration::from_millis(config.journal_wait_ms),
    }
}

fn cache_view_matches(journal: &dyn Journal, state: &State) -> Result<bool, ContextOpenError> {
    let view = journal
        .cache_view()
        .map_err(|e| ContextOpenError::CacheView(e.into()))?;
    if view.len() != state.dynamo_cache.len() {
        return Ok(false);
    }
    for (key, bytes) in view {
        let Some(entry) = state.dynamo_cache.get(&key) else {
            return Ok(false);
        };
        let expected =
            encode_saved_entry(entry).map_err(|e| ContextOpenError::CacheView(e.into()))?;
        if expected != bytes {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The actor's settings from a configuration.
pub fn settings(config: &Config) -> ActorSettings {
    ActorSettings {
        snapshot_every: config.snapshot_every,
        max_content_bytes: config.max_content_bytes,
        system_check: config.system_check,
        origin: config.origin(),
        kinds: match config.plugin_dir() {
            Some(dir) => Kinds::load_with(
                &dir,
                usize::try_from(config.max_plugin_output_bytes).unwrap_or(usize::MAX),
                std::time::Duration::from_millis(config.plugin_call_timeout_ms),
            ),
            None => Kinds::builtin(None),
        },
    }
}

/// Requests sent without waiting for each answer, every answer delivered to one queue with
/// the tag its request was given: for an orchestrator with many changes under way. Each is
/// still its own request, answered once durable (or with its own error); what is saved is a
/// future and a wake-up per request, which is what `join_all` or `buffer_unordered` over
/// [`Context`]'s methods cost: W1's 100,000 records took 0.37 s that way and 0.30 s through
/// a pipeline.
///
/// Takes the requests that change the context ([`RecordArtifact`], [`RecordEntry`],
/// [`EditArtifact`], answered with `()`) and loads ([`LoadCacheEntry`], answered with
/// [`Loaded`]). Answers come in the order the changes become durable, which for one pipeline
/// is the order sent, except that a request refused outright (a bad kind, say) is answered
/// at once. Sending never waits: keep [`Pipeline::in_flight`] to a few thousand by taking
/// answers. A request the context can no longer handle (it was closed) is answered
/// [`ContextError::Closed`], so every request sent gets its answer.
pub struct Pipeline<T: Send + 'static> {
    addr: Addr<ContextActor>,
    to: tokio::sync::mpsc::UnboundedSender<(u64, Answer<T>)>,
    answers: tokio::sync::mpsc::UnboundedReceiver<(u64, Answer<T>)>,
    next_tag: u64,
    in_flight: usize,
}

impl<T: Send + 'static> Pipeline<T> {
    /// Sends `msg` and gives its tag: 0 for the first sent, then 1, 2, ….
    pub fn send<M>(&mut self, msg: M) -> u64
    where
        M: Send + 'static,
        ContextActor: Handler<Tagged<M, T>>,
    {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.in_flight += 1;
        // A closed mailbox drops the message, and with it the reply, which then answers
        // `Closed` (see `TaggedReply`).
        self.addr.do_send(Tagged::new(msg, tag, self.to.clone()));
        tag
    }

    /// Requests sent whose answers have not been taken yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Waits for an answer if none has come, then moves up to `limit` of them (at least one)
    /// into `into`, tagged. Gives how many; 0 only when nothing is in flight.
    pub async fn answers(&mut self, into: &mut Vec<(u64, Answer<T>)>, limit: usize) -> usize {
        if self.in_flight == 0 {
            return 0;
        }
        // The pipeline holds a sender itself, so the queue never ends while it waits.
        let n = self.answers.recv_many(into, limit.max(1)).await;
        self.in_flight -= n;
        n
    }
}
