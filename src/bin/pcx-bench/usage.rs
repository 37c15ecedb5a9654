//! What a phase of a workload used: where its CPU went, read from `/proc` (the machine's
//! busy time from `/proc/stat`, each live process's own from `/proc/PID/stat`, summed by
//! party), and the device round trips it cost ([`crate::device`]). W3 and W6 run the servers
//! and their clients on one machine (W6 three PostgreSQL servers and four pcx processes too);
//! on 2 cores their figures are CPU shares, and this says whose.
//!
//! A process that exits inside the phase takes its time with it (the kernel keeps it only
//! for the parent): the parties measured here (pcx servers, the bench's own clients, the
//! cluster's servers and the backends of long-lived connections) live across it, and the
//! machine's total is exact either way.

use std::collections::HashMap;

use crate::device::DeviceCounts;

/// CPU seconds at one moment (the machine's busy time, and each party's), and the disks'
/// counters.
pub(crate) struct Usage {
    busy: f64,
    parties: HashMap<&'static str, f64>,
    device: DeviceCounts,
}

/// Who a process is, by its command name: pcx servers, this bench (its client tasks),
/// PostgreSQL (servers and backends), Redis, or nobody we account.
fn party(comm: &str) -> Option<&'static str> {
    match comm {
        "pcx" => Some("pcx"),
        "pcx-bench" => Some("clients"),
        "redis-server" => Some("redis"),
        c if c.starts_with("postgres") => Some("postgresql"),
        _ => None,
    }
}

/// The parties [`Usage::per_record`] reports, when they ran.
const PARTIES: [&str; 4] = ["pcx", "clients", "postgresql", "redis"];

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Every process's pid, command name and CPU seconds (user and system, all its threads),
/// each once: `/proc`'s numbered entries only (`self` and `thread-self` link to the reader,
/// which would count it three times).
fn processes(hz: f64) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name();
        if !name
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "PID (comm) state ppid …": comm may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // After the state: utime and stime are the 12th and 13th fields.
        let time = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
        if let (Some(user), Some(system)) = (time(11), time(12)) {
            out.push((stat[open + 1..close].to_string(), (user + system) / hz));
        }
    }
    out
}

impl Usage {
    /// Reads the machine's and every process's CPU time now. A process that vanishes while
    /// it is read is skipped; a `/proc` that cannot be read gives zeros (the figures then
    /// read as 0, not as a failure of the workload).
    pub(crate) fn now() -> Usage {
        let hz = ticks_per_second();
        let busy = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let line = s.lines().next()?.to_string();
                let v: Vec<f64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal: busy is all but idle, iowait.
                (v.len() >= 8).then(|| (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / hz)
            })
            .unwrap_or(0.0);
        let mut parties = HashMap::new();
        for (comm, seconds) in processes(hz) {
            if let Some(who) = party(&comm) {
                *parties.entry(who).or_insert(0.0) += seconds;
            }
        }
        Usage {
            busy,
            parties,
            device: DeviceCounts::now(),
        }
    }

    /// CPU microseconds per unit of work between `self` and `later`, by party and for the
    /// whole machine (`machine`, which includes the kernel's threads and everyone else), and
    /// the busy cores over `secs`, and the device round trips per unit: keys
    /// `{prefix}_cpu_us_per_record_{party}`, `{prefix}_busy_cores` and those of
    /// [`DeviceCounts::per_record`].
    pub(crate) fn per_record(
        &self,
        later: &Usage,
        records: f64,
        secs: f64,
        prefix: &str,
    ) -> Vec<(String, f64)> {
        let per = |seconds: f64| seconds * 1e6 / records.max(1.0);
        let mut out = vec![(
            format!("{prefix}_cpu_us_per_record_machine"),
            per(later.busy - self.busy),
        )];
        for who in PARTIES {
            let before = self.parties.get(who).copied().unwrap_or(0.0);
            // A party with no time after is not running; one that did nothing is left out.
            if let Some(after) = later.parties.get(who).filter(|a| **a > before) {
                out.push((
                    format!("{prefix}_cpu_us_per_record_{who}"),
                    per(after - before),
                ));
            }
        }
        out.push((
            format!("{prefix}_busy_cores"),
            (later.busy - self.busy) / secs.max(1e-9),
        ));
        out.extend(self.device.per_record(&later.device, records, prefix));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machines_busy_time_sees_work_done_between_two_samples() {
        let before = Usage::now();
        // Burn a measurable amount of CPU in this process.
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(200) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = Usage::now();
        let figures: HashMap<String, f64> = before
            .per_record(&after, 1.0, 0.2, "t")
            .into_iter()
            .collect();
        // The test binary is not called pcx-bench: its own time is not a party's, but the
        // machine's busy time saw at least most of the 200 ms it spun.
        assert!(
            figures["t_cpu_us_per_record_machine"] >= 100_000.0,
            "{figures:?}"
        );
        assert!(figures["t_busy_cores"] >= 0.5, "{figures:?}");
    }

    #[test]
    fn each_process_is_counted_once() {
        // This process burns CPU until it has at least 0.15 s of it (a busy machine may give it
        // less than its wall time), so it has a time to double count.
        let own_seconds = || {
            let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
            let fields: Vec<&str> = stat[stat.rfind(')').expect(")") + 2..].split(' ').collect();
            let ticks: f64 = fields[11].parse::<f64>().expect("utime")
                + fields[12].parse::<f64>().expect("stime");
            ticks / ticks_per_second()
        };
        let before = std::time::Instant::now();
        while own_seconds() < 0.15 && before.elapsed() < std::time::Duration::from_secs(30) {
            std::hint::black_box(before.elapsed());
        }
        let me = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
        let comm = &me[me.find('(').expect("(") + 1..me.rfind(')').expect(")")];
        let mine: Vec<f64> = processes(ticks_per_second())
            .into_iter()
            .filter(|(c, _)| c == comm)
            .map(|(_, s)| s)
            .collect();
        // Other processes may share the name (test binaries run side by side), but this one's
        // time must not appear once for its pid and again for /proc/self, /proc/thread-self.
        let own = mine.iter().filter(|s| **s >= 0.09).count();
        assert!(own >= 1, "this process is read: {mine:?}");
        let others_like_me = std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            })
            .filter(|e| {
                std::fs::read_to_string(e.path().join("stat"))
                    .is_ok_and(|s| s.contains(&format!("({comm})")))
            })
            .count();
        assert_eq!(
            mine.len(),
            others_like_me,
            "one entry per process: {mine:?}"
        );
    }

    #[test]
    fn processes_are_told_apart_by_their_command_names() {
        assert_eq!(party("pcx"), Some("pcx"));
        assert_eq!(party("pcx-bench"), Some("clients"));
        assert_eq!(party("postgres"), Some("postgresql"));
        assert_eq!(party("postgres: walsender"), Some("postgresql"));
        assert_eq!(party("redis-server"), Some("redis"));
        assert_eq!(party("bash"), None);
    }
}
