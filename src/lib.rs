//! # pcx: PyTorch's precompile context as a durable, event-sourced actor
//!
//! A map of the crate, from the pure core outwards (dependencies point down this list):
//!
//! | module | what lives there | IO? |
//! |---|---|---|
//! | [`model`] | artifacts, dynamo entries, `debug_info`, stitching one entry | no |
//! | [`event`] | the events (facts, past tense) | no |
//! | [`state`] | the folded state and `State::apply`, the only way it changes | no |
//! | [`stitch`] | `create_cache_entries` over a state, with its structured trace events | no |
//! | [`record`] | the on-disk record format: envelope, hash chain, snapshots | no |
//! | [`pack`] | how many records or contents share one sled value: pages, packs, index | no |
//! | [`swap`] | a data directory's lock, and replacing the directory whole (crash-safe) | files |
//! | [`journal`] | the sled event log, blobs, snapshots, durability (`fdatasync`) | sled |
//! | [`content`] | content files: large groups' content, appended and synced | files |
//! | [`replay`] | rebuilding the state from the journal, checking every record | via journal |
//! | [`audit`] | log, history, state at a point, diff, verify: read-only questions of the log | via journal |
//! | [`export`] | the log as JSON lines and back (`pcx export` / `pcx import`) | via journal |
//! | [`compact`] | rewriting a data directory to begin at an anchor snapshot | sled, files |
//! | [`plugin`] | loading plugins and calling them safely (every `unsafe` of the plugin ABI) | dlopen |
//! | [`probe`] | loading a plugin library first in a child process (`pcx plugins probe`) | processes |
//! | [`kinds`] | the registry of artifact kinds (`eager` built in, the rest from plugins) | via plugin |
//! | [`deserializer`] | the plugin thread: every plugin call the context makes, under a deadline | via kinds |
//! | [`committer`] | the committer thread and its queue: group commit, answers once durable | via journal |
//! | [`actor`] | the context actor: single writer, group commit, panic containment | via journal |
//! | [`context`] | the library API ([`Context`]) for orchestrators that embed pcx | via actor |
//! | [`protocol`] | the JSON request/answer protocol (`pcx batch`, the CLI, the server) | no |
//! | [`batch`] | streaming JSON lines through the context | stdin/stdout |
//! | [`wire`] | the socket protocol's frames and JSON ↔ MessagePack | no |
//! | [`shape`] | a first walk over untrusted input: bounded values and nesting | no |
//! | [`server`] | `pcx serve`: many connections, one actor, bounded queues, shutdown | sockets |
//! | [`client`] | `pcx client`: JSON lines through a server | sockets |
//! | [`config`] | defaults, config file, environment, validated in one place | reads files |
//! | [`alloc`] | the programs' allocator (mimalloc) and its tuning | no |
//! | [`trace`] | structured trace events and the log subscriber | stderr |
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
