//! Hostile HTTP/2 clients against the real `lb` binary (h2c by prior knowledge), in front of
//! a backend that records the exact bytes it receives.
//!
//! * The downgrade corpus: what HTTP/2 lets a client write but an HTTP/1.1 backend would read
//!   its own way (CR/LF/NUL in values, uppercase names, pseudo-header misuse, lengths that
//!   disagree with the DATA, connection-specific fields, `host` against `:authority`, cookie
//!   crumbs, `_` look-alikes). Each case asserts what the client got (status or RST_STREAM
//!   code) and the exact request the backend read, or that nothing reached it.
//! * Resource attacks (rapid reset, CONTINUATION flood, HPACK bomb, SETTINGS and PING floods,
//!   a client granting no window): each bounded, each while a good HTTP/1.1 client and a good
//!   HTTP/2 client keep being served, with lb's RSS sampled throughout.
//!
//! With `LB_RELIABILITY=long` the attacks run longer; every test prints one
//! `RELIABILITY {json}` line with its figures (the `xtask reliability` orchestrator collects
//! them).

mod common;

use common::h2raw::*;
use serde_json::json;
use std::time::{Duration, Instant};

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// What the client must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Status(u16),
    /// Malformed (RFC 9113 §8.1.1): a stream error of type PROTOCOL_ERROR, or (h2 does this
    /// for fields its decoder refuses) the same as a connection error, GOAWAY.
    Refused,
}

/// What the backend must read.
#[derive(Debug, Clone)]
enum Forwarded {
    Nothing,
    /// One whole request: its request line, its header lines (any order) and its body.
    Exactly(&'static str, Vec<String>, &'static [u8]),
}

struct Case {
    name: &'static str,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
    /// Sent in one DATA frame with END_STREAM after the HEADERS (which then lack it).
    data: Option<&'static [u8]>,
    want: Want,
    forwarded: Forwarded,
}

fn f(name: &str, value: &str) -> (Vec<u8>, Vec<u8>) {
    (name.as_bytes().to_vec(), value.as_bytes().to_vec())
}

fn fb(name: &[u8], value: &[u8]) -> (Vec<u8>, Vec<u8>) {
    (name.to_vec(), value.to_vec())
}

/// The header lines lb adds for a client on 127.0.0.1 asking for `host`, with `others`.
fn lines(host: &str, others: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        format!("host: {host}"),
        "x-forwarded-for: 127.0.0.1".to_owned(),
        "x-forwarded-proto: http".to_owned(),
        format!("x-forwarded-host: {host}"),
    ];
    v.extend(others.iter().map(|s| (*s).to_owned()));
    v.sort();
    v
}

/// A GET to `/c` marked with `x-case: name`, with `extra` fields after the pseudo-headers.
fn get_case(name: &str, extra: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut v = get_fields("/c");
    v.push(f("x-case", name));
    v.extend(extra);
    v
}

fn post_case(name: &str, extra: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut v = get_case(name, extra);
    v[0] = f(":method", "POST");
    v
}

fn refused(name: &'static str, fields: Vec<(Vec<u8>, Vec<u8>)>) -> Case {
    Case {
        name,
        fields,
        data: None,
        want: Want::Refused,
        forwarded: Forwarded::Nothing,
    }
}

