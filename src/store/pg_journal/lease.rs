//! The PostgreSQL journal's lease: one writer per journal, judged by the database's clock,
//! taken at open (a new epoch), renewed on a connection of its own, and why a writer was
//! fenced when its head did not move.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use postgres::Client;

use crate::store::error::StoreError;

use super::db::*;

/// The journal's lease as one writer holds it.
pub(super) struct Lease {
    pub(super) epoch: i64,
    /// Set by the renewer (or a refused commit) once the lease is known lost.
    pub(super) lost: Arc<Mutex<Option<String>>>,
    /// Until when (this machine's monotonic clock) the lease surely runs: the moment the
    /// request that granted or last renewed it was sent, plus the lease. The database judges
    /// the lease by its own clock from a later moment, so no other writer can be granted the
    /// journal before this; past it, the state this process holds may be stale.
    pub(super) valid_until: Arc<Mutex<Instant>>,
    pub(super) stop: Arc<AtomicBool>,
}

/// What a lease request granted: the epoch, the head, and whether the journal's head row was
/// made by this request.
pub(super) struct Granted {
    pub(super) epoch: i64,
    pub(super) head: i64,
    pub(super) made: bool,
}

/// What a lease request found: granted, or held by `(holder, ms left)`.
pub(super) type Grant = Result<Granted, (String, i64)>;

/// Takes the lease if nobody live holds it: a takeover is the next epoch. A journal without a
/// head row gets one at its last record (none for a new journal; records already there if its
/// row was deleted, which every writer's head moves with, so that they are not taken for
/// records past the head), and an epoch no earlier head row of the journal had: the database
/// clock's milliseconds, past every epoch granted before (each a millisecond or more later
/// than the one before it), so that a holder whose row was deleted under it is fenced by the
/// next holder instead of sharing its epoch. A takeover's epoch is past those milliseconds
/// too, not only the epoch before it: a head row restored from a backup older than the live
/// holder's takeover holds the epoch before that holder's, and "that plus one" gave the next
/// holder the live holder's own epoch, so both wrote the journal.
pub(super) fn acquire(client: &mut Client, s: &PgSettings) -> Result<Grant, postgres::Error> {
    let lease_ms = s.lease.as_millis() as f64;
    let granted = client.query_opt(
        "INSERT INTO pcx_heads AS h (journal, head, epoch, holder, address, lease_until) \
         VALUES ($1, (SELECT coalesce(max(seq), 0) FROM pcx_records WHERE journal = $1), \
                 (extract(epoch FROM clock_timestamp()) * 1000)::bigint, $2, $3, \
                 clock_timestamp() + $4::float8 * interval '1 millisecond') \
         ON CONFLICT (journal) DO UPDATE \
           SET epoch = greatest(h.epoch + 1, EXCLUDED.epoch), holder = EXCLUDED.holder, \
               address = EXCLUDED.address, \
               lease_until = EXCLUDED.lease_until \
           WHERE h.lease_until < clock_timestamp() \
         RETURNING epoch, head, xmax::text = '0'",
        &[&s.journal, &s.holder, &s.address, &lease_ms],
    )?;
    if let Some(row) = granted {
        return Ok(Ok(Granted {
            epoch: row.get(0),
            head: row.get(1),
            made: row.get(2),
        }));
    }
    let row = client.query_one(
        "SELECT holder, greatest(0, extract(epoch FROM lease_until - clock_timestamp()) * 1000)::bigint \
         FROM pcx_heads WHERE journal = $1",
        &[&s.journal],
    )?;
    Ok(Err((row.get(0), row.get(1))))
}

/// Why the head could not be moved: the epoch moved on, the lease ran out, or the head is
/// not where this writer left it.
pub(super) fn why_fenced(client: &mut Client, journal: &str, epoch: i64, old: u64) -> String {
    let row = client.query_opt(
        "SELECT epoch, holder, head, lease_until < clock_timestamp() FROM pcx_heads WHERE journal = $1",
        &[&journal],
    );
    match row {
        Ok(Some(r)) => {
            let (now_epoch, holder, head, expired): (i64, String, i64, bool) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            if now_epoch != epoch {
                format!("another writer ({holder}) took it over at epoch {now_epoch}; this one held epoch {epoch}")
            } else if expired {
                format!("this writer's lease (epoch {epoch}) ran out before the commit")
            } else {
                format!("its head is {head}, not {old} as this writer left it")
            }
        }
        Ok(None) => "its lease row is gone".into(),
        Err(e) => format!("the lease could not be checked: {}", describe(&e)),
    }
}

impl Lease {
    /// Starts renewing the lease every third of its period, on a connection of its own.
    /// `asked` is when the request that granted the lease was sent.
    pub(super) fn start(s: &PgSettings, epoch: i64, asked: Instant) -> Result<Lease, StoreError> {
        let lost: Arc<Mutex<Option<String>>> = Arc::default();
        let valid_until = Arc::new(Mutex::new(asked + s.lease));
        let stop = Arc::new(AtomicBool::new(false));
        let (lost2, stop2, s2) = (lost.clone(), stop.clone(), s.clone());
        let valid2 = valid_until.clone();
        let every = s.lease / 3;
        std::thread::Builder::new()
            .name("pcx-lease".into())
            .spawn(move || {
                let lease_ms = s2.lease.as_millis() as f64;
                let mut client: Option<Client> = None;
                while !stop2.load(Ordering::SeqCst) {
                    std::thread::sleep(every);
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    // A writer that knows it is fenced (a commit refused: another epoch, or
                    // the head not where it left it, as after a restore under it) renews no
                    // more: before, its epoch still matching, it went on renewing and no
                    // standby could take the journal over while it ran.
                    if lost2.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                        tracing::warn!(journal = %s2.journal, epoch, "the lease is lost: no more renewals, so that another writer can take the journal over");
                        break;
                    }
                    if client.as_ref().is_none_or(|c| c.is_closed()) {
                        match connect(&s2.url) {
                            Ok((c, _)) => client = Some(c),
                            Err(e) => {
                                tracing::warn!(error = %describe(&e), "cannot reach the database to renew the lease");
                                continue;
                            }
                        }
                    }
                    let Some(c) = client.as_mut() else { continue };
                    let asked = Instant::now();
                    take_warning();
                    match c.execute(
                        "UPDATE pcx_heads SET lease_until = clock_timestamp() + $3::float8 * interval '1 millisecond' \
                         WHERE journal = $1 AND epoch = $2 AND lease_until > clock_timestamp()",
                        &[&s2.journal, &epoch, &lease_ms],
                    ) {
                        // A renewal that passed with a warning (its wait for the standbys
                        // cancelled) may be lost by a failover: not counted.
                        Ok(1) if take_warning() => {}
                        Ok(1) => {
                            *valid2.lock().unwrap_or_else(|p| p.into_inner()) = asked + s2.lease;
                        }
                        Ok(_) => {
                            let why = format!("its lease (epoch {epoch}) ran out or was taken over before it was renewed");
                            tracing::error!(journal = %s2.journal, epoch, "lost the journal's lease");
                            lost2.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(why);
                            break;
                        }
                        Err(e) => tracing::warn!(error = %describe(&e), "renewing the lease failed; retrying"),
                    }
                }
            })
            .map_err(|e| StoreError::Database {
                op: "starting the lease thread",
                what: e.to_string(),
            })?;
        Ok(Lease {
            epoch,
            lost,
            valid_until,
            stop,
        })
    }
}
