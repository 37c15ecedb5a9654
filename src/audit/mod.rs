//! Auditing a log from outside the actor: read-only questions ([`query`]: log, history, state
//! at a point, diff, verify), the log as JSON lines and back ([`export`]), rewriting a data
//! directory to begin at an anchor snapshot ([`compact`]), the operator's decision to go on
//! after a lost tail ([`lost_tail`]), exporting what still verifies of a directory that
//! does not open ([`salvage`]), and the file an export or salvage writes ([`output`]).
//!
//! May import the core and the store. It works on a journal directly, so it runs on a stopped
//! data directory as well as inside a live context (the actor dispatches audit queries to it).

pub mod compact;
pub mod export;
pub mod lost_tail;
pub mod output;
pub mod query;
pub mod salvage;
