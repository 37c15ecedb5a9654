//! The pure core: artifacts and dynamo entries ([`model`]), the events that change them
//! ([`event`]), the folded state and its one `apply` ([`state`]), stitching cache entries
//! ([`stitch`]), and which context and namespace a request acts in ([`scope`]).
//!
//! Owns the meaning of a precompile context, nothing else: no IO, no actix, no sled, no
//! tracing subscribers. It imports nothing from the rest of the crate, so every other layer can
//! be checked against it and a replay is the same fold a live request runs.

pub mod event;
pub mod model;
pub mod scope;
pub mod state;
pub mod stitch;
