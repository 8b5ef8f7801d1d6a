//! The proxy's own settings: limits and timeouts of the client side and the upstream side.
//! (Where requests go, and when to retry, is lb-core's [`Config`](lb_core::Config).)

use std::time::Duration;

/// Limits and timeouts, with SPEC.md's defaults (`[timeouts]`, `[limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyConfig {
    /// `timeouts.connect`: limit on establishing an upstream connection (1 s).
    pub connect_timeout: Duration,
    /// `timeouts.idle`: a client keep-alive connection idle this long is closed (60 s).
    pub idle_timeout: Duration,
    /// `timeouts.header_read`: a client must send a whole request head within this, else it
    /// gets 408 and the connection closes (10 s).
    pub header_read_timeout: Duration,
    /// `timeouts.body_read`: the longest pause while a client sends a request body; then it
    /// gets 408 (if no response has started) and the connection closes (60 s). Never charged
    /// to a backend.
    pub body_read_timeout: Duration,
    /// `limits.max_header_bytes`: larger request heads get 431 (32 KiB).
    pub max_header_bytes: usize,
    /// `limits.max_connections`: beyond this many client connections, accepting pauses (10,000).
    pub max_connections: usize,
    /// `limits.replay_buffer`: request bodies up to this size are buffered so they can be
    /// retried; larger ones stream and are not retried once sent (64 KiB).
    pub replay_buffer: usize,
    /// How long an idle pooled upstream connection is kept (90 s).
    pub upstream_idle_timeout: Duration,
    /// Most idle pooled connections kept per backend (1,024).
    pub upstream_max_idle: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            max_header_bytes: 32 * 1024,
            max_connections: 10_000,
            replay_buffer: 64 * 1024,
            upstream_idle_timeout: Duration::from_secs(90),
            upstream_max_idle: 1024,
        }
    }
}
