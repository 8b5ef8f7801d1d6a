//! The runtime admin API through the real binary: `POST /backends`, `PATCH` and `DELETE
//! /backends/{host:port}`, their bearer token, drain with a request in flight, and a
//! SIGHUP that discards runtime changes. Everything on 127.0.0.1 (kernel-chosen ports).

mod common;

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const TOKEN: &str = "t0ken-for-tests";

/// An admin request with the right token.
fn admin(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let auth = format!("Bearer {TOKEN}");
    let (status, _, body) = http_request(addr, method, path, &[("Authorization", &auth)], body);
    (status, body)
}

fn status(admin: SocketAddr) -> Vec<Value> {
    let (code, body) = procfs::admin_get(admin, "/status");
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    v["backends"].as_array().unwrap().clone()
}

fn state_of(admin: SocketAddr, url: &str) -> Option<String> {
    status(admin)
        .iter()
        .find(|b| b["url"] == url)
        .map(|b| b["state"].as_str().unwrap().to_owned())
}

struct Running {
    lb: Lb,
    listen: SocketAddr,
    admin: SocketAddr,
    path: std::path::PathBuf,
}

/// `lb` with `top` (top-level keys), health probes and slow start off (an added backend
/// gets its whole share at once, so counts are exact), and `backends` (url, weight).
fn start(name: &str, top: &str, backends: &[(String, u32)]) -> Running {
    let listen = free_port_addr();
    let admin = free_port_addr();
    let (_, path) = write_temp_config(name, &config(listen, admin, top, backends));
    let mut lb = Lb::spawn(&path);
    lb.wait_for("lb to listen", |_| {
        TcpStream::connect(listen).is_ok() && procfs::admin_get(admin, "/status").0 == 200
    });
    Running {
        lb,
        listen,
        admin,
        path,
    }
}

fn config(listen: SocketAddr, admin: SocketAddr, top: &str, backends: &[(String, u32)]) -> String {
    let mut text = format!(
        "listen = [\"{listen}\"]\nadmin = \"{admin}\"\n{top}\n[health]\ninterval = \"0s\"\n[passive]\nslow_start = \"0s\"\n"
    );
    for (u, w) in backends {
        text.push_str(&format!("[[backend]]\nurl = \"{u}\"\nweight = {w}\n"));
    }
    text
}

fn with_token(strategy: &str) -> String {
    format!("admin_token = \"{TOKEN}\"\nstrategy = \"{strategy}\"")
}

#[test]
fn without_a_token_the_mutating_endpoints_answer_403_and_get_stays_open() {
    let a = Backend::start("A");
    let r = start("admin-off", "", &[(a.url(), 1)]);
    let body = r#"{"url": "http://127.0.0.1:1"}"#;
    assert_eq!(admin(r.admin, "POST", "/backends", body).0, 403);
    let (code, _, _) = http_request(r.admin, "POST", "/backends", &[], body);
    assert_eq!(code, 403, "no token configured: 403 even without a header");
    assert_eq!(
        admin(r.admin, "DELETE", &format!("/backends/{}", a.addr), "").0,
        403
    );
    assert_eq!(status(r.admin).len(), 1);
    assert_eq!(state_of(r.admin, &a.url()).as_deref(), Some("up"));
}

