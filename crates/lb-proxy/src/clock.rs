//! The one clock of the shells: tokio's (so paused-time tests control it).

use std::time::Instant;

/// Now, by tokio's clock.
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
