//! Who held the newest version of every block at the last handover, kept
//! on disk beside the metadata (`<metadata>.holders`).
//!
//! A node that took over from another primary fetches each block it lacks
//! from a node that held the newest version then (see `handover`). Its
//! peers' bitmaps cannot say that any more once they have grown by what
//! is only resynced to be safe (activity-log extents after a crash, what a
//! joining peer reports), so the handover's view is kept apart, and on
//! disk: a primary that crashes in the middle of its background sync and
//! is promoted again still knows where to fetch from.
//!
//! File: `MAGIC`, a `u32` count, then per node its id, a `u32` length and
//! `Bitmap::encode()` bytes, then the BLAKE3 of everything before. Written
//! to a temporary file, synced and renamed, so it is whole or absent.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockdev::meta::Bitmap;

const MAGIC: &[u8; 8] = b"VMSHOLD1";

/// The file kept beside the metadata at `metadata`.
pub fn path_for(metadata: &Path) -> PathBuf {
    let mut name = metadata.as_os_str().to_owned();
    name.push(".holders");
    PathBuf::from(name)
}

/// Durably replaces the file with `holders` (node id → blocks it lacked).
pub fn save(path: &Path, holders: &BTreeMap<u32, Arc<Bitmap>>) -> io::Result<()> {
    let mut out = Vec::from(&MAGIC[..]);
    out.extend_from_slice(&(holders.len() as u32).to_le_bytes());
    for (id, bitmap) in holders {
        let encoded = bitmap.encode();
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
        out.extend_from_slice(&encoded);
    }
    let checksum = blake3::hash(&out);
    out.extend_from_slice(checksum.as_bytes());
    let tmp = path.with_extension("holders.tmp");
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&out)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Reads the file back for bitmaps of `nbits` bits of `block_size` bytes.
/// `None` when there is none, or it is damaged or of another geometry
/// (logged): the caller then falls back to the peers' bitmaps, which only
/// name fewer holders, never a wrong one.
pub fn load(path: &Path, nbits: u64, block_size: u32) -> Option<BTreeMap<u32, Arc<Bitmap>>> {
    let data = match std::fs::read(path) {
        Ok(data) => data,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the handover's holders");
            return None;
        }
    };
    match parse(&data, nbits, block_size) {
        Ok(holders) => Some(holders),
        Err(why) => {
            tracing::warn!(path = %path.display(), why, "ignoring a damaged holders file");
            None
        }
    }
}

fn parse(data: &[u8], nbits: u64, block_size: u32) -> Result<BTreeMap<u32, Arc<Bitmap>>, String> {
    let body_len = data
        .len()
        .checked_sub(32)
        .ok_or("shorter than its checksum")?;
    let (body, checksum) = data.split_at(body_len);
    if blake3::hash(body).as_bytes() != checksum {
        return Err("bad checksum".into());
    }
    let mut rest = body.strip_prefix(&MAGIC[..]).ok_or("bad magic")?;
    let mut take = |n: usize| -> Result<&[u8], String> {
        if rest.len() < n {
            return Err("truncated".into());
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let u32_at = |bytes: &[u8]| u32::from_le_bytes(bytes.try_into().expect("4 bytes"));
    let count = u32_at(take(4)?);
    let mut holders = BTreeMap::new();
    for _ in 0..count {
        let id = u32_at(take(4)?);
        let len = u32_at(take(4)?) as usize;
        let bitmap = Bitmap::decode(nbits, block_size, take(len)?).map_err(|e| e.to_string())?;
        holders.insert(id, Arc::new(bitmap));
    }
    Ok(holders)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_round_trip_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("r.meta"));
        assert!(load(&path, 1000, 4096).is_none());
        let a = Arc::new(Bitmap::new(1000, 4096));
        a.set_range(10, 90);
        let b = Arc::new(Bitmap::new(1000, 4096));
        b.set_all();
        let holders = BTreeMap::from([(2, a), (3, b)]);
        save(&path, &holders).unwrap();
        let back = load(&path, 1000, 4096).expect("saved");
        assert_eq!(back.len(), 2);
        assert_eq!(back[&2].count_ones(), 90);
        assert!(back[&2].test(10) && !back[&2].test(9) && !back[&2].test(100));
        assert_eq!(back[&3].count_ones(), 1000);
        // Another geometry, a flipped byte: not used.
        assert!(load(&path, 2000, 4096).is_none());
        let mut data = std::fs::read(&path).unwrap();
        data[12] ^= 1;
        std::fs::write(&path, &data).unwrap();
        assert!(load(&path, 1000, 4096).is_none());
    }
}