fn corpus() -> Vec<Case> {
    let marker = |name: &str| format!("x-case: {name}");
    let ok_get = |name: &'static str, extra, host: &str, others: &[&str]| {
        let mut o: Vec<String> = others.iter().map(|s| (*s).to_owned()).collect();
        o.push(marker(name));
        let o: Vec<&str> = o.iter().map(String::as_str).collect();
        Case {
            name,
            fields: get_case(name, extra),
            data: None,
            want: Want::Status(200),
            forwarded: Forwarded::Exactly("GET /c HTTP/1.1", lines(host, &o), b""),
        }
    };
    let mut cases = vec![
        // The control: a plain request goes through as expected.
        ok_get("plain", vec![], "a.example", &[]),
        // Bytes an HTTP/1.1 backend would read as the end of a field or of the head.
        refused(
            "cr-in-value",
            get_case("cr-in-value", vec![f("x-a", "1\rx-b: 2")]),
        ),
        refused(
            "lf-in-value",
            get_case("lf-in-value", vec![f("x-a", "1\nx-b: 2")]),
        ),
        refused(
            "crlf-in-value",
            get_case(
                "crlf-in-value",
                vec![f("x-a", "1\r\nContent-Length: 5\r\n\r\nhello")],
            ),
        ),
        refused(
            "nul-in-value",
            get_case("nul-in-value", vec![fb(b"x-a", b"1\0")]),
        ),
        refused(
            "del-in-value",
            get_case("del-in-value", vec![fb(b"x-a", b"1\x7f")]),
        ),
        refused(
            "crlf-in-name",
            get_case("crlf-in-name", vec![f("x-a\r\nx-b", "1")]),
        ),
        refused(
            "colon-in-name",
            get_case("colon-in-name", vec![f("x-a:b", "1")]),
        ),
        refused(
            "space-in-name",
            get_case("space-in-name", vec![f("x-a b", "1")]),
        ),
        refused("crlf-in-path", {
            let mut v = get_case("crlf-in-path", vec![]);
            v[3] = f(":path", "/c HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /x");
            v
        }),
        // Uppercase names are malformed in HTTP/2 (RFC 9113 §8.2.1).
        refused(
            "uppercase-name",
            get_case("uppercase-name", vec![f("X-Upper", "1")]),
        ),
        refused(
            "uppercase-host",
            get_case("uppercase-host", vec![f("Host", "b.example")]),
        ),
        // Pseudo-header misuse (RFC 9113 §8.3).
        refused("duplicate-path", {
            let mut v = get_case("duplicate-path", vec![]);
            v.insert(4, f(":path", "/other"));
            v
        }),
        refused("duplicate-method", {
            let mut v = get_case("duplicate-method", vec![]);
            v.insert(1, f(":method", "POST"));
            v
        }),
        refused("pseudo-after-regular", {
            let mut v = get_fields("/c");
            let path = v.pop().unwrap();
            v.push(f("x-case", "pseudo-after-regular"));
            v.push(path);
            v
        }),
        refused("missing-path", {
            let mut v = get_case("missing-path", vec![]);
            v.remove(3);
            v
        }),
        refused("empty-path", {
            let mut v = get_case("empty-path", vec![]);
            v[3] = f(":path", "");
            v
        }),
        refused("missing-method", {
            let mut v = get_case("missing-method", vec![]);
            v.remove(0);
            v
        }),
        refused("missing-scheme", {
            let mut v = get_case("missing-scheme", vec![]);
            v.remove(1);
            v
        }),
        refused(
            "unknown-pseudo",
            get_case("unknown-pseudo", vec![f(":foo", "1")]),
        ),
        refused("status-in-request", {
            let mut v = get_case("status-in-request", vec![]);
            v.insert(4, f(":status", "200"));
            v
        }),
        // Connection-specific fields are malformed in HTTP/2 (RFC 9113 §8.2.2).
        refused(
            "connection",
            get_case("connection", vec![f("connection", "keep-alive")]),
        ),
        refused(
            "keep-alive",
            get_case("keep-alive", vec![f("keep-alive", "timeout=5")]),
        ),
        refused(
            "proxy-connection",
            get_case(
                "proxy-connection",
                vec![f("proxy-connection", "keep-alive")],
            ),
        ),
        refused(
            "transfer-encoding",
            get_case("transfer-encoding", vec![f("transfer-encoding", "chunked")]),
        ),
        refused(
            "upgrade",
            get_case("upgrade", vec![f("upgrade", "websocket")]),
        ),
        refused("te-gzip", get_case("te-gzip", vec![f("te", "gzip")])),
        // `te: trailers` is allowed, and is hop-by-hop: not forwarded.
        ok_get("te-trailers", vec![f("te", "trailers")], "a.example", &[]),
        // `:authority` wins over `host` (RFC 9113 §8.3.1); `host` alone is the host.
        ok_get(
            "host-and-authority",
            vec![f("host", "decoy.example")],
            "a.example",
            &[],
        ),
        {
            let mut v = get_case("host-alone", vec![f("host", "h.example")]);
            v.remove(2);
            Case {
                name: "host-alone",
                fields: v,
                data: None,
                want: Want::Status(200),
                forwarded: Forwarded::Exactly(
                    "GET /c HTTP/1.1",
                    lines("h.example", &["x-case: host-alone"]),
                    b"",
                ),
            }
        },
        {
            let mut v = get_case("no-host-at-all", vec![]);
            v.remove(2);
            Case {
                name: "no-host-at-all",
                fields: v,
                data: None,
                want: Want::Status(400),
                forwarded: Forwarded::Nothing,
            }
        },
        Case {
            name: "authority-with-userinfo",
            fields: {
                let mut v = get_case("authority-with-userinfo", vec![]);
                v[2] = f(":authority", "user:pw@a.example");
                v
            },
            data: None,
            want: Want::Status(400),
            forwarded: Forwarded::Nothing,
        },
        // Cookie crumbs become one field for HTTP/1.1 (RFC 9113 §8.2.3).
        ok_get(
            "cookie-crumbs",
            vec![f("cookie", "a=1"), f("cookie", "b=2"), f("cookie", "c=3")],
            "a.example",
            &["cookie: a=1; b=2; c=3"],
        ),
        // Names that read, `_` as `-`, as framing or forwarding fields are dropped; others kept.
        ok_get(
            "underscore-aliases",
            vec![
                f("content_length", "50"),
                f("transfer_encoding", "chunked"),
                f("x_forwarded_for", "6.6.6.6"),
                f("x_forwarded_host", "evil.example"),
                f("x-forwarded_proto", "https"),
                f("x_other_thing", "kept"),
            ],
            "a.example",
            &["x_other_thing: kept"],
        ),
        // Surrounding whitespace: malformed (RFC 9113 §8.2.1), and read differently by
        // HTTP/1.1 parsers.
        Case {
            name: "padded-value",
            fields: get_case("padded-value", vec![f("x-a", " 1")]),
            data: None,
            want: Want::Status(400),
            forwarded: Forwarded::Nothing,
        },
        Case {
            name: "connect",
            fields: vec![
                f(":method", "CONNECT"),
                f(":authority", "a.example:443"),
                f("x-case", "connect"),
            ],
            data: None,
            want: Want::Status(405),
            forwarded: Forwarded::Nothing,
        },
        // Bodies: the length, when given, is the one the DATA has (RFC 9113 §8.1.1).
        Case {
            name: "body-with-length",
            fields: post_case("body-with-length", vec![f("content-length", "5")]),
            data: Some(b"hello"),
            want: Want::Status(200),
            forwarded: Forwarded::Exactly(
                "POST /c HTTP/1.1",
                lines(
                    "a.example",
                    &["x-case: body-with-length", "content-length: 5"],
                ),
                b"hello",
            ),
        },
        Case {
            name: "body-without-length",
            fields: post_case("body-without-length", vec![]),
            data: Some(b"hello"),
            want: Want::Status(200),
            forwarded: Forwarded::Exactly(
                "POST /c HTTP/1.1",
                lines(
                    "a.example",
                    &["x-case: body-without-length", "transfer-encoding: chunked"],
                ),
                b"5\r\nhello\r\n0\r\n\r\n",
            ),
        },
        Case {
            name: "length-more-than-data",
            fields: post_case("length-more-than-data", vec![f("content-length", "10")]),
            data: Some(b"hello"),
            want: Want::Refused,
            forwarded: Forwarded::Nothing,
        },
        Case {
            name: "length-less-than-data",
            fields: post_case("length-less-than-data", vec![f("content-length", "2")]),
            data: Some(b"hello"),
            want: Want::Refused,
            forwarded: Forwarded::Nothing,
        },
        Case {
            name: "length-with-no-data",
            fields: post_case("length-with-no-data", vec![f("content-length", "5")]),
            data: Some(b""),
            want: Want::Refused,
            forwarded: Forwarded::Nothing,
        },
        Case {
            name: "lengths-differ",
            fields: post_case(
                "lengths-differ",
                vec![f("content-length", "5"), f("content-length", "50")],
            ),
            data: Some(b"hello"),
            want: Want::Refused,
            forwarded: Forwarded::Nothing,
        },
        Case {
            name: "length-not-a-number",
            fields: post_case("length-not-a-number", vec![f("content-length", "5, 5")]),
            data: Some(b"hello"),
            want: Want::Refused,
            forwarded: Forwarded::Nothing,
        },
    ];
    cases.shrink_to_fit();
    cases
}

