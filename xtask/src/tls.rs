//! The HTTPS rows' certificate and the TLS helpers of the bench.
//!
//! One ECDSA P-256 self-signed certificate for `localhost` and `127.0.0.1` (no CA), made
//! with rcgen once per run into `target/bench/tls/`: `cert.pem`, `key.pem` (PKCS#8) and
//! `haproxy.pem` (the two concatenated, as HAProxy's `crt` wants them). Every proxy serves
//! the same one.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The certificate files of this run (absolute paths: nginx runs with its own prefix).
#[derive(Debug, Clone)]
pub(crate) struct TlsFiles {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    /// Certificate then key in one PEM, for HAProxy.
    pub(crate) combined: PathBuf,
    /// The certificate in DER: the handshake client's trust anchor.
    pub(crate) cert_der: Vec<u8>,
}

/// Writes a fresh certificate and key into `dir`.
pub(crate) fn generate(dir: &Path) -> Result<TlsFiles, String> {
    let err = |e: rcgen::Error| format!("rcgen: {e}");
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let dir = std::fs::canonicalize(dir).map_err(|e| e.to_string())?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .map_err(err)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let cert = params.self_signed(&key).map_err(err)?;
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        combined: dir.join("haproxy.pem"),
        cert_der: cert.der().to_vec(),
    };
    let write = |path: &Path, text: &str| {
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
    };
    write(&files.cert, &cert_pem)?;
    write(&files.key, &key_pem)?;
    write(&files.combined, &format!("{cert_pem}{key_pem}"))?;
    Ok(files)
}

/// What an OpenSSL client (the library wrk uses) negotiates with the TLS
/// listener on `port`, offering ALPN h2 and http/1.1: e.g. `TLSv1.3 TLS_AES_256_GCM_SHA384,
/// X25519, ECDSA, ALPN h2`. `None` if openssl is missing; an error if no handshake.
pub(crate) fn probe(port: u16) -> Result<Option<String>, String> {
    if crate::bench::which("openssl").is_none() {
        return Ok(None);
    }
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "timeout 5 openssl s_client -connect 127.0.0.1:{port} -servername localhost \
             -alpn h2,http/1.1 </dev/null 2>&1"
        ))
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(Some(negotiated(&text).ok_or_else(|| {
        let tail: Vec<&str> = text.lines().rev().take(3).collect();
        format!("no TLS handshake on port {port}: {}", tail.join(" / "))
    })?))
}

/// The negotiated parameters out of `openssl s_client`'s output.
fn negotiated(text: &str) -> Option<String> {
    let after = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::trim)
    };
    // "New, TLSv1.3, Cipher is TLS_AES_256_GCM_SHA384"
    let new = after("New, ")?;
    if new.starts_with("(NONE)") {
        return None;
    }
    let (version, cipher) = new.split_once(", Cipher is ")?;
    let mut s = format!("{version} {cipher}");
    // "Server Temp Key: X25519, 253 bits"
    if let Some(kx) = after("Server Temp Key:") {
        s.push_str(", ");
        s.push_str(kx.split(',').next().unwrap_or(kx));
    }
    if let Some(sig) = after("Peer signature type:") {
        s.push_str(", ");
        s.push_str(sig);
    }
    match after("ALPN protocol:") {
        Some(alpn) => s.push_str(&format!(", ALPN {alpn}")),
        None => s.push_str(", no ALPN"),
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiated_parameters_are_read_from_s_client() {
        let text = "CONNECTED(00000003)\n---\nPeer signature type: ECDSA\nServer Temp Key: X25519, 253 bits\n---\nNew, TLSv1.3, Cipher is TLS_AES_256_GCM_SHA384\nALPN protocol: h2\n";
        assert_eq!(
            negotiated(text).as_deref(),
            Some("TLSv1.3 TLS_AES_256_GCM_SHA384, X25519, ECDSA, ALPN h2")
        );
        assert_eq!(negotiated("New, (NONE), Cipher is (NONE)\n"), None);
    }

    #[test]
    fn certificate_files_are_written() {
        let dir = std::env::temp_dir().join(format!("xtask-tls-{}", std::process::id()));
        let f = generate(&dir).unwrap();
        let combined = std::fs::read_to_string(&f.combined).unwrap();
        assert!(combined.contains("BEGIN CERTIFICATE") && combined.contains("BEGIN PRIVATE KEY"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
