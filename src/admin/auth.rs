//! Who may call the admin API. Without a token it is open (bind it to
//! loopback). With `admin_token`, every endpoint but `/healthz`, `/readyz`
//! and (while `metrics_public`) `/metrics` asks for `Authorization: Bearer
//! <token>`; `admin_read_token` opens the endpoints that only read
//! (`GET /v1/keys`, `GET /v1/dedup/...`, `/metrics`), never those that
//! change state.
//!
//! Tokens are kept as SHA-256 digests and compared in constant time: the
//! comparison takes as long whatever the presented token is.

use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use sha2::{Digest, Sha256};

use crate::config::AdminTokens;
use crate::error::Problem;
use crate::Body;

/// What an endpoint needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    Open,
    Read,
    Write,
}

impl Access {
    /// What `method` on `path` needs (before any routing: unknown paths need
    /// a token too, so they cannot be probed).
    pub fn of(method: &Method, path: &str, metrics_public: bool) -> Access {
        match path {
            "/healthz" | "/readyz" => Access::Open,
            "/metrics" if metrics_public => Access::Open,
            "/metrics" => Access::Read,
            _ if method == Method::GET || method == Method::HEAD => Access::Read,
            _ => Access::Write,
        }
    }
}

type Sum = [u8; 32];

fn digest(token: &[u8]) -> Sum {
    Sha256::digest(token).into()
}

/// Equal in constant time (both are digests: fixed length).
fn same(a: &Sum, b: &Sum) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Clone)]
pub(super) struct Auth {
    write: Option<Sum>,
    read: Option<Sum>,
    pub metrics_public: bool,
}

impl Auth {
    pub fn new(tokens: &AdminTokens) -> Self {
        Auth {
            write: tokens.write.as_deref().map(|t| digest(t.as_bytes())),
            read: tokens.read.as_deref().map(|t| digest(t.as_bytes())),
            metrics_public: tokens.metrics_public,
        }
    }

    /// `Ok` if the request may proceed; the refusal otherwise.
    pub fn check(&self, access: Access, headers: &HeaderMap) -> Result<(), Refusal> {
        let Some(write) = &self.write else {
            return Ok(());
        };
        if access == Access::Open {
            return Ok(());
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| digest(t.trim().as_bytes()));
        let Some(presented) = presented else {
            return Err(Refusal::Unauthorized(
                "this endpoint needs Authorization: Bearer <admin token>",
            ));
        };
        if same(&presented, write) {
            return Ok(());
        }
        match &self.read {
            Some(read) if same(&presented, read) => match access {
                Access::Write => Err(Refusal::Forbidden),
                _ => Ok(()),
            },
            _ => Err(Refusal::Unauthorized("the token is not valid here")),
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// No token, or not one of ours: 401.
    Unauthorized(&'static str),
    /// The read token on an endpoint that changes state: 403.
    Forbidden,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Refusal::Forbidden => StatusCode::FORBIDDEN,
        }
    }

    pub fn into_response(self) -> Response<Body> {
        match self {
            Refusal::Unauthorized(detail) => {
                let mut resp = Problem::new(self.status(), "unauthorized", "Unauthorized", detail)
                    .into_response();
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"idemgate-admin\""),
                );
                resp
            }
            Refusal::Forbidden => Problem::new(
                self.status(),
                "forbidden",
                "Forbidden",
                "the read token cannot change state; use the admin token",
            )
            .into_response(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(read: bool) -> Auth {
        Auth::new(&AdminTokens {
            write: Some("w-token".into()),
            read: read.then(|| "r-token".into()),
            metrics_public: true,
        })
    }

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {t}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn tokens_open_what_they_should_and_nothing_else() {
        let a = auth(true);
        let none = HeaderMap::new();
        assert!(a.check(Access::Open, &none).is_ok());
        assert_eq!(a.check(Access::Read, &none).unwrap_err().status(), 401);
        assert_eq!(
            a.check(Access::Read, &bearer("nope")).unwrap_err().status(),
            401
        );
        assert!(a.check(Access::Read, &bearer("r-token")).is_ok());
        assert_eq!(
            a.check(Access::Write, &bearer("r-token"))
                .unwrap_err()
                .status(),
            403
        );
        assert!(a.check(Access::Write, &bearer("w-token")).is_ok());
        assert!(a.check(Access::Read, &bearer("w-token")).is_ok());
        // Without tokens everything is open.
        let open = Auth::new(&AdminTokens::default());
        assert!(open.check(Access::Write, &none).is_ok());
    }

    #[test]
    fn endpoints_need_what_they_change() {
        assert_eq!(Access::of(&Method::GET, "/healthz", false), Access::Open);
        assert_eq!(Access::of(&Method::GET, "/metrics", true), Access::Open);
        assert_eq!(Access::of(&Method::GET, "/metrics", false), Access::Read);
        assert_eq!(Access::of(&Method::GET, "/v1/keys", true), Access::Read);
        assert_eq!(Access::of(&Method::DELETE, "/v1/keys", true), Access::Write);
        assert_eq!(Access::of(&Method::PUT, "/v1/keys", true), Access::Write);
        assert_eq!(
            Access::of(&Method::POST, "/v1/dedup/s/claim", true),
            Access::Write
        );
        assert_eq!(
            Access::of(&Method::GET, "/v1/dedup/s/failed", true),
            Access::Read
        );
        assert_eq!(Access::of(&Method::GET, "/anything", true), Access::Read);
    }
}
