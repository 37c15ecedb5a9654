//! The store: how events and contents become durable bytes and come back.
//!
//! Owns the record format and hash chain ([`record`]), how records and contents share sled
//! values ([`pack`]), the [`journal`] (the `Journal` trait; its sled implementation, the
//! default, in `sled_journal`, and the PostgreSQL one in `pg_journal`, feature `postgres`), large
//! contents in append-only files ([`content`]), rebuilding state from a journal
//! ([`replay`]), saying which of sled's files is damaged when sled fails ([`damage`]),
//! refusing a sled log damaged before its end, which sled would cut there ([`sled_log`]), and
//! reading what still reads of a directory that does not open ([`raw`]).
//! May import the core only: nothing here knows about actors, plugins, audit commands or
//! interfaces.

pub mod content;
pub mod damage;
pub mod error;
pub mod journal;
pub mod pack;
#[cfg(feature = "postgres")]
pub mod pg_journal;
pub mod raw;
pub mod record;
pub mod replay;
pub mod sled_journal;
pub mod sled_log;
pub mod swap;
