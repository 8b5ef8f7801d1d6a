//! TLS through the real binary and real sockets: termination (ALPN h2 and http/1.1, SNI
//! certificates), hostile handshakes, certificate reload on SIGHUP, verified `https://`
//! backends (and their probes), backends whose certificate lb must refuse, and the config
//! errors of TLS files. Every test checks both what the client got and what the backend
//! received.

mod common;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::tls::*;
use common::*;

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// Reads until the peer closes (EOF or an error such as a reset), within [`DEADLINE`]; what
/// was read. Panics if the peer keeps the connection open that long.
fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let deadline = Instant::now() + DEADLINE;
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                assert!(
                    Instant::now() < deadline,
                    "lb kept the connection open for {DEADLINE:?}"
                );
            }
            Err(_) => return out,
        }
    }
}

fn header<'a>(r: &'a SeenRequest, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

#[test]
fn https_by_flags_serves_h2_and_http11_by_alpn_and_answers_plain_http_400() {
    let pki = Pki::new("alpn");
    let leaf = pki.leaf("server", &["lb.test"], 1);
    let backend = HttpsBackend::plain("B");
    let addr = free_port_addr();
    let rt = runtime();
    let mut lb = spawn_lb(&[
        os("--listen"),
        os(&addr.to_string()),
        os("--backend"),
        os(&backend.plain_url()),
        os("--health-interval"),
        os("0s"),
        os("--tls-cert"),
        leaf.cert.as_os_str(),
        os("--tls-key"),
        leaf.key.as_os_str(),
    ]);
    wait_tls(&mut lb, &rt, addr);
    let ca = Verify::Ca(pki.ca_der.clone());

    let (got, _conns) = rt.block_on(async {
        let mut h2 = Tls::connect(addr, Some("lb.test"), Alpn::H2, &ca)
            .await
            .unwrap();
        assert_eq!(h2.alpn.as_deref(), Some(&b"h2"[..]), "ALPN chose h2");
        assert_eq!(h2.peer, leaf.der, "the flags' certificate");
        let mut h1 = Tls::connect(addr, Some("lb.test"), Alpn::Http11, &ca)
            .await
            .unwrap();
        assert_eq!(h1.alpn.as_deref(), Some(&b"http/1.1"[..]), "ALPN chose h1");
        // Two requests on each connection.
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(h2.get("lb.test", "/two").await.unwrap());
            got.push(h1.get("lb.test", "/one").await.unwrap());
        }
        (got, (h2, h1))
    });
    for (i, (status, version, body)) in got.iter().enumerate() {
        assert_eq!((*status, body.as_str()), (200, "B"), "response {i}");
        let want = if i % 2 == 0 {
            hyper::Version::HTTP_2
        } else {
            hyper::Version::HTTP_11
        };
        assert_eq!(*version, want, "response {i}");
    }
    let seen = backend.requests();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(seen.iter().filter(|r| r.path == "/two").count(), 2);
    assert_eq!(seen.iter().filter(|r| r.path == "/one").count(), 2);
    for r in &seen {
        assert_eq!(header(r, "x-forwarded-proto"), Some("https"), "{r:?}");
    }

    // Plain HTTP to the TLS port: a readable 400 in the clear, the connection ends, lb
    // serves on.
    let mut plain = TcpStream::connect(addr).unwrap();
    plain
        .write_all(b"GET /plain HTTP/1.1\r\nHost: lb.test\r\n\r\n")
        .unwrap();
    let answer = String::from_utf8_lossy(&read_until_closed(&mut plain)).into_owned();
    assert!(
        answer.starts_with("HTTP/1.1 400 ") && answer.contains("speaks HTTPS"),
        "a plain 400: {answer:?}"
    );
    let after = rt.block_on(async {
        let mut c = Tls::connect(addr, Some("lb.test"), Alpn::Http11, &ca)
            .await
            .unwrap();
        c.get("lb.test", "/after").await.unwrap()
    });
    assert_eq!((after.0, after.2.as_str()), (200, "B"));
    let paths: Vec<String> = backend.requests().into_iter().map(|r| r.path).collect();
    assert!(!paths.iter().any(|p| p == "/plain"), "{paths:?}");
    assert_eq!(paths.last().map(String::as_str), Some("/after"));
}

