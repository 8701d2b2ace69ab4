//! The one error type of the metadata module.
//!
//! Every variant that concerns the metadata file names it, because the
//! operator reading the message usually has several resources (and so several
//! metadata files) on one machine.

use std::io;
use std::path::PathBuf;

/// Errors from creating, opening, using or decoding vmsync metadata.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// A system call on the metadata file failed.
    #[error("metadata {}: {op} failed: {source}", .path.display())]
    Io {
        path: PathBuf,
        /// What was being done, e.g. "write superblock".
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// Another process (normally another `vmsyncd`) holds the file's lock.
    #[error("metadata {} is in use by another process", .path.display())]
    Locked { path: PathBuf },

    /// `create` found something in the file and was not told to overwrite it.
    #[error(
        "{} already holds {what}; refusing to overwrite it without --force",
        .path.display()
    )]
    Exists { path: PathBuf, what: String },

    /// Neither superblock copy starts with the vmsync metadata magic.
    #[error(
        "{} is not vmsync metadata (bad magic in both superblock copies: \
         other data, or both copies overwritten)",
        .path.display()
    )]
    BadMagic { path: PathBuf },

    /// Neither superblock copy is usable (checksum mismatch, torn write,
    /// impossible fields); `copies` says what is wrong with each.
    #[error(
        "metadata {}: no valid superblock, both copies are damaged ({copies}); \
         refusing to use it",
        .path.display()
    )]
    NoValidSuperblock { path: PathBuf, copies: String },

    /// Both superblock copies are valid but describe different replicas.
    #[error(
        "metadata {}: the two superblock copies disagree about the replica \
         (copy 0: {first}; copy 1: {second}); refusing to guess",
        .path.display()
    )]
    ConflictingSuperblocks {
        path: PathBuf,
        first: String,
        second: String,
    },

    /// The superblock was written by an incompatible version of vmsync.
    #[error(
        "metadata {} has format version {found}; this vmsync supports version {supported}",
        .path.display()
    )]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    /// The superblock checksum is fine but a field holds an impossible value.
    #[error("metadata {}: invalid superblock: {reason}", .path.display())]
    Corrupt { path: PathBuf, reason: String },

    /// The file is shorter than the geometry in its superblock requires.
    #[error(
        "metadata {} is {found} bytes long but its geometry needs {needed} bytes",
        .path.display()
    )]
    Truncated {
        path: PathBuf,
        found: u64,
        needed: u64,
    },

    #[error(
        "metadata {} belongs to resource '{found}', configuration says '{expected}'",
        .path.display()
    )]
    ResourceMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },

    #[error(
        "metadata {} is for a device of {found} bytes, configuration says {expected} bytes",
        .path.display()
    )]
    SizeMismatch {
        path: PathBuf,
        found: u64,
        expected: u64,
    },

    #[error(
        "metadata {} belongs to node id {found}, configuration says node id {expected}",
        .path.display()
    )]
    NodeIdMismatch {
        path: PathBuf,
        found: u32,
        expected: u32,
    },

    #[error(
        "metadata {} uses a block size of {found} bytes, configuration says {expected} bytes",
        .path.display()
    )]
    BlockSizeMismatch {
        path: PathBuf,
        found: u32,
        expected: u32,
    },

    /// Parameters given to `create` (or to a bitmap constructor) are unusable.
    #[error("invalid metadata parameters: {0}")]
    InvalidParams(String),

    /// A term lower than the stored one would undo fencing of old primaries.
    #[error("metadata {}: refusing to lower the term from {current} to {requested}", .path.display())]
    TermRegression {
        path: PathBuf,
        current: u64,
        requested: u64,
    },

    /// An encoded bitmap (from the network) is malformed.
    #[error("malformed bitmap encoding: {0}")]
    BadEncoding(&'static str),

    /// Two bitmaps of different sizes were combined.
    #[error("bitmap size mismatch: {left} bits vs {right} bits")]
    BitmapSizeMismatch { left: u64, right: u64 },

    /// An I/O range lies (partly) outside the device.
    #[error(
        "range of {count} extents at extent {first} lies outside the device ({extents} extents)"
    )]
    ExtentOutOfRange {
        first: u64,
        count: u64,
        extents: u64,
    },

    /// One request spans more extents than the activity log can hold at once.
    #[error("request spans {count} extents but the activity log holds only {capacity}")]
    TooManyExtents { count: u64, capacity: u64 },

    /// The activity log was closed by `Metadata::mark_clean`.
    #[error("metadata {}: activity log is closed (metadata marked clean)", .path.display())]
    AlClosed { path: PathBuf },

    /// An earlier activity-log write failed; the on-disk state is uncertain.
    #[error("metadata {}: activity log disabled after an earlier write error", .path.display())]
    AlFailed { path: PathBuf },

    /// `mark_clean` was called while writes still hold activity-log extents.
    #[error("metadata {}: cannot mark clean, {inflight} writes still in flight", .path.display())]
    Busy { path: PathBuf, inflight: u64 },
}