#[test]
fn tokens_post_duplicates_bad_bodies_and_traffic_to_an_added_backend() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let r = start("admin-post", &with_token("round-robin"), &[(a.url(), 1)]);
    let body = format!(r#"{{"url": "{}", "weight": 1}}"#, b.url());

    let (code, head, _) = http_request(r.admin, "POST", "/backends", &[], &body);
    assert_eq!(code, 401);
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{head}"
    );
    let (code, _, _) = http_request(
        r.admin,
        "POST",
        "/backends",
        &[("Authorization", "Bearer wrong")],
        &body,
    );
    assert_eq!(code, 403);
    let (code, _, _) = http_request(
        r.admin,
        "POST",
        "/backends",
        &[("Authorization", TOKEN)],
        &body,
    );
    assert_eq!(code, 401, "not a Bearer credential");
    assert_eq!(status(r.admin).len(), 1, "refused requests change nothing");

    let (code, entry) = admin(r.admin, "POST", "/backends", &body);
    assert_eq!(code, 201, "{entry}");
    let entry: Value = serde_json::from_str(&entry).unwrap();
    assert_eq!(entry["url"], b.url());
    assert_eq!(entry["state"], "up");
    assert_eq!(entry["weight"], 1);
    assert_eq!(status(r.admin).len(), 2);

    // Round robin over the new set.
    let (a0, b0) = (a.hits(), b.hits());
    let mut bodies = Vec::new();
    for _ in 0..6 {
        let (code, body) = get(r.listen);
        assert_eq!(code, 200);
        bodies.push(body);
    }
    assert_eq!((a.hits() - a0, b.hits() - b0), (3, 3), "{bodies:?}");

    // Same scheme, host and port (host case-insensitive): 409.
    let dup = format!(r#"{{"url": "http://LOCALHOST:{}"}}"#, b.addr.port());
    assert_eq!(
        admin(r.admin, "POST", "/backends", &dup).0,
        201,
        "localhost is another host"
    );
    assert_eq!(admin(r.admin, "POST", "/backends", &body).0, 409);
    let dup = format!(r#"{{"url": "{}/"}}"#, b.url());
    assert_eq!(admin(r.admin, "POST", "/backends", &dup).0, 409);
    let dup = format!(r#"{{"url": "http://localhost:{}"}}"#, b.addr.port());
    assert_eq!(admin(r.admin, "POST", "/backends", &dup).0, 409);
    for bad in [
        "",
        "{",
        r#"{"url": "ftp://127.0.0.1:1"}"#,
        r#"{"url": "http://127.0.0.1"}"#,
        r#"{"url": "http://127.0.0.1:9", "weight": 0}"#,
        r#"{"url": "http://127.0.0.1:9", "weight": 10001}"#,
        r#"{"url": "http://127.0.0.1:9", "colour": "red"}"#,
        // No https backend in the config and no upstream_ca: nothing to verify it with.
        r#"{"url": "https://localhost:9"}"#,
    ] {
        assert_eq!(admin(r.admin, "POST", "/backends", bad).0, 400, "{bad}");
    }
    assert_eq!(
        admin(
            r.admin,
            "PATCH",
            "/backends/127.0.0.1:1",
            r#"{"weight": 2}"#
        )
        .0,
        404
    );
    assert_eq!(admin(r.admin, "DELETE", "/backends/127.0.0.1:1", "").0, 404);
    assert!(r.lb.logged("added backend") >= 2);
}

#[test]
fn patch_weight_changes_the_share_and_delete_removes() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let r = start(
        "admin-weight",
        &with_token("weighted-round-robin"),
        &[(a.url(), 1), (b.url(), 1)],
    );
    let (code, entry) = admin(
        r.admin,
        "PATCH",
        &format!("/backends/{}", b.addr),
        r#"{"weight": 3}"#,
    );
    assert_eq!(code, 200, "{entry}");
    assert_eq!(serde_json::from_str::<Value>(&entry).unwrap()["weight"], 3);
    let (a0, b0) = (a.hits(), b.hits());
    for _ in 0..8 {
        assert_eq!(get(r.listen).0, 200);
    }
    assert_eq!((a.hits() - a0, b.hits() - b0), (2, 6), "weights 1:3");
    assert!(r.lb.logged("weight 1 -> 3") >= 1);
    assert_eq!(
        admin(
            r.admin,
            "PATCH",
            &format!("/backends/{}", b.addr),
            r#"{"weight": 0}"#
        )
        .0,
        400
    );
    assert_eq!(
        admin(r.admin, "PATCH", &format!("/backends/{}", b.addr), "{}").0,
        400
    );

    let (code, _) = admin(r.admin, "DELETE", &format!("/backends/{}", b.addr), "");
    assert_eq!(code, 200);
    assert!(
        state_of(r.admin, &b.url()).is_none(),
        "/status no longer lists it"
    );
    let b0 = b.hits();
    for _ in 0..6 {
        assert_eq!(get(r.listen), (200, "A".into()));
    }
    assert_eq!(b.hits(), b0, "no new request goes to a removed backend");
    assert_eq!(
        admin(r.admin, "DELETE", &format!("/backends/{}", b.addr), "").0,
        404
    );
    assert_eq!(
        admin(
            r.admin,
            "PATCH",
            &format!("/backends/{}", b.addr),
            r#"{"drain": true}"#
        )
        .0,
        404
    );
    assert!(r.lb.logged("removed backend") >= 1);
}

#[test]
fn a_drained_backend_finishes_its_request_in_flight_and_takes_no_new_one() {
    let slow = Backend::start_delayed("SLOW", Duration::from_millis(1500));
    let b = Backend::start("B");
    let r = start(
        "admin-drain",
        &with_token("round-robin"),
        &[(slow.url(), 1), (b.url(), 1)],
    );
    let in_flight = in_flight_on(&slow, &b, r.listen);

    let path = format!("/backends/{}", slow.addr);
    let (code, entry) = admin(r.admin, "PATCH", &path, r#"{"drain": true}"#);
    assert_eq!(code, 200, "{entry}");
    let entry: Value = serde_json::from_str(&entry).unwrap();
    assert_eq!(entry["state"], "draining");
    assert_eq!(entry["active_requests"], 1);
    let s0 = slow.hits();
    for _ in 0..6 {
        assert_eq!(
            get(r.listen),
            (200, "B".into()),
            "new requests go elsewhere"
        );
    }
    assert_eq!(slow.hits(), s0);
    assert_eq!(state_of(r.admin, &slow.url()).as_deref(), Some("draining"));
    assert_eq!(
        in_flight.join().unwrap(),
        (200, "SLOW".into()),
        "the request in flight finished"
    );
    assert!(r.lb.logged("drain on") >= 1);

    let (code, entry) = admin(r.admin, "PATCH", &path, r#"{"drain": false}"#);
    assert_eq!(code, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&entry).unwrap()["state"],
        "up"
    );
    for _ in 0..2 {
        assert_eq!(get(r.listen).0, 200);
    }
    assert_eq!(slow.hits(), s0 + 1, "drain false restores it");
}

/// Sends requests (round robin over `slow` and `other`: within two) until one is in flight
/// on `slow`; that request's thread.
fn in_flight_on(
    slow: &Backend,
    other: &Backend,
    listen: SocketAddr,
) -> std::thread::JoinHandle<(u16, String)> {
    for _ in 0..4 {
        let before = (slow.hits(), other.hits());
        let t = std::thread::spawn(move || get(listen));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while (slow.hits(), other.hits()) == before && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if slow.hits() > before.0 {
            return t;
        }
        assert_eq!(t.join().unwrap().0, 200);
    }
    panic!("no request reached the slow backend");
}

#[test]
fn delete_lets_the_request_in_flight_finish() {
    let slow = Backend::start_delayed("SLOW", Duration::from_millis(1500));
    let b = Backend::start("B");
    let r = start(
        "admin-delete",
        &with_token("round-robin"),
        &[(slow.url(), 1), (b.url(), 1)],
    );
    let in_flight = in_flight_on(&slow, &b, r.listen);
    let (code, entry) = admin(r.admin, "DELETE", &format!("/backends/{}", slow.addr), "");
    assert_eq!(code, 200, "{entry}");
    let entry: Value = serde_json::from_str(&entry).unwrap();
    assert_eq!(entry["state"], "draining");
    assert_eq!(entry["active_requests"], 1);
    let s0 = slow.hits();
    for _ in 0..4 {
        assert_eq!(get(r.listen), (200, "B".into()));
    }
    assert_eq!(slow.hits(), s0);
    assert!(state_of(r.admin, &slow.url()).is_none());
    assert_eq!(in_flight.join().unwrap(), (200, "SLOW".into()));
}

#[test]
fn consistent_hash_keys_move_off_a_drained_backend() {
    let backends: Vec<Backend> = ["A", "B", "C"].into_iter().map(Backend::start).collect();
    let top = format!(
        "{}\nhash_key = \"header:x-user\"",
        with_token("consistent-hash")
    );
    let list: Vec<(String, u32)> = backends.iter().map(|b| (b.url(), 1)).collect();
    let r = start("admin-hash", &top, &list);
    let place = |k: usize| {
        let user = format!("user-{k}");
        let (code, _, body) = http_request(r.listen, "GET", "/", &[("x-user", &user)], "");
        assert_eq!(code, 200);
        body
    };
    let before: Vec<String> = (0..40).map(place).collect();
    assert!(before.iter().any(|b| b == "A"), "{before:?}");
    let (code, _) = admin(
        r.admin,
        "PATCH",
        &format!("/backends/{}", backends[0].addr),
        r#"{"drain": true}"#,
    );
    assert_eq!(code, 200);
    for (k, was) in before.iter().enumerate() {
        let now = place(k);
        assert_ne!(now, "A", "key {k} stayed on the drained backend");
        if was != "A" {
            assert_eq!(&now, was, "key {k} moved though its backend stayed");
        }
    }
}

#[test]
fn sighup_discards_runtime_changes_and_logs_them() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let r = start("admin-reload", &with_token("round-robin"), &[(a.url(), 1)]);
    let post = format!(r#"{{"url": "{}"}}"#, b.url());
    assert_eq!(admin(r.admin, "POST", "/backends", &post).0, 201);
    let path = format!("/backends/{}", a.addr);
    assert_eq!(
        admin(r.admin, "PATCH", &path, r#"{"drain": true, "weight": 4}"#).0,
        200
    );
    assert_eq!(state_of(r.admin, &a.url()).as_deref(), Some("draining"));

    // The same config again: every runtime change goes.
    let mut lb = r.lb;
    lb.signal("HUP");
    lb.wait_for("the reload", |lb| lb.logged("configuration reloaded") >= 1);
    assert_eq!(lb.logged("reload discarded runtime changes"), 1);
    let line = lb
        .stdout
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("reload discarded runtime changes"))
        .cloned()
        .unwrap();
    assert!(
        line.contains("added backend") && line.contains("drain on"),
        "{line}"
    );
    let now = status(r.admin);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(now[0]["state"], "up", "the config ends the drain");
    assert_eq!(now[0]["weight"], 1, "and sets the weight");
    let b0 = b.hits();
    for _ in 0..4 {
        assert_eq!(get(r.listen), (200, "A".into()));
    }
    assert_eq!(b.hits(), b0);
    // A second reload has nothing to discard.
    lb.signal("HUP");
    lb.wait_for("the second reload", |lb| {
        lb.logged("configuration reloaded") >= 2
    });
    assert_eq!(lb.logged("reload discarded runtime changes"), 1);
    drop(r.path);
}

#[test]
fn help_lists_the_token_flag_and_token_file_errors_exit_1_naming_the_file() {
    let out = Command::new(LB).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("--admin-token-file"));

    let dir = std::env::temp_dir().join(format!("lb-admin-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let missing = dir.join("missing-token");
    for file in [&empty, &missing] {
        let out = Command::new(LB)
            .args([
                "--backend",
                "http://127.0.0.1:1",
                "--check",
                "--admin-token-file",
            ])
            .arg(file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{file:?}");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains(&file.display().to_string()), "{text}");
    }
    // A good file (its newline ignored) wins over the config's key.
    let good = dir.join("token");
    std::fs::write(&good, format!("{TOKEN}\n")).unwrap();
    let a = Backend::start("A");
    let listen = free_port_addr();
    let admin_addr = free_port_addr();
    let (_, path) = write_temp_config(
        "admin-token-file",
        &config(
            listen,
            admin_addr,
            "admin_token = \"other\"",
            &[(a.url(), 1)],
        ),
    );
    let mut child = Command::new(LB)
        .arg("--config")
        .arg(&path)
        .arg("--admin-token-file")
        .arg(&good)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while procfs::admin_get(admin_addr, "/status").0 != 200 {
        assert!(std::time::Instant::now() < deadline, "lb did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let body = r#"{"url": "http://127.0.0.1:1"}"#;
    let (other, _, _) = http_request(
        admin_addr,
        "POST",
        "/backends",
        &[("Authorization", "Bearer other")],
        body,
    );
    let (right, _) = admin(admin_addr, "POST", "/backends", body);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!((other, right), (403, 201), "the flag wins");
}

#[test]
fn probes_follow_added_and_removed_backends() {
    let a = Counting::start("A");
    let b = Counting::start("B");
    let listen = free_port_addr();
    let admin_addr = free_port_addr();
    let text = format!(
        "listen = [\"{listen}\"]\nadmin = \"{admin_addr}\"\nadmin_token = \"{TOKEN}\"\n\
         [health]\ninterval = \"100ms\"\npath = \"{PROBE_PATH}\"\n\
         [[backend]]\nurl = \"{}\"\n",
        a.url()
    );
    let (_, path) = write_temp_config("admin-probes", &text);
    let mut lb = Lb::spawn(&path);
    lb.wait_for("lb to probe A", |_| a.probes() > 0);
    assert_eq!(b.probes(), 0);
    let post = format!(r#"{{"url": "{}"}}"#, b.url());
    assert_eq!(admin(admin_addr, "POST", "/backends", &post).0, 201);
    lb.wait_for("probes of the added backend", |_| b.probes() > 0);
    assert_eq!(state_of(admin_addr, &b.url()).as_deref(), Some("up"));
    let probes_of_a = a.probes();
    assert_eq!(
        admin(admin_addr, "DELETE", &format!("/backends/{}", b.addr), "").0,
        200
    );
    let after = b.probes();
    // Ten probe intervals: A is probed on, the removed B at most once more (one in flight).
    lb.wait_for("A's probes to go on", |_| a.probes() >= probes_of_a + 10);
    assert!(
        b.probes() <= after + 1,
        "the removed backend is still probed"
    );
}
