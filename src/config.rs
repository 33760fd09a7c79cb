//! Configuration in two steps: loose input → checked [`Config`].
//!
//! The file is read into [`FileConfig`], whose leaves are untyped TOML values,
//! so that [`Config::from_parts`] can report *every* problem with its key path
//! (`idempotency.record_ttl: "forever" is not a duration ...`) instead of
//! stopping at the first type error. CLI flags and `IDEMGATE_*` variables
//! (clap reads both, flag first) are laid over the file: flag > env > file >
//! default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use http::{HeaderName, Method, Uri};
use serde::Deserialize;
use toml::Value;

/// The command line. Every run flag also reads its `IDEMGATE_*` variable.
#[derive(Debug, Parser)]
#[command(
    name = "idemgate",
    version,
    about = "Idempotency and deduplication sidecar"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub args: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a config file: exit 0 and print the effective config, or list
    /// every problem and exit 2.
    CheckConfig,
    /// Run a toy payments API behind idemgate and show what duplicates do.
    Demo,
    /// Exit 0 if the admin listener's /healthz answers 200 (for container
    /// health checks without curl); `--ready` checks /readyz instead.
    Healthcheck {
        #[arg(long)]
        ready: bool,
    },
}

/// Flags that override the config file.
#[derive(Debug, Default, Clone, Args)]
pub struct RunArgs {
    /// TOML config file (see config/idemgate.example.toml).
    #[arg(long, env = "IDEMGATE_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Proxy listener address [default: 127.0.0.1:8081].
    #[arg(long, env = "IDEMGATE_LISTEN", global = true)]
    pub listen: Option<String>,
    /// Admin listener address [default: 127.0.0.1:9901].
    #[arg(long, env = "IDEMGATE_ADMIN_LISTEN", global = true)]
    pub admin_listen: Option<String>,
    /// The API behind the proxy, e.g. http://127.0.0.1:8080. Without it only
    /// the admin listener runs (dedup-only mode).
    #[arg(long, env = "IDEMGATE_UPSTREAM", global = true)]
    pub upstream: Option<String>,
    /// Redis standalone URL (redis:// or rediss://).
    #[arg(long, env = "IDEMGATE_REDIS", global = true)]
    pub redis: Option<String>,
    /// Redis Cluster seed node URL (repeatable; comma-separated in the env).
    #[arg(
        long = "redis-cluster",
        env = "IDEMGATE_REDIS_CLUSTER",
        value_delimiter = ',',
        global = true
    )]
    pub redis_cluster: Vec<String>,
    /// Log format: text or json. Level from RUST_LOG.
    #[arg(long, env = "IDEMGATE_LOG_FORMAT", global = true)]
    pub log_format: Option<String>,
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// `http://host:port`; `None` runs dedup-only (no proxy listener).
    pub upstream: Option<Uri>,
    pub upstream_timeout: Duration,
    /// How long SIGTERM waits for in-flight requests.
    pub drain_timeout: Duration,
    /// How long a client may take to send request headers.
    pub header_read_timeout: Duration,
    /// How long a client may take to send a covered request's body (it is
    /// buffered before the lease is taken).
    pub body_read_timeout: Duration,
    pub log_format: LogFormat,
    pub store: StoreConfig,
    pub policies: Policies,
    pub dedup: DedupConfig,
}

/// Defaults and limits of the consumer dedup API (`[dedup]`).
#[derive(Debug, Clone, PartialEq)]
pub struct DedupConfig {
    /// Lease of a claim that names no `lease_ms`.
    pub lease_ttl: Duration,
    /// How long completed (and leased, pending) records are kept, unless a
    /// call says `retention_ms`/`ttl_ms`. Must outlast the broker's
    /// redelivery horizon.
    pub retention: Duration,
    /// How long dead letters are kept.
    pub failed_retention: Duration,
    /// Claims allowed per key before it fails, unless a claim says.
    pub max_attempts: u32,
    pub max_key_length: usize,
    /// Largest `result` a complete call may record (serialized JSON).
    pub max_result_bytes: u64,
    /// Most items in one `:batch` call.
    pub max_batch: usize,
    /// Largest request body on the dedup API.
    pub max_request_body: u64,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            lease_ttl: Duration::from_secs(30),
            retention: Duration::from_secs(24 * 3600),
            failed_retention: Duration::from_secs(7 * 24 * 3600),
            max_attempts: 10,
            max_key_length: 512,
            max_result_bytes: 64 << 10,
            max_batch: 1000,
            max_request_body: 4 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis,
    RedisCluster,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// 503 with Retry-After; the upstream is not called.
    Reject,
    /// Forward without idempotency, logged and counted.
    PassThrough,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub backend: Backend,
    pub urls: Vec<String>,
    pub key_prefix: String,
    pub on_store_error: OnStoreError,
    /// Upper bound on any one store call.
    pub timeout: Duration,
    /// Memory store bound; new keys get 503 beyond it.
    pub max_entries: usize,
}

