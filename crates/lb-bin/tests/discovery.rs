//! DNS discovery through the real binary (SPEC "Dynamic backends"): a DNS server on
//! loopback, started by the test, whose records the test changes; backends on 127.0.0.1
//! and 127.0.0.2 (both loopback on Linux) at one port make a two-address name.
//!
//! Waits are bounded; nothing asserts a timing. The time from a DNS change to traffic
//! moving is printed (`--nocapture`) with `refresh = "1s"`.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::proto::op::{Header, ResponseCode};
use hickory_server::proto::rr::rdata::{A, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};

/// How the test DNS server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// From its records: NXDOMAIN for a name it has none of.
    Answer,
    /// SERVFAIL to everything.
    ServFail,
    /// No answer at all (the client times out).
    Drop,
}

#[derive(Debug)]
struct Zone {
    mode: Mode,
    /// By (lower-case name without the trailing dot, type).
    records: HashMap<(String, RecordType), Vec<Record>>,
    /// Per SRV name, the A records of its targets (the additional section).
    additional: HashMap<String, Vec<Record>>,
    /// Per record type, a mode that overrides `mode` (an AAAA query failing while A works).
    type_mode: HashMap<RecordType, Mode>,
    queries: usize,
}

struct Handler(Arc<Mutex<Zone>>);

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn fqdn(name: &str) -> Name {
    Name::from_ascii(format!("{}.", key(name))).unwrap()
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let mut header = Header::response_from_request(request.header());
        let Ok(info) = request.request_info() else {
            header.set_response_code(ResponseCode::FormErr);
            return header.into();
        };
        let name = key(&info.query.name().to_string());
        let qtype = info.query.query_type();
        let (mode, answers, additional, exists) = {
            let mut z = self.0.lock().unwrap();
            z.queries += 1;
            let answers = z.records.get(&(name.clone(), qtype)).cloned();
            let exists = z.records.keys().any(|(n, _)| *n == name);
            let additional = z.additional.get(&name).cloned().unwrap_or_default();
            let mode = z.type_mode.get(&qtype).copied().unwrap_or(z.mode);
            (mode, answers.unwrap_or_default(), additional, exists)
        };
        let builder = MessageResponseBuilder::from_message_request(request);
        match mode {
            Mode::Drop => return header.into(),
            Mode::ServFail => {
                let msg = builder.error_msg(request.header(), ResponseCode::ServFail);
                return response.send_response(msg).await.unwrap_or_else(|_| {
                    let mut h = Header::response_from_request(request.header());
                    h.set_response_code(ResponseCode::ServFail);
                    h.into()
                });
            }
            Mode::Answer => {}
        }
        header.set_authoritative(true);
        if !exists {
            header.set_response_code(ResponseCode::NXDomain);
        }
        let msg = builder.build(header, answers.iter(), [], [], additional.iter());
        response
            .send_response(msg)
            .await
            .unwrap_or_else(|_| header.into())
    }
}

/// A DNS server on 127.0.0.1 (UDP and TCP, one port) on its own thread.
struct Dns {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
}

