//! Configuration: built-in defaults (`config/default.toml`), then a file, then `PCX_*`
//! environment variables, then flags; turned into one validated [`Config`] in one place.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::trace::LogFormat;

/// The default configuration, as shipped in `config/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// pcx's settings. Every key is documented in `config/default.toml`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub data_dir: PathBuf,
    pub snapshot_every: u64,
    pub max_content_bytes: u64,
    pub max_request_bytes: u64,
    pub max_in_flight: usize,
    pub cache_capacity_bytes: u64,
    pub socket_path: PathBuf,
    pub tcp_listen: String,
    pub tcp_token: String,
    pub max_frame_bytes: u64,
    pub max_in_flight_per_connection: usize,
    pub origin: String,
    pub plugin_dir: PathBuf,
    pub max_plugin_output_bytes: u64,
    pub plugin_call_timeout_ms: u64,
    pub log_format: LogFormat,
    pub log_filter: String,
}

/// Why a configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {origin} is not valid: {message}")]
    Invalid { origin: String, message: String },
}

impl Config {
    /// Defaults, overlaid with `file` (if given) and then with `env` pairs named `PCX_<KEY>`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = parse(DEFAULT_TOML, "config/default.toml (built in)")?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let origin = path.display().to_string();
            for (key, value) in parse(&text, &origin)? {
                if !table.contains_key(&key) {
                    return Err(ConfigError::Invalid {
                        origin,
                        message: format!("unknown key `{key}`"),
                    });
                }
                table.insert(key, value);
            }
        }
        for (name, raw) in env {
            let Some(key) = name.strip_prefix("PCX_").map(|k| k.to_ascii_lowercase()) else {
                continue;
            };
            let Some(current) = table.get(&key) else {
                continue;
            };
            let value = match current {
                toml::Value::String(_) => toml::Value::String(raw),
                _ => raw.parse::<toml::Value>().or_else(|_| {
                    // A bare scalar ("5000") parses as a document only inside `k = v`.
                    parse(&format!("v = {raw}"), &name)
                        .map(|mut t| t.remove("v").unwrap_or(toml::Value::String(raw.clone())))
                })?,
            };
            table.insert(key, value);
        }
        let config: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Invalid {
                    origin: "(merged)".into(),
                    message: e.to_string(),
                })?;
        config.validate()
    }

    fn validate(self) -> Result<Config, ConfigError> {
        let bad = |message: &str| {
            Err(ConfigError::Invalid {
                origin: "(merged)".into(),
                message: message.into(),
            })
        };
        if self.snapshot_every == 0 {
            return bad("snapshot_every must be at least 1");
        }
        if self.max_in_flight == 0 {
            return bad("max_in_flight must be at least 1");
        }
        if self.plugin_call_timeout_ms == 0 {
            return bad("plugin_call_timeout_ms must be at least 1");
        }
        Ok(self)
    }

    /// The origin recorded in events.
    pub fn origin(&self) -> String {
        if !self.origin.is_empty() {
            return self.origin.clone();
        }
        let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
        format!("{user}@pcx")
    }

    /// The server's socket: `socket_path`, or `<data_dir>/pcx.sock`.
    pub fn socket(&self) -> PathBuf {
        if self.socket_path.as_os_str().is_empty() {
            self.data_dir.join("pcx.sock")
        } else {
            self.socket_path.clone()
        }
    }

    /// The plugin directory, if one is configured.
    pub fn plugin_dir(&self) -> Option<PathBuf> {
        (!self.plugin_dir.as_os_str().is_empty()).then(|| self.plugin_dir.clone())
    }
}

fn parse(text: &str, origin: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError::Invalid {
            origin: origin.to_string(),
            message: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_defaults_parse() {
        let c = Config::load(None, std::iter::empty()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("pcx-data"));
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn env_overrides_defaults_and_unknown_env_is_ignored() {
        let env = vec![
            ("PCX_SNAPSHOT_EVERY".to_string(), "5".to_string()),
            ("PCX_DATA_DIR".to_string(), "/tmp/x".to_string()),
            ("PCX_NOT_A_KEY".to_string(), "1".to_string()),
        ];
        let c = Config::load(None, env).unwrap();
        assert_eq!(c.snapshot_every, 5);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn a_file_with_an_unknown_key_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "snapshot_evry = 3\n").unwrap();
        let err = Config::load(Some(&path), std::iter::empty())
            .unwrap_err()
            .to_string();
        assert!(err.contains("snapshot_evry"), "{err}");
    }

    #[test]
    fn a_bad_value_is_refused() {
        let env = vec![("PCX_SNAPSHOT_EVERY".to_string(), "0".to_string())];
        assert!(Config::load(None, env).is_err());
    }
}