/// The idempotency rules for one path (the defaults, or a route's).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub header: HeaderName,
    pub methods: Vec<Method>,
    pub required: bool,
    pub record_ttl: Duration,
    pub lease_ttl: Duration,
    pub wait_timeout: Duration,
    pub scope_headers: Vec<HeaderName>,
    pub fingerprint_headers: Vec<HeaderName>,
    pub max_key_length: usize,
    pub max_request_body: u64,
    pub max_response_body: u64,
    pub uncacheable_statuses: Vec<u16>,
    pub replay_strip_headers: Vec<HeaderName>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            header: HeaderName::from_static("idempotency-key"),
            methods: vec![Method::POST, Method::PATCH],
            required: false,
            record_ttl: Duration::from_secs(24 * 3600),
            lease_ttl: Duration::from_secs(30),
            wait_timeout: Duration::from_secs(10),
            scope_headers: vec![http::header::AUTHORIZATION],
            fingerprint_headers: vec![http::header::CONTENT_TYPE],
            max_key_length: 255,
            max_request_body: 1 << 20,
            max_response_body: 4 << 20,
            uncacheable_statuses: vec![408, 429, 502, 503, 504],
            replay_strip_headers: vec![http::header::SET_COOKIE],
        }
    }
}

impl Policy {
    pub fn covers(&self, method: &Method) -> bool {
        self.methods.iter().any(|m| m == method)
    }
}

/// The default policy and the `[[routes]]` that override it; first match wins.
#[derive(Debug, Clone)]
pub struct Policies {
    pub default: Arc<Policy>,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub pattern: PathPattern,
    pub policy: Arc<Policy>,
}

impl Policies {
    pub fn for_path(&self, path: &str) -> &Arc<Policy> {
        self.routes
            .iter()
            .find(|r| r.pattern.matches(path))
            .map_or(&self.default, |r| &r.policy)
    }
}

impl Default for Policies {
    fn default() -> Self {
        Policies {
            default: Arc::new(Policy::default()),
            routes: Vec::new(),
        }
    }
}

/// A path pattern: `*` matches within one segment, a `**` segment matches any
/// number of segments (zero included, so `/a/**` matches `/a` too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    text: String,
}

impl PathPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        if !text.starts_with('/') {
            return Err(format!("{text:?} must start with '/'"));
        }
        Ok(PathPattern {
            text: text.to_owned(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, path: &str) -> bool {
        let pat: Vec<&str> = self.text.split('/').collect();
        let segs: Vec<&str> = path.split('/').collect();
        match_segments(&pat, &segs)
    }
}

/// Greedy matching with one backtrack point for the last `**`, as in the
/// classic wildcard algorithm: linear in practice, never exponential.
fn match_segments(pat: &[&str], segs: &[&str]) -> bool {
    let (mut p, mut s) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while s < segs.len() {
        if p < pat.len() && pat[p] == "**" {
            star = Some((p, s));
            p += 1;
        } else if p < pat.len() && match_segment(pat[p].as_bytes(), segs[s].as_bytes()) {
            p += 1;
            s += 1;
        } else if let Some((sp, ss)) = star {
            p = sp + 1;
            s = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|x| *x == "**")
}

/// `*` matches any run of characters within a segment.
fn match_segment(pat: &[u8], seg: &[u8]) -> bool {
    let (mut p, mut s) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while s < seg.len() {
        if p < pat.len() && pat[p] == b'*' {
            star = Some((p, s));
            p += 1;
        } else if p < pat.len() && pat[p] == seg[s] {
            p += 1;
            s += 1;
        } else if let Some((sp, ss)) = star {
            p = sp + 1;
            s = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// The file as written: every leaf untyped so each problem can be named.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    listen: Option<Value>,
    admin_listen: Option<Value>,
    upstream: Option<Value>,
    upstream_timeout: Option<Value>,
    drain_timeout: Option<Value>,
    header_read_timeout: Option<Value>,
    body_read_timeout: Option<Value>,
    log_format: Option<Value>,
    store: Option<StoreFile>,
    idempotency: Option<PolicyFile>,
    routes: Option<Vec<PolicyFile>>,
    dedup: Option<DedupFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DedupFile {
    lease_ttl: Option<Value>,
    retention: Option<Value>,
    failed_retention: Option<Value>,
    max_attempts: Option<Value>,
    max_key_length: Option<Value>,
    max_result_bytes: Option<Value>,
    max_batch: Option<Value>,
    max_request_body: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    backend: Option<Value>,
    urls: Option<Value>,
    key_prefix: Option<Value>,
    on_store_error: Option<Value>,
    timeout: Option<Value>,
    max_entries: Option<Value>,
}

/// `[idempotency]` and each `[[routes]]` entry (which adds `path`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    path: Option<Value>,
    header: Option<Value>,
    methods: Option<Value>,
    required: Option<Value>,
    record_ttl: Option<Value>,
    lease_ttl: Option<Value>,
    wait_timeout: Option<Value>,
    scope_headers: Option<Value>,
    fingerprint_headers: Option<Value>,
    max_key_length: Option<Value>,
    max_request_body: Option<Value>,
    max_response_body: Option<Value>,
    uncacheable_statuses: Option<Value>,
    replay_strip_headers: Option<Value>,
}

/// Every problem found, one line each, each naming its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

impl FileConfig {
    /// Parses TOML text. A syntax or shape error is one line with its place.
    pub fn parse(text: &str) -> Result<Self, ConfigErrors> {
        toml::from_str(text).map_err(|e| {
            let place = e.span().map(|s| {
                let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                format!(" (line {line})")
            });
            let msg = e.message().trim().replace('\n', " ");
            ConfigErrors(vec![format!("config{}: {msg}", place.unwrap_or_default())])
        })
    }

    /// Reads and parses a file.
    pub fn read(path: &Path) -> Result<Self, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("{}: cannot read: {e}", path.display())]))?;
        Self::parse(&text).map_err(|ConfigErrors(v)| {
            ConfigErrors(
                v.into_iter()
                    .map(|m| format!("{}: {m}", path.display()))
                    .collect(),
            )
        })
    }
}

