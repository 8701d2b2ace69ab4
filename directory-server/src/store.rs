//! The directory's durable state, in a redb database under `state_dir`.
//!
//! Two tables:
//!
//! * `resources`: resource name → its [`ResourceState`] (JSON): term,
//!   primary, members and the last report's metadata.
//! * `bitmaps`: (resource name, node id) → the last report's staleness
//!   bitmap for that node, opaque: a 17-byte header (block size `u32`,
//!   number of bits `u64`, encoding `u8`, little-endian) and the encoded
//!   bits as the reporting node sent them. The directory never decodes them.
//!
//! Every update is one write transaction committed with immediate
//! durability (redb fsyncs before `commit` returns), so whatever the server
//! acknowledged after a [`Store::save`] survives a crash or SIGKILL.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const RESOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("resources");
const BITMAPS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("bitmaps");

/// The database file's name inside `state_dir`.
pub const DB_FILE: &str = "directory.redb";

const BITMAP_HEADER: usize = 4 + 8 + 1;

/// Everything the directory knows about one resource, but the bitmaps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceState {
    /// The newest term handed out (0: never).
    pub term: u64,
    /// The primary of `term`, if it has not demoted.
    pub primary: Option<u32>,
    /// Members by node id.
    pub members: BTreeMap<u32, Member>,
    /// The last report received (its bitmaps are in the `bitmaps` table).
    pub report: Option<ReportMeta>,
}

/// A node of the resource, as it last joined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// `IP:PORT` where the node listens.
    pub address: String,
    pub lan_group: String,
    /// Size of the node's copy, in bytes.
    pub size: u64,
}

/// The last report of a resource, without its bitmaps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportMeta {
    /// The reporting node (the primary of `term`).
    pub from: u32,
    pub term: u64,
    /// Generation ids: current, bitmap, history[0], history[1].
    pub generation: [u64; 4],
    /// The final report of a demotion.
    pub last: bool,
    /// When it was received, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The reporter's hot extents (activity log).
    pub hot_extents: Vec<u64>,
}

/// One node's bitmap of a report, stored as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBitmap {
    pub node_id: u32,
    pub block_size: u32,
    pub nbits: u64,
    pub encoding: u8,
    pub data: Bytes,
}

impl StoredBitmap {
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(BITMAP_HEADER + self.data.len());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.nbits.to_le_bytes());
        out.push(self.encoding);
        out.extend_from_slice(&self.data);
        out
    }

    fn from_bytes(node_id: u32, bytes: &[u8]) -> Result<Self, StoreError> {
        if bytes.len() < BITMAP_HEADER {
            return Err(StoreError::Corrupt(format!(
                "bitmap of node {node_id} has {} bytes, less than its header",
                bytes.len()
            )));
        }
        Ok(StoredBitmap {
            node_id,
            block_size: u32::from_le_bytes(bytes[0..4].try_into().unwrap()),
            nbits: u64::from_le_bytes(bytes[4..12].try_into().unwrap()),
            encoding: bytes[12],
            data: Bytes::copy_from_slice(&bytes[BITMAP_HEADER..]),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(Box<redb::Error>),
    #[error("corrupt state: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(Box::new(e.into()))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The database; cheap to clone. Its methods block (disk I/O, fsync).
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
}

impl Store {
    /// Opens (or creates) the database in `state_dir` (created if missing).
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(state_dir)?;
        let db = Database::create(state_dir.join(DB_FILE))?;
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate);
        txn.open_table(RESOURCES)?;
        txn.open_table(BITMAPS)?;
        txn.commit()?;
        Ok(Store { db: Arc::new(db) })
    }

    /// Every resource's state.
    pub fn load_all(&self) -> Result<BTreeMap<String, ResourceState>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RESOURCES)?;
        let mut all = BTreeMap::new();
        for item in table.iter()? {
            let (name, value) = item?;
            let state: ResourceState = serde_json::from_slice(value.value())
                .map_err(|e| StoreError::Corrupt(format!("resource '{}': {e}", name.value())))?;
            all.insert(name.value().to_string(), state);
        }
        Ok(all)
    }

    /// Commits `state` for `resource` and, if given, replaces all of the
    /// resource's bitmaps by `bitmaps`, in one durable transaction.
    pub fn save(
        &self,
        resource: &str,
        state: &ResourceState,
        bitmaps: Option<&[StoredBitmap]>,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_vec(state).expect("the state serializes");
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate);
        {
            let mut table = txn.open_table(RESOURCES)?;
            table.insert(resource, json.as_slice())?;
            if let Some(bitmaps) = bitmaps {
                let mut table = txn.open_table(BITMAPS)?;
                let old: Vec<u32> = table
                    .range((resource, 0u32)..=(resource, u32::MAX))?
                    .map(|item| item.map(|(k, _)| k.value().1))
                    .collect::<Result<_, _>>()?;
                for node in old {
                    table.remove((resource, node))?;
                }
                for bitmap in bitmaps {
                    table.insert((resource, bitmap.node_id), bitmap.to_bytes().as_slice())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// The bitmaps of `resource`'s last report, by node id.
    pub fn bitmaps(&self, resource: &str) -> Result<Vec<StoredBitmap>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(BITMAPS)?;
        let mut out = Vec::new();
        for item in table.range((resource, 0u32)..=(resource, u32::MAX))? {
            let (key, value) = item?;
            out.push(StoredBitmap::from_bytes(key.value().1, value.value())?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap(node_id: u32, data: &'static [u8]) -> StoredBitmap {
        StoredBitmap {
            node_id,
            block_size: 4096,
            nbits: 1 << 20,
            encoding: 0,
            data: Bytes::from_static(data),
        }
    }

    #[test]
    fn state_and_bitmaps_survive_reopening_and_reports_replace_bitmaps() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = ResourceState {
            term: 3,
            primary: Some(1),
            ..Default::default()
        };
        state.members.insert(
            1,
            Member {
                name: "desk".into(),
                address: "127.0.0.1:7790".into(),
                lan_group: "home".into(),
                size: 1 << 30,
            },
        );
        state.report = Some(ReportMeta {
            from: 1,
            term: 3,
            generation: [1, 2, 3, 4],
            last: false,
            time_ms: 5,
            hot_extents: vec![7, 9],
        });
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .save("a", &state, Some(&[bitmap(0, b"x"), bitmap(2, b"yy")]))
                .unwrap();
            store.save("b", &ResourceState::default(), None).unwrap();
            // A later report replaces every bitmap of "a" only.
            store.save("a", &state, Some(&[bitmap(1, b"")])).unwrap();
            store
                .save("b", &ResourceState::default(), Some(&[bitmap(5, b"b")]))
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let all = store.load_all().unwrap();
        assert_eq!(all["a"], state);
        assert_eq!(all["b"], ResourceState::default());
        assert_eq!(store.bitmaps("a").unwrap(), vec![bitmap(1, b"")]);
        assert_eq!(store.bitmaps("b").unwrap(), vec![bitmap(5, b"b")]);
        assert!(store.bitmaps("c").unwrap().is_empty());
    }
}