/// The requests the backend read that carry `x-case: name`.
fn forwarded_for(backend: &RecordingBackend, name: &str) -> Vec<Received> {
    let marker = format!("\r\nx-case: {name}\r\n");
    backend
        .received()
        .into_iter()
        .filter(|r| r.text().contains(&marker))
        .collect()
}

fn run_case(lb: &LbH2, case: &Case) -> Outcome {
    let mut c = RawH2::connect(lb.addr, &[]);
    c.headers(1, &case.fields, case.data.is_none());
    if let Some(data) = case.data {
        let _ = c.send(&frame(DATA, END_STREAM, 1, data));
    }
    c.outcome(1)
}

#[test]
fn downgrade_corpus_exact_bytes_forwarded() {
    let backend = RecordingBackend::start(OK);
    let lb = LbH2::start("h2-corpus", &[backend.url()], "");
    let cases = corpus();
    let mut failures: Vec<(&str, String)> = Vec::new();
    for case in &cases {
        let got = run_case(&lb, case);
        let as_wanted = match case.want {
            Want::Status(s) => got.status() == Some(s),
            Want::Refused => {
                matches!(
                    got,
                    Outcome::Reset(PROTOCOL_ERROR) | Outcome::GoAway(PROTOCOL_ERROR)
                )
            }
        };
        if !as_wanted {
            failures.push((
                case.name,
                format!("client got {got:?}, want {:?}", case.want),
            ));
        }
    }
    // A request lb forwarded arrives before lb answers it; for the refused ones, the last
    // answer of all is a fence: a request forwarded late would have reached the backend by
    // the time a request sent after it on another connection was answered.
    let fence = run_case(
        &lb,
        &Case {
            name: "fence",
            fields: get_case("fence", vec![]),
            data: None,
            want: Want::Status(200),
            forwarded: Forwarded::Nothing,
        },
    );
    assert_eq!(fence.status(), Some(200));
    for case in &cases {
        let got = forwarded_for(&backend, case.name);
        match &case.forwarded {
            Forwarded::Nothing => {
                if !got.is_empty() {
                    failures.push((
                        case.name,
                        format!(
                            "nothing may reach the backend, it read {:?}",
                            got.iter().map(Received::text).collect::<Vec<_>>()
                        ),
                    ));
                }
            }
            Forwarded::Exactly(line, headers, body) => {
                let ok = got.len() == 1 && {
                    let r = &got[0];
                    let (l, h) = r.head();
                    r.complete
                        && l == *line
                        && h == *headers
                        && r.body() == *body
                        // Every line ends in CRLF: no bare CR or LF hides in a field.
                        && r.text().split("\r\n").all(|l| !l.contains(['\r', '\n']))
                };
                if !ok {
                    failures.push((
                        case.name,
                        format!(
                            "backend read {:?}, want {line:?} {headers:?} {:?}",
                            got.iter().map(Received::text).collect::<Vec<_>>(),
                            String::from_utf8_lossy(body)
                        ),
                    ));
                }
            }
        }
    }
    // Refused requests are not charged to the backend: every attempt is one it received.
    let (attempts, read) = (lb.requests_total(), backend.count());
    if attempts != read as u64 {
        failures.push((
            "lb_requests_total",
            format!("{attempts} attempts counted, the backend read {read} requests"),
        ));
    }
    let failed: std::collections::BTreeSet<&str> = failures.iter().map(|(n, _)| *n).collect();
    let passed = cases.len() - failed.len();
    report(json!({
        "section": "hostile_h2",
        "case": "corpus",
        "cases": cases.len(),
        "passed": passed,
    }));
    let listed: Vec<String> = failures.iter().map(|(n, w)| format!("{n}: {w}")).collect();
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failed.len(),
        listed.join("\n")
    );
}

