//! What a request to the context can fail with. Each variant says whose failure it is: the
//! caller's (a rejected request: bad input, unknown key) or the system's (storage, a panic).

use crate::core::model::InvalidEntry;
use crate::store::error::StoreError;

/// A request's failure. Cloneable, because one failed commit fails every request in its group.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// PyTorch's assertion message, word for word.
    #[error("Key {key} not found in artifacts")]
    KeyNotFound { key: String },
    /// A request whose client request id was applied before: nothing was done now. Answered
    /// once everything staged before it is durable (so the first one is too), and rendered by
    /// the protocol as `{"ok":true,"already_applied":true}`. A retried take also carries
    /// what the first one took, read back from the log (`None` once compacted away), so the
    /// artifact reaches the caller even though its first answer was lost.
    #[error("request {request_id} was already applied; nothing was done again")]
    AlreadyApplied {
        request_id: String,
        taken: Option<Box<crate::core::model::Artifact>>,
    },
    /// A request carrying a client request id that an earlier, different request (another op,
    /// key, content, context or namespace) was applied under. Nothing was applied: the id
    /// stands for the first request, and answering "already applied" would tell the client a
    /// change was made that never was.
    #[error(
        "request id {request_id} was already used by another request (its op, fields, context \
         or namespace differ); nothing was applied: give each change its own request id, and \
         retry a change with exactly the request first sent"
    )]
    RequestIdReused { request_id: String },
    /// An edit that named the content it expected (`expected_digest`) found another: someone
    /// changed the artifact since the editor read it. Nothing was applied.
    #[error(
        "edit of {key} refused: it expected content {expected}, but the artifact now holds \
         {found}; read it again and redo the edit"
    )]
    Conflict {
        key: String,
        expected: String,
        found: String,
    },
    #[error("dynamo cache entry {key} is invalid: {reason}")]
    InvalidEntry { key: String, reason: InvalidEntry },
    #[error("artifact kind `{kind}` is not a valid kind name ([a-z0-9_.-]{{1,64}})")]
    InvalidKind { kind: String },
    #[error(
        "content of {key} is {size} bytes, over the limit of {limit} bytes (max_content_bytes)"
    )]
    TooLarge { key: String, size: u64, limit: u64 },
    #[error("edit of {key} failed: {message}")]
    EditFailed { key: String, message: String },
    /// PyTorch's words for a miss.
    #[error("No package found with key {key}")]
    PackageNotFound { key: String },
    /// PyTorch's words for a system mismatch (`Compile package was created with …`).
    #[error("{message}")]
    SystemMismatch { key: String, message: String },
    #[error("no plugin serves artifact kind `{kind}` (backend {backend}); plugin directory: {plugin_dir}")]
    NoPlugin {
        kind: String,
        backend: String,
        plugin_dir: String,
    },
    #[error("{0}")]
    Plugin(crate::plugins::loader::PluginError),
    #[error("content of {key} (blob {digest}) cannot be read: {message}")]
    ContentUnavailable {
        key: String,
        digest: String,
        message: String,
    },
    /// PyTorch's words for a failed cache write.
    #[error("Failed to save package to {key}: {message}")]
    SaveFailed { key: String, message: String },
    #[error("storage failed: {message}")]
    Storage { message: String, no_space: bool },
    /// The cluster's shared dynamo cache holds a row for the key that its saver's record does
    /// not vouch for (altered or forged in the database, or bound to no record): it was not
    /// taken up and nothing was recorded.
    #[error(
        "the cluster's dynamo cache entry {key} (namespace {namespace}, saved by {saved_by}) \
         was refused: {why}; nothing was loaded or recorded (`pcx verify` on the saving \
         journal checks its log; a save of the key there writes a sound row)"
    )]
    SharedEntryUnsound {
        key: String,
        namespace: String,
        saved_by: String,
        why: String,
    },
    #[error("not applied: an earlier change in the same commit group failed ({message})")]
    Aborted { message: String },
    #[error("internal error: a request handler panicked: {message}; nothing was changed")]
    Panicked { message: String },
    #[error("the context is closed")]
    Closed,
    /// An audit question that could not be answered (`kind` as [`crate::audit::query::AuditError::kind`]).
    #[error("{message}")]
    Audit { kind: &'static str, message: String },
}

impl ContextError {
    /// The `snake_case` kind that answers carry in `error.kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            ContextError::KeyNotFound { .. } => "key_not_found",
            ContextError::Conflict { .. } => "conflict",
            ContextError::InvalidEntry {
                reason: InvalidEntry::TooLarge { .. },
                ..
            } => "too_large",
            ContextError::InvalidEntry { .. } => "invalid_entry",
            ContextError::InvalidKind { .. } => "invalid_kind",
            ContextError::TooLarge { .. } => "too_large",
            ContextError::EditFailed { .. } => "edit_failed",
            ContextError::PackageNotFound { .. } => "package_not_found",
            ContextError::SystemMismatch { .. } => "system_mismatch",
            ContextError::NoPlugin { .. } => "no_plugin",
            ContextError::Plugin(crate::plugins::loader::PluginError::NoSuchEdit { .. }) => {
                "no_such_edit"
            }
            ContextError::Plugin(_) => "plugin_failed",
            ContextError::ContentUnavailable { .. } => "content_unavailable",
            ContextError::SaveFailed { .. } => "save_failed",
            ContextError::Storage { no_space: true, .. } => "no_space",
            ContextError::Storage { .. } => "storage",
            ContextError::SharedEntryUnsound { .. } => "shared_entry_unsound",
            ContextError::Aborted { .. } => "aborted",
            ContextError::Panicked { .. } => "internal",
            ContextError::Closed => "closed",
            ContextError::AlreadyApplied { .. } => "already_applied",
            ContextError::RequestIdReused { .. } => "request_id_reused",
            ContextError::Audit { kind, .. } => kind,
        }
    }
}

impl From<StoreError> for ContextError {
    fn from(e: StoreError) -> Self {
        ContextError::Storage {
            no_space: e.is_no_space(),
            message: e.to_string(),
        }
    }
}

impl From<crate::store::record::EncodeError> for ContextError {
    fn from(e: crate::store::record::EncodeError) -> Self {
        ContextError::Storage {
            no_space: false,
            message: e.to_string(),
        }
    }
}

impl From<crate::audit::query::AuditError> for ContextError {
    fn from(e: crate::audit::query::AuditError) -> Self {
        ContextError::Audit {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

impl From<crate::audit::export::ExportError> for ContextError {
    /// An export a server was asked to write: said as `pcx export` says it.
    fn from(e: crate::audit::export::ExportError) -> Self {
        match e {
            crate::audit::export::ExportError::Audit(e) => e.into(),
            e => ContextError::Audit {
                kind: "export_failed",
                message: e.to_string(),
            },
        }
    }
}

impl From<crate::plugins::loader::PluginError> for ContextError {
    /// A kind no plugin serves is the caller's to fix (`no_plugin`); the rest are the plugin's.
    fn from(e: crate::plugins::loader::PluginError) -> Self {
        match e {
            crate::plugins::loader::PluginError::NoPlugin {
                kind,
                backend,
                plugin_dir,
            } => ContextError::NoPlugin {
                kind,
                backend,
                plugin_dir,
            },
            e => ContextError::Plugin(e),
        }
    }
}

/// What a caught panic said, for [`ContextError::Panicked`] (a panic's payload is a `&str` or a
/// `String` when it has a message at all).
pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
