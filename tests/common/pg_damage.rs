//! Damage to a journal in PostgreSQL (the suite's backend with `PCX_TEST_SUITE_JOURNAL=postgres`),
//! made with SQL on its tables as an operator's mistake, a bad restore or a bad disk would: the
//! PostgreSQL counterparts of [`super::library`]'s `damage_*` helpers, with the same shapes, so
//! that a test says once what it damages and the suite damages whichever backend it runs on.
//!
//! Each helper takes the data directory the journal stands for: its tables are in that
//! directory's own schema ([`suite_pg_url_for`]), its records and snapshots under the journal's
//! name ([`suite_journal_name`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use pcx::core::model::Digest;
use postgres::{Client, NoTls};

use super::library::{suite_journal_name, suite_pg_url_for};

/// A connection to the schema of the journal standing for `dir`.
pub fn client(dir: &Path) -> Client {
    let url = suite_pg_url_for(dir);
    Client::connect(&url, NoTls).unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

/// Rows `(seq, bytes)` of one of a journal's tables keyed by sequence number.
fn rows(tx: &mut postgres::Transaction<'_>, table: &str, journal: &str) -> BTreeMap<u64, Vec<u8>> {
    tx.query(
        &format!("SELECT seq, bytes FROM {table} WHERE journal = $1 ORDER BY seq"),
        &[&journal],
    )
    .unwrap_or_else(|e| panic!("reading {table}: {e}"))
    .into_iter()
    .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, Vec<u8>>(1)))
    .collect()
}

/// Changes one of the journal's tables keyed by sequence number, in one transaction: `change`
/// gets its rows and may alter, remove, add or swap them; what is left replaces them.
fn change_rows(dir: &Path, table: &str, change: impl FnOnce(&mut BTreeMap<u64, Vec<u8>>)) {
    let journal = suite_journal_name(dir);
    let mut client = client(dir);
    let mut tx = client.transaction().expect("begin");
    let mut rows = rows(&mut tx, table, &journal);
    assert!(
        !rows.is_empty() || table != "pcx_records",
        "journal {journal} ({}) has no records to damage",
        dir.display()
    );
    change(&mut rows);
    tx.execute(
        &format!("DELETE FROM {table} WHERE journal = $1"),
        &[&journal],
    )
    .expect("delete the rows");
    for (seq, bytes) in &rows {
        tx.execute(
            &format!("INSERT INTO {table} (journal, seq, bytes) VALUES ($1, $2, $3)"),
            &[&journal, &(*seq as i64), bytes],
        )
        .expect("write a row back");
    }
    tx.commit().expect("commit the damage");
}

/// Changes the event records of the journal standing for `dir` (`pcx_records`), as
/// `library::damage_records` changes a sled directory's.
pub fn records(dir: &Path, change: impl FnOnce(&mut BTreeMap<u64, Vec<u8>>)) {
    change_rows(dir, "pcx_records", change)
}

/// Changes the snapshots of the journal standing for `dir` (`pcx_snapshots`), by the sequence
/// number they are stored under.
pub fn snapshots(dir: &Path, change: impl FnOnce(&mut BTreeMap<u64, Vec<u8>>)) {
    change_rows(dir, "pcx_snapshots", change)
}

/// Sets the head row of the journal standing for `dir` (`pcx_heads`, its own record of how far
/// its log went) to `head`, as someone covering deleted records, or a partial restore, would.
pub fn set_head(dir: &Path, head: u64) {
    let journal = suite_journal_name(dir);
    let moved = client(dir)
        .execute(
            "UPDATE pcx_heads SET head = $1 WHERE journal = $2",
            &[&(head as i64), &journal],
        )
        .unwrap_or_else(|e| panic!("setting the head of {journal}: {e}"));
    assert_eq!(moved, 1, "the journal {journal} has a head row");
}

/// Changes the contents stored for `dir` (`pcx_contents` and their parts), as
/// `library::damage_contents` changes a sled directory's: `change` gets them by digest, whole,
/// and may alter or remove them; each is then written back as the journal writes one (its
/// length, and parts of `PART_BYTES`) under the digest it had, so an altered content is
/// well-formed but no longer the content its digest names.
pub fn contents(dir: &Path, change: impl FnOnce(&mut BTreeMap<Digest, Vec<u8>>)) {
    let mut client = client(dir);
    let mut tx = client.transaction().expect("begin");
    let mut stored: BTreeMap<Digest, Vec<u8>> = BTreeMap::new();
    for row in tx
        .query(
            "SELECT digest, bytes FROM pcx_content_parts ORDER BY digest, part",
            &[],
        )
        .expect("read the contents' parts")
    {
        let part: Vec<u8> = row.get(1);
        stored
            .entry(digest_of_row(row.get(0)))
            .or_default()
            .extend_from_slice(&part);
    }
    change(&mut stored);
    tx.batch_execute("DELETE FROM pcx_content_parts; DELETE FROM pcx_contents")
        .expect("delete the contents");
    for (d, content) in &stored {
        let parts: Vec<&[u8]> = if content.is_empty() {
            vec![&[]]
        } else {
            content.chunks(part_bytes()).collect()
        };
        tx.execute(
            "INSERT INTO pcx_contents (digest, len, parts) VALUES ($1, $2, $3)",
            &[
                &d.0.as_slice(),
                &(content.len() as i64),
                &(parts.len() as i32),
            ],
        )
        .expect("write a content back");
        for (n, part) in parts.iter().enumerate() {
            tx.execute(
                "INSERT INTO pcx_content_parts (digest, part, bytes) VALUES ($1, $2, $3)",
                &[&d.0.as_slice(), &(n as i32), part],
            )
            .expect("write a part back");
        }
    }
    tx.commit().expect("commit the damage");
}

