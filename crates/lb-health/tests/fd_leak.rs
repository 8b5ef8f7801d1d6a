//! Probes leave no file descriptor behind.
//!
//! This counts the whole process's descriptors (`/proc/self/fd`), so it lives in a test
//! binary of its own with this one test in it: cargo runs test binaries one after another,
//! so nothing else in the process opens sockets while it counts.

use std::net::SocketAddr;
use std::time::Duration;

use lb_health::{HttpProber, ProbeError, Prober, Target, TcpProber};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Generous: a busy machine may be slow to answer, and a timeout here is not what is tested.
const T: Duration = Duration::from_secs(10);

/// A backend that answers every request head with `200` and closes.
async fn backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut len = 0;
                while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => len += n,
                    }
                    if len == buf.len() {
                        return;
                    }
                }
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    (addr, task)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Waits (bounded) until the descriptor count is back to `limit` or below; returns the last count.
async fn settle(limit: usize) -> usize {
    let mut n = open_fds();
    for _ in 0..100 {
        if n <= limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        n = open_fds();
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_probes_leave_no_file_descriptors_behind() {
    let (tcp, tcp_task) = backend().await;
    let (http, http_task) = backend().await;
    let refused = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    // Warm up the runtime and the backends' tasks before the baseline.
    TcpProber.probe(&Target::new(tcp), T).await.unwrap();
    HttpProber::new("/")
        .probe(&Target::new(http), T)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = open_fds();
    for round in 0..100 {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..100 {
            set.spawn(async move {
                match (round + i) % 3 {
                    0 => TcpProber
                        .probe(&Target::new(tcp), T)
                        .await
                        .map_err(|e| e.to_string()),
                    1 => HttpProber::new("/")
                        .probe(&Target::new(http), T)
                        .await
                        .map_err(|e| e.to_string()),
                    _ => match TcpProber.probe(&Target::new(refused), T).await {
                        Err(ProbeError::Refused) => Ok(()),
                        other => Err(format!("{other:?}")),
                    },
                }
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap().unwrap();
        }
    }
    // The backends' side of the last connections may still be closing: wait for it.
    let after = settle(before + 8).await;
    assert!(
        after <= before + 8,
        "fds grew from {before} to {after} over 10,000 probes"
    );
    tcp_task.abort();
    http_task.abort();
}
