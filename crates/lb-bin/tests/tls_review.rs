//! Regression tests, through the real binary, for the defects the hostile reviews of TLS
//! found (each test failed before its fix): what a reload does to the trust in https
//! backends, and ALPN `http/1.0`.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::tls::{client_config, toml_path, HttpsBackend, Pki, Verify, DEADLINE};
use common::*;

fn wait_listening(lb: &mut Lb, addr: SocketAddr) {
    lb.wait_for("lb to listen", |_| TcpStream::connect(addr).is_ok());
}

/// lb with one https backend and `upstream_ca`, probes off, under `strategy` (a reload that
/// changes only the strategy leaves the trust as it was).
fn config(addr: SocketAddr, strategy: &str, ca: Option<&Path>, backend: &str) -> String {
    let ca = ca.map_or(String::new(), |ca| {
        format!("[tls]\nupstream_ca = {}\n", toml_path(ca))
    });
    format!(
        "listen = [\"{addr}\"]\nstrategy = \"{strategy}\"\n[health]\ninterval = \"0s\"\n\
         {ca}[[backend]]\nurl = \"{backend}\"\n"
    )
}

/// SPEC: `https://` backends are verified against the system roots plus `upstream_ca`, and
/// SIGHUP reloads the config. After a reload whose `upstream_ca` no longer trusts a
/// backend's certificate, lb must not keep sending requests to that backend over the TLS
/// connections it pooled while the old CA was in force. lb used to keep reusing them (each
/// reuse refreshing their idle time, so under steady traffic the old trust lasted for ever).
#[test]
fn a_reload_to_an_upstream_ca_that_no_longer_trusts_a_backend_stops_using_its_pooled_connections() {
    let trusted = Pki::new("review-trusted");
    let other = Pki::new("review-other");
    let backend = HttpsBackend::start("B", &trusted.leaf("b", &["localhost"], 1));
    let addr = free_port_addr();
    let path = trusted.config(&config(
        addr,
        "round-robin",
        Some(&trusted.ca_pem),
        &backend.url(),
    ));
    let mut lb = Lb::spawn(&path);
    wait_listening(&mut lb, addr);
    for _ in 0..8 {
        assert_eq!(get(addr), (200, "B".to_owned()), "trusted by upstream_ca");
    }
    assert!(backend.connections.load(Ordering::SeqCst) >= 1);

    std::fs::write(
        &path,
        config(addr, "round-robin", Some(&other.ca_pem), &backend.url()),
    )
    .unwrap();
    lb.signal("HUP");
    lb.wait_for("the reload", |lb| lb.logged("configuration reloaded") >= 1);
    // A new connection is refused now, and so must be the pooled ones: no request reaches
    // a backend the config in force does not trust.
    let answers: Vec<(u16, String)> = (0..8).map(|_| get(addr)).collect();
    assert!(
        answers.iter().all(|(status, _)| *status == 502),
        "after the reload the backend is no longer trusted, yet: {answers:?}"
    );
}

/// The other side of the test above: a reload that leaves the trust as it was (the same
/// `upstream_ca`, the same system roots) keeps the pooled TLS connections, so a SIGHUP is
/// no handshake storm. Each worker keeps its own pool: the backend sees at most one
/// connection per worker over all the sequential requests.
#[test]
fn a_reload_that_keeps_upstream_ca_keeps_the_pooled_tls_connections() {
    let pki = Pki::new("review-kept");
    let backend = HttpsBackend::start("K", &pki.leaf("k", &["localhost"], 1));
    let addr = free_port_addr();
    let path = pki.config(&config(
        addr,
        "round-robin",
        Some(&pki.ca_pem),
        &backend.url(),
    ));
    let mut lb = Lb::spawn(&path);
    wait_listening(&mut lb, addr);
    for _ in 0..8 {
        assert_eq!(get(addr), (200, "K".to_owned()));
    }
    let before = backend.connections.load(Ordering::SeqCst);
    assert!((1..=8).contains(&before), "{before}");
    // A reload that changes something else, twice.
    for (n, strategy) in [(1, "random"), (2, "round-robin")] {
        std::fs::write(
            &path,
            config(addr, strategy, Some(&pki.ca_pem), &backend.url()),
        )
        .unwrap();
        lb.signal("HUP");
        lb.wait_for("the reload", |lb| lb.logged("configuration reloaded") >= n);
        for _ in 0..8 {
            assert_eq!(get(addr), (200, "K".to_owned()));
        }
    }
    let workers = std::thread::available_parallelism().map_or(1, usize::from) as u64;
    let after = backend.connections.load(Ordering::SeqCst);
    assert!(
        after <= before.max(workers),
        "the pooled connections were kept: {before} before the reloads, {after} after"
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
    let stdout = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = child.stdout.take().unwrap();
    let lines = std::sync::Arc::clone(&stdout);
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            lines.lock().unwrap().push(line);
        }
    });
    Lb { child, stdout }
}

