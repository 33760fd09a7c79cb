//! Real PostgreSQL servers for the tests, from Debian's `postgresql`
//! package: a data folder of their own (`initdb`), a free loopback port,
//! stopped and removed when dropped; never the system's service. Run as the
//! `postgres` user when the tests run as root (the server refuses root).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// The folder with PostgreSQL's server programs (the newest installed).
fn bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let v: u32 = e.file_name().to_string_lossy().parse().ok()?;
                    Some((v, e.path().join("bin")))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    let dir = versions.pop().map(|(_, d)| d).unwrap_or_default();
    assert!(
        dir.join("initdb").is_file(),
        "PostgreSQL is not installed: run the tests through scripts/test.sh, which installs it"
    );
    dir
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `program args...` as the user the server runs as.
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn temp_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "idemgate-pg-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    if is_root() {
        let _ = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&d)
            .status();
    }
    d
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One PostgreSQL server.
pub struct PostgresServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    settings: Vec<String>,
}

impl PostgresServer {
    /// A fresh server, every commit flushed (`fsync` on: durability tests
    /// rely on it), `pg_stat_statements` loaded.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A fresh server with extra `-c name=value` settings.
    pub fn start_with(settings: &[&str]) -> Self {
        Self::run(Self::init(), free_port(), settings)
    }

    /// A fresh server that offers TLS with this certificate and key (PEM)
    /// and still takes connections without it.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = Self::init();
        for (name, text) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = dir.join("data").join(name);
            std::fs::write(&path, text).unwrap();
            // The server refuses a key that others can read.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            if is_root() {
                let _ = Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(&path)
                    .status();
            }
        }
        Self::run(dir, free_port(), &["ssl=on"])
    }

    /// A new data folder (`initdb`), every client on loopback trusted; its
    /// parent folder is returned.
    fn init() -> PathBuf {
        let dir = temp_dir();
        let data = dir.join("data");
        let out = as_server_user(&bin_dir().join("initdb"))
            .args(["-D"])
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("initdb failed to run");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhost all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        dir
    }

    /// A server on the data folder `dir/data` (made by `initdb` or
    /// `pg_basebackup`).
    fn run(dir: PathBuf, port: u16, settings: &[&str]) -> Self {
        let mut s = PostgresServer {
            port,
            dir,
            child: None,
            settings: settings.iter().map(|s| s.to_string()).collect(),
        };
        s.spawn();
        s
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn spawn(&mut self) {
        let mut cmd = as_server_user(&bin_dir().join("postgres"));
        cmd.arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .args(["-c", "max_connections=300"])
            .args(["-c", "shared_preload_libraries=pg_stat_statements"])
            .args(["-c", "wal_level=replica", "-c", "max_wal_senders=5"])
            .args(["-c", "logging_collector=off"]);
        for s in &self.settings {
            cmd.arg("-c").arg(s);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("cannot open the server log");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start postgres");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.psql("SELECT 1").is_some_and(|o| o.trim() == "1") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(10).collect();
        panic!(
            "postgres on {} did not come up: {}",
            self.port,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs one SQL command with psql; its unaligned output, or `None`.
    pub fn psql(&self, sql: &str) -> Option<String> {
        let out = Command::new(bin_dir().join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-XAtq", "-c", sql])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// SIGKILLs the server and every process it started, as when its
    /// machine dies.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // The postmaster (under runuser, runuser's child) and its
            // backends, listed before the kill: once it is dead they are
            // no longer its children.
            let postmaster = std::fs::read_to_string(self.data().join("postmaster.pid"))
                .ok()
                .and_then(|s| s.lines().next().map(str::to_owned));
            let mut pids: Vec<String> = Vec::new();
            if let Some(pm) = &postmaster {
                pids.push(pm.clone());
                if let Ok(o) = Command::new("pgrep").args(["-P", pm]).output() {
                    pids.extend(
                        String::from_utf8_lossy(&o.stdout)
                            .split_whitespace()
                            .map(str::to_owned),
                    );
                }
            }
            let _ = c.kill();
            let _ = c.wait();
            if !pids.is_empty() {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .args(&pids)
                    .stderr(Stdio::null())
                    .status();
            }
            // Until every one of them is gone (the shared memory they hold
            // keeps a new postmaster from starting).
            let deadline = Instant::now() + Duration::from_secs(10);
            while pids
                .iter()
                .any(|p| Path::new(&format!("/proc/{p}")).exists())
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A standby of this server streaming from it (`pg_basebackup -R`),
    /// synchronous when `sync` (this server then waits for it on commit).
    pub fn standby(&self, sync: bool) -> PostgresServer {
        let dir = temp_dir();
        let data = dir.join("data");
        let out = as_server_user(&bin_dir().join("pg_basebackup"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .arg("-D")
            .arg(&data)
            .args(["-R", "-X", "stream", "-c", "fast"])
            .output()
            .expect("pg_basebackup failed to run");
        assert!(
            out.status.success(),
            "pg_basebackup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Named, so the primary can wait for it by name.
        let auto = data.join("postgresql.auto.conf");
        let conf = std::fs::read_to_string(&auto).unwrap_or_default();
        let conf = conf.replace(
            "primary_conninfo = '",
            "primary_conninfo = 'application_name=standby ",
        );
        std::fs::write(&auto, conf).unwrap();
        let standby = Self::run(dir, free_port(), &[]);
        if sync {
            self.psql("ALTER SYSTEM SET synchronous_standby_names = 'standby'")
                .unwrap();
            self.psql("SELECT pg_reload_conf()").unwrap();
        }
        // Streaming (and, when asked, counted as synchronous) before use.
        let deadline = Instant::now() + Duration::from_secs(30);
        let want = if sync { "sync" } else { "async" };
        while self
            .psql("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby'")
            .is_none_or(|s| s.trim() != want)
        {
            assert!(Instant::now() < deadline, "the standby did not attach");
            std::thread::sleep(Duration::from_millis(50));
        }
        standby
    }

    /// Promotes a standby to primary (`pg_ctl promote`) and waits until it
    /// takes writes.
    pub fn promote(&self) {
        let out = as_server_user(&bin_dir().join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["promote", "-w"])
            .output()
            .expect("pg_ctl failed to run");
        assert!(
            out.status.success(),
            "pg_ctl promote: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .psql("SELECT pg_is_in_recovery()")
            .is_none_or(|s| s.trim() != "f")
        {
            assert!(Instant::now() < deadline, "the standby was not promoted");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One server shared by the tests that run at the same time (each uses a
/// schema of its own): started by the first, stopped when the last lets go.
pub fn shared_postgres() -> Arc<PostgresServer> {
    static SHARED: Mutex<Weak<PostgresServer>> = Mutex::new(Weak::new());
    let mut slot = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(live) = slot.upgrade() {
        return live;
    }
    let fresh = Arc::new(PostgresServer::start());
    *slot = Arc::downgrade(&fresh);
    fresh
}

/// A schema name no other test of this run uses.
pub fn schema(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let tag: String = tag.chars().take(24).collect();
    format!(
        "t_{tag}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The `[store]` section for `url`, a schema of its own, a short timeout.
pub fn store_toml(url: &str, schema: &str) -> String {
    format!(
        "[store]\nbackend = \"postgres\"\nurl = \"{url}\"\nschema = \"{schema}\"\ntimeout = \"1s\"\n"
    )
}