impl Config {
    /// Loads the file named by `args.config` (if any) and lays the flags over it.
    pub fn load(args: &RunArgs) -> Result<Self, ConfigErrors> {
        let file = match &args.config {
            Some(p) => FileConfig::read(p)?,
            None => FileConfig::default(),
        };
        Self::from_parts(file, args)
    }

    /// Validates file values with flag/env overrides; lists every problem.
    pub fn from_parts(file: FileConfig, args: &RunArgs) -> Result<Self, ConfigErrors> {
        let mut c = Checker::default();
        let flag = |name: &str, env: &str| format!("--{name} (or {env})");

        let listen = match &args.listen {
            Some(v) => c.addr(
                &flag("listen", "IDEMGATE_LISTEN"),
                &Value::String(v.clone()),
            ),
            None => file.listen.as_ref().and_then(|v| c.addr("listen", v)),
        };
        let admin_listen = match &args.admin_listen {
            Some(v) => c.addr(
                &flag("admin-listen", "IDEMGATE_ADMIN_LISTEN"),
                &Value::String(v.clone()),
            ),
            None => file
                .admin_listen
                .as_ref()
                .and_then(|v| c.addr("admin_listen", v)),
        };
        let upstream = match &args.upstream {
            Some(v) => c.upstream(
                &flag("upstream", "IDEMGATE_UPSTREAM"),
                &Value::String(v.clone()),
            ),
            None => file
                .upstream
                .as_ref()
                .and_then(|v| c.upstream("upstream", v)),
        };
        let upstream_timeout = c.opt(
            &file.upstream_timeout,
            "upstream_timeout",
            Checker::duration,
        );
        let drain_timeout = c.opt(&file.drain_timeout, "drain_timeout", Checker::duration);
        let header_read_timeout = c.opt(
            &file.header_read_timeout,
            "header_read_timeout",
            Checker::duration,
        );
        let body_read_timeout = c.opt(
            &file.body_read_timeout,
            "body_read_timeout",
            Checker::duration,
        );
        let log_format = match &args.log_format {
            Some(v) => c.log_format(
                &flag("log-format", "IDEMGATE_LOG_FORMAT"),
                &Value::String(v.clone()),
            ),
            None => file
                .log_format
                .as_ref()
                .and_then(|v| c.log_format("log_format", v)),
        };

        let store = c.store(file.store.unwrap_or_default(), args);

        let idem = file.idempotency.unwrap_or_default();
        if idem.path.is_some() {
            c.err(
                "idempotency.path",
                "only [[routes]] entries take a path".into(),
            );
        }
        let default = Arc::new(c.policy("idempotency", &idem, &Policy::default()));
        let mut routes = Vec::new();
        for (i, r) in file.routes.unwrap_or_default().iter().enumerate() {
            let at = format!("routes[{i}]");
            let pattern = match &r.path {
                None => {
                    c.err(&format!("{at}.path"), "is required".into());
                    None
                }
                Some(v) => c.string(&format!("{at}.path"), v).and_then(|s| {
                    PathPattern::parse(&s)
                        .map_err(|e| c.err(&format!("{at}.path"), e))
                        .ok()
                }),
            };
            let policy = Arc::new(c.policy(&at, r, &default));
            if let Some(pattern) = pattern {
                routes.push(Route { pattern, policy });
            }
        }

        let dedup = c.dedup(file.dedup.unwrap_or_default());

        if !c.errors.is_empty() {
            return Err(ConfigErrors(c.errors));
        }
        Ok(Config {
            listen: listen.unwrap_or(([127, 0, 0, 1], 8081).into()),
            admin_listen: admin_listen.unwrap_or(([127, 0, 0, 1], 9901).into()),
            upstream,
            upstream_timeout: upstream_timeout.unwrap_or(Duration::from_secs(60)),
            drain_timeout: drain_timeout.unwrap_or(Duration::from_secs(30)),
            header_read_timeout: header_read_timeout.unwrap_or(Duration::from_secs(10)),
            body_read_timeout: body_read_timeout.unwrap_or(Duration::from_secs(30)),
            log_format: log_format.unwrap_or(LogFormat::Text),
            store,
            policies: Policies { default, routes },
            dedup,
        })
    }

