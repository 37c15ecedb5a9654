//! pcx's group statement issued by a bare client: W6's floor (`pcx-bench w6`). The issue's
//! floor is "the same group-commit transaction issued by a minimal client", so the floor calls
//! the very code the journal commits with ([`Group::write_in_one_statement`], the prepared
//! [`GROUP_SQL`]) instead of a copy that could drift from it: what it leaves out is only what
//! surrounds the statement in pcx (the server, the actor, encoding and hashing, the database
//! thread), which is what the ratio to it measures.

use std::sync::Arc;

use postgres::Client;

use crate::core::model::Digest;
use crate::store::error::StoreError;

use super::db::*;
use super::group::*;

/// One bare writer of one journal: its own connection, the journal's head row taken with a
/// long lease, and the prepared group statement.
pub struct BareWriter {
    client: Client,
    statement: postgres::Statement,
    journal: String,
    epoch: i64,
    head: u64,
}

impl BareWriter {
    /// Creates the schema if missing, takes `journal` (which must be new: a floor never writes
    /// into a real journal) for an hour, and prepares the statement.
    pub fn start(url: &str, journal: &str) -> Result<BareWriter, StoreError> {
        let (mut client, _) = connect(url).map_err(db_err("connecting"))?;
        ensure_schema(&mut client).map_err(db_err("creating the schema"))?;
        let epoch = 1;
        client
            .execute(
                "INSERT INTO pcx_heads (journal, head, epoch, holder, lease_until) \
                 VALUES ($1, 0, $2, 'pcx-bench floor', clock_timestamp() + interval '1 hour')",
                &[&journal, &epoch],
            )
            .map_err(db_err("taking a new journal for the floor"))?;
        let statement = client
            .prepare(GROUP_SQL)
            .map_err(db_err("preparing the group statement"))?;
        Ok(BareWriter {
            client,
            statement,
            journal: journal.to_string(),
            epoch,
            head: 0,
        })
    }

    /// Commits one group (records numbered on from the head) as the journal commits a group of
    /// events and their contents.
    pub fn commit(
        &mut self,
        blobs: Vec<(Digest, Arc<Vec<u8>>)>,
        records: Vec<Vec<u8>>,
    ) -> Result<(), StoreError> {
        let old = self.head;
        let new = old + records.len() as u64;
        let group = Group {
            journal: self.journal.clone(),
            epoch: self.epoch,
            old,
            new,
            blobs,
            records: (old + 1..).zip(records).collect(),
            cache_puts: Vec::new(),
            snapshot: None,
            shared_cache: Vec::new(),
        };
        let moved = group
            .write_in_one_statement(&mut self.client, &self.statement)
            .map_err(db_err("committing a floor group"))?;
        if !moved {
            return Err(StoreError::Fenced {
                journal: self.journal.clone(),
                why: "the floor's head moved under it".into(),
            });
        }
        self.head = new;
        Ok(())
    }
}
