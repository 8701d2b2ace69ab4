use super::*;
use std::os::unix::fs::MetadataExt;
use tempfile::NamedTempFile;

const MIB: u64 = 1 << 20;

fn backing_file(len: u64) -> NamedTempFile {
    let file = NamedTempFile::new().unwrap();
    file.as_file().set_len(len).unwrap();
    file
}

fn pattern(seed: u8, len: usize) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

async fn read_back(store: &BackingStore, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xAAu8; len];
    store.read(offset, &mut buf).await.unwrap();
    buf
}

#[tokio::test]
async fn writes_read_back_buffered_and_direct() {
    for direct_io in [false, true] {
        let file = backing_file(4 * MIB);
        let store = BackingStore::open(file.path(), 4 * MIB, BackingOptions { direct_io }).unwrap();
        let data = pattern(3, 64 * 1024);
        store.write(8192, data.clone(), false).await.unwrap();
        store.write(MIB, pattern(9, 4096), true).await.unwrap();
        store.flush().await.unwrap();
        assert_eq!(read_back(&store, 8192, data.len()).await, data);
        assert_eq!(read_back(&store, MIB, 4096).await, pattern(9, 4096));
        // The bytes are in the file itself, at the same offsets.
        let on_disk = std::fs::read(file.path()).unwrap();
        assert_eq!(&on_disk[8192..8192 + data.len()], &data[..]);
    }
}

#[tokio::test]
async fn unaligned_buffers_are_bounced_under_direct_io() {
    let file = backing_file(MIB);
    let store = BackingStore::open(file.path(), MIB, BackingOptions { direct_io: true }).unwrap();
    let data = pattern(5, 4096 + 1).slice(1..); // not 4 KiB aligned in memory
    store.write(4096, data.clone(), false).await.unwrap();
    let mut buf = vec![0u8; 4096 + 1];
    store.read(4096, &mut buf[1..]).await.unwrap();
    assert_eq!(&buf[1..], &data[..]);
}

#[tokio::test]
async fn many_concurrent_writes_all_land() {
    let file = backing_file(8 * MIB);
    let store = std::sync::Arc::new(
        BackingStore::open(file.path(), 8 * MIB, BackingOptions::default()).unwrap(),
    );
    let mut tasks = Vec::new();
    for i in 0..512u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.write(i * 16384, pattern(i as u8, 16384), false).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    for i in 0..512u64 {
        assert_eq!(
            read_back(&store, i * 16384, 16384).await,
            pattern(i as u8, 16384)
        );
    }
}

#[tokio::test]
async fn discard_punches_a_hole_that_reads_as_zeroes() {
    let file = backing_file(4 * MIB);
    let store = BackingStore::open(file.path(), 4 * MIB, BackingOptions::default()).unwrap();
    store
        .write(0, pattern(1, 4 * MIB as usize), false)
        .await
        .unwrap();
    store.flush().await.unwrap();
    let before = allocated_bytes(file.path());
    store.discard(MIB, 2 * MIB).await.unwrap();
    let after = allocated_bytes(file.path());
    assert!(after + 2 * MIB <= before, "allocation {before} -> {after}");
    assert!(read_back(&store, MIB, 2 * MIB as usize)
        .await
        .iter()
        .all(|&b| b == 0));
    // Neighbours are untouched.
    assert_eq!(
        read_back(&store, 0, MIB as usize).await,
        &pattern(1, 4 * MIB as usize)[..MIB as usize]
    );
}

#[tokio::test]
async fn write_zeroes_zeroes_the_range() {
    let file = backing_file(MIB);
    let store = BackingStore::open(file.path(), MIB, BackingOptions::default()).unwrap();
    store
        .write(0, pattern(2, MIB as usize), false)
        .await
        .unwrap();
    store.write_zeroes(4096, 8192).await.unwrap();
    let back = read_back(&store, 0, 16384).await;
    assert!(back[4096..12288].iter().all(|&b| b == 0));
    assert_eq!(&back[..4096], &pattern(2, 4096)[..]);
    assert_eq!(&back[12288..], &pattern(2, 16384)[12288..]);
}

#[tokio::test]
async fn requests_beyond_the_size_fail_and_change_nothing() {
    let file = backing_file(2 * MIB);
    // Serve only the first MiB of a 2 MiB file.
    let store = BackingStore::open(file.path(), MIB, BackingOptions::default()).unwrap();
    let err = store.write(MIB, pattern(1, 4096), false).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(store.write(100, pattern(1, 512), false).await.is_err());
    assert!(std::fs::read(file.path()).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn a_backing_smaller_than_the_configured_size_is_refused() {
    let file = backing_file(MIB);
    let err = BackingStore::open(file.path(), 2 * MIB, BackingOptions::default())
        .err()
        .unwrap();
    assert!(
        matches!(err, BackingError::TooSmall { actual, wanted, .. } if actual == MIB && wanted == 2 * MIB)
    );
    assert!(err.to_string().contains("smaller than the configured size"));
}

#[test]
fn a_missing_or_odd_backing_is_refused_with_its_path() {
    let err = BackingStore::open(
        Path::new("/nonexistent/vmsync.img"),
        MIB,
        BackingOptions::default(),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("/nonexistent/vmsync.img"));
    let dir = tempfile::tempdir().unwrap();
    let err = BackingStore::open(dir.path(), MIB, BackingOptions::default())
        .err()
        .unwrap();
    // A directory cannot be opened read-write at all; either way it is refused.
    assert!(err.to_string().contains(&dir.path().display().to_string()));
}

#[test]
fn only_operations_the_kernel_did_not_perform_are_resubmitted() {
    for transient in [-libc::EINTR, -libc::EAGAIN] {
        assert!(retry_transient(transient, 0));
        assert!(retry_transient(transient, TRANSIENT_RETRIES - 1));
        assert!(!retry_transient(transient, TRANSIENT_RETRIES), "bounded");
    }
    for other in [0, 4096, -libc::EIO, -libc::ENOSPC, -libc::EINVAL] {
        assert!(!retry_transient(other, 0), "{other}");
    }
}