// --- Resource attacks.

/// lb's `[timeouts]` for the attacks: a short `idle`, so that a stalled client is cut off
/// (the send timeout and the HTTP/2 stall rule are both `idle`) within a test's bounds.
const ATTACK_TIMEOUTS: &str = "[timeouts]\nidle = \"2s\"\n";

/// How far above its size before the attack lb's RSS may go during one: generous (a debug
/// build, allocator slack), and far below what an unbounded buffer would reach.
const RSS_HEADROOM_KIB: u64 = 96 * 1024;

/// Runs `attack` against a fresh lb while the good clients are served, then checks that
/// every good request succeeded, that lb is alive and within its memory bound, and prints
/// the figures (`attack` returns its own, which may say more about what it asserts).
fn under_attack(
    case: &str,
    big: Option<&'static [u8]>,
    attack_headroom_kib: u64,
    attack: impl FnOnce(&LbH2, &RecordingBackend) -> serde_json::Value,
) {
    let backend = RecordingBackend::start_with_big(OK, big);
    let mut lb = LbH2::start(&format!("h2-{case}"), &[backend.url()], ATTACK_TIMEOUTS);
    let good = GoodClients::start(lb.addr);
    good.attack_starts(if long() { 200 } else { 20 });
    let rss_before = lb.rss_kib();
    let rss = RssWatch::start(lb.pid());
    let mut figures = attack(&lb, &backend);
    // Served after the attack too, not only beside it.
    good.served_more(10);
    let rss_max = rss.max_kib();
    let stats = good.stop();
    lb.assert_alive();
    let fig = figures.as_object_mut().unwrap();
    fig.insert("section".into(), json!("hostile_h2"));
    fig.insert("case".into(), json!(case));
    fig.insert("good_requests".into(), json!(stats.during_ms.len()));
    fig.insert("good_failed".into(), json!(stats.failures.len()));
    fig.insert("good_p50_ms".into(), json!(round(stats.p50())));
    fig.insert("good_p99_ms".into(), json!(round(stats.p99())));
    fig.insert("baseline_p99_ms".into(), json!(round(stats.baseline_p99())));
    fig.insert("lb_rss_kib_before".into(), json!(rss_before));
    fig.insert("lb_rss_kib_max".into(), json!(rss_max));
    report(figures);
    assert!(
        stats.failures.is_empty(),
        "good clients failed during {case}: {:?}",
        stats.failures
    );
    assert!(
        rss_max <= rss_before + RSS_HEADROOM_KIB + attack_headroom_kib,
        "{case}: lb's RSS grew from {rss_before} KiB to {rss_max} KiB"
    );
}

fn round(ms: f64) -> f64 {
    (ms * 100.0).round() / 100.0
}

