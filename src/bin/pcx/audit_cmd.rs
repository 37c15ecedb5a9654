//! The audit and maintenance commands, which read (or rewrite) a stopped data directory
//! directly: log, history, state, diff, verify, export, import, compact, recover, salvage.

use std::io::{self, Write};
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use crate::args::Command;
use crate::report::{answer_error, error_text};
use pcx::audit::output::Output;
use pcx::config::Config;
use pcx::trace::LogFormat;

/// logs, never into a pipe or a JSON log.
pub(crate) fn progress_bar(config: &Config, total: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if config.log_format != LogFormat::Text || !io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} {wide_bar} {pos}/{len} events ({eta})")
    {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar
}

/// The audit and maintenance commands: they read (or rewrite) the data directory directly.
pub(crate) fn audit_command(command: Command, config: &Config) -> Result<ExitCode> {
    let dir = &config.data_dir;
    if config.journal == pcx::config::JournalBackend::Postgres {
        return postgres_audit(command, config);
    }
    // Whether the directory exists is asked under its lock, once an interrupted compaction
    // is settled (it may have moved the directory aside): by the opens below.
    if let Command::Compact { before } = command {
        let bar = progress_bar(config, before, "compacting");
        let report =
            pcx::audit::compact::compact(dir, before, config.cache_capacity_bytes, &mut |s| {
                bar.set_position(s)
            });
        bar.finish_and_clear();
        return Ok(match report {
            Err(e @ pcx::audit::compact::CompactError::Missing(_)) => {
                answer_error("no_data_directory", &e.to_string())
            }
            Err(pcx::audit::compact::CompactError::Open(
                e @ pcx::store::error::OpenError::Locked { .. },
            )) => compact_through_server(config, before, &e.to_string()),
            other => compaction_answer(other),
        });
    }
    if let Command::Import { input } = command {
        return import_command(config, input.as_deref(), &mut |reader, progress| {
            pcx::audit::export::import(dir, config.cache_capacity_bytes, reader, progress)
        });
    }
    let journal = match pcx::store::sled_journal::SledJournal::open_existing(
        dir,
        config.cache_capacity_bytes,
    ) {
        Ok(j) => j,
        Err(e @ pcx::store::error::OpenError::Missing { .. }) => {
            return Ok(answer_error("no_data_directory", &error_text(&e.into())))
        }
        Err(e) => return Ok(answer_error("open_failed", &error_text(&e.into()))),
    };
    if let Command::Recover { .. } = command {
        return Ok(
            match pcx::audit::lost_tail::accept_lost_tail(&journal, &config.origin()) {
                Ok(accepted) => {
                    println!("{}", json!({"ok": true, "accepted": accepted}));
                    ExitCode::SUCCESS
                }
                Err(e) => answer_error(e.kind(), &error_text(&e.into())),
            },
        );
    }
    read_command(command, &journal, config)
}

/// `pcx import` from `input` (a file, or stdin) with `import` (into a data directory or a
/// journal in PostgreSQL): its answer on stdout.
fn import_command(
    config: &Config,
    input: Option<&std::path::Path>,
    import: &mut dyn FnMut(
        &mut dyn io::BufRead,
        pcx::audit::query::Progress,
    )
        -> Result<pcx::audit::export::Imported, pcx::audit::export::ExportError>,
) -> Result<ExitCode> {
    let bar = progress_bar(config, 0, "importing");
    let source: Box<dyn io::Read> = match input {
        Some(path) => Box::new(
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
        ),
        None => Box::new(io::stdin().lock()),
    };
    let mut reader = io::BufReader::new(LineBounded {
        inner: source,
        limit: config.max_request_bytes,
        run: 0,
        lines: 0,
    });
    let result = import(&mut reader, &mut |s| bar.set_position(s));
    bar.finish_and_clear();
    Ok(match result {
        Ok(i) => {
            println!(
                "{}",
                json!({"ok": true, "events": i.events, "last_seq": i.last_seq, "state_digest": i.state_digest.to_hex()})
            );
            ExitCode::SUCCESS
        }
        Err(e) => answer_error("import_failed", &e.to_string()),
    })
}

/// An import's input, failing a read once a line runs past `limit` bytes (`max_request_bytes`,
/// which bounds a line of `pcx batch` too: an export's longest line is a content of
/// `max_content_bytes` in base64). An import reads a line whole before it looks at it, so
/// `pcx import < /dev/zero`, or a file that is not an export, was read until memory ran out
/// and pcx aborted.
struct LineBounded<R> {
    inner: R,
    limit: u64,
    /// Bytes since the last newline.
    run: u64,
    /// Newlines so far.
    lines: u64,
}

