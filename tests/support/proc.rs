//! The idemgate binary as a child process on free loopback ports, for tests
//! that signal it (SIGTERM, SIGKILL) or read its logs.
#![allow(dead_code)]

use std::io::BufRead;
use std::io::BufReader;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Proc {
    pub child: Child,
    pub proxy: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    /// Everything idemgate has logged so far, read as it comes by `reader`
    /// (a pipe nobody read would stop a chatty process once it filled).
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Proc {
    /// Starts idemgate on ports the OS picks (`127.0.0.1:0`) and learns
    /// them from its start line, which names the addresses bound. Ports
    /// probed free beforehand could be taken by another test's server in
    /// between, and then the wait for the admin port was answered by that
    /// server while this idemgate had exited. So `env` must leave
    /// idemgate's `info` lines on. An exit before the start line fails
    /// with what it logged.
    pub async fn start(upstream: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_idemgate"));
        cmd.args([
            "--upstream",
            upstream,
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut lines = BufReader::new(stderr);
                let mut line = Vec::new();
                while matches!(lines.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                    log.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&line));
                    line.clear();
                }
            })
        };
        let mut p = Proc {
            child,
            proxy: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            log,
            reader: Some(reader),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let bound = p
                .log
                .lock()
                .unwrap()
                .lines()
                .filter(|line| line.contains("idemgate proxy started"))
                .find_map(|line| Some((field(line, "listen")?, field(line, "admin")?)));
            if let Some((proxy, admin)) = bound {
                p.proxy = proxy;
                p.admin = admin;
                break;
            }
            if let Ok(Some(_)) = p.child.try_wait() {
                panic!("idemgate did not start: {}", p.take_log());
            }
            assert!(
                Instant::now() < deadline,
                "idemgate did not log its start within 20 s: {}",
                p.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The start line comes after both binds and before serving: wait
        // for the admin listener to answer, as callers expect.
        while tokio::net::TcpStream::connect(p.admin).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "idemgate's admin listener did not answer within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        p
    }

    /// Everything logged, once the process has exited and its stderr closed.
    fn take_log(&mut self) -> String {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for exit; returns the exit code and everything logged.
    /// (A test that fails before this still stops the process: see Drop.)
    pub fn finish(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "idemgate did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        (status.code(), self.take_log())
    }
}

/// A failing test must not leave idemgate running (CI starts clean, and so
/// should the next test): the process is killed if still there.
impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A field's value in a log line, text (`name=value`) or JSON
/// (`"name":"value"`), as a socket address.
pub fn field(line: &str, name: &str) -> Option<std::net::SocketAddr> {
    let text = format!(" {name}=");
    let json = format!("\"{name}\":\"");
    let at = line
        .find(&text)
        .map(|i| i + text.len())
        .or_else(|| line.find(&json).map(|i| i + json.len()))?;
    let rest = &line[at..];
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '"')
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}
