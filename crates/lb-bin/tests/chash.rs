//! Instance-independent consistent hashing through the real binary (SPEC "Dynamic backends":
//! "any lb processes given the same backends (in any order, from the config or from DNS)
//! send each key to the same backend"): three `lb` processes, one set of backends written
//! three ways in three orders, every key answered by the same backend through each.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{free_port_addr, procfs::admin_get, write_temp_config, Backend, Lb};

/// GET `/` with `X-User: user` over a fresh connection; the body (the backend's name).
fn get_as(addr: SocketAddr, user: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: test\r\nX-User: {user}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

#[test]
fn three_instances_with_differently_ordered_and_written_backends_agree_on_every_key() {
    const NAMES: [&str; 5] = ["b0", "b1", "b2", "b3", "b4"];
    let backends: Vec<Backend> = NAMES.iter().map(|&n| Backend::start(n)).collect();
    let port = |i: usize| backends[i].addr.port();
    // The same backend written as each instance's operator might have: a trailing slash,
    // an upper-case scheme, no scheme at all.
    let spellings: [&dyn Fn(usize) -> String; 3] = [
        &|i| format!("http://127.0.0.1:{}", port(i)),
        &|i| format!("HTTP://127.0.0.1:{}/", port(i)),
        &|i| format!("127.0.0.1:{}", port(i)),
    ];
    let orders = [[0, 1, 2, 3, 4], [4, 2, 0, 3, 1], [3, 4, 1, 0, 2]];
    let mut lbs = Vec::new();
    let mut dirs = Vec::new();
    for (k, (order, spell)) in orders.iter().zip(spellings).enumerate() {
        let (addr, admin) = (free_port_addr(), free_port_addr());
        let mut text = format!(
            "listen = [\"{addr}\"]\nadmin = \"{admin}\"\nstrategy = \"consistent-hash\"\n\
             hash_key = \"header:X-User\"\n[health]\ninterval = \"0s\"\n"
        );
        for &i in order {
            text.push_str(&format!("[[backend]]\nurl = \"{}\"\n", spell(i)));
        }
        let (dir, path) = write_temp_config(&format!("chash-{k}"), &text);
        let mut lb = Lb::spawn(&path);
        lb.wait_for("lb to listen", |_| TcpStream::connect(addr).is_ok());
        // `/status` keeps each URL as that instance's config wrote it.
        let (code, status) = admin_get(admin, "/status");
        assert_eq!(code, 200, "{status}");
        assert!(status.contains(&spell(order[0])), "{status}");
        lbs.push((lb, addr));
        dirs.push(dir);
    }
    let mut placement: HashMap<String, String> = HashMap::new();
    for user in 0..200 {
        let user = format!("user-{user}");
        let answers: Vec<String> = lbs.iter().map(|(_, addr)| get_as(*addr, &user)).collect();
        assert!(NAMES.contains(&answers[0].as_str()), "{user}: {answers:?}");
        assert!(
            answers.iter().all(|a| *a == answers[0]),
            "{user} reached different backends through the three instances: {answers:?}"
        );
        placement.insert(user, answers[0].clone());
    }
    let mut per_backend: HashMap<&str, usize> = HashMap::new();
    for b in placement.values() {
        *per_backend.entry(b.as_str()).or_default() += 1;
    }
    println!("200 keys over 5 backends, as every instance placed them: {per_backend:?}");
    assert_eq!(per_backend.len(), 5, "the keys spread over every backend");
    for (lb, _) in &mut lbs {
        lb.signal("TERM");
    }
    for (mut lb, _) in lbs {
        lb.wait_for("lb to exit", |lb| lb.child.try_wait().unwrap().is_some());
    }
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}
