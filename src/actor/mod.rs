//! The context actor: the single writer of a data directory.
//!
//! Every request runs the same steps: **decide** (validate against the current state; may
//! reject, changes nothing) → **stage** (number and encode the events, then `apply` them) →
//! **durable** (the group commit that holds them is flushed and synced) → **answer**.
//!
//! Group commit ([`crate::actor::committer`]): staged records collect in a queue while the previous
//! group is being made durable on the committer thread, which takes the whole queue when it
//! is free and hands the group's answers back to this thread in one go. Under load a group
//! holds everything that arrived during one sync. Reads are answered in the same order: a
//! read waits for the changes staged before it, so nobody sees a change before it is durable.
//!
//! Loads with backends of plugin kinds are the one exception to "one request at a time":
//! their plugin calls run on the plugin thread ([`crate::actor::plugin_thread`]) while the actor
//! takes the next message. They are staged in arrival order, and every other request first
//! waits for them (`settle_loads`), so each request still sees the state as if every request
//! before it had been done whole. A plugin edit runs there too, with the actor waiting: every
//! plugin call has a deadline, which a call on this thread could not have.
//!
//! If a commit fails, every request of that group and of those queued behind it gets an
//! error (once the state is rebuilt from the log), and the journal takes the group back:
//! nothing half-applied, nothing answered and then lost. A panic while deciding is caught and
//! answered as an error; the actor keeps serving.
//!
//! The actor's files, one concern each: [`messages`] (what it takes and answers), [`reply`]
//! (how answers reach callers once durable), `context_actor` (the request loop), `requests`
//! and `queries` (the handlers), `load` (the load pipeline), and its two helper threads,
//! [`committer`] (group commit) and [`plugin_thread`] (every plugin call, under a deadline).

mod cache_ops;
pub mod committer;
mod context_actor;
pub mod error;
mod in_scope;
mod load;
pub mod messages;
pub mod plugin_thread;
mod queries;
pub mod reply;
mod requests;
mod shared_cache;
pub mod structured;

pub use context_actor::{sync_cache_view, ContextActor};
pub use messages::*;
pub use reply::{Durable, Tagged, TaggedReply};