#[test]
fn sni_chooses_exact_then_one_label_wildcard_then_the_default_certificate() {
    let pki = Pki::new("sni");
    let default = pki.leaf("default", &["default.test"], 1);
    let a = pki.leaf("a", &["a.test"], 2);
    let wild = pki.leaf("wild", &["*.b.test"], 3);
    let backend = HttpsBackend::plain("S");
    let addr = free_port_addr();
    let config = pki.config(&format!(
        "listen = [\"{addr}\"]\n[health]\ninterval = \"0s\"\n\
         [tls]\ncert = {}\nkey = {}\n\
         [[tls.certificates]]\ncert = {}\nkey = {}\n\
         [[tls.certificates]]\ncert = {}\nkey = {}\n\
         [[backend]]\nurl = \"{}\"\n",
        toml_path(&default.cert),
        toml_path(&default.key),
        toml_path(&a.cert),
        toml_path(&a.key),
        toml_path(&wild.cert),
        toml_path(&wild.key),
        backend.plain_url(),
    ));
    let rt = runtime();
    let mut lb = Lb::spawn(&config);
    wait_tls(&mut lb, &rt, addr);
    let cases: [(Option<&str>, &Leaf, &str); 6] = [
        (Some("a.test"), &a, "exact name"),
        (Some("x.b.test"), &wild, "one label under the wildcard"),
        (Some("b.test"), &default, "a wildcard needs a label"),
        (
            Some("y.x.b.test"),
            &default,
            "a wildcard covers one label only",
        ),
        (None, &default, "no SNI"),
        // Sent uppercase on the wire (rustls's server side lowercases it before lb's
        // certificate resolver sees it; lb lowercases too).
        (Some("A.TEST"), &a, "names are case-insensitive"),
    ];
    for (i, (sni, want, why)) in cases.iter().enumerate() {
        let (peer, got) = rt.block_on(async {
            let mut c = Tls::connect(addr, *sni, Alpn::Http11, &Verify::Any)
                .await
                .unwrap();
            let got = c.get("sni.test", &format!("/{i}")).await.unwrap();
            (c.peer, got)
        });
        assert!(peer == want.der, "SNI {sni:?}: {why}");
        assert_eq!((got.0, got.2.as_str()), (200, "S"), "SNI {sni:?}");
    }
    // And with verification against the CA, the chosen ones are valid for their names.
    rt.block_on(async {
        let ca = Verify::Ca(pki.ca_der.clone());
        for name in ["a.test", "x.b.test", "default.test"] {
            let mut c = Tls::connect(addr, Some(name), Alpn::H2, &ca).await.unwrap();
            assert_eq!(c.get(name, "/verified").await.unwrap().0, 200, "{name}");
        }
    });
    let seen = backend.requests();
    assert_eq!(seen.len(), cases.len() + 3, "{seen:?}");
    for (i, r) in seen.iter().take(cases.len()).enumerate() {
        assert_eq!(r.path, format!("/{i}"));
        assert_eq!(header(r, "x-forwarded-proto"), Some("https"));
    }
}