/// An operator who removes a root from the system store (a distrusted CA) and sends SIGHUP
/// expects lb to stop trusting it. The reload used to keep the old client config whenever
/// `upstream_ca` was unchanged, so the old roots stayed in force until a restart.
#[test]
fn a_reload_after_a_system_root_is_removed_stops_trusting_it() {
    let system = Pki::new("review-system");
    let other = Pki::new("review-unrelated");
    let backend = HttpsBackend::start("S", &system.leaf("s", &["localhost"], 1));
    let roots = system.write(
        "roots.pem",
        &std::fs::read_to_string(&system.ca_pem).unwrap(),
    );
    let addr = free_port_addr();
    let path = system.config(&config(addr, "round-robin", None, &backend.url()));
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
    std::fs::copy(&other.ca_pem, &roots).unwrap();
    std::fs::write(&path, config(addr, "random", None, &backend.url())).unwrap();
    lb.signal("HUP");
    lb.wait_for("the reload", |lb| lb.logged("configuration reloaded") >= 1);
    let answers: Vec<(u16, String)> = (0..8).map(|_| get(addr)).collect();
    assert!(
        answers.iter().all(|(status, _)| *status == 502),
        "the reload read system roots that no longer trust the backend, yet: {answers:?}"
    );
}

/// Over TLS to `addr` (SNI `name`, offering `alpn`, trusting `pki`'s CA), sends `request`
/// and reads until the server closes: Err if the handshake failed, else what came back.
fn tls_exchange(
    pki: &Pki,
    alpn: &[u8],
    addr: SocketAddr,
    name: &str,
    request: &[u8],
) -> Result<Vec<u8>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = client_config(&[alpn], &Verify::Ca(pki.ca_der.clone()));
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let server = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut tls = tokio::time::timeout(DEADLINE, connector.connect(server, tcp))
            .await
            .map_err(|_| "handshake timed out".to_owned())?
            .map_err(|e| format!("handshake failed: {e}"))?;
        tls.write_all(request).await.map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
        Ok(out)
    })
}

/// lb serves HTTP/1.0 clients on a plain port; a client over TLS that offers ALPN
/// `http/1.0` (as `curl --http1.0` does, and as NGINX and HAProxy accept) was refused with
/// a `no_application_protocol` alert while lb offered only `h2` and `http/1.1`.
#[test]
fn an_http_1_0_client_over_tls_is_served() {
    let pki = Pki::new("review-http10");
    let leaf = pki.leaf("a", &["a.test"], 1);
    let backend = HttpsBackend::plain("B");
    let addr = free_port_addr();
    let path = pki.config(&format!(
        "listen = [\"{addr}\"]\n[health]\ninterval = \"0s\"\n[tls]\ncert = {}\nkey = {}\n\
         [[backend]]\nurl = \"{}\"\n",
        toml_path(&leaf.cert),
        toml_path(&leaf.key),
        backend.plain_url()
    ));
    let mut lb = Lb::spawn(&path);
    wait_listening(&mut lb, addr);
    let h11 = tls_exchange(
        &pki,
        b"http/1.1",
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
        &pki,
        b"http/1.0",
        addr,
        "a.test",
        b"GET / HTTP/1.0\r\nHost: a.test\r\n\r\n",
    )
    .expect("an HTTP/1.0 client offering ALPN http/1.0");
    assert!(
        h10.windows(4).any(|w| w == b" 200"),
        "{}",
        String::from_utf8_lossy(&h10)
    );
    assert_eq!(backend.requests().len(), 2, "both reached the backend");
}
