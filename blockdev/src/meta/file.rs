//! The locked metadata file, with positioned I/O whose errors name the file.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::MetaError;

/// The metadata file, exclusively `flock`ed for as long as it is open, so
/// that two daemons (or `create-md` next to a running daemon) never write the
/// same metadata. All I/O is positioned (`pread`/`pwrite`), so one handle is
/// shared by every thread.
pub(crate) struct MetaFile {
    file: Flock<File>,
    path: PathBuf,
}

impl MetaFile {
    /// Opens and locks an existing file. Opening and locking write nothing.
    pub(crate) fn open(path: &Path) -> Result<MetaFile, MetaError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| io_error(path, "open", source))?;
        Self::lock(file, path)
    }

    /// Opens and locks the file, creating it if missing; also returns
    /// whether it was created.
    pub(crate) fn open_or_create(path: &Path) -> Result<(MetaFile, bool), MetaError> {
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        match options.clone().create_new(true).open(path) {
            Ok(file) => return Ok((Self::lock(file, path)?, true)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_error(path, "create", e)),
        }
        let file = options
            .open(path)
            .map_err(|source| io_error(path, "open", source))?;
        Ok((Self::lock(file, path)?, false))
    }

    fn lock(file: File, path: &Path) -> Result<MetaFile, MetaError> {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(file) => Ok(MetaFile {
                file,
                path: path.to_owned(),
            }),
            Err((_, Errno::EWOULDBLOCK)) => Err(MetaError::Locked {
                path: path.to_owned(),
            }),
            Err((_, errno)) => Err(io_error(path, "lock", errno.into())),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn error(&self, op: &'static str, source: io::Error) -> MetaError {
        io_error(&self.path, op, source)
    }

    pub(crate) fn read_at(
        &self,
        buf: &mut [u8],
        offset: u64,
        op: &'static str,
    ) -> Result<(), MetaError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.error(op, e))
    }

    pub(crate) fn write_at(
        &self,
        buf: &[u8],
        offset: u64,
        op: &'static str,
    ) -> Result<(), MetaError> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.error(op, e))
    }

    /// `fdatasync`: makes every completed write durable.
    pub(crate) fn sync(&self, op: &'static str) -> Result<(), MetaError> {
        self.file.sync_data().map_err(|e| self.error(op, e))
    }

    /// Size in bytes; works for block devices too (where `metadata().len()`
    /// is 0).
    pub(crate) fn len(&self) -> Result<u64, MetaError> {
        (&*self.file)
            .seek(SeekFrom::End(0))
            .map_err(|e| self.error("determine size", e))
    }

    pub(crate) fn is_regular_file(&self) -> Result<bool, MetaError> {
        let metadata = self.file.metadata().map_err(|e| self.error("stat", e))?;
        Ok(metadata.file_type().is_file())
    }

    /// Truncates or extends a regular file to `len` bytes.
    pub(crate) fn set_len(&self, len: u64) -> Result<(), MetaError> {
        self.file.set_len(len).map_err(|e| self.error("resize", e))
    }

    /// Makes the file's directory entry durable after creating it.
    pub(crate) fn sync_parent_dir(&self) -> Result<(), MetaError> {
        let parent = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        File::open(parent)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| self.error("sync parent directory", e))
    }
}

impl std::fmt::Debug for MetaFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MetaFile").field(&self.path).finish()
    }
}

fn io_error(path: &Path, op: &'static str, source: io::Error) -> MetaError {
    MetaError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}
