//! STUB (pass-through) of the on-demand fetch layer; replaced by the real
//! implementation from the `lazy` branch.
#![allow(dead_code, unused_variables)]

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::device::BlockDevice;
use crate::meta::Bitmap;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub enum Fetched {
    Data(Bytes),
    Same,
}

pub trait BlockSource: Send + Sync + 'static {
    fn fetch(
        &self,
        offset: u64,
        len: u64,
        local_hash: Option<[u8; 32]>,
    ) -> BoxFuture<'_, io::Result<Fetched>>;
}

pub type PersistStale = Arc<dyn Fn(std::ops::Range<u64>) -> io::Result<()> + Send + Sync>;

#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    pub rate: u64,
    pub hot_extents: Vec<u64>,
    pub chunk: u64,
    pub concurrency: usize,
}

#[derive(Debug, Clone, Default)]
pub struct SyncStats {
    pub running: bool,
    pub stale_bytes: u64,
    pub fetched_bytes: u64,
    pub same_bytes: u64,
    pub on_demand_fetches: u64,
    pub rate_bytes_per_sec: u64,
    pub eta_seconds: Option<u64>,
    pub last_error: Option<String>,
}

pub struct LazyDevice<D: BlockDevice> {
    inner: Arc<D>,
    stale: Arc<Bitmap>,
}

impl<D: BlockDevice> LazyDevice<D> {
    pub fn new(
        inner: Arc<D>,
        stale: Arc<Bitmap>,
        persist: PersistStale,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        LazyDevice { inner, stale }
    }
    pub fn inner(&self) -> &Arc<D> {
        &self.inner
    }
    pub fn stale_bitmap(&self) -> &Arc<Bitmap> {
        &self.stale
    }
    pub fn activate(&self, source: Arc<dyn BlockSource>) {}
    pub async fn deactivate(&self) {}
    pub fn is_active(&self) -> bool {
        false
    }
    pub fn needs_fetch(&self, offset: u64, len: u64) -> bool {
        false
    }
    pub fn ensure_present(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<()>> + Send + 'static {
        async { Ok(()) }
    }
    pub fn stale_bytes(&self) -> u64 {
        self.stale.count_ones() * self.stale.block_size() as u64
    }
    pub fn start_background_sync(self: &Arc<Self>, options: SyncOptions) {}
    pub fn sync_stats(&self) -> SyncStats {
        SyncStats::default()
    }
}

impl<D: BlockDevice> BlockDevice for LazyDevice<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> io::Result<()> {
        self.inner.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.write_zeroes(offset, len).await
    }
}
