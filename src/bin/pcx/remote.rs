//! `pcx serve` (the context as a service, stopped by a signal within its bound) and
//! `pcx client` (JSON lines through a server).

use std::io::{self};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use serde_json::json;

use pcx::config::Config;
use pcx::Context;

pub(crate) async fn serve(
    mut config: Config,
    socket: Option<PathBuf>,
    tcp: Option<String>,
) -> Result<ExitCode> {
    // Where this server listens is what a fleet's journal records as its holder's address.
    if let Some(socket) = &socket {
        config.socket_path = std::path::absolute(socket).unwrap_or_else(|_| socket.clone());
    }
    if let Some(tcp) = &tcp {
        config.tcp_listen = tcp.clone();
    }
    let tcp_addr = config.tcp_listen.clone();
    let tcp = if tcp_addr.is_empty() {
        None
    } else {
        let addr = tcp_addr
            .parse()
            .with_context(|| format!("--tcp {tcp_addr} is not an address like 127.0.0.1:7411"))?;
        Some((addr, config.tcp_token.clone()))
    };
    let server = pcx::interface::server::ServerConfig {
        socket_path: config.socket(),
        tcp,
        max_frame_bytes: config.max_frame_bytes,
        max_in_flight_per_connection: config.max_in_flight_per_connection,
        max_unread_answer_bytes_per_connection: config.max_unread_answer_bytes_per_connection,
        max_connections: config.max_connections,
        tcp_auth_timeout: std::time::Duration::from_millis(config.tcp_auth_timeout_ms),
        max_frame_bytes_total: config.max_frame_bytes_total,
        frame_stall_timeout: std::time::Duration::from_millis(config.frame_stall_timeout_ms),
    };
    // Signal handlers first, so a signal during start-up is a clean shutdown, not a death.
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let plugin_stop = std::sync::Arc::new(std::sync::OnceLock::new());
    stop_plugin_calls_after_signal(plugin_stop.clone());
    let ctx =
        Context::open(&config).with_context(|| format!("opening {}", config.data_dir.display()))?;
    let _ = plugin_stop.set(ctx.clone());
    let shutdown = async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    };
    let counters = std::sync::Arc::new(pcx::interface::server::Counters::default());
    let served = pcx::interface::server::run(ctx.clone(), server, counters, shutdown).await;
    let closed = ctx.close().await;
    served?;
    closed.map_err(|e| anyhow::anyhow!("closing the data directory: {e}"))?;
    tracing::info!("pcx server stopped");
    Ok(ExitCode::SUCCESS)
}

/// A plugin call that does not return holds the context actor, and with it this thread, where
/// the server and its signal handlers run, until the call's deadline. So a thread of its own
/// also waits for SIGINT/SIGTERM, and once the server's grace period is over makes the context
/// give up its plugin calls: shutdown then ends in time whatever a plugin does (the stuck
/// plugin thread is left to die with the process). Everything answered is durable already;
/// the requests left waiting for a plugin fail.
pub(crate) fn stop_plugin_calls_after_signal(ctx: std::sync::Arc<std::sync::OnceLock<Context>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (ready, started) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("pcx-signals".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let signalled = runtime.map(|rt| {
                rt.block_on(async {
                    let (int, term) = (
                        signal(SignalKind::interrupt()),
                        signal(SignalKind::terminate()),
                    );
                    let _ = ready.send(());
                    let (Ok(mut int), Ok(mut term)) = (int, term) else {
                        return false;
                    };
                    tokio::select! {
                        _ = int.recv() => true,
                        _ = term.recv() => true,
                    }
                })
            });
            if let Ok(true) = signalled {
                std::thread::sleep(pcx::interface::server::SHUTDOWN_GRACE);
                if let Some(ctx) = ctx.get() {
                    tracing::warn!("still shutting down after the grace period: abandoning plugin calls");
                    ctx.stop_plugin_calls();
                }
            } else {
                tracing::warn!("cannot watch for signals beside the server: a plugin call can hold up shutdown until its deadline");
            }
        });
    match spawned {
        // Once it listens, a signal is seen by it as well as by the server.
        Ok(_) => {
            let _ = started.recv();
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the signal thread: a plugin call can hold up shutdown until its deadline")
        }
    }
}

