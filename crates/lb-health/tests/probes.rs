//! lb-health against real sockets on 127.0.0.1: no mock of the network.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lb_core::select::{AnySelect, StrategyKind};
use lb_core::{Backend, BackendId, Balancer, Config, HealthConfig, Weight};
use lb_health::{
    Checker, CheckerConfig, HttpProber, ProbeError, ProbeSink, Prober, Target, TcpProber, TlsTarget,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// How a test backend behaves.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Status(u16),
    Garbage,
    /// A plain-HTTP server that answers `400` at once, before reading anything.
    Eager,
    BlackHole,
    EndlessHead,
}

/// A backend on 127.0.0.1 that answers every connection per `mode`; records request heads.
struct TestBackend {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn backend(mode: Mode) -> TestBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    backend_on(listener, mode)
}

fn backend_on(listener: TcpListener, mode: Mode) -> TestBackend {
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let h = Arc::clone(&heads);
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            if let Mode::BlackHole = mode {
                held.push(sock); // accept, never answer, never close
                continue;
            }
            let h = Arc::clone(&h);
            tokio::spawn(async move {
                if let Mode::Eager = mode {
                    let _ = sock
                        .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                        .await;
                    let _ = sock.read(&mut [0u8; 4096]).await;
                    return;
                }
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
                h.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..len]).into_owned());
                let _ = match mode {
                    Mode::Status(s) => {
                        sock.write_all(
                            format!("HTTP/1.1 {s} X\r\nContent-Length: 2\r\n\r\nok").as_bytes(),
                        )
                        .await
                    }
                    Mode::Garbage => sock.write_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n").await,
                    Mode::EndlessHead => {
                        loop {
                            if sock.write_all(b"HTTP/1.1 200 OK\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n").await.is_err() {
                            break Ok(());
                        }
                        }
                    }
                    Mode::Eager | Mode::BlackHole => Ok(()),
                };
            });
        }
    });
    TestBackend { addr, heads, task }
}

async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// A probe timeout no probe of a live local backend reaches, even on a busy machine.
const T: Duration = Duration::from_secs(5);
/// The timeout of the probes that are meant to time out.
const SHORT: Duration = Duration::from_millis(300);

#[tokio::test]
async fn tcp_probe_accepting_refused() {
    let up = backend(Mode::BlackHole).await;
    TcpProber.probe(&Target::new(up.addr), T).await.unwrap();
    let err = TcpProber
        .probe(&Target::new(closed_port().await), T)
        .await
        .unwrap_err();
    assert!(matches!(err, ProbeError::Refused), "{err:?}");
}

#[tokio::test]
async fn http_probe_statuses_host_header_and_bounds() {
    let ok = backend(Mode::Status(200)).await;
    let target = Target::new(ok.addr).with_authority("app.example:8080");
    HttpProber::new("healthz").probe(&target, T).await.unwrap();
    let head = ok.heads.lock().unwrap()[0].clone();
    assert!(head.starts_with("GET /healthz HTTP/1.1\r\n"), "{head}");
    assert!(head.contains("\r\nHost: app.example:8080\r\n"), "{head}");

    let redirect = backend(Mode::Status(302)).await;
    HttpProber::new("/")
        .probe(&Target::new(redirect.addr), T)
        .await
        .unwrap();

    let down = backend(Mode::Status(503)).await;
    let err = HttpProber::new("/")
        .probe(&Target::new(down.addr), T)
        .await
        .unwrap_err();
    assert!(matches!(err, ProbeError::BadStatus(503)), "{err:?}");
    let strict = HttpProber::new("/").with_healthy(200..=299);
    let err = strict
        .probe(&Target::new(redirect.addr), T)
        .await
        .unwrap_err();
    assert!(matches!(err, ProbeError::BadStatus(302)), "{err:?}");

    let garbage = backend(Mode::Garbage).await;
    let err = HttpProber::new("/")
        .probe(&Target::new(garbage.addr), T)
        .await
        .unwrap_err();
    assert!(matches!(err, ProbeError::BadResponse(_)), "{err:?}");

    let endless = backend(Mode::EndlessHead).await;
    let err = HttpProber::new("/")
        .probe(&Target::new(endless.addr), T)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ProbeError::BadResponse(_)),
        "an endless head is cut off: {err:?}"
    );

    let err = HttpProber::new("/")
        .probe(&Target::new(closed_port().await), T)
        .await
        .unwrap_err();
    assert!(matches!(err, ProbeError::Refused), "{err:?}");
}

