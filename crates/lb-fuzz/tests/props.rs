//! Each fuzz target driven by proptest: random bytes, and structured inputs that reach
//! deeper than random bytes would in a bounded run. Case counts are bounded so that the
//! whole file runs in well under a minute in a debug build on a busy machine.

use lb_fuzz::core::{self as core_target, Input, Member, Op, OutcomeKind, Setup};
use proptest::prelude::*;

/// `n` cases, or `PROPTEST_CASES` for a longer run.
fn cases(n: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(n);
    ProptestConfig {
        cases,
        // A failure is shrunk, but not for ever.
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    }
}

// --- core_events ---

fn setup() -> impl Strategy<Value = Setup> {
    (
        any::<[u8; 10]>(),
        any::<u16>(),
        any::<u16>(),
        1u16..2_000,
        any::<u64>(),
        prop::collection::vec(member(), 1..6),
    )
        .prop_map(
            |(b, ejection_ms, slow_start_ms, attempt_timeout_ms, seed, initial)| Setup {
                strategy: b[0],
                attempts: b[1],
                budget_percent: b[2],
                min_retries_per_second: b[3],
                consecutive_failures: b[4],
                ejection_ms: ejection_ms % 30_000,
                max_ejection_factor: b[5],
                max_ejected_percent: b[6],
                panic_threshold_percent: b[7],
                slow_start_ms: slow_start_ms % 20_000,
                rise: b[8],
                fall: b[9],
                backoff_ms: 10,
                attempt_timeout_ms,
                seed,
                initial,
            },
        )
}

fn member() -> impl Strategy<Value = Member> {
    (any::<u8>(), any::<u8>()).prop_map(|(addr, weight)| Member { addr, weight })
}

fn outcome_kind() -> impl Strategy<Value = OutcomeKind> {
    prop_oneof![
        3 => any::<u8>().prop_map(OutcomeKind::Response),
        3 => Just(OutcomeKind::ConnectRefused),
        1 => Just(OutcomeKind::ConnectTimeout),
        1 => Just(OutcomeKind::Stale),
        2 => Just(OutcomeKind::Reset),
        1 => Just(OutcomeKind::TimedOut),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<bool>(), any::<bool>(), any::<Option<u16>>(), prop::option::weighted(0.2, 0u16..3_000))
            .prop_map(|(idempotent, replayable, key, deadline_ms)| Op::Start { idempotent, replayable, key, deadline_ms }),
        8 => (any::<u8>(), outcome_kind()).prop_map(|(req, outcome)| Op::Outcome { req, outcome }),
        1 => (any::<u8>(), any::<bool>()).prop_map(|(req, reset)| Op::Resend { req, reset }),
        2 => (any::<u8>(), prop_oneof![Just(lb_fuzz::core::CompletionKind::Done), Just(lb_fuzz::core::CompletionKind::BackendFailed), Just(lb_fuzz::core::CompletionKind::ClientGone)])
            .prop_map(|(req, completion)| Op::Finish { req, completion }),
        1 => any::<u8>().prop_map(|req| Op::Abandon { req }),
        1 => any::<u8>().prop_map(|req| Op::Drop { req }),
        2 => (any::<u8>(), any::<bool>()).prop_map(|(backend, ok)| Op::Probe { backend, ok }),
        1 => prop::collection::vec(member(), 0..6).prop_map(Op::SetBackends),
        1 => prop::collection::vec(member(), 2..6).prop_map(Op::SetBackends),
        3 => (0u16..2_000).prop_map(Op::Advance),
        1 => (0u8..3).prop_map(Op::Jump),
        1 => Just(Op::Timeout),
        2 => Just(Op::Fire),
    ]
}

proptest! {
    #![proptest_config(cases(64))]

    /// Random bytes, as a fuzzer without a corpus would start.
    #[test]
    fn core_events_random_bytes(data in prop::collection::vec(any::<u8>(), 0..2_048)) {
        core_target::core_events(&data);
    }

    /// Structured sequences: every kind of event, weighted towards requests and outcomes.
    #[test]
    fn core_events_structured(setup in setup(), ops in prop::collection::vec(op(), 1..250)) {
        core_target::run(&Input { setup, ops });
    }
}

// --- config ---

