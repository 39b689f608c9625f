//! Opening redb files safely, shared by the store and the client outbox: path checks, the
//! redb signature check (a file that is not a redb database is refused before anything
//! opens it for writing), private file permissions, redb's open errors mapped to ours, and
//! the identity of an open store's file ([`FileIdentity`]).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

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

/// The file a store opened, to check after each commit that its path still names it.
///
/// A store's file can be unlinked, or replaced by another file renamed over its path, while
/// the store has it open. The store's writes then go on into the old file, which no one will
/// open again: the next `open` of the path finds another file or none, and would grant again
/// the very keys this store holds. So after every commit, before any caller of the batch is
/// answered, [`FileIdentity::check`] looks the path up again (one `stat`, which follows
/// symbolic links as the open did) and compares device and inode with the file's own.
///
/// Cost: one lookup per commit, shared by every operation of the batch. On Linux it is a
/// `statx` that asks for the inode alone: a plain `stat` also reads the file's timestamps,
/// and a file whose timestamps were read gets them updated by its next write, which made
/// every commit pay for an extra journal write (BENCHMARKS.md has the measurement). The
/// `statx` costs no measurable time. Other Unix systems use `stat`.
///
/// The path is made absolute when the store opens, so a later change of the process's
/// working directory does not move it. Only Unix has a stable file identity in `std`; on
/// other systems the check passes (and Windows does not let an open file be replaced anyway).
#[derive(Debug)]
pub(crate) struct FileIdentity {
    path: PathBuf,
    #[cfg(unix)]
    id: (u64, u64),
}

impl FileIdentity {
    /// The identity of `file`, just opened at `path`.
    ///
    /// # Errors
    /// [`Error::Storage`] if the file's metadata or the working directory cannot be read.
    pub(crate) fn of(path: &Path, file: &File) -> Result<FileIdentity> {
        let absolute = std::path::absolute(path).map_err(|e| io_error(path, "resolving", e))?;
        // The path names the file just opened; read as every later check will read it.
        #[cfg(target_os = "linux")]
        let id = {
            let _ = file;
            inode_of(&absolute).map_err(|e| io_error(path, "inspecting", e))?
        };
        #[cfg(all(unix, not(target_os = "linux")))]
        let id = {
            use std::os::unix::fs::MetadataExt;
            let m = file
                .metadata()
                .map_err(|e| io_error(path, "inspecting", e))?;
            (m.dev(), m.ino())
        };
        #[cfg(not(unix))]
        let _ = file;
        Ok(FileIdentity {
            path: absolute,
            #[cfg(unix)]
            id,
        })
    }

    /// Checks that the path still names the file the store opened. Called after a commit:
    /// on `Err` the commit went into a file no one will open again, its callers must not be
    /// told it succeeded, and the store must refuse further writes until it is reopened.
    /// A path that cannot be looked up (other than missing) fails the check too: the file
    /// cannot be shown to be ours.
    ///
    /// # Errors
    /// [`Error::Storage`] (an unknown outcome) when the file was removed or replaced.
    pub(crate) fn check(&self) -> Result<()> {
        #[cfg(unix)]
        {
            #[cfg(target_os = "linux")]
            let found = inode_of(&self.path);
            #[cfg(not(target_os = "linux"))]
            let found = std::fs::metadata(&self.path).map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.dev(), m.ino())
            });
            let what = match found {
                Ok(id) if id == self.id => return Ok(()),
                Ok(_) => "was replaced by another file".to_owned(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => "was removed".to_owned(),
                Err(e) => format!("can no longer be looked up ({e})"),
            };
            tracing::error!(
                path = %self.path.display(),
                "the store's file {what} while the store had it open; the last write went into \
                 a file no one will open again, its callers get an error (unknown outcome) and \
                 the store refuses writes: close it and open the path again"
            );
            Err(Error::write_failed(
                format!(
                    "committing a write: {} {what} while the store had it open, so the write \
                     went into a file no one will open again",
                    self.path.display()
                ),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("the store's file {what}"),
                ),
            ))
        }
        #[cfg(not(unix))]
        Ok(())
    }
}

/// Device and inode of the file at `path`, following symbolic links, read with a `statx`
/// that asks for nothing else (no timestamps: see [`FileIdentity`]).
#[cfg(target_os = "linux")]
fn inode_of(path: &Path) -> std::io::Result<(u64, u64)> {
    use rustix::fs::{AtFlags, CWD, StatxFlags, statx};
    let st = statx(CWD, path, AtFlags::empty(), StatxFlags::INO)?;
    let dev = (u64::from(st.stx_dev_major) << 32) | u64::from(st.stx_dev_minor);
    Ok((dev, st.stx_ino))
}