fn digest_of_row(bytes: Vec<u8>) -> Digest {
    Digest(bytes.try_into().expect("a 32-byte digest"))
}

/// The size of a content's parts in the journal (only a build with PostgreSQL has one).
fn part_bytes() -> usize {
    #[cfg(feature = "postgres")]
    return pcx::store::pg_journal::PART_BYTES;
    #[cfg(not(feature = "postgres"))]
    panic!("the PostgreSQL journal needs `cargo test --features postgres`")
}

/// Changes the stored parts of one content, leaving its row in `pcx_contents` (its length
/// and count of parts) as it was: `change` gets the parts by number and may alter or remove
/// them. What a bad disk or a partial restore does to one part of a large content.
pub fn content_parts(
    dir: &Path,
    digest: &Digest,
    change: impl FnOnce(&mut BTreeMap<i32, Vec<u8>>),
) {
    let mut client = client(dir);
    let mut tx = client.transaction().expect("begin");
    let mut parts: BTreeMap<i32, Vec<u8>> = tx
        .query(
            "SELECT part, bytes FROM pcx_content_parts WHERE digest = $1",
            &[&digest.0.as_slice()],
        )
        .expect("read a content's parts")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(!parts.is_empty(), "content {digest} is stored");
    change(&mut parts);
    tx.execute(
        "DELETE FROM pcx_content_parts WHERE digest = $1",
        &[&digest.0.as_slice()],
    )
    .expect("delete the parts");
    for (n, bytes) in &parts {
        tx.execute(
            "INSERT INTO pcx_content_parts (digest, part, bytes) VALUES ($1, $2, $3)",
            &[&digest.0.as_slice(), n, bytes],
        )
        .expect("write a part back");
    }
    tx.commit().expect("commit the damage");
}

/// How many parts are stored for `dir` of a content (0: not stored).
pub fn part_count(dir: &Path, digest: &Digest) -> i64 {
    client(dir)
        .query_one(
            "SELECT count(*) FROM pcx_content_parts WHERE digest = $1",
            &[&digest.0.as_slice()],
        )
        .expect("count a content's parts")
        .get(0)
}

/// The digests of every content stored for `dir`.
pub fn stored_digests(dir: &Path) -> BTreeSet<Digest> {
    client(dir)
        .query("SELECT digest FROM pcx_contents", &[])
        .expect("list contents")
        .into_iter()
        .map(|r| digest_of_row(r.get(0)))
        .collect()
}

/// Whether the journal standing for `dir` exists in the database (a writer opened it).
pub fn journal_exists(dir: &Path) -> bool {
    let journal = suite_journal_name(dir);
    let mut client = client(dir);
    let tables: Option<String> = client
        .query_one("SELECT to_regclass('pcx_heads')::text", &[])
        .expect("look pcx_heads up")
        .get(0);
    tables.is_some()
        && client
            .query_opt("SELECT 1 FROM pcx_heads WHERE journal = $1", &[&journal])
            .expect("read pcx_heads")
            .is_some()
}

/// The journals in the schema of `dir` (its own, and any an import left beside it).
pub fn journals(dir: &Path) -> Vec<String> {
    client(dir)
        .query("SELECT journal FROM pcx_heads ORDER BY journal", &[])
        .expect("list the journals")
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

/// Sets the compaction anchor of the journal standing for `dir` (`pcx_meta`, key `anchor`) to
/// `bytes`, as someone forging one would.
pub fn set_anchor(dir: &Path, bytes: &[u8]) {
    let journal = suite_journal_name(dir);
    client(dir)
        .execute(
            "INSERT INTO pcx_meta (journal, key, bytes) VALUES ($1, 'anchor', $2) \
             ON CONFLICT (journal, key) DO UPDATE SET bytes = EXCLUDED.bytes",
            &[&journal, &bytes],
        )
        .unwrap_or_else(|e| panic!("setting the anchor of {journal}: {e}"));
}

/// Deletes the head row of the journal standing for `dir` (`pcx_heads`), as an operator
/// clearing what looks like a stuck lease would.
pub fn delete_head(dir: &Path) {
    let journal = suite_journal_name(dir);
    let gone = client(dir)
        .execute("DELETE FROM pcx_heads WHERE journal = $1", &[&journal])
        .unwrap_or_else(|e| panic!("deleting the head of {journal}: {e}"));
    assert_eq!(gone, 1, "the journal {journal} had a head row");
}
