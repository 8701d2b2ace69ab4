//! The ublk frontend: serves a [`BlockDevice`] as `/dev/ublkbN`.
//!
//! It only translates kernel requests into calls on the top layer of the
//! stack (see [`queue`]). Devices are created with `UBLK_F_USER_RECOVERY`
//! and `..._REISSUE`: if the daemon dies, the kernel keeps `/dev/ublkbN` and
//! queues I/O (re-issuing what was in flight) until a new daemon for the same
//! resource re-attaches, so a mounted file system sees a pause, not an error.
//! Re-issuing is safe for a block device: a request that had not completed
//! may be applied twice, which leaves the same bytes.

mod direct;
mod doorbell;
mod queue;
pub(crate) mod ring;
mod zero_copy;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkError, UblkFlags};

use crate::device::{BlockDevice, SECTOR_SIZE};

/// Name of this program's entry in the target data of libublk's JSON export;
/// it is how a restarted daemon finds the device it should re-attach to.
const TARGET_JSON_KEY: &str = "vmsync";

/// Block-layer shape of the device.
#[derive(Debug, Clone)]
pub struct UblkOptions {
    /// Resource name; a restarted daemon recovers the device of the same name.
    pub resource: String,
    pub queues: u16,
    pub depth: u16,
    /// Largest single request the kernel sends us.
    pub max_io_bytes: u32,
    /// Create the device for zero copy where the kernel has it (see
    /// [`zero_copy`]).
    pub zero_copy: bool,
}

impl UblkOptions {
    pub fn new(resource: &str) -> Self {
        UblkOptions {
            resource: resource.to_string(),
            queues: 1,
            depth: 64,
            // 1 MiB: a 1 MiB guest write reaches us whole instead of split.
            max_io_bytes: 1 << 20,
            zero_copy: true,
        }
    }
}

/// Why the frontend could not start or stop.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("ublk: {0} (is the ublk_drv kernel module loaded? /dev/ublk-control must exist)")]
    Ublk(UblkError),
    #[error(
        "ublk device {dev_id} of resource '{resource}' is already served by running process {pid}"
    )]
    AlreadyServed {
        resource: String,
        dev_id: u32,
        pid: i32,
    },
    #[error("ublk device {0} stopped before it came up")]
    DidNotStart(u32),
    #[error("{path} is in use ({holder}); unmount or close it first, or force")]
    InUse { path: String, holder: String },
}

impl From<UblkError> for FrontendError {
    fn from(e: UblkError) -> Self {
        FrontendError::Ublk(e)
    }
}

/// How the device came up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// A new `/dev/ublkbN`.
    Added,
    /// Re-attached to the device a killed daemon left behind.
    Recovered,
}

/// A running `/dev/ublkbN`.
pub struct UblkFrontend {
    dev_id: u32,
    mode: StartMode,
    stopping: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
}

impl UblkFrontend {
    /// Creates (or recovers) the device and returns once it is live.
    pub fn start<D: BlockDevice>(
        device: Arc<D>,
        options: &UblkOptions,
    ) -> Result<Self, FrontendError> {
        let recover_id = find_recoverable(&options.resource)?;
        let (ready_tx, ready_rx) = mpsc::channel::<Result<u32, FrontendError>>();
        let stopping = Arc::new(AtomicBool::new(false));
        let options = options.clone();
        let server_stopping = Arc::clone(&stopping);
        // libublk keeps its control ring per thread: the device is created,
        // served and deleted on this one thread.
        let server = std::thread::Builder::new()
            .name("ublk-server".into())
            .spawn(move || serve(device, options, recover_id, ready_tx, server_stopping))
            .map_err(|e| FrontendError::Ublk(UblkError::IOError(e)))?;
        match ready_rx.recv() {
            Ok(Ok(dev_id)) => Ok(UblkFrontend {
                dev_id,
                mode: if recover_id.is_some() {
                    StartMode::Recovered
                } else {
                    StartMode::Added
                },
                stopping,
                server: Some(server),
            }),
            Ok(Err(e)) => {
                let _ = server.join();
                Err(e)
            }
            Err(_) => {
                let _ = server.join();
                Err(FrontendError::DidNotStart(recover_id.unwrap_or(u32::MAX)))
            }
        }
    }

    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    pub fn mode(&self) -> StartMode {
        self.mode
    }

    /// `/dev/ublkbN`.
    pub fn device_path(&self) -> String {
        format!("/dev/ublkb{}", self.dev_id)
    }

    /// Who holds the block device open, if anyone.
    pub fn holder(&self) -> Option<String> {
        device_holder(Path::new(&self.device_path()))
    }

