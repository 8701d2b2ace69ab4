//! STUB: replaced by the `dir` branch.
#![allow(dead_code, unused_variables)]
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::replication::transport::{Connection, LocalIdentity};

pub struct Member {
    pub name: String,
    pub address: SocketAddr,
    pub lan_group: String,
    pub size: u64,
}
pub struct DirectoryClient {
    addr: SocketAddr,
}
pub struct DirInfo {
    pub term: u64,
    pub primary: Option<u32>,
}
pub struct Report {
    pub term: u64,
    pub generation: protocol::GenerationIds,
    pub last: bool,
    pub hot_extents: Vec<u64>,
    pub bitmaps: Vec<(u32, Arc<blockdev::meta::Bitmap>)>,
}
pub struct Grant {
    pub term: u64,
    pub overridden: bool,
    pub prev: Option<PrevReport>,
}
pub struct PrevReport {
    pub primary: u32,
    pub term: u64,
    pub generation: protocol::GenerationIds,
    pub last: bool,
    pub age: Duration,
    pub hot_extents: Vec<u64>,
    pub bitmaps: BTreeMap<u32, blockdev::meta::Bitmap>,
}
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("refused: {0}")]
    Refused(String),
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("protocol: {0}")]
    Protocol(String),
}
impl DirectoryClient {
    pub fn new(directory: SocketAddr, identity: LocalIdentity, me: Member) -> Self {
        DirectoryClient { addr: directory }
    }
    pub async fn info(&self) -> Result<DirInfo, DirError> {
        Err(DirError::Unreachable("stub".into()))
    }
    pub async fn promote(
        &self,
        force: bool,
        nbits: u64,
        block_size: u32,
    ) -> Result<Grant, DirError> {
        Err(DirError::Unreachable("stub".into()))
    }
    pub async fn report(&self, report: &Report) -> Result<DirInfo, DirError> {
        Err(DirError::Unreachable("stub".into()))
    }
}
pub async fn answer_demote<F, Fut>(conn: Connection, demote: F) -> Result<(), DirError>
where
    F: FnOnce(bool, u64) -> Fut,
    Fut: std::future::Future<Output = Result<Report, String>>,
{
    Err(DirError::Unreachable("stub".into()))
}
