//! How requests reach a context from outside the process: the JSON request/answer
//! [`protocol`], JSON lines on stdin/stdout ([`batch`]), the socket frames ([`wire`]), the
//! first bounded walk over untrusted input ([`shape`]), the server ([`server`]) and its
//! command-line client ([`client`]), authentication on TCP ([`tcp_auth`]), and socket paths of any length ([`unix_path`]).
//!
//! May import every layer below it and the library API ([`crate::context`]); nothing below
//! imports it.

pub mod answer;
pub mod batch;
pub mod cache_protocol;
pub mod client;
pub mod protocol;
pub mod server;
pub mod shape;
pub mod tcp_auth;
pub mod unix_path;
pub mod wire;
pub mod wire_request;
