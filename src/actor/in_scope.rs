//! Requests in a named context or namespace: [`InScope`] sets the actor's current scope for
//! the one message it carries, and the events staged meanwhile are wrapped in it
//! ([`Event::Scoped`]). Apart from the request loop because it is one concern, the scope, that
//! every handler shares.

use actix::prelude::*;

use super::context_actor::ContextActor;
use super::messages::InScope;
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

impl<T: Send + 'static> AlreadyApplied for super::reply::Durable<T> {
    fn already_applied(actor: &mut ContextActor, request_id: &str, reused: bool) -> Option<Self> {
        let request_id = request_id.to_string();
        let refusal = if reused {
            crate::actor::error::ContextError::RequestIdReused { request_id }
        } else {
            crate::actor::error::ContextError::AlreadyApplied { request_id }
        };
        Some(actor.finish(Err(refusal), super::context_actor::same))
    }
}

impl<T> AlreadyApplied for actix::prelude::ResponseFuture<T> {
    fn already_applied(_: &mut ContextActor, _: &str, _: bool) -> Option<Self> {
        None
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
                if let Some(id) = msg.scope.request_id.as_deref() {
                    if self.state.applied(id) {
                        // Another request under the same id: both digests known and different.
                        let reused = matches!(
                            (self.state.applied_fingerprint(id), &msg.scope.request_fingerprint),
                            (Some(first), Some(now)) if first != now
                        );
                        if reused {
                            tracing::warn!(request_id = %id, "a request id came again with another request; refused");
                        } else {
                            tracing::info!(request_id = %id, "a request already applied came again");
                        }
                        if let Some(answer) =
                            <Self::Result as AlreadyApplied>::already_applied(self, id, reused)
                        {
                            return answer;
                        }
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
    super::messages::TakeArtifact,
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
