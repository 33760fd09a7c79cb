//! The idemgate binary as a child process on free loopback ports, for tests
//! that signal it (SIGTERM, SIGKILL) or read its logs.
#![allow(dead_code)]

use std::io::Read;
use std::process::{Child, Command, Stdio};
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
}

impl Proc {
    /// Starts idemgate on free ports. A port taken by another test between
    /// the probe and the bind is tried again on new ones; any other exit
    /// before the admin listener answers fails with what it logged.
    pub async fn start(upstream: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        for _ in 0..5 {
            match Self::try_start(upstream, extra, env).await {
                Ok(p) => return p,
                Err(log) if log.contains("cannot listen") => continue,
                Err(log) => panic!("idemgate did not start: {log}"),
            }
        }
        panic!("idemgate did not start: no free ports in five tries");
    }

    async fn try_start(
        upstream: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self, String> {
        let proxy: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_idemgate"));
        cmd.args([
            "--upstream",
            upstream,
            "--listen",
            &proxy.to_string(),
            "--admin-listen",
            &admin.to_string(),
        ])
        .args(extra)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let child = cmd.spawn().unwrap();
        let mut p = Proc {
            child,
            proxy,
            admin,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(admin).await.is_err() {
            if let Ok(Some(_)) = p.child.try_wait() {
                let mut log = String::new();
                if let Some(mut e) = p.child.stderr.take() {
                    let _ = e.read_to_string(&mut log);
                }
                return Err(log);
            }
            assert!(
                Instant::now() < deadline,
                "idemgate did not start within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(p)
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
        let mut log = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut log)
            .unwrap();
        (status.code(), log)
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