impl<R: io::Read> io::Read for LineBounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let read = &buf[..n];
        match read.iter().rposition(|&b| b == b'\n') {
            Some(last) => {
                self.lines += read.iter().filter(|&&b| b == b'\n').count() as u64;
                self.run = (n - 1 - last) as u64;
            }
            None => self.run += n as u64,
        }
        // Checked at the end of each read: a line over the limit is caught by the time it is
        // at most one read longer, which bounds the memory (not the exact length).
        if self.run > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "line {} is over {} bytes (max_request_bytes) and no export's line is: \
                     this is not an export",
                    self.lines + 1,
                    self.limit
                ),
            ));
        }
        Ok(n)
    }
}

/// Why `pcx recover --accept-lost-tail` has nothing to do on a journal in PostgreSQL.
const RECOVER_ON_POSTGRES: &str = "`pcx recover --accept-lost-tail` repairs a sled data directory whose newest events a crash lost (sled's flush is not one transaction with its snapshots); a journal in PostgreSQL writes its records, head and snapshots in one replicated transaction, so a log shorter than its snapshot there means rows were deleted or an older backup restored: restore the database from its standbys or a backup, or `pcx export` what is left and `pcx import` it into a new journal";

/// Why `pcx salvage` has nothing to read on a journal in PostgreSQL.
const SALVAGE_ON_POSTGRES: &str = "`pcx salvage` reads the files of a sled data directory that no longer opens; a journal in PostgreSQL has no such files (its records are rows of pcx_records, readable with SQL): `pcx verify` names the first damaged event and `pcx export` writes out the log";