/// The fields of a GET to `path` (stream ids of an attack need no marker).
fn req(path: &str) -> Vec<u8> {
    block(&get_fields(path))
}

/// HEADERS then RST_STREAM(CANCEL) on a new stream, again and again, reconnecting whenever
/// lb says GOAWAY. lb must not open an upstream request per reset stream (CVE-2023-44487).
///
/// Then the paced variant: each RST_STREAM sent only once lb had time to accept its stream.
/// Such a stream is a request like any other (it reaches the backend, and costs the client
/// a round of its own pacing); what matters is that each cancellation is cleaned up: no
/// in-flight count left behind, the good clients served.
#[test]
fn rapid_reset_does_not_open_an_upstream_request_per_stream() {
    let pairs: u32 = if long() { 200_000 } else { 5_000 };
    let paced: u32 = if long() { 5_000 } else { 200 };
    under_attack("rapid_reset", None, 0, |lb, backend| {
        let headers = req("/rr");
        let (mut sent, mut connections, mut goaways) = (0u32, 0u32, Vec::new());
        while sent < pairs {
            let mut c = RawH2::connect(lb.addr, &[]);
            connections += 1;
            let mut id = 1u32;
            'conn: while sent < pairs && id < 0x7fff_0000 {
                let mut batch = Vec::new();
                for _ in 0..50 {
                    batch.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &headers));
                    batch.extend(rst_stream(id, CANCEL));
                    id += 2;
                    sent += 1;
                }
                if c.send(&batch).is_err() {
                    break;
                }
                // Take what lb says without waiting: a GOAWAY ends this connection.
                while let Some(f) = c.read_frame(Duration::from_millis(1)) {
                    if f.kind == GOAWAY {
                        goaways.push(f.code().unwrap_or(u32::MAX));
                        break 'conn;
                    }
                }
                if c.closed {
                    break;
                }
            }
        }
        let upstream = settled(|| backend.count_path("/rr"));
        let total = lb.requests_total();
        let calm = goaways.iter().filter(|&&c| c == ENHANCE_YOUR_CALM).count();
        // h2 counts streams reset before they were accepted and answers more than 20 on one
        // connection with GOAWAY(ENHANCE_YOUR_CALM): the attacker pays a new connection per
        // few dozen streams, and almost none of them ever reaches the backend.
        assert!(calm >= 1, "lb never said ENHANCE_YOUR_CALM: {goaways:?}");
        assert!(
            upstream <= (sent / 10) as usize,
            "{upstream} upstream requests for {sent} reset streams"
        );

        let headers = req("/paced");
        let (mut paced_sent, mut paced_connections) = (0u32, 0u32);
        let conns_before = backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst);
        while paced_sent < paced {
            let mut c = RawH2::connect(lb.addr, &[]);
            paced_connections += 1;
            let mut id = 1u32;
            while paced_sent < paced && !c.closed {
                if c.send(&frame(HEADERS, END_HEADERS | END_STREAM, id, &headers))
                    .is_err()
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
                if c.send(&rst_stream(id, CANCEL)).is_err() {
                    break;
                }
                id += 2;
                paced_sent += 1;
                if paced_sent % 20 == 0 {
                    while let Some(f) = c.read_frame(Duration::from_millis(1)) {
                        if f.kind == GOAWAY {
                            c.closed = true;
                        }
                    }
                }
            }
        }
        let paced_upstream = settled(|| backend.count_path("/paced"));
        let upstream_connections = backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
            - conns_before;
        let deadline = Instant::now() + WAIT;
        while lb.active_requests() != 0 {
            assert!(
                Instant::now() < deadline,
                "cancelled streams left requests in flight"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "rapid reset: {sent} pairs over {connections} connections, goaways {calm} calm of {}, \
             {upstream} upstream, lb_requests_total {total}; paced: {paced_sent} over \
             {paced_connections} connections, {paced_upstream} upstream on \
             {upstream_connections} new upstream connections",
            goaways.len()
        );
        json!({
            "frames": sent * 2,
            "streams": sent,
            "connections": connections,
            "goaway_enhance_your_calm": calm,
            "upstream_requests": upstream,
            "lb_requests_total": total,
            "paced_streams": paced_sent,
            "paced_connections": paced_connections,
            "paced_upstream_requests": paced_upstream,
            "paced_upstream_connections": upstream_connections,
        })
    });
}

