//! HTTP upgrades, passed through: a request that asks to switch protocols
//! (`Connection: upgrade` with `Upgrade`, a WebSocket handshake for one) is
//! forwarded with those headers and without state; when the upstream
//! answers `101`, the client's connection and the upstream's are joined
//! and bytes are copied both ways until either side closes. Any other
//! answer is relayed as a normal response.
//!
//! A tunnel keeps its client connection's place under `max_connections`
//! (it holds the connection's [`Hold`]), is counted in
//! `idemgate_open_tunnels`, and is closed on drain once `drain_timeout` is
//! up ([`Tunnels::drain`]).

use std::any::Any;
use std::sync::Arc;

use http::request::Parts;
use http::{header, HeaderMap, Request, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::upstream::Upstream;
use crate::error::UpstreamError;
use crate::Body;

/// Whatever keeps a client connection's place under `max_connections`:
/// held by the connection and by every tunnel it became.
pub type Hold = Arc<dyn Any + Send + Sync>;

/// Whether `parts` asks to switch protocols: an HTTP/1.1 request with an
/// `Upgrade` header and the `upgrade` token in `Connection`.
pub fn is_upgrade(parts: &Parts) -> bool {
    parts.version == Version::HTTP_11
        && parts.headers.contains_key(header::UPGRADE)
        && connection_has_upgrade(&parts.headers)
}

fn connection_has_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The open tunnels, for the drain and the gauge.
#[derive(Clone)]
pub struct Tunnels {
    tasks: TaskTracker,
    closing: CancellationToken,
    open: prometheus::IntGauge,
}

impl Tunnels {
    pub fn new(open: prometheus::IntGauge) -> Self {
        Tunnels {
            tasks: TaskTracker::new(),
            closing: CancellationToken::new(),
            open,
        }
    }

    /// Tunnels open now.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Lets open tunnels run until `deadline`, then closes those still open
    /// and waits for them to be gone. No tunnel opens after this began.
    pub async fn drain(&self, deadline: Instant) {
        self.tasks.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::info!(
                open = self.tasks.len(),
                "drain timeout reached: closing open tunnels"
            );
            self.closing.cancel();
            self.tasks.wait().await;
        }
    }
}

/// Forwards an upgrade request; on `101`, joins the two connections in a
/// task of `tunnels` that holds `hold`. Returns the upstream's response and
/// whether a tunnel opened.
pub(super) async fn forward(
    tunnels: &Tunnels,
    mut upstream: Upstream,
    mut parts: Parts,
    body: Body,
    hold: Option<Hold>,
) -> Result<(Response<Body>, bool), UpstreamError> {
    let client = parts.extensions.remove::<OnUpgrade>();
    let mut resp = upstream.upgrade(Request::from_parts(parts, body)).await?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok((resp, false));
    }
    let server = resp.extensions_mut().remove::<OnUpgrade>();
    let (Some(client), Some(server)) = (client, server) else {
        return Err(UpstreamError::Failed(
            "the upstream switched protocols on a connection that cannot be joined".into(),
        ));
    };
    if tunnels.tasks.is_closed() {
        return Err(UpstreamError::Unreachable("shutting down".into()));
    }
    let (closing, open) = (tunnels.closing.clone(), tunnels.open.clone());
    open.inc();
    tunnels.tasks.spawn(async move {
        let joined = async {
            // The client's side resolves once hyper has sent it the 101;
            // a client gone before that ends the tunnel here.
            let (c, s) = tokio::try_join!(client, server)?;
            let copied =
                tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(s)).await;
            Ok::<_, hyper::Error>(copied)
        };
        tokio::select! {
            ended = joined => match ended {
                Ok(Ok((up, down))) => tracing::debug!(up, down, "tunnel closed"),
                Ok(Err(e)) => tracing::debug!(error = %e, "tunnel broke off"),
                Err(e) => tracing::debug!(error = %e, "upgrade did not complete"),
            },
            () = closing.cancelled() => tracing::debug!("tunnel closed on drain"),
        }
        open.dec();
        drop(hold);
    });
    Ok((resp, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn parts(version: Version, headers: &[(&'static str, &'static str)]) -> Parts {
        let mut req = Request::new(());
        *req.version_mut() = version;
        for (n, v) in headers {
            req.headers_mut().append(*n, HeaderValue::from_static(v));
        }
        req.into_parts().0
    }

    #[test]
    fn an_upgrade_needs_both_headers_on_http_1_1() {
        let ws = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ];
        assert!(is_upgrade(&parts(Version::HTTP_11, &ws)));
        assert!(!is_upgrade(&parts(Version::HTTP_10, &ws)));
        assert!(!is_upgrade(&parts(
            Version::HTTP_11,
            &[("upgrade", "websocket")]
        )));
        assert!(!is_upgrade(&parts(
            Version::HTTP_11,
            &[("connection", "close"), ("upgrade", "websocket")]
        )));
    }
}
