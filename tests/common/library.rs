//! The library ([`pcx::Context`]) on a data directory, and the sled database under it.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use pcx::core::model::{Digest, DynamoCacheEntry, DynamoCodeEntry};
use pcx::store::pack::{index_entries, index_push, page_push, page_records, Loc, Place};
use pcx::store::record::{key_seq, seq_key};
use pcx::store::sled_journal::SledJournal;
use pcx::{Artifact, Config, Context};

/// The cache capacity of the tests' contexts and journals.
pub const CACHE_BYTES: u64 = 4 << 20;

pub fn block_on<F: Future>(f: F) -> F::Output {
    actix::System::new().block_on(f)
}

/// The built-in config on `dir`, with a snapshot every `snapshot_every` events.
pub fn config(dir: &Path, snapshot_every: u64) -> Config {
    let mut c = Config::load(None, std::iter::empty()).unwrap();
    c.data_dir = dir.to_path_buf();
    c.snapshot_every = snapshot_every;
    c.cache_capacity_bytes = CACHE_BYTES;
    suite_journal(&mut c);
    c
}

/// Whether the suite runs on PostgreSQL (`PCX_TEST_SUITE_JOURNAL=postgres`) rather than on
/// sled data directories (unset, empty or `sled`).
pub fn suite_on_postgres() -> bool {
    match std::env::var("PCX_TEST_SUITE_JOURNAL").as_deref() {
        Err(_) | Ok("") | Ok("sled") => false,
        Ok("postgres") => true,
        Ok(other) => panic!("PCX_TEST_SUITE_JOURNAL={other}: say sled or postgres"),
    }
}

/// The database the suite runs on with `PCX_TEST_SUITE_JOURNAL=postgres`.
pub fn suite_pg_url() -> String {
    std::env::var("PCX_TEST_PG_URL").expect("PCX_TEST_SUITE_JOURNAL=postgres needs PCX_TEST_PG_URL")
}

/// The database URL for the data directory `dir`: `PCX_TEST_PG_URL` with a schema of its
/// own first on the search path (made here if missing), where pcx creates its tables. Each
/// directory's journal is then alone in its "cluster", as a sled data directory is alone on
/// its disk: a cluster shares contents and the dynamo cache between journals by design
/// (another test's saved `e1` would be taken up by a load here; an import would find the
/// source's contents already there), and a test damaging a content must not damage another's.
pub fn suite_pg_url_for(dir: &Path) -> String {
    let schema = format!(
        "suite_{}",
        &Digest::of(dir.to_string_lossy().as_bytes()).to_hex()[..20]
    );
    ensure_schema(&schema);
    let base = suite_pg_url();
    if base.starts_with("postgres://") || base.starts_with("postgresql://") {
        let glue = if base.contains('?') { '&' } else { '?' };
        format!("{base}{glue}options=-csearch_path%3D{schema}")
    } else {
        format!("{base} options=-csearch_path={schema}")
    }
}

/// Creates the schema `name` in the suite's database once per test process.
fn ensure_schema(name: &str) {
    static MADE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut made = MADE.lock().unwrap_or_else(|p| p.into_inner());
    if made.iter().any(|m| m == name) {
        return;
    }
    let url = suite_pg_url();
    let sql = format!("CREATE SCHEMA IF NOT EXISTS {name}");
    // On a thread of its own: the caller may be inside the actor's runtime (a config made in
    // `block_on`), where the client's own runtime cannot start.
    thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls)
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        client
            .batch_execute(&sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    })
    .join()
    .expect("the schema is made");
    made.push(name.to_string());
}

/// The name of the PostgreSQL journal that stands for the data directory `dir`: the same for
/// the library and the CLI, so that a test reopening its directory (in either) reopens its
/// journal, and a fresh directory is a fresh journal.
pub fn suite_journal_name(dir: &Path) -> String {
    format!(
        "suite-{}",
        Digest::of(dir.to_string_lossy().as_bytes()).to_hex()
    )
}

/// How long a suite's opener waits for the journal's lease: a test that closes and reopens at
/// once (or runs one `pcx` after another) finds the lease given up, but a clone of the closed
/// context's handle may still be going away.
const SUITE_WAIT_MS: u64 = 10_000;