/// The commands that only read a journal, whichever backend holds it.
fn read_command(
    command: Command,
    journal: &dyn pcx::store::journal::Journal,
    config: &Config,
) -> Result<ExitCode> {
    use pcx::audit::query::{self, Query};
    let total = journal.last_seq().ok().flatten().unwrap_or(0);
    let mut out = io::stdout().lock();
    let query = match command {
        Command::Log { filter } => {
            let mut failed = None;
            let result = query::log(journal, &filter, &mut |line| {
                if failed.is_none() {
                    if let Err(e) = writeln!(out, "{line}") {
                        failed = Some(e);
                    }
                }
            });
            if let Some(e) = failed {
                return Err(e).context("writing the log");
            }
            return Ok(match result {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => answer_error(e.kind(), &e.to_string()),
            });
        }
        Command::History { key, within } => Query::History { key, within },
        Command::State {
            at,
            at_time,
            key,
            within,
        } => Query::State {
            at,
            at_time,
            key,
            within,
        },
        Command::Diff { from, to, within } => Query::Diff { from, to, within },
        Command::Verify => Query::Verify,
        Command::Export { content, output } => {
            let bar = progress_bar(config, total, "exporting");
            let mut progress = |s| bar.set_position(s);
            let result = match &output {
                Some(path) => {
                    let (output, mut file) = Output::create(Some(&config.data_dir), path)?;
                    match pcx::audit::export::export(journal, content, &mut file, &mut progress) {
                        Ok(r) => output.finish(file).map(|()| Ok(r))?,
                        Err(e) => Err(e),
                    }
                }
                None => pcx::audit::export::export(
                    journal,
                    content,
                    &mut io::BufWriter::new(out),
                    &mut progress,
                ),
            };
            bar.finish_and_clear();
            return Ok(match result {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => answer_error("export_failed", &e.to_string()),
            });
        }
        _ => anyhow::bail!("not an audit command"),
    };
    let bar = progress_bar(config, total, "replaying");
    let result = query.run(journal, &mut |s| bar.set_position(s));
    bar.finish_and_clear();
    let fields = match result {
        Ok(f) => f,
        Err(e) => return Ok(answer_error(e.kind(), &e.to_string())),
    };
    let sound = fields.get("verify").is_none_or(|v| v["ok"] == true);
    for (_, value) in fields {
        match value {
            Value::Array(lines) => {
                for line in lines {
                    writeln!(out, "{line}")?;
                }
            }
            Value::String(_) => {}
            other => writeln!(out, "{other}")?,
        }
    }
    Ok(if sound {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `pcx compact` on a data directory or journal a server holds: the server compacts it in
/// place, answering meanwhile (the `compact` request), as the user meant; `held` (why it
/// could not be opened) is said with why the server could not be asked.
fn compact_through_server(config: &Config, before: u64, held: &str) -> ExitCode {
    match crate::remote::ask_server(config, &json!({"op": "compact", "before": before})) {
        Ok(answer) => {
            println!("{answer}");
            if answer["ok"] == true {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => answer_error(
            "compact_failed",
            &format!("{held}; asking the server that holds it failed: {e:#}"),
        ),
    }
}

/// A compaction's report on stdout, or its failure.
fn compaction_answer(report: Result<Value, pcx::audit::compact::CompactError>) -> ExitCode {
    match report {
        Ok(r) => {
            println!("{r}");
            ExitCode::SUCCESS
        }
        Err(e) => answer_error("compact_failed", &e.to_string()),
    }
}

/// The audit commands on a PostgreSQL journal: the reading ones work as on a data
/// directory (the records are the same bytes), and so do compaction and import (each taking
/// the journal's lease); recovering a lost tail is the data directory's only.
fn postgres_audit(command: Command, config: &Config) -> Result<ExitCode> {
    if let Command::Recover { .. } = command {
        return Ok(answer_error("unsupported", RECOVER_ON_POSTGRES));
    }
    #[cfg(feature = "postgres")]
    {
        let settings = pcx::context::pg_settings(config);
        if let Command::Import { input } = command {
            // Import makes the journal if missing, as it makes a data directory.
            return import_command(config, input.as_deref(), &mut |reader, progress| {
                pcx::audit::export::import_postgres(&settings, reader, progress)
            });
        }
        // Every command here reads an existing journal (compaction too): a missing one is
        // said so, as a missing data directory is, and is not created.
        let reader = match pcx::store::pg_journal::PgJournal::open_reader(settings.clone()) {
            Ok(j) => j,
            Err(e) => return Ok(answer_error("open_failed", &error_text(&e.into()))),
        };
        match reader.exists() {
            Ok(true) => {}
            Ok(false) => {
                return Ok(answer_error(
                    "no_data_directory",
                    &format!(
                        "journal {} does not exist in the database {}",
                        reader.name(),
                        pcx::store::pg_journal::redact(&config.journal_url)
                    ),
                ))
            }
            Err(e) => return Ok(answer_error("open_failed", &error_text(&e.into()))),
        }
        if let Command::Compact { before } = command {
            drop(reader);
            // Compaction writes: it takes the journal's lease, as a server would.
            let journal = match pcx::store::pg_journal::PgJournal::open(settings) {
                Ok(j) => j,
                Err(e @ pcx::store::error::OpenError::LeaseHeld { .. }) => {
                    // A live holder: it compacts in place.
                    return Ok(compact_through_server(config, before, &e.to_string()));
                }
                Err(e) => return Ok(answer_error("open_failed", &error_text(&e.into()))),
            };
            let bar = progress_bar(config, before, "compacting");
            let report = pcx::audit::compact::compact_postgres(&journal, before, &mut |s| {
                bar.set_position(s)
            });
            bar.finish_and_clear();
            return Ok(compaction_answer(report));
        }
        // One snapshot for the whole command: a compaction (or a writer) committing
        // meanwhile must not make the journal read as damaged.
        if let Err(e) = reader.read_one_snapshot() {
            return Ok(answer_error("open_failed", &error_text(&e.into())));
        }
        read_command(command, &reader, config)
    }
    #[cfg(not(feature = "postgres"))]
    {
        let _ = command;
        Ok(answer_error(
            "open_failed",
            &format!(
                "journal = \"postgres\" in {}: this pcx was built without PostgreSQL support (build it with `--features postgres`)",
                config.data_dir.display()
            ),
        ))
    }
}

/// `pcx salvage`: reads the data directory without opening it as a store.
pub(crate) fn salvage(config: &Config, output: &std::path::Path, scan: bool) -> Result<ExitCode> {
    if config.journal == pcx::config::JournalBackend::Postgres {
        return Ok(answer_error("unsupported", SALVAGE_ON_POSTGRES));
    }
    let dir = &config.data_dir;
    if !dir.is_dir() {
        return Ok(answer_error(
            "no_data_directory",
            &format!("data directory {} does not exist", dir.display()),
        ));
    }
    let (written, mut sink) = Output::create(Some(dir), output)?;
    let mut report = match pcx::audit::salvage::salvage(dir, scan, &mut sink) {
        Ok(r) => r,
        Err(e) => return Ok(answer_error("salvage_failed", &e.to_string())),
    };
    written.finish(sink)?;
    report["output"] = json!(output);
    let complete = report["ok"] == true;
    if !complete {
        tracing::warn!(dir = %dir.display(), "salvage: the log breaks or was longer; see the report");
    }
    println!("{report}");
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
