//! W3's PostgreSQL peer: PostgreSQL 15 from `initdb` in a fresh directory, `fsync = on` and
//! `synchronous_commit = on`, one prepared `INSERT` a request on a connection a client, with
//! tokio-postgres (cargo feature `postgres`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Map, Value};

use crate::device::DeviceCounts;

use super::*;

/// The loopback ports PostgreSQL may listen on: the first free one of 100 from here.
const POSTGRES_PORTS: u16 = 56_100;

/// The role the bench's clients connect as (the cluster's superuser, trusted on loopback).
const ROLE: &str = "pcx_bench";

fn bin() -> Option<PathBuf> {
    let debian = PathBuf::from("/usr/lib/postgresql/15/bin");
    if debian.join("postgres").is_file() && debian.join("initdb").is_file() {
        return Some(debian);
    }
    on_path("initdb").and_then(|p| p.parent().map(Path::to_path_buf))
}

pub(super) fn run(
    clients: usize,
    per: usize,
    alone: usize,
) -> Result<(String, Map<String, Value>)> {
    let bin = bin().ok_or_else(|| {
        NotInstalled(
            "no /usr/lib/postgresql/15/bin/postgres (Debian package postgresql-15) and no initdb on PATH"
                .to_string(),
        )
    })?;
    let version = version(&bin.join("postgres"), 2);
    // PostgreSQL refuses to run as root.
    let owner = match is_root() {
        true => Some(account("postgres").context(
            "running as root, and there is no postgres user to run PostgreSQL as (it refuses root)",
        )?),
        false => None,
    };
    let (mut here, reachable) = place(temp_dir("peer-postgres")?, owner.as_ref())?;
    let mut runs_in = "the bench's directory".to_string();
    if !reachable {
        // A parent closed to the postgres user (such as /root): the system temp directory.
        drop(here);
        let temp = std::env::temp_dir();
        let dir = tempfile::Builder::new()
            .prefix("pcx-bench-peer-postgres-")
            .tempdir_in(&temp)
            .context("making a temporary directory")?;
        let (fallback, reachable) = place(dir, owner.as_ref())?;
        if !reachable {
            bail!(
                "the postgres user can reach neither the bench's directory nor {}: set PCX_BENCH_DIR to a directory it can",
                temp.display()
            );
        }
        here = fallback;
        runs_in = format!(
            "{} (the postgres user cannot reach the bench's directory)",
            temp.display()
        );
    }
    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(&here.data)
        .args(["-U", ROLE, "--auth=trust", "--encoding=UTF8", "--locale=C"])
        .args(["--no-sync", "--no-instructions"])
        .current_dir(here.dir.path());
    if let Some(a) = &owner {
        initdb.uid(a.uid).gid(a.gid);
    }
    let made = initdb.output().context("running initdb")?;
    if !made.status.success() {
        bail!("initdb failed: {}", String::from_utf8_lossy(&made.stderr));
    }
    let port = free_port(POSTGRES_PORTS)?;
    // Its own socket directory (its data directory), where a socket's path fits.
    let sockets = match here.data.as_os_str().len() < 80 {
        true => here.data.display().to_string(),
        false => String::new(),
    };
    let mut cmd = Command::new(bin.join("postgres"));
    cmd.arg("-D").arg(&here.data);
    for setting in [
        "listen_addresses=127.0.0.1".to_string(),
        format!("port={port}"),
        format!("unix_socket_directories={sockets}"),
        "fsync=on".to_string(),
        "synchronous_commit=on".to_string(),
        format!("max_connections={}", (clients + 10).max(100)),
    ] {
        cmd.arg("-c").arg(setting);
    }
    let runs_as = match &owner {
        Some(a) => format!("the {} user", a.name),
        None => "the bench's own user".to_string(),
    };
    let mut server = Running::spawn(cmd, here, owner.as_ref())?;
    let url = format!("host=127.0.0.1 port={port} user={ROLE} dbname=postgres");
    let mut setup = server.wait_ready("postgres", || {
        Ok(::postgres::Client::connect(&url, ::postgres::NoTls)?)
    })?;
    // What the server runs with, as it says, not as it was asked.
    for name in ["fsync", "synchronous_commit"] {
        let value: String = setup.query_one(&format!("SHOW {name}"), &[])?.get(0);
        if value != "on" {
            bail!("postgres runs with {name} = {value}, not on");
        }
    }
    setup.batch_execute("CREATE TABLE peer (key text PRIMARY KEY, value bytea NOT NULL)")?;
    let device_before = DeviceCounts::now();
    let many = clients_of(&url, "m", clients, per)?;
    let device = device_before.per_record(
        &DeviceCounts::now(),
        (clients * per) as f64,
        "peer_postgres",
    );
    let (_, one) = clients_of(&url, "a", 1, alone)?;
    // Every INSERT answered is a row.
    let rows: i64 = setup.query_one("SELECT count(*) FROM peer", &[])?.get(0);
    if rows != (clients * per + alone) as i64 {
        bail!("{rows} rows after {} INSERTs", clients * per + alone);
    }
    drop(setup);
    let mut out = Map::new();
    figures(&mut out, "peer_postgres", clients * per, many, one);
    out.extend(device.into_iter().map(|(k, v)| (k, json!(v))));
    server.finish()?;
    let about = format!(
        "PostgreSQL {version} as {runs_as} in {runs_in}, port {port}: fsync on, synchronous_commit on; one INSERT of 256 B a request, autocommit"
    );
    Ok((about, out))
}

/// Closed-loop clients, each on its own connection, one prepared INSERT a request.
fn clients_of(url: &str, tag: &str, clients: usize, per: usize) -> Result<(f64, Vec<f64>)> {
    let url = url.to_string();
    drive(
        kv_requests(tag, clients, per, 256),
        move |_| {
            let url = url.clone();
            async move {
                let (client, connection) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                let insert = client
                    .prepare("INSERT INTO peer (key, value) VALUES ($1, $2)")
                    .await?;
                Ok((client, insert))
            }
        },
        |(client, insert): (tokio_postgres::Client, tokio_postgres::Statement),
         (key, value): (String, Vec<u8>)| async move {
            let n = client.execute(&insert, &[&key, &value]).await?;
            if n != 1 {
                bail!("the INSERT of {key} inserted {n} rows");
            }
            Ok((client, insert))
        },
    )
}
