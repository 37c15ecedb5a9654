//! Artifact kinds and their `after_deserialization`: stored bytes → the ready-to-use value.
//!
//! `eager` is built in (the identity, as PyTorch's `EagerCacheArtifact`). Every other kind is
//! served by a plugin from the plugin directory. Registration is all-or-nothing per plugin: a
//! plugin that claims `eager` or a kind another plugin already serves is refused whole,
//! naming both files. A broken plugin is reported with its path and the reason, and the others
//! still load.
//!
//! Before any library is loaded: the plugin directory and each library must be trusted
//! ([`crate::plugins::loader::check_trusted`]), and, in the `pcx` binary, each library is loaded first in a
//! child process ([`crate::plugins::probe`]), so a constructor that crashes or hangs refuses its
//! library instead of taking pcx down. A plugin whose call missed its deadline is
//! quarantined ([`Kinds::quarantine`]): every later call to it fails at once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::core::model::EAGER_KIND;
use crate::plugins::loader::{self, JsonObject, LoadedPlugin, PluginError};

/// The ready-to-use form of one backend artifact.
#[derive(Clone, Debug, PartialEq)]
pub struct Deserialized {
    pub kind: String,
    /// Who produced it: `builtin` for `eager`, else the plugin's name.
    pub served_by: String,
    /// The plugin's JSON description of the value.
    pub description: JsonObject,
    pub content: Vec<u8>,
}

/// How long a plugin call may take unless `plugin_call_timeout_ms` says otherwise.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A plugin serving a kind, and whether it is quarantined.
#[derive(Clone, Debug)]
struct Serving {
    plugin: Arc<LoadedPlugin>,
    /// Shared by every kind of the plugin and every clone of the registry.
    quarantined: Arc<AtomicBool>,
}

/// The artifact kinds this process can deserialize, and the plugins serving them.
#[derive(Clone, Debug)]
pub struct Kinds {
    plugin_dir: Option<PathBuf>,
    by_kind: HashMap<String, Serving>,
    plugins: Vec<Arc<LoadedPlugin>>,
    problems: Vec<PluginError>,
    output_limit: usize,
    call_timeout: Duration,
    /// Plugin calls made and failed, for `stats`.
    calls: Arc<(AtomicU64, AtomicU64)>,
}

impl Default for Kinds {
    fn default() -> Kinds {
        Kinds::builtin(None)
    }
}

impl Kinds {
    /// Only the built-in `eager`; `plugin_dir` is named in errors for other kinds.
    pub fn builtin(plugin_dir: Option<PathBuf>) -> Kinds {
        Kinds {
            plugin_dir,
            by_kind: HashMap::new(),
            plugins: Vec::new(),
            problems: Vec::new(),
            output_limit: usize::MAX,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            calls: Arc::default(),
        }
    }

    /// [`Kinds::load_with`] with the default call deadline.
    pub fn load(dir: &Path, output_limit: usize) -> Kinds {
        Kinds::load_with(dir, output_limit, DEFAULT_CALL_TIMEOUT)
    }

    /// Loads every plugin in `dir`. Problems are logged and kept (see [`Kinds::problems`]);
    /// they never stop the others from loading. A library is refused before it is loaded if
    /// it or its directory is not trusted, or (in the `pcx` binary) if loading it in a child
    /// process crashed or took longer than `call_timeout`; `call_timeout` is also the
    /// deadline of each plugin call the context makes ([`crate::actor::plugin_thread`]).
    pub fn load_with(dir: &Path, output_limit: usize, call_timeout: Duration) -> Kinds {
        let mut kinds = Kinds {
            output_limit,
            call_timeout,
            ..Kinds::builtin(Some(dir.to_path_buf()))
        };
        let paths = match loader::candidates(dir) {
            Ok(paths) => paths,
            Err(e) => {
                kinds.problem(e);
                return kinds;
            }
        };
        let trusted: Vec<PathBuf> = paths.iter().filter_map(|p| p.clone().ok()).collect();
        let mut vetted = crate::plugins::probe::vet(&trusted, call_timeout).into_iter();
        for path in paths {
            let loaded = path.and_then(|p| {
                vetted.next().unwrap_or(Ok(()))?;
                loader::load(&p)
            });
            match loaded {
                Ok(p) => {
                    if let Err(e) = kinds.register(p) {
                        kinds.problem(e);
                    }
                }
                Err(e) => kinds.problem(e),
            }
        }
        kinds
    }

    fn problem(&mut self, e: PluginError) {
        tracing::error!(error = %e, "plugin not loaded");
        self.problems.push(e);
    }