#[tokio::test]
async fn http_probe_of_a_black_hole_times_out_within_its_bound() {
    let hole = backend(Mode::BlackHole).await;
    let started = tokio::time::Instant::now();
    // The outer bound only keeps a broken prober from hanging the suite; it is far enough past
    // SHORT that a busy machine never reaches it.
    let err = tokio::time::timeout(
        SHORT + Duration::from_secs(20),
        HttpProber::new("/").probe(&Target::new(hole.addr), SHORT),
    )
    .await
    .expect("the probe ends by its own timeout")
    .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, ProbeError::Timeout(_)), "{err:?}");
    assert!(took >= SHORT, "not before the timeout: {took:?}");
}

/// Wraps a balancer as the sink and records every report with the health that followed.
struct Recorder {
    lb: Arc<Balancer>,
    log: Mutex<Vec<(BackendId, bool, bool, tokio::time::Instant)>>,
}

impl ProbeSink for Recorder {
    fn report(&self, backend: BackendId, result: &Result<(), ProbeError>, at: Instant) {
        self.lb.report(backend, result, at);
        let healthy = self
            .lb
            .backends(at)
            .iter()
            .find(|b| b.id == backend)
            .is_some_and(|b| b.healthy);
        self.log.lock().unwrap().push((
            backend,
            result.is_ok(),
            healthy,
            tokio::time::Instant::now(),
        ));
    }
}

