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

/// Points `config` at the backend the suite runs on: unchanged (the sled data directory), or
/// with `PCX_TEST_SUITE_JOURNAL=postgres` a PostgreSQL journal at `PCX_TEST_PG_URL`, named
/// after the data directory (so that a test reopening its directory reopens its journal).
pub fn suite_journal(config: &mut Config) {
    match std::env::var("PCX_TEST_SUITE_JOURNAL").as_deref() {
        Err(_) | Ok("") | Ok("sled") => {}
        Ok("postgres") => {
            config.journal = pcx::config::JournalBackend::Postgres;
            config.journal_url = std::env::var("PCX_TEST_PG_URL")
                .expect("PCX_TEST_SUITE_JOURNAL=postgres needs PCX_TEST_PG_URL");
            config.journal_name = format!(
                "suite-{}",
                Digest::of(config.data_dir.to_string_lossy().as_bytes()).to_hex()
            );
            // A test that closes and reopens at once: the closed context gave its lease up,
            // but a clone of its handle may still be going away.
            config.journal_wait_ms = 10_000;
        }
        Ok(other) => panic!("PCX_TEST_SUITE_JOURNAL={other}: say sled or postgres"),
    }
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
