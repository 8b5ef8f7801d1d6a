//! Review13: the admin API's edges through the real binary, on free ports of 127.0.0.1
//! (free_port_addr); the backends are never contacted (probes off), so
//! none is started.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::*;

const TOKEN: &str = "review-t0ken";

/// A free port on 127.0.0.1.
fn port() -> u16 {
    free_port_addr().port()
}

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port()))
}

/// One request over a fresh connection, with `auth` as its `Authorization`: (status, body).
fn http(to: SocketAddr, method: &str, path: &str, auth: Option<&str>, body: &str) -> (u16, String) {
    let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
    let (code, _, body) = http_request(to, method, path, &headers, body);
    (code, body)
}

/// `lb` with the admin token, probes off, and `backends` as written.
fn start(name: &str, backends: &[&str]) -> (Lb, SocketAddr) {
    let (listen, admin) = (addr(), addr());
    let mut text = format!(
        "listen = [\"{listen}\"]\nadmin = \"{admin}\"\nadmin_token = \"{TOKEN}\"\n[health]\ninterval = \"0s\"\n"
    );
    for b in backends {
        text.push_str(&format!("[[backend]]\nurl = \"{b}\"\n"));
    }
    let (_, path) = write_temp_config(name, &text);
    let mut lb = Lb::spawn(&path);
    lb.wait_for("lb to listen", |_| {
        http(admin, "GET", "/status", None, "").0 == 200
    });
    (lb, admin)
}

/// PATCH and DELETE name a backend by `host:port`; lb says a backend is the one it already
/// has by its normalized identity (a POST of `http://localhost:P` when the config wrote
/// `http://LocalHost.:P` is 409), so the same `host:port` must find it for PATCH too, and
/// for an IPv6 backend written in a non-canonical form. A client that percent-encodes the
/// path segment (`%5B::1%5D:P`, `127.0.0.1%3AP`) names the same backend.
#[test]
fn patch_and_delete_find_a_backend_by_its_normalized_host_port() {
    let (p1, p2, p3) = (port(), port(), port());
    let (_lb, admin) = start(
        "review13-find",
        &[
            &format!("http://LocalHost.:{p1}"),
            &format!("http://[0:0::1]:{p2}"),
            &format!("127.0.0.1:{p3}/"),
        ],
    );
    let auth = format!("Bearer {TOKEN}");
    let auth = Some(auth.as_str());
    let (code, body) = http(
        admin,
        "POST",
        "/backends",
        auth,
        &format!(r#"{{"url": "http://localhost:{p1}"}}"#),
    );
    assert_eq!(code, 409, "the same backend: {body}");
    let drain = r#"{"drain": true}"#;
    for path in [
        format!("/backends/localhost:{p1}"),
        format!("/backends/[::1]:{p2}"),
        format!("/backends/%5B::1%5D:{p2}"),
        format!("/backends/127.0.0.1%3A{p3}"),
    ] {
        let (code, body) = http(admin, "PATCH", &path, auth, drain);
        assert_eq!(code, 200, "PATCH {path}: {body}");
        assert!(body.contains(r#""state":"draining""#), "{path}: {body}");
    }
    let (code, body) = http(admin, "DELETE", &format!("/backends/[::1]:{p2}"), auth, "");
    assert_eq!(code, 200, "{body}");
    let (code, _) = http(
        admin,
        "PATCH",
        &format!("/backends/127.0.0.1:{p3}/extra"),
        auth,
        drain,
    );
    assert_eq!(code, 404);
}

/// RFC 9110 §11.1: the authentication scheme is case-insensitive, and one or more spaces
/// separate it from the credentials (RFC 9110 §11.4, `1*SP`): `bearer TOKEN` and
/// `Bearer  TOKEN` are the right token, not "no token" (401) or a wrong one (403).
#[test]
fn the_bearer_scheme_is_case_insensitive_and_may_be_followed_by_several_spaces() {
    let (_lb, admin) = start("review13-bearer", &["http://127.0.0.1:29999"]);
    let patch = r#"{"weight": 2}"#;
    for auth in [
        format!("Bearer {TOKEN}"),
        format!("bearer {TOKEN}"),
        format!("BEARER {TOKEN}"),
        format!("Bearer   {TOKEN}"),
    ] {
        let (code, body) = http(
            admin,
            "PATCH",
            "/backends/127.0.0.1:29999",
            Some(&auth),
            patch,
        );
        assert_eq!(code, 200, "{auth:?}: {body}");
    }
    for (auth, want) in [
        (format!("Bearer {TOKEN}x"), 403),
        (format!("Basic {TOKEN}"), 401),
        (format!("Bearer{TOKEN}"), 401),
        ("Bearer".to_owned(), 401),
    ] {
        let (code, body) = http(
            admin,
            "PATCH",
            "/backends/127.0.0.1:29999",
            Some(&auth),
            patch,
        );
        assert_eq!(code, want, "{auth:?}: {body}");
    }
}

/// A backend answering `200 Y` to every request (reading its Content-Length body).
fn answering_backend(p: u16) {
    let listener = TcpListener::bind(("127.0.0.1", p)).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                while let Some(head) = read_head(&mut s) {
                    let len = head
                        .lines()
                        .filter_map(|l| l.split_once(':'))
                        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    let mut body = vec![0u8; len];
                    if s.read_exact(&mut body).is_err() {
                        return;
                    }
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nY");
                }
            });
        }
    });
}

fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// A reload that changes the strategy narrows the old balancer to the backends the new
/// config keeps: a request that took the old routes and picks only once its body is in
/// (after the reload) picks from it. The kept backends must be given to it with the
/// identity the routes gave them (the normalized address): given as written
/// (`127.0.0.1:P`, no scheme), a kept backend became a new member the old routes did not
/// know. (Not seen from outside: a request with nowhere to go on the old balancer restarts
/// on the new routes when it was never sent; this guards that the request gets there.)
#[test]
fn a_strategy_change_reload_keeps_a_backend_written_unnormalized_for_a_request_on_the_old_routes() {
    let py = port();
    answering_backend(py);
    let listen = addr();
    let config = |strategy: &str| {
        format!(
            "listen = [\"{listen}\"]\nstrategy = \"{strategy}\"\n[health]\ninterval = \"0s\"\n\
             [[backend]]\nurl = \"127.0.0.1:{py}\"\n"
        )
    };
    let (_, path) = write_temp_config("review13-strategy", &config("round-robin"));
    let mut lb = Lb::spawn(&path);
    lb.wait_for("lb to listen", |_| TcpStream::connect(listen).is_ok());
    let mut s = TcpStream::connect(listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\
          Connection: close\r\n\r\n",
    )
    .unwrap();
    let mut cont = [0u8; 25];
    s.read_exact(&mut cont).unwrap();
    assert!(cont.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"));
    s.write_all(b"ab").unwrap();
    std::fs::write(&path, config("random")).unwrap();
    lb.signal("HUP");
    lb.wait_for("the reload", |lb| lb.logged("configuration reloaded") == 1);
    s.write_all(b"cd").unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with('Y'),
        "{text}"
    );
}
