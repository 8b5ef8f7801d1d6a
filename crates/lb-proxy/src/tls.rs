//! TLS, both ways: the certificates served to clients (chosen by SNI), and the verified
//! client side for `https://` backends. The sockets' side of it is in `conn` (the
//! handshake with a client) and `upstream` (the handshake with a backend).
//!
//! # One crypto provider: ring
//! rustls's `ring` provider builds with a C compiler alone (no cmake, no NASM) in seconds on
//! a 2-core machine, runs wherever Rust does, and its AES-GCM, ChaCha20-Poly1305, X25519 and
//! P-256 are assembly. (aws-lc-rs, the other choice, adds post-quantum key exchange and
//! faster RSA signing at the price of a much longer C build.)

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// ALPN protocols offered to clients, in the server's order of preference (`http/1.0`: as
/// NGINX and HAProxy, HTTP/1.0 clients such as `curl --http1.0` offer only it, and lb
/// serves HTTP/1.0 as on a plain port).
const ALPN_SERVER: [&[u8]; 3] = [b"h2", b"http/1.1", b"http/1.0"];

/// Why a TLS file or setting was refused. Every variant names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A certificate file with no PEM certificate in it.
    #[error("{}: no PEM certificate in the file", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A key file with no PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC) in it.
    #[error("{}: no PEM private key (PKCS#8, RSA or EC) in the file", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// A certificate or key rustls cannot use.
    #[error("{}: {why}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The key is not the certificate's.
    #[error("{}: the private key does not match the certificate {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The PEM certificates in `path`, in order.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        certs.push(cert.map_err(|e| TlsError::Invalid {
            path: path.to_owned(),
            why: format!("bad PEM: {e}"),
        })?);
    }
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// One certificate chain with its key, and the DNS names it is for.
#[derive(Clone)]
pub struct Certificate {
    key: Arc<CertifiedKey>,
    /// Lowercased `subjectAltName` DNS names, wildcards (`*.example.com`) as written.
    names: Vec<String>,
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl Certificate {
    /// Reads a PEM chain (leaf first) from `cert` and its PEM private key (PKCS#8, PKCS#1
    /// RSA or SEC1 EC) from `key`, and checks that they belong together.
    ///
    /// # Errors
    /// A file that cannot be read, holds no certificate or no key, or a key that is not the
    /// certificate's: the error names the file.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let chain = certificates(cert)?;
        let key_pem = read(key)?;
        if key_pem
            .windows(b"-----BEGIN ENCRYPTED PRIVATE KEY-----".len())
            .any(|w| w == b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        {
            return Err(TlsError::Invalid {
                path: key.to_owned(),
                why:
                    "the private key is encrypted (passphrase-protected): lb needs it unencrypted \
                      (openssl pkey -in KEY -out PLAIN)"
                        .to_owned(),
            });
        }
        let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
                path: key.to_owned(),
            },
            e => TlsError::Invalid {
                path: key.to_owned(),
                why: format!("bad PEM private key: {e}"),
            },
        })?;
        let names = dns_names(&chain[0]).map_err(|why| TlsError::Invalid {
            path: cert.to_owned(),
            why,
        })?;
        let certified =
            CertifiedKey::from_der(chain, private, &provider()).map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                    cert: cert.to_owned(),
                    key: key.to_owned(),
                },
                e => TlsError::Invalid {
                    path: key.to_owned(),
                    why: e.to_string(),
                },
            })?;
        Ok(Self {
            key: Arc::new(certified),
            names,
        })
    }

    /// The DNS names (`subjectAltName`) it is chosen for, lowercased.
    #[must_use]
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

/// The certificate's `subjectAltName` DNS names, lowercased. (Its common name is not one:
/// clients have stopped reading it, and so does SNI matching.)
fn dns_names(der: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(n) = name {
                names.push(n.to_ascii_lowercase());
            }
        }
    }
    Ok(names)
}