impl Dns {
    fn start() -> Self {
        let zone = Arc::new(Mutex::new(Zone {
            mode: Mode::Answer,
            records: HashMap::new(),
            additional: HashMap::new(),
            type_mode: HashMap::new(),
            queries: 0,
        }));
        // One port for both: bind UDP, then TCP on its port (retry if that one is taken).
        let (udp, tcp) = loop {
            let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            if let Ok(tcp) = std::net::TcpListener::bind(udp.local_addr().unwrap()) {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        udp.set_nonblocking(true).unwrap();
        tcp.set_nonblocking(true).unwrap();
        let handler = Handler(Arc::clone(&zone));
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut server = hickory_server::ServerFuture::new(handler);
                server.register_socket(tokio::net::UdpSocket::from_std(udp).unwrap());
                server.register_listener(
                    tokio::net::TcpListener::from_std(tcp).unwrap(),
                    Duration::from_secs(5),
                );
                let _ = server.block_until_done().await;
            });
        });
        Self { addr, zone }
    }

    fn set_mode(&self, mode: Mode) {
        self.zone.lock().unwrap().mode = mode;
    }

    /// `mode` for queries of type `t` only (`None`: as every other type).
    fn set_type_mode(&self, t: RecordType, mode: Option<Mode>) {
        let mut z = self.zone.lock().unwrap();
        match mode {
            Some(m) => z.type_mode.insert(t, m),
            None => z.type_mode.remove(&t),
        };
    }

    /// `name`'s AAAA records (TTL 1 s).
    fn set_aaaa(&self, name: &str, ips: &[std::net::Ipv6Addr]) {
        let records = ips
            .iter()
            .map(|ip| {
                Record::from_rdata(
                    fqdn(name),
                    1,
                    RData::AAAA(hickory_server::proto::rr::rdata::AAAA(*ip)),
                )
            })
            .collect();
        self.zone
            .lock()
            .unwrap()
            .records
            .insert((key(name), RecordType::AAAA), records);
    }

    fn queries(&self) -> usize {
        self.zone.lock().unwrap().queries
    }

    /// `name`'s A records (TTL 1 s): none left is NOERROR with no answer for A, NXDOMAIN
    /// once the name has no records at all ([`Dns::remove`]).
    fn set_a(&self, name: &str, ips: &[IpAddr]) {
        let records = ips
            .iter()
            .map(|ip| match ip {
                IpAddr::V4(v4) => Record::from_rdata(fqdn(name), 1, RData::A(A(*v4))),
                IpAddr::V6(_) => unreachable!("the tests use IPv4"),
            })
            .collect();
        self.zone
            .lock()
            .unwrap()
            .records
            .insert((key(name), RecordType::A), records);
    }

    /// `name`'s SRV records `(priority, weight, port, target)`; each target's address
    /// (127.0.0.N for target `tN...`) goes in the additional section and in A records.
    fn set_srv(&self, name: &str, entries: &[(u16, u16, u16, &str, IpAddr)]) {
        let mut z = self.zone.lock().unwrap();
        let mut srv = Vec::new();
        let mut additional = Vec::new();
        for &(priority, weight, port, target, ip) in entries {
            srv.push(Record::from_rdata(
                fqdn(name),
                1,
                RData::SRV(SRV::new(priority, weight, port, fqdn(target))),
            ));
            let IpAddr::V4(v4) = ip else { unreachable!() };
            let a = Record::from_rdata(fqdn(target), 1, RData::A(A(v4)));
            additional.push(a.clone());
            z.records.insert((key(target), RecordType::A), vec![a]);
        }
        z.records.insert((key(name), RecordType::SRV), srv);
        z.additional.insert(key(name), additional);
    }

    /// No records of `name` at all: NXDOMAIN.
    fn remove(&self, name: &str) {
        let k = key(name);
        self.zone
            .lock()
            .unwrap()
            .records
            .retain(|(n, _), _| *n != k);
    }
}

