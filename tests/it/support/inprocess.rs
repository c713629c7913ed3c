//! opsgate inside the test's own runtime: listeners bound on port 0 before it starts (no
//! port picked, released and lost), a handle that reloads and terminates it as signals
//! would, and tokio's paused clock when the test asks for it. What only a process shows
//! (exit codes, log lines, real signals) stays with [`super::opsgate`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use opsgate::app::{self, ConfigSource, Control, Listeners, RunError};
use opsgate::config::Overrides;
use opsgate::shutdown::Signal;
use opsgate::telemetry::access::AccessLog;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::init_tls;

/// A running in-process opsgate; stopped (its task aborted) on drop.
pub struct InProcess {
    addr: SocketAddr,
    admin: SocketAddr,
    control: mpsc::UnboundedSender<Signal>,
    task: Option<JoinHandle<Result<(), RunError>>>,
    config: PathBuf,
    _dir: TempDir,
}

impl InProcess {
    /// Writes `config` to a temp file, loads it as `opsgate run --config` does (the bound
    /// addresses standing in for `--listen` and `--admin`) and serves it on loopback.
    /// Requests may be sent at once: the listeners are bound before this returns.
    pub async fn start(config: &str) -> Self {
        init_tls();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opsgate.toml");
        std::fs::write(&path, config).unwrap();
        let loopback = || TcpListener::bind("127.0.0.1:0");
        let (proxy, admin) = (loopback().await.unwrap(), loopback().await.unwrap());
        let (addr, admin_addr) = (proxy.local_addr().unwrap(), admin.local_addr().unwrap());
        let source = ConfigSource {
            path: Some(path.clone()),
            overrides: Overrides {
                listen: Some(addr),
                admin_listen: Some(admin_addr),
                upstream: None,
            },
        };
        let config = source
            .load()
            .unwrap_or_else(|e| panic!("the test's config is invalid:\n{e}"));
        let egress = match config.file.egress.as_ref().and_then(|e| e.listen) {
            Some(at) => Some(TcpListener::bind(at).await.unwrap()),
            None => None,
        };
        let listeners = Listeners {
            proxy,
            admin,
            egress,
        };
        let (control, rx) = Control::channel();
        let task = tokio::spawn(app::run_on(source, config, AccessLog::Off, listeners, rx));
        InProcess {
            addr,
            admin: admin_addr,
            control,
            task: Some(task),
            config: path,
            _dir: dir,
        }
    }

    /// The proxy listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<proxy>` followed by `path_and_query`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    /// The admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// `http://<admin>` followed by `path_and_query`.
    pub fn admin_url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.admin)
    }

    /// The config file it was started with (the watcher may pick up a write on its own).
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Whether `run_on` is still running.
    pub fn running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// What SIGHUP does: a reload with the `signal` trigger.
    pub fn reload(&self) {
        let _ = self.control.send(Signal::Reload);
    }

    /// What SIGTERM does: the drain sequence; [`InProcess::stopped`] awaits its end.
    pub fn terminate(&self) {
        let _ = self.control.send(Signal::Terminate);
    }

    /// Waits for `run_on` to return.
    pub async fn stopped(&mut self) -> Result<(), RunError> {
        let task = self.task.take().expect("stopped() awaited twice");
        task.await.expect("opsgate's task panicked")
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