    /// Removes the device. Without `force`, refuses while it is open.
    pub fn stop(mut self, force: bool) -> Result<(), (Self, FrontendError)> {
        if !force {
            if let Some(holder) = self.holder() {
                let path = self.device_path();
                return Err((self, FrontendError::InUse { path, holder }));
            }
        }
        self.stopping.store(true, Ordering::Release);
        match UblkCtrl::new_simple(self.dev_id as i32).and_then(|c| c.kill_dev()) {
            Ok(_) => {}
            Err(e) => tracing::warn!(dev_id = self.dev_id, error = %e, "stopping ublk device"),
        }
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
        Ok(())
    }

    /// True once the queues have stopped (for example: deleted from outside).
    pub fn is_finished(&self) -> bool {
        self.server.as_ref().is_none_or(|s| s.is_finished())
    }
}

/// The ublk server thread: build the control device, run the queues, and on
/// a deliberate stop delete the device.
fn serve<D: BlockDevice>(
    device: Arc<D>,
    options: UblkOptions,
    recover_id: Option<u32>,
    ready: mpsc::Sender<Result<u32, FrontendError>>,
    stopping: Arc<AtomicBool>,
) {
    let span = tracing::info_span!("ublk", resource = %options.resource);
    let _entered = span.enter();
    // A device that is one file gets the direct queue (see `direct`); any
    // device gets zero copy where the kernel has it (see `zero_copy`).
    let direct_file = device.direct_file().filter(|_| !device.keeps_write_data());
    let zero_copy = options.zero_copy && zero_copy::supported();
    let ctrl = match build_ctrl(&options, recover_id, zero_copy) {
        Ok(ctrl) => ctrl,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
    };
    let size = device.size();
    let io_files = device.io_files();
    let resource = options.resource.clone();
    let init = move |dev: &mut UblkDev| {
        set_params(dev, size);
        register_io_files(dev, &io_files);
        dev.set_target_json(serde_json::json!({ TARGET_JSON_KEY: { "resource": resource } }));
        Ok(())
    };
    let queue_device = Arc::clone(&device);
    let run_queue = move |qid: u16, dev: &UblkDev| {
        let device = Arc::clone(&queue_device);
        match direct_file.and_then(|file| direct::DirectTarget::registered(dev, file)) {
            Some(target) => direct::run_direct_queue(qid, dev, device, target),
            None => queue::run_queue(qid, dev, device),
        }
    };
    let started_ready = ready.clone();
    let recovered = recover_id.is_some();
    let on_started = move |ctrl: &UblkCtrl| {
        let dev_id = ctrl.dev_info().dev_id;
        tracing::info!(dev_id, path = %ctrl.get_bdev_path(), "ublk device is live");
        if recovered {
            // A daemon that restarted itself to grow (`vmsyncctl resize`)
            // serves more than the kernel's disk still shows.
            grow_disk(ctrl, size);
        }
        let _ = started_ready.send(Ok(dev_id));
    };
    if let Err(e) = ctrl.run_target(init, run_queue, on_started) {
        let _ = ready.send(Err(e.into()));
    }
    if stopping.load(Ordering::Acquire) {
        // A recovered control does not own the device, so delete it
        // explicitly; for an added one this is what drop would do.
        if let Err(e) = ctrl.del_dev() {
            tracing::debug!(error = %e, "deleting ublk device");
        }
    } else {
        // The queues died without a stop from us: leave the device for a
        // successor to recover.
        ctrl.disown();
    }
}

fn build_ctrl(
    options: &UblkOptions,
    recover_id: Option<u32>,
    zero_copy: bool,
) -> Result<UblkCtrl, UblkError> {
    // Each queue thread stays on one CPU of its queue's mask (libublk picks
    // one), as rublk's do by default: a thread that wanders between CPUs
    // pays for it on every request it serves.
    let affinity = UblkFlags::UBLK_DEV_F_SINGLE_CPU_AFFINITY;
    let mut ctrl_flags = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;
    if zero_copy && recover_id.is_none() {
        ctrl_flags |= zero_copy::CTRL_FLAGS;
    }
    let builder = UblkCtrlBuilder::default()
        .name("vmsync")
        .nr_queues(options.queues)
        .depth(options.depth)
        .io_buf_bytes(options.max_io_bytes)
        .ctrl_flags(ctrl_flags);
    match recover_id {
        Some(id) => {
            tracing::info!(
                dev_id = id,
                "re-attaching to the device a previous daemon left"
            );
            let ctrl = builder
                .id(id as i32)
                .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV | affinity)
                .build()?;
            // (libublk retries while the kernel still releases the
            // previous server's queues.)
            ctrl.start_user_recover()?;
            Ok(ctrl)
        }
        None => builder
            .id(-1)
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV | affinity)
            .build(),
    }
}