fn lo(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

/// Backends `names[i]` on 127.0.0.(i+1), all at one port.
fn backends_at_one_port(names: &[&'static str]) -> (u16, Vec<Backend>) {
    'again: loop {
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for i in 1..names.len() {
            match std::net::TcpListener::bind((lo(i as u8 + 1), port)) {
                Ok(l) => listeners.push(l),
                Err(_) => continue 'again,
            }
        }
        let backends = listeners
            .into_iter()
            .zip(names)
            .map(|(l, n)| Backend::start_on(l, n))
            .collect();
        return (port, backends);
    }
}

struct Running {
    lb: Lb,
    listen: SocketAddr,
    admin: SocketAddr,
    _dir: std::path::PathBuf,
}

fn start_lb(name: &str, dns: &Dns, extra: &str, backends: &str) -> Running {
    start_lb_refresh(name, dns, extra, backends, "1s")
}

fn start_lb_refresh(name: &str, dns: &Dns, extra: &str, backends: &str, refresh: &str) -> Running {
    let listen = free_port_addr();
    let admin = free_port_addr();
    let text = format!(
        "listen = [\"{listen}\"]\nadmin = \"{admin}\"\n{extra}\n{health}\
         [discovery]\nresolver = \"{}\"\nrefresh = \"{refresh}\"\n{backends}",
        dns.addr,
        // No probes unless the test asks for them.
        health = if extra.contains("[health]") {
            ""
        } else {
            "[health]\ninterval = \"0s\"\n"
        },
    );
    let (dir, path) = write_temp_config(name, &text);
    let mut lb = Lb::spawn_quiet(&path);
    lb.wait_for("lb to listen", |_| TcpStream::connect(listen).is_ok());
    Running {
        lb,
        listen,
        admin,
        _dir: dir,
    }
}

/// `lb_discovery_errors_total{name="…"}`.
fn discovery_errors(admin: SocketAddr, name: &str) -> u64 {
    let (_, text) = procfs::admin_get(admin, "/metrics");
    let series = format!("lb_discovery_errors_total{{name=\"{name}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap_or(0))
}

/// `/status` `requests_total` of the backend with `url`.
fn requests_total(admin: SocketAddr, url: &str) -> Option<u64> {
    let (_, status) = procfs::admin_get(admin, "/status");
    let v: serde_json::Value = serde_json::from_str(&status).ok()?;
    v["backends"]
        .as_array()?
        .iter()
        .find(|e| e["url"] == url)
        .and_then(|e| e["requests_total"].as_u64())
}

/// Sends requests until `done` says so (each after a request, with the body), up to 15 s;
/// the time it took, or none.
fn until(r: &Running, mut done: impl FnMut(u16, &str) -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(15) {
        let (code, body) = get(r.listen);
        if done(code, &body) {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// `n` requests: how many each body got.
fn spread(r: &Running, n: usize) -> HashMap<String, usize> {
    let mut got = HashMap::new();
    for _ in 0..n {
        let (code, body) = get(r.listen);
        *got.entry(format!("{code} {body}")).or_default() += 1;
    }
    got
}

#[test]
fn a_name_with_two_addresses_follows_dns() {
    let dns = Dns::start();
    let (port, b) = backends_at_one_port(&["A", "B"]);
    let name = "api.test";
    dns.set_a(name, &[lo(1), lo(2)]);
    let url = format!("http://{name}:{port}");
    let r = start_lb(
        "disc-two",
        &dns,
        "[passive]\nslow_start = \"0s\"",
        &format!("[[backend]]\nurl = \"{url}\"\n"),
    );

    // Both addresses are backends, by address, each with its name.
    let got = spread(&r, 20);
    assert_eq!(
        (got.get("200 A"), got.get("200 B")),
        (Some(&10), Some(&10)),
        "{got:?}"
    );
    let (_, status) = procfs::admin_get(r.admin, "/status");
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let mut entries: Vec<(String, String)> = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["url"].as_str().unwrap().to_owned(),
                e["name"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        [
            (format!("http://127.0.0.1:{port}"), url.clone()),
            (format!("http://127.0.0.2:{port}"), url.clone())
        ]
    );
    assert_eq!(discovery_errors(r.admin, &url), 0, "the series starts at 0");

    // 127.0.0.2 leaves DNS: within a bounded wait no request reaches it.
    dns.set_a(name, &[lo(1)]);
    // Moved: the last request that reached it, once 20 in a row have not.
    let t0 = Instant::now();
    let mut streak = 0;
    let mut seen_b = b[1].hits();
    let mut moved = Duration::ZERO;
    until(&r, |_, _| {
        let now = b[1].hits();
        if now == seen_b {
            streak += 1;
        } else {
            (seen_b, streak, moved) = (now, 0, t0.elapsed());
        }
        streak >= 20
    })
    .expect("traffic left the removed address");
    let before = b[1].hits();
    let got = spread(&r, 20);
    assert_eq!(got.get("200 A"), Some(&20), "{got:?}");
    assert_eq!(
        b[1].hits(),
        before,
        "no request reaches the removed address"
    );
    println!(
        "DNS change to traffic moving (refresh 1s): removal {moved:?} (to the last request it got)"
    );

    // It comes back: traffic returns.
    dns.set_a(name, &[lo(1), lo(2)]);
    let before = b[1].hits();
    let back = until(&r, |_, _| b[1].hits() > before).expect("traffic returned");
    println!("DNS change to traffic moving (refresh 1s): addition {back:?}");
    // The address that stayed kept its state through both changes: its counter is the
    // backend's own count, not restarted.
    assert_eq!(
        requests_total(r.admin, &format!("http://127.0.0.1:{port}")),
        Some(b[0].hits() as u64)
    );

    // SERVFAIL and timeouts keep the set, and are counted.
    for mode in [Mode::ServFail, Mode::Drop] {
        let errors = discovery_errors(r.admin, &url);
        dns.set_mode(mode);
        let t0 = Instant::now();
        while discovery_errors(r.admin, &url) < errors + 2 && t0.elapsed() < Duration::from_secs(15)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            discovery_errors(r.admin, &url) >= errors + 2,
            "{mode:?} counted in lb_discovery_errors_total"
        );
        let got = spread(&r, 20);
        assert_eq!(
            (got.get("200 A"), got.get("200 B")),
            (Some(&10), Some(&10)),
            "{mode:?} keeps the last known set: {got:?}"
        );
        dns.set_mode(Mode::Answer);
    }
    assert!(r.lb.logged("DNS lookup failed") > 0);

    // NXDOMAIN empties it: 503.
    dns.remove(name);
    until(&r, |code, _| code == 503).expect("NXDOMAIN removes the addresses");
    assert!(dns.queries() > 0);
}

#[test]
fn a_name_unresolvable_at_start_up_serves_once_it_resolves() {
    let dns = Dns::start();
    let (port, b) = backends_at_one_port(&["A"]);
    let name = "late.test";
    let url = format!("http://{name}:{port}");
    let backends = format!("[[backend]]\nurl = \"{url}\"\n");

    // --check warns and exits 0.
    let (_dir, path) = write_temp_config(
        "disc-check",
        &format!("[discovery]\nresolver = \"{}\"\n{backends}", dns.addr),
    );
    let out = std::process::Command::new(LB)
        .args(["--config", path.to_str().unwrap(), "--check"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains(&format!("warning: {url} does not resolve")),
        "{text}"
    );

    let r = start_lb("disc-late", &dns, "", &backends);
    assert_eq!(get(r.listen).0, 503, "no backend yet");
    dns.set_a(name, &[lo(1)]);
    let t = until(&r, |code, body| code == 200 && body == "A").expect("serves once it resolves");
    println!("DNS change to traffic moving (refresh 1s): first record {t:?}");
    assert!(b[0].hits() > 0);
}

#[test]
fn srv_records_give_targets_ports_and_weights() {
    let dns = Dns::start();
    let (port, b) = backends_at_one_port(&["A", "B"]);
    let name = "_http._tcp.api.test";
    // Weight 0 counts as 1.
    dns.set_srv(
        name,
        &[
            (10, 3, port, "t1.test", lo(1)),
            (10, 0, port, "t2.test", lo(2)),
        ],
    );
    let r = start_lb(
        "disc-srv",
        &dns,
        "strategy = \"weighted-round-robin\"\n[passive]\nslow_start = \"0s\"",
        &format!("[[backend]]\nsrv = \"{name}\"\n"),
    );
    let got = spread(&r, 40);
    assert_eq!(
        (got.get("200 A"), got.get("200 B")),
        (Some(&30), Some(&10)),
        "weights 3 and 1: {got:?}"
    );
    // A new weight from DNS applies like a reload.
    dns.set_srv(
        name,
        &[
            (10, 1, port, "t1.test", lo(1)),
            (10, 1, port, "t2.test", lo(2)),
        ],
    );
    until(&r, |_, _| {
        let got = spread(&r, 4);
        got.get("200 A") == Some(&2) && got.get("200 B") == Some(&2)
    })
    .expect("the new weights apply");
    let (_, status) = procfs::admin_get(r.admin, "/status");
    assert!(status.contains(&format!("\"name\":\"{name}\"")), "{status}");
    assert!(b[0].hits() > 0 && b[1].hits() > 0);
}

#[test]
fn srv_priorities_fail_over_only_while_the_lower_group_has_no_eligible_backend() {
    let dns = Dns::start();
    let (port, b) = backends_at_one_port(&["A", "B"]);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let name = "_http._tcp.prio.test";
    let live = [
        (10, 1, port, "t1.test", lo(1)),
        (20, 1, port, "t2.test", lo(2)),
    ];
    dns.set_srv(name, &live);
    let r = start_lb(
        "disc-prio",
        &dns,
        "[passive]\nslow_start = \"0s\"\nconsecutive_failures = 1\nejection = \"30s\"",
        &format!("[[backend]]\nsrv = \"{name}\"\n"),
    );
    // Both up: the lower priority only.
    let got = spread(&r, 20);
    assert_eq!(got.get("200 A"), Some(&20), "{got:?}");
    assert_eq!(b[1].hits(), 0, "the higher priority waits");

    // The priority-10 target moves to a port where nothing listens: its first refused
    // connect ejects it, the request is retried on priority 20, and that group serves
    // while the lower one has no eligible backend.
    dns.set_srv(
        name,
        &[
            (10, 1, closed, "t1.test", lo(1)),
            (20, 1, port, "t2.test", lo(2)),
        ],
    );
    until(&r, |code, body| code == 200 && body == "B").expect("fail-over to priority 20");
    let got = spread(&r, 20);
    assert_eq!(got.get("200 B"), Some(&20), "{got:?}");

    // Back where it listens (a new backend, eligible): traffic returns to priority 10.
    dns.set_srv(name, &live);
    let a0 = b[0].hits();
    until(&r, |_, _| b[0].hits() > a0).expect("fail-back to priority 10");
    let b0 = b[1].hits();
    let got = spread(&r, 20);
    assert_eq!(got.get("200 A"), Some(&20), "{got:?}");
    assert_eq!(b[1].hits(), b0);
}

#[test]
fn a_reload_keeps_the_last_known_set_of_names_it_keeps() {
    let dns = Dns::start();
    let (port, b) = backends_at_one_port(&["A", "B"]);
    let name = "reload.test";
    dns.set_a(name, &[lo(1), lo(2)]);
    let named = format!("[[backend]]\nurl = \"http://{name}:{port}\"\n");
    let mut r = start_lb(
        "disc-reload",
        &dns,
        "[passive]\nslow_start = \"0s\"",
        &named,
    );
    let path = r._dir.join("lb.toml");
    let got = spread(&r, 20);
    assert_eq!(
        (got.get("200 A"), got.get("200 B")),
        (Some(&10), Some(&10)),
        "{got:?}"
    );

    // The same file again: the name's set is kept, nothing waits for DNS.
    r.lb.signal("HUP");
    r.lb.wait_for("the reload", |lb| lb.logged("configuration reloaded") == 1);
    let got = spread(&r, 20);
    assert_eq!(
        (got.get("200 A"), got.get("200 B")),
        (Some(&10), Some(&10)),
        "{got:?}"
    );

    // The name replaced by a static backend: only that one.
    let text = std::fs::read_to_string(&path).unwrap().replace(&named, "");
    std::fs::write(
        &path,
        format!("{text}[[backend]]\nurl = \"{}\"\n", b[1].url()),
    )
    .unwrap();
    r.lb.signal("HUP");
    r.lb.wait_for("the reload", |lb| lb.logged("configuration reloaded") == 2);
    let got = spread(&r, 20);
    assert_eq!(got.get("200 B"), Some(&20), "{got:?}");
    // And its watcher is gone: a DNS change no longer matters.
    dns.set_a(name, &[lo(1)]);
    std::thread::sleep(Duration::from_millis(1500));
    let got = spread(&r, 10);
    assert_eq!(got.get("200 B"), Some(&10), "{got:?}");
}

#[test]
fn an_https_name_is_verified_for_that_name_and_sent_it_as_sni() {
    use common::tls::{toml_path, HttpsBackend, Pki};
    let dns = Dns::start();
    let pki = Pki::new("disc-https");
    let backend = HttpsBackend::start("S", &pki.leaf("backend", &["secure.test"], 11));
    dns.set_a("secure.test", &[lo(1)]);
    let r = start_lb(
        "disc-https",
        &dns,
        &format!("[tls]\nupstream_ca = {}", toml_path(&pki.ca_pem)),
        &format!(
            "[[backend]]\nurl = \"https://secure.test:{}\"\n",
            backend.addr.port()
        ),
    );
    for _ in 0..3 {
        assert_eq!(get(r.listen), (200, "S".to_owned()));
    }
    let seen = backend.requests();
    assert_eq!(seen.len(), 3);
    for s in seen {
        assert_eq!(
            s.sni.as_deref(),
            Some("secure.test"),
            "the name, not the address"
        );
    }
    let (_, status) = procfs::admin_get(r.admin, "/status");
    assert!(
        status.contains(&format!(
            "\"url\":\"https://127.0.0.1:{}\"",
            backend.addr.port()
        )),
        "{status}"
    );
}

/// `lb_health_checks_total` of `backend` (`host:port`), all results.
fn probes_of(admin: SocketAddr, backend: &str) -> u64 {
    let (_, text) = procfs::admin_get(admin, "/metrics");
    let series = format!("lb_health_checks_total{{backend=\"{backend}\",");
    text.lines()
        .filter(|l| l.starts_with(&series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn probes_follow_the_discovered_set() {
    let dns = Dns::start();
    let (port, _b) = backends_at_one_port(&["A", "B"]);
    let name = "probed.test";
    dns.set_a(name, &[lo(1)]);
    let r = start_lb(
        "disc-probes",
        &dns,
        "[health]\ninterval = \"100ms\"",
        &format!("[[backend]]\nurl = \"http://{name}:{port}\"\n"),
    );
    let (one, two) = (format!("127.0.0.1:{port}"), format!("127.0.0.2:{port}"));
    let probed = |who: &str, more_than: u64| {
        let t0 = Instant::now();
        while probes_of(r.admin, who) <= more_than && t0.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(50));
        }
        probes_of(r.admin, who) > more_than
    };
    assert!(probed(&one, 2), "the first address is probed");
    assert_eq!(probes_of(r.admin, &two), 0);
    // Added: probed too, and the one that stays goes on being probed.
    dns.set_a(name, &[lo(1), lo(2)]);
    assert!(probed(&two, 2), "the added address is probed");
    // Removed: its probes stop.
    dns.set_a(name, &[lo(1)]);
    until(&r, |_, body| {
        body == "A" && {
            let got = spread(&r, 10);
            got.get("200 A") == Some(&10)
        }
    })
    .expect("the removal applies");
    std::thread::sleep(Duration::from_millis(300));
    let stopped = probes_of(r.admin, &two);
    let still = probes_of(r.admin, &one);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        probes_of(r.admin, &two),
        stopped,
        "no probe of a removed address"
    );
    assert!(
        probes_of(r.admin, &one) > still,
        "the address that stays is still probed"
    );
}

/// An admin API request with bearer token `t0ken`: (status, body).
fn admin_call(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: lb\r\nAuthorization: Bearer t0ken\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (code, body)
}

#[test]
fn runtime_changes_survive_dns_changes_and_a_discovered_backend_can_be_drained() {
    let dns = Dns::start();
    let (port, b) = backends_at_one_port(&["A", "B"]);
    let c = Backend::start("C");
    let name = "admin.test";
    dns.set_a(name, &[lo(1), lo(2)]);
    let url = format!("http://{name}:{port}");
    let r = start_lb(
        "disc-admin",
        &dns,
        "admin_token = \"t0ken\"\n[passive]\nslow_start = \"0s\"",
        &format!("[[backend]]\nurl = \"{url}\"\n"),
    );
    // A discovered backend can be drained (its entry has its name) ...
    let (code, body) = admin_call(
        r.admin,
        "PATCH",
        &format!("/backends/127.0.0.2:{port}"),
        r#"{"drain": true}"#,
    );
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["state"].as_str(), v["name"].as_str()),
        (Some("draining"), Some(url.as_str()))
    );
    let got = spread(&r, 10);
    assert_eq!(got.get("200 A"), Some(&10), "{got:?}");
    // ... but DNS owns its weight and membership.
    let path = format!("/backends/127.0.0.1:{port}");
    assert_eq!(
        admin_call(r.admin, "PATCH", &path, r#"{"weight": 3}"#).0,
        409
    );
    assert_eq!(admin_call(r.admin, "DELETE", &path, "").0, 409);
    let before = b[1].hits();

    // A runtime addition survives a DNS change (which rebuilds the set) ...
    let (code, body) = admin_call(
        r.admin,
        "POST",
        "/backends",
        &format!(r#"{{"url": "{}"}}"#, c.url()),
    );
    assert_eq!(code, 201, "{body}");
    dns.set_a(name, &[lo(1), lo(2), lo(3)]);
    until(&r, |_, _| {
        let (_, status) = procfs::admin_get(r.admin, "/status");
        status.contains(&format!("127.0.0.3:{port}"))
    })
    .expect("the DNS change applies");
    let (_, status) = procfs::admin_get(r.admin, "/status");
    assert!(
        status.contains(&c.url()),
        "the added backend stays: {status}"
    );
    // ... and so does the drain of an address that stays. (127.0.0.3 listens nowhere:
    // refused, ejected, retried.)
    let got = spread(&r, 20);
    assert_eq!(b[1].hits(), before, "still drained: {got:?}");
    assert!(
        got.contains_key("200 A") && got.contains_key("200 C"),
        "{got:?}"
    );
    assert!(got.keys().all(|k| k.starts_with("200 ")), "{got:?}");
}

#[test]
fn a_short_ttl_refreshes_sooner_than_refresh() {
    let dns = Dns::start();
    let (port, b) = backends_at_one_port(&["A", "B"]);
    let name = "ttl.test";
    // Records with TTL 1 s, refresh one hour: the TTL decides.
    dns.set_a(name, &[lo(1), lo(2)]);
    let r = start_lb_refresh(
        "disc-ttl",
        &dns,
        "[passive]\nslow_start = \"0s\"",
        &format!("[[backend]]\nurl = \"http://{name}:{port}\"\n"),
        "1h",
    );
    dns.set_a(name, &[lo(1)]);
    until(&r, |_, _| spread(&r, 10).get("200 A") == Some(&10))
        .expect("the TTL, not refresh, set when to ask again");
    let before = b[1].hits();
    assert_eq!(spread(&r, 10).get("200 A"), Some(&10));
    assert_eq!(b[1].hits(), before);
}

/// Waits (bounded) until `lb_discovery_errors_total{name}` passes `n`.
fn wait_errors(r: &Running, name: &str, n: u64) -> u64 {
    let t0 = Instant::now();
    while discovery_errors(r.admin, name) < n && t0.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(50));
    }
    discovery_errors(r.admin, name)
}

/// `/status` urls of the backends found under `name`.
fn urls_of_name(admin: SocketAddr, name: &str) -> Vec<String> {
    let (_, status) = procfs::admin_get(admin, "/status");
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let mut urls: Vec<String> = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == name)
        .map(|e| e["url"].as_str().unwrap().to_owned())
        .collect();
    urls.sort();
    urls
}

/// Review13b: an IPv4-only name (its AAAA query answers NOERROR with no records) whose A
/// query times out is a timeout: the last known set stays. hickory's dual-stack lookup
/// returned whichever error came first, here the AAAA "no records", and lb removed every
/// address.
#[test]
fn an_a_timeout_beside_an_empty_aaaa_answer_keeps_the_last_known_set() {
    let dns = Dns::start();
    let (port, _b) = backends_at_one_port(&["A", "B"]);
    let name = "v4only.test";
    dns.set_a(name, &[lo(1), lo(2)]);
    let url = format!("http://{name}:{port}");
    let r = start_lb(
        "disc-a-timeout",
        &dns,
        "[passive]\nslow_start = \"0s\"",
        &format!("[[backend]]\nurl = \"{url}\"\n"),
    );
    let got = spread(&r, 20);
    assert_eq!(
        (got.get("200 A"), got.get("200 B")),
        (Some(&10), Some(&10)),
        "{got:?}"
    );

    let errors = discovery_errors(r.admin, &url);
    dns.set_type_mode(RecordType::A, Some(Mode::Drop));
    let now = wait_errors(&r, &url, errors + 2);
    let got = spread(&r, 20);
    dns.set_type_mode(RecordType::A, None);
    assert_eq!(
        (got.get("200 A"), got.get("200 B")),
        (Some(&10), Some(&10)),
        "an A timeout keeps the last known set: {got:?}"
    );
    assert!(now >= errors + 2, "the A timeouts are counted");
}

/// Review13b: a name with A and AAAA records whose AAAA query fails (SERVFAIL) while its A
/// query answers keeps its IPv6 addresses: a server failure keeps the last known set.
/// hickory's dual-stack lookup dropped the failed half silently and lb removed them.
#[test]
fn an_aaaa_failure_keeps_the_ipv6_addresses() {
    let dns = Dns::start();
    let (port, _b) = backends_at_one_port(&["A", "B"]);
    let name = "dual.test";
    dns.set_a(name, &[lo(1)]);
    // An IPv4-mapped IPv6 address reaches 127.0.0.2 without an IPv6 listener.
    dns.set_aaaa(name, &["::ffff:127.0.0.2".parse().unwrap()]);
    let url = format!("http://{name}:{port}");
    let r = start_lb(
        "disc-aaaa-fail",
        &dns,
        "[passive]\nslow_start = \"0s\"",
        &format!("[[backend]]\nurl = \"{url}\"\n"),
    );
    let both = urls_of_name(r.admin, &url);
    assert_eq!(both.len(), 2, "{both:?}");

    let errors = discovery_errors(r.admin, &url);
    dns.set_type_mode(RecordType::AAAA, Some(Mode::ServFail));
    let now = wait_errors(&r, &url, errors + 2);
    let after = urls_of_name(r.admin, &url);
    dns.set_type_mode(RecordType::AAAA, None);
    assert_eq!(after, both, "an AAAA SERVFAIL keeps the IPv6 address");
    assert!(now >= errors + 2, "the AAAA failures are counted");
}

/// Review13b: an SRV entry's lowest priority present is used, whatever its number, beside a
/// static backend: Consul answers priority 1, and the static backend (priority 0 in
/// lb-core) took every request while the SRV's backends got none.
#[test]
fn an_srv_entrys_lowest_priority_is_used_beside_a_static_backend() {
    let dns = Dns::start();
    let (port, _b) = backends_at_one_port(&["A", "B"]);
    let name = "_http._tcp.prio.test";
    dns.set_srv(name, &[(1, 1, port, "t2.test", lo(2))]);
    let r = start_lb(
        "disc-srv-static",
        &dns,
        "[passive]\nslow_start = \"0s\"",
        &format!("[[backend]]\nurl = \"http://127.0.0.1:{port}\"\n[[backend]]\nsrv = \"{name}\"\n"),
    );
    let got = spread(&r, 20);
    assert_eq!(
        (got.get("200 A"), got.get("200 B")),
        (Some(&10), Some(&10)),
        "the SRV's lowest priority present shares the traffic: {got:?}"
    );
}

/// Review13b: an https SRV answer with a target a certificate cannot be verified for (a
/// last label all digits) must not take the name's other targets, or lb, down with it:
/// lb starts and serves the good target, and later changes (the admin API's, DNS's) apply.
#[test]
fn an_https_srv_target_no_certificate_can_name_does_not_poison_the_set() {
    use common::tls::{toml_path, HttpsBackend, Pki};
    let dns = Dns::start();
    let pki = Pki::new("disc-https-bad");
    let backend = HttpsBackend::start("S", &pki.leaf("backend", &["secure.test"], 11));
    let port = backend.addr.port();
    let name = "_https._tcp.sec.test";
    dns.set_srv(
        name,
        &[
            (1, 1, port, "secure.test", lo(1)),
            (1, 1, port, "node.1", lo(2)),
        ],
    );
    let c = Backend::start("C");
    let r = start_lb(
        "disc-https-bad",
        &dns,
        &format!(
            "admin_token = \"t0ken\"\n[tls]\nupstream_ca = {}",
            toml_path(&pki.ca_pem)
        ),
        &format!("[[backend]]\nsrv = \"{name}\"\nscheme = \"https\"\n"),
    );
    until(&r, |code, body| code == 200 && body == "S").expect("the good target serves");
    let (code, body) = admin_call(
        r.admin,
        "POST",
        "/backends",
        &format!(r#"{{"url": "http://{}", "weight": 1}}"#, c.addr),
    );
    assert_eq!(code, 201, "an admin change still applies: {body}");
}
