//! Regression tests, through the real binary, for the defects the hostile review of TLS
//! found (each test failed before its fix). Certificates are made in the test with rcgen; ports
//! are fixed in 24100-24999 and 25101-25102; every wait is bounded.

mod common;

use std::convert::Infallible;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper_util::rt::TokioIo;

/// A private CA that signs leaf certificates.
struct Pki {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_pem: String,
}

impl Pki {
    fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let ca = params.self_signed(&key).unwrap();
        Self {
            ca_pem: ca.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM) for `names`.
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lb-tls-review-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(dir: &Path, file: &str, text: &str) -> PathBuf {
    let p = dir.join(file);
    std::fs::write(&p, text).unwrap();
    p
}

/// An HTTPS (HTTP/1.1, keep-alive) backend on `port` serving `cert`, answering `name`;
/// counts the TLS connections it accepted.
struct TlsBackend {
    connections: Arc<AtomicUsize>,
}

impl TlsBackend {
    fn start(port: u16, cert_pem: &str, key_pem: &str, name: &'static str) -> Self {
        use rustls::pki_types::pem::PemObject;
        let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .map(Result::unwrap)
            .collect();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&connections);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let acceptor = acceptor.clone();
                    let count = Arc::clone(&count);
                    tokio::spawn(async move {
                        let Ok(Ok(tls)) =
                            tokio::time::timeout(Duration::from_secs(5), acceptor.accept(stream))
                                .await
                        else {
                            return;
                        };
                        count.fetch_add(1, Ordering::SeqCst);
                        let svc = hyper::service::service_fn(move |_req| async move {
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(name))))
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
                    });
                }
            });
        });
        Self { connections }
    }
}

/// A plain HTTP/1.1 backend on `port` answering `name`.
struct PlainBackend {
    port: u16,
}

