//! Configuration: built-in defaults (`config/default.toml`), then a file, then `PCX_*`
//! environment variables, then flags; turned into one validated [`Config`] in one place.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::trace::LogFormat;

/// The default configuration, as shipped in `config/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// The largest integer a TOML file (or a `PCX_*` variable) can hold.
const TOML_MAX: u64 = i64::MAX as u64;
/// The most slots of a queue sized from the configuration (in flight, connections).
const MAX_QUEUE: u64 = 1 << 20;
/// The shortest `tcp_token` accepted.
pub const MIN_TOKEN_BYTES: usize = 16;

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
    pub max_unread_answer_bytes_per_connection: u64,
    pub max_connections: usize,
    pub tcp_auth_timeout_ms: u64,
    pub max_frame_bytes_total: u64,
    pub frame_stall_timeout_ms: u64,
    pub origin: String,
    pub plugin_dir: PathBuf,
    pub max_plugin_output_bytes: u64,
    pub plugin_call_timeout_ms: u64,
    pub system_check: crate::actor::SystemCheck,
    pub journal: JournalBackend,
    pub journal_url: String,
    pub journal_name: String,
    pub journal_lease_ms: u64,
    pub journal_wait_ms: u64,
    pub log_format: LogFormat,
    pub log_filter: String,
}

/// Where the event log lives: the embedded sled data directory (the default), or a journal
/// in a PostgreSQL database (cargo feature `postgres`) for a fleet.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JournalBackend {
    Sled,
    Postgres,
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

