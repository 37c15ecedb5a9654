//! The host side of plugins: loading shared libraries and calling them safely ([`loader`],
//! which holds every `unsafe` of the plugin ABI), and the registry of artifact kinds
//! ([`kinds`]: `eager` built in, the rest from plugins).
//!
//! May import the core only. The ABI itself is the `pcx-plugin-abi` crate under `plugins/`.

pub mod kinds;
pub mod loader;
pub mod probe;