/// The certificates served to clients: by SNI against each one's DNS names (an exact name
/// before a wildcard; `*.example.com` covers one label, as RFC 6125 says), else the default.
#[derive(Debug)]
pub struct Certificates {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By the part after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl Certificates {
    /// `default` for clients without SNI or with a name no certificate has; every one of
    /// `default` and `more` for its names. Where two have the same name, the first wins.
    #[must_use]
    pub fn new(default: Certificate, more: impl IntoIterator<Item = Certificate>) -> Self {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let all: Vec<Certificate> = std::iter::once(default.clone()).chain(more).collect();
        for cert in &all {
            for name in &cert.names {
                let map = match name.strip_prefix("*.") {
                    Some(rest) => (&mut wildcard, rest.to_owned()),
                    None => (&mut exact, name.clone()),
                };
                map.0.entry(map.1).or_insert_with(|| Arc::clone(&cert.key));
            }
        }
        Self {
            default: default.key,
            exact,
            wildcard,
        }
    }

    /// The certificate for a client that asked for `sni`.
    fn pick(&self, sni: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = sni else {
            return &self.default;
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return key;
        }
        name.split_once('.')
            .and_then(|(label, parent)| (!label.is_empty()).then_some(parent))
            .and_then(|parent| self.wildcard.get(parent))
            .unwrap_or(&self.default)
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(self.pick(hello.server_name())))
    }
}

/// A new session-ticket key set (tickets are encrypted with keys that rotate every 6 h).
/// Keep one for the process and give it to every [`server_config`]: tickets issued before a
/// certificate reload still resume after it.
///
/// # Errors
/// If the system's random number generator fails.
pub fn ticketer() -> Result<Arc<dyn ProducesTickets>, rustls::Error> {
    rustls::crypto::ring::Ticketer::new()
}

/// What lb serves clients: TLS 1.3 and 1.2, ALPN `h2` and `http/1.1`, `certificates` by
/// SNI, session resumption by tickets (`ticketer`) and by a session cache.
///
/// # Errors
/// rustls refusing the protocol versions (not with its own provider).
pub fn server_config(
    certificates: Arc<Certificates>,
    ticketer: Arc<dyn ProducesTickets>,
) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(certificates);
    config.alpn_protocols = ALPN_SERVER.iter().map(|p| p.to_vec()).collect();
    config.ticketer = ticketer;
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    Ok(config)
}

/// How lb verifies `https://` backends: the platform's roots (read by rustls-native-certs
/// from the system's store, which the OS keeps up to date) plus the CA certificates in
/// `extra` (`tls.upstream_ca`); TLS 1.3 and 1.2; ALPN `http/1.1` (lb speaks HTTP/1.1 to
/// backends); session resumption on.
///
/// # Errors
/// `extra` cannot be read, holds no certificate, or one rustls cannot use as a root.
pub fn client_config(extra: Option<&Path>) -> Result<ClientConfig, TlsError> {
    ClientRoots::load(extra)?.client_config()
}

/// What `https://` backends are trusted by, as read: the system's roots and the
/// certificates of `upstream_ca`. Equal roots verify the same way, so a reload that reads
/// equal ones may keep the client config built from the old (and its pooled connections).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRoots {
    system: Vec<CertificateDer<'static>>,
    extra: Option<(PathBuf, Vec<CertificateDer<'static>>)>,
}

