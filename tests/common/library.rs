//! The library ([`pcx::Context`]) on a data directory, and the sled database under it.

use std::future::Future;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use pcx::journal::SledJournal;
use pcx::model::{DynamoCacheEntry, DynamoCodeEntry};
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
    c
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
    let mid = value.len() / 2;
    value[mid] ^= 0x55;
    tree.insert(key, value).unwrap();
}
