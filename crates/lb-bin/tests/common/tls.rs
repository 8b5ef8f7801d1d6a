//! TLS test tools: a test PKI (rcgen), a TLS client driving hyper's client connection
//! (HTTP/1.1 or HTTP/2 by ALPN, optional SNI, verified against the test CA or not at all),
//! and an HTTPS backend that records what it received and the SNI it saw.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::net::TcpStream;

/// Every network wait of these tools is bounded by this.
pub const DEADLINE: Duration = Duration::from_secs(20);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A test certificate authority, writing its PEM files into `dir`.
pub struct Pki {
    pub dir: PathBuf,
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub ca_der: CertificateDer<'static>,
    /// The CA certificate, PEM (`ca.pem` in `dir`).
    pub ca_pem: PathBuf,
}

/// A leaf certificate and its key, written as `<stem>.pem` and `<stem>.key`.
#[derive(Clone)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    /// A new CA in a fresh temporary directory named after `name` (and the process).
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("lb-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("lb test CA {name}"));
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        let ca_pem = dir.join("ca.pem");
        std::fs::write(&ca_pem, cert.pem()).unwrap();
        Self {
            dir,
            ca: rcgen::Issuer::new(params, key),
            ca_der: cert.der().clone(),
            ca_pem,
        }
    }

    /// A leaf for `names` with serial number `serial`, signed by the CA, not written.
    pub fn issue(&self, names: &[&str], serial: u64) -> (String, String, CertificateDer<'static>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().copied().unwrap_or("leaf"),
        );
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().clone())
    }

    /// A leaf for `names` with serial number `serial`, written as `<stem>.pem`/`<stem>.key`.
    pub fn leaf(&self, stem: &str, names: &[&str], serial: u64) -> Leaf {
        let (cert_pem, key_pem, der) = self.issue(names, serial);
        let cert = self.dir.join(format!("{stem}.pem"));
        let key = self.dir.join(format!("{stem}.key"));
        std::fs::write(&cert, &cert_pem).unwrap();
        std::fs::write(&key, &key_pem).unwrap();
        Leaf {
            cert,
            key,
            der,
            cert_pem,
            key_pem,
        }
    }

    /// A file `name` in the PKI's directory with `text` in it.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn config(&self, text: &str) -> PathBuf {
        self.write("lb.toml", text)
    }
}

