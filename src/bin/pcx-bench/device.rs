//! What the machine's disks were asked to do around a phase: write requests and cache
//! flushes completed, from `/sys/block/*/stat`. A durable commit costs device round trips (a
//! write, then a flush of the device's write cache); issue 18 asks for fewer of them a commit,
//! so the runs that compare pcx with its floors and peers say how many each record cost.
//!
//! The counters are the kernel's, for every process: the figure of a phase is exact for the
//! machine, and whose requests they were is for the phase's design to make clear (one server
//! and its clients at a time).

/// Write requests and flushes completed by the machine's disks, summed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct DeviceCounts {
    pub(crate) writes: u64,
    /// `None` on kernels older than 5.5, whose `stat` has no flush counter.
    pub(crate) flushes: Option<u64>,
}

/// A block device's `stat` line: the writes completed (the 5th field) and the flushes
/// completed (the 16th, present since Linux 5.5).
pub(crate) fn parse_stat(line: &str) -> Option<DeviceCounts> {
    let fields: Vec<u64> = line
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    Some(DeviceCounts {
        writes: *fields.get(4)?,
        flushes: fields.get(15).copied(),
    })
}

/// Devices that stand on others (device mapper, md) or on memory (loop, ram, zram): counting
/// them would count a request twice or count one that no disk saw.
fn is_physical(name: &str) -> bool {
    !["loop", "ram", "zram", "dm-", "md", "sr"]
        .iter()
        .any(|p| name.starts_with(p))
}

impl DeviceCounts {
    /// The machine's disks' counters now; zeros where `/sys/block` cannot be read (the
    /// figures then read as 0, not as a failure of the workload).
    pub(crate) fn now() -> DeviceCounts {
        let mut total = DeviceCounts {
            writes: 0,
            flushes: Some(0),
        };
        for entry in std::fs::read_dir("/sys/block")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name();
            if !name.to_str().is_some_and(is_physical) {
                continue;
            }
            let Some(c) = std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|s| parse_stat(&s))
            else {
                continue;
            };
            total.writes += c.writes;
            total.flushes = total.flushes.zip(c.flushes).map(|(a, b)| a + b);
        }
        total
    }

    /// Writes and flushes per unit of work from `self` to `later`: keys
    /// `{prefix}_device_writes_per_record` and `{prefix}_device_flushes_per_record` (the
    /// latter left out where the kernel does not count flushes).
    pub(crate) fn per_record(
        &self,
        later: &DeviceCounts,
        records: f64,
        prefix: &str,
    ) -> Vec<(String, f64)> {
        let per = |n: u64| n as f64 / records.max(1.0);
        let mut out = vec![(
            format!("{prefix}_device_writes_per_record"),
            per(later.writes.saturating_sub(self.writes)),
        )];
        if let (Some(a), Some(b)) = (self.flushes, later.flushes) {
            out.push((
                format!("{prefix}_device_flushes_per_record"),
                per(b.saturating_sub(a)),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_devices_writes_and_flushes_are_read_from_their_places_in_its_stat_line() {
        // A virtio disk's line on Linux 6.x: 17 fields, writes completed 11679390, flushes
        // completed 4927072.
        let line = " 952803    26423 40582490  2642253 11679390   560351 611250488  2737181 \
                    0   781788  5701757   427317       30 439479720    70565  4927072   251756\n";
        assert_eq!(
            parse_stat(line),
            Some(DeviceCounts {
                writes: 11_679_390,
                flushes: Some(4_927_072),
            })
        );
        // Before Linux 5.5 (11 fields; 15 from 4.18): no flush counter.
        let old = "1 2 3 4 55 6 7 8 0 10 11";
        assert_eq!(
            parse_stat(old),
            Some(DeviceCounts {
                writes: 55,
                flushes: None,
            })
        );
        assert_eq!(parse_stat("1 2 x"), None);
        assert_eq!(parse_stat("1 2 3"), None);
    }

    #[test]
    fn devices_that_stand_on_others_or_on_memory_are_not_counted() {
        for name in ["vda", "sda", "nvme0n1", "xvda", "mmcblk0"] {
            assert!(is_physical(name), "{name}");
        }
        for name in ["loop0", "ram1", "zram0", "dm-0", "md127", "sr0"] {
            assert!(!is_physical(name), "{name}");
        }
    }

    #[test]
    fn figures_are_per_record_and_the_flushes_only_where_counted() {
        let before = DeviceCounts {
            writes: 100,
            flushes: Some(10),
        };
        let after = DeviceCounts {
            writes: 300,
            flushes: Some(60),
        };
        let f: std::collections::HashMap<String, f64> =
            before.per_record(&after, 50.0, "p").into_iter().collect();
        assert_eq!(f["p_device_writes_per_record"], 4.0);
        assert_eq!(f["p_device_flushes_per_record"], 1.0);
        let unknown = DeviceCounts {
            writes: 300,
            flushes: None,
        };
        let f = before.per_record(&unknown, 50.0, "p");
        assert_eq!(f, vec![("p_device_writes_per_record".to_string(), 4.0)]);
    }
}