/// `f()` once it has stopped changing (what lb forwarded reaches the backend soon after).
fn settled(f: impl Fn() -> usize) -> usize {
    let mut last = f();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = f();
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// Writes `frames()` until lb closes the connection (a write fails or the read side ends), for
/// at most `cap` bytes; (bytes written, frames written, GOAWAY code seen).
fn flood_until_closed(
    c: &mut RawH2,
    cap: usize,
    mut next: impl FnMut() -> Vec<u8>,
) -> (usize, usize, Option<u32>) {
    let (mut bytes, mut frames, mut goaway) = (0usize, 0usize, None);
    let deadline = Instant::now() + WAIT;
    c.stream.set_write_timeout(Some(WAIT)).unwrap();
    while bytes < cap && Instant::now() < deadline {
        let mut batch = Vec::new();
        for _ in 0..16 {
            batch.extend(next());
            frames += 1;
        }
        if std::io::Write::write_all(&mut c.stream, &batch).is_err() {
            break;
        }
        bytes += batch.len();
        while let Some(f) = c.read_frame(Duration::from_millis(1)) {
            if f.kind == GOAWAY {
                goaway = goaway.or(f.code());
            }
        }
        if c.closed || goaway.is_some() {
            break;
        }
    }
    let (closed, code) = c.drain_until_closed(WAIT);
    assert!(closed, "lb kept the connection open after {bytes} bytes");
    (bytes, frames, goaway.or(code))
}

/// HEADERS without END_HEADERS, then CONTINUATION frames that never end the block: lb must
/// close the connection after a bounded header block, not buffer it (CVE-2024-27316 and
/// kin). Both full frames (the size limit) and empty ones (the count limit) are tried.
#[test]
fn continuation_flood_closes_the_connection() {
    let rounds = if long() { 50 } else { 3 };
    under_attack("continuation_flood", None, 0, |lb, backend| {
        let filler = hpack_literal(&[(b"x-filler", &[b'a'; 1000])]);
        let (mut max_bytes, mut max_frames) = (0, 0);
        let mut codes = std::collections::BTreeMap::new();
        for round in 0..rounds {
            for empty in [false, true] {
                let mut c = RawH2::connect(lb.addr, &[]);
                let _ = c.send(&frame(HEADERS, END_STREAM, 1, &req("/flood")));
                let payload = if empty { Vec::new() } else { filler.repeat(16) };
                let (bytes, frames, code) =
                    flood_until_closed(&mut c, 256 << 20, || frame(CONTINUATION, 0, 1, &payload));
                // Whatever the kernel buffers aside, lb stopped within a few header lists.
                assert!(
                    bytes < 32 << 20,
                    "round {round} (empty: {empty}): {bytes} bytes taken before closing"
                );
                max_bytes = max_bytes.max(bytes);
                max_frames = max_frames.max(frames);
                *codes.entry(format!("{code:?}")).or_insert(0u32) += 1;
            }
        }
        assert_eq!(backend.count_path("/flood"), 0, "nothing forwarded");
        eprintln!("continuation flood: GOAWAY codes {codes:?}, max {max_bytes} bytes");
        json!({
            "connections": rounds * 2,
            "max_bytes_before_close": max_bytes,
            "max_frames_before_close": max_frames,
            "goaway_codes": codes,
            "upstream_requests": backend.count_path("/flood"),
        })
    });
}

/// One large field inserted into lb's HPACK table, then referenced by one-byte indexes
/// thousands of times per header block (each block decodes to megabytes): the header list
/// limit must hold while decoding, each such request refused (431 or a stream or
/// connection error), nothing forwarded, memory flat.
#[test]
fn hpack_bomb_is_bounded() {
    let streams: u32 = if long() { 2_000 } else { 60 };
    under_attack("hpack_bomb", None, 0, |lb, backend| {
        let big = vec![b'b'; 4000];
        // First the limit itself (`limits.max_header_bytes`, 32768, which lb announces as
        // SETTINGS_MAX_HEADER_LIST_SIZE): 7 references (7 x 4038 bytes as RFC 9113 counts
        // them) are within it and forwarded whole, 9 are beyond it and refused.
        {
            let mut c = RawH2::connect(lb.addr, &[]);
            let mut first = req("/bomb-insert");
            first.push(0x40);
            hpack_str(&mut first, b"x-bomb");
            hpack_str(&mut first, &big);
            let _ = c.send(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &first));
            assert_eq!(c.outcome(1).status(), Some(200));
            let mut under = req("/bomb-under");
            under.extend([0x80 | 62; 7]);
            let _ = c.send(&frame(HEADERS, END_HEADERS | END_STREAM, 3, &under));
            assert_eq!(c.outcome(3).status(), Some(200));
            let mut over = req("/bomb-over");
            over.extend([0x80 | 62; 9]);
            let _ = c.send(&frame(HEADERS, END_HEADERS | END_STREAM, 5, &over));
            let got = c.outcome(5);
            eprintln!("over the limit: {got:?}");
            assert_eq!(got.status(), Some(431), "over the header list limit");
        }
        let forwarded = backend.received();
        let under: Vec<&Received> = forwarded
            .iter()
            .filter(|r| r.text().starts_with("GET /bomb-under "))
            .collect();
        assert_eq!(under.len(), 1);
        let field = format!("x-bomb: {}", "b".repeat(4000));
        let fields = under[0]
            .text()
            .split("\r\n")
            .filter(|l| *l == field)
            .count();
        assert_eq!(fields, 7, "the 7 fields forwarded as sent");
        assert_eq!(backend.count_path("/bomb-over"), 0);
        let (mut outcomes, mut connections) = (std::collections::BTreeMap::new(), 0);
        let mut sent = 0u32;
        let mut decoded_bytes: u64 = 0;
        while sent < streams {
            let mut c = RawH2::connect(lb.addr, &[]);
            connections += 1;
            // Stream 1 inserts `x-bomb: bbbb...` (4 KB, which the table's 4096 bytes hold).
            let mut first = req("/bomb-insert");
            first.push(0x40);
            hpack_str(&mut first, b"x-bomb");
            hpack_str(&mut first, &big);
            let _ = c.send(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &first));
            let inserted = c.outcome(1);
            let mut id = 3;
            while sent < streams && !c.closed {
                // 16,000 references to index 62 (the newest entry): 64 MB decoded.
                let mut bomb = req("/bomb");
                bomb.extend(std::iter::repeat_n(0x80 | 62, 16_000));
                if c.send(&frame(HEADERS, END_HEADERS | END_STREAM, id, &bomb))
                    .is_err()
                {
                    break;
                }
                sent += 1;
                decoded_bytes += 16_000 * 4038;
                let got = c.outcome(id);
                let key = format!("{got:?}").chars().take(40).collect::<String>();
                *outcomes.entry(key).or_insert(0u32) += 1;
                let refused = matches!(got, Outcome::Response(431, _) | Outcome::Reset(_))
                    || matches!(got, Outcome::GoAway(_) | Outcome::Closed);
                assert!(
                    refused,
                    "a bomb was answered {got:?} (insert: {inserted:?})"
                );
                if matches!(got, Outcome::GoAway(_) | Outcome::Closed) {
                    break;
                }
                id += 2;
            }
        }
        assert_eq!(backend.count_path("/bomb"), 0, "no bomb forwarded");
        eprintln!("hpack bomb: {sent} blocks over {connections} connections: {outcomes:?}");
        json!({
            "streams": sent,
            "connections": connections,
            "decoded_bytes_asked": decoded_bytes,
            "outcomes": outcomes,
            "upstream_requests": backend.count_path("/bomb"),
        })
    });
}

