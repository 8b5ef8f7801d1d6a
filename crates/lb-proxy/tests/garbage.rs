//! Whatever bytes clients send, the proxy answers or closes, never panics, and keeps serving.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use lb_core::Rng;
use lb_proxy::ProxyConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_mangled_requests_never_panic() {
    let panics = Arc::new(AtomicUsize::new(0));
    let p2 = panics.clone();
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        p2.fetch_add(1, Ordering::SeqCst);
        default(info);
    }));
    let backend = Backend::ok("fine").await;
    let config = ProxyConfig {
        header_read_timeout: Duration::from_millis(200),
        ..ProxyConfig::default()
    };
    let p = proxy(&[backend.url()], core_config(), config).await;
    let valid = b"GET /path?q=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: keep-alive, upgrade\r\nUpgrade: h2c\r\nX-Forwarded-For: 1.2.3.4\r\n\r\nabc";
    let mut rng = Rng::from_seed(42);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300u64 {
        // Half: random bytes; half: a valid request with a few bytes flipped or cut.
        let payload: Vec<u8> = if i % 2 == 0 {
            (0..rng.below(300)).map(|_| rng.below(256) as u8).collect()
        } else {
            let mut v = valid.to_vec();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(v.len() as u64) as usize;
                v[at] = rng.below(256) as u8;
            }
            v.truncate(rng.below(v.len() as u64 + 1) as usize);
            v
        };
        let addr = p.addr;
        tasks.spawn(async move {
            let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
                return;
            };
            let _ = s.write_all(&payload).await;
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
            if !out.is_empty() {
                assert!(
                    out.starts_with(b"HTTP/1.1 "),
                    "{:?}",
                    String::from_utf8_lossy(&out)
                );
            }
        });
        if tasks.len() >= 50 {
            tasks.join_next().await.unwrap().unwrap();
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert_eq!(
        get(&p.url("/")).await,
        (200, "fine".into()),
        "still serving"
    );
    assert_eq!(panics.load(Ordering::SeqCst), 0, "no panic anywhere");
    wait_for("no request left in flight", || p.active() == 0).await;
}
