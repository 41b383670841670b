//! Who this replica is: a process id kept in its state dir, stable across restarts
//! (like Kafka Streams' process id), from which the stage threads' transactional ids
//! derive. A restarted replica so fences its previous incarnation's open transaction at
//! start. Each transactional id is held by one live process at a time: a lock file in
//! the state dir refuses a second process on the same state dir, which would otherwise
//! fence the first one and be fenced back, without end.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The file holding the process id, in the state dir.
const PROCESS_ID_FILE: &str = "process.id";

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("state dir file {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("state dir {path} holds a process id that is not one: {found:?} (delete the file to get a new one)")]
    BadProcessId { path: PathBuf, found: String },
    #[error("{name} is held by another running pulses process on state dir {dir}; give each replica its own --state-dir")]
    InUse { name: String, dir: PathBuf },
}

/// The transactional id of `stage`'s thread in this replica
/// (`<application_id>-<stage>-<process id>`), held by this process while the returned
/// [`Claim`] lives.
pub fn transactional_id(cfg: &crate::config::Config, stage: &str) -> Result<(String, Claim), InstanceError> {
    let id = transactional_id_of(&cfg.application_id, stage, process_id(&cfg.state_dir)?);
    let claim = claim(&cfg.state_dir, &id)?;
    Ok((id, claim))
}

/// The transactional id of `stage`'s producer in the replica whose process id is
/// `process_id`: `<application_id>-<stage>-<process_id>`.
pub fn transactional_id_of(application_id: &str, stage: &str, process_id: impl std::fmt::Display) -> String {
    format!("{application_id}-{stage}-{process_id}")
}

/// A name held by this process until dropped ([`claim`]).
#[derive(Debug)]
pub struct Claim {
    _lock: File,
}

/// This replica's process id: read from `<state_dir>/process.id`, created (a random
/// UUID) the first time.
pub fn process_id(state_dir: &Path) -> Result<String, InstanceError> {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstanceError + '_ {
        move |source| InstanceError::Io { path: path.to_owned(), source }
    }
    let path = state_dir.join(PROCESS_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            match uuid::Uuid::parse_str(id) {
                Ok(_) => Ok(id.to_owned()),
                Err(_) => Err(InstanceError::BadProcessId { path, found: id.to_owned() }),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
            let id = uuid::Uuid::new_v4().to_string();
            // Written whole under a name of its own, then linked into place: a crash
            // leaves no half id behind, and of two threads (or processes) creating it
            // at once, one wins and the other reads the winner's id.
            let tmp = state_dir.join(format!("{PROCESS_ID_FILE}.{id}.tmp"));
            let mut f = File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(format!("{id}\n").as_bytes()).and_then(|()| f.sync_all()).map_err(io(&tmp))?;
            let linked = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {
                    tracing::info!(process_id = %id, path = %path.display(), "new process id for this state dir");
                    Ok(id)
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => process_id(state_dir),
                Err(e) => Err(io(&path)(e)),
            }
        }
        Err(e) => Err(io(&path)(e)),
    }
}

/// Holds `name` (a transactional id) for this process: refused while another live
/// process on `state_dir` holds it. Released when the [`Claim`] is dropped or the
/// process dies (the operating system drops the lock).
pub fn claim(state_dir: &Path, name: &str) -> Result<Claim, InstanceError> {
    let dir = state_dir.join("locks");
    std::fs::create_dir_all(&dir).map_err(|source| InstanceError::Io { path: dir.clone(), source })?;
    let path = dir.join(format!("{name}.lock"));
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| InstanceError::Io { path: path.clone(), source })?;
    match file.try_lock() {
        Ok(()) => Ok(Claim { _lock: file }),
        Err(TryLockError::WouldBlock) => Err(InstanceError::InUse { name: name.to_owned(), dir: state_dir.to_owned() }),
        Err(TryLockError::Error(source)) => Err(InstanceError::Io { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_id_is_created_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let first = process_id(dir.path()).unwrap();
        assert!(uuid::Uuid::parse_str(&first).is_ok());
        assert_eq!(process_id(dir.path()).unwrap(), first);
        std::fs::write(dir.path().join(PROCESS_ID_FILE), "garbage").unwrap();
        assert!(matches!(process_id(dir.path()), Err(InstanceError::BadProcessId { .. })));
    }

    #[test]
    fn threads_creating_the_process_id_at_once_agree_on_one() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<String> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..8).map(|_| s.spawn(|| process_id(dir.path()).unwrap())).collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, [PROCESS_ID_FILE], "no temporary files left");
    }

    #[test]
    fn a_name_is_held_by_one_claim_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let held = claim(dir.path(), "app-group-x").unwrap();
        assert!(matches!(claim(dir.path(), "app-group-x"), Err(InstanceError::InUse { .. })));
        assert!(claim(dir.path(), "app-aggregate-x").is_ok(), "another name is free");
        drop(held);
        assert!(claim(dir.path(), "app-group-x").is_ok(), "free again once dropped");
    }
}