/// Frames lb must acknowledge, sent by a client that never reads: lb must not queue an
/// acknowledgement per frame (h2 holds one and stops reading until it is written), and the
/// connection is reset once lb's writes make no progress for `idle`.
fn ack_flood(case: &str, mut next: impl FnMut(u64) -> Vec<u8>) {
    let connections = if long() { 20 } else { 2 };
    under_attack(case, None, 0, |lb, _| {
        let (mut max_bytes, mut max_frames) = (0usize, 0u64);
        for _ in 0..connections {
            let mut c = RawH2::connect(lb.addr, &[]);
            c.stream
                .set_write_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let deadline = Instant::now() + WAIT;
            let (mut bytes, mut frames, mut reset) = (0usize, 0u64, false);
            while Instant::now() < deadline {
                let mut batch = Vec::new();
                for _ in 0..64 {
                    batch.extend(next(frames));
                    frames += 1;
                }
                // Never reading: once both sides' buffers are full, writes stop going
                // through, until lb resets the connection and a write fails outright.
                match std::io::Write::write(&mut c.stream, &batch) {
                    Ok(n) => bytes += n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => {
                        reset = true;
                        break;
                    }
                }
            }
            assert!(
                reset,
                "{case}: lb kept a connection that never reads ({bytes} bytes in)"
            );
            max_bytes = max_bytes.max(bytes);
            max_frames = max_frames.max(frames);
        }
        json!({
            "connections": connections,
            "frames": max_frames,
            "max_bytes_before_reset": max_bytes,
        })
    });
}

#[test]
fn settings_flood_from_a_client_that_never_reads_is_cut_off() {
    ack_flood("settings_flood", |i| {
        settings(&[(SETTINGS_INITIAL_WINDOW_SIZE, 65_535 + (i % 2) as u32)])
    });
}

#[test]
fn ping_flood_from_a_client_that_never_reads_is_cut_off() {
    ack_flood("ping_flood", |i| frame(PING, 0, 0, &i.to_be_bytes()));
}

