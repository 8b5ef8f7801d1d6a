//! `limits.max_connections` through the real binary with one worker per core: one limit for
//! the process (not a share per worker), and a reload that leaves the limits alone says
//! nothing about them.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::free_port_addr as free_addr;

fn config(addr: SocketAddr, strategy: &str, urls: &[String], max_connections: usize) -> String {
    let mut text = format!(
        "listen = [\"{addr}\"]\nstrategy = \"{strategy}\"\n[health]\ninterval = \"0s\"\n\
         [limits]\nmax_connections = {max_connections}\n"
    );
    for u in urls {
        text.push_str(&format!("[[backend]]\nurl = \"{u}\"\n"));
    }
    text
}

fn temp_config(name: &str, text: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("lb-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lb.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// Sends one keep-alive request and reads its whole response ("A", one byte), leaving the
/// connection open.
fn served_keep_alive(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    if s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while !(out.starts_with(b"HTTP/1.1 200") && out.ends_with(b"\r\n\r\nA")) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    true
}

#[test]
fn max_connections_is_one_limit_for_all_workers() {
    const N: usize = 16;
    let a = Backend::start("A");
    let addr = free_addr();
    let (dir, path) = temp_config("maxconn", &config(addr, "round-robin", &[a.url()], N));
    let mut lb = Lb::spawn(&path);
    lb.wait_for("lb to listen", |lb| lb.logged("lb started") == 1);
    // N connections open at once, however the kernel spreads them over the workers: every
    // one is served while the others stay open.
    let mut open = Vec::new();
    for i in 0..N {
        let mut s = TcpStream::connect(addr).unwrap();
        assert!(
            served_keep_alive(&mut s),
            "connection {} of {N} was not served",
            i + 1
        );
        open.push(s);
    }
    assert_eq!(a.hits(), N);
    drop(open);
    lb.signal("TERM");
    lb.wait_for("lb to exit", |lb| lb.child.try_wait().unwrap().is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_reload_of_backends_and_strategy_only_warns_of_nothing() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let addr = free_addr();
    let (dir, path) = temp_config("reloadwarn", &config(addr, "round-robin", &[a.url()], 100));
    let mut lb = Lb::spawn(&path);
    lb.wait_for("lb to listen", |lb| lb.logged("lb started") == 1);
    std::fs::write(&path, config(addr, "random", &[b.url()], 100)).unwrap();
    lb.signal("HUP");
    lb.wait_for("the reload", |lb| lb.logged("configuration reloaded") == 1);
    assert_eq!(get(addr), (200, "B".to_owned()));
    assert_eq!(
        lb.logged("take effect after a restart"),
        0,
        "no false warning"
    );
    assert_eq!(lb.logged("WARN"), 0, "no warning at all");
    lb.signal("TERM");
    lb.wait_for("lb to exit", |lb| lb.child.try_wait().unwrap().is_some());
    let _ = std::fs::remove_dir_all(&dir);
}