fn recorder(addrs: &[SocketAddr]) -> (Arc<Recorder>, Vec<BackendId>) {
    let config = Config::default().with_health(HealthConfig::default().with_rise(2).with_fall(3));
    let lb = Balancer::new(config, AnySelect::new(StrategyKind::RoundRobin)).unwrap();
    let ids = lb
        .set_backends(
            addrs
                .iter()
                .map(|a| Backend::new(format!("http://{a}"), Weight::ONE)),
            tokio::time::Instant::now().into_std(),
        )
        .unwrap();
    (
        Arc::new(Recorder {
            lb: Arc::new(lb),
            log: Mutex::new(Vec::new()),
        }),
        ids,
    )
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_after_fall_failures_up_after_rise_successes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let (rec, ids) = recorder(&[addr]);
    let config = CheckerConfig {
        interval: Duration::from_millis(30),
        timeout: T,
        jitter_percent: 10,
    };
    let checker = Checker::new(TcpProber, config, rec.clone());
    checker.set_targets([(ids[0], Target::new(addr))]);

    wait_for("down", || rec.log.lock().unwrap().iter().any(|e| !e.2)).await;
    {
        let log = rec.log.lock().unwrap();
        let first_down = log.iter().position(|e| !e.2).unwrap();
        assert_eq!(first_down, 2, "down exactly at the third failure in a row");
        assert!(log[..=first_down].iter().all(|e| !e.1));
    }
    // The backend comes back on the same port. The mark is taken first, so that no success
    // can slip in between the bind and the mark.
    let mark = rec.log.lock().unwrap().len();
    let back = backend_on(TcpListener::bind(addr).await.unwrap(), Mode::Status(200));
    wait_for("up", || rec.log.lock().unwrap().last().is_some_and(|e| e.2)).await;
    {
        let log = rec.log.lock().unwrap();
        let since: Vec<_> = log[mark..].iter().collect();
        let first_up = since.iter().position(|e| e.2).unwrap();
        let ok_before = since[..first_up].iter().rev().take_while(|e| e.1).count();
        assert_eq!(
            ok_before + 1,
            2,
            "up exactly at the second success in a row: {since:?}"
        );
    }
    // Probing goes on while we look, and a probe is counted just before it is reported: the
    // two agree between probes, not necessarily at any one instant.
    wait_for("every probe counted", || {
        let counted = checker.counts()[0].2.total();
        counted == rec.log.lock().unwrap().len() as u64
    })
    .await;
    drop(back);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_starts_and_stops_only_what_changed_and_shutdown_is_prompt() {
    let a = backend(Mode::Status(200)).await;
    let b = backend(Mode::Status(200)).await;
    let c = backend(Mode::Status(200)).await;
    let (rec, ids) = recorder(&[a.addr, b.addr, c.addr]);
    let config = CheckerConfig {
        interval: Duration::from_millis(20),
        timeout: T,
        jitter_percent: 10,
    };
    let checker = Checker::new(TcpProber, config, rec.clone());
    checker.set_targets([(ids[0], Target::new(a.addr)), (ids[1], Target::new(b.addr))]);
    let b_task = checker.task_id(ids[1]).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    checker.set_targets([(ids[1], Target::new(b.addr)), (ids[2], Target::new(c.addr))]);
    assert_eq!(
        checker.task_id(ids[1]),
        Some(b_task),
        "B's probes were not restarted"
    );
    assert!(checker.task_id(ids[0]).is_none());
    let count = |id| rec.log.lock().unwrap().iter().filter(|e| e.0 == id).count();
    // A probe of A already running when it was stopped may still report; by the time C has
    // been probed three times it has. From then on, A must stay silent while C goes on.
    wait_for("C probed", || count(ids[2]) >= 3).await;
    let a_after = count(ids[0]);
    let c_after = count(ids[2]);
    wait_for("C probed again", || count(ids[2]) >= c_after + 5).await;
    assert_eq!(count(ids[0]), a_after, "A is no longer probed");

    checker.shutdown();
    // The same for a probe under way at shutdown: let it land, then expect silence over a
    // stretch in which a live checker (every 20 ms) would probe many times.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let total = rec.log.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        rec.log.lock().unwrap().len(),
        total,
        "no probe after shutdown"
    );
}

/// 200 backends probed every 50 ms, 20 of them black holes whose probes hang for a long
/// timeout: meanwhile every healthy backend is probed again and again, because no probe waits
/// on another. (Nothing here depends on how fast the machine is: a checker whose healthy probes
/// queued behind the black holes would get no healthy probe in before the black holes' timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holes_do_not_delay_healthy_probes() {
    let mut backends = Vec::new();
    for i in 0..200 {
        backends.push(
            backend(if i % 10 == 0 {
                Mode::BlackHole
            } else {
                Mode::Status(200)
            })
            .await,
        );
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let (rec, ids) = recorder(&addrs);
    let hang = Duration::from_secs(60);
    let config = CheckerConfig {
        interval: Duration::from_millis(50),
        timeout: hang,
        jitter_percent: 10,
    };
    let started = tokio::time::Instant::now();
    let checker = Checker::new(HttpProber::new("/"), config, rec.clone());
    checker.set_targets(ids.iter().zip(&addrs).map(|(id, a)| (*id, Target::new(*a))));
    let probes = || {
        let mut n: HashMap<BackendId, usize> = HashMap::new();
        for e in rec.log.lock().unwrap().iter() {
            *n.entry(e.0).or_default() += 1;
        }
        ids.iter()
            .map(|id| n.get(id).copied().unwrap_or(0))
            .collect::<Vec<_>>()
    };
    let healthy_probed = |n: &[usize]| {
        n.iter()
            .enumerate()
            .filter(|(i, _)| i % 10 != 0)
            .all(|(_, &k)| k >= 10)
    };
    // Bounded well inside `hang`, so the black holes cannot have answered by then.
    let deadline = started + hang / 2;
    let mut n = probes();
    while !healthy_probed(&n) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "healthy backends starved while black holes hang: {n:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        n = probes();
    }
    checker.shutdown();
    assert!(
        n.iter().step_by(10).all(|&k| k == 0),
        "black holes answer only by their timeout: {n:?}"
    );
    println!(
        "every healthy backend probed 10 times in {:?} (interval 50 ms)",
        started.elapsed()
    );
}