/// Values of one kind, mostly valid, some not.
fn value_of(kind: char) -> BoxedStrategy<String> {
    let pool: Vec<&'static str> = match kind {
        'd' => vec![
            "\"10ms\"",
            "\"0s\"",
            "\"0\"",
            "\"2s\"",
            "\"1m\"",
            "\"5m\"",
            "\"250ms\"",
            "\"1h\"",
            "\"soon\"",
            "\"1e9s\"",
            "\"18446744073709551615s\"",
            "\"-1s\"",
            "\"1 s\"",
            "\"\"",
        ],
        'n' => vec![
            "0",
            "1",
            "2",
            "3",
            "5",
            "10",
            "11",
            "50",
            "100",
            "101",
            "1000",
            "1001",
            "1024",
            "65536",
            "-1",
            "9223372036854775807",
            "-9223372036854775808",
            "4294967296",
        ],
        'u' => vec![
            "\"http://127.0.0.1:3031\"",
            "\"http://127.0.0.1:3032\"",
            "\"http://a:1/\"",
            "\"HTTP://A:1\"",
            "\"https://b:2\"",
            "\"ftp://c:3\"",
            "\"http://[::1]:80\"",
            "\"http://h\"",
            "\"http://h:99999\"",
            "\"http://u@h:1\"",
            "\"\"",
            "\" http://a:1 \"",
        ],
        'a' => vec![
            "\"127.0.0.1:3030\"",
            "\"[::1]:0\"",
            "\"0.0.0.0:80\"",
            "\"localhost:1\"",
            "\"bad\"",
            "\"1.2.3.4:99999\"",
        ],
        'l' => vec![
            "[\"127.0.0.1:3030\"]",
            "[\"0.0.0.0:1\", \"bad\"]",
            "[]",
            "[\"[::1]:1\", \"[::1]:1\"]",
        ],
        's' => vec![
            "\"round-robin\"",
            "\"weighted-round-robin\"",
            "\"least-connections\"",
            "\"p2c-ewma\"",
            "\"consistent-hash\"",
            "\"random\"",
            "\"nope\"",
            "\"Round-Robin\"",
        ],
        'h' => vec![
            "\"header:X-User\"",
            "\"cookie:\"",
            "\"cookie:sid\"",
            "\"client-ip\"",
            "\"path\"",
            "\"header:\"",
            "\"header:bad name\"",
            "\"other\"",
        ],
        'f' => vec!["\"text\"", "\"json\"", "\"xml\""],
        'p' => vec!["\"/healthz\"", "\"/\"", "\"\"", "\"a b\"", "\"/x?y=1\""],
        _ => vec!["\"/etc/lb/cert.pem\""],
    };
    let odd = prop::sample::select(vec![
        "true",
        "1.5",
        "{}",
        "[1, 2]",
        "1979-05-27",
        "\"2\"",
        "7",
        "\"\"\"\nmulti\n\"\"\"",
    ]);
    prop_oneof![
        8 => prop::sample::select(pool).prop_map(str::to_owned),
        1 => odd.prop_map(str::to_owned),
        1 => "[a-z0-9:/.\\[\\]@ -]{0,20}".prop_map(|s| format!("{s:?}")),
    ]
    .boxed()
}

/// Sections, each with its keys and their kinds (`d` duration, `n` number, `u` URL, `a`
/// address, `l` address list, `s` strategy, `h` hash key, `f` log format, `p` path).
const SECTIONS: [(&str, &[(&str, char)]); 8] = [
    (
        "",
        &[
            ("listen", 'l'),
            ("port", 'n'),
            ("admin", 'a'),
            ("strategy", 's'),
            ("hash_key", 'h'),
            ("log_format", 'f'),
        ],
    ),
    (
        "[health]",
        &[
            ("interval", 'd'),
            ("timeout", 'd'),
            ("path", 'p'),
            ("rise", 'n'),
            ("fall", 'n'),
        ],
    ),
    (
        "[passive]",
        &[
            ("consecutive_failures", 'n'),
            ("ejection", 'd'),
            ("max_ejection", 'd'),
            ("max_ejected_percent", 'n'),
            ("panic_threshold_percent", 'n'),
            ("slow_start", 'd'),
        ],
    ),
    (
        "[retry]",
        &[
            ("attempts", 'n'),
            ("backoff", 'd'),
            ("budget_percent", 'n'),
            ("min_retries_per_second", 'n'),
        ],
    ),
    (
        "[timeouts]",
        &[
            ("connect", 'd'),
            ("request", 'd'),
            ("idle", 'd'),
            ("header_read", 'd'),
            ("body_read", 'd'),
            ("drain", 'd'),
        ],
    ),
    (
        "[limits]",
        &[
            ("max_header_bytes", 'n'),
            ("max_connections", 'n'),
            ("replay_buffer", 'n'),
        ],
    ),
    (
        "[tls]",
        &[("cert", 'c'), ("key", 'c'), ("upstream_ca", 'c')],
    ),
    (
        "[[backend]]",
        &[("url", 'u'), ("url", 'u'), ("weight", 'n')],
    ),
];

/// One section with some of its keys (a misspelt one now and then).
fn config_section() -> impl Strategy<Value = String> {
    (
        0..SECTIONS.len(),
        prop::collection::vec((any::<prop::sample::Index>(), 0u8..20), 0..5),
    )
        .prop_flat_map(|(s, picks)| {
            let (header, keys) = SECTIONS[s];
            let lines: Vec<BoxedStrategy<String>> = picks
                .into_iter()
                .map(|(i, typo)| {
                    let (k, kind) = keys[i.index(keys.len())];
                    let k = if typo == 0 {
                        format!("{k}x")
                    } else {
                        k.to_owned()
                    };
                    value_of(kind)
                        .prop_map(move |v| format!("{k} = {v}"))
                        .boxed()
                })
                .collect();
            lines.prop_map(move |lines| format!("{header}\n{}", lines.join("\n")))
        })
}