pub(crate) fn client(
    config: &Config,
    socket: Option<PathBuf>,
    tcp: Option<String>,
    token_file: Option<PathBuf>,
    token: Option<String>,
) -> Result<ExitCode> {
    let mut following = None;
    let (socket, tcp) = match (socket, tcp) {
        (None, None) if config.journal == pcx::config::JournalBackend::Postgres => {
            let (socket, tcp, found) = holder(config)?;
            following = Some(found);
            (socket, tcp)
        }
        given => given,
    };
    let stdin = io::BufReader::with_capacity(1 << 16, io::stdin());
    let mut stdout = io::stdout().lock();
    let (limit, in_flight) = (config.max_request_bytes, config.max_in_flight);
    match tcp {
        Some(addr) => {
            let token = client_token(config, token_file, token)?;
            // The server takes no empty token: sending one only reads as a refusal.
            if token.is_empty() {
                anyhow::bail!(
                    "`pcx client --tcp {addr}` needs the server's token, and none is given: \
                     --token-file FILE, or the variable PCX_TCP_TOKEN (tcp_token in the config)"
                );
            }
            let mut stream = std::net::TcpStream::connect(&addr)
                .with_context(|| format!("connecting to {addr}"))?;
            pcx::interface::client::authenticate(&mut stream, &token)
                .with_context(|| format!("authenticating to {addr}"))?;
            if let Some(found) = &following {
                check_holder(&mut stream, config, found)?;
            }
            pcx::interface::client::run(stream, stdin, &mut stdout, limit, in_flight)?;
        }
        None => {
            let path = socket.unwrap_or_else(|| config.socket());
            let mut stream = pcx::interface::unix_path::connect(&path).with_context(|| {
                format!("connecting to {} (is `pcx serve` running?)", path.display())
            })?;
            if let Some(found) = &following {
                check_holder(&mut stream, config, found)?;
            }
            pcx::interface::client::run(stream, stdin, &mut stdout, limit, in_flight)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One request to the server that holds the configured data directory (on its socket) or
/// journal in PostgreSQL (its holder, found and checked as `pcx client` finds it), and its
/// answer: how a command that would otherwise open what a server holds asks that server.
pub(crate) fn ask_server(
    config: &Config,
    request: &serde_json::Value,
) -> Result<serde_json::Value> {
    fn exchange(
        stream: &mut (impl std::io::Read + std::io::Write),
        request: &serde_json::Value,
    ) -> Result<serde_json::Value> {
        pcx::interface::client::exchange(stream, request).context("asking the server")
    }
    if config.journal != pcx::config::JournalBackend::Postgres {
        let path = config.socket();
        let mut stream = pcx::interface::unix_path::connect(&path)
            .with_context(|| format!("connecting to {}", path.display()))?;
        return exchange(&mut stream, request);
    }
    let (socket, tcp, found) = holder(config)?;
    match (socket, tcp) {
        (_, Some(addr)) => {
            let token = client_token(config, None, None)?;
            let mut stream = std::net::TcpStream::connect(&addr)
                .with_context(|| format!("connecting to {addr}"))?;
            pcx::interface::client::authenticate(&mut stream, &token)
                .with_context(|| format!("authenticating to {addr}"))?;
            check_holder(&mut stream, config, &found)?;
            exchange(&mut stream, request)
        }
        (socket, None) => {
            let path = socket.unwrap_or_else(|| config.socket());
            let mut stream = pcx::interface::unix_path::connect(&path)
                .with_context(|| format!("connecting to {}", path.display()))?;
            check_holder(&mut stream, config, &found)?;
            exchange(&mut stream, request)
        }
    }
}

/// Who holds the configured journal (in PostgreSQL), where it serves (a TCP address, or a
/// socket path on its machine) and its epoch.
fn lookup_holder(config: &Config) -> Result<(String, String, i64)> {
    #[cfg(feature = "postgres")]
    {
        let journal =
            pcx::store::pg_journal::PgJournal::open_reader(pcx::context::pg_settings(config))?;
        journal.holder()?.with_context(|| {
            format!(
                "journal {} has never been served: no holder to connect to",
                config.journal_name
            )
        })
    }
    #[cfg(not(feature = "postgres"))]
    {
        anyhow::bail!(
            "journal = \"postgres\" ({}): this pcx was built without PostgreSQL support (build it with `--features postgres`)",
            config.journal_name
        )
    }
}

/// Where `pcx client` connects for a journal in PostgreSQL: its holder's address, and the
/// holder as the database names it (`(holder, address, epoch)`), to be checked once connected.
#[allow(clippy::type_complexity)]
fn holder(config: &Config) -> Result<(Option<PathBuf>, Option<String>, (String, String, i64))> {
    let (holder, address, epoch) = lookup_holder(config)?;
    tracing::info!(%holder, %address, epoch, "following the journal's holder");
    let is_tcp = !address.contains('/') && address.contains(':');
    let found = (holder, address.clone(), epoch);
    Ok(if is_tcp {
        (None, Some(address), found)
    } else {
        (Some(PathBuf::from(address)), None, found)
    })
}

/// Before a followed holder is sent any request: the server reached at the address the
/// database gave must say it holds this journal at the epoch the database names. An address
/// is a loopback TCP port or a socket path, which on another machine (or after the holder
/// died and something else took its port or path) is some other server: before, `pcx client`
/// sent its requests to whatever listened there, and a change meant for one journal was
/// written into another journal's log and answered ok.
fn check_holder(
    stream: &mut (impl std::io::Read + std::io::Write),
    config: &Config,
    (holder, address, epoch): &(String, String, i64),
) -> Result<()> {
    let answer = pcx::interface::client::exchange(stream, &json!({"op": "stats"}))
        .with_context(|| format!("asking the server at {address} which journal it holds"))?;
    let stats = &answer["stats"];
    let (journal, served_epoch) = (stats["journal"].as_str(), stats["epoch"].as_i64());
    if journal == Some(config.journal_name.as_str()) && served_epoch == Some(*epoch) {
        return Ok(());
    }
    let serves = match (journal, served_epoch) {
        (Some(j), Some(e)) => format!("journal {j} at epoch {e}"),
        (Some(j), None) => format!("journal {j}"),
        _ => "no journal in the database (a data directory of its own)".to_string(),
    };
    anyhow::bail!(
        "the server at {address} serves {serves}, not journal {} as its holder {holder} at \
         epoch {epoch}: that holder is gone or the address is another machine's or another \
         server's (a socket path or loopback port means this machine); nothing was sent. \
         Run pcx client on the holder's machine, or wait for a standby to take the journal over",
        config.journal_name
    )
}

/// `pcx holder`: the configured journal's holder as one JSON line.
pub(crate) fn print_holder(config: &Config) -> Result<ExitCode> {
    if config.journal != pcx::config::JournalBackend::Postgres {
        anyhow::bail!("`pcx holder` is for a journal in PostgreSQL (journal = \"postgres\"); this one is the data directory {}", config.data_dir.display());
    }
    let (holder, address, epoch) = lookup_holder(config)?;
    println!(
        "{}",
        json!({"ok": true, "journal": config.journal_name, "holder": holder, "address": address, "epoch": epoch})
    );
    Ok(ExitCode::SUCCESS)
}

/// The token `pcx client --tcp` sends: from `--token-file`, `--token` (with a warning), or the
/// config's `tcp_token`.
pub(crate) fn client_token(
    config: &Config,
    token_file: Option<PathBuf>,
    token: Option<String>,
) -> Result<String> {
    if let Some(path) = token_file {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the token file {}", path.display()))?;
        let token = text.strip_suffix('\n').unwrap_or(&text);
        return Ok(token.strip_suffix('\r').unwrap_or(token).to_string());
    }
    if let Some(token) = token {
        tracing::warn!(
            "--token puts the token on the command line, which every user of this machine can \
             read (ps, /proc); use --token-file FILE or the variable PCX_TCP_TOKEN instead"
        );
        return Ok(token);
    }
    Ok(config.tcp_token.clone())
}
