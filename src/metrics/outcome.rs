//! How a proxy request ended: the `outcome` label of
//! `idemgate_requests_total` and `idemgate_request_duration_seconds`, and of
//! the request log line. Next to the metrics so they depend on nothing above.

/// How a request ended; one per request, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Forwarded,
    Replayed,
    Conflict,
    Mismatch,
    MissingKey,
    InvalidKey,
    TooLarge,
    PassThrough,
    StoreUnavailable,
    UpstreamError,
    /// The client's own request body failed mid-read (it went away).
    ClientError,
    /// An earlier attempt may have run: 409 `outcome-unknown`, no upstream
    /// call.
    OutcomeUnknown,
    /// A new key over the caller's `new_keys_per_scope`: 429.
    TooManyKeys,
    /// A webhook delivery whose signature did not check out: 401.
    InvalidSignature,
    /// A request that switched protocols: the client's connection joined to
    /// the upstream's (a WebSocket, say), without state.
    Upgraded,
}

impl Outcome {
    /// Every outcome, in declaration order (`ALL[o as usize] == o`).
    pub const ALL: [Outcome; 15] = [
        Outcome::Forwarded,
        Outcome::Replayed,
        Outcome::Conflict,
        Outcome::Mismatch,
        Outcome::MissingKey,
        Outcome::InvalidKey,
        Outcome::TooLarge,
        Outcome::PassThrough,
        Outcome::StoreUnavailable,
        Outcome::UpstreamError,
        Outcome::ClientError,
        Outcome::OutcomeUnknown,
        Outcome::TooManyKeys,
        Outcome::InvalidSignature,
        Outcome::Upgraded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Replayed => "replayed",
            Outcome::Conflict => "conflict",
            Outcome::Mismatch => "mismatch",
            Outcome::MissingKey => "missing_key",
            Outcome::InvalidKey => "invalid_key",
            Outcome::TooLarge => "too_large",
            Outcome::PassThrough => "pass_through",
            Outcome::StoreUnavailable => "store_unavailable",
            Outcome::UpstreamError => "upstream_error",
            Outcome::ClientError => "client_error",
            Outcome::OutcomeUnknown => "outcome_unknown",
            Outcome::TooManyKeys => "too_many_keys",
            Outcome::InvalidSignature => "invalid_signature",
            Outcome::Upgraded => "upgraded",
        }
    }
}

/// A store operation, as the `op` label of the store metrics names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreOp {
    Begin,
    Renew,
    Complete,
    Release,
    Wait,
    Get,
    Purge,
    MarkUnknown,
    Resolve,
    Admit,
}

impl StoreOp {
    /// Every operation, in declaration order (`ALL[op as usize] == op`).
    pub const ALL: [StoreOp; 10] = [
        StoreOp::Begin,
        StoreOp::Renew,
        StoreOp::Complete,
        StoreOp::Release,
        StoreOp::Wait,
        StoreOp::Get,
        StoreOp::Purge,
        StoreOp::MarkUnknown,
        StoreOp::Resolve,
        StoreOp::Admit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StoreOp::Begin => "begin",
            StoreOp::Renew => "renew",
            StoreOp::Complete => "complete",
            StoreOp::Release => "release",
            StoreOp::Wait => "wait",
            StoreOp::Get => "get",
            StoreOp::Purge => "purge",
            StoreOp::MarkUnknown => "mark_unknown",
            StoreOp::Resolve => "resolve",
            StoreOp::Admit => "admit",
        }
    }
}
