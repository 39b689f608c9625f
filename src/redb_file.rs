//! Opening redb files safely, shared by the store and the client outbox: path checks, the
//! redb signature check (a file that is not a redb database is refused before anything
//! opens it for writing), private file permissions, and redb's open errors mapped to ours.

use std::fs::OpenOptions;
use std::io::Read;
use std::path::Path;

use redb::DatabaseError;

use crate::error::{Error, Result};

/// redb's file signature (the first bytes of every redb file).
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

/// An I/O error about `path`, as [`Error::Storage`].
pub(crate) fn io_error(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::storage(format!("{what} {}", path.display()), e)
}

/// Maps an open error of redb to ours.
pub(crate) fn open_error(path: &Path, e: DatabaseError) -> Error {
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            Error::AlreadyOpen {
                path: path.to_owned(),
            }
        }
        DatabaseError::UpgradeRequired(v) => Error::IncompatibleFormat {
            reason: format!("redb file format {v} is not supported by this build"),
        },
        DatabaseError::Storage(redb::StorageError::Corrupted(reason)) => Error::corrupt(reason),
        other => Error::storage(format!("opening {}", path.display()), other),
    }
}

/// Checks that `path` can name a file (not a directory, its parent exists, not a dangling
/// symbolic link) and returns the length of the file there, `None` when there is none.
///
/// A symbolic link to an existing file is followed. A dangling one is refused rather than
/// followed to create a new store at its target: someone pointed the path at a file that is
/// missing now (an unmounted volume, a lost or moved store), and a new, empty store there
/// would forget every key, so every retry of a request would run it again. Nor is a new store
/// created beside the link in its place, which would silently replace the link. To start a
/// new store behind a link, open the target path itself once.
///
/// # Errors
/// [`Error::Storage`] for a directory, a missing parent, a dangling symbolic link or an I/O
/// failure.
pub(crate) fn existing_len(path: &Path) -> Result<Option<u64>> {
    if path.is_dir() {
        return Err(io_error(
            path,
            "opening",
            std::io::Error::other("the path is a directory; give a file path"),
        ));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        return Err(io_error(
            path,
            "opening",
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the parent directory does not exist; create it first",
            ),
        ));
    }
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some(m.len())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match dangling_target(path) {
            None => Ok(None),
            Some(target) => Err(io_error(
                path,
                "opening",
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "the path is a symbolic link to {}, which does not exist; no new store \
                         is created through a dangling link: restore the missing file, or open \
                         the target path itself to create a new store there",
                        target.display()
                    ),
                ),
            )),
        },
        Err(e) => Err(io_error(path, "inspecting", e)),
    }
}

/// The missing file a dangling symbolic link at `path` leads to (through a chain of links);
/// `None` when `path` is not a symbolic link.
fn dangling_target(path: &Path) -> Option<std::path::PathBuf> {
    let mut at = path.to_owned();
    let mut hops = 0;
    while let Ok(next) = std::fs::read_link(&at) {
        at = match at.parent() {
            Some(dir) => dir.join(next),
            None => next,
        };
        hops += 1;
        // As the kernel does, give up on a long chain (a loop); the start is still a link.
        if hops == 40 {
            break;
        }
    }
    (hops > 0).then_some(at)
}

/// Refuses a file that does not start with redb's signature, reading only its first bytes.
///
/// # Errors
/// [`Error::IncompatibleFormat`] (with `hint` appended) for another kind of file;
/// [`Error::Storage`] if it cannot be read.
pub(crate) fn require_redb(path: &Path, hint: &str) -> Result<()> {
    let mut head = [0u8; REDB_MAGIC.len()];
    let mut f = std::fs::File::open(path).map_err(|e| io_error(path, "reading", e))?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(io_error(path, "reading", e)),
        }
    }
    if n < head.len() || head != REDB_MAGIC {
        return Err(Error::IncompatibleFormat {
            reason: format!("the file is not a redb database{hint}"),
        });
    }
    Ok(())
}

/// Options for a file we write: read-write, and on Unix readable by the owner only (0600).
pub(crate) fn private_file_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
}