/// Adds the device's backing files to the target's files, which libublk
/// registers with every queue ring (after the ublk char device in slot 0);
/// see `ring`. Files beyond libublk's table are left out: their I/O uses
/// the descriptor instead.
fn register_io_files(dev: &mut UblkDev, files: &[std::os::fd::RawFd]) {
    let tgt = &mut dev.tgt;
    for &fd in files {
        let slot = tgt.nr_fds as usize;
        if slot >= tgt.fds.len() {
            tracing::debug!(
                fd,
                "no room to register a backing file with the queue rings"
            );
            break;
        }
        tgt.fds[slot] = fd;
        tgt.nr_fds += 1;
    }
}

/// Block-layer limits: 512-byte logical and 4 KiB physical sectors, a
/// volatile cache with FUA (so the kernel sends us FLUSH and FUA), and
/// discard / write-zeroes at 4 KiB granularity.
fn set_params(dev: &mut UblkDev, size: u64) {
    let max_sectors = dev.dev_info.max_io_buf_bytes >> 9;
    dev.tgt.dev_size = size;
    dev.tgt.params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: 9,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 12,
            max_sectors,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: 4096,
            max_discard_sectors: u32::MAX >> 9,
            max_write_zeroes_sectors: u32::MAX >> 9,
            max_discard_segments: 1,
            reserved0: 0,
        },
        ..Default::default()
    };
}

/// Whether this kernel can change a live device's size
/// (`UBLK_U_CMD_UPDATE_SIZE`, Linux 6.16): what growing a primary's device
/// online needs.
pub fn can_grow_online() -> bool {
    UblkCtrl::get_features().is_some_and(|f| f & sys::UBLK_F_UPDATE_SIZE as u64 != 0)
}

/// Tells the kernel the device now has `size` bytes if its disk is smaller
/// (the guest sees the new capacity at once, with a change uevent). Never
/// shrinks it: a smaller served size would be a bug elsewhere, and the
/// guest's data past it must stay reachable.
fn grow_disk(ctrl: &UblkCtrl, size: u64) {
    let mut params = sys::ublk_params::default();
    if let Err(e) = ctrl.get_params(&mut params) {
        tracing::error!(error = %e, "cannot read the device's size");
        return;
    }
    let shown = params.basic.dev_sectors * SECTOR_SIZE;
    if shown >= size {
        return;
    }
    match ctrl.update_size(size) {
        Ok(_) => tracing::info!(from = shown, to = size, "device grown"),
        Err(e) => tracing::error!(
            error = %e,
            from = shown,
            to = size,
            "cannot grow the device (the kernel needs UBLK_U_CMD_UPDATE_SIZE, Linux 6.16)"
        ),
    }
}

/// True when a killed daemon left a device of `resource` that a new daemon
/// should re-attach to (the kernel is holding its I/O).
pub fn has_recoverable_device(resource: &str) -> bool {
    matches!(find_recoverable(resource), Ok(Some(_)))
}

/// The id of a device of `resource` left behind by a daemon that died, if
/// any. A device of this resource served by a live process is an error.
fn find_recoverable(resource: &str) -> Result<Option<u32>, FrontendError> {
    for dev_id in ublk_device_ids() {
        let Ok(ctrl) = UblkCtrl::new_simple(dev_id as i32) else {
            continue;
        };
        let owner = ctrl
            .get_target_data_from_json()
            .and_then(|v| v[TARGET_JSON_KEY]["resource"].as_str().map(str::to_owned));
        if owner.as_deref() != Some(resource) {
            continue;
        }
        let info = ctrl.dev_info();
        if info.state == sys::UBLK_S_DEV_DEAD as u16 {
            continue;
        }
        let pid = info.ublksrv_pid;
        if pid > 0 && pid != std::process::id() as i32 && process_alive(pid) {
            return Err(FrontendError::AlreadyServed {
                resource: resource.to_string(),
                dev_id,
                pid,
            });
        }
        return Ok(Some(dev_id));
    }
    Ok(None)
}

/// Ids of the ublk devices that exist now (from `/dev/ublkcN`).
fn ublk_device_ids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/dev") else {
        return Vec::new();
    };
    let mut ids: Vec<u32> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("ublkc")?.parse().ok())
        .collect();
    ids.sort_unstable();
    ids
}

fn process_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Describes who holds a block device open: a mount or other exclusive
/// holder (an `O_EXCL` open fails with EBUSY), or a process with an open
/// descriptor on it.
pub fn device_holder(path: &Path) -> Option<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let exclusive = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(path);
    if let Err(e) = exclusive {
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Some("mounted or held exclusively".to_string());
        }
    }
    let me = std::process::id().to_string();
    let procs = std::fs::read_dir("/proc").ok()?;
    for proc_entry in procs.filter_map(|e| e.ok()) {
        let pid = proc_entry.file_name();
        let Some(pid) = pid
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        let holds = fds
            .filter_map(|fd| fd.ok())
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == path));
        if holds {
            let comm = std::fs::read_to_string(proc_entry.path().join("comm")).unwrap_or_default();
            return Some(format!("open by pid {pid} ({})", comm.trim()));
        }
    }
    None
}
