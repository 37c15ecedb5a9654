//! What can go wrong with a plugin, loading or calling it: one error type, each variant
//! naming the library (and, for calls, the plugin, its version and the kind), so a user can
//! act on it. Apart from the loader because every layer above reports it.

use std::path::PathBuf;

/// What went wrong with a plugin, loading or calling it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    #[error("no plugin serves artifact kind `{kind}` (backend {backend}); plugin directory: {plugin_dir}")]
    NoPlugin {
        kind: String,
        backend: String,
        plugin_dir: String,
    },
    #[error("plugin directory {dir} does not exist")]
    DirMissing { dir: PathBuf },
    #[error("cannot read plugin directory {dir}: {message}")]
    DirUnreadable { dir: PathBuf, message: String },
    #[error("plugin {path}: not a regular file")]
    NotAFile { path: PathBuf },
    #[error("plugin {path}: outside the plugin directory {dir}")]
    OutsideDir { path: PathBuf, dir: PathBuf },
    #[error("plugin {path}: cannot be loaded: {message}")]
    Open { path: PathBuf, message: String },
    #[error("plugin {path}: has no entry symbol pcx_plugin_entry_v1 (not a pcx plugin, or built for another ABI major)")]
    NoEntry { path: PathBuf },
    #[error("plugin {path}: its entry returned a null descriptor")]
    NullDescriptor { path: PathBuf },
    #[error("plugin {path}: descriptor is invalid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("plugin {path}: speaks ABI {major}.{minor}; this pcx speaks {host_major}.x with x >= {host_min_minor}")]
    Abi {
        path: PathBuf,
        major: u16,
        minor: u16,
        host_major: u16,
        host_min_minor: u16,
    },
    #[error("plugin {path}: built for target {target}, this pcx is {host}")]
    Target {
        path: PathBuf,
        target: String,
        host: String,
    },
    #[error("plugin {path} claims the built-in kind `eager`")]
    ClaimsEager { path: PathBuf },
    #[error("kind `{kind}` is claimed by two plugins: {first} and {second}")]
    KindTwice {
        kind: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("plugin {plugin} {version} failed on kind `{kind}`: {message}")]
    Failed {
        plugin: String,
        version: String,
        kind: String,
        message: String,
    },
    #[error("plugin {plugin} {version} panicked on kind `{kind}`: {message}")]
    Panicked {
        plugin: String,
        version: String,
        kind: String,
        message: String,
    },
    #[error("plugin {plugin} {version} wrote more than {limit} bytes for kind `{kind}`")]
    OutputLimit {
        plugin: String,
        version: String,
        kind: String,
        limit: usize,
    },
    #[error("plugin {plugin} {version} has no edit named `{op}` (it has: {available})")]
    NoSuchEdit {
        plugin: String,
        version: String,
        op: String,
        available: String,
    },
    #[error("plugin {plugin} {version} did not return within {deadline_ms} ms on kind `{kind}` (plugin_call_timeout_ms): the call was abandoned and the plugin is quarantined until pcx restarts")]
    TimedOut {
        plugin: String,
        version: String,
        kind: String,
        deadline_ms: u64,
    },
    #[error("plugin {plugin} {version} is quarantined until pcx restarts (a call to it did not return within plugin_call_timeout_ms): kind `{kind}` is not served")]
    Quarantined {
        plugin: String,
        version: String,
        kind: String,
    },
    #[error("pcx is shutting down: the call to plugin {plugin} {version} on kind `{kind}` was abandoned")]
    Abandoned {
        plugin: String,
        version: String,
        kind: String,
    },
    #[error("plugin calls cannot be made: the plugin thread could not be started: {message}")]
    NoThread { message: String },
    #[error("{what} {path} is writable by {by} (mode {mode:04o}): whoever can write it can run code as pcx; refused (chmod go-w {path})")]
    Writable {
        what: &'static str,
        path: PathBuf,
        mode: u32,
        by: &'static str,
    },
    #[error("{what} {path} is owned by uid {owner} (mode {mode:04o}), neither this user (uid {uid}) nor root: whoever owns it can run code as pcx; refused")]
    ForeignOwner {
        what: &'static str,
        path: PathBuf,
        mode: u32,
        owner: u32,
        uid: u32,
    },
    #[error("plugin {path}: loading it crashed a check process with signal {signal} ({name}); not loaded, pcx would have crashed the same way")]
    CheckCrashed {
        path: PathBuf,
        signal: i32,
        name: &'static str,
    },
    #[error("plugin {path}: loading it in a check process did not finish within {deadline_ms} ms (plugin_call_timeout_ms; does a constructor loop?); not loaded")]
    CheckTimedOut { path: PathBuf, deadline_ms: u64 },
    #[error("plugin {path}: could not be checked in a child process first: {message}; not loaded")]
    CheckFailed { path: PathBuf, message: String },
}
