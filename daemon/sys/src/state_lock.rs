//! One daemon per state dir: an exclusive `flock` on `<state dir>/berthd.lock`, taken before
//! anything else at start-up and held for the daemon's whole life. The file holds the holder's
//! pid, so that a second daemon can say whose the state dir is. The lock is the kernel's: it
//! goes with the process, however that ends, and no stale file ever blocks a start.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Name of the lock file in the state dir.
pub const LOCK_FILE: &str = "berthd.lock";

/// Why the state dir could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("state dir {dir} is in use by {holder}")]
    InUse { dir: PathBuf, holder: String },
    #[error("state dir {dir}: lock {path}: {source}")]
    Io {
        dir: PathBuf,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The held lock of a state dir; dropping it lets the next daemon in.
#[derive(Debug)]
pub struct StateDirLock {
    _file: File,
}

/// Who holds a lock file, from what it says (a pid, written by the holder once it had the lock).
pub fn describe_holder(content: &str) -> String {
    match content.trim().parse::<u32>() {
        Ok(pid) => format!("berthd pid {pid}"),
        // The holder is between taking the lock and writing its pid, or is an older daemon.
        Err(_) => "another berthd (its pid is not recorded)".to_owned(),
    }
}

impl StateDirLock {
    /// Takes the state dir `dir` (which must exist) for this process, or says who has it.
    /// Never waits. The file is close-on-exec: no child (a zygote, a shim) inherits the lock.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            dir: dir.to_path_buf(),
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock on an fd this function owns; LOCK_NB makes it return at once.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut content = String::new();
                let _ = file.read_to_string(&mut content);
                return Err(LockError::InUse {
                    dir: dir.to_path_buf(),
                    holder: describe_holder(&content),
                });
            }
            return Err(io(err));
        }
        // Best effort: the lock holds without it (a full disk must not stop a start here).
        let pid = std::process::id();
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{pid}"));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "pid not written into the lock file");
        }
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_are_named_by_pid() {
        assert_eq!(describe_holder("4242\n"), "berthd pid 4242");
        assert_eq!(
            describe_holder(""),
            "another berthd (its pid is not recorded)"
        );
    }

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let d = tempfile::tempdir().unwrap();
        let first = StateDirLock::acquire(d.path()).unwrap();
        // flock conflicts between two opens of the file, even in one process.
        let e = StateDirLock::acquire(d.path()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "state dir {} is in use by berthd pid {}",
                d.path().display(),
                std::process::id()
            )
        );
        drop(first);
        let _again = StateDirLock::acquire(d.path()).unwrap();
    }
}
