//! The handshake row's client: full TLS handshakes, one per request, none resumed.
//!
//! wrk resumes its TLS session whenever it reconnects (`Connection: close` included:
//! nginx logs `$ssl_session_reused` as `r` for all but its first 64), so it cannot measure
//! handshakes; `openssl s_time -new` does full ones but runs one connection per process, and
//! OpenSSL 3.0's client spends about three times the server's CPU per handshake, so on a
//! small machine it measured mostly itself. This client is rustls (ring): two threads (as
//! `wrk -t2`), each a current-thread tokio runtime with half the connections; each
//! connection opens TCP, does a full handshake (`Resumption::disabled()`: no session IDs,
//! no tickets), sends one HTTP/1.1 `GET /` with `Connection: close`, reads the answer to the
//! server's close, and starts over. Counted: answers `200` with at least a body's bytes that
//! finished inside the window; latency is connect to last byte.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

/// One run's counts and latencies (microseconds).
#[derive(Debug, Default)]
pub(crate) struct Run {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) latencies_us: Vec<u64>,
    /// The first error, for the report when nothing succeeded.
    pub(crate) first_error: Option<String>,
    /// What the first handshake negotiated: `TLSv1_3 TLS13_AES_256_GCM_SHA384, X25519`.
    pub(crate) negotiated: Option<String>,
}

impl Run {
    fn add(&mut self, r: Self) {
        self.requests += r.requests;
        self.errors += r.errors;
        self.latencies_us.extend(r.latencies_us);
        if self.first_error.is_none() {
            self.first_error = r.first_error;
        }
        if self.negotiated.is_none() {
            self.negotiated = r.negotiated;
        }
    }
}

fn config(cert_der: &[u8]) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(cert_der.to_vec()))
        .map_err(|e| format!("trust anchor: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every handshake a full one.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// `conns` connections in a loop against 127.0.0.1:`port` for `duration`.
pub(crate) fn run(
    port: u16,
    conns: u32,
    duration: Duration,
    body: usize,
    cert_der: &[u8],
) -> Result<Run, String> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config(cert_der)?));
    let deadline = Instant::now() + duration;
    let threads = 2u32;
    let runs: Vec<Result<Run, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let connector = connector.clone();
                // Connections split as evenly as they go.
                let n = conns / threads + u32::from(t < conns % threads);
                scope.spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())?;
                    Ok(rt.block_on(thread(connector, port, n, deadline, body)))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("client thread panicked".into()))
            })
            .collect()
    });
    let mut all = Run::default();
    for r in runs {
        all.add(r?);
    }
    Ok(all)
}

async fn thread(
    connector: tokio_rustls::TlsConnector,
    port: u16,
    conns: u32,
    deadline: Instant,
    body: usize,
) -> Run {
    let tasks: Vec<_> = (0..conns)
        .map(|_| tokio::spawn(connection(connector.clone(), port, deadline, body)))
        .collect();
    let mut all = Run::default();
    for t in tasks {
        if let Ok(r) = t.await {
            all.add(r);
        }
    }
    all
}

/// One connection slot: connects, handshakes, asks and reads, again until `deadline`.
async fn connection(
    connector: tokio_rustls::TlsConnector,
    port: u16,
    deadline: Instant,
    body: usize,
) -> Run {
    let mut run = Run::default();
    let mut buf = Vec::with_capacity(body + 1024);
    while Instant::now() < deadline {
        let start = Instant::now();
        let left = deadline.saturating_duration_since(start) + Duration::from_secs(2);
        buf.clear();
        let result = tokio::time::timeout(
            left,
            once(&connector, port, &mut buf, run.negotiated.is_none()),
        )
        .await;
        let end = Instant::now();
        if end > deadline {
            // Finished outside the window: not counted, as wrk does not.
            break;
        }
        let error = match result {
            Err(_) => Some("timed out".to_owned()),
            Ok(Err(e)) => Some(e),
            Ok(Ok(_)) if !buf.starts_with(b"HTTP/1.1 200") => Some(format!(
                "answered {:?}",
                String::from_utf8_lossy(&buf[..buf.len().min(40)])
            )),
            Ok(Ok(_)) if buf.len() < body => Some(format!("{} bytes", buf.len())),
            Ok(Ok(negotiated)) => {
                if run.negotiated.is_none() {
                    run.negotiated = negotiated;
                }
                None
            }
        };
        match error {
            None => {
                run.requests += 1;
                run.latencies_us
                    .push(u64::try_from(end.duration_since(start).as_micros()).unwrap_or(u64::MAX));
            }
            Some(e) => {
                run.errors += 1;
                run.first_error.get_or_insert(e);
                // Not a tight loop against a proxy that refuses.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    run
}

/// Connect, full handshake, one request, the answer into `buf` to the server's close;
/// with `describe`, what the handshake negotiated.
async fn once(
    connector: &tokio_rustls::TlsConnector,
    port: u16,
    buf: &mut Vec<u8>,
    describe: bool,
) -> Result<Option<String>, String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let negotiated = describe.then(|| {
        let c = tls.get_ref().1;
        format!(
            "{} {}, {}",
            c.protocol_version()
                .map_or("?".into(), |v| format!("{v:?}")),
            c.negotiated_cipher_suite()
                .map_or("?".into(), |s| format!("{:?}", s.suite())),
            c.negotiated_key_exchange_group()
                .map_or("?".into(), |g| format!("{:?}", g.name())),
        )
    });
    tls.write_all(REQUEST)
        .await
        .map_err(|e| format!("write: {e}"))?;
    match tls.read_to_end(buf).await {
        Ok(_) => Ok(negotiated),
        // A close without close_notify after the whole answer is still an answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {
            Ok(negotiated)
        }
        Err(e) => Err(format!("read: {e}")),
    }
}

/// The `p`th percentile (0–100) of sorted `v`, in milliseconds.
pub(crate) fn percentile_ms(v: &[u64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    Some(v[i.min(v.len() - 1)] as f64 / 1000.0)
}

/// `cargo xtask handshake-client PORT CONNS SECS CERT.pem`: the handshake row's client on
/// its own (to check it against a proxy's logs); prints requests, errors, p50 and p99.
pub(crate) fn cli(args: &[String]) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject as _;
    let usage = "usage: handshake-client PORT CONNS SECS CERT.pem";
    let [port, conns, secs, cert] = args else {
        return Err(usage.into());
    };
    let num = |s: &str| s.parse::<u64>().map_err(|_| usage.to_owned());
    let der = rustls::pki_types::CertificateDer::from_pem_file(cert)
        .map_err(|e| format!("{cert}: {e}"))?;
    let port = u16::try_from(num(port)?).map_err(|_| usage.to_owned())?;
    let conns = u32::try_from(num(conns)?).map_err(|_| usage.to_owned())?;
    let secs = num(secs)?;
    let mut r = run(port, conns, Duration::from_secs(secs), 0, &der)?;
    r.latencies_us.sort_unstable();
    let ms = |p| percentile_ms(&r.latencies_us, p).map_or("–".into(), |v| format!("{v:.2}"));
    println!(
        "{} requests ({:.0}/s), {} errors, p50 {} ms, p99 {} ms{}{}",
        r.requests,
        r.requests as f64 / secs.max(1) as f64,
        r.errors,
        ms(50.0),
        ms(99.0),
        r.negotiated
            .map_or(String::new(), |n| format!("; negotiated {n}")),
        r.first_error
            .map_or(String::new(), |e| format!("; first error: {e}"))
    );
    Ok(())
}