impl PlainBackend {
    fn start(port: u16, name: &'static str) -> Self {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |_req| async move {
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(name))))
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        });
        Self { port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn wait_listening(lb: &mut Lb, addr: SocketAddr) {
    lb.wait_for("lb to listen", |_| TcpStream::connect(addr).is_ok());
}

/// SPEC: `https://` backends are verified against the system roots plus `upstream_ca`, and
/// SIGHUP reloads the config. After a reload whose `upstream_ca` no longer trusts a
/// backend's certificate, lb must not keep sending requests to that backend over the TLS
/// connections it pooled while the old CA was in force: the reload changed what is trusted.
/// lb used to keep reusing them (each reuse refreshing their idle time, so under steady
/// traffic the old trust lasted for ever), and every request still got the untrusted
/// backend's 200.
#[test]
fn a_reload_to_an_upstream_ca_that_no_longer_trusts_a_backend_stops_using_its_pooled_connections() {
    let trusted = Pki::new("trusted CA");
    let other = Pki::new("other CA");
    let (cert, key) = trusted.leaf(&["localhost"]);
    let backend = TlsBackend::start(24102, &cert, &key, "B");
    let d = dir("upstream-ca-reload");
    let ca = write(&d, "ca.pem", &trusted.ca_pem);
    let other_ca = write(&d, "other.pem", &other.ca_pem);
    let addr: SocketAddr = "127.0.0.1:24101".parse().unwrap();
    let config = |ca: &Path| {
        format!(
            "listen = [\"{addr}\"]\n[health]\ninterval = \"0s\"\n[tls]\nupstream_ca = {ca:?}\n\
             [[backend]]\nurl = \"https://localhost:24102\"\n"
        )
    };
    let path = write(&d, "lb.toml", &config(&ca));
    let mut lb = Lb::spawn(&path);
    wait_listening(&mut lb, addr);
    for _ in 0..8 {
        assert_eq!(get(addr), (200, "B".to_owned()), "trusted by upstream_ca");
    }
    assert!(backend.connections.load(Ordering::SeqCst) >= 1);

    std::fs::write(&path, config(&other_ca)).unwrap();
    lb.signal("HUP");
    lb.wait_for("the reload", |lb| lb.logged("configuration reloaded") >= 1);

    // A new connection is refused now (the backend's certificate is not the other CA's)...
    let answers: Vec<(u16, String)> = (0..8).map(|_| get(addr)).collect();
    // ...and so must be the old ones: no request reaches a backend the config in force does
    // not trust.
    assert!(
        answers.iter().all(|(status, _)| *status == 502),
        "after the reload the backend is no longer trusted, yet: {answers:?}"
    );
}

/// The other side of the test above: a reload that leaves `upstream_ca` as it was (the same
/// file, the same bytes) keeps the pooled TLS connections: no handshake storm on every
/// SIGHUP. Each worker keeps its own pool, so the backend sees at most one connection per
/// worker over all the sequential requests.
#[test]
fn a_reload_that_keeps_upstream_ca_keeps_the_pooled_tls_connections() {
    let trusted = Pki::new("kept CA");
    let (cert, key) = trusted.leaf(&["localhost"]);
    let backend = TlsBackend::start(24104, &cert, &key, "K");
    let d = dir("upstream-ca-kept");
    let ca = write(&d, "ca.pem", &trusted.ca_pem);
    let addr: SocketAddr = "127.0.0.1:24103".parse().unwrap();
    let config = |strategy: &str| {
        format!(
            "listen = [\"{addr}\"]\nstrategy = \"{strategy}\"\n[health]\ninterval = \"0s\"\n\
             [tls]\nupstream_ca = {ca:?}\n[[backend]]\nurl = \"https://localhost:24104\"\n"
        )
    };
    let path = write(&d, "lb.toml", &config("round-robin"));
    let mut lb = Lb::spawn(&path);
    wait_listening(&mut lb, addr);
    for _ in 0..8 {
        assert_eq!(get(addr), (200, "K".to_owned()));
    }
    let before = backend.connections.load(Ordering::SeqCst);
    // Each worker opened its own connection at most: 8 sequential requests reuse them.
    assert!((1..=8).contains(&before), "{before}");
    // A reload that changes something else, twice.
    for (n, strategy) in [(1, "random"), (2, "round-robin")] {
        std::fs::write(&path, config(strategy)).unwrap();
        lb.signal("HUP");
        lb.wait_for("the reload", |lb| lb.logged("configuration reloaded") >= n);
        for _ in 0..8 {
            assert_eq!(get(addr), (200, "K".to_owned()));
        }
    }
    let workers = before.max(std::thread::available_parallelism().map_or(1, usize::from));
    let after = backend.connections.load(Ordering::SeqCst);
    assert!(
        after <= workers,
        "the pooled connections were kept: {before} before the reloads, {after} after"
    );
}

/// A TLS client trusting `ca_pem`, offering `alpn`.
fn tls_client(ca_pem: &str, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Over TLS to `addr` (SNI `name`), sends `request` and reads until the server closes (or
/// 10 s pass): Err if the handshake failed, else what came back.
fn tls_exchange(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    name: &str,
    request: &[u8],
) -> Result<Vec<u8>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let server = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(server, tcp))
            .await
            .map_err(|_| "handshake timed out".to_owned())?
            .map_err(|e| format!("handshake failed: {e}"))?;
        tls.write_all(request).await.map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
        Ok(out)
    })
}

