//! Content hashes: the one-line check that two replicas, or a replica and a
//! model, hold the same bytes.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use blockdev::blocksock::BlockClient;

/// Bytes hashed per read; large to keep the number of requests low.
const CHUNK: usize = 4 << 20;

/// BLAKE3 of the first `len` bytes of the file (a backing image). Panics,
/// naming the file, if it cannot be read or is shorter than `len`.
pub fn blake3_of_file(path: &Path, len: u64) -> blake3::Hash {
    let file = File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut hasher = blake3::Hasher::new();
    let copied = io::copy(&mut file.take(len), &mut hasher)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert_eq!(
        copied,
        len,
        "{} is shorter than {len} bytes",
        path.display()
    );
    hasher.finalize()
}

/// BLAKE3 of the first `size` bytes of the device behind `client`, as a
/// guest would read it. Errors are returned, not panicked on, because tests
/// also probe devices that are expected to fail.
pub async fn blake3_of_device_via_client(
    client: &BlockClient,
    size: u64,
) -> io::Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(CHUNK as u64);
        let data = client.read(offset, len as usize).await?;
        hasher.update(&data);
        offset += len;
    }
    Ok(hasher.finalize())
}
