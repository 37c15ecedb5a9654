//! The handlers of the requests that change the context (record, edit, take, clear, stitch,
//! save) and of `close`: each decides, stages its events and answers once they are durable.

use std::sync::Arc;

use actix::prelude::*;

use super::context_actor::{same, validate_kind, ContextActor};
use super::messages::{
    Answer, Clear, Close, CreateCacheEntries, DumpDebugInfo, Edit, EditArtifact, GetArtifact,
    RecordArtifact, RecordEntry, SaveToDynamoCache, Saved, Stitched, TakeArtifact,
};
use super::reply::{Durable, Tagged};
use crate::actor::error::ContextError;
use crate::actor::plugin_thread::EditJob;
use crate::core::event::Event;
use crate::core::model::{Artifact, DebugInfo};

impl Handler<RecordArtifact> for ContextActor {
    type Result = Durable<()>;

    fn handle(&mut self, msg: RecordArtifact, _: &mut Self::Context) -> Self::Result {
        self.run(
            move |this| {
                let a = msg.artifact;
                validate_kind(&a.kind)?;
                this.plugin_check(&a.key, &a.kind, &a.content)?;
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
            move |this| {
                msg.entry
                    .validate()
                    .and_then(|()| msg.entry.check_size(this.settings.max_content_bytes))
                    .map_err(|reason| ContextError::InvalidEntry {
                        key: msg.key.clone(),
                        reason,
                    })?;
                // The codes already recorded under the key, in order, are not stored again.
                let kept = match this.here().entries.get(&msg.key) {
                    Some(old) => old
                        .codes
                        .iter()
                        .zip(&msg.entry.codes)
                        .take_while(|(a, b)| a == b)
                        .count(),
                    None => 0,
                };
                let event = if kept == 0 {
                    Event::DynamoEntryRecorded {
                        key: msg.key,
                        entry: msg.entry,
                    }
                } else {
                    let mut entry = msg.entry;
                    entry.codes.drain(..kept);
                    Event::DynamoEntryExtended {
                        key: msg.key,
                        kept: u32::try_from(kept).unwrap_or(u32::MAX),
                        entry,
                    }
                };
                Ok((vec![event], ()))
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
                let EditArtifact {
                    key,
                    label,
                    edit,
                    expected,
                } = msg;
                let Some(current) = this.here().artifacts.get(&key).cloned() else {
                    return Err(ContextError::KeyNotFound { key });
                };
                if let Some(expected) = expected {
                    let found = current.digest.to_hex();
                    if !expected.eq_ignore_ascii_case(&found) {
                        return Err(ContextError::Conflict {
                            key,
                            expected,
                            found,
                        });
                    }
                }
                let content = this.content(&key, &current)?;
                // A panicking edit is caught by `run`, like any panic while deciding.
                let edited = match edit {
                    Edit::Apply(f) => f(content).map_err(|message| ContextError::EditFailed {
                        key: key.clone(),
                        message,
                    })?,
                    // The result gets the check content gets at record: content its own
                    // plugin refuses would fail every later load.
                    Edit::Plugin { op, args } => {
                        let edited = this.plugin_edit(&key, &current.kind, op, args, content)?;
                        this.plugin_check(&key, &current.kind, &edited)?;
                        edited
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
        self.run(|this| Ok((Vec::new(), this.here().debug_info())), same)
    }
}

impl Handler<CreateCacheEntries> for ContextActor {
    type Result = Durable<Stitched>;

    fn handle(&mut self, msg: CreateCacheEntries, _: &mut Self::Context) -> Self::Result {
        self.run(
            move |this| {
                this.stats.stitches += 1;
                let out = this.stitch(msg.trace, |contents, id, r| {
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
                let trace = if msg.trace { out.trace } else { Vec::new() };
                Ok((
                    vec![event],
                    Stitched {
                        entries: out.entries,
                        debug_info: out.debug_info,
                        trace,
                    },
                ))
            },
            same,
        )
    }
}

impl Handler<SaveToDynamoCache> for ContextActor {
    type Result = Durable<Saved>;

    fn handle(&mut self, msg: SaveToDynamoCache, _: &mut Self::Context) -> Self::Result {
        let first_key = self
            .here()
            .entries
            .keys()
            .next()
            .cloned()
            .unwrap_or_default();
        self.run(
            move |this| {
                // The saved entry refers to content by digest; check that each blob is there.
                this.stats.stitches += 1;
                let out = this.stitch(msg.trace, |contents, id, r| {
                    contents
                        .read(id, r)
                        .map(|_| r.clone())
                        .map_err(|e| e.to_string())
                });
                let saved = out.entries.keys().cloned().collect();
                let events = vec![
                    out.event(),
                    Event::SavedToDynamoCache {
                        entries: out.entries.clone(),
                    },
                ];
                let debug_info = out.debug_info;
                let trace = if msg.trace { out.trace } else { Vec::new() };
                Ok((
                    events,
                    Saved {
                        debug_info,
                        saved,
                        trace,
                    },
                ))
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
                this.journal = Arc::new(crate::store::journal::ClosedJournal);
                ctx.stop();
                answer
            }),
        )
    }
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

impl ContextActor {
    /// Checks content recorded under a plugin kind: the plugin's `after_deserialization`
    /// must accept it (on the plugin thread, within its deadline), so content no load could
    /// use is refused at record, before anything is written. `eager` is not checked.
    pub(super) fn plugin_check(
        &self,
        key: &str,
        kind: &str,
        content: &[u8],
    ) -> Result<(), ContextError> {
        if kind == crate::core::model::EAGER_KIND {
            return Ok(());
        }
        match &self.deserializer {
            Some(d) => d
                .edit(EditJob {
                    key: key.to_string(),
                    kind: kind.to_string(),
                    op: None,
                    args: Vec::new(),
                    content: content.to_vec(),
                })
                .map(drop),
            // No plugin loaded: the registry says no plugin serves the kind, calling nothing.
            None if self.settings.kinds.plugins().is_empty() => self
                .settings
                .kinds
                .after_deserialization(key, kind, content)
                .map(drop)
                .map_err(ContextError::from),
            None => Err(self.no_thread()),
        }
    }
}
