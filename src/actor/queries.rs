//! The handlers of questions that change nothing: audit queries over the log, stats, load
//! counters and the state's digest; and compaction, which changes the log's storage but not
//! what it says, run on a thread as the audits are.

use actix::prelude::*;
use tokio::sync::oneshot;

use super::context_actor::{same, ContextActor};
use super::messages::{
    Ack, Answer, Audit, CompactLog, ExportTo, GetLoadCounters, GetStats, LoadCounters, StateDigest,
    Stats,
};
use super::reply::Durable;
use crate::actor::committer::Committer;
use crate::actor::error::ContextError;
use crate::core::model::Digest;

impl Handler<Audit> for ContextActor {
    type Result = ResponseFuture<Answer<serde_json::Map<String, serde_json::Value>>>;

    fn handle(&mut self, msg: Audit, _: &mut Self::Context) -> Self::Result {
        self.on_audit_thread(move |view| Ok(msg.query.run(view, &mut |_| {})?))
    }
}

impl Handler<ExportTo> for ContextActor {
    type Result = ResponseFuture<Answer<serde_json::Map<String, serde_json::Value>>>;

    fn handle(&mut self, msg: ExportTo, _: &mut Self::Context) -> Self::Result {
        self.on_audit_thread(move |view| {
            let data_dir = crate::store::journal::Journal::data_dir(view);
            let exported = crate::audit::export::export_to(
                view,
                msg.mode,
                data_dir,
                &msg.output,
                &mut |_| {},
            )?;
            let mut out = serde_json::Map::new();
            out.insert("exported".into(), exported);
            Ok(out)
        })
    }
}

impl Handler<CompactLog> for ContextActor {
    type Result = ResponseFuture<Answer<serde_json::Map<String, serde_json::Value>>>;

    /// On a thread of its own, once every change accepted before it is durable: the journal
    /// holds commits off while it copies, and the actor goes on serving meanwhile.
    fn handle(&mut self, msg: CompactLog, _: &mut Self::Context) -> Self::Result {
        self.settle_loads();
        let (tx, rx) = oneshot::channel();
        if self.closed {
            let _ = tx.send(Err(ContextError::Closed));
        } else {
            let journal = self.journal.clone();
            self.when_durable(Box::new(move |ready| {
                if let Err(e) = ready {
                    let _ = tx.send(Err(e));
                    return;
                }
                let spawned = std::thread::Builder::new()
                    .name("pcx-compact".into())
                    .spawn(move || {
                        let report = crate::audit::compact::compact_in_place(
                            journal.as_ref(),
                            msg.before,
                            &mut |_| {},
                        );
                        drop(journal);
                        let answer = match report {
                            Ok(serde_json::Value::Object(mut report)) => {
                                report.remove("ok");
                                Ok(Ack {
                                    seq: None,
                                    value: report,
                                })
                            }
                            Ok(_) => Ok(Ack {
                                seq: None,
                                value: serde_json::Map::new(),
                            }),
                            Err(e) => Err(ContextError::Audit {
                                kind: "compact_failed",
                                message: e.to_string(),
                            }),
                        };
                        let _ = tx.send(answer);
                    });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start a compaction thread");
                }
            }));
        }
        Box::pin(async move { rx.await.unwrap_or(Err(ContextError::Closed)) })
    }
}

impl ContextActor {
    /// Runs `job` on the log as of this point in the stream, once every change accepted
    /// before it is durable, on a thread of its own: a long verify or export must not stall
    /// the writer, so the journal is read there while the actor goes on serving.
    fn on_audit_thread(
        &mut self,
        job: impl FnOnce(
                &crate::audit::query::Capped,
            ) -> Result<serde_json::Map<String, serde_json::Value>, ContextError>
            + Send
            + 'static,
    ) -> ResponseFuture<Answer<serde_json::Map<String, serde_json::Value>>> {
        self.settle_loads();
        let (tx, rx) = oneshot::channel();
        if self.closed {
            let _ = tx.send(Err(ContextError::Closed));
        } else if let Err(e) = self.journal.check_held() {
            // A fleet's holder whose lease may have run out: its head may be stale.
            let _ = tx.send(Err(ContextError::from(e)));
        } else {
            let journal = self.journal.clone();
            // Answer as of this point in the stream: later writes may be durable by the time
            // the job runs.
            let cap = self.head.seq;
            self.when_durable(Box::new(move |ready| match ready {
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
                Ok(()) => {
                    let spawned =
                        std::thread::Builder::new()
                            .name("pcx-audit".into())
                            .spawn(move || {
                                let view = crate::audit::query::Capped {
                                    inner: journal,
                                    cap,
                                };
                                let answer = job(&view);
                                // Let go of the journal before answering: a close that
                                // follows the answer then releases the data directory.
                                drop(view);
                                let _ = tx.send(answer.map(|value| Ack { seq: None, value }));
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
            journal: self.journal.cluster_name().map(str::to_string),
            epoch: self.journal.lease_epoch(),
            ..self.stats.clone()
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
