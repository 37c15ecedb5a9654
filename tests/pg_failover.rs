//! The fleet's database loses its primary mid-write (pcx built with `--features postgres`):
//! on a 3-node cluster of its own (`scripts/pg-cluster.sh`, its own directory and ports),
//! a context records artifacts through a multi-host URL while the primary is SIGKILLed and
//! the most advanced standby promoted. Every answered change is on the new primary, the log
//! verifies, and the context went on writing after the promotion; a standby killed in turn
//! costs clients nothing. Every wait is bounded.
#![cfg(feature = "postgres")]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pcx::{Artifact, Config, Context};
use serde_json::Value;

struct Cluster {
    dir: tempfile::TempDir,
    base: u16,
}

/// The cluster's directory and ports, for another thread.
struct ClusterRef {
    dir: std::path::PathBuf,
    base: u16,
}

impl ClusterRef {
    fn script(&self, args: &[&str]) -> String {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Command::new("bash")
            .arg(repo.join("scripts/pg-cluster.sh"))
            .args(args)
            .env("PCX_PG_DIR", self.dir.join("cluster"))
            .env("PCX_PG_BASE_PORT", self.base.to_string())
            .output()
            .expect("the cluster script runs");
        assert!(
            out.status.success(),
            "pg-cluster.sh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn node_url(&self, node: u16) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=5",
            self.base + node
        )
    }

    /// The standby that has received the most WAL (the one to promote).
    fn most_advanced_standby(&self) -> &'static str {
        let lsn = |node: u16| -> u64 {
            let out = Command::new("psql")
                .args(["-X", "-At", &self.node_url(node), "-c"])
                .arg("SELECT pg_wal_lsn_diff(pg_last_wal_receive_lsn(), '0/0')::bigint")
                .output()
                .expect("psql runs");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or(0)
        };
        if lsn(1) >= lsn(2) {
            "n1"
        } else {
            "n2"
        }
    }
}

impl Cluster {
    fn script(&self, args: &[&str]) -> String {
        self.handle().script(args)
    }

    fn handle(&self) -> ClusterRef {
        ClusterRef {
            dir: self.dir.path().to_path_buf(),
            base: self.base,
        }
    }

    /// Starts a cluster on ports of its own (`slot` tells this file's tests apart), away from
    /// the shared test cluster's (55432…).
    fn start(slot: u16) -> Cluster {
        let base = 40_000 + (std::process::id() % 1000) as u16 * 6 + slot * 3;
        let dir = tempfile::tempdir().expect("a directory");
        // PostgreSQL runs as the postgres user (when the tests run as root): it must reach
        // the cluster's directory inside this one.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("open the directory to the postgres user");
        let c = Cluster { dir, base };
        c.script(&["start"]);
        c
    }

    fn url(&self) -> String {
        self.script(&["url"]).trim().to_string()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg-cluster.sh"))
            .arg("destroy")
            .env("PCX_PG_DIR", self.dir.path().join("cluster"))
            .env("PCX_PG_BASE_PORT", self.base.to_string())
            .output();
    }
}

fn config(dir: &Path, url: &str) -> Config {
    let mut c = Config::load(None, std::iter::empty()).expect("the built-in config");
    c.data_dir = dir.to_path_buf();
    c.journal = pcx::config::JournalBackend::Postgres;
    c.journal_url = url.to_string();
    c.journal_name = "failover".into();
    c.journal_lease_ms = 30_000;
    c
}

fn artifact(i: u32) -> Artifact {
    Artifact {
        key: format!("k{i}"),
        kind: "eager".into(),
        content: format!("content {i}").into_bytes(),
    }
}

