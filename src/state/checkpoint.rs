//! Checkpoints of stage 2's stores: every `checkpoint_interval`, right after a commit,
//! each task writes a RocksDB snapshot of its store plus a small `CHECKPOINT.json`
//! (changelog offset, watermark, time) under
//! `<checkpoint_dir>/<application_id>/<grouped topic>-<partition>/`.
//!
//! The live store records its own changelog position atomically with its data, so a
//! restart normally needs no checkpoint at all and reads only the changelog tail. The
//! checkpoint covers losing the live store (a wiped or corrupt `state_dir`, a new
//! volume): the store is then rebuilt from the checkpoint plus the changelog after it,
//! instead of the whole changelog.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::store::{PartitionStore, StoreError, StoreResources};

/// The contents of `CHECKPOINT.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    pub partition: i32,
    /// The changelog offset the snapshot reflects (exclusive).
    pub changelog_offset: Option<i64>,
    pub watermark_ms: i64,
    pub created_ms: i64,
}

const INFO_FILE: &str = "CHECKPOINT.json";
const DB_DIR: &str = "db";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("checkpoint {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("checkpoint {path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_owned(), source }
}

/// Where a partition's live store and checkpoint live.
#[derive(Debug, Clone)]
pub struct StorePaths {
    pub live: PathBuf,
    pub checkpoint: PathBuf,
}

impl StorePaths {
    /// The store of `input` partition `partition`: `<live_root>/<input>-<partition>` and
    /// its checkpoint at `<checkpoint_root>/<input>-<partition>`.
    pub fn new(live_root: &Path, checkpoint_root: &Path, input: &str, partition: i32) -> Self {
        let name = format!("{input}-{partition}");
        Self { live: live_root.join(&name), checkpoint: checkpoint_root.join(&name) }
    }
}

/// Opens the live store of a partition; when there is none but a checkpoint exists,
/// seeds it from the checkpoint first. Returns the store and whether it was seeded.
pub fn open_store(paths: &StorePaths, resources: &StoreResources) -> Result<(PartitionStore, bool), CheckpointError> {
    let has_live = paths.live.join("CURRENT").exists();
    let snapshot = paths.checkpoint.join(DB_DIR);
    let seeded = !has_live && snapshot.join("CURRENT").exists();
    if seeded {
        copy_dir(&snapshot, &paths.live)?;
    }
    Ok((PartitionStore::open(&paths.live, resources)?, seeded))
}

/// Writes a checkpoint of `store` (committed, with an empty batch) and replaces the
/// previous one. Returns how long it took.
pub fn write(
    paths: &StorePaths,
    store: &PartitionStore,
    partition: i32,
    watermark_ms: i64,
) -> Result<Duration, CheckpointError> {
    let started = Instant::now();
    let dir = &paths.checkpoint;
    let parent = dir.parent().unwrap_or(dir);
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    // Build it beside the old one, then swap: a crash never leaves a half checkpoint.
    let tmp = dir.with_extension("tmp");
    remove_if_exists(&tmp)?;
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    store.snapshot(&tmp.join(DB_DIR))?;
    let info = CheckpointInfo {
        partition,
        changelog_offset: store.changelog_position(),
        watermark_ms,
        created_ms: crate::pulse::time::now_ms(),
    };
    let json = serde_json::to_vec_pretty(&info).map_err(|e| CheckpointError::Invalid { path: tmp.clone(), detail: e.to_string() })?;
    std::fs::write(tmp.join(INFO_FILE), json).map_err(io(&tmp))?;
    let old = dir.with_extension("old");
    remove_if_exists(&old)?;
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(io(dir))?;
    }
    std::fs::rename(&tmp, dir).map_err(io(dir))?;
    remove_if_exists(&old)?;
    Ok(started.elapsed())
}

/// Reads a partition's `CHECKPOINT.json`, if there is one.
pub fn read_info(paths: &StorePaths) -> Result<Option<CheckpointInfo>, CheckpointError> {
    let path = paths.checkpoint.join(INFO_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| CheckpointError::Invalid { path, detail: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CheckpointError::Io { path, source: e }),
    }
}

fn remove_if_exists(path: &Path) -> Result<(), CheckpointError> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CheckpointError::Io { path: path.to_owned(), source: e }),
        _ => Ok(()),
    }
}

/// Copies a snapshot's files (a flat directory) into `to`.
fn copy_dir(from: &Path, to: &Path) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(to).map_err(io(to))?;
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let target = to.join(entry.file_name());
        std::fs::copy(entry.path(), &target).map_err(io(&target))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::store::WindowStore;
    use crate::window::watermark::Watermark;

    /// A lost live store comes back from the checkpoint, position included.
    #[test]
    fn checkpoint_seeds_a_lost_store() {
        let dir = tempfile::tempdir().unwrap();
        let paths = StorePaths { live: dir.path().join("live"), checkpoint: dir.path().join("cp/p-0") };
        let res = StoreResources::new(16 << 20);
        {
            let (mut s, seeded) = open_store(&paths, &res).unwrap();
            assert!(!seeded);
            s.mark_seen("acme", "p1", 5).unwrap();
            s.put_watermark(&Watermark { current: 77, last_input_wall_ms: 0, last_input_watermark: 77 }).unwrap();
            s.commit(Some(12)).unwrap();
            write(&paths, &s, 0, 77).unwrap();
            s.mark_seen("acme", "p2", 6).unwrap(); // after the checkpoint
            s.commit(Some(15)).unwrap();
            write(&paths, &s, 0, 77).unwrap(); // replaces the first
        }
        let info = read_info(&paths).unwrap().unwrap();
        assert_eq!((info.partition, info.changelog_offset, info.watermark_ms), (0, Some(15), 77));
        std::fs::remove_dir_all(&paths.live).unwrap();
        let (mut s, seeded) = open_store(&paths, &res).unwrap();
        assert!(seeded);
        assert_eq!(s.changelog_position(), Some(15));
        assert!(s.seen("acme", "p1").unwrap() && s.seen("acme", "p2").unwrap());
        assert_eq!(s.load_watermark().unwrap().map(|w| w.current), Some(77));
    }
}