fn config_text() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(config_section(), 0..7),
        prop::sample::select(vec![
            "",
            "# comment",
            "[[backend]]",
            "[helth]",
            "x = 1",
            "timeouts.idle = \"5s\"",
            "backend = []",
        ]),
    )
        .prop_map(|(sections, extra)| {
            // Most files lead with one backend, so the rest of the file is what is judged.
            let mut text = String::from("[[backend]]\nurl = \"http://127.0.0.1:3031\"\n");
            // Top-level keys must come before any table.
            let (top, rest): (Vec<_>, Vec<_>) =
                sections.into_iter().partition(|s| s.starts_with('\n'));
            if !top.is_empty() {
                text = format!("{}\n{text}", top.concat());
            }
            text.push_str(&rest.join("\n"));
            text.push('\n');
            text.push_str(extra);
            text
        })
}

proptest! {
    #![proptest_config(cases(256))]

    /// Any bytes.
    #[test]
    fn config_random_bytes(data in prop::collection::vec(any::<u8>(), 0..512)) {
        lb_fuzz::config(&data);
    }

    /// Files made of config lines: sections, keys of every section, values of every kind.
    #[test]
    fn config_structured(text in config_text()) {
        lb_fuzz::config::check(&text);
    }
}

// --- http1_head ---

/// Header lines a smuggler would try, and ordinary ones.
fn head_line() -> impl Strategy<Value = String> {
    let name = prop::sample::select(vec![
        "Host",
        "host",
        "HOST",
        "Content-Length",
        "content_length",
        "Content_Length",
        "Transfer-Encoding",
        "transfer_encoding",
        "Connection",
        "Keep-Alive",
        "Upgrade",
        "HTTP2-Settings",
        "TE",
        "Trailer",
        "Proxy-Authorization",
        "Proxy-Connection",
        "X-Forwarded-For",
        "x_forwarded_for",
        "X-Forwarded-Proto",
        "X-Forwarded-Host",
        "x-forwarded_host",
        "Cookie",
        "Expect",
        "X-Custom",
        "X-Secret",
    ]);
    let value = prop::sample::select(vec![
        "a.example",
        "a.example:8080",
        "a:99999",
        "[::1]:80",
        "u@a",
        "a b",
        "",
        "0",
        "5",
        "10",
        "18446744073709551615",
        "18446744073709551614",
        "-1",
        "+5",
        "0x10",
        "5, 5",
        "5, 6",
        "chunked",
        "Chunked",
        "gzip, chunked",
        "chunked, gzip",
        "chunked, chunked",
        "identity",
        " chunked",
        "chunked;x=1",
        "close",
        "keep-alive",
        "Upgrade",
        "upgrade, x-secret",
        "content-length",
        "Host, X-Forwarded-For",
        "transfer-encoding",
        "te, trailer",
        "websocket",
        "h2c",
        "H2C, websocket",
        "h2c-14",
        "h2",
        "foo/1",
        "1.2.3.4",
        "1.2.3.4, 5.6.7.8",
        "trailers",
        "100-continue",
        "caf\u{e9}",
        "x\u{7f}y",
    ]);
    prop_oneof![
        6 => (name, value, prop::sample::select(vec![": ", ":", ":  ", " : ", ":\t"]))
            .prop_map(|(n, v, sep)| format!("{n}{sep}{v}")),
        1 => "[ -~]{0,20}",
    ]
}

fn request_head() -> impl Strategy<Value = Vec<u8>> {
    let method = prop::sample::select(vec![
        "GET", "POST", "PUT", "HEAD", "OPTIONS", "CONNECT", "DELETE", "PATCH", "PRI", "get", "X-M",
    ]);
    let target = prop::sample::select(vec![
        "/",
        "/p?q=1",
        "*",
        "http://real.example/x",
        "https://real.example:443/",
        "http://u:p@real/",
        "ftp://real/",
        "real:443",
        "http://real:99999/",
        "//x",
        "/a b",
        "http://[::1]:80/",
        "http://real.example",
        "http://real.example#f",
        "http://r?q",
    ]);
    let version = prop::sample::select(vec!["HTTP/1.1", "HTTP/1.0", "HTTP/1.1", "HTTP/2.0"]);
    let eol = prop::sample::select(vec!["\r\n", "\r\n", "\r\n", "\n"]);
    (
        method,
        target,
        version,
        prop::collection::vec(head_line(), 0..10),
        eol,
    )
        .prop_map(|(m, t, v, lines, eol)| {
            let mut head = format!("{m} {t} {v}{eol}");
            for l in lines {
                head.push_str(&l);
                head.push_str(eol);
            }
            head.push_str(eol);
            head.into_bytes()
        })
}

proptest! {
    #![proptest_config(cases(512))]

    /// Any bytes (after the address byte).
    #[test]
    fn http1_head_random_bytes(data in prop::collection::vec(any::<u8>(), 0..512)) {
        lb_fuzz::http1_head(&data);
    }

    /// Heads made of smuggling-style lines, from three kinds of client address.
    #[test]
    fn http1_head_structured(pick in any::<u8>(), head in request_head()) {
        let mut data = vec![pick];
        data.extend_from_slice(&head);
        lb_fuzz::http1_head(&data);
    }
}
