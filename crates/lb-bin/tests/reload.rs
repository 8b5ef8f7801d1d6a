//! Reload through the real binary: after a SIGHUP that changes the strategy (so lb-core's
//! balancer, and its backend ids, are built anew) and removes backends, no request and no
//! pooled upstream connection goes to a removed backend.

mod common;

use common::*;
use std::net::{SocketAddr, TcpStream};

#[test]
fn a_reload_that_renumbers_backends_never_reaches_a_removed_one() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let c = Backend::start("C");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = |strategy: &str, urls: &[String]| {
        let mut text = format!(
            "listen = [\"{addr}\"]\nstrategy = \"{strategy}\"\n[health]\ninterval = \"0s\"\n"
        );
        for u in urls {
            text.push_str(&format!("[[backend]]\nurl = \"{u}\"\n"));
        }
        text
    };
    let dir = std::env::temp_dir().join(format!("lb-reload-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lb.toml");
    std::fs::write(&path, config("round-robin", &[a.url(), b.url()])).unwrap();
    let mut lb = Lb::spawn(&path);
    lb.wait_for("lb to listen", |_| TcpStream::connect(addr).is_ok());

    // Enough requests for every worker to keep connections to A and B in its pool.
    for _ in 0..16 {
        let (status, body) = get(addr);
        assert_eq!(status, 200);
        assert!(body == "A" || body == "B", "{body}");
    }
    let (a_before, b_before) = (a.hits(), b.hits());
    assert!(a_before > 0 && b_before > 0);

    std::fs::write(&path, config("random", &[c.url()])).unwrap();
    lb.signal("HUP");
    lb.wait_for("the reload", |lb| lb.logged("configuration reloaded") == 1);
    for _ in 0..16 {
        assert_eq!(get(addr), (200, "C".to_owned()));
    }
    assert_eq!(c.hits(), 16, "every request reached C");
    assert_eq!(
        (a.hits(), b.hits()),
        (a_before, b_before),
        "the removed backends got nothing more"
    );

    // And each access-log line says its duration once, in at most 3 decimals of a millisecond.
    let access: Vec<String> = lb
        .stdout
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("\"duration_ms\""))
        .cloned()
        .collect();
    assert!(access.len() >= 32, "one line per request: {}", access.len());
    for line in &access {
        assert_eq!(line.matches("\"duration\":").count(), 1, "{line}");
        let ms = line.split("\"duration_ms\":").nth(1).unwrap();
        let ms: String = ms
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let decimals = ms.split_once('.').map_or(0, |(_, d)| d.len());
        assert!(decimals <= 3, "duration_ms {ms} in {line}");
    }
    lb.signal("TERM");
    lb.wait_for("lb to exit", |lb| lb.child.try_wait().unwrap().is_some());
    let _ = std::fs::remove_dir_all(&dir);
}
