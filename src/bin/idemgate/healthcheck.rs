//! `idemgate healthcheck`: exit 0 if the admin listener's `/healthz` (or
//! `/readyz`) answers 2xx, for container health checks without curl.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context};

/// Asks `path` on the admin listener at `addr`; an error says why not.
pub async fn check(mut addr: SocketAddr, ready: bool) -> anyhow::Result<()> {
    // A wildcard listener is reached on loopback.
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let path = if ready { "/readyz" } else { "/healthz" };
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri: http::Uri = format!("http://{addr}{path}").parse()?;
    let resp = tokio::time::timeout(Duration::from_secs(2), client.get(uri))
        .await
        .ok()
        .and_then(Result::ok)
        .with_context(|| format!("{path} on {addr} did not answer"))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(anyhow!("{path} answered {}", resp.status()))
    }
}
