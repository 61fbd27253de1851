//! Who may write the store: the daemon, or offline commands when it can be proven down.
//!
//! The daemon holds an exclusive advisory lock (`flock`) on a file next to the store for its
//! whole life; the kernel releases it when the process dies, however it dies. An offline
//! command takes the same lock shared: it gets it only when no daemon holds it, and several
//! offline commands hold it at once (the store's transactions order them), while a daemon
//! cannot start until they are done.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// A daemon (or, for a daemon, another daemon or an offline command) holds it.
    #[error("{} is held by {holder}", path.display())]
    Held {
        /// The lock file.
        path: PathBuf,
        /// What holds it: `a daemon` or `an offline command`.
        holder: &'static str,
    },
    #[error("cannot open the lock file {}: {source}", path.display())]
    /// The lock file could not be opened.
    Io {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A held store lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

/// The lock file of the store at `store`: `<store>.lock`.
pub fn lock_path(store: &Path) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

fn open(path: &Path) -> Result<File, LockError> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|source| LockError::Io { path: path.to_path_buf(), source })
}

impl StoreLock {
    /// The daemon's lock, exclusive for its life. Waits up to `patience` for offline commands
    /// (which hold it briefly) to finish; another daemon holds it for good.
    pub fn daemon(store: &Path, patience: Duration) -> Result<StoreLock, LockError> {
        let path = lock_path(store);
        let file = open(&path)?;
        let deadline = Instant::now() + patience;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(StoreLock { _file: file }),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(LockError::Held { path, holder: "another lockstep daemon or an offline command" });
                }
                Err(TryLockError::Error(source)) => return Err(LockError::Io { path, source }),
            }
        }
    }

    /// An offline command's lock, shared with other offline commands; refused at once while a
    /// daemon runs: proof that it is down for as long as this lock is held.
    pub fn offline(store: &Path) -> Result<StoreLock, LockError> {
        let path = lock_path(store);
        let file = open(&path)?;
        match file.try_lock_shared() {
            Ok(()) => Ok(StoreLock { _file: file }),
            Err(TryLockError::WouldBlock) => Err(LockError::Held { path, holder: "the running lockstep daemon" }),
            Err(TryLockError::Error(source)) => Err(LockError::Io { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_commands_share_the_lock_and_exclude_the_daemon_and_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("lockstep.db");
        let first = StoreLock::offline(&store).unwrap();
        let second = StoreLock::offline(&store).unwrap();
        let refused = StoreLock::daemon(&store, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(refused, LockError::Held { .. }), "{refused}");
        drop((first, second));
        let daemon = StoreLock::daemon(&store, Duration::ZERO).unwrap();
        let refused = StoreLock::offline(&store).unwrap_err();
        assert!(refused.to_string().contains("running lockstep daemon"), "{refused}");
        assert!(
            matches!(StoreLock::daemon(&store, Duration::ZERO), Err(LockError::Held { .. })),
            "one daemon per store"
        );
        drop(daemon);
        StoreLock::offline(&store).unwrap();
    }
}