#[test]
fn hostile_handshakes_are_cut_off_and_counted_while_others_are_served() {
    let pki = Pki::new("hostile");
    let leaf = pki.leaf("server", &["lb.test"], 1);
    let backend = HttpsBackend::plain("H");
    let addr = free_port_addr();
    let admin = free_port_addr();
    let config = pki.config(&format!(
        "listen = [\"{addr}\"]\nadmin = \"{admin}\"\n[health]\ninterval = \"0s\"\n\
         [timeouts]\nheader_read = \"1s\"\n\
         [tls]\ncert = {}\nkey = {}\n[[backend]]\nurl = \"{}\"\n",
        toml_path(&leaf.cert),
        toml_path(&leaf.key),
        backend.plain_url(),
    ));
    let rt = runtime();
    let mut lb = Lb::spawn(&config);
    // Whole handshakes only: the readiness probe must not count as an error.
    wait_tls(&mut lb, &rt, addr);
    lb.wait_for("the admin server", |_| {
        procfs::admin_get(admin, "/metrics").0 == 200
    });
    let errors = || {
        let (_, text) = procfs::admin_get(admin, "/metrics");
        metric(&text, "lb_tls_handshake_errors_total")
    };
    assert_eq!(errors(), Some(0.0), "no error before the hostile clients");

    // Garbage instead of a ClientHello.
    let mut garbage = TcpStream::connect(addr).unwrap();
    garbage
        .write_all(b"\x01\x02\x03\x04this is not a TLS record at all\r\n\r\n")
        .unwrap();
    // Half a real ClientHello, then nothing.
    let hello = {
        let config = std::sync::Arc::new(client_config(&[b"h2"], &Verify::Any));
        let name = rustls::pki_types::ServerName::try_from("lb.test").unwrap();
        let mut c = rustls::ClientConnection::new(config, name).unwrap();
        let mut hello = Vec::new();
        c.write_tls(&mut hello).unwrap();
        hello
    };
    assert!(hello.len() > 10 && hello[0] == 0x16, "a handshake record");
    let mut staller = TcpStream::connect(addr).unwrap();
    staller.write_all(&hello[..hello.len() / 2]).unwrap();

    // While both are open, a good client is served.
    let good = rt.block_on(async {
        let mut c = Tls::connect(
            addr,
            Some("lb.test"),
            Alpn::H2,
            &Verify::Ca(pki.ca_der.clone()),
        )
        .await
        .unwrap();
        c.get("lb.test", "/good").await.unwrap()
    });
    assert_eq!(
        (good.0, good.1, good.2.as_str()),
        (200, hyper::Version::HTTP_2, "H")
    );

    // lb closes both: the staller once header_read is over.
    let from_staller = read_until_closed(&mut staller);
    assert!(
        !from_staller.starts_with(b"HTTP/"),
        "no HTTP response to the staller"
    );
    let from_garbage = read_until_closed(&mut garbage);
    assert!(
        !from_garbage.starts_with(b"HTTP/"),
        "no HTTP response to garbage"
    );

    // Exactly the two hostile handshakes failed: the probe and the good client finished
    // theirs, and nothing else connected to the TLS port.
    lb.wait_for("both failures counted", |_| errors() >= Some(2.0));
    assert_eq!(errors(), Some(2.0));
    let seen = backend.requests();
    assert_eq!(
        seen.len(),
        1,
        "only the good request reached the backend: {seen:?}"
    );
    assert_eq!(seen[0].path, "/good");
    assert_eq!(header(&seen[0], "x-forwarded-proto"), Some("https"));
}

#[test]
fn sighup_reloads_certificates_and_a_bad_one_keeps_the_old() {
    let pki = Pki::new("reload");
    let one = pki.leaf("server", &["reload.test"], 1);
    let backend = HttpsBackend::plain("R");
    let addr = free_port_addr();
    let config = pki.config(&format!(
        "listen = [\"{addr}\"]\n[health]\ninterval = \"0s\"\n\
         [tls]\ncert = {}\nkey = {}\n[[backend]]\nurl = \"{}\"\n",
        toml_path(&one.cert),
        toml_path(&one.key),
        backend.plain_url(),
    ));
    let rt = runtime();
    let ca = Verify::Ca(pki.ca_der.clone());
    let mut lb = Lb::spawn(&config);
    wait_tls(&mut lb, &rt, addr);

    // A kept-alive HTTP/1.1 connection under serial 1.
    let mut old = rt.block_on(async {
        let mut c = Tls::connect(addr, Some("reload.test"), Alpn::Http11, &ca)
            .await
            .unwrap();
        assert_eq!(c.get("reload.test", "/old-1").await.unwrap().0, 200);
        c
    });
    assert!(old.peer == one.der, "serial 1 served first");

    // Serial 2 over the same files, SIGHUP.
    let (cert2, key2, der2) = pki.issue(&["reload.test"], 2);
    assert!(der2 != one.der);
    std::fs::write(&one.cert, &cert2).unwrap();
    std::fs::write(&one.key, &key2).unwrap();
    lb.signal("HUP");
    lb.wait_for("the reload", |lb| lb.logged("configuration reloaded") == 1);
    let new = rt.block_on(async {
        let mut c = Tls::connect(addr, Some("reload.test"), Alpn::Http11, &ca)
            .await
            .unwrap();
        let got = c.get("reload.test", "/new-2").await.unwrap();
        (c.peer, got)
    });
    assert!(new.0 == der2, "a new connection gets serial 2");
    assert_eq!((new.1 .0, new.1 .2.as_str()), (200, "R"));
    // The old connection still answers, on its serial-1 session.
    let again = rt.block_on(old.get("reload.test", "/old-again")).unwrap();
    assert_eq!((again.0, again.2.as_str()), (200, "R"));
    assert!(old.peer == one.der);

    // A certificate file with no certificate in it: the reload fails naming it, serial 2
    // stays.
    std::fs::write(&one.cert, "this is not a PEM certificate\n").unwrap();
    lb.signal("HUP");
    let cert_path = one.cert.display().to_string();
    lb.wait_for("the failed reload", |lb| {
        lb.stdout
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("reload failed") && l.contains(&cert_path))
    });
    assert_eq!(lb.logged("configuration reloaded"), 1, "no second reload");
    let kept = rt.block_on(async {
        let mut c = Tls::connect(addr, Some("reload.test"), Alpn::H2, &ca)
            .await
            .unwrap();
        let got = c.get("reload.test", "/kept-2").await.unwrap();
        (c.peer, got)
    });
    assert!(kept.0 == der2, "serial 2 still served");
    assert_eq!((kept.1 .0, kept.1 .2.as_str()), (200, "R"));

    let paths: Vec<String> = backend.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/old-1", "/new-2", "/old-again", "/kept-2"]);
    drop(old);
}