// === TLS ===

/// A private CA: its certificate, and the issuer that signs server certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    /// A server certificate for `localhost` signed by this CA, with its key.
    fn server_cert(&self) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        (cert.der().clone(), key)
    }

    /// A client connector trusting only this CA.
    fn connector(&self) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `(SNI, request head)` of every request a TLS backend received.
type Requests = Arc<Mutex<Vec<(Option<String>, String)>>>;

/// An HTTPS backend on 127.0.0.1 answering `200` to every request head; records each
/// request's head with the SNI the server saw.
struct TlsBackend {
    addr: SocketAddr,
    requests: Requests,
    task: JoinHandle<()>,
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tls_backend(ca: &Ca) -> TlsBackend {
    let (cert, key) = ca.server_cert();
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Requests::default();
    let r = Arc::clone(&requests);
    let task = tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, r) = (acceptor.clone(), Arc::clone(&r));
            tokio::spawn(async move {
                // A probe that fails verification aborts the handshake; so may a TCP probe
                // that got what it wanted.
                let Ok(mut tls) = acceptor.accept(sock).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().map(str::to_owned);
                let mut buf = vec![0u8; 4096];
                let mut len = 0;
                while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => len += n,
                    }
                    if len == buf.len() {
                        return;
                    }
                }
                let head = String::from_utf8_lossy(&buf[..len]).into_owned();
                r.lock().unwrap().push((sni, head));
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                let _ = tls.flush().await;
            });
        }
    });
    TlsBackend {
        addr,
        requests,
        task,
    }
}

fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

/// Bounds a probe that must end by itself (by its own timeout at the latest), so a prober
/// that hangs fails the test instead of the suite.
async fn bounded<F: std::future::Future>(probe: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), probe)
        .await
        .expect("the probe ends by itself")
}

#[tokio::test]
async fn tls_probes_trusting_the_ca_handshake_and_send_sni_and_host() {
    let ca = Ca::new("test CA");
    let up = tls_backend(&ca).await;
    let authority = format!("localhost:{}", up.addr.port());
    let target = Target::new(up.addr)
        .with_authority(authority.as_str())
        .with_tls(ca.connector(), localhost());

    bounded(TcpProber.probe(&target, T)).await.unwrap();
    bounded(HttpProber::new("/healthz").probe(&target, T))
        .await
        .unwrap();
    let requests = up.requests.lock().unwrap().clone();
    assert_eq!(
        requests.len(),
        1,
        "only the HTTP probe sends a request: {requests:?}"
    );
    let (sni, head) = &requests[0];
    assert_eq!(
        sni.as_deref(),
        Some("localhost"),
        "SNI = the URL's host name"
    );
    assert!(head.starts_with("GET /healthz HTTP/1.1\r\n"), "{head}");
    assert!(
        head.contains(&format!("\r\nHost: {authority}\r\n")),
        "{head}"
    );
}

