//! The requests of named contexts and of the shared, namespaced dynamo cache: list and drop
//! contexts; put, get, delete, list and clear entries of a namespace. Each decides in the
//! current scope ([`crate::actor::messages::InScope`]), like the context's own requests, and
//! each change is an event.

use actix::prelude::*;
use indexmap::IndexMap;

use super::context_actor::{same, validate_kind, ContextActor};
use super::messages::{
    CacheEntryInfo, ClearDynamoCache, ContextInfo, DeleteCacheEntry, DropContext, GetCacheEntry,
    ListCacheEntries, ListContexts, PutCacheEntry, SavedCacheEntry,
};
use super::reply::Durable;
use crate::actor::error::ContextError;
use crate::core::event::{Event, SavedEntry};
use crate::core::model::{Artifact, PrecompileCacheEntry};

impl Handler<ListContexts> for ContextActor {
    type Result = Durable<Vec<ContextInfo>>;

    fn handle(&mut self, _: ListContexts, _: &mut Self::Context) -> Self::Result {
        self.run(
            |this| {
                let all = this
                    .state
                    .context_names()
                    .into_iter()
                    .map(|(name, artifacts, entries)| ContextInfo {
                        name: name.to_string(),
                        artifacts,
                        entries,
                    })
                    .collect();
                Ok((Vec::new(), all))
            },
            same,
        )
    }
}

impl Handler<DropContext> for ContextActor {
    type Result = Durable<()>;

    fn handle(&mut self, _: DropContext, _: &mut Self::Context) -> Self::Result {
        self.run(
            |this| {
                let context = this.scope.context.clone();
                Ok((vec![Event::ContextDropped { context }], ()))
            },
            same,
        )
    }
}

impl Handler<PutCacheEntry> for ContextActor {
    type Result = Durable<()>;

    fn handle(&mut self, msg: PutCacheEntry, _: &mut Self::Context) -> Self::Result {
        self.run(
            move |this| {
                let PutCacheEntry { key, entry } = msg;
                let invalid = |reason| ContextError::InvalidEntry {
                    key: key.clone(),
                    reason,
                };
                entry.dynamo.validate().map_err(invalid)?;
                entry
                    .dynamo
                    .check_size(this.settings.max_content_bytes)
                    .map_err(invalid)?;
                let mut backends = IndexMap::with_capacity(entry.backends.len());
                for (id, a) in entry.backends {
                    validate_kind(&a.kind)?;
                    let r = this.store_content(&id, &a.kind, a.content)?;
                    backends.insert(id, r);
                }
                let saved = SavedEntry {
                    dynamo: entry.dynamo,
                    backends,
                };
                Ok((
                    vec![Event::CacheEntryPut {
                        namespace: this.scope.namespace.clone(),
                        key,
                        entry: saved,
                        saved_by: this.scope.context.clone(),
                    }],
                    (),
                ))
            },
            same,
        )
    }
}

impl Handler<GetCacheEntry> for ContextActor {
    type Result = Durable<Option<SavedCacheEntry>>;

    fn handle(&mut self, msg: GetCacheEntry, _: &mut Self::Context) -> Self::Result {
        self.run(
            move |this| {
                let ns = this.scope.namespace.clone();
                let Some(saved) = this.state.cache(&ns).get(&msg.key).cloned() else {
                    return Ok((Vec::new(), None));
                };
                let mut backends = IndexMap::with_capacity(saved.backends.len());
                for (id, r) in &saved.backends {
                    let content = this.content(id, r)?;
                    let artifact = Artifact {
                        key: id.clone(),
                        kind: r.kind.clone(),
                        content,
                    };
                    backends.insert(id.clone(), artifact);
                }
                let entry = PrecompileCacheEntry {
                    dynamo: saved.dynamo,
                    backends,
                };
                let saved_by = this.state.saver(&ns, &msg.key).to_string();
                Ok((Vec::new(), Some(SavedCacheEntry { entry, saved_by })))
            },
            same,
        )
    }
}

impl Handler<DeleteCacheEntry> for ContextActor {
    type Result = Durable<bool>;

    fn handle(&mut self, msg: DeleteCacheEntry, _: &mut Self::Context) -> Self::Result {
        self.run(
            move |this| {
                let namespace = this.scope.namespace.clone();
                if !this.state.cache(&namespace).contains_key(&msg.key) {
                    return Ok((Vec::new(), false));
                }
                let key = msg.key;
                Ok((vec![Event::CacheEntryDeleted { namespace, key }], true))
            },
            same,
        )
    }
}

impl Handler<ListCacheEntries> for ContextActor {
    type Result = Durable<Vec<CacheEntryInfo>>;

    fn handle(&mut self, _: ListCacheEntries, _: &mut Self::Context) -> Self::Result {
        self.run(
            |this| {
                let ns = &this.scope.namespace;
                let all = this
                    .state
                    .cache(ns)
                    .iter()
                    .map(|(key, e)| {
                        let mut debug_info = e.dynamo.debug_info();
                        debug_info.key = Some(key.clone());
                        CacheEntryInfo {
                            key: key.clone(),
                            saved_by: this.state.saver(ns, key).to_string(),
                            debug_info,
                        }
                    })
                    .collect();
                Ok((Vec::new(), all))
            },
            same,
        )
    }
}

impl Handler<ClearDynamoCache> for ContextActor {
    type Result = Durable<u64>;

    fn handle(&mut self, _: ClearDynamoCache, _: &mut Self::Context) -> Self::Result {
        self.run(
            |this| {
                let namespace = this.scope.namespace.clone();
                let count = this.state.cache(&namespace).len() as u64;
                Ok((vec![Event::DynamoCacheCleared { namespace }], count))
            },
            same,
        )
    }
}