#[test]
fn killing_the_primary_mid_write_and_promoting_a_standby_loses_no_answered_change() {
    let cluster = Cluster::start(0);
    let url = cluster.url();
    let data = tempfile::tempdir().expect("a directory");
    let cfg = config(data.path(), &url);
    let (answered, failed, after_promotion) = common::library::block_on(async {
        let ctx = Context::open(&cfg).expect("the context opens on the cluster");
        let mut answered = Vec::new();
        let mut failed = 0u32;
        let mut failover: Option<std::thread::JoinHandle<()>> = None;
        let mut promoted = false;
        let mut after_promotion = 0u32;
        let started = Instant::now();
        let mut i = 0u32;
        while started.elapsed() < Duration::from_secs(90) {
            i += 1;
            if i == 200 {
                // Mid-write: the primary dies while this writer keeps committing, and the
                // most advanced standby is promoted.
                let (dir, base) = (cluster.dir.path().to_path_buf(), cluster.base);
                failover = Some(std::thread::spawn(move || {
                    let c = ClusterRef { dir, base };
                    c.script(&["kill", "n0"]);
                    let node = c.most_advanced_standby();
                    c.script(&["promote", node]);
                }));
            }
            if !promoted && failover.as_ref().is_some_and(|f| f.is_finished()) {
                if let Some(f) = failover.take() {
                    f.join().expect("the failover thread");
                }
                promoted = true;
            }
            match ctx.record_artifact(artifact(i)).await {
                Ok(_) => {
                    answered.push(i);
                    if promoted {
                        after_promotion += 1;
                        if after_promotion == 100 {
                            break;
                        }
                    }
                }
                Err(_) => {
                    failed += 1;
                    actix_rt::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        eprintln!(
            "{} answered, {failed} failed during the failover, {after_promotion} after it, in {:?}",
            answered.len(),
            started.elapsed()
        );
        let _ = ctx.close().await;
        (answered, failed, after_promotion)
    });
    assert_eq!(
        after_promotion, 100,
        "the context writes again after the promotion ({failed} failed meanwhile)"
    );
    // Every answered change is on the new primary: the log, read from it, has each key.
    let out = common::pcx(data.path(), &["state"])
        .env("PCX_JOURNAL", "postgres")
        .env("PCX_JOURNAL_URL", &url)
        .env("PCX_JOURNAL_NAME", "failover")
        .output()
        .expect("pcx state runs");
    let state: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "state answers JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let text = state.to_string();
    let lost: Vec<u32> = answered
        .iter()
        .copied()
        .filter(|i| !text.contains(&format!("\"k{i}\"")))
        .collect();
    assert!(
        lost.is_empty(),
        "answered changes lost in the failover: {lost:?}"
    );
    let verify = common::pcx(data.path(), &["verify"])
        .env("PCX_JOURNAL", "postgres")
        .env("PCX_JOURNAL_URL", &url)
        .env("PCX_JOURNAL_NAME", "failover")
        .output()
        .expect("pcx verify runs");
    let v: Value = serde_json::from_slice(&verify.stdout).expect("verify answers JSON");
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn killing_a_standby_costs_clients_nothing() {
    let cluster = Cluster::start(1);
    let url = cluster.url();
    let data = tempfile::tempdir().expect("a directory");
    let cfg = config(data.path(), &url);
    common::library::block_on(async {
        let ctx = Context::open(&cfg).expect("the context opens on the cluster");
        for i in 0..100u32 {
            if i == 50 {
                cluster.script(&["kill", "n2"]);
            }
            // The quorum (ANY 1 of two standbys) still has n1: no answer is an error.
            ctx.record_artifact(artifact(i))
                .await
                .unwrap_or_else(|e| panic!("write {i} failed with a standby down: {e}"));
        }
        ctx.close().await.expect("closes");
    });
}

/// Product bug (found following docs/fleet.md on ports of one's own): a cluster started with
/// `PCX_PG_BASE_PORT` was described by a later `url` or `status` without it on the default
/// ports (55432…), where nothing of it listens. The cluster keeps the ports it was created
/// on (its nodes' `node.conf`), and every later call uses them. No server is needed: `url`
/// reads only the cluster's directory.
#[test]
fn the_cluster_script_names_a_clusters_own_ports_without_pcx_pg_base_port() {
    let dir = tempfile::tempdir().expect("a directory");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("open the directory to the postgres user");
    let cluster = dir.path().join("cluster");
    std::fs::create_dir_all(cluster.join("n0")).expect("a node directory");
    std::fs::write(
        cluster.join("n0/node.conf"),
        "port = 41234\ncluster_name = 'n0'\n",
    )
    .expect("the node's settings");
    let url = |base: Option<&str>| {
        let mut cmd = Command::new("bash");
        cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg-cluster.sh"))
            .arg("url")
            .env("PCX_PG_DIR", &cluster)
            .env_remove("PCX_PG_BASE_PORT");
        if let Some(b) = base {
            cmd.env("PCX_PG_BASE_PORT", b);
        }
        let out = cmd.output().expect("the cluster script runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for base in [None, Some("55432")] {
        let said = url(base);
        assert!(
            said.contains("port=41234,41235,41236"),
            "PCX_PG_BASE_PORT={base:?}: {said}"
        );
    }
}