/// Points `config` at the backend the suite runs on: unchanged (the sled data directory), or
/// with `PCX_TEST_SUITE_JOURNAL=postgres` a PostgreSQL journal at `PCX_TEST_PG_URL`, in a
/// schema of the data directory's own ([`suite_pg_url_for`]), named after the directory
/// ([`suite_journal_name`]).
pub fn suite_journal(config: &mut Config) {
    if suite_on_postgres() {
        config.journal = pcx::config::JournalBackend::Postgres;
        config.journal_url = suite_pg_url_for(&config.data_dir);
        config.journal_name = suite_journal_name(&config.data_dir);
        config.journal_wait_ms = SUITE_WAIT_MS;
    }
}

/// The environment that points a `pcx` process given `--data-dir DIR` at the suite's backend
/// as [`suite_journal`] points the library: nothing on sled; on PostgreSQL the `PCX_JOURNAL*`
/// variables the configuration reads.
pub fn suite_env(dir: &Path) -> Vec<(String, String)> {
    if !suite_on_postgres() {
        return Vec::new();
    }
    vec![
        ("PCX_JOURNAL".into(), "postgres".into()),
        ("PCX_JOURNAL_URL".into(), suite_pg_url_for(dir)),
        ("PCX_JOURNAL_NAME".into(), suite_journal_name(dir)),
        ("PCX_JOURNAL_WAIT_MS".into(), SUITE_WAIT_MS.to_string()),
    ]
}

/// The suite's journal for `dir`, opened to read only (as the audit commands open it): the
/// sled data directory, or the PostgreSQL journal named after it.
pub fn open_suite_reader(dir: &Path) -> Box<dyn pcx::store::journal::Journal> {
    if !suite_on_postgres() {
        return Box::new(open_journal(dir));
    }
    #[cfg(feature = "postgres")]
    {
        let settings = pcx::context::pg_settings(&config(dir, 1));
        Box::new(
            pcx::store::pg_journal::PgJournal::open_reader(settings)
                .unwrap_or_else(|e| panic!("opening the journal of {}: {e}", dir.display())),
        )
    }
    #[cfg(not(feature = "postgres"))]
    panic!("PCX_TEST_SUITE_JOURNAL=postgres needs `cargo test --features postgres`")
}

pub fn open(config: &Config) -> Context {
    Context::open(config).unwrap_or_else(|e| panic!("opening {}: {e}", config.data_dir.display()))
}

pub fn open_journal(dir: &Path) -> SledJournal {
    SledJournal::open(dir, CACHE_BYTES).expect("open the journal")
}

/// An `eager` artifact.
pub fn artifact(key: &str, content: &[u8]) -> Artifact {
    Artifact {
        key: key.into(),
        kind: "eager".into(),
        content: content.to_vec(),
    }
}

/// An entry of `f` (line 3, cpu) whose codes reference these backend ids.
pub fn entry<C: AsRef<[S]>, S: AsRef<str>>(codes: &[C]) -> DynamoCacheEntry {
    DynamoCacheEntry {
        codes: codes
            .iter()
            .map(|ids| DynamoCodeEntry {
                backend_ids: ids
                    .as_ref()
                    .iter()
                    .map(|s| s.as_ref().to_string())
                    .collect(),
                ..Default::default()
            })
            .collect(),
        device_type: "cpu".into(),
        fn_name: Some("f".into()),
        fn_first_lineno: Some(3),
        ..Default::default()
    }
}

/// Opens sled directly on a data directory nobody else has open, waiting (at most `patience`)
/// while a context or process that just closed it still holds its lock: sled's IO threads
/// hold the locked file for a moment after a close.
pub fn open_sled_directly(dir: &Path, patience: Duration) -> sled::Db {
    let deadline = Instant::now() + patience;
    loop {
        match sled::open(dir) {
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(5));
            }
            other => return other.expect("open sled directly"),
        }
    }
}

/// Changes one sled tree of a closed data directory directly, as damage would (opening it
/// with [`open_sled_directly`]).
pub fn damage(dir: &Path, tree: &str, patience: Duration, change: impl FnOnce(&sled::Tree)) {
    let db = open_sled_directly(dir, patience);
    let t = db.open_tree(tree).unwrap();
    change(&t);
    db.flush().unwrap();
}

/// Flips the bits of the middle byte of the value stored under `key`, which must exist.
pub fn flip_a_byte(tree: &sled::Tree, key: [u8; 8]) {
    let mut value = tree
        .get(key)
        .unwrap()
        .expect("the record to damage exists")
        .to_vec();
    flip_middle_byte(&mut value);
    tree.insert(key, value).unwrap();
}

