//! What a retried `take_artifact` took the first time, read back from the log. A take answers
//! with the artifact it removed; when that answer is lost (a broken connection, a holder
//! that lost its lease) and the client retries under the same request id, the retry must not
//! take again, but answering only "already applied" would leave the artifact gone from the
//! context and never handed to anyone. The log still says what the context held just before
//! the take, and the content store still holds its bytes until a compaction drops both.

use crate::core::event::Event;
use crate::core::model::{Artifact, ArtifactRef, Digest};
use crate::core::scope::DEFAULT;
use crate::store::error::StoreError;
use crate::store::journal::Journal;
use crate::store::replay::base;

use super::{walk, AuditError};

/// The artifact that the take applied under `request_id` removed, as the context held it
/// just before: `None` when the log no longer holds that take (compacted away) or the
/// request was not a take. A content whose bytes are gone or altered is an error, not `None`:
/// the log says it was there.
pub fn taken_by(journal: &dyn Journal, request_id: &str) -> Result<Option<Artifact>, AuditError> {
    let mut found: Option<(String, ArtifactRef)> = None;
    // The whole log: an id is remembered for a bounded number of requests, so a later request
    // may have used it again once forgotten; the last take under it is the one retried.
    walk(journal, base(journal)?, |envelope, _, state| {
        if let Event::Requested {
            request_id: id,
            event,
            ..
        } = &envelope.event
        {
            if id == request_id {
                let (context, event) = match event.as_ref() {
                    Event::Scoped { context, event, .. } => (context.as_str(), event.as_ref()),
                    other => (DEFAULT, other),
                };
                found = match event {
                    Event::ArtifactTaken { key } => state
                        .context(context)
                        .artifacts
                        .get(key)
                        .map(|r| (key.clone(), r.clone())),
                    _ => None,
                };
            }
        }
        Ok(true)
    })?;
    let Some((key, r)) = found else {
        return Ok(None);
    };
    let damaged = |what: &str| {
        AuditError::Store(StoreError::Damaged {
            what: format!(
                "content {} of artifact {key}, taken under request {request_id}, {what}",
                r.digest.to_hex()
            ),
        })
    };
    match journal.blob(&r.digest)? {
        None => Err(damaged("is missing from the content store")),
        Some(content) if Digest::of(&content) != r.digest => {
            Err(damaged("no longer matches its digest"))
        }
        Some(content) => Ok(Some(Artifact {
            key,
            kind: r.kind,
            content,
        })),
    }
}