impl ClientRoots {
    /// Reads the system's roots and `extra`'s certificates.
    ///
    /// # Errors
    /// `extra` cannot be read or holds no certificate.
    pub fn load(extra: Option<&Path>) -> Result<Self, TlsError> {
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::debug!(target: "lb::tls", error = %e, "a system root certificate could not be read");
        }
        let extra = match extra {
            Some(path) => Some((path.to_owned(), certificates(path)?)),
            None => None,
        };
        Ok(Self {
            system: native.certs,
            extra,
        })
    }

    /// The client config verifying with these roots (see [`client_config`]).
    ///
    /// # Errors
    /// A certificate of `upstream_ca` rustls cannot use as a root.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        let mut roots = RootCertStore::empty();
        let (_, unusable) = roots.add_parsable_certificates(self.system.iter().cloned());
        if unusable > 0 {
            tracing::debug!(target: "lb::tls", unusable, "system root certificates rustls cannot use");
        }
        let mut pinned = Vec::new();
        if let Some((path, certs)) = &self.extra {
            for cert in certs {
                roots.add(cert.clone()).map_err(|e| TlsError::Invalid {
                    path: path.clone(),
                    why: format!("not a CA certificate rustls can use: {e}"),
                })?;
                pinned.push(cert.clone());
            }
        }
        let invalid = |e: String| TlsError::Invalid {
            path: self
                .extra
                .as_ref()
                .map(|(p, _)| p.clone())
                .unwrap_or_default(),
            why: e,
        };
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| invalid(e.to_string()))?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| invalid(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier { inner, pinned }))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// Verifies backends' certificates as webpki does, and also accepts a certificate that is
/// itself in `upstream_ca` (byte for byte) when it is valid now and for the name.
///
/// # Why
/// A backend's self-signed certificate (`openssl req -x509` makes one with `CA:TRUE`) given
/// as `upstream_ca` is how most private backends are set up, and OpenSSL-based proxies
/// accept it as a trusted leaf; webpki refuses a CA certificate as the end entity
/// (`CaUsedAsEndEntity`). The handshake's signature is still checked against the
/// certificate's key, so only the holder of that key passes.
#[derive(Debug)]
struct Verifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    pinned: Vec<CertificateDer<'static>>,
}

impl rustls::client::danger::ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let refused =
            match self
                .inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
        if !self
            .pinned
            .iter()
            .any(|p| p.as_ref() == end_entity.as_ref())
        {
            return Err(refused);
        }
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|_| refused.clone())?;
        if cert.verify_is_valid_for_subject_name(server_name).is_err() {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ));
        }
        let valid_now = x509_parser::parse_x509_certificate(end_entity.as_ref())
            .ok()
            .and_then(|(_, c)| {
                let at =
                    x509_parser::time::ASN1Time::from_timestamp(i64::try_from(now.as_secs()).ok()?)
                        .ok()?;
                Some(c.validity().is_valid_at(at))
            })
            .unwrap_or(false);
        if !valid_now {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired,
            ));
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// TLS in force: what clients are served (none: plain HTTP) and how backends are verified
/// (none: lb has no `https://` backend). Given whole to [`crate::Proxy::set_tls`].
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    /// Terminate TLS on every listener with this.
    pub server: Option<Arc<ServerConfig>>,
    /// Connect to `https://` backends with this.
    pub client: Option<Arc<ClientConfig>>,
}

/// The TLS state every worker shares: the config in force, and which backends failed their
/// TLS handshake (logged once per backend until one succeeds again).
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) config: arc_swap::ArcSwap<TlsConfig>,
    failing: Mutex<std::collections::HashSet<String>>,
}

impl Shared {
    /// Puts `config` in force. Backends that failed their handshake are forgotten: under
    /// the new config, each is logged again the first time it fails.
    pub(crate) fn set(&self, config: TlsConfig) {
        self.config.store(Arc::new(config));
        self.failing().clear();
    }