    /// The effective configuration as TOML, for `check-config`.
    pub fn to_toml(&self) -> String {
        use std::fmt::Write;
        let d = |d: Duration| format!("{:?}", humantime::format_duration(d).to_string());
        let names =
            |v: &[HeaderName]| format!("{:?}", v.iter().map(|h| h.as_str()).collect::<Vec<_>>());
        let policy = |out: &mut String, p: &Policy| {
            let methods: Vec<&str> = p.methods.iter().map(|m| m.as_str()).collect();
            let _ = write!(
                out,
                "header = {:?}\nmethods = {:?}\nrequired = {}\nrecord_ttl = {}\nlease_ttl = {}\nwait_timeout = {}\n\
                 scope_headers = {}\nfingerprint_headers = {}\nmax_key_length = {}\nmax_request_body = {}\n\
                 max_response_body = {}\nuncacheable_statuses = {:?}\nreplay_strip_headers = {}\n",
                p.header.as_str(),
                methods,
                p.required,
                d(p.record_ttl),
                d(p.lease_ttl),
                d(p.wait_timeout),
                names(&p.scope_headers),
                names(&p.fingerprint_headers),
                p.max_key_length,
                p.max_request_body,
                p.max_response_body,
                p.uncacheable_statuses,
                names(&p.replay_strip_headers),
            );
        };
        let mut out = String::new();
        let _ = writeln!(out, "listen = {:?}", self.listen.to_string());
        let _ = writeln!(out, "admin_listen = {:?}", self.admin_listen.to_string());
        match &self.upstream {
            Some(u) => {
                let _ = writeln!(out, "upstream = {:?}", u.to_string());
            }
            None => out.push_str("# upstream: not set (dedup-only mode)\n"),
        }
        let _ = writeln!(out, "upstream_timeout = {}", d(self.upstream_timeout));
        let _ = writeln!(out, "drain_timeout = {}", d(self.drain_timeout));
        let _ = writeln!(out, "header_read_timeout = {}", d(self.header_read_timeout));
        let _ = writeln!(out, "body_read_timeout = {}", d(self.body_read_timeout));
        let fmt = match self.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        let _ = writeln!(out, "log_format = {fmt:?}\n\n[store]");
        let s = &self.store;
        let backend = match s.backend {
            Backend::Memory => "memory",
            Backend::Redis => "redis",
            Backend::RedisCluster => "redis-cluster",
        };
        let on_err = match s.on_store_error {
            OnStoreError::Reject => "reject",
            OnStoreError::PassThrough => "pass-through",
        };
        // URLs may carry passwords: show only that they are set.
        let urls: Vec<String> = s.urls.iter().map(|u| redact_url(u)).collect();
        let _ = writeln!(
            out,
            "backend = {backend:?}\nurls = {urls:?}\nkey_prefix = {:?}\non_store_error = {on_err:?}\ntimeout = {}\nmax_entries = {}\n\n[idempotency]",
            s.key_prefix,
            d(s.timeout),
            s.max_entries
        );
        policy(&mut out, &self.policies.default);
        for r in &self.policies.routes {
            let _ = writeln!(out, "\n[[routes]]\npath = {:?}", r.pattern.as_str());
            policy(&mut out, &r.policy);
        }
        let x = &self.dedup;
        let _ = write!(
            out,
            "\n[dedup]\nlease_ttl = {}\nretention = {}\nfailed_retention = {}\nmax_attempts = {}\n\
             max_key_length = {}\nmax_result_bytes = {}\nmax_batch = {}\nmax_request_body = {}\n",
            d(x.lease_ttl),
            d(x.retention),
            d(x.failed_retention),
            x.max_attempts,
            x.max_key_length,
            x.max_result_bytes,
            x.max_batch,
            x.max_request_body
        );
        out
    }
}

/// Replaces a URL's password with `***`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..s + 3], user, &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Collects problems while converting loose values.
#[derive(Default)]
struct Checker {
    errors: Vec<String>,
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

impl Checker {
    fn err(&mut self, path: &str, msg: String) {
        self.errors.push(format!("{path}: {msg}"));
    }

    fn opt<T>(
        &mut self,
        v: &Option<Value>,
        path: &str,
        f: fn(&mut Self, &str, &Value) -> Option<T>,
    ) -> Option<T> {
        v.as_ref().and_then(|v| f(self, path, v))
    }

    fn string(&mut self, path: &str, v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            other => {
                self.err(path, format!("{} is not a string", show(other)));
                None
            }
        }
    }