    /// Registers all of a plugin's kinds, or none.
    fn register(&mut self, p: LoadedPlugin) -> Result<(), PluginError> {
        for kind in &p.kinds {
            if kind == EAGER_KIND {
                return Err(PluginError::ClaimsEager {
                    path: p.path.clone(),
                });
            }
            if let Some(first) = self.by_kind.get(kind) {
                return Err(PluginError::KindTwice {
                    kind: kind.clone(),
                    first: first.plugin.path.clone(),
                    second: p.path.clone(),
                });
            }
        }
        tracing::info!(plugin = %p.name, version = %p.version, kinds = ?p.kinds, path = %p.path.display(), "plugin loaded");
        let serving = Serving {
            plugin: Arc::new(p),
            quarantined: Arc::default(),
        };
        for kind in &serving.plugin.kinds {
            self.by_kind.insert(kind.clone(), serving.clone());
        }
        self.plugins.push(serving.plugin);
        Ok(())
    }

    /// The deadline of each plugin call the context makes.
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// The plugin serving `kind`, if one does.
    pub fn plugin_for(&self, kind: &str) -> Option<&Arc<LoadedPlugin>> {
        self.by_kind.get(kind).map(|s| &s.plugin)
    }

    /// Refuses every later call to the plugin serving `kind` (one of its calls was abandoned:
    /// it may hold locks or be corrupt), until the process restarts.
    pub fn quarantine(&self, kind: &str) {
        if let Some(s) = self.by_kind.get(kind) {
            if !s.quarantined.swap(true, Ordering::SeqCst) {
                tracing::error!(plugin = %s.plugin.name, version = %s.plugin.version, path = %s.plugin.path.display(), "plugin quarantined until pcx restarts");
            }
        }
    }

    /// Counts a call that was abandoned (it has not returned, so it was not counted).
    pub fn count_abandoned(&self) {
        self.calls.0.fetch_add(1, Ordering::Relaxed);
        self.calls.1.fetch_add(1, Ordering::Relaxed);
    }

    /// The plugins loaded, in load order.
    pub fn plugins(&self) -> &[Arc<LoadedPlugin>] {
        &self.plugins
    }

    /// What went wrong while loading.
    pub fn problems(&self) -> &[PluginError] {
        &self.problems
    }

    /// The plugin serving `kind`; an error if none does or it is quarantined.
    fn serving(&self, kind: &str, backend: &str) -> Result<&LoadedPlugin, PluginError> {
        let Some(s) = self.by_kind.get(kind) else {
            return Err(self.no_plugin(kind, backend));
        };
        if s.quarantined.load(Ordering::Relaxed) {
            return Err(PluginError::Quarantined {
                plugin: s.plugin.name.clone(),
                version: s.plugin.version.clone(),
                kind: kind.to_string(),
            });
        }
        Ok(&s.plugin)
    }

    fn no_plugin(&self, kind: &str, backend: &str) -> PluginError {
        PluginError::NoPlugin {
            kind: kind.to_string(),
            backend: backend.to_string(),
            plugin_dir: self
                .plugin_dir
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(none: plugins are off or plugin_dir is empty)".into()),
        }
    }

    /// Runs `kind`'s `after_deserialization` on `content` for backend `backend`, on this
    /// thread and with no deadline: the context makes its calls on the plugin thread.
    pub fn after_deserialization(
        &self,
        backend: &str,
        kind: &str,
        content: &[u8],
    ) -> Result<Deserialized, PluginError> {
        if kind == EAGER_KIND {
            return Ok(Deserialized {
                kind: kind.to_string(),
                served_by: "builtin".into(),
                description: JsonObject::size(content.len()),
                content: content.to_vec(),
            });
        }
        let p = self.serving(kind, backend)?;
        let d = self.counted(p.deserialize(kind, content, self.output_limit))?;
        Ok(Deserialized {
            kind: kind.to_string(),
            served_by: p.name.clone(),
            description: d.description,
            content: d.bytes,
        })
    }

    /// Runs the edit `op` of the plugin serving `kind` on `content` (on this thread, as
    /// [`Kinds::after_deserialization`]).
    pub fn edit(
        &self,
        key: &str,
        kind: &str,
        op: &str,
        args: &[u8],
        content: &[u8],
    ) -> Result<Vec<u8>, PluginError> {
        let p = self.serving(kind, key)?;
        self.counted(p.edit(kind, op, args, content, self.output_limit))
    }

    fn counted<T>(&self, result: Result<T, PluginError>) -> Result<T, PluginError> {
        self.calls.0.fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            self.calls.1.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Plugin calls made, and how many failed.
    pub fn call_counts(&self) -> (u64, u64) {
        (
            self.calls.0.load(Ordering::Relaxed),
            self.calls.1.load(Ordering::Relaxed),
        )
    }
}