#[test]
fn https_backend_behind_a_private_ca_gets_sni_and_tls_probes() {
    let pki = Pki::new("upstream");
    let leaf = pki.leaf("backend", &["localhost"], 7);
    let backend = HttpsBackend::start("secure", &leaf);
    let addr = free_port_addr();
    let config = pki.config(&format!(
        "listen = [\"{addr}\"]\n\
         [health]\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"5s\"\n\
         [tls]\nupstream_ca = {}\n[[backend]]\nurl = \"{}\"\n",
        toml_path(&pki.ca_pem),
        backend.url(),
    ));
    let mut lb = Lb::spawn(&config);
    lb.wait_for("lb to listen", |_| TcpStream::connect(addr).is_ok());
    for _ in 0..3 {
        assert_eq!(get(addr), (200, "secure".to_owned()));
    }
    let seen = backend.non_probe("/healthz");
    assert_eq!(seen.len(), 3, "{seen:?}");
    for r in &seen {
        assert_eq!(r.sni.as_deref(), Some("localhost"), "SNI is the URL's host");
        assert_eq!(header(r, "x-forwarded-proto"), Some("http"));
    }
    lb.wait_for("probes over TLS", |_| {
        backend
            .requests()
            .iter()
            .filter(|r| r.path == "/healthz")
            .count()
            >= 2
    });
    for probe in backend.requests().iter().filter(|r| r.path == "/healthz") {
        assert_eq!(
            probe.sni.as_deref(),
            Some("localhost"),
            "probes send SNI too"
        );
    }
    assert_eq!(
        lb.logged("TLS handshake with backend failed"),
        0,
        "the private CA verifies it"
    );
}

#[test]
fn backends_whose_certificate_lb_refuses_fail_as_connects() {
    let pki = Pki::new("wrongca");
    let other = Pki::new("wrongca-other");
    let x = HttpsBackend::start("X", &other.leaf("x", &["localhost"], 1));
    let y = HttpsBackend::start("Y", &other.leaf("y", &["localhost"], 2));
    let addr = free_port_addr();
    let tail = format!(
        "[health]\ninterval = \"0s\"\n[passive]\nconsecutive_failures = 0\n\
         [retry]\nmin_retries_per_second = 1000\nbudget_percent = 100\n\
         [tls]\nupstream_ca = {}\n",
        toml_path(&pki.ca_pem)
    );
    let config = pki.config(&format!(
        "listen = [\"{addr}\"]\n{tail}[[backend]]\nurl = \"{}\"\n[[backend]]\nurl = \"{}\"\n",
        x.url(),
        y.url(),
    ));
    let mut lb = Lb::spawn(&config);
    lb.wait_for("lb to listen", |_| TcpStream::connect(addr).is_ok());
    let (status, _) = get(addr);
    assert_eq!(status, 502, "no backend could be reached");
    // The access log line of that request: both backends tried, each a failed connect.
    lb.wait_for("the access-log line", |lb| lb.logged("\"trace\"") >= 1);
    let line = lb
        .stdout
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("\"trace\""))
        .cloned()
        .unwrap();
    assert_eq!(line.matches("connect_refused").count(), 2, "{line}");
    assert!(
        line.contains(&x.label()) && line.contains(&y.label()),
        "{line}"
    );
    for _ in 1..10 {
        assert_eq!(get(addr).0, 502);
    }
    for b in [&x, &y] {
        let label = b.label();
        let warned = lb
            .stdout
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("TLS handshake with backend failed") && l.contains(&label))
            .count();
        assert_eq!(warned, 1, "warned once for {label}");
        assert!(b.requests().is_empty(), "{label} got no HTTP request");
    }
    lb.wait_for("the backends to see lb's refused handshakes", |_| {
        x.failed_handshakes
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1
            && y.failed_handshakes
                .load(std::sync::atomic::Ordering::SeqCst)
                >= 1
    });
    assert_eq!(lb.logged("TLS handshake with backend failed"), 2);
    drop(lb);

    // One such backend beside a good plain one: every request is served by the good one.
    let good = HttpsBackend::plain("good");
    let addr = free_port_addr();
    let config = pki.write(
        "mixed.toml",
        &format!(
            "listen = [\"{addr}\"]\n{tail}[[backend]]\nurl = \"{}\"\n[[backend]]\nurl = \"{}\"\n",
            x.url(),
            good.plain_url(),
        ),
    );
    let mut lb = Lb::spawn(&config);
    lb.wait_for("lb to listen", |_| TcpStream::connect(addr).is_ok());
    for i in 0..10 {
        assert_eq!(get(addr), (200, "good".to_owned()), "request {i}");
    }
    assert_eq!(good.requests().len(), 10);
    assert!(
        x.requests().is_empty(),
        "the refused backend got no request"
    );
    assert_eq!(lb.logged("TLS handshake with backend failed"), 1);
}

