//! Runs the real `opsgate` binary: a config in a temp dir, loopback ports, JSON logs captured
//! line by line, readiness awaited on `/_health/live`, SIGTERM on demand, killed on drop.
//! Also the clients tests talk to it with: HTTP/1.1, h2c prior knowledge and raw TCP.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::loopback_addr;
use super::upstream::{TestBody, full};

/// Environment variables of the test process that would leak into opsgate's config.
const OPSGATE_ENV: &[&str] = &[
    "OPSGATE_CONFIG",
    "OPSGATE_LISTEN",
    "OPSGATE_UPSTREAM",
    "OPSGATE_ADMIN_LISTEN",
    "OPSGATE_ADMIN_TOKEN",
    "OPSGATE_LOG",
    "MAINTENANCE_MODE",
    "CIRCUIT_OPEN",
];

/// How long startup may take before a test gives up.
const START_LIMIT: Duration = Duration::from_secs(10);

/// `opsgate` with a clean environment, run from `dir` (so no stray `./opsgate.toml` is found).
pub fn command(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_opsgate"));
    cmd.current_dir(dir);
    for var in OPSGATE_ENV {
        cmd.env_remove(var);
    }
    cmd.args(["--log-format", "json"]);
    cmd
}

/// The shorthand config: one upstream, one catch-all route named `default`.
pub fn shorthand(upstream: &str, proxy_extra: &str) -> String {
    format!("[proxy]\nupstream = \"{upstream}\"\n{proxy_extra}\n")
}

/// Runs `cmd` (see [`command`]) to completion off the async threads, with output captured;
/// killed and failed after 10 s.
pub async fn run_to_end(cmd: Command) -> Output {
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(10), cmd.output())
        .await
        .expect("command finished within 10s")
        .unwrap()
}

/// `opsgate check-config --config <file with text>`, run to completion.
pub fn check_config(text: &str) -> (Output, PathBuf, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opsgate.toml");
    std::fs::write(&path, text).unwrap();
    let out = command(dir.path())
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    (out, path, dir)
}

/// What to start: a config file (optional), flags and environment.
pub struct Launch {
    dir: Arc<TempDir>,
    config: Option<PathBuf>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    /// Pick fresh `--listen`/`--admin` ports at each spawn (see `loopback`).
    fresh_ports: bool,
}

impl Default for Launch {
    fn default() -> Self {
        Self::new()
    }
}

impl Launch {
    /// No config file, no flags.
    pub fn new() -> Self {
        Self {
            dir: Arc::new(tempfile::tempdir().unwrap()),
            config: None,
            args: Vec::new(),
            env: Vec::new(),
            listen: None,
            admin: None,
            fresh_ports: false,
        }
    }

    /// The temp dir the process runs in (and the config file lives in).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Passes `--config path` for a file the test lays out itself (symlinks, other dirs).
    pub fn config_at(mut self, path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        self.args.push("--config".into());
        self.args.push(path.display().to_string());
        self.config = Some(path);
        self
    }

    /// Writes `text` as the config file and passes `--config`.
    pub fn config(mut self, text: &str) -> Self {
        let path = self.dir.path().join("opsgate.toml");
        std::fs::write(&path, text).unwrap();
        self.args.push("--config".into());
        self.args.push(path.display().to_string());
        self.config = Some(path);
        self
    }

