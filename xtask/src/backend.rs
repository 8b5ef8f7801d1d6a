//! The benchmark's upstream: a minimal hyper server (HTTP/1.1 and h2c prior knowledge) that
//! answers every request with a fixed body, on `count` consecutive ports, in one process.
//!
//! Alone on this 2-core machine it serves about 85–95k requests/s of 1 KiB over keep-alive
//! to `wrk -t2 -c64` (the `direct` rows of the report are exactly that measurement).

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

/// `xtask backend BASE_PORT COUNT BODY_BYTES`: serves until killed.
pub(crate) fn serve(args: &[String]) -> Result<(), String> {
    let num = |i: usize, name: &str| -> Result<usize, String> {
        args.get(i)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("backend: missing or bad {name}"))
    };
    let (base, count, size) = (
        num(0, "BASE_PORT")?,
        num(1, "COUNT")?,
        num(2, "BODY_BYTES")?,
    );
    let body = Bytes::from(vec![b'x'; size]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let mut listeners = Vec::with_capacity(count);
        for i in 0..count {
            let port = base + i;
            let l = tokio::net::TcpListener::bind(("127.0.0.1", port as u16)).await.map_err(|e| format!("port {port}: {e}"))?;
            listeners.push(l);
        }
        println!("ready");
        for l in listeners {
            let body = body.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = l.accept().await else { continue };
                    let _ = stream.set_nodelay(true);
                    let body = body.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |_req| {
                            let body = body.clone();
                            async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(body))) }
                        });
                        let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
                    });
                }
            });
        }
        std::future::pending::<Result<(), String>>().await
    })
}
