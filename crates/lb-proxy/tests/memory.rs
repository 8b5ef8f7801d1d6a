//! Memory stays bounded while large bodies stream through. This reads the process's RSS, so
//! it has a test binary (a process) of its own: tests running beside it in one process would
//! move the number.

mod common;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::BodyExt;
use lb_proxy::ProxyConfig;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(str::to_owned)
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_stream_each_way_in_bounded_memory() {
    const TOTAL: usize = 100 << 20;
    const CHUNK: usize = 64 << 10;
    // Download: the backend streams 100 MiB; upload: it counts what arrives.
    let backend = Backend::start(Arc::new(|req: Request<hyper::body::Incoming>| {
        Box::pin(async move {
            if req.method() == http::Method::POST {
                let mut body = req.into_body();
                let mut n = 0usize;
                while let Some(frame) = body.frame().await {
                    if let Ok(d) = frame.map(|f| f.into_data().map(|d| d.len()).unwrap_or(0)) {
                        n += d;
                    } else {
                        break;
                    }
                }
                Response::new(full(n.to_string()))
            } else {
                Response::new(Chunks::new(TOTAL / CHUNK, CHUNK).boxed())
            }
        })
    }))
    .await;
    let p = proxy(&[backend.url()], core_config(), ProxyConfig::default()).await;
    let before = rss_kib();

    let resp = client().get(p.url("/big").parse().unwrap()).await.unwrap();
    let mut body = resp.into_body();
    let mut got = 0usize;
    while let Some(frame) = body.frame().await {
        got += frame.unwrap().into_data().map(|d| d.len()).unwrap_or(0);
    }
    assert_eq!(got, TOTAL);

    let req = Request::post(p.url("/up"))
        .body(Chunks::new(TOTAL / CHUNK, CHUNK).boxed())
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let n = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(n, TOTAL.to_string());

    let grew = rss_kib().saturating_sub(before);
    assert!(
        grew < 40 * 1024,
        "RSS grew by {grew} KiB while 200 MiB passed through"
    );
    assert_eq!(p.active(), 0);
}

/// `n` chunks of `size` bytes, made as they are polled.
struct Chunks {
    left: usize,
    chunk: Bytes,
}

impl Chunks {
    fn new(n: usize, size: usize) -> Self {
        Self {
            left: n,
            chunk: Bytes::from(vec![b'x'; size]),
        }
    }
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        self.left -= 1;
        Poll::Ready(Some(Ok(http_body::Frame::data(self.chunk.clone()))))
    }
}
