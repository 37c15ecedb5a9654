//! Requests in a named context or namespace: [`InScope`] sets the actor's current scope for
//! the one message it carries, and the events staged meanwhile are wrapped in it
//! ([`Event::Scoped`]). Apart from the request loop because it is one concern, the scope, that
//! every handler shares.

use actix::prelude::*;

use super::context_actor::{same, ContextActor};
use super::messages::InScope;
use super::reply::Durable;
use crate::actor::error::ContextError;
use crate::core::event::Event;

impl ContextActor {
    /// `event` as stored in the current scope: a context's event outside the default
    /// context or namespace is wrapped in [`Event::Scoped`]; the others say their own scope.
    pub(super) fn in_scope(&self, event: Event) -> Event {
        let own_scope = matches!(
            event,
            Event::Scoped { .. }
                | Event::ContextDropped { .. }
                | Event::CacheEntryPut { .. }
                | Event::CacheEntryDeleted { .. }
                | Event::DynamoCacheCleared { .. }
        );
        if own_scope || self.scope.is_default() {
            return event;
        }
        Event::Scoped {
            context: self.scope.context.clone(),
            namespace: self.scope.namespace.clone(),
            event: Box::new(event),
        }
    }
}

/// What a request's answer is when its client request id was applied before: a
/// [`super::reply::Durable`] says so once the first is durable (or, when the first was
/// another request, refuses it at once: `reused`); the answers that are not durable writes
/// (loads, reads) have no such answer, and their request is decided again.
pub(super) trait AlreadyApplied: Sized {
    fn already_applied(actor: &mut ContextActor, request_id: &str, reused: bool) -> Option<Self>;
}

impl<T: Send + 'static> AlreadyApplied for Durable<T> {
    fn already_applied(actor: &mut ContextActor, request_id: &str, reused: bool) -> Option<Self> {
        Some(actor.retry_answer(request_id, reused))
    }
}

impl<T> AlreadyApplied for actix::prelude::ResponseFuture<T> {
    fn already_applied(_: &mut ContextActor, _: &str, _: bool) -> Option<Self> {
        None
    }
}

impl ContextActor {
    /// Whether the request carrying `scope` was applied before under its request id, and if
    /// so whether this one is another request under the same id (`Some(true)`: refused) or
    /// the same one again (`Some(false)`: answered "already applied").
    fn retried(&self, scope: &crate::core::scope::Scope) -> Option<(String, bool)> {
        let id = scope.request_id.as_deref()?;
        if !self.state.applied(id) {
            return None;
        }
        // Another request under the same id: both digests known and different.
        let reused = matches!(
            (self.state.applied_fingerprint(id), &scope.request_fingerprint),
            (Some(first), Some(now)) if first != now
        );
        if reused {
            tracing::warn!(request_id = %id, "a request id came again with another request; refused");
        } else {
            tracing::info!(request_id = %id, "a request already applied came again");
        }
        Some((id.to_string(), reused))
    }

    /// The answer to a retry of an applied request: "already applied" once the first is
    /// durable, or at once `request_id_reused` when it is another request under the same id.
    fn retry_answer<T: Send + 'static>(&mut self, request_id: &str, reused: bool) -> Durable<T> {
        let request_id = request_id.to_string();
        let refusal = if reused {
            ContextError::RequestIdReused { request_id }
        } else {
            ContextError::AlreadyApplied {
                request_id,
                taken: None,
            }
        };
        self.finish(Err(refusal), same)
    }
}

/// A take retried under its request id is answered with what the first took, read back from
/// the log once everything before it is durable ([`crate::audit::query::taken_by`]): its
/// first answer was the only place the artifact went.
impl Handler<InScope<super::messages::TakeArtifact>> for ContextActor {
    type Result = <ContextActor as Handler<super::messages::TakeArtifact>>::Result;

    fn handle(
        &mut self,
        msg: InScope<super::messages::TakeArtifact>,
        ctx: &mut Self::Context,
    ) -> Self::Result {
        if let Some((id, reused)) = self.retried(&msg.scope) {
            let mut answer = self.retry_answer(&id, reused);
            if !reused {
                let journal = crate::audit::query::Capped {
                    inner: self.journal.clone(),
                    cap: self.head.seq,
                };
                answer.recover = Some(Box::new(move |_already_applied| {
                    match crate::audit::query::taken_by(&journal, &id) {
                        Ok(taken) => ContextError::AlreadyApplied {
                            request_id: id,
                            taken: taken.map(Box::new),
                        },
                        // The take was applied, but what it took cannot be read back (a
                        // damaged log or content): say so, not a bare "applied".
                        Err(e) => {
                            tracing::error!(request_id = %id, error = %e, "cannot read back what a retried take took");
                            ContextError::from(e)
                        }
                    }
                }));
            }
            return answer;
        }
        let outer = std::mem::replace(&mut self.scope, msg.scope);
        let result = <Self as Handler<super::messages::TakeArtifact>>::handle(self, msg.msg, ctx);
        self.scope = outer;
        result
    }
}

/// Each request that acts in a context or namespace also answers [`InScope`]: it is decided
/// with `scope` current. Every handler decides and stages before it returns, so the scope is
/// only needed for the call; a load staged later keeps its own ([`QueuedLoad::scope`]).
macro_rules! scoped {
    ($($m:ty),*) => {$(
        impl Handler<InScope<$m>> for ContextActor {
            type Result = <ContextActor as Handler<$m>>::Result;

            fn handle(&mut self, msg: InScope<$m>, ctx: &mut Self::Context) -> Self::Result {
                if let Some((id, reused)) = self.retried(&msg.scope) {
                    if let Some(answer) =
                        <Self::Result as AlreadyApplied>::already_applied(self, &id, reused)
                    {
                        return answer;
                    }
                }
                let outer = std::mem::replace(&mut self.scope, msg.scope);
                let result = <Self as Handler<$m>>::handle(self, msg.msg, ctx);
                self.scope = outer;
                result
            }
        }
    )*};
}

scoped!(
    super::messages::RecordArtifact,
    super::messages::RecordEntry,
    super::messages::EditArtifact,
    super::messages::GetArtifact,
    super::messages::Clear,
    super::messages::DumpDebugInfo,
    super::messages::CreateCacheEntries,
    super::messages::SaveToDynamoCache,
    super::messages::LoadCacheEntry,
    super::messages::ListContexts,
    super::messages::DropContext,
    super::messages::PutCacheEntry,
    super::messages::GetCacheEntry,
    super::messages::DeleteCacheEntry,
    super::messages::ListCacheEntries,
    super::messages::ClearDynamoCache
);