/// A TOML string for a path.
pub fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// How the client checks the server's certificate.
#[derive(Clone)]
pub enum Verify {
    /// Against this CA (and the name connected to).
    Ca(CertificateDer<'static>),
    /// Not at all (the peer's leaf is still recorded, see [`Tls::peer`]).
    Any,
}

#[derive(Debug)]
struct AcceptAnything;

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client config offering `alpn` (each connection gets its own: no session resumption
/// across connections, so every handshake shows the certificate served now).
pub fn client_config(alpn: &[&[u8]], verify: &Verify) -> ClientConfig {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let mut config = match verify {
        Verify::Ca(ca) => {
            let mut roots = RootCertStore::empty();
            roots.add(ca.clone()).unwrap();
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Verify::Any => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything))
            .with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// The ALPN protocol to offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    H2,
    Http11,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// One TLS client connection to lb with hyper's client over it.
pub struct Tls {
    sender: Sender,
    /// The ALPN protocol the server chose.
    pub alpn: Option<Vec<u8>>,
    /// The leaf certificate the server presented.
    pub peer: CertificateDer<'static>,
}

/// A TLS handshake with `addr`: SNI `sni` (none: the handshake names an IP address, and
/// rustls sends no SNI for one), offering `alpn`.
pub async fn handshake(
    addr: SocketAddr,
    sni: Option<&str>,
    alpn: &[&[u8]],
    verify: &Verify,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let config = Arc::new(client_config(alpn, verify));
    let name = match sni {
        Some(n) => ServerName::try_from(n.to_owned()).unwrap(),
        None => ServerName::IpAddress(addr.ip().into()),
    };
    let go = async {
        let tcp = TcpStream::connect(addr).await?;
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
    };
    tokio::time::timeout(DEADLINE, go)
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

impl Tls {
    /// Connects, shakes hands and starts hyper's client (HTTP/2 if the server chose `h2`,
    /// else HTTP/1.1).
    pub async fn connect(
        addr: SocketAddr,
        sni: Option<&str>,
        alpn: Alpn,
        verify: &Verify,
    ) -> std::io::Result<Self> {
        let offer: &[&[u8]] = match alpn {
            Alpn::H2 => &[b"h2"],
            Alpn::Http11 => &[b"http/1.1"],
        };
        let stream = handshake(addr, sni, offer, verify).await?;
        let conn = stream.get_ref().1;
        let chosen = conn.alpn_protocol().map(<[u8]>::to_vec);
        let peer = conn.peer_certificates().expect("a server certificate")[0].clone();
        let io = TokioIo::new(stream);
        let sender = if chosen.as_deref() == Some(b"h2") {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(conn);
            Sender::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(conn);
            Sender::H1(send)
        };
        Ok(Self {
            sender,
            alpn: chosen,
            peer,
        })
    }

    /// GET `path` with `Host: host` (HTTP/2: as the `:authority`); (status, version, body).
    pub async fn get(
        &mut self,
        host: &str,
        path: &str,
    ) -> Result<(u16, hyper::Version, String), String> {
        let go = async {
            let resp = match &mut self.sender {
                Sender::H1(s) => {
                    s.ready().await.map_err(|e| e.to_string())?;
                    let req = hyper::Request::get(path)
                        .header("host", host)
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    s.send_request(req).await
                }
                Sender::H2(s) => {
                    s.ready().await.map_err(|e| e.to_string())?;
                    let req = hyper::Request::get(format!("https://{host}{path}"))
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    s.send_request(req).await
                }
            }
            .map_err(|e| e.to_string())?;
            let (status, version) = (resp.status().as_u16(), resp.version());
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok((status, version, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(DEADLINE, go)
            .await
            .map_err(|_| "request timed out".to_owned())?
    }
}

/// What an [`HttpsBackend`] received: one per request.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub path: String,
    pub headers: hyper::HeaderMap,
    /// The SNI of the connection it came on.
    pub sni: Option<String>,
}

/// An HTTPS (HTTP/1.1) backend on its own thread serving `leaf`, answering its name.
pub struct HttpsBackend {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<SeenRequest>>>,
    /// Handshakes that failed (a client that refused the certificate, say).
    pub failed_handshakes: Arc<AtomicU64>,
    /// Connections accepted (over TLS: whose handshake succeeded).
    pub connections: Arc<AtomicU64>,
}

impl HttpsBackend {
    /// Over TLS with `leaf`'s certificate (ALPN `http/1.1`).
    pub fn start(name: &str, leaf: &Leaf) -> Self {
        let chain = vec![leaf.der.clone()];
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self::run(
            name,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        )
    }

    /// Plain HTTP/1.1, recording the same (with no SNI).
    pub fn plain(name: &str) -> Self {
        Self::run(name, None)
    }

    fn run(name: &str, acceptor: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let failed_handshakes = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let (s, f, c) = (seen.clone(), failed_handshakes.clone(), connections.clone());
        let body = Bytes::from(name.to_owned());
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
                    let (acceptor, s, f, c, body) = (
                        acceptor.clone(),
                        s.clone(),
                        f.clone(),
                        c.clone(),
                        body.clone(),
                    );
                    tokio::spawn(async move {
                        let Some(acceptor) = acceptor else {
                            c.fetch_add(1, Ordering::SeqCst);
                            serve(stream, None, s, body).await;
                            return;
                        };
                        match tokio::time::timeout(DEADLINE, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => {
                                c.fetch_add(1, Ordering::SeqCst);
                                let sni = tls.get_ref().1.server_name().map(str::to_owned);
                                serve(tls, sni, s, body).await;
                            }
                            _ => {
                                f.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    });
                }
            });
        });
        Self {
            addr,
            seen,
            failed_handshakes,
            connections,
        }
    }

    /// `http://127.0.0.1:PORT` (for [`HttpsBackend::plain`]).
    pub fn plain_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `https://localhost:PORT`.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// `localhost:PORT`, as lb names it in logs.
    pub fn label(&self) -> String {
        format!("localhost:{}", self.addr.port())
    }

    pub fn requests(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests other than for `probe_path`.
    pub fn non_probe(&self, probe_path: &str) -> Vec<SeenRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path != probe_path)
            .collect()
    }
}

async fn serve<I>(io: I, sni: Option<String>, s: Arc<Mutex<Vec<SeenRequest>>>, body: Bytes)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let (s, body, sni) = (s.clone(), body.clone(), sni.clone());
        async move {
            s.lock().unwrap().push(SeenRequest {
                path: req.uri().path().to_owned(),
                headers: req.headers().clone(),
                sni,
            });
            let _ = req.into_body().collect().await;
            Ok::<_, Infallible>(hyper::Response::new(Full::new(body)))
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

/// `lb` with `args` (and `--log-format json`), stdout captured as [`Lb::spawn`] does.
pub fn spawn_lb(args: &[&std::ffi::OsStr]) -> super::Lb {
    use std::io::BufRead;
    let mut child = std::process::Command::new(super::LB)
        .args(args)
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let out = child.stdout.take().unwrap();
    let lines = stdout.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            lines.lock().unwrap().push(line);
        }
    });
    super::Lb { child, stdout }
}

/// Waits (bounded) until a TLS handshake with lb at `addr` succeeds. The handshake is a
/// whole one, so this probe adds nothing to `lb_tls_handshake_errors_total`.
pub fn wait_tls(lb: &mut super::Lb, rt: &tokio::runtime::Runtime, addr: SocketAddr) {
    lb.wait_for("lb to accept TLS", |_| {
        rt.block_on(handshake(addr, None, &[b"http/1.1"], &Verify::Any))
            .is_ok()
    });
}

/// A multi-threaded runtime for a test: hyper's connection tasks keep running between
/// `block_on`s.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The value of the counter `name` in a Prometheus text exposition.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}
