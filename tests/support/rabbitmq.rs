//! A real RabbitMQ node for tests (Debian's rabbitmq-server): its own node
//! name, AMQP, distribution and epmd ports on loopback, its own data
//! folder; killed (with its epmd) and its files removed on drop. And a
//! small AMQP client over amqprs for the tests' side: declare, publish,
//! count, read. (Also compiled into `benches/delivery_amqp.rs`, so it
//! names nothing else of the tests' support.)
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use amqprs::channel::{
    BasicGetArguments, BasicPublishArguments, Channel, ExchangeDeclareArguments,
    QueueBindArguments, QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{BasicProperties, FieldTable, FieldValue};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// A loopback port free when asked (bound, then let go).
fn free() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

pub struct RabbitServer {
    pub port: u16,
    dist_port: u16,
    epmd_port: u16,
    node: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl RabbitServer {
    pub fn start() -> Self {
        assert!(
            std::path::Path::new(SERVER).exists(),
            "rabbitmq-server is not installed: run the tests through scripts/test.sh, which installs it"
        );
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("idemgate-rabbit-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = RabbitServer {
            port: free(),
            dist_port: free(),
            epmd_port: free(),
            node: format!("idemgate{}n{n}@localhost", std::process::id()),
            dir,
            child: None,
        };
        std::fs::write(s.dir.join("enabled_plugins"), "[].\n").unwrap();
        std::fs::write(
            s.dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{}\n\
                 # A test machine's disk may be nearly full: do not block publishers.\n\
                 disk_free_limit.absolute = 1\n",
                s.port
            ),
        )
        .unwrap();
        s.spawn();
        s
    }

    /// Starts the node and waits until it takes AMQP connections. A port
    /// picked free can be taken before the node binds it (the suite's own
    /// client connections draw from the same range): then the node stops
    /// at once (`nodistribution` when its epmd could not listen), and it is
    /// started again on new distribution and epmd ports, up to three times.
    fn spawn(&mut self) {
        for attempt in 1..=3 {
            match self.spawn_once() {
                Ok(()) => return,
                Err(status) if attempt < 3 => {
                    eprintln!(
                        "rabbitmq-server on {} stopped as it started ({status}); again on new distribution and epmd ports:\n{}",
                        self.port,
                        self.log_tail(5)
                    );
                    self.dist_port = free();
                    self.epmd_port = free();
                }
                Err(status) => panic!(
                    "rabbitmq-server on {} stopped as it started, three times (last: {status}); its logs:\n{}",
                    self.port,
                    self.log_tail(40)
                ),
            }
        }
    }

    /// One start: `Err` with the start script's exit status if it ended
    /// before the node took connections.
    fn spawn_once(&mut self) -> Result<(), std::process::ExitStatus> {
        let d = &self.dir;
        // What the start script and erl print (a port already taken, say)
        // goes beside the node's logs, for `log_tail`.
        std::fs::create_dir_all(d.join("log")).unwrap();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("log").join("rabbitmq-server.out"))
            .unwrap();
        let child = Command::new(SERVER)
            .current_dir(d)
            .env("HOME", d)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            // Its own process group: the script, erl and beam die together.
            .process_group(0)
            .spawn()
            .expect("cannot start rabbitmq-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.kill();
                stop_epmd(self.epmd_port); // if it started
                return Err(status);
            }
            // The folder goes on drop: its logs go into the message.
            assert!(
                Instant::now() < deadline,
                "rabbitmq-server on {} did not come up within 60 s; its logs:\n{}",
                self.port,
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// SIGKILLs the node (its messages are kept only where durable and
    /// persistent).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", c.id())])
                .status();
            let _ = c.wait();
        }
    }

    /// The node's logs for a failure's message: every line about starting,
    /// recovering or queues, then the last `n` lines.
    pub fn log_tail(&self, n: usize) -> String {
        let mut out = String::new();
        if let Ok(dir) = std::fs::read_dir(self.dir.join("log")) {
            for f in dir.flatten() {
                let text = std::fs::read_to_string(f.path()).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                for l in &lines {
                    let low = l.to_ascii_lowercase();
                    if [
                        "recover",
                        "queue",
                        "starting rabbitmq",
                        "time to start",
                        "mnesia",
                        "node down",
                        "crash",
                    ]
                    .iter()
                    .any(|w| low.contains(w))
                        && !low.contains("accepting amqp")
                    {
                        out += l;
                        out += "\n";
                    }
                }
                out += &format!("== {}\n", f.path().display());
                out += &lines[lines.len().saturating_sub(n)..].join("\n");
                out += "\n";
            }
        }
        out
    }

    /// Stops it cleanly (SIGTERM: the node flushes its database and
    /// message store) and starts it again on the same ports and data.
    pub fn restart_cleanly(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(60);
            while c.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    self.child = Some(c);
                    self.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.spawn();
    }

    /// Kills it and starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A connection and a channel of the tests' own.
    pub async fn channel(&self) -> (Connection, Channel) {
        let args = OpenConnectionArguments::new("127.0.0.1", self.port, "guest", "guest");
        let deadline = Instant::now() + Duration::from_secs(30);
        let conn = loop {
            match Connection::open(&args).await {
                Ok(c) => break c,
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot connect: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let ch = conn.open_channel(None).await.unwrap();
        (conn, ch)
    }
}

impl Drop for RabbitServer {
    fn drop(&mut self) {
        self.kill();
        stop_epmd(self.epmd_port);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Stops the epmd on `port` (it runs detached from the node's process
/// group); epmd refuses while it still lists the node it just lost.
fn stop_epmd(port: u16) {
    for _ in 0..50 {
        let out = Command::new("epmd")
            .args(["-port", &port.to_string(), "-kill"])
            .output();
        let Ok(out) = out else { break };
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if said.contains("Killed") || said.contains("Cannot connect") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Declares a durable queue, with `dlx` as its dead-letter exchange.
pub async fn declare_queue(ch: &Channel, queue: &str, dlx: Option<&str>) {
    let mut args = FieldTable::new();
    if let Some(x) = dlx {
        args.insert(
            "x-dead-letter-exchange".try_into().unwrap(),
            FieldValue::S(x.try_into().unwrap()),
        );
    }
    ch.queue_declare(
        QueueDeclareArguments::durable_client_named(queue)
            .arguments(args)
            .finish(),
    )
    .await
    .unwrap();
}

/// Declares a fanout exchange and a durable queue bound to it.
pub async fn declare_exchange_to(ch: &Channel, exchange: &str, queue: &str) {
    ch.exchange_declare(
        ExchangeDeclareArguments::new(exchange, "fanout")
            .durable(true)
            .finish(),
    )
    .await
    .unwrap();
    declare_queue(ch, queue, None).await;
    ch.queue_bind(QueueBindArguments::new(queue, exchange, ""))
        .await
        .unwrap();
}

/// A persistent message's properties with `message_id` (none when empty)
/// and `headers`.
pub fn props(message_id: &str, headers: &[(&str, &str)]) -> BasicProperties {
    let mut p = BasicProperties::default();
    p.with_persistence(true);
    if !message_id.is_empty() {
        p.with_message_id(message_id);
    }
    let mut h = FieldTable::new();
    for (k, v) in headers {
        h.insert(
            (*k).try_into().unwrap(),
            FieldValue::S((*v).try_into().unwrap()),
        );
    }
    p.with_headers(h);
    p
}

/// Publishes `body` to `queue` through the default exchange.
pub async fn publish(ch: &Channel, queue: &str, props: BasicProperties, body: &[u8]) {
    ch.basic_publish(props, body.to_vec(), BasicPublishArguments::new("", queue))
        .await
        .unwrap();
}

/// Messages ready in `queue` (not those delivered and not yet
/// acknowledged).
pub async fn ready(ch: &Channel, queue: &str) -> u32 {
    let (_, n, _) = ch
        .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
        .await
        .unwrap()
        .unwrap();
    n
}

/// Takes every message ready in `queue`.
pub async fn drain(ch: &Channel, queue: &str) -> Vec<(BasicProperties, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some((_, p, body)) = ch
        .basic_get(BasicGetArguments::new(queue).no_ack(true).finish())
        .await
        .unwrap()
    {
        out.push((p, body));
    }
    out
}

/// A header of `p` as text.
pub fn header(p: &BasicProperties, name: &str) -> Option<String> {
    let v = p.headers()?.get(&name.try_into().ok()?)?;
    match v {
        FieldValue::S(s) => Some(AsRef::<String>::as_ref(s).clone()),
        FieldValue::l(n) => Some(n.to_string()),
        FieldValue::I(n) => Some(n.to_string()),
        _ => None,
    }
}
