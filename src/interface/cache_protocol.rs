//! The wire side of named contexts and the shared dynamo cache: `list_contexts`,
//! `drop_context` and the namespace's `put_cache_entry`, `get_cache_entry`,
//! `delete_cache_entry`, `list_cache_entries` and `clear_dynamo_cache`, sent to the actor in
//! the request's scope and answered as JSON. Apart from the protocol's parsing so that the
//! two stay small; the protocol decodes the request and hands over a [`CacheOp`].

use actix::Addr;
use serde_json::json;

use crate::actor::error::ContextError;
use crate::actor::{
    CacheEntryInfo, ClearDynamoCache, ContextActor, ContextInfo, DeleteCacheEntry, DropContext,
    GetCacheEntry, InScope, ListCacheEntries, ListContexts, PutCacheEntry, SavedCacheEntry,
    StitchedEntry,
};
use crate::core::scope::Scope;
use crate::interface::answer::{render, stitched_json, AnswerFuture};

/// One of these requests, decoded.
pub enum CacheOp {
    ListContexts,
    DropContext,
    Put {
        key: String,
        entry: Box<StitchedEntry>,
    },
    Get {
        key: String,
    },
    Delete {
        key: String,
    },
    List,
    Clear,
}

/// Sends `op` to the context in `scope`; gives the future of its answer.
pub fn submit(addr: &Addr<ContextActor>, scope: Scope, op: CacheOp) -> AnswerFuture {
    macro_rules! send {
        ($msg:expr, $render:expr) => {{
            let fut = addr.send(InScope { scope, msg: $msg });
            Box::pin(async move {
                let answer = fut.await.unwrap_or(Err(ContextError::Closed));
                render(answer, $render)
            })
        }};
    }
    match op {
        CacheOp::ListContexts => send!(ListContexts {}, |all: Vec<ContextInfo>| {
            json!({ "contexts": all })
        }),
        CacheOp::DropContext => send!(DropContext {}, |_: ()| json!({})),
        CacheOp::Put { key, entry } => {
            send!(PutCacheEntry { key, entry: *entry }, |_: ()| json!({}))
        }
        CacheOp::Get { key } => send!(GetCacheEntry { key }, |e: Option<SavedCacheEntry>| {
            let entry = e.map(|e| {
                let mut v = stitched_json(&e.entry);
                v["saved_by"] = json!(e.saved_by);
                v
            });
            json!({ "entry": entry })
        }),
        CacheOp::Delete { key } => send!(DeleteCacheEntry { key }, |deleted: bool| {
            json!({ "deleted": deleted })
        }),
        CacheOp::List => send!(ListCacheEntries {}, |all: Vec<CacheEntryInfo>| {
            json!({ "entries": all })
        }),
        CacheOp::Clear => send!(ClearDynamoCache {}, |cleared: u64| {
            json!({ "cleared": cleared })
        }),
    }
}
