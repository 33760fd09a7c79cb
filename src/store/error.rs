//! How a store call fails ([`StoreError`]) and the future every call
//! returns ([`StoreFuture`]): the one thing every part of the store shares.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A store failure. The proxy answers every variant with 503 (or passes the
/// request through, when configured to).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("store is full ({0} records); refusing new keys rather than evicting live ones")]
    Full(usize),
    #[error("store is full ({0} bytes); refusing new keys rather than evicting live ones")]
    FullBytes(u64),
    /// The configured backend does not hold this kind of record (yet).
    #[error("the configured store backend does not provide {0}")]
    Unsupported(&'static str),
}

/// A store call's future. Boxed: it keeps the traits object-safe (the
/// handle holds `dyn RecordStore` and the like) and spares callers a rustc
/// limitation with borrowed `impl Future` returns inside spawned tasks; one
/// small allocation next to a store call.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;
