//! A throwaway PostgreSQL cluster under /tmp, run as the `postgres` OS user (it refuses root).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct PgServer {
    pub port: u16,
    dir: tempfile::TempDir,
    uid: u32,
    gid: u32,
    child: Option<Child>,
}

fn id_of(flag: &str) -> u32 {
    let out = Command::new("id")
        .args([flag, "postgres"])
        .output()
        .expect("id");
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .expect("postgres OS user")
}

impl PgServer {
    /// initdb (trust auth, user `postgres`) and start.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("opsgate-pg-")
            .tempdir_in("/tmp")
            .unwrap();
        let (uid, gid) = (id_of("-u"), id_of("-g"));
        let status = Command::new("chown")
            .args([format!("{uid}:{gid}"), dir.path().display().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let data = dir.path().join("data");
        let status = Command::new(Path::new(BIN).join("initdb"))
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale",
                "C",
                "-D",
            ])
            .arg(&data)
            .env("LC_ALL", "C")
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "initdb failed");
        let mut server = PgServer {
            port: super::free_port(),
            dir,
            uid,
            gid,
            child: None,
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts (again) on the same port and data directory; waits until it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(Path::new(BIN).join("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .env("LC_ALL", "C")
            .uid(self.uid)
            .gid(self.gid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        super::wait_listening(self.port, Duration::from_secs(10));
    }

    /// Immediate shutdown (SIGQUIT): clients are dropped at once, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-QUIT", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.kill();
    }
}