    fn bool(&mut self, path: &str, v: &Value) -> Option<bool> {
        match v {
            Value::Boolean(b) => Some(*b),
            other => {
                self.err(path, format!("{} is not true or false", show(other)));
                None
            }
        }
    }

    fn uint(&mut self, path: &str, v: &Value, min: i64, max: i64) -> Option<i64> {
        match v {
            Value::Integer(n) if (min..=max).contains(n) => Some(*n),
            Value::Integer(n) => {
                self.err(path, format!("{n} is out of range ({min} to {max})"));
                None
            }
            other => {
                self.err(path, format!("{} is not a whole number", show(other)));
                None
            }
        }
    }

    fn duration(&mut self, path: &str, v: &Value) -> Option<Duration> {
        let parsed = match v {
            Value::String(s) => humantime::parse_duration(s.trim()).ok(),
            _ => None,
        };
        match parsed {
            Some(d) if !d.is_zero() => Some(d),
            Some(_) => {
                self.err(path, format!("{} must be longer than zero", show(v)));
                None
            }
            None => {
                self.err(
                    path,
                    format!(
                        "{} is not a duration (e.g. \"500ms\", \"30s\", \"24h\")",
                        show(v)
                    ),
                );
                None
            }
        }
    }

    fn size(&mut self, path: &str, v: &Value) -> Option<u64> {
        let parsed = match v {
            Value::Integer(n) if *n >= 0 => Some(*n as u64),
            Value::String(s) => parse_size(s),
            _ => None,
        };
        if parsed.is_none() {
            self.err(
                path,
                format!(
                    "{} is not a size (e.g. \"512KiB\", \"1MiB\", or bytes)",
                    show(v)
                ),
            );
        }
        parsed
    }

    fn list(&mut self, path: &str, v: &Value) -> Option<Vec<Value>> {
        match v {
            Value::Array(a) => Some(a.clone()),
            other => {
                self.err(path, format!("{} is not a list", show(other)));
                None
            }
        }
    }