/// Flips the bits of the middle byte.
pub fn flip_middle_byte(bytes: &mut [u8]) {
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
}

/// Changes the log records of a closed data directory as damage would. `change` gets them
/// by the sequence number their page gives them and may alter, remove or swap them; each
/// page is written back in its place with what is left of it.
pub fn damage_records(
    dir: &Path,
    patience: Duration,
    change: impl FnOnce(&mut BTreeMap<u64, Vec<u8>>),
) {
    let db = open_sled_directly(dir, patience);
    let pages = db.open_tree("pages").unwrap();
    let mut layout = Vec::new();
    let mut records = BTreeMap::new();
    for item in pages.iter() {
        let (k, v) = item.unwrap();
        let first = key_seq(&k).expect("a page key");
        let mut seqs = Vec::new();
        for (seq, record) in page_records(&v, first) {
            seqs.push(seq);
            records.insert(seq, record.to_vec());
        }
        layout.push((k, seqs));
    }
    change(&mut records);
    for (k, seqs) in layout {
        let mut page = Vec::new();
        for seq in seqs {
            if let Some(r) = records.get(&seq) {
                page_push(&mut page, seq, r);
            }
        }
        if page.is_empty() {
            pages.remove(k).unwrap();
        } else {
            pages.insert(k, page).unwrap();
        }
    }
    db.flush().unwrap();
}

/// Changes the snapshots of a closed data directory as damage would: `change` gets them by
/// the sequence number they are stored under and may alter, remove or add them.
pub fn damage_snapshots(
    dir: &Path,
    patience: Duration,
    change: impl FnOnce(&mut BTreeMap<u64, Vec<u8>>),
) {
    damage(dir, "snapshots", patience, |t| {
        let mut snapshots = BTreeMap::new();
        for item in t.iter() {
            let (k, v) = item.unwrap();
            snapshots.insert(key_seq(&k).expect("a snapshot key"), v.to_vec());
        }
        change(&mut snapshots);
        t.clear().unwrap();
        for (seq, bytes) in snapshots {
            t.insert(seq_key(seq), bytes).unwrap();
        }
    });
}

/// Changes the contents a closed data directory keeps in sled (small ones) as damage would:
/// `change` gets them by digest and may alter or remove them; what is left is written back
/// one pack each.
pub fn damage_contents(
    dir: &Path,
    patience: Duration,
    change: impl FnOnce(&mut BTreeMap<Digest, Vec<u8>>),
) {
    let db = open_sled_directly(dir, patience);
    let packs = db.open_tree("packs").unwrap();
    let index = db.open_tree("pack_index").unwrap();
    let mut contents = BTreeMap::new();
    for item in index.iter() {
        let (_, v) = item.unwrap();
        for (digest, loc) in index_entries(&v).expect("a sound index") {
            assert_eq!(loc.place, Place::Sled, "the test's contents are small");
            let pack = packs.get(seq_key(loc.pack)).unwrap().expect("its pack");
            contents.insert(digest, loc.slice(&pack).expect("in its pack").to_vec());
        }
    }
    change(&mut contents);
    packs.clear().unwrap();
    index.clear().unwrap();
    for (n, (digest, content)) in contents.iter().enumerate() {
        let n = n as u64;
        packs.insert(seq_key(n), content.as_slice()).unwrap();
        let mut entry = Vec::new();
        let loc = Loc {
            place: Place::Sled,
            pack: n,
            offset: 0,
            len: content.len() as u64,
            crc: 0,
        };
        index_push(&mut entry, digest, loc);
        index.insert(seq_key(n), entry).unwrap();
    }
    db.flush().unwrap();
}

/// The content files of a data directory (where large contents go), in name order.
pub fn content_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("content"))
        .expect("the content directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .collect();
    files.sort();
    files
}

/// The digests of every content a closed data directory stores.
pub fn stored_digests(dir: &Path, patience: Duration) -> std::collections::BTreeSet<Digest> {
    let deadline = Instant::now() + patience;
    loop {
        match SledJournal::open(dir, CACHE_BYTES) {
            Ok(j) => return j.blob_digests().unwrap().into_iter().collect(),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("opening {}: {e}", dir.display()),
        }
    }
}