/// lb serves HTTP/1.0 clients on a plain port, and HTTP/1.1 over TLS; a client that offers
/// ALPN `http/1.0` (as `curl --http1.0` does, and as NGINX and HAProxy accept) was refused
/// with a `no_application_protocol` alert while lb offered only `h2` and `http/1.1`.
#[test]
fn an_http_1_0_client_over_tls_is_served() {
    let d = dir("http10");
    let pki = Pki::new("ca");
    let (cert, key) = pki.leaf(&["a.test"]);
    let cert = write(&d, "cert.pem", &cert);
    let key = write(&d, "key.pem", &key);
    let backend = PlainBackend::start(24122, "B");
    let addr: SocketAddr = "127.0.0.1:24121".parse().unwrap();
    let path = write(
        &d,
        "lb.toml",
        &format!(
            "listen = [\"{addr}\"]\n[health]\ninterval = \"0s\"\n[tls]\ncert = {cert:?}\nkey = {key:?}\n\
             [[backend]]\nurl = \"{}\"\n",
            backend.url()
        ),
    );
    let mut lb = Lb::spawn(&path);
    wait_listening(&mut lb, addr);
    let h11 = tls_exchange(
        &tls_client(&pki.ca_pem, &[b"http/1.1"]),
        addr,
        "a.test",
        b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert!(
        h11.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&h11)
    );
    let h10 = tls_exchange(
        &tls_client(&pki.ca_pem, &[b"http/1.0"]),
        addr,
        "a.test",
        b"GET / HTTP/1.0\r\nHost: a.test\r\n\r\n",
    );
    let h10 = h10.expect("an HTTP/1.0 client offering ALPN http/1.0");
    assert!(
        h10.windows(4).any(|w| w == b" 200"),
        "{}",
        String::from_utf8_lossy(&h10)
    );
}

/// Like [`Lb::spawn`], with the system roots read from `roots` (rustls-native-certs honours
/// `SSL_CERT_FILE`, as OpenSSL does).
fn spawn_with_system_roots(config: &Path, roots: &Path) -> Lb {
    use std::io::BufRead;
    let mut child = std::process::Command::new(LB)
        .arg("--config")
        .arg(config)
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info")
        .env("SSL_CERT_FILE", roots)
        .env_remove("SSL_CERT_DIR")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = child.stdout.take().unwrap();
    let lines = Arc::clone(&stdout);
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            lines.lock().unwrap().push(line);
        }
    });
    Lb { child, stdout }
}

/// SPEC: `https://` backends are verified against the system roots (plus `upstream_ca`), and
/// SIGHUP reloads. An operator who removes a root from the system store (a distrusted or
/// compromised CA) and sends SIGHUP expects lb to stop trusting it, as it did before the
/// reload kept the old client config whenever `upstream_ca` was unchanged: that check looked
/// at `upstream_ca` only, so the old roots stayed in force until a restart (and the pooled
/// connections verified with them went on being used).
#[test]
fn a_reload_after_a_system_root_is_removed_stops_trusting_it() {
    let system = Pki::new("system CA");
    let other = Pki::new("unrelated CA");
    let (cert, key) = system.leaf(&["localhost"]);
    let _backend = TlsBackend::start(25102, &cert, &key, "S");
    let d = dir("system-roots-reload");
    let roots = write(&d, "roots.pem", &system.ca_pem);
    let addr: SocketAddr = "127.0.0.1:25101".parse().unwrap();
    let config = |strategy: &str| {
        format!(
            "listen = [\"{addr}\"]\nstrategy = \"{strategy}\"\n[health]\ninterval = \"0s\"\n\
             [[backend]]\nurl = \"https://localhost:25102\"\n"
        )
    };
    let path = write(&d, "lb.toml", &config("round-robin"));
    let mut lb = spawn_with_system_roots(&path, &roots);
    wait_listening(&mut lb, addr);
    for _ in 0..4 {
        assert_eq!(
            get(addr),
            (200, "S".to_owned()),
            "trusted by the system roots"
        );
    }

    // The system CA is distrusted: gone from the store. Then a reload.
    std::fs::write(&roots, &other.ca_pem).unwrap();
    std::fs::write(&path, config("random")).unwrap();
    lb.signal("HUP");
    lb.wait_for("the reload", |lb| lb.logged("configuration reloaded") >= 1);
    let answers: Vec<(u16, String)> = (0..8).map(|_| get(addr)).collect();
    assert!(
        answers.iter().all(|(status, _)| *status == 502),
        "the reload read system roots that no longer trust the backend, yet: {answers:?}"
    );
}