/// The setting a `PCX_*` variable that names none was probably meant to be: one within two
/// edits of its name, or the same but for underscores. Other `PCX_*` variables (a bench's,
/// the Python side's, a script's) are not pcx's settings and are left alone.
fn resembled<'t>(key: &str, table: &'t toml::Table) -> Option<&'t str> {
    let squeezed = |s: &str| s.replace('_', "");
    table
        .keys()
        .map(|k| (strsim::damerau_levenshtein(key, k), k))
        .filter(|(d, k)| *d <= 2 || squeezed(k) == squeezed(key))
        .min()
        .map(|(_, k)| k.as_str())
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
                if let Some(meant) = resembled(&key, &table) {
                    return Err(ConfigError::Invalid {
                        origin: "the environment".into(),
                        message: format!(
                            "{name} is not a pcx setting; did you mean PCX_{}? (a misspelt \
                             setting would be ignored: PCX_JOURNL=postgres would leave the \
                             journal on this machine's disk)",
                            meant.to_ascii_uppercase()
                        ),
                    });
                }
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
        for (key, value, range) in self.numeric_values() {
            if !range.contains(&value) {
                return Err(ConfigError::Invalid {
                    origin: "(merged)".into(),
                    message: format!(
                        "`{key}` = {value} is out of range: it must be from {} to {}",
                        range.start(),
                        range.end()
                    ),
                });
            }
        }
        // An empty path is no directory: sled was opened on "" and failed, after pcx had put
        // its creation mark in the current directory.
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                origin: "(merged)".into(),
                message:
                    "`data_dir` is empty: it must name a directory (\".\" for the current one)"
                        .into(),
            });
        }
        // An import into journal `x` writes `x.importing` first and wipes whatever it holds
        // (a killed import's leftovers): a journal of that name was someone's log, wiped.
        let side = crate::audit::export::IMPORTING_JOURNAL;
        if self.journal_name.is_empty() || self.journal_name.ends_with(side) {
            return Err(ConfigError::Invalid {
                origin: "(merged)".into(),
                message: format!(
                    "`journal_name` = {:?}: a journal needs a name, and none may end with `{side}`, \
                     which an import into the journal before it uses for its work",
                    self.journal_name
                ),
            });
        }
        if self.journal == JournalBackend::Postgres && self.journal_url.is_empty() {
            return Err(ConfigError::Invalid {
                origin: "(merged)".into(),
                message: "`journal` = \"postgres\" needs `journal_url` (a libpq connection string or URL)".into(),
            });
        }
        // A frame the budget could never hold would wait for ever.
        if self.max_frame_bytes_total != 0 && self.max_frame_bytes_total < self.max_frame_bytes {
            return Err(ConfigError::Invalid {
                origin: "(merged)".into(),
                message: format!(
                    "`max_frame_bytes_total` = {} is less than `max_frame_bytes` = {}: the largest frame \
                     could never be read (0 derives it from the memory the process may use)",
                    self.max_frame_bytes_total, self.max_frame_bytes
                ),
            });
        }
        // A short token can be guessed over loopback by anyone on the machine.
        if !self.tcp_token.is_empty() && self.tcp_token.len() < MIN_TOKEN_BYTES {
            return Err(ConfigError::Invalid {
                origin: "(merged)".into(),
                message: format!(
                    "`tcp_token` is {} bytes long: a token must be at least {MIN_TOKEN_BYTES} bytes",
                    self.tcp_token.len()
                ),
            });
        }
        Ok(self)
    }

    /// Every numeric key, its value and the values it may take. Out of range values would
    /// otherwise panic deep inside a dependency (a channel or a cache sized from them), or
    /// start a server that drops every connection, instead of being refused at start.
    fn numeric_values(&self) -> Vec<(&'static str, u64, RangeInclusive<u64>)> {
        // usize is at most 64 bits on every platform pcx builds for.
        let n = |v: usize| v as u64;
        vec![
            ("snapshot_every", self.snapshot_every, 1..=TOML_MAX),
            ("max_content_bytes", self.max_content_bytes, 1..=TOML_MAX),
            ("max_request_bytes", self.max_request_bytes, 1..=TOML_MAX),
            // `pcx client` sizes a queue of this many slots up front.
            ("max_in_flight", n(self.max_in_flight), 1..=MAX_QUEUE),
            // sled refuses (panics on) a cache under 256 bytes.
            (
                "cache_capacity_bytes",
                self.cache_capacity_bytes,
                256..=TOML_MAX,
            ),
            // A frame's length is a 32-bit number.
            (
                "max_frame_bytes",
                self.max_frame_bytes,
                1..=u64::from(u32::MAX),
            ),
            (
                "max_in_flight_per_connection",
                n(self.max_in_flight_per_connection),
                1..=MAX_QUEUE,
            ),
            (
                "max_unread_answer_bytes_per_connection",
                self.max_unread_answer_bytes_per_connection,
                1..=TOML_MAX,
            ),
            // 0: derived from the process's descriptor limit.
            ("max_connections", n(self.max_connections), 0..=MAX_QUEUE),
            ("tcp_auth_timeout_ms", self.tcp_auth_timeout_ms, 1..=600_000),
            // 0: derived from the memory the process may use.
            (
                "max_frame_bytes_total",
                self.max_frame_bytes_total,
                0..=TOML_MAX,
            ),
            (
                "frame_stall_timeout_ms",
                self.frame_stall_timeout_ms,
                1..=3_600_000,
            ),
            // A plugin call over an hour is a hang, not work.
            (
                "plugin_call_timeout_ms",
                self.plugin_call_timeout_ms,
                1..=3_600_000,
            ),
            // Renewed every third of it: under 300 ms a renewal is a busy loop.
            ("journal_lease_ms", self.journal_lease_ms, 300..=3_600_000),
            ("journal_wait_ms", self.journal_wait_ms, 0..=TOML_MAX),
            (
                "max_plugin_output_bytes",
                self.max_plugin_output_bytes,
                1..=TOML_MAX,
            ),
        ]
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

    /// Regression: a misspelt `PCX_*` variable was ignored like any other, so a fleet
    /// worker started with `PCX_JOURNL=postgres` kept its journal on its own disk, every
    /// change answered, none in the cluster. Now a variable one or two edits from a setting
    /// is refused naming the setting; the other `PCX_*` variables are still left alone.
    #[test]
    fn a_misspelt_pcx_variable_is_refused_naming_the_setting_it_resembles() {
        for (name, meant) in [
            ("PCX_JOURNL", "PCX_JOURNAL"),
            ("PCX_JOURNAL_ULR", "PCX_JOURNAL_URL"),
            ("PCX_SNAPSHOTEVERY", "PCX_SNAPSHOT_EVERY"),
            ("PCX_DATADIR", "PCX_DATA_DIR"),
        ] {
            let env = vec![(name.to_string(), "postgres".to_string())];
            let err = Config::load(None, env).unwrap_err().to_string();
            assert!(
                err.contains(name) && err.contains(&format!("did you mean {meant}?")),
                "{name}: {err}"
            );
        }
        for others in [
            "PCX_BENCH_DIR",
            "PCX_TEST_PG_URL",
            "PCX_BIN",
            "PCX_TORCH_KINDS",
            "PCX_PG_DIR",
        ] {
            let env = vec![(others.to_string(), "1".to_string())];
            assert!(Config::load(None, env).is_ok(), "{others} is left alone");
        }
    }

    #[test]
    fn an_empty_data_dir_is_refused_naming_the_key() {
        let env = vec![("PCX_DATA_DIR".to_string(), String::new())];
        let err = Config::load(None, env).unwrap_err().to_string();
        assert!(err.contains("`data_dir` is empty"), "{err}");
    }

    #[test]
    fn a_journal_named_as_an_imports_side_journal_is_refused_so_no_import_wipes_it() {
        for name in ["team.importing", ""] {
            let env = vec![("PCX_JOURNAL_NAME".to_string(), name.to_string())];
            let err = Config::load(None, env).unwrap_err().to_string();
            assert!(
                err.contains("`journal_name`") && err.contains(".importing"),
                "{err}"
            );
        }
        let env = vec![("PCX_JOURNAL_NAME".to_string(), "team.imports".to_string())];
        assert!(Config::load(None, env).is_ok());
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

    #[test]
    fn every_numeric_key_has_its_range_checked() {
        let defaults = parse(DEFAULT_TOML, "default").unwrap();
        let c = Config::load(None, std::iter::empty()).unwrap();
        let checked: Vec<&str> = c.numeric_values().iter().map(|v| v.0).collect();
        for (key, value) in defaults {
            if value.is_integer() {
                assert!(
                    checked.contains(&key.as_str()),
                    "`{key}` has no range check"
                );
            }
        }
    }

    #[test]
    fn each_out_of_range_value_is_refused_naming_the_key_the_value_and_the_range() {
        let c = Config::load(None, std::iter::empty()).unwrap();
        for (key, _, range) in c.numeric_values() {
            let mut outside = vec![];
            if *range.start() > 0 {
                outside.push(range.start() - 1);
            }
            if *range.end() < TOML_MAX {
                outside.push(range.end() + 1);
            }
            for value in outside {
                let env = vec![(format!("PCX_{}", key.to_uppercase()), value.to_string())];
                let err = Config::load(None, env).unwrap_err().to_string();
                for part in [
                    key.to_string(),
                    value.to_string(),
                    range.start().to_string(),
                    range.end().to_string(),
                ] {
                    assert!(err.contains(&part), "{key} = {value}: {err}");
                }
            }
            let env = vec![(
                format!("PCX_{}", key.to_uppercase()),
                range.end().to_string(),
            )];
            assert!(Config::load(None, env).is_ok(), "{key} at its maximum");
        }
    }

    #[test]
    fn a_tcp_token_under_16_bytes_is_refused() {
        let env = |t: &str| vec![("PCX_TCP_TOKEN".to_string(), t.to_string())];
        let err = Config::load(None, env("fifteen-bytes-x")).unwrap_err();
        assert!(err.to_string().contains("tcp_token"), "{err}");
        assert!(Config::load(None, env("sixteen-bytes-xx")).is_ok());
        assert!(Config::load(None, env("")).is_ok());
    }
}