    fn failing(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A TLS handshake with `backend` failed: logged the first time in a row.
    pub(crate) fn failed(&self, backend: &str, error: &std::io::Error) {
        if self.failing().insert(backend.to_owned()) {
            tracing::warn!(target: "lb::upstream", backend, %error, "TLS handshake with backend failed (logged once until it succeeds): treated as a failed connect");
        }
    }

    /// A TLS handshake with `backend` succeeded.
    pub(crate) fn succeeded(&self, backend: &str) {
        let mut failing = self.failing();
        if !failing.is_empty() && failing.remove(backend) {
            tracing::info!(target: "lb::upstream", backend, "TLS handshake with backend succeeds again");
        }
    }
}

/// The name a backend's certificate is verified against and sent as SNI: the URL's host
/// (an IP address is verified against the certificate's IP addresses, and sent no SNI).
pub(crate) fn server_name(host: &str) -> Option<ServerName<'static>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(names: &[&str]) -> Certificate {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        let c = params.self_signed(&key).unwrap();
        let certified = CertifiedKey::from_der(
            vec![c.der().clone()],
            PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            &provider(),
        )
        .unwrap();
        Certificate {
            key: Arc::new(certified),
            names: dns_names(c.der()).unwrap(),
        }
    }

    #[test]
    fn sni_picks_exact_then_one_label_wildcard_then_the_default() {
        let default = cert(&["default.test"]);
        let exact = cert(&["a.example.com"]);
        let wild = cert(&["*.example.com"]);
        let certs = Certificates::new(default.clone(), [wild.clone(), exact.clone()]);
        let is = |got: &Arc<CertifiedKey>, want: &Certificate| Arc::ptr_eq(got, &want.key);
        assert!(is(certs.pick(None), &default));
        assert!(
            is(certs.pick(Some("a.example.com")), &exact),
            "exact before wildcard"
        );
        assert!(
            is(certs.pick(Some("A.Example.COM")), &exact),
            "case-insensitive"
        );
        assert!(is(certs.pick(Some("b.example.com")), &wild));
        assert!(is(certs.pick(Some("B.EXAMPLE.com")), &wild));
        assert!(
            is(certs.pick(Some("example.com")), &default),
            "a wildcard needs a label"
        );
        assert!(
            is(certs.pick(Some("x.b.example.com")), &default),
            "one label only"
        );
        assert!(is(certs.pick(Some("default.test")), &default));
        assert!(is(certs.pick(Some("unknown.test")), &default));
    }

    #[test]
    fn names_come_from_subject_alt_names_lowercased() {
        let c = cert(&["Www.Example.org", "*.Example.net"]);
        assert_eq!(c.names(), ["www.example.org", "*.example.net"]);
    }

    #[test]
    fn a_self_signed_ca_certificate_in_upstream_ca_is_trusted_as_the_leaf_for_its_name_only() {
        use rustls::client::danger::ServerCertVerifier;
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["pinned.test".to_owned()]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pinned = params.self_signed(&key).unwrap().der().clone();
        let other = {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(vec!["pinned.test".to_owned()]).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.self_signed(&key).unwrap().der().clone()
        };
        let mut roots = RootCertStore::empty();
        roots.add(pinned.clone()).unwrap();
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .unwrap();
        let verify = |v: &Verifier, cert: &CertificateDer<'static>, name: &str| {
            let name = ServerName::try_from(name.to_owned()).unwrap();
            v.verify_server_cert(cert, &[], &name, &[], rustls::pki_types::UnixTime::now())
        };
        let plain = Verifier {
            inner: Arc::clone(&inner),
            pinned: Vec::new(),
        };
        assert!(
            verify(&plain, &pinned, "pinned.test").is_err(),
            "webpki alone refuses a CA certificate as the leaf"
        );
        let v = Verifier {
            inner,
            pinned: vec![pinned.clone()],
        };
        assert!(verify(&v, &pinned, "pinned.test").is_ok());
        assert!(verify(&v, &pinned, "PINNED.test").is_ok());
        assert!(
            matches!(
                verify(&v, &pinned, "other.test"),
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName
                ))
            ),
            "pinned, but not for that name"
        );
        assert!(
            verify(&v, &other, "pinned.test").is_err(),
            "the same name on another certificate is not pinned"
        );
    }

    #[test]
    fn an_encrypted_private_key_is_named_as_such() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let dir = std::env::temp_dir().join(format!("lb-tls-pass-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        // What `openssl pkcs8 -topk8` writes with a passphrase (the label is what matters).
        let pem = key
            .serialize_pem()
            .replace("PRIVATE KEY", "ENCRYPTED PRIVATE KEY");
        std::fs::write(&k, pem).unwrap();
        let e = Certificate::load(&c, &k).unwrap_err().to_string();
        assert!(e.contains("is encrypted"), "{e}");
        assert!(e.contains("key.pem"), "{e}");
    }

    #[test]
    fn backend_server_names() {
        assert!(matches!(
            server_name("example.com"),
            Some(ServerName::DnsName(_))
        ));
        assert!(matches!(
            server_name("127.0.0.1"),
            Some(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("[::1]"),
            Some(ServerName::IpAddress(_))
        ));
    }
}