    fn header_name(&mut self, path: &str, v: &Value) -> Option<HeaderName> {
        let s = self.string(path, v)?;
        match HeaderName::from_bytes(s.trim().as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.err(path, format!("{s:?} is not a valid header name"));
                None
            }
        }
    }

    fn each<T>(
        &mut self,
        path: &str,
        v: &Value,
        f: impl Fn(&mut Self, &str, &Value) -> Option<T>,
    ) -> Option<Vec<T>> {
        let items = self.list(path, v)?;
        let before = self.errors.len();
        let out: Vec<T> = items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| f(self, &format!("{path}[{i}]"), item))
            .collect();
        (self.errors.len() == before).then_some(out)
    }

    fn method(&mut self, path: &str, v: &Value) -> Option<Method> {
        let s = self.string(path, v)?;
        match Method::from_bytes(s.trim().to_ascii_uppercase().as_bytes()) {
            Ok(m) => Some(m),
            Err(_) => {
                self.err(path, format!("{s:?} is not an HTTP method"));
                None
            }
        }
    }

    fn addr(&mut self, path: &str, v: &Value) -> Option<SocketAddr> {
        let s = self.string(path, v)?;
        match s.trim().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    path,
                    format!("{s:?} is not an address (e.g. \"127.0.0.1:8081\")"),
                );
                None
            }
        }
    }

    fn upstream(&mut self, path: &str, v: &Value) -> Option<Uri> {
        let s = self.string(path, v)?;
        let uri: Uri = match s.trim().parse() {
            Ok(u) => u,
            Err(_) => {
                self.err(
                    path,
                    format!("{s:?} is not a URL (e.g. \"http://127.0.0.1:8080\")"),
                );
                return None;
            }
        };
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            self.err(
                path,
                format!(
                    "{s:?} must be an http:// URL with a host (e.g. \"http://127.0.0.1:8080\")"
                ),
            );
            return None;
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            self.err(
                path,
                format!("{s:?} must not have a path or query; requests keep their own"),
            );
            return None;
        }
        Some(uri)
    }

    fn log_format(&mut self, path: &str, v: &Value) -> Option<LogFormat> {
        match self.string(path, v)?.as_str() {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            other => {
                self.err(path, format!("{other:?} is not \"text\" or \"json\""));
                None
            }
        }
    }

    fn store(&mut self, f: StoreFile, args: &RunArgs) -> StoreConfig {
        let backend =
            f.backend
                .as_ref()
                .and_then(|v| match self.string("store.backend", v)?.as_str() {
                    "memory" => Some(Backend::Memory),
                    "redis" => Some(Backend::Redis),
                    "redis-cluster" => Some(Backend::RedisCluster),
                    other => {
                        self.err(
                            "store.backend",
                            format!("{other:?} is not \"memory\", \"redis\" or \"redis-cluster\""),
                        );
                        None
                    }
                });
        let urls = f
            .urls
            .as_ref()
            .and_then(|v| self.each("store.urls", v, |c, p, v| c.redis_url(p, v)));
        let on_store_error = f.on_store_error.as_ref().and_then(|v| {
            match self.string("store.on_store_error", v)?.as_str() {
                "reject" => Some(OnStoreError::Reject),
                "pass-through" => Some(OnStoreError::PassThrough),
                other => {
                    self.err(
                        "store.on_store_error",
                        format!("{other:?} is not \"reject\" or \"pass-through\""),
                    );
                    None
                }
            }
        });
        let key_prefix = f.key_prefix.as_ref().and_then(|v| {
            let s = self.string("store.key_prefix", v)?;
            if s.is_empty()
                || s.contains(['{', '}'])
                || s.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                self.err(
                    "store.key_prefix",
                    format!("{s:?} must be non-empty, without spaces or braces"),
                );
                return None;
            }
            Some(s)
        });
        let timeout = self.opt(&f.timeout, "store.timeout", Checker::duration);
        let max_entries = f
            .max_entries
            .as_ref()
            .and_then(|v| self.uint("store.max_entries", v, 1, i64::MAX));

        // Flags choose the backend over the file.
        let (backend, urls) = match (&args.redis, args.redis_cluster.as_slice()) {
            (Some(_), [_, ..]) => {
                self.err(
                    "--redis / --redis-cluster",
                    "give one or the other, not both".into(),
                );
                (Backend::Memory, vec![])
            }
            (Some(url), []) => {
                let u = self.redis_url("--redis (or IDEMGATE_REDIS)", &Value::String(url.clone()));
                (Backend::Redis, u.into_iter().collect())
            }
            (None, seeds @ [_, ..]) => {
                let mut v = Vec::new();
                for s in seeds {
                    v.extend(self.redis_url(
                        "--redis-cluster (or IDEMGATE_REDIS_CLUSTER)",
                        &Value::String(s.clone()),
                    ));
                }
                (Backend::RedisCluster, v)
            }
            (None, []) => (backend.unwrap_or(Backend::Memory), urls.unwrap_or_default()),
        };
        if backend != Backend::Memory && urls.is_empty() && self.errors.is_empty() {
            self.err(
                "store.urls",
                "a Redis backend needs at least one URL".into(),
            );
        }
        if backend == Backend::Redis && urls.len() > 1 {
            self.err(
                "store.urls",
                "the \"redis\" backend takes one URL; use \"redis-cluster\" for several".into(),
            );
        }
        StoreConfig {
            backend,
            urls,
            key_prefix: key_prefix.unwrap_or_else(|| "idemgate".into()),
            on_store_error: on_store_error.unwrap_or(OnStoreError::Reject),
            timeout: timeout.unwrap_or(Duration::from_secs(1)),
            max_entries: max_entries.map_or(1_000_000, |n| n as usize),
        }
    }

    fn dedup(&mut self, f: DedupFile) -> DedupConfig {
        let mut d = DedupConfig::default();
        if let Some(v) = &f.lease_ttl {
            d.lease_ttl = self.duration("dedup.lease_ttl", v).unwrap_or(d.lease_ttl);
        }
        if let Some(v) = &f.retention {
            d.retention = self.duration("dedup.retention", v).unwrap_or(d.retention);
        }
        if let Some(v) = &f.failed_retention {
            d.failed_retention = self
                .duration("dedup.failed_retention", v)
                .unwrap_or(d.failed_retention);
        }
        if let Some(v) = &f.max_attempts {
            d.max_attempts = self
                .uint("dedup.max_attempts", v, 1, 1000)
                .map_or(d.max_attempts, |n| n as u32);
        }
        if let Some(v) = &f.max_key_length {
            d.max_key_length = self
                .uint("dedup.max_key_length", v, 1, 8192)
                .map_or(d.max_key_length, |n| n as usize);
        }
        if let Some(v) = &f.max_result_bytes {
            d.max_result_bytes = self
                .size("dedup.max_result_bytes", v)
                .unwrap_or(d.max_result_bytes);
        }
        if let Some(v) = &f.max_batch {
            d.max_batch = self
                .uint("dedup.max_batch", v, 1, 100_000)
                .map_or(d.max_batch, |n| n as usize);
        }
        if let Some(v) = &f.max_request_body {
            d.max_request_body = self
                .size("dedup.max_request_body", v)
                .unwrap_or(d.max_request_body);
        }
        d
    }

    fn redis_url(&mut self, path: &str, v: &Value) -> Option<String> {
        let s = self.string(path, v)?;
        let s = s.trim().to_owned();
        if !(s.starts_with("redis://") || s.starts_with("rediss://"))
            || s.len() <= "rediss://".len()
        {
            self.err(
                path,
                format!("{:?} is not a redis:// or rediss:// URL", redact_url(&s)),
            );
            return None;
        }
        Some(s)
    }

    /// `base` with the keys `f` sets; problems reported under `at`.
    fn policy(&mut self, at: &str, f: &PolicyFile, base: &Policy) -> Policy {
        let mut p = base.clone();
        let k = |name: &str| format!("{at}.{name}");
        if let Some(v) = &f.header {
            p.header = self.header_name(&k("header"), v).unwrap_or(p.header);
        }
        if let Some(v) = &f.methods {
            p.methods = self
                .each(&k("methods"), v, Checker::method)
                .unwrap_or(p.methods);
        }
        if let Some(v) = &f.required {
            p.required = self.bool(&k("required"), v).unwrap_or(p.required);
        }
        if let Some(v) = &f.record_ttl {
            p.record_ttl = self.duration(&k("record_ttl"), v).unwrap_or(p.record_ttl);
        }
        if let Some(v) = &f.lease_ttl {
            p.lease_ttl = self.duration(&k("lease_ttl"), v).unwrap_or(p.lease_ttl);
        }
        if let Some(v) = &f.wait_timeout {
            p.wait_timeout = self
                .duration(&k("wait_timeout"), v)
                .unwrap_or(p.wait_timeout);
        }
        if let Some(v) = &f.scope_headers {
            p.scope_headers = self
                .each(&k("scope_headers"), v, Checker::header_name)
                .unwrap_or(p.scope_headers);
        }
        if let Some(v) = &f.fingerprint_headers {
            p.fingerprint_headers = self
                .each(&k("fingerprint_headers"), v, Checker::header_name)
                .unwrap_or(p.fingerprint_headers);
        }
        if let Some(v) = &f.max_key_length {
            p.max_key_length = self
                .uint(&k("max_key_length"), v, 1, 8192)
                .map_or(p.max_key_length, |n| n as usize);
        }
        if let Some(v) = &f.max_request_body {
            p.max_request_body = self
                .size(&k("max_request_body"), v)
                .unwrap_or(p.max_request_body);
        }
        if let Some(v) = &f.max_response_body {
            p.max_response_body = self
                .size(&k("max_response_body"), v)
                .unwrap_or(p.max_response_body);
        }
        if let Some(v) = &f.uncacheable_statuses {
            p.uncacheable_statuses = self
                .each(&k("uncacheable_statuses"), v, |c, path, v| {
                    c.uint(path, v, 100, 599).map(|n| n as u16)
                })
                .unwrap_or(p.uncacheable_statuses);
        }
        if let Some(v) = &f.replay_strip_headers {
            p.replay_strip_headers = self
                .each(&k("replay_strip_headers"), v, Checker::header_name)
                .unwrap_or(p.replay_strip_headers);
        }
        if p.lease_ttl < Duration::from_millis(30) {
            self.err(
                &k("lease_ttl"),
                "must be at least 30ms so it can be renewed in time".into(),
            );
        }
        p
    }
}

