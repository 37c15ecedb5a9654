//! A journal seen as of one point in a stream ([`Capped`]): apart because it is a `Journal`
//! in its own right, which every question can be asked of.

use crate::core::model::Digest;
use crate::store::error::StoreError;
use crate::store::journal::Journal;

/// A journal seen as of one point: records after `cap` do not exist. A query asked in the
/// middle of a stream answers as of its place in it, even if later writes are durable by the
/// time it runs.
pub struct Capped {
    pub inner: std::sync::Arc<dyn Journal>,
    pub cap: u64,
}

impl Journal for Capped {
    fn blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.blob(digest)
    }
    fn commit(&self, commit: &crate::store::journal::Commit) -> Result<(), StoreError> {
        self.inner.commit(commit)
    }
    fn records(&self, from: u64) -> crate::store::journal::Records<'_> {
        let cap = self.cap;
        Box::new(
            self.inner
                .records(from)
                .take_while(move |r| r.as_ref().map_or(true, |(seq, _)| *seq <= cap)),
        )
    }
    fn last_seq(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.inner.last_seq()?.map(|s| s.min(self.cap)))
    }
    fn snapshot_seqs(&self) -> Result<Vec<u64>, StoreError> {
        Ok(self
            .inner
            .snapshot_seqs()?
            .into_iter()
            .filter(|s| *s <= self.cap)
            .collect())
    }
    fn snapshot(&self, seq: u64) -> Result<Option<crate::store::journal::Bytes>, StoreError> {
        if seq > self.cap {
            return Ok(None);
        }
        self.inner.snapshot(seq)
    }
    fn reset(&self) -> Result<(), StoreError> {
        self.inner.reset()
    }
    fn anchor(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.anchor()
    }
    fn rewrite_cache_view(&self, entries: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        self.inner.rewrite_cache_view(entries)
    }
    fn cache_view(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.cache_view()
    }
    fn lost_tails(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.inner.lost_tails()
    }
    fn data_dir(&self) -> Option<&std::path::Path> {
        self.inner.data_dir()
    }
}