/// Clients asking for a large response and never taking it: with no flow-control window
/// (they read the socket, but grant nothing), and with a window but never reading the
/// socket. lb must not buffer the responses, and must close both kinds after `idle`.
#[test]
fn clients_that_never_take_a_large_response_are_cut_off() {
    // Larger than all lb could hold for the clients below within its memory bound: a proxy
    // buffering responses for clients that do not take them would exceed it.
    let body_len = 32 << 20;
    let big: &'static [u8] = {
        let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {body_len}\r\n\r\n").into_bytes();
        r.resize(r.len() + body_len, b'z');
        Box::leak(r.into_boxed_slice())
    };
    let per_kind = if long() { 50 } else { 8 };
    // Each stalled response may hold buffers (h2's send buffer, the upstream read buffer,
    // sockets), a few hundred KiB: 3 MiB each is generous, and a tenth of the response.
    let allowance = 2 * per_kind as u64 * 3 * 1024;
    under_attack("never_reads", Some(big), allowance, |lb, backend| {
        let mut zero = Vec::new();
        let mut blocked = Vec::new();
        for i in 0..per_kind {
            // Window 0: HEADERS can come, DATA cannot.
            let mut c = RawH2::connect(lb.addr, &[(SETTINGS_INITIAL_WINDOW_SIZE, 0)]);
            c.headers(1, &get_fields(&format!("/big/zero/{i}")), true);
            zero.push(c);
            // A window as large as the response, and a socket never read.
            let mut c = RawH2::connect(lb.addr, &[(SETTINGS_INITIAL_WINDOW_SIZE, 0x7fff_ffff)]);
            let _ = c.send(&window_update(0, 0x7fff_0000));
            c.headers(1, &get_fields(&format!("/big/blocked/{i}")), true);
            blocked.push(c);
        }
        // Every request reached the backend, whose answer lb is now holding.
        let deadline = Instant::now() + WAIT;
        while backend.count_path_prefix("/big/") < 2 * per_kind {
            assert!(
                Instant::now() < deadline,
                "the large requests were not forwarded"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut zero_data = 0;
        for c in &mut zero {
            // Reading all the while: lb closes (the HTTP/2 stall rule) after `idle`.
            let (closed, _) = c.drain_until_closed(WAIT);
            assert!(closed, "a client granting no window kept its connection");
            zero_data += c.seen.iter().filter(|f| f.kind == DATA).count();
        }
        for c in &mut blocked {
            // Never read: writes fail once lb reset the connection (its send timeout).
            let deadline = Instant::now() + WAIT;
            let mut reset = false;
            while Instant::now() < deadline {
                if c.send(&frame(PING, 0, 0, &[0; 8])).is_err() {
                    reset = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(reset, "a client that never reads kept its connection");
        }
        json!({
            "zero_window_connections": per_kind,
            "never_reading_connections": per_kind,
            "response_bytes_each": body_len,
            "zero_window_data_frames": zero_data,
        })
    });
}

/// PING and SETTINGS floods from a client that does read the acknowledgements: nothing
/// holds such a client up, so lb counts these frames and closes a connection that sends far
/// more than keep-alive needs (a burst of 1000, then 100 a second: lb-proxy's `flood`);
/// else one client keeps a worker busy for as long as it likes.
#[test]
fn control_floods_from_a_client_that_reads_are_cut_off() {
    let connections = if long() { 20 } else { 2 };
    under_attack("control_flood_reading", None, 0, |lb, _| {
        let (mut max_sent, mut max_acked, mut closed) = (0u64, 0usize, 0);
        for i in 0..connections {
            let mut c = RawH2::connect(lb.addr, &[]);
            let mut reader = c.stream.try_clone().unwrap();
            let acks = std::thread::spawn(move || {
                // Reads until the connection ends: the acknowledgements, 9 + 8 (PING) or 9
                // (SETTINGS) bytes each, are counted as bytes.
                let mut total = 0usize;
                let mut buf = vec![0u8; 1 << 16];
                reader.set_read_timeout(Some(WAIT)).unwrap();
                while let Ok(n @ 1..) = std::io::Read::read(&mut reader, &mut buf) {
                    total += n;
                }
                total
            });
            let mut batch = Vec::new();
            for j in 0..256u64 {
                if i % 2 == 0 {
                    batch.extend(frame(PING, 0, 0, &j.to_be_bytes()));
                } else {
                    batch.extend(settings(&[(SETTINGS_HEADER_TABLE_SIZE, 4096)]));
                }
            }
            let deadline = Instant::now() + WAIT;
            let mut sent = 0u64;
            while Instant::now() < deadline {
                if c.send(&batch).is_err() {
                    closed += 1;
                    break;
                }
                sent += 256;
            }
            let acked = acks.join().unwrap();
            assert!(
                Instant::now() < deadline,
                "a control flood was never cut off"
            );
            // The burst and what refilled meanwhile; the rest of what the client sent was
            // never taken from the socket (what the kernel buffered aside).
            assert!(acked <= 17 * 3_000, "{acked} bytes of acknowledgements");
            max_sent = max_sent.max(sent);
            max_acked = max_acked.max(acked);
        }
        json!({
            "connections": connections,
            "closed": closed,
            "max_frames_sent": max_sent,
            "max_ack_bytes_read": max_acked,
        })
    });
}
