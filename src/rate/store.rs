//! The rating consumer's RocksDB state: the ledger's keys (see [`super::ledger`]) plus,
//! per input partition, the offset after the last record the state reflects
//! (`o|<partition>`), written in the same atomic batch. Comparing it with the group's
//! committed offset at start tells whether a crash fell between a commit and the state
//! write (see [`super::consumer`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rocksdb::{Options, WriteBatch, DB};

use super::ledger::Kv;

#[derive(Debug, thiserror::Error)]
#[error("rating state at {path}: {err}")]
pub struct RateStoreError {
    path: PathBuf,
    err: rocksdb::Error,
}

pub struct RateStore {
    db: DB,
    path: PathBuf,
}

fn offset_key(partition: i32) -> String {
    format!("o|{partition}")
}

impl RateStore {
    pub fn open(path: &Path) -> Result<Self, RateStoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        let db = DB::open(&opts, path).map_err(|err| RateStoreError { path: path.to_owned(), err })?;
        Ok(Self { db, path: path.to_owned() })
    }

    /// The offset after the last input record of `partition` the state reflects.
    pub fn position(&mut self, partition: i32) -> Result<Option<i64>, RateStoreError> {
        Ok(self.get(&offset_key(partition))?.and_then(|v| v.parse().ok()))
    }

    /// Writes the ledger's writes and the new positions in one atomic batch.
    pub fn write(&mut self, writes: &BTreeMap<String, String>, positions: &BTreeMap<i32, i64>) -> Result<(), RateStoreError> {
        let mut batch = WriteBatch::default();
        for (k, v) in writes {
            batch.put(k.as_bytes(), v.as_bytes());
        }
        for (p, next) in positions {
            batch.put(offset_key(*p).as_bytes(), next.to_string().as_bytes());
        }
        self.db.write(batch).map_err(|err| RateStoreError { path: self.path.clone(), err })
    }
}

impl Kv for RateStore {
    type Error = RateStoreError;
    fn get(&mut self, key: &str) -> Result<Option<String>, Self::Error> {
        let v = self.db.get(key.as_bytes()).map_err(|err| RateStoreError { path: self.path.clone(), err })?;
        Ok(v.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }
}