/// Parses `"1MiB"`, `"512KiB"`, `"2MB"`, `"100B"` or `"4096"`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_parts(FileConfig::parse(text)?, &RunArgs::default())
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = parse("").unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8081");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9901");
        assert!(c.upstream.is_none());
        assert_eq!(c.upstream_timeout, Duration::from_secs(60));
        assert_eq!(c.store.backend, Backend::Memory);
        assert_eq!(c.store.key_prefix, "idemgate");
        assert_eq!(c.store.on_store_error, OnStoreError::Reject);
        assert_eq!(*c.policies.default, Policy::default());
        let p = Policy::default();
        assert_eq!(p.max_request_body, 1024 * 1024);
        assert_eq!(p.max_response_body, 4 * 1024 * 1024);
        assert_eq!(p.uncacheable_statuses, [408, 429, 502, 503, 504]);
    }

    #[test]
    fn the_example_file_is_valid() {
        let text = include_str!("../config/idemgate.example.toml");
        let c = parse(text).unwrap();
        assert_eq!(*c.policies.default, Policy::default());
        assert_eq!(c.dedup, DedupConfig::default());
        assert!(!c.policies.routes.is_empty());
    }

    #[test]
    fn every_problem_is_listed_with_its_path() {
        let err = parse(
            r#"
            listen = "nowhere"
            upstream = "ftp://x"
            [store]
            backend = "etcd"
            [idempotency]
            record_ttl = "forever"
            methods = ["POST", "B@D"]
            max_key_length = 0
            max_request_body = "lots"
            [[routes]]
            required = "yes"
            "#,
        )
        .unwrap_err();
        let lines = err.0.join("\n");
        for want in [
            "listen: \"nowhere\" is not an address",
            "upstream: \"ftp://x\" must be an http:// URL",
            "store.backend: \"etcd\" is not",
            "idempotency.record_ttl: \"forever\" is not a duration",
            "idempotency.methods[1]: \"B@D\" is not an HTTP method",
            "idempotency.max_key_length: 0 is out of range",
            "idempotency.max_request_body: \"lots\" is not a size",
            "routes[0].path: is required",
            "routes[0].required: \"yes\" is not true or false",
        ] {
            assert!(lines.contains(want), "missing {want:?} in:\n{lines}");
        }
        assert_eq!(err.0.len(), 9, "{lines}");
    }

    #[test]
    fn unknown_keys_and_syntax_errors_are_one_line_with_a_place() {
        let err = parse("[idempotency]\nrecord_tl = \"1h\"\n").unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert!(
            err.0[0].contains("record_tl") && err.0[0].contains("line 2"),
            "{err}"
        );
        let err = parse("listen = \n").unwrap_err();
        assert!(!err.0[0].contains('\n'));
    }

    #[test]
    fn routes_inherit_the_defaults_and_override_keys() {
        let c = parse(
            r#"
            [idempotency]
            wait_timeout = "3s"
            [[routes]]
            path = "/v1/payments/**"
            required = true
            record_ttl = "48h"
            [[routes]]
            path = "/v1/*/refunds"
            methods = ["post", "put"]
            "#,
        )
        .unwrap();
        let pay = c.policies.for_path("/v1/payments/abc");
        assert!(pay.required);
        assert_eq!(pay.record_ttl, Duration::from_secs(48 * 3600));
        assert_eq!(pay.wait_timeout, Duration::from_secs(3));
        let refunds = c.policies.for_path("/v1/orders/refunds");
        assert_eq!(refunds.methods, [Method::POST, Method::PUT]);
        let other = c.policies.for_path("/v2/x");
        assert!(!other.required);
        assert_eq!(other.wait_timeout, Duration::from_secs(3));
    }

    #[test]
    fn flags_override_the_file() {
        let file = FileConfig::parse("listen = \"127.0.0.1:1\"\nupstream = \"http://127.0.0.1:2\"")
            .unwrap();
        let args = RunArgs {
            listen: Some("127.0.0.1:3".into()),
            ..Default::default()
        };
        let c = Config::from_parts(file, &args).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:3");
        assert_eq!(c.upstream.unwrap().to_string(), "http://127.0.0.1:2/");
        let bad = RunArgs {
            upstream: Some("nope".into()),
            ..Default::default()
        };
        let err = Config::from_parts(FileConfig::default(), &bad).unwrap_err();
        assert!(
            err.0[0].starts_with("--upstream (or IDEMGATE_UPSTREAM): \"nope\""),
            "{err}"
        );
    }

    #[test]
    fn redis_flags_choose_the_backend() {
        let args = RunArgs {
            redis: Some("redis://127.0.0.1:6379".into()),
            ..Default::default()
        };
        let c = Config::from_parts(FileConfig::default(), &args).unwrap();
        assert_eq!(c.store.backend, Backend::Redis);
        let args = RunArgs {
            redis_cluster: vec!["redis://a:1".into(), "redis://b:2".into()],
            ..Default::default()
        };
        let c = Config::from_parts(FileConfig::default(), &args).unwrap();
        assert_eq!(c.store.backend, Backend::RedisCluster);
        assert_eq!(c.store.urls.len(), 2);
        let both = RunArgs {
            redis: Some("redis://a:1".into()),
            redis_cluster: vec!["redis://b:2".into()],
            ..Default::default()
        };
        assert!(Config::from_parts(FileConfig::default(), &both).is_err());
        assert!(parse("[store]\nbackend = \"redis\"").is_err());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("512KiB"), Some(512 << 10));
        assert_eq!(parse_size("2MB"), Some(2_000_000));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1 MiB"), Some(1 << 20));
        assert_eq!(parse_size("MiB"), None);
        assert_eq!(parse_size("1XB"), None);
        assert_eq!(parse_size("99999999999999999999GiB"), None);
    }

    #[test]
    fn path_patterns() {
        let m = |p: &str, path: &str| PathPattern::parse(p).unwrap().matches(path);
        assert!(m("/v1/payments/**", "/v1/payments"));
        assert!(m("/v1/payments/**", "/v1/payments/a/b/c"));
        assert!(!m("/v1/payments/**", "/v1/paymentsx"));
        assert!(m("/v1/*/refunds", "/v1/abc/refunds"));
        assert!(!m("/v1/*/refunds", "/v1/a/b/refunds"));
        assert!(m("/v1/**/refunds", "/v1/a/b/refunds"));
        assert!(m("/v1/**/refunds", "/v1/refunds"));
        assert!(m("/v1/pay*", "/v1/payments"));
        assert!(!m("/v1/pay*", "/v1/payments/x"));
        assert!(m("/**", "/anything/at/all"));
        assert!(m("/exact", "/exact"));
        assert!(!m("/exact", "/exact/"));
        assert!(m("/a/*x*y", "/a/1x2y"));
        assert!(!m("/a/*x*y", "/a/1x2z"));
        assert!(PathPattern::parse("v1").is_err());
        // A long hostile path stays cheap with several wildcards.
        let long = format!("/{}", "a/".repeat(2000));
        assert!(!m("/**/b/**/c/**/d", &long));
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_url("redis://u:secret@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
    }
}
