//! The load pipeline: `load_cache_entry` finds the saved entry on the actor, runs plugin
//! `after_deserialization` on the plugin thread, and stages loads in the order they arrived,
//! so every other request sees the state as if each load had been done whole.

use actix::prelude::*;
use tokio::sync::oneshot;

use super::context_actor::{same, ContextActor, LoadReply, LoadsReady, QueuedLoad};
use super::messages::{Answer, LoadCacheEntry, Loaded, SystemCheck};
use super::reply::Tagged;
use crate::actor::error::ContextError;
use crate::actor::plugin_thread::{deserialize_all, Backend, Done, Job};
use crate::core::event::Event;
use crate::core::event::SavedEntry;
use crate::core::model::{Artifact, PrecompileCacheEntry, SystemInfo, EAGER_KIND};
use crate::plugins::kinds::Deserialized;

impl Handler<Tagged<LoadCacheEntry, Loaded>> for ContextActor {
    type Result = ();

    fn handle(&mut self, tagged: Tagged<LoadCacheEntry, Loaded>, ctx: &mut Self::Context) {
        let Tagged { msg, reply } = tagged;
        let reply: LoadReply = Box::new(move |d| d.send(move |answer| reply.answer(answer)));
        self.load(msg, reply, ctx);
    }
}

/// Sent by the actor to itself behind the messages already in its mailbox: hands the jobs
/// gathered meanwhile to the plugin thread.
pub(super) struct FlushJobs;

impl Message for FlushJobs {
    type Result = ();
}

/// Jobs are handed to the plugin thread in batches of at most this many. One hand-off per
/// load woke the plugin thread every time, and each wake-up took the CPU from the actor (on
/// two cores, with the committer on the other); a batch much larger leaves the plugin thread
/// idle while the actor gathers it.
pub(super) const JOB_BATCH: usize = 64;
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
        // Even one job alone goes to the plugin thread: a lone plugin load took 15 % longer
        // through it than done here, but a call made here could not be given a deadline.
        self.flush_jobs();
        self.collect_loads(false);
    }
}

