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
        let options = UblkOptions::new(resource);
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
