//! File-backed tests of [`Metadata`] and the [`ActivityLog`].

mod activity_log;
mod grow;
mod open;

use std::path::PathBuf;

use tempfile::TempDir;

use super::{CreateParams, Expect, Metadata, EXTENT_SIZE};

/// A metadata file in a temporary directory.
struct Fixture {
    _dir: TempDir,
    path: PathBuf,
    params: CreateParams,
}

/// 16 extents, 3 node slots, this node is 1, AL of 4 extents in a ring of 4.
fn small_params() -> CreateParams {
    CreateParams {
        al_slots: 4,
        al_ring_sectors: 4,
        ..CreateParams::new("work-vm", 16 * EXTENT_SIZE, 1, 3)
    }
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with(small_params())
    }

    fn with(params: CreateParams) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("work-vm.meta");
        Metadata::create(&path, &params, false).unwrap();
        Fixture {
            _dir: dir,
            path,
            params,
        }
    }

    fn expect(&self) -> Expect {
        Expect {
            block_size: self.params.block_size,
            ..Expect::new(
                self.params.resource.clone(),
                self.params.device_size,
                self.params.node_id,
            )
        }
    }

    fn open(&self) -> Metadata {
        Metadata::open(&self.path, &self.expect()).unwrap()
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }

    fn patch(&self, offset: usize, f: impl FnOnce(&mut u8)) {
        let mut bytes = self.bytes();
        f(&mut bytes[offset]);
        std::fs::write(&self.path, bytes).unwrap();
    }
}
