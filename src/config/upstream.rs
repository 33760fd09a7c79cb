//! Where requests go: the top-level upstream and each route's own
//! (`[[routes]] upstream = "..."`), with its timeout, protocol and TLS
//! settings. A route that sets none of these keys goes to the top-level
//! upstream; one that sets any gets its own client (its own pool), with
//! the keys it does not set taken from the top level.
//!
//! TLS files are read and parsed here, so a missing or malformed file is a
//! config problem naming it (check-config, start-up, reload), never a
//! failure of the first request.

use std::path::PathBuf;
use std::time::Duration;

use http::Uri;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use toml::Value;

use super::file::{PolicyFile, UpstreamKeys};
use crate::checker::Checker;

/// `upstream_protocol`: what is spoken to a plaintext upstream (over TLS,
/// ALPN decides between h2 and HTTP/1.1 unless this says `http1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 only (ALPN offers only `http/1.1`).
    Http1,
    /// HTTP/2 with prior knowledge, plaintext only.
    H2c,
    /// HTTP/1.1 in plaintext; h2 or HTTP/1.1 by ALPN over TLS.
    Auto,
}

pub(super) const PROTOCOLS: &[(&str, UpstreamProtocol)] = &[
    ("http1", UpstreamProtocol::Http1),
    ("h2c", UpstreamProtocol::H2c),
    ("auto", UpstreamProtocol::Auto),
];

/// How to reach one upstream. Two routes with equal configs share a client.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamConfig {
    /// `http://host:port` or `https://host:port`.
    pub uri: Uri,
    /// Bounds a covered response, head to last byte, and an uncovered one's head.
    pub timeout: Duration,
    pub protocol: UpstreamProtocol,
    /// Extra trusted CAs (PEM), besides the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain and its key (PEM), for mTLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Accept any server certificate. Logged loudly at start-up.
    pub danger_accept_invalid_certs: bool,
    /// Idle connections kept for reuse at most (the oldest closed beyond).
    pub max_idle: usize,
    /// How long a connection may sit idle before it is closed.
    pub idle_timeout: Duration,
}

impl UpstreamConfig {
    pub fn is_tls(&self) -> bool {
        self.uri.scheme_str() == Some("https")
    }
}

impl Checker {
    /// An upstream URL: http or https, a host, no path or query.
    pub(super) fn upstream(&mut self, path: &str, v: &Value) -> Option<Uri> {
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
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
            self.err(
                path,
                format!(
                    "{s:?} must be an http:// or https:// URL with a host (e.g. \"http://127.0.0.1:8080\")"
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

    /// The keys of `k` over `base`; `uri` is the URL already checked (the
    /// top level's may come from a flag). Problems are named under `at`
    /// (`""` for the top level, `"routes[0]."` for a route).
    pub(super) fn upstream_config(
        &mut self,
        at: &str,
        k: &UpstreamKeys<'_>,
        uri: Uri,
        base: Option<&UpstreamConfig>,
    ) -> UpstreamConfig {
        let key = |name: &str| format!("{at}{name}");
        let mut u = match base {
            Some(b) => UpstreamConfig { uri, ..b.clone() },
            None => UpstreamConfig {
                uri,
                timeout: Duration::from_secs(60),
                protocol: UpstreamProtocol::Auto,
                ca_file: None,
                cert_file: None,
                key_file: None,
                danger_accept_invalid_certs: false,
                max_idle: 1024,
                idle_timeout: Duration::from_secs(60),
            },
        };
        self.set(
            &mut u.timeout,
            k.timeout,
            &key("upstream_timeout"),
            Checker::duration,
        );
        self.set(
            &mut u.protocol,
            k.protocol,
            &key("upstream_protocol"),
            Checker::one_of(PROTOCOLS),
        );
        for (slot, v, name) in [
            (&mut u.ca_file, k.ca_file, "upstream_ca_file"),
            (&mut u.cert_file, k.cert_file, "upstream_cert_file"),
            (&mut u.key_file, k.key_file, "upstream_key_file"),
        ] {
            self.set(slot, v, &key(name), |c, path, v| {
                c.string(path, v).map(|s| Some(PathBuf::from(s)))
            });
        }
        self.set(
            &mut u.danger_accept_invalid_certs,
            k.danger,
            &key("danger_accept_invalid_certs"),
            Checker::bool,
        );
        self.set(
            &mut u.max_idle,
            k.max_idle,
            &key("upstream_max_idle"),
            Checker::int(0, 1_000_000),
        );
        self.set(
            &mut u.idle_timeout,
            k.idle_timeout,
            &key("upstream_idle_timeout"),
            Checker::duration,
        );
        self.check_tls(at, &u);
        u
    }

    /// A route's own upstream, when it sets any upstream key (the rest
    /// from the top level).
    pub(super) fn route_upstream(
        &mut self,
        at: &str,
        r: &PolicyFile,
        base: Option<&UpstreamConfig>,
    ) -> Option<UpstreamConfig> {
        let keys = r.upstream_keys();
        if !keys.any() {
            return None;
        }
        let Some(base) = base else {
            self.err(
                &format!("{at}.upstream"),
                "needs a top-level upstream too (for paths no route sends elsewhere)".into(),
            );
            return None;
        };
        let uri = match &r.upstream {
            Some(v) => self.upstream(&format!("{at}.upstream"), v)?,
            None => base.uri.clone(),
        };
        Some(self.upstream_config(&format!("{at}."), &keys, uri, Some(base)))
    }

    /// At least one PEM certificate in the file at `path`.
    fn pem_certs(&mut self, at: &str, path: &std::path::Path) {
        match CertificateDer::pem_file_iter(path).map(|it| it.collect::<Result<Vec<_>, _>>()) {
            Ok(Ok(certs)) if !certs.is_empty() => {}
            Ok(Ok(_)) => self.err(at, format!("{} holds no PEM certificate", path.display())),
            Ok(Err(e)) | Err(e) => self.err(at, format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Reads and parses the TLS files; names what is wrong.
    fn check_tls(&mut self, at: &str, u: &UpstreamConfig) {
        let key = |name: &str| format!("{at}{name}");
        if u.protocol == UpstreamProtocol::H2c && u.is_tls() {
            self.err(
                &key("upstream_protocol"),
                "\"h2c\" is HTTP/2 in plaintext; over https:// h2 is chosen by ALPN (\"auto\")"
                    .into(),
            );
        }
        let tls_keys =
            u.ca_file.is_some() || u.cert_file.is_some() || u.danger_accept_invalid_certs;
        if tls_keys && !u.is_tls() {
            self.err(
                &key("upstream"),
                "TLS settings need an https:// upstream".into(),
            );
        }
        if let Some(path) = &u.ca_file {
            self.pem_certs(&key("upstream_ca_file"), path);
        }
        match (&u.cert_file, &u.key_file) {
            (Some(cert), Some(k)) => {
                self.pem_certs(&key("upstream_cert_file"), cert);
                if let Err(e) = PrivateKeyDer::from_pem_file(k) {
                    self.err(
                        &key("upstream_key_file"),
                        format!("cannot read a PEM private key from {}: {e}", k.display()),
                    );
                }
            }
            (None, None) => {}
            _ => self.err(
                &key("upstream_cert_file"),
                "give upstream_cert_file and upstream_key_file together".into(),
            ),
        }
        if u.danger_accept_invalid_certs {
            self.warn(
                &key("danger_accept_invalid_certs"),
                format!(
                    "is true: any certificate is accepted from {}; anyone on the path can read and change the traffic",
                    u.uri
                ),
            );
        }
    }
}