#[tokio::test]
async fn tls_probes_fail_on_a_certificate_that_does_not_verify() {
    let ca = Ca::new("test CA");
    let other = Ca::new("another CA");
    let up = tls_backend(&ca).await;

    let untrusted = Target::new(up.addr).with_tls(other.connector(), localhost());
    let err = bounded(TcpProber.probe(&untrusted, T)).await.unwrap_err();
    assert!(
        matches!(&err, ProbeError::Tls(m) if m.contains("UnknownIssuer")),
        "{err:?}"
    );
    assert_eq!(err.label(), "tls");
    let err = bounded(HttpProber::new("/").probe(&untrusted, T))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ProbeError::Tls(m) if m.contains("UnknownIssuer")),
        "{err:?}"
    );

    // Trusted CA, but the certificate is for another name than the one asked for.
    let wrong_name =
        Target::new(up.addr).with_tls(ca.connector(), ServerName::try_from("app.example").unwrap());
    let err = bounded(HttpProber::new("/").probe(&wrong_name, T))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ProbeError::Tls(m) if m.contains("not valid for name")),
        "{err:?}"
    );

    assert!(
        up.requests.lock().unwrap().is_empty(),
        "no request is sent over an unverified session"
    );
}

#[tokio::test]
async fn tls_probes_of_a_plain_http_backend_fail_without_hanging() {
    let ca = Ca::new("test CA");
    // A plain server that answers at once: its bytes are no TLS record.
    let eager = backend(Mode::Eager).await;
    let target = Target::new(eager.addr).with_tls(ca.connector(), localhost());
    let err = bounded(TcpProber.probe(&target, T)).await.unwrap_err();
    assert!(matches!(err, ProbeError::Tls(_)), "{err:?}");
    let err = bounded(HttpProber::new("/").probe(&target, T))
        .await
        .unwrap_err();
    assert!(matches!(err, ProbeError::Tls(_)), "{err:?}");

    // A plain server that waits for a request head the ClientHello never completes: the
    // probe's own timeout ends it.
    let waiting = backend(Mode::Status(200)).await;
    let target = Target::new(waiting.addr).with_tls(ca.connector(), localhost());
    let err = bounded(TcpProber.probe(&target, SHORT)).await.unwrap_err();
    assert!(matches!(err, ProbeError::Timeout(_)), "{err:?}");
    let err = bounded(HttpProber::new("/").probe(&target, SHORT))
        .await
        .unwrap_err();
    assert!(matches!(err, ProbeError::Timeout(_)), "{err:?}");
    assert!(waiting.heads.lock().unwrap().is_empty());

    // The same backend without TLS: as before.
    let plain = Target::new(waiting.addr);
    assert!(plain.tls.is_none());
    bounded(TcpProber.probe(&plain, T)).await.unwrap();
    bounded(HttpProber::new("/").probe(&plain, T))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_restarts_a_tls_target_only_when_its_config_changes() {
    let ca = Ca::new("test CA");
    let up = tls_backend(&ca).await;
    let (rec, ids) = recorder(&[up.addr]);
    let config = CheckerConfig {
        interval: Duration::from_millis(20),
        timeout: T,
        jitter_percent: 10,
    };
    let checker = Checker::new(HttpProber::new("/"), config, rec.clone());
    let connector = ca.connector();
    let target = Target::new(up.addr).with_tls(connector.clone(), localhost());
    checker.set_targets([(ids[0], target)]);
    let first = checker.task_id(ids[0]).unwrap();
    wait_for("a successful TLS probe", || {
        rec.log.lock().unwrap().iter().any(|e| e.1)
    })
    .await;

    // The same connector (a clone shares its config): the probes go on.
    checker.set_targets([(
        ids[0],
        Target::new(up.addr).with_tls(connector, localhost()),
    )]);
    assert_eq!(checker.task_id(ids[0]), Some(first));
    // A rebuilt config (a reload with a new CA, say): the probes restart.
    let tls: TlsTarget = Target::new(up.addr)
        .with_tls(ca.connector(), localhost())
        .tls
        .unwrap();
    checker.set_targets([(
        ids[0],
        Target {
            tls: Some(tls),
            ..Target::new(up.addr)
        },
    )]);
    assert_ne!(checker.task_id(ids[0]), Some(first));
    checker.shutdown();
}
