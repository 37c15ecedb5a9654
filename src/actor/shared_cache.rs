//! The dynamo cache a cluster shares (a journal in PostgreSQL): how a load takes up an entry
//! that another journal saved (what a group tells the cluster of its own saves, deletes and
//! clears is [`crate::store::journal::SharedCacheOp::of_event`]). PyTorch's processes share one cache directory; a fleet's pcx processes
//! share this, namespaces and all.
//!
//! A context's own copies stay in its log (so that `log`, `state --at` and replay see every
//! load with the entry it loaded): an entry adopted from the cluster is recorded as a
//! `CacheEntryPut` whose saver is `journal/context` (a name no context can have, so it is
//! never told back to the cluster), followed by the load's `EntryLoaded`.

use super::context_actor::ContextActor;
use crate::actor::error::ContextError;
use crate::core::event::Event;
use crate::store::record::{decode_saved_entry, encode_saved_entry};

impl ContextActor {
    /// Before a load of `key` on a journal whose cache a cluster shares: when the cluster's
    /// entry differs from this context's copy (or it has none) and was saved by another
    /// journal, stage it here as a `CacheEntryPut` naming its saver, so that the load takes
    /// it. An entry this journal saved itself is already its own (perhaps newer, staged).
    pub(super) fn adopt_shared_entry(&mut self, key: &str) -> Result<(), ContextError> {
        let Some(me) = self.journal.cluster_name().map(str::to_string) else {
            return Ok(());
        };
        let namespace = self.scope.namespace.clone();
        let Some(shared) = self.journal.shared_cache_entry(&namespace, key)? else {
            // Gone from the cluster (deleted or cleared by a journal): a copy adopted from it
            // goes too. A copy this journal saved itself stays (it may not be durable yet).
            let adopted = self.state.cache(&namespace).contains_key(key)
                && self.state.saver(&namespace, key).contains('/');
            if adopted {
                tracing::info!(key = %key, namespace = %namespace, "a dynamo cache entry the cluster no longer holds is dropped here too");
                self.stage(vec![Event::CacheEntryDeleted {
                    namespace,
                    key: key.to_string(),
                }])?;
                self.commit_adoption();
            }
            return Ok(());
        };
        let (bytes, saved_by) = (shared.entry, shared.saved_by);
        // `journal/context`: a context's name has no `/`, a journal's might.
        if saved_by.rsplit_once('/').map(|(journal, _)| journal) == Some(me.as_str()) {
            return Ok(());
        }
        let own = self
            .state
            .cache(&namespace)
            .get(key)
            .map(encode_saved_entry)
            .transpose()?;
        if own.as_deref() == Some(bytes.as_slice()) {
            return Ok(());
        }
        // A row its saver's record does not vouch for (altered or forged in the database, or
        // bound to no record) is refused before anything is staged: taken up, it would be
        // recorded here as saved by the journal it names and answered with that saver.
        if let Some(why) = shared.unsound {
            tracing::error!(key = %key, namespace = %namespace, saved_by = %saved_by, %why,
                "refused the cluster's dynamo cache entry: its saver's record does not vouch for it");
            return Err(ContextError::SharedEntryUnsound {
                key: key.to_string(),
                namespace,
                saved_by,
                why,
            });
        }
        let entry = decode_saved_entry(&bytes).map_err(|e| ContextError::Storage {
            message: format!("the cluster's dynamo cache entry {key} (namespace {namespace}, saved by {saved_by}) does not decode: {e}"),
            no_space: false,
        })?;
        tracing::info!(key = %key, namespace = %namespace, saved_by = %saved_by, "adopting a dynamo cache entry the cluster shares");
        self.stage(vec![Event::CacheEntryPut {
            namespace,
            key: key.to_string(),
            entry,
            saved_by,
        }])?;
        self.commit_adoption();
        Ok(())
    }

    /// Sends what the adoption staged to the committer now, as a change of its own. It is
    /// applied to the state and numbered already, while the load that caused it may still
    /// fail (a miss after a deletion, a refused system, a backend that does not
    /// deserialize), and a failed request's answer commits nothing it staged: the adopted
    /// event was then in the state and the head but never in the log, so the next group
    /// left a gap and a clean close wrote a snapshot past the log's end, which every later
    /// open refused as a lost tail (exit 3). A failed commit of it rebuilds the state from
    /// the log, as any failed commit does, and refuses the load queued behind it.
    fn commit_adoption(&mut self) {
        self.when_durable(Box::new(|_| {}));
    }
}
