//! [`Metered`]: a [`BlockDevice`] layer that counts and times the guest's
//! requests on their way to the layer below.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use blockdev::BlockDevice;
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The guest operations, as the `op` label spells them.
const OPS: [&str; 5] = ["read", "write", "flush", "discard", "write_zeroes"];

type Labels = Vec<(&'static str, &'static str)>;

/// Counters and histograms of one operation; clones of the family members,
/// so the hot path never looks a label set up.
#[derive(Clone)]
struct OpMetrics {
    requests: Counter,
    bytes: Counter,
    errors: Counter,
    latency: Histogram,
}

/// Guest I/O as seen at the top of the stack.
pub struct IoMetrics {
    requests: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
    ops: Vec<OpMetrics>,
}

impl Default for IoMetrics {
    fn default() -> Self {
        // 10 µs to ~5 s: from a cached read to a write waiting on a slow peer.
        let latency = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(10e-6, 2.0, 20))
        });
        let requests = Family::<Labels, Counter>::default();
        let bytes = Family::<Labels, Counter>::default();
        let errors = Family::<Labels, Counter>::default();
        let ops = OPS
            .iter()
            .map(|&op| {
                let labels = vec![("op", op)];
                OpMetrics {
                    requests: requests.get_or_create(&labels).clone(),
                    bytes: bytes.get_or_create(&labels).clone(),
                    errors: errors.get_or_create(&labels).clone(),
                    latency: latency.get_or_create(&labels).clone(),
                }
            })
            .collect();
        IoMetrics {
            requests,
            bytes,
            errors,
            latency,
            ops,
        }
    }
}

impl IoMetrics {
    /// Adds these metrics to a scrape's registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "vmsync_requests",
            "Guest requests completed, by operation",
            self.requests.clone(),
        );
        registry.register(
            "vmsync_request_bytes",
            "Bytes the guest read and wrote (and discarded or zeroed), by operation",
            self.bytes.clone(),
        );
        registry.register(
            "vmsync_request_errors",
            "Guest requests that failed, by operation",
            self.errors.clone(),
        );
        registry.register(
            "vmsync_request_duration_seconds",
            "Time from a guest request reaching vmsync to its completion, by operation",
            self.latency.clone(),
        );
    }

    fn record(&self, op: usize, bytes: u64, started: Instant, ok: bool) {
        let m = &self.ops[op];
        m.requests.inc();
        if ok {
            m.bytes.inc_by(bytes);
        } else {
            m.errors.inc();
        }
        m.latency.observe(started.elapsed().as_secs_f64());
    }
}

/// Counts and times every request to `inner`.
pub struct Metered<D> {
    inner: Arc<D>,
    metrics: Arc<IoMetrics>,
}

impl<D> Metered<D> {
    pub fn new(inner: Arc<D>, metrics: Arc<IoMetrics>) -> Self {
        Metered { inner, metrics }
    }
}

impl<D: BlockDevice> Metered<D> {
    async fn timed<T>(
        &self,
        op: usize,
        bytes: u64,
        work: impl std::future::Future<Output = io::Result<T>>,
    ) -> io::Result<T> {
        let started = Instant::now();
        let result = work.await;
        self.metrics.record(op, bytes, started, result.is_ok());
        result
    }
}

impl<D: BlockDevice> BlockDevice for Metered<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn keeps_write_data(&self) -> bool {
        self.inner.keeps_write_data()
    }

    fn io_files(&self) -> Vec<std::os::fd::RawFd> {
        self.inner.io_files()
    }

    /// Requests may bypass this layer if the frontend counts them here
    /// (`served_directly`).
    fn direct_file(&self) -> Option<blockdev::DirectFile> {
        self.inner.direct_file().map(|file| blockdev::DirectFile {
            report: true,
            ..file
        })
    }

    fn read_file(&self) -> Option<blockdev::DirectFile> {
        self.inner.read_file().map(|file| blockdev::DirectFile {
            report: true,
            ..file
        })
    }

    fn read_directly(&self, offset: u64, len: u64) -> bool {
        self.inner.read_directly(offset, len)
    }

    fn served_directly(&self, op: blockdev::DirectOp, bytes: u64, started: Instant) {
        let index = match op {
            blockdev::DirectOp::Read => 0,
            blockdev::DirectOp::Write => 1,
            blockdev::DirectOp::Flush => 2,
        };
        self.metrics.record(index, bytes, started, true);
        self.inner.served_directly(op, bytes, started);
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len() as u64;
        self.timed(0, len, self.inner.read(offset, buf)).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        let len = data.len() as u64;
        self.timed(1, len, self.inner.write(offset, data, fua))
            .await
    }

    async fn flush(&self) -> io::Result<()> {
        self.timed(2, 0, self.inner.flush()).await
    }

    async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.timed(3, len, self.inner.discard(offset, len)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.timed(4, len, self.inner.write_zeroes(offset, len))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device that fails writes past the first 4 KiB.
    struct Half;

    impl BlockDevice for Half {
        fn size(&self) -> u64 {
            8192
        }
        async fn read(&self, _offset: u64, _buf: &mut [u8]) -> io::Result<()> {
            Ok(())
        }
        async fn write(&self, offset: u64, _data: Bytes, _fua: bool) -> io::Result<()> {
            if offset == 0 {
                Ok(())
            } else {
                Err(io::Error::other("no"))
            }
        }
        async fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        async fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
            Ok(())
        }
        async fn write_zeroes(&self, _offset: u64, _len: u64) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn counts_bytes_requests_errors_and_latency_per_operation() {
        let metrics = Arc::new(IoMetrics::default());
        let device = Metered::new(Arc::new(Half), Arc::clone(&metrics));
        device
            .write(0, Bytes::from(vec![1; 4096]), false)
            .await
            .unwrap();
        assert!(device
            .write(4096, Bytes::from(vec![1; 4096]), false)
            .await
            .is_err());
        let mut buf = vec![0; 512];
        device.read(0, &mut buf).await.unwrap();
        device.flush().await.unwrap();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "vmsync_requests_total{op=\"write\"} 2",
            "vmsync_request_errors_total{op=\"write\"} 1",
            "vmsync_request_bytes_total{op=\"write\"} 4096",
            "vmsync_request_bytes_total{op=\"read\"} 512",
            "vmsync_requests_total{op=\"flush\"} 1",
            "vmsync_request_duration_seconds_count{op=\"write\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
    }

    #[test]
    fn requests_served_directly_by_the_frontend_are_counted_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backing");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let store = blockdev::BackingStore::open(&path, 8192, Default::default()).unwrap();
        let below = store
            .direct_file()
            .expect("a backing store is a direct file");
        assert!(!below.report);
        let metrics = Arc::new(IoMetrics::default());
        let device = Metered::new(Arc::new(store), Arc::clone(&metrics));
        // The frontend may bypass the layer, but must report to it.
        let file = device.direct_file().expect("passed on");
        assert_eq!((file.fd, file.size, file.report), (below.fd, 8192, true));
        device.served_directly(blockdev::DirectOp::Read, 4096, Instant::now());
        device.served_directly(blockdev::DirectOp::Write, 512, Instant::now());
        device.served_directly(blockdev::DirectOp::Flush, 0, Instant::now());
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "vmsync_requests_total{op=\"read\"} 1",
            "vmsync_request_bytes_total{op=\"read\"} 4096",
            "vmsync_request_bytes_total{op=\"write\"} 512",
            "vmsync_requests_total{op=\"flush\"} 1",
            "vmsync_request_duration_seconds_count{op=\"write\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
    }
}