    /// `--listen` and `--admin` on fresh loopback ports, picked anew on every spawn.
    pub fn loopback(mut self) -> Self {
        self.fresh_ports = true;
        self
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// The proxy address to wait on when it is not set by `loopback` (env, file).
    pub fn listening_on(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// The admin address when it is not set by `loopback` (env, file).
    pub fn admin_on(mut self, addr: SocketAddr) -> Self {
        self.admin = Some(addr);
        self
    }

    /// Starts the process without waiting for it to serve.
    pub fn spawn(&self) -> Opsgate {
        let mut cmd = command(self.dir.path());
        cmd.arg("run").args(&self.args);
        let (mut listen, mut admin) = (self.listen, self.admin);
        if self.fresh_ports {
            let addr = loopback_addr();
            let admin_addr = loopback_addr();
            cmd.arg("--listen").arg(addr.to_string());
            cmd.arg("--admin").arg(admin_addr.to_string());
            listen = Some(addr);
            admin = Some(admin_addr);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect_lines(child.stdout.take().unwrap(), stdout.clone()),
            collect_lines(child.stderr.take().unwrap(), stderr.clone()),
        ];
        Opsgate {
            child,
            listen,
            admin,
            config: self.config.clone(),
            stdout,
            stderr,
            readers,
            _dir: self.dir.clone(),
        }
    }

    /// Starts the process and waits until `/_health/live` answers 200. With fresh ports, a
    /// port taken between `free_port` and opsgate's bind is retried on other ports.
    pub async fn start(self) -> Opsgate {
        let mut og = self.spawn();
        let mut addr = og.addr();
        let mut retries = 3;
        let deadline = tokio::time::Instant::now() + START_LIMIT;
        loop {
            if let Ok(Some(status)) = og.child.try_wait() {
                og.join_readers();
                let stderr = og.stderr().join("\n");
                if self.fresh_ports && retries > 0 && stderr.contains("in use") {
                    retries -= 1;
                    og = self.spawn();
                    addr = og.addr();
                    continue;
                }
                panic!(
                    "opsgate exited at startup ({status}); stderr:\n{}",
                    og.stderr().join("\n")
                );
            }
            if let Ok(resp) = raw_exchange(
                addr,
                b"GET /_health/live HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
            )
            .await
                && resp.starts_with(b"HTTP/1.1 200")
            {
                return og;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "opsgate did not answer /_health/live within {START_LIMIT:?}; stderr:\n{}",
                og.stderr().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn collect_lines(
    from: impl std::io::Read + Send + 'static,
    into: Arc<Mutex<Vec<String>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { return };
            into.lock().unwrap().push(line);
        }
    })
}

/// A running opsgate process.
pub struct Opsgate {
    child: Child,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    config: Option<PathBuf>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
    _dir: Arc<TempDir>,
}

impl Opsgate {
    /// Starts opsgate on loopback ports with `config` and waits until it serves.
    pub async fn start(config: &str) -> Self {
        Launch::new().config(config).loopback().start().await
    }

    /// The proxy listener.
    pub fn addr(&self) -> SocketAddr {
        self.listen.expect("no known listen address")
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr())
    }

    /// The admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.expect("no known admin address")
    }

    /// `http://<admin>` followed by `path_and_query`.
    pub fn admin_url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.admin_addr())
    }

    /// The `--config` path it was started with.
    pub fn config_path(&self) -> &std::path::Path {
        self.config.as_deref().expect("started without --config")
    }

    /// Replaces the config file's content (the watcher may pick it up on its own).
    pub fn write_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).unwrap();
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends SIGHUP (reload).
    pub fn sighup(&self) {
        let ok = Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP {} failed", self.pid());
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {} failed", self.pid());
    }

    /// Waits for the process to exit (panics after `limit`); afterwards every log line is in.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "opsgate still running after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        self.join_readers();
        status
    }

    /// After exit: waits until every line the process wrote has been collected.
    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// Lines written to stdout so far (JSON logs).
    pub fn logs(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits up to `limit` for a JSON log line matching `pred`. Logs are written by a
    /// background thread, so a line can arrive just after the answer that caused it.
    pub async fn wait_for_log(
        &self,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.json_logs().iter().any(&pred) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Log lines parsed as JSON (lines that are not JSON are skipped).
    pub fn json_logs(&self) -> Vec<serde_json::Value> {
        self.logs()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Peak resident set size (VmHWM) in KiB, from /proc.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status")
    }
}

impl Drop for Opsgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub type HttpClient = Client<HttpConnector, TestBody>;

/// An HTTP/1.1 client that opens a new connection for every request.
pub fn http1() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http()
}

/// An HTTP/2 client speaking h2c with prior knowledge.
pub fn h2c() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A response read whole.
pub struct Answer {
    pub status: StatusCode,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends `req` and reads the whole response (10 s limit).
pub async fn send(client: &HttpClient, req: Request<TestBody>) -> Answer {
    let what = format!("{} {}", req.method(), req.uri());
    let fut = async {
        let resp = client.request(req).await.unwrap_or_else(|e| {
            panic!("{what}: {e:?}");
        });
        read_all(resp).await
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 10s"))
}

pub async fn read_all(resp: Response<Incoming>) -> Answer {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    }
}

/// The `/_ops/breakers` entry of breaker `name`, from the admin port at `admin`.
pub async fn breaker(admin: SocketAddr, name: &str) -> serde_json::Value {
    let answer = get(&format!("http://{admin}/_ops/breakers"), &[]).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    answer.json()["breakers"]
        .as_array()
        .expect("a breakers list")
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no breaker {name} in {}", answer.text()))
        .clone()
}

/// GET `url` with extra headers, over a new HTTP/1.1 connection.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut b = Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(&http1(), b.body(full(Bytes::new())).unwrap()).await
}

/// Sends `method url` with extra headers and a body over a new HTTP/1.1 connection.
pub async fn request(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(&http1(), b.body(full(body.to_owned())).unwrap()).await
}

/// Writes `request` on a new connection and reads until the server closes it (5 s limit).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(request).await?;
        let mut out = Vec::new();
        match s.read_to_end(&mut out).await {
            Ok(_) => Ok(out),
            // A reset after the answer still leaves the answer readable.
            Err(_) if !out.is_empty() => Ok(out),
            Err(e) => Err(e),
        }
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no close within 5s"))?
}

/// Status code of a raw HTTP/1.x response.
/// Reads one response with a `content-length` body from `sock`; returns its head and body.
pub async fn read_response(sock: &mut TcpStream) -> (String, Vec<u8>) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf))
            .await
            .expect("no response within 5s")
            .unwrap();
        assert!(
            n > 0,
            "closed before a response: {:?}",
            String::from_utf8_lossy(&data)
        );
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    while data.len() < head_end + len {
        let n = sock.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed mid-body");
        data.extend_from_slice(&buf[..n]);
    }
    (head, data[head_end..head_end + len].to_vec())
}

pub fn raw_status(resp: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(resp);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"))
}
