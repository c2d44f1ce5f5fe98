// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Serving devices on vhost-user sockets: one listening socket and one thread per device,
//! a new [`VhostUserSvmgpuBackend`] per frontend connection, and after a disconnect the next
//! connection is accepted. SIGTERM/SIGINT end the process cleanly (sockets removed,
//! statistics logged).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;

use log::{error, info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventFlag};

use crate::config::DeviceOptions;
use crate::ctl::ControlServer;
use crate::gpu::{Gpu, GpuError};
use crate::inject::{random_seed, InjectError, InjectSpec};
use crate::vhu_svmgpu::VhostUserSvmgpuBackend;

/// Most devices one process serves.
pub const MAX_SOCKETS: u32 = 64;

/// Errors of the daemon.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// `--socket-count` out of range.
    #[error("--socket-count must be between 1 and {MAX_SOCKETS}, got {0}")]
    SocketCount(u32),
    /// Invalid device options.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// Binding a socket failed.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: vhost::vhost_user::Error,
    },
    /// Creating the vhost-user daemon failed.
    #[error("cannot create the vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
    /// Accepting a connection failed.
    #[error("cannot accept a connection on {path}: {cause}")]
    Accept {
        /// Socket path.
        path: PathBuf,
        /// Cause (vhost-user-backend's error does not implement `std::error::Error`).
        cause: vhost_user_backend::Error,
    },
    /// Setting up signal handling failed.
    #[error("cannot set up signal handling: {0}")]
    Signal(String),
    /// Spawning a thread failed.
    #[error("cannot spawn a thread: {0}")]
    Thread(std::io::Error),
    /// Invalid `--inject`.
    #[error("--inject: {0}")]
    Inject(#[from] InjectError),
    /// The control socket could not be set up.
    #[error("cannot serve the control socket {path}: {source}")]
    Control {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// What to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// Socket path prefix: device *i* listens on `{socket_path}{i}`.
    pub socket_path: PathBuf,
    /// Number of devices.
    pub socket_count: u32,
    /// Options shared by every device.
    pub options: DeviceOptions,
    /// Where to write every device's statistics as a JSON array on exit.
    pub stats_json: Option<PathBuf>,
    /// Fault injection configured at start (`--inject`).
    pub inject: InjectSpec,
    /// The runtime control socket (`--control-socket`).
    pub control_socket: Option<PathBuf>,
}

impl DaemonConfig {
    /// Validates the configuration.
    pub fn validate(&self) -> Result<(), DaemonError> {
        if self.socket_count == 0 || self.socket_count > MAX_SOCKETS {
            return Err(DaemonError::SocketCount(self.socket_count));
        }
        self.inject.check_devices(self.socket_count)?;
        self.options
            .validate()
            .map_err(|e| DaemonError::Gpu(GpuError::Options(e)))
    }

    /// The socket paths `P0 .. P{N-1}` (the rust-vmm vhost-device convention: the index is
    /// appended even for one socket).
    pub fn socket_paths(&self) -> Vec<PathBuf> {
        (0..self.socket_count)
            .map(|i| socket_path(&self.socket_path, i))
            .collect()
    }
}

/// `{prefix}{index}`.
pub fn socket_path(prefix: &Path, index: u32) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(index.to_string());
    PathBuf::from(s)
}

/// One device listening on its socket.
pub struct DeviceServer {
    listener: Listener,
    path: PathBuf,
    gpu: Arc<Gpu>,
}

impl std::fmt::Debug for DeviceServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceServer")
            .field("path", &self.path)
            .field("gpu", &self.gpu)
            .finish_non_exhaustive()
    }
}

impl DeviceServer {
    /// Creates device `index` and binds its socket (replacing a stale socket file).
    pub fn bind(path: &Path, index: u32, options: &DeviceOptions) -> Result<Self, DaemonError> {
        let gpu = Arc::new(Gpu::new(index, options)?);
        let listener = Listener::new(path, true).map_err(|source| DaemonError::Listen {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            listener,
            path: path.to_owned(),
            gpu,
        })
    }

    /// The device (shared with the connections).
    pub fn gpu(&self) -> Arc<Gpu> {
        self.gpu.clone()
    }

    /// Socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts one frontend connection and serves it until the frontend disconnects.
    /// `Err` only if the socket itself failed; a connection ending with an error is logged.
    pub fn serve_one(&mut self) -> Result<(), DaemonError> {
        let backend = Arc::new(VhostUserSvmgpuBackend::new(self.gpu.clone()));
        let mut daemon = VhostUserDaemon::new(
            format!("svmgpu{}", self.gpu.index()),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(DaemonError::Daemon)?;
        daemon
            .start(&mut self.listener)
            .map_err(|cause| DaemonError::Accept {
                path: self.path.clone(),
                cause,
            })?;
        info!("svmgpu{}: frontend connected", self.gpu.index());
        match daemon.wait() {
            Ok(()) => info!("svmgpu{}: frontend disconnected", self.gpu.index()),
            Err(e) => warn!("svmgpu{}: connection ended: {e}", self.gpu.index()),
        }
        // Dropping the daemon stops and joins its vring workers; the next connection finds
        // a freshly reset device.
        drop(daemon);
        self.gpu.virtio_reset();
        self.gpu.set_memory(None);
        Ok(())
    }

    /// Serves connection after connection, until the socket fails.
    pub fn run(mut self) -> Result<(), DaemonError> {
        loop {
            self.serve_one()?;
        }
    }
}

/// Serves every configured device until SIGTERM/SIGINT (then returns `Ok`) or until a
/// device's socket fails (then returns that error).
pub fn run(config: &DaemonConfig) -> Result<(), DaemonError> {
    config.validate()?;

    // The main thread sleeps on an eventfd that a signal, or a failing device, wakes.
    let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::empty())
        .map_err(|e| DaemonError::Signal(e.to_string()))?;
    let thread_notifier = Arc::new(notifier);
    let signalled = Arc::new(AtomicBool::new(false));
    let mut signals =
        Signals::new([SIGTERM, SIGINT]).map_err(|e| DaemonError::Signal(e.to_string()))?;
    let signal_handle = signals.handle();
    {
        let (signalled, wake) = (signalled.clone(), thread_notifier.clone());
        thread::Builder::new()
            .name("svmgpu-signals".into())
            .spawn(move || {
                if signals.forever().next().is_some() {
                    signalled.store(true, Ordering::SeqCst);
                    let _ = wake.notify();
                }
            })
            .map_err(DaemonError::Thread)?;
    }

