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
}

impl Outcome {
    /// Every outcome, in declaration order (`ALL[o as usize] == o`).
    pub const ALL: [Outcome; 12] = [
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
}

impl StoreOp {
    /// Every operation, in declaration order (`ALL[op as usize] == op`).
    pub const ALL: [StoreOp; 9] = [
        StoreOp::Begin,
        StoreOp::Renew,
        StoreOp::Complete,
        StoreOp::Release,
        StoreOp::Wait,
        StoreOp::Get,
        StoreOp::Purge,
        StoreOp::MarkUnknown,
        StoreOp::Resolve,
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
        }
    }
}
