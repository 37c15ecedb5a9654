//! Artifact kinds and their `after_deserialization`: stored bytes → the ready-to-use value.
//!
//! `eager` is built in (the identity, as PyTorch's `EagerCacheArtifact`). Every other kind
//! must come from a plugin; until one serves it, loading it is a clear error naming the kind
//! and where plugins are looked for.

use std::path::PathBuf;

use crate::error::ContextError;
use crate::model::EAGER_KIND;

/// The ready-to-use form of one backend artifact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deserialized {
    pub kind: String,
    /// Who produced it: `builtin` for `eager`.
    pub served_by: String,
    pub content: Vec<u8>,
}

/// The artifact kinds this process can deserialize.
#[derive(Clone, Debug, Default)]
pub struct Kinds {
    plugin_dir: Option<PathBuf>,
}

impl Kinds {
    /// Kinds with only the built-in `eager`; `plugin_dir` is where plugins would come from.
    pub fn builtin(plugin_dir: Option<PathBuf>) -> Kinds {
        Kinds { plugin_dir }
    }

    /// Runs `kind`'s `after_deserialization` on `content` for backend `backend`.
    pub fn after_deserialization(
        &self,
        backend: &str,
        kind: &str,
        content: Vec<u8>,
    ) -> Result<Deserialized, ContextError> {
        if kind == EAGER_KIND {
            return Ok(Deserialized {
                kind: kind.to_string(),
                served_by: "builtin".into(),
                content,
            });
        }
        Err(ContextError::NoPlugin {
            kind: kind.to_string(),
            backend: backend.to_string(),
            plugin_dir: self
                .plugin_dir
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(none configured)".into()),
        })
    }
}
