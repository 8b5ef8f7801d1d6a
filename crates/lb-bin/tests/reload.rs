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
    // A line is written when the response has ended, which may be after the client read it:
    // wait for them rather than count at once.
    lb.wait_for("an access-log line per request", |lb| {
        lb.logged("\"duration_ms\"") >= 32
    });
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

/// A request whose head arrived before a reload that changes the strategy (a new balancer)
/// and whose body arrived after it must go to the new configuration's backends: the routes
/// were taken when the head arrived, and the first backend picked from them only once the
/// body was read, from the old balancer, which still had the removed backend.
#[test]
fn a_request_whose_body_ends_after_a_strategy_change_reload_never_reaches_a_removed_backend() {
    use std::io::{Read, Write};
    let a = Backend::start("A");
    let c = Backend::start("C");
    let addr = free_port_addr();
    let config = |strategy: &str, url: &str| {
        format!(
            "listen = [\"{addr}\"]\nstrategy = \"{strategy}\"\n[health]\ninterval = \"0s\"\n\
             [[backend]]\nurl = \"{url}\"\n"
        )
    };
    let (dir, path) = write_temp_config("reload-slow-body", &config("round-robin", &a.url()));
    let mut lb = Lb::spawn(&path);
    lb.wait_for("lb to listen", |_| TcpStream::connect(addr).is_ok());

    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    s.write_all(
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\
          Connection: close\r\n\r\n",
    )
    .unwrap();
    // lb answers 100 Continue when it starts reading the body: the request is being served.
    let mut head = [0u8; 25];
    s.read_exact(&mut head).unwrap();
    assert!(
        head.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    s.write_all(b"ab").unwrap();

    std::fs::write(&path, config("random", &c.url())).unwrap();
    lb.signal("HUP");
    lb.wait_for("the reload", |lb| lb.logged("configuration reloaded") == 1);

    s.write_all(b"cd").unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("C"), "{text}");
    assert_eq!(a.hits(), 0, "the removed backend got the request");
    lb.signal("TERM");
    lb.wait_for("lb to exit", |lb| lb.child.try_wait().unwrap().is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A request in flight across a reload that changes the strategy (a new balancer) and
/// removes every backend: when its attempt fails after the reload, its retry must not go to
/// a backend the new configuration removed (SPEC: "whatever it changed (strategy
/// included), no request ... ever goes to a backend the new config removed"). The old
/// balancer, which the request keeps for its retries, still had them all.
#[test]
fn a_retry_after_a_strategy_change_reload_never_reaches_a_removed_backend() {
    use std::io::Read;
    use std::sync::mpsc;
    // X: reads one request head, says so, and closes the connection when told.
    let x = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let x_addr = x.local_addr().unwrap();
    let (arrived_tx, arrived) = mpsc::channel::<()>();
    let (close, close_rx) = mpsc::channel::<()>();
    let x_thread = std::thread::spawn(move || {
        let (mut conn, _) = x.accept().unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        arrived_tx.send(()).unwrap();
        let _ = close_rx.recv_timeout(std::time::Duration::from_secs(30));
        drop(conn);
    });
    let a = Backend::start("A");
    let c = Backend::start("C");
    let addr = free_port_addr();
    // Weighted round robin picks the heaviest first: X, then A on the retry.
    let first = format!(
        "listen = [\"{addr}\"]\nstrategy = \"weighted-round-robin\"\n[health]\ninterval = \"0s\"\n\
         [[backend]]\nurl = \"http://{x_addr}\"\nweight = 100\n\
         [[backend]]\nurl = \"{}\"\nweight = 1\n",
        a.url()
    );
    let (dir, path) = write_temp_config("reload-retry", &first);
    let mut lb = Lb::spawn(&path);
    lb.wait_for("lb to listen", |_| TcpStream::connect(addr).is_ok());

    let client = std::thread::spawn(move || get(addr));
    arrived
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the request reached X");
    let second = format!(
        "listen = [\"{addr}\"]\nstrategy = \"random\"\n[health]\ninterval = \"0s\"\n\
         [[backend]]\nurl = \"{}\"\n",
        c.url()
    );
    std::fs::write(&path, second).unwrap();
    lb.signal("HUP");
    lb.wait_for("the reload", |lb| lb.logged("configuration reloaded") == 1);
    close.send(()).unwrap();
    let (status, body) = client.join().unwrap();
    assert!(
        (status, body.as_str()) == (200, "C") || status == 502,
        "{status} {body}"
    );
    assert_eq!(
        a.hits(),
        0,
        "the retry went to a backend the reload removed"
    );
    x_thread.join().unwrap();
    lb.signal("TERM");
    lb.wait_for("lb to exit", |lb| lb.child.try_wait().unwrap().is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A retry decided before a reload and asleep in its backoff when the reload removes its
/// backend must not go there once it wakes. The backoff is long (1 s base: the first retry
/// waits up to 1 s, at random), so the reload almost always lands inside it; when it does
/// not, the test passes without having tested anything, never the other way round.
#[test]
fn a_retry_asleep_in_its_backoff_across_a_reload_never_reaches_the_removed_backend() {
    use std::io::Read;
    let x = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let x_addr = x.local_addr().unwrap();
    let (closed_tx, closed) = std::sync::mpsc::channel::<()>();
    // X: reads one request head and closes the connection (a reset for lb: retried).
    let x_thread = std::thread::spawn(move || {
        let (mut conn, _) = x.accept().unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        drop(conn);
        closed_tx.send(()).unwrap();
    });
    let a = Backend::start("A");
    let c = Backend::start("C");
    let addr = free_port_addr();
    let text = |strategy: &str, backends: &str| {
        format!(
            "listen = [\"{addr}\"]\nstrategy = \"{strategy}\"\n[health]\ninterval = \"0s\"\n\
             [retry]\nbackoff = \"1s\"\n{backends}"
        )
    };
    let first = format!(
        "[[backend]]\nurl = \"http://{x_addr}\"\nweight = 100\n[[backend]]\nurl = \"{}\"\nweight = 1\n",
        a.url()
    );
    let (dir, path) = write_temp_config("reload-backoff", &text("weighted-round-robin", &first));
    let mut lb = Lb::spawn(&path);
    lb.wait_for("lb to listen", |_| TcpStream::connect(addr).is_ok());

    let client = std::thread::spawn(move || get(addr));
    closed
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the request reached X");
    // Same strategy (the balancer stays) and X stays: only A, the retry's backend, goes.
    let second = format!(
        "[[backend]]\nurl = \"http://{x_addr}\"\nweight = 100\n[[backend]]\nurl = \"{}\"\n",
        c.url()
    );
    std::fs::write(&path, text("weighted-round-robin", &second)).unwrap();
    lb.signal("HUP");
    lb.wait_for("the reload", |lb| lb.logged("configuration reloaded") == 1);
    let (status, body) = client.join().unwrap();
    assert_eq!(
        a.hits(),
        0,
        "a retry went to a backend the reload removed: {status} {body}"
    );
    x_thread.join().unwrap();
    lb.signal("TERM");
    lb.wait_for("lb to exit", |lb| lb.child.try_wait().unwrap().is_some());
    let _ = std::fs::remove_dir_all(&dir);
}
