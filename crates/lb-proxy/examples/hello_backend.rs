//! A minimal, fast HTTP/1.1 backend for trying lb out and measuring it:
//! `cargo run --release -p lb-proxy --example hello_backend -- 127.0.0.1:3031 [BODY_BYTES]`.
//! Answers every request with `BODY_BYTES` (default 1024) bytes, keep-alive, one
//! current-thread runtime so it stays out of the proxy's way.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:3031".into());
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1024);
    let body = Bytes::from(vec![b'x'; size]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        eprintln!("hello_backend on {addr}, {size}-byte bodies");
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(body))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}