impl ContextActor {
    /// `load_cache_entry`. The entry is looked up and its contents read now. A load with
    /// backends of plugin kinds, or one behind such a load, is queued and its plugin calls run
    /// on the plugin thread; it is staged (and so answered) in arrival order, before any other
    /// request is decided. Everything else is done at once.
    pub(super) fn load(&mut self, msg: LoadCacheEntry, reply: LoadReply, ctx: &mut Context<Self>) {
        self.collect_loads(false);
        let LoadCacheEntry { key, system_info } = msg;
        let found = self.decide(|this| this.find_load(&key, system_info.as_ref()));
        let (saved, backends, mismatch) = match found {
            Ok(found) => found,
            Err(e) => return reply(self.finish(Err(e), same)),
        };
        let needs_plugin = backends.iter().any(|b| b.kind != EAGER_KIND);
        // No plugin loaded: nothing is called, the registry says no plugin serves the kind.
        let no_plugins = self.settings.kinds.plugins().is_empty();
        if no_plugins || (self.loads.is_empty() && !needs_plugin) {
            let durable = self.decide(|this| {
                let result = deserialize_all(&this.settings.kinds, &backends);
                this.conclude_load(key, saved, backends, mismatch, result)
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
            scope: self.scope.clone(),
            key,
            saved,
            mismatch,
            done,
            reply,
        });
        self.collect_loads(false);
    }

    /// The saved entry for `key` and its backends' contents. A miss or a failure counts.
    pub(super) fn find_load(
        &mut self,
        key: &str,
        system_info: Option<&SystemInfo>,
    ) -> Result<(SavedEntry, Vec<Backend>, Option<String>), ContextError> {
        if let Err(e) = self.adopt_shared_entry(key) {
            return Err(self.load_failed(key, e));
        }
        let Some(saved) = self.state.cache(&self.scope.namespace).get(key).cloned() else {
            self.counters.miss += 1;
            tracing::info!(key = %key, counter = "dynamo_cache_miss", "no package found");
            return Err(ContextError::PackageNotFound { key: key.into() });
        };
        let mut mismatch = None;
        let backends = (|| {
            if let Some(current) = system_info {
                let checked = saved
                    .dynamo
                    .system_info
                    .check_compatibility(current, &saved.dynamo.device_type);
                match (checked, self.settings.system_check) {
                    (Ok(()), _) => {}
                    // torch's way: the load goes on, and the caller is told.
                    (Err(message), SystemCheck::Report) => mismatch = Some(message),
                    (Err(message), SystemCheck::Refuse) => {
                        return Err(ContextError::SystemMismatch {
                            key: key.into(),
                            message,
                        })
                    }
                }
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
            Ok(b) => Ok((saved, b, mismatch)),
            Err(e) => Err(self.load_failed(key, e)),
        }
    }

    pub(super) fn load_failed(&mut self, key: &str, e: ContextError) -> ContextError {
        self.counters.error += 1;
        tracing::warn!(key = %key, counter = "dynamo_cache_error", error = %e, "failed to load package");
        e
    }

    /// A load's answer and event, once its backends are deserialized.
    pub(super) fn conclude_load(
        &mut self,
        key: String,
        saved: SavedEntry,
        backends: Vec<Backend>,
        system_mismatch: Option<String>,
        result: Result<Vec<Deserialized>, ContextError>,
    ) -> Result<(Vec<Event>, Loaded), ContextError> {
        let deserialized = match result {
            Ok(d) => d,
            Err(e) => return Err(self.load_failed(&key, e)),
        };
        let ids = backends.iter().map(|b| b.id.clone());
        let saved_by = self.state.saver(&self.scope.namespace, &key).to_string();
        let value = Loaded {
            saved_by,
            system_mismatch,
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

    /// Hands the gathered jobs to the plugin thread. What it cannot take (plugin calls are
    /// stopped, or it never started) fails: a call made here could not be abandoned.
    pub(super) fn flush_jobs(&mut self) {
        let jobs = std::mem::take(&mut self.outbox);
        if jobs.is_empty() {
            return;
        }
        let (refused, error) = match &self.deserializer {
            Some(d) => (d.submit(jobs).err(), ContextError::Closed),
            None => (Some(jobs), self.no_thread()),
        };
        for Job { ticket, backends } in refused.unwrap_or_default() {
            self.fill(Done {
                ticket,
                backends,
                result: Err(error.clone()),
            });
        }
    }

    /// Puts a finished job with its load; false if no queued load has its ticket. A ticket
    /// before the first queued one belongs to a load failed by a rebuild (see `reload`):
    /// nobody waits for it.
    pub(super) fn fill(&mut self, done: Done) -> bool {
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
    pub(super) fn collect_loads(&mut self, wait: bool) {
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
    pub(super) fn fail_queued_loads(&mut self, e: &ContextError) {
        self.outbox.clear();
        for q in std::mem::take(&mut self.loads) {
            tracing::warn!(key = %q.key, error = %e, "queued load not applied");
            (q.reply)(self.finish(Err(e.clone()), same));
        }
    }

    /// Finishes every queued load before a request that may see their changes.
    pub(super) fn settle_loads(&mut self) {
        if !self.loads.is_empty() {
            self.collect_loads(true);
        }
    }

    pub(super) fn stage_load(&mut self, q: QueuedLoad) {
        let QueuedLoad {
            key,
            scope,
            saved,
            mismatch,
            done,
            reply,
            ..
        } = q;
        let outer = std::mem::replace(&mut self.scope, scope);
        let (backends, result) = match done {
            Some(Done {
                backends, result, ..
            }) => (backends, result),
            None => {
                let message = "a load was staged before its plugin calls ran".into();
                (Vec::new(), Err(ContextError::Panicked { message }))
            }
        };
        let decided =
            self.decide(|this| this.conclude_load(key, saved, backends, mismatch, result));
        reply(self.finish(decided, same));
        self.scope = outer;
    }
}