/// `lb` with `args`; (exit code, stderr), the process killed if it runs 20 s.
fn run(args: &[&OsStr]) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(LB)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code(), err);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("lb {args:?} still running after {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tls_file_errors_exit_1_naming_the_file() {
    let pki = Pki::new("errors");
    let a = pki.leaf("a", &["a.test"], 1);
    let b = pki.leaf("b", &["b.test"], 2);
    let missing = pki.dir.join("missing.pem");
    let base = "listen = [\"127.0.0.1:1\"]\n[[backend]]\nurl = \"http://127.0.0.1:1\"\n";
    let tls = |cert: &std::path::Path, key: Option<&std::path::Path>| {
        let mut t = format!("{base}[tls]\ncert = {}\n", toml_path(cert));
        if let Some(k) = key {
            t.push_str(&format!("key = {}\n", toml_path(k)));
        }
        t
    };
    let cases = [
        (
            "missing",
            tls(&missing, Some(&a.key)),
            missing.clone(),
            "tls.cert",
        ),
        ("nokey", tls(&a.cert, None), a.cert.clone(), "tls.key"),
        (
            "mismatch",
            tls(&a.cert, Some(&b.key)),
            b.key.clone(),
            "does not match",
        ),
        (
            "nocert",
            tls(&a.key, Some(&a.key)),
            a.key.clone(),
            "no PEM certificate",
        ),
    ];
    for (name, text, file, needle) in &cases {
        let config = pki.write(&format!("{name}.toml"), text);
        let (code, err) = run(&[os("--config"), config.as_os_str(), os("--check")]);
        assert_eq!(code, Some(1), "{name}: {err}");
        assert!(
            err.contains(&config.display().to_string()),
            "{name} names the config: {err}"
        );
        if *name != "nokey" {
            assert!(
                err.contains(&file.display().to_string()),
                "{name} names {file:?}: {err}"
            );
        }
        assert!(err.contains(needle), "{name} says {needle}: {err}");
    }
    // Starting (not only --check) refuses them too.
    let config = pki.write("mismatch-start.toml", &cases[2].1);
    let (code, err) = run(&[os("--config"), config.as_os_str()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&b.key.display().to_string()), "{err}");
    // And the flags: a missing --tls-cert file is named.
    let (code, err) = run(&[
        os("--backend"),
        os("http://127.0.0.1:1"),
        os("--tls-cert"),
        missing.as_os_str(),
        os("--tls-key"),
        a.key.as_os_str(),
        os("--check"),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&missing.display().to_string()) && err.contains("--tls-cert"),
        "{err}"
    );

    // `[tls]` with only `upstream_ca` is valid, and the listener is plain HTTP.
    let backend = HttpsBackend::plain("P");
    let addr = free_port_addr();
    let config = pki.write(
        "caonly.toml",
        &format!(
            "listen = [\"{addr}\"]\n[health]\ninterval = \"0s\"\n[tls]\nupstream_ca = {}\n\
             [[backend]]\nurl = \"{}\"\n",
            toml_path(&pki.ca_pem),
            backend.plain_url()
        ),
    );
    let (code, err) = run(&[os("--config"), config.as_os_str(), os("--check")]);
    assert_eq!(code, Some(0), "{err}");
    let mut lb = Lb::spawn(&config);
    lb.wait_for("lb to listen", |_| TcpStream::connect(addr).is_ok());
    assert_eq!(get(addr), (200, "P".to_owned()));
    let seen = backend.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(header(&seen[0], "x-forwarded-proto"), Some("http"));
}
