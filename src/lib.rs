//! # pcx: PyTorch's precompile context as a durable, event-sourced actor
//!
//! A map of the crate. Each folder is a layer; a layer may import the layers above it in
//! this table and never one below it (`tests/layers.rs` checks this, and that no two files
//! import each other, directly or in a ring):
//!
//! | layer | what it owns | IO? |
//! |---|---|---|
//! | [`core`] | artifacts, dynamo entries, events, the folded state and its one `apply`, stitching, scopes (contexts and namespaces) | no |
//! | [`store`] | the record format and hash chain, packs, the `Journal` trait, the sled journal and (feature `postgres`) the PostgreSQL journal, sled's log checked before sled opens it, content files, replay, the directory lock and swap, damage reports | sled, files |
//! | [`plugins`] | loading plugin libraries (every `unsafe` of the ABI), trying them in a child process first, the registry of kinds | dlopen |
//! | [`audit`] | read-only questions of a log, verify, export and import, compaction, lost tails, salvage | via the store |
//! | [`actor`] | the context actor: messages, answers once durable, the request loop, requests in a named context or namespace, loads, the committer and plugin threads | threads |
//! | [`context`], [`config`], [`trace`], [`alloc`] | the library API for orchestrators that embed pcx, configuration, logging, the allocator | files |
//! | [`interface`] | the JSON protocol (requests on the wire, answers, the cache operations), batch, socket frames, the server and its client | stdin/out, sockets |
//!
//! The programs sit on top: `pcx` (`src/bin/pcx/`) and `pcx-bench` (`src/bin/pcx-bench/`).
//!
//! The rule that holds it together: a request is decided against the state, its events are
//! appended and made durable, then applied and answered; a restart replays the same events
//! through the same `apply`.

pub mod actor;
pub mod alloc;
pub mod audit;
pub mod config;
pub mod context;
pub mod core;
pub mod interface;
pub mod plugins;
pub mod store;
pub mod trace;

pub use actor::error::ContextError;
pub use config::Config;
pub use context::Context;
pub use core::model::{Artifact, DynamoCacheEntry, DynamoCodeEntry, SystemInfo};
