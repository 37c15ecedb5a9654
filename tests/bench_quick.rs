//! `pcx-bench --quick` runs every workload green (small sizes: the figures mean nothing, the
//! machinery is what is checked), each printing its figures as JSON with the reference it is
//! compared against.

mod common;
use common::*;

use std::process::Command;

use serde_json::Value;

/// Runs one workload and gives its JSON runs.
fn bench(workload: &str) -> Vec<Value> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pcx-bench"));
    cmd.args(["--quick", "--runs", "1", "--json", workload])
        .env("PCX_BENCH_DIR", dir.path())
        .env("PCX_BENCH_PLUGIN", aot_bundle());
    let runs = run_with(cmd, b"", BUILD_TIMEOUT).assert_success().answers();
    assert_eq!(runs.len(), 1, "one run: {runs:?}");
    assert!(
        std::fs::read_dir(dir.path())
            .expect("bench dir")
            .next()
            .is_none(),
        "pcx-bench {workload} left files behind"
    );
    runs
}

fn assert_close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= 1e-9 * want.abs(),
        "{what}: {got}, not {want}"
    );
}

fn figure(run: &Value, name: &str) -> f64 {
    run["run"][name]
        .as_f64()
        .unwrap_or_else(|| panic!("no figure {name} in {run}"))
}

#[test]
fn every_workload_runs_and_reports_its_figures_beside_its_reference() {
    let disk = &bench("disk")[0];
    assert!(figure(disk, "fsync_ms") > 0.0 && figure(disk, "seq_write_fsync_mib_s") > 0.0);

    let w1 = &bench("w1")[0];
    let phases: f64 = [
        "record_artifacts_s",
        "record_entries_s",
        "edits_s",
        "stitch_s",
    ]
    .iter()
    .map(|p| figure(w1, p))
    .sum();
    assert!(
        (phases - figure(w1, "total_s")).abs() < 1e-3,
        "phases add up to the total: {w1}"
    );
    assert!(figure(w1, "ratio_to_reference_torch") > 0.0);

    let w2 = &bench("w2")[0];
    assert_eq!(
        w2["run"]["artifacts"], 2000,
        "the cold start sees every artifact: {w2}"
    );
    assert!(figure(w2, "no_snapshot_first_answer_s") > 0.0);

    let w3 = &bench("w3")[0];
    assert!(figure(w3, "records_per_s") > 0.0 && figure(w3, "fraction_of_limit") > 0.0);
    assert!(figure(w3, "p99_ms") >= figure(w3, "p50_ms"));
    // The floors run the same clients in the same run: the one that stores nothing is the
    // fastest, and pcx's figure is read against sled's.
    assert!(
        figure(w3, "floor_socket_records_per_s") > figure(w3, "floor_sled_records_per_s"),
        "{w3}"
    );
    for floor in ["socket", "file", "sled"] {
        assert!(figure(w3, &format!("floor_{floor}_one_client_p50_ms")) > 0.0);
    }
    let against_sled = figure(w3, "records_per_s") / figure(w3, "floor_sled_records_per_s");
    assert!((figure(w3, "fraction_of_sled_floor") - against_sled).abs() < 1e-9);
    // The peers: the same clients against Redis (AOF, fsync always) and PostgreSQL
    // (synchronous commit) that the bench starts and stops itself (the CI installs both), and
    // pcx's figures over theirs from the same run.
    let mut peers = vec!["peer_redis", "peer_redis_1k"];
    if cfg!(feature = "postgres") {
        peers.push("peer_postgres");
    } else {
        let why = w3["run"]["peer_postgres"].as_str().unwrap_or_default();
        assert!(why.starts_with("not built"), "{w3}");
    }
    for peer in &peers {
        // What ran, or why nothing did.
        let about = w3["run"][peer.trim_end_matches("_1k")]
            .as_str()
            .unwrap_or_default();
        assert!(
            !about.is_empty() && !about.starts_with("not ") && !about.starts_with("failed"),
            "{peer}: {about}"
        );
        for name in ["records_per_s", "p50_ms", "p99_ms", "one_client_p50_ms"] {
            assert!(
                figure(w3, &format!("{peer}_{name}")) > 0.0,
                "{peer}_{name}: {w3}"
            );
        }
    }
    // The device round trips a record cost pcx, the bare-file floor and Redis, side by side.
    for side in ["pcx_run", "floor_file", "peer_redis"] {
        assert!(
            figure(w3, &format!("{side}_device_writes_per_record")) >= 0.0,
            "{side}: {w3}"
        );
    }
    let pcx = figure(w3, "records_per_s");
    let mut better: f64 = 0.0;
    for (ratio, peer) in [
        ("pcx_over_redis", "peer_redis"),
        ("pcx_over_postgres", "peer_postgres"),
    ] {
        if peers.contains(&peer) {
            let theirs = figure(w3, &format!("{peer}_records_per_s"));
            better = better.max(theirs);
            assert_close(figure(w3, ratio), pcx / theirs, ratio);
        }
    }
    assert_close(
        figure(w3, "pcx_over_better_peer"),
        pcx / better,
        "pcx_over_better_peer",
    );
    assert_close(
        figure(w3, "one_client_p50_over_redis"),
        figure(w3, "one_client_p50_ms") / figure(w3, "peer_redis_one_client_p50_ms"),
        "one_client_p50_over_redis",
    );
    assert_close(
        figure(w3, "pcx_over_file_floor"),
        pcx / figure(w3, "floor_file_records_per_s"),
        "pcx_over_file_floor",
    );

    let w4 = &bench("w4")[0];
    assert!(figure(w4, "fraction_of_disk") > 0.0);

    let w5 = &bench("w5")[0];
    assert!(figure(w5, "plugin_loads_per_s") > 0.0 && figure(w5, "eager_loads_per_s") > 0.0);

    // W6 starts a PostgreSQL cluster of its own (scripts/pg-cluster.sh).
    #[cfg(feature = "postgres")]
    {
        let w6 = &bench("w6")[0];
        assert!(figure(w6, "records_per_s") > 0.0, "{w6}");
        // The floor the target reads against issues pcx's own group statement, measured
        // before and after pcx's run; pcx is compared with their mean.
        let statement_floor = figure(
            w6,
            "floor_pg_statement_records_per_s (pcx's group statement, groups of clients_per_server; mean of before and after pcx's run)",
        );
        let (before, after) = (
            figure(w6, "floor_pg_statement_before_records_per_s"),
            figure(w6, "floor_pg_statement_after_records_per_s"),
        );
        assert!(before > 0.0 && after > 0.0, "{w6}");
        assert_close(statement_floor, (before + after) / 2.0, "the floor's mean");
        // Each side says what it cost: CPU and device round trips a record (the device's
        // may be 0 where the bench's directory is not on a disk).
        for key in [
            "pcx_run_cpu_us_per_record_pcx",
            "statement_floor_cpu_us_per_record_machine",
        ] {
            assert!(figure(w6, key) > 0.0, "{key}: {w6}");
        }
        for key in [
            "pcx_run_device_writes_per_record",
            "statement_floor_device_writes_per_record",
        ] {
            assert!(figure(w6, key) >= 0.0, "{key}: {w6}");
        }
        let against = figure(w6, "records_per_s") / statement_floor;
        assert!(
            (figure(w6, "fraction_of_pg_statement_floor (target >= 0.7)") - against).abs() < 1e-9,
            "{w6}"
        );
        assert!(figure(w6, "takeover_after_sigkill_s") > 0.0, "{w6}");
    }
}
