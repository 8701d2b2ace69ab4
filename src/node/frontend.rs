//! How the top of the block stack reaches its user: `/dev/ublkbN`, or (for
//! tests and benchmarks where the kernel has no ublk) the block-socket
//! protocol on a Unix socket. Both serve the same [`BlockDevice`].

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use blockdev::ublk::{UblkFrontend, UblkOptions};
use blockdev::BlockDevice;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub enum Frontend {
    Ublk(UblkFrontend),
    Socket {
        path: PathBuf,
        stop: oneshot::Sender<()>,
        server: JoinHandle<()>,
    },
}

impl Frontend {
    /// Exposes `device`: on `block_socket` if given, else as a ublk device
    /// (re-attaching to one a killed predecessor left behind).
    pub async fn start<D: BlockDevice>(
        device: Arc<D>,
        resource: &str,
        queues: u16,
        zero_copy: bool,
        block_socket: Option<&PathBuf>,
    ) -> anyhow::Result<Frontend> {
        if let Some(path) = block_socket {
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("block socket {}", path.display()))?;
            let (stop, stopped) = oneshot::channel::<()>();
            let server = tokio::spawn(blockdev::blocksock::serve(listener, device, async move {
                let _ = stopped.await;
            }));
            return Ok(Frontend::Socket {
                path: path.clone(),
                stop,
                server,
            });
        }
        let options = UblkOptions {
            queues,
            zero_copy,
            ..UblkOptions::new(resource)
        };
        let frontend = tokio::task::spawn_blocking(move || UblkFrontend::start(device, &options))
            .await
            .context("ublk start-up thread")??;
        tracing::info!(device = %frontend.device_path(), mode = ?frontend.mode(), "device exposed");
        Ok(Frontend::Ublk(frontend))
    }

    pub fn path(&self) -> String {
        match self {
            Frontend::Ublk(f) => f.device_path(),
            Frontend::Socket { path, .. } => path.display().to_string(),
        }
    }

    /// Removes the device; without `force` refused while it is open.
    pub async fn stop(self, force: bool) -> Result<(), (Frontend, String)> {
        match self {
            Frontend::Ublk(f) => {
                let result = tokio::task::spawn_blocking(move || f.stop(force)).await;
                match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err((f, e))) => Err((Frontend::Ublk(f), e.to_string())),
                    Err(e) => {
                        tracing::error!(error = %e, "ublk stop thread failed");
                        Ok(())
                    }
                }
            }
            Frontend::Socket { path, stop, server } => {
                let _ = stop.send(());
                let _ = server.await;
                let _ = std::fs::remove_file(path);
                Ok(())
            }
        }
    }
}

/// Stands in for the device a killed primary left behind when another node
/// was promoted meanwhile: every request the kernel held (and re-issues to
/// it) fails with EIO, so the writes that were never acknowledged are not
/// applied on a node that is no longer primary. It is removed right after.
pub struct Superseded {
    pub size: u64,
}

impl Superseded {
    fn refuse() -> std::io::Error {
        std::io::Error::other("another node was promoted while this one was down")
    }
}

impl BlockDevice for Superseded {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, _offset: u64, _buf: &mut [u8]) -> std::io::Result<()> {
        Err(Self::refuse())
    }

    async fn write(&self, _offset: u64, _data: bytes::Bytes, _fua: bool) -> std::io::Result<()> {
        Err(Self::refuse())
    }

    async fn flush(&self) -> std::io::Result<()> {
        Err(Self::refuse())
    }

    async fn discard(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Err(Self::refuse())
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Err(Self::refuse())
    }
}