    let mut servers = Vec::new();
    for (i, path) in config.socket_paths().iter().enumerate() {
        // i < MAX_SOCKETS, fits u32.
        servers.push(DeviceServer::bind(path, i as u32, &config.options)?);
    }
    let gpus: Vec<Arc<Gpu>> = servers.iter().map(DeviceServer::gpu).collect();
    let paths = config.socket_paths();
    configure_injection(&gpus, &config.inject)?;
    let control = match &config.control_socket {
        Some(path) => Some(ControlServer::bind(path, gpus.clone()).map_err(|source| {
            DaemonError::Control {
                path: path.clone(),
                source,
            }
        })?),
        None => None,
    };
    info!(
        "serving {} svmgpu device(s) on {}",
        servers.len(),
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let (err_tx, err_rx) = mpsc::channel::<DaemonError>();
    for server in servers {
        let err_tx = err_tx.clone();
        let wake = thread_notifier.clone();
        thread::Builder::new()
            .name(format!("svmgpu{}-listener", server.gpu.index()))
            .spawn(move || {
                if let Err(e) = server.run() {
                    let _ = err_tx.send(e);
                    let _ = wake.notify();
                }
            })
            .map_err(DaemonError::Thread)?;
    }

    // Wait for a signal or a failed device.
    let result = loop {
        if let Err(e) = consumer.consume() {
            if e.kind() != std::io::ErrorKind::Interrupted {
                break Err(DaemonError::Signal(e.to_string()));
            }
        }
        if signalled.load(Ordering::SeqCst) {
            info!("signal received, exiting");
            break Ok(());
        }
        if let Ok(e) = err_rx.try_recv() {
            error!("{e}");
            break Err(e);
        }
    };

    let stats: Vec<String> = gpus.iter().map(|gpu| gpu.stats_json()).collect();
    for (gpu, json) in gpus.iter().zip(&stats) {
        info!("svmgpu{} statistics: {json}", gpu.index());
    }
    if let Some(path) = &config.stats_json {
        if let Err(e) = std::fs::write(path, format!("[{}]\n", stats.join(",\n"))) {
            error!("cannot write statistics to {}: {e}", path.display());
        }
    }
    // The listener threads are blocked in accept(); remove their sockets and let process
    // exit end them.
    for p in &paths {
        let _ = std::fs::remove_file(p);
    }
    if let Some(c) = &control {
        c.remove();
    }
    signal_handle.close();
    result
}

/// Applies `--inject` to every device: one seed for all (the given one, or a random one,
/// logged so that the run can be replayed), then the rules of each device. A device with a
/// rule offers `SVMGPU_F_FAULT_INJECT`.
pub fn configure_injection(gpus: &[Arc<Gpu>], spec: &InjectSpec) -> Result<(), DaemonError> {
    let seed = spec.seed.unwrap_or_else(random_seed);
    info!("fault injection seed {seed} (replay with --inject seed={seed})");
    for gpu in gpus {
        let inj = gpu.injector();
        inj.set_seed(seed);
        inj.add(spec)?;
        inj.set_advertised(inj.applicable(spec) > 0);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_naming() {
        let c = DaemonConfig {
            socket_path: PathBuf::from("/tmp/svmgpu.sock"),
            socket_count: 3,
            options: DeviceOptions::default(),
            stats_json: None,
            inject: InjectSpec::default(),
            control_socket: None,
        };
        assert_eq!(
            c.socket_paths(),
            vec![
                PathBuf::from("/tmp/svmgpu.sock0"),
                PathBuf::from("/tmp/svmgpu.sock1"),
                PathBuf::from("/tmp/svmgpu.sock2"),
            ]
        );
        assert!(c.validate().is_ok());
        let one = DaemonConfig {
            socket_count: 1,
            ..c.clone()
        };
        assert_eq!(one.socket_paths(), vec![PathBuf::from("/tmp/svmgpu.sock0")]);
        let zero = DaemonConfig {
            socket_count: 0,
            ..c
        };
        assert!(matches!(zero.validate(), Err(DaemonError::SocketCount(0))));
    }

    #[test]
    fn bind_fails_cleanly() {
        let r = DeviceServer::bind(
            Path::new("/proc/nonexistent/dir/sock0"),
            0,
            &DeviceOptions::default(),
        );
        assert!(matches!(r, Err(DaemonError::Listen { .. })));
        let bad = DeviceOptions {
            tlb_entries: 3,
            ..Default::default()
        };
        let dir = std::env::temp_dir().join(format!("svmgpu-bind-{}", std::process::id()));
        assert!(matches!(
            DeviceServer::bind(&dir, 0, &bad),
            Err(DaemonError::Gpu(_))
        ));
    }
}
