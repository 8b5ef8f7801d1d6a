//! The balancer's timer: expire ejections, step slow start, log state changes.
//!
//! quinn's `drive_timer`, simplified: rather than a `Notify` poked after every input that
//! might move the deadline earlier, the driver wakes at the earlier of `poll_timeout` and a
//! 100 ms tick. `poll_timeout` is one atomic load, so the tick costs nothing measurable, and
//! events raised on the request path (ejections) reach the log within 100 ms.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::now;
use crate::service::Shared;

const TICK: Duration = Duration::from_millis(100);

pub(crate) async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let routes = shared.routes.load_full();
        let balancer = &routes.balancer;
        let tick = tokio::time::Instant::now() + TICK;
        let wake = balancer
            .poll_timeout()
            .map_or(tick, |t| tokio::time::Instant::from_std(t).min(tick));
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        balancer.handle_timeout(now());
        while let Some(event) = balancer.poll_event() {
            tracing::info!(target: "lb::health", "{event}");
        }
    }
}
