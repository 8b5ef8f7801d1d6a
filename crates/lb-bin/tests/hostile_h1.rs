//! Hostile HTTP/1.1 clients against the real `lb` binary (issue 10, item 2).
//!
//! * [`smuggling_and_desync_corpus`]: crafted raw requests (request smuggling, desync,
//!   header look-alikes, odd targets), each checked for exactly what the client got (its
//!   statuses, and whether lb closed the connection) and exactly what the backend received:
//!   the bytes lb forwarded, or that nothing arrived at all.
//! * Resource attacks (slowloris on the head and on the body, clients that never read their
//!   responses, many attackers at once): each bounded by lb, and a good client served
//!   throughout (all its requests succeed within the hang guard).
//!
//! With `LB_RELIABILITY=long` the resource attacks run heavier; every test prints one
//! `RELIABILITY {json}` line with its figures for `cargo xtask reliability`.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::*;
use serde_json::json;

/// The request sent on a connection lb should have kept open: answered only if it did.
const PROBE: &[u8] = b"GET /probe HTTP/1.1\r\nHost: probe\r\n\r\n";

/// A request as lb forwards it: `lines` joined by CRLF, the empty line, then `body`.
fn fwd(lines: &[&str], body: &str) -> Vec<u8> {
    let mut v = lines.join("\r\n").into_bytes();
    v.extend_from_slice(b"\r\n\r\n");
    v.extend_from_slice(body.as_bytes());
    v
}

/// [`PROBE`] as lb forwards it.
fn probe_forwarded() -> Vec<u8> {
    fwd(
        &[
            "GET /probe HTTP/1.1",
            "host: probe",
            "x-forwarded-for: 127.0.0.1",
            "x-forwarded-proto: http",
            "x-forwarded-host: probe",
        ],
        "",
    )
}

/// A plain GET of `path` with Host `host`, as lb forwards it (the three X-Forwarded
/// headers are this hop's: the client is 127.0.0.1 on plain HTTP).
fn fwd_get(path: &str, host: &str) -> Vec<u8> {
    fwd(
        &[
            &format!("GET {path} HTTP/1.1"),
            &format!("host: {host}"),
            "x-forwarded-for: 127.0.0.1",
            "x-forwarded-proto: http",
            &format!("x-forwarded-host: {host}"),
        ],
        "",
    )
}

fn fwd_get_method(method: &str, path: &str, host: &str) -> Vec<u8> {
    let mut v = fwd_get(path, host);
    v.splice(..3, method.bytes());
    v
}

/// What the backend must have received for a case.
enum Fwd {
    /// Exactly these requests, in order, and no other byte ([`PROBE`]'s excluded: it is
    /// expected as well when the connection stays open). Empty: nothing reached it.
    Exact(Vec<Vec<u8>>),
    /// No complete request: lb began to stream a request whose body then proved
    /// malformed, and cut it off. Whatever arrived is a prefix of these bytes.
    CutOff(Vec<u8>),
}

struct Case {
    name: &'static str,
    send: Vec<u8>,
    /// The statuses the client gets, in order.
    statuses: &'static [u16],
    /// Whether lb closes the connection after them (otherwise [`PROBE`] is answered on it).
    closed: bool,
    backend: Fwd,
}

fn case(
    name: &'static str,
    send: &[u8],
    statuses: &'static [u16],
    closed: bool,
    backend: Fwd,
) -> Case {
    Case {
        name,
        send: send.to_vec(),
        statuses,
        closed,
        backend,
    }
}

/// Rejected by lb itself: `status`, the connection closed, nothing forwarded.
fn refused(name: &'static str, send: &[u8], status: &'static [u16]) -> Case {
    case(name, send, status, true, Fwd::Exact(vec![]))
}

const R400: &[u16] = &[400];
const R405: &[u16] = &[405];
const R501: &[u16] = &[501];
const OK1: &[u16] = &[200];
const OK2: &[u16] = &[200, 200];

/// The POST with body `hello` lb forwards when the client framed it well, either way:
/// a Content-Length it keeps, or chunked which it re-chunks.
fn post_hello_cl(path: &str) -> Vec<u8> {
    fwd(
        &[
            &format!("POST {path} HTTP/1.1"),
            "host: a",
            "content-length: 5",
            "x-forwarded-for: 127.0.0.1",
            "x-forwarded-proto: http",
            "x-forwarded-host: a",
        ],
        "hello",
    )
}

fn post_hello_chunked(path: &str) -> Vec<u8> {
    fwd(
        &[
            &format!("POST {path} HTTP/1.1"),
            "host: a",
            "x-forwarded-for: 127.0.0.1",
            "x-forwarded-proto: http",
            "x-forwarded-host: a",
            "transfer-encoding: chunked",
        ],
        "5\r\nhello\r\n0\r\n\r\n",
    )
}

#[allow(clippy::too_many_lines)]
fn corpus(backend: SocketAddr) -> Vec<Case> {
    let chunked_hello = "5\r\nhello\r\n0\r\n\r\n";
    let post = |framing: &str, body: &str| {
        format!("POST /p HTTP/1.1\r\nHost: a\r\n{framing}\r\n\r\n{body}").into_bytes()
    };
    let get_with = |header: &[u8]| {
        let mut v = b"GET /h HTTP/1.1\r\nHost: a\r\n".to_vec();
        v.extend_from_slice(header);
        v.extend_from_slice(b"\r\n\r\n");
        v
    };
    vec![
        // ---- Content-Length and Transfer-Encoding together (CL.TE / TE.CL smuggling) ----
        // RFC 9112 §6.3 ¶3: Transfer-Encoding overrides Content-Length, and such a message
        // "ought to be handled as an error"; a server that processes it MUST close the
        // connection after responding (§6.1). lb frames it by TE, forwards it framed once
        // (re-chunked, no Content-Length), and closes: the bytes the two readings disagree
        // on (`GET /smuggled ...`) are never read as a request.
        case(
            "CL.TE: Content-Length first",
            &post("Content-Length: 3\r\nTransfer-Encoding: chunked", &format!("{chunked_hello}GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")),
            OK1,
            true,
            Fwd::Exact(vec![post_hello_chunked("/p")]),
        ),
        case(
            "TE.CL: Transfer-Encoding first",
            &post("Transfer-Encoding: chunked\r\nContent-Length: 40", &format!("{chunked_hello}GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")),
            OK1,
            true,
            Fwd::Exact(vec![post_hello_chunked("/p")]),
        ),
        case(
            "CL.TE: names and value in odd casing",
            &post("content-LENGTH: 3\r\nTRANSFER-encoding: CHUNKED", chunked_hello),
            OK1,
            true,
            Fwd::Exact(vec![post_hello_chunked("/p")]),
        ),
        case(
            "CL.TE: Content-Length between two Transfer-Encoding lines",
            &post("Transfer-Encoding: chunked\r\nContent-Length: 3\r\nTransfer-Encoding: chunked", chunked_hello),
            R400,
            true,
            Fwd::Exact(vec![]),
        ),
        // ---- obfuscated Transfer-Encoding (one side sees chunked, the other does not) ----
        // RFC 9112 §6.1: chunked MUST be the final coding of a request, else 400 and close;
        // SPEC: "a transfer coding other than chunked gets 501".
        refused("TE: chunked, identity", &post("Transfer-Encoding: chunked, identity\r\nContent-Length: 5", "hello"), R400),
        refused("TE: identity, chunked", &post("Transfer-Encoding: identity, chunked", chunked_hello), R501),
        // OWS around a field value is not part of it (RFC 9112 §5.1): ` chunked` is chunked.
        case(
            "TE: leading space before chunked, with CL",
            &post("Transfer-Encoding:  \tchunked\r\nContent-Length: 3", chunked_hello),
            OK1,
            true,
            Fwd::Exact(vec![post_hello_chunked("/p")]),
        ),
        refused("TE: xchunked", &post("Transfer-Encoding: xchunked\r\nContent-Length: 5", "hello"), R400),
        refused("TE: chunkedx", &post("Transfer-Encoding: chunkedx", chunked_hello), R400),
        // VT is a CTL, not OWS (RFC 9110 §5.5, §5.6.3).
        refused("TE: chunked followed by VT", &post("Transfer-Encoding: chunked\x0b\r\nContent-Length: 5", "hello"), R400),
        refused("TE: VT before chunked", &post("Transfer-Encoding: \x0bchunked", chunked_hello), R400),
        // A quoted string is not a transfer-coding token (RFC 9112 §7).
        refused("TE: quoted \"chunked\"", &post("Transfer-Encoding: \"chunked\"\r\nContent-Length: 5", "hello"), R400),
        // Two field lines are one list (RFC 9110 §5.3): `gzip, chunked`.
        refused("TE: gzip and chunked on two lines", &post("Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked", chunked_hello), R501),
        refused("TE: chunked and identity on two lines", &post("Transfer-Encoding: chunked\r\nTransfer-Encoding: identity", chunked_hello), R400),
        refused("TE: chunked twice on two lines", &post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", chunked_hello), R400),
        refused("TE: chunked twice in one line", &post("Transfer-Encoding: chunked, chunked", chunked_hello), R400),
        // A transfer coding in an HTTP/1.0 request cannot be trusted (RFC 9112 §6.1 ¶15).
        refused(
            "TE: chunked in HTTP/1.0",
            format!("POST /p HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_hello}").as_bytes(),
            R400,
        ),
        refused("TE: empty value", &post("Transfer-Encoding: \r\nContent-Length: 5", "hello"), R400),
        // ---- Content-Length variants (RFC 9110 §8.6: 1*DIGIT; RFC 9112 §6.3 ¶5) ----
        case(
            "CL: two identical lines are one",
            &post("Content-Length: 5\r\nContent-Length: 5", "hello"),
            OK1,
            false,
            Fwd::Exact(vec![post_hello_cl("/p")]),
        ),
        refused("CL: two differing lines", &post("Content-Length: 5\r\nContent-Length: 6", "hello!"), R400),
        refused("CL: differing list in one line", &post("Content-Length: 5, 6", "hello!"), R400),
        refused("CL: +5", &post("Content-Length: +5", "hello"), R400),
        refused("CL: -5", &post("Content-Length: -5", "hello"), R400),
        refused("CL: 0x5", &post("Content-Length: 0x5", "hello"), R400),
        refused("CL: 5 5", &post("Content-Length: 5 5", "hello"), R400),
        refused("CL: 5.0", &post("Content-Length: 5.0", "hello"), R400),
        refused("CL: empty", &post("Content-Length: ", "hello"), R400),
        refused("CL: u64 overflow", &post("Content-Length: 18446744073709551616", "hello"), R400),
        refused("CL: u64::MAX", &post("Content-Length: 18446744073709551615", "hello"), R400),
        refused("CL: far beyond u64", &post("Content-Length: 99999999999999999999999999999999", "hello"), R400),
        // Leading zeros are still 1*DIGIT: the length is 5, forwarded as the client said it.
        case(
            "CL: leading zeros",
            &post("Content-Length: 005", "hello"),
            OK1,
            false,
            Fwd::Exact(vec![fwd(
                &[
                    "POST /p HTTP/1.1",
                    "host: a",
                    "content-length: 005",
                    "x-forwarded-for: 127.0.0.1",
                    "x-forwarded-proto: http",
                    "x-forwarded-host: a",
                ],
                "hello",
            )]),
        ),
        // ---- chunk sizes (RFC 9112 §7.1: chunk-size = 1*HEXDIG) ----
        // A body found malformed after lb began to stream it: the client gets 400 (SPEC:
        // "a malformed request body ... gets 400"), the backend at most a cut-off prefix,
        // never a complete request, and the client's connection is closed.
        case("chunk size -5", &post("Transfer-Encoding: chunked", "-5\r\nhello\r\n0\r\n\r\n"), R400, true, Fwd::CutOff(post_hello_chunked("/p"))),
        case("chunk size hex overflow", &post("Transfer-Encoding: chunked", "10000000000000000\r\nhello\r\n0\r\n\r\n"), R400, true, Fwd::CutOff(post_hello_chunked("/p"))),
        case("chunk size 0x5", &post("Transfer-Encoding: chunked", "0x5\r\nhello\r\n0\r\n\r\n"), R400, true, Fwd::CutOff(post_hello_chunked("/p"))),
        case("chunk size not hex", &post("Transfer-Encoding: chunked", "g\r\nhello\r\n0\r\n\r\n"), R400, true, Fwd::CutOff(post_hello_chunked("/p"))),
        case("chunk data without its CRLF", &post("Transfer-Encoding: chunked", "5\r\nhelloX0\r\n\r\n"), R400, true, Fwd::CutOff(post_hello_chunked("/p"))),
        // The first chunk (`hel`) was well framed and may be on its way; `lo` is no size.
        case(
            "chunk longer than its size",
            &post("Transfer-Encoding: chunked", "3\r\nhello\r\n0\r\n\r\n"),
            R400,
            true,
            Fwd::CutOff({
                let mut cut = post_hello_chunked("/p");
                cut.truncate(cut.len() - chunked_hello.len());
                cut.extend_from_slice(b"3\r\nhel\r\n");
                cut
            }),
        ),
        case("chunk size line ended by bare LF", &post("Transfer-Encoding: chunked", "5\nhello\r\n0\r\n\r\n"), R400, true, Fwd::CutOff(post_hello_chunked("/p"))),
        // ---- chunk extensions (RFC 9112 §7.1.1: a recipient ignores unknown ones) ----
        case(
            "chunk extension is dropped, body re-chunked",
            &post("Transfer-Encoding: chunked", "5;name=value;q=\"x\"\r\nhello\r\n0;last\r\n\r\n"),
            OK1,
            false,
            Fwd::Exact(vec![post_hello_chunked("/p")]),
        ),
        case(
            "chunk extension of 64 KiB",
            &post("Transfer-Encoding: chunked", &format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(64 * 1024))),
            R400,
            true,
            Fwd::CutOff(post_hello_chunked("/p")),
        ),
        case("chunk extension with a bare LF", &post("Transfer-Encoding: chunked", "5;a\nb\r\nhello\r\n0\r\n\r\n"), R400, true, Fwd::CutOff(post_hello_chunked("/p"))),
        case("chunk extension with a bare CR", &post("Transfer-Encoding: chunked", "5;a\rb\r\nhello\r\n0\r\n\r\n"), R400, true, Fwd::CutOff(post_hello_chunked("/p"))),
        // ---- line endings (RFC 9112 §2.2: a bare LF MAY be read as a line end; a bare
        // CR MUST be rejected or replaced by SP) ----
        case(
            "bare LF line endings are read as CRLF and forwarded as CRLF",
            b"GET /lf HTTP/1.1\nHost: a\nX-A: 1\n\n",
            OK1,
            false,
            Fwd::Exact(vec![fwd(
                &[
                    "GET /lf HTTP/1.1",
                    "host: a",
                    "x-a: 1",
                    "x-forwarded-for: 127.0.0.1",
                    "x-forwarded-proto: http",
                    "x-forwarded-host: a",
                ],
                "",
            )]),
        ),
        case(
            "bare LF ends a header line: what follows is a header of its own",
            b"POST /lf HTTP/1.1\r\nHost: a\r\nX-A: 1\nContent-Length: 5\r\n\r\nhello",
            OK1,
            false,
            Fwd::Exact(vec![fwd(
                &[
                    "POST /lf HTTP/1.1",
                    "host: a",
                    "x-a: 1",
                    "content-length: 5",
                    "x-forwarded-for: 127.0.0.1",
                    "x-forwarded-proto: http",
                    "x-forwarded-host: a",
                ],
                "hello",
            )]),
        ),
        refused("bare CR in the request line", b"GET /cr HTTP/1.1\rHost: a\r\n\r\n", R400),
        refused("bare CR inside a header value", &get_with(b"X-A: a\rContent-Length: 5"), R400),
        // ---- obs-fold (RFC 9112 §5.2: a server MUST reject it or replace it by SP) ----
        refused("obs-fold of an ordinary header", &get_with(b"X-A: a\r\n b"), R400),
        refused("obs-fold of Transfer-Encoding", &post("Transfer-Encoding:\r\n chunked\r\nContent-Length: 5", "hello"), R400),
        refused("obs-fold of Content-Length", &post("Content-Length: 5\r\n 0", "hello"), R400),
        // ---- bytes no field name or value may hold (RFC 9110 §5.1, §5.5; RFC 9112 §5.1) ----
        refused("space between field name and colon", &post("Content-Length : 5", "hello"), R400),
        refused("tab between field name and colon", &post("Transfer-Encoding\t: chunked", chunked_hello), R400),
        refused("space inside a field name", &get_with(b"X A: 1"), R400),
        refused("NUL in a field name", &get_with(b"X\0A: 1"), R400),
        refused("CR in a field name", &get_with(b"X\rA: 1"), R400),
        refused("DEL in a field name", &get_with(b"X\x7fA: 1"), R400),
        refused("NUL in a field value", &get_with(b"X-A: a\0b"), R400),
        refused("DEL in a field value", &get_with(b"X-A: a\x7fb"), R400),
        refused("NUL in the target", b"GET /a\0b HTTP/1.1\r\nHost: a\r\n\r\n", R400),
        refused("whitespace before the first header line", b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", R400),
        refused("empty field name", &get_with(b": x"), R400),
        // A tab inside a value is allowed, and obs-text is the backend's business.
        case(
            "tab and obs-text inside a value pass unchanged",
            &get_with(b"X-A: a\tb\xe9"),
            OK1,
            false,
            Fwd::Exact(vec![[
                &b"GET /h HTTP/1.1\r\nhost: a\r\nx-a: a\tb\xe9\r\n"[..],
                b"x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-host: a\r\n\r\n",
            ]
            .concat()]),
        ),
        // ---- `_` look-alikes (SPEC: a header whose name, reading `_` as `-`, is Host,
        // Content-Length, Transfer-Encoding or an X-Forwarded-* lb sets is dropped) ----
        case(
            "Content_Length and Transfer_Encoding beside a real Content-Length",
            &post("Content-Length: 5\r\nContent_Length: 50\r\nTransfer_Encoding: chunked", "hello"),
            OK1,
            false,
            Fwd::Exact(vec![post_hello_cl("/p")]),
        ),
        // Without a real length the body is empty: `hello` is read as the next request
        // (by lb as by any backend), which is not one: 400 and close.
        case(
            "Content_Length alone frames nothing",
            &post("Content_Length: 7", "hello\r\n"),
            &[200, 400],
            true,
            Fwd::Exact(vec![fwd(
                &[
                    "POST /p HTTP/1.1",
                    "host: a",
                    "x-forwarded-for: 127.0.0.1",
                    "x-forwarded-proto: http",
                    "x-forwarded-host: a",
                ],
                "",
            )]),
        ),
        // A chunked body announced only by the look-alike: lb frames no body, so the
        // chunks are read as the next request, which is none: 400 and close.
        case(
            "Transfer_Encoding alone frames nothing",
            &post("Transfer_Encoding: chunked", chunked_hello),
            &[200, 400],
            true,
            Fwd::Exact(vec![fwd(
                &[
                    "POST /p HTTP/1.1",
                    "host: a",
                    "x-forwarded-for: 127.0.0.1",
                    "x-forwarded-proto: http",
                    "x-forwarded-host: a",
                ],
                "",
            )]),
        ),
        case(
            "X_Forwarded_For, X-Forwarded_Host, X_Forwarded-Proto",
            &get_with(b"X_Forwarded_For: 6.6.6.6\r\nX-Forwarded_Host: evil\r\nX_Forwarded-Proto: https\r\nX-Forwarded-For: 10.0.0.1"),
            OK1,
            false,
            Fwd::Exact(vec![fwd(
                &[
                    "GET /h HTTP/1.1",
                    "host: a",
                    "x-forwarded-for: 10.0.0.1, 127.0.0.1",
                    "x-forwarded-proto: http",
                    "x-forwarded-host: a",
                ],
                "",
            )]),
        ),
        case(
            "Host_ (not Host read with `_` as `-`) passes; _Host too",
            b"GET /h HTTP/1.1\r\nHost: a\r\nhost_: evil\r\n_Host: evil\r\n\r\n",
            OK1,
            false,
            Fwd::Exact(vec![fwd(
                &[
                    "GET /h HTTP/1.1",
                    "host: a",
                    "host_: evil",
                    "_host: evil",
                    "x-forwarded-for: 127.0.0.1",
                    "x-forwarded-proto: http",
                    "x-forwarded-host: a",
                ],
                "",
            )]),
        ),
        case(
            "Host with an underscore look-alike of its own",
            b"GET /h HTTP/1.1\r\nHost: a\r\nHo_st: evil\r\n\r\n",
            OK1,
            false,
            Fwd::Exact(vec![fwd(
                &[
                    "GET /h HTTP/1.1",
                    "host: a",
                    "ho_st: evil",
                    "x-forwarded-for: 127.0.0.1",
                    "x-forwarded-proto: http",
                    "x-forwarded-host: a",
                ],
                "",
            )]),
        ),
        // ---- request targets (RFC 9112 §3.2) ----
        // Absolute form: the target's authority replaces Host (§3.2.2; SPEC).
        case(
            "absolute-form target replaces Host",
            b"GET http://real.example:8080/p?q=1 HTTP/1.1\r\nHost: decoy.example\r\n\r\n",
            OK1,
            false,
            Fwd::Exact(vec![fwd_get("/p?q=1", "real.example:8080")]),
        ),
        case(
            "absolute-form target without a path",
            b"GET HTTP://Real.Example HTTP/1.1\r\nHost: decoy\r\n\r\n",
            OK1,
            false,
            Fwd::Exact(vec![fwd_get("/", "Real.Example")]),
        ),
        refused("absolute-form with userinfo", b"GET http://user:pw@real/ HTTP/1.1\r\nHost: real\r\n\r\n", R400),
        refused("absolute-form with a scheme not http", b"GET ftp://real/ HTTP/1.1\r\nHost: real\r\n\r\n", R400),
        refused("absolute-form still needs a Host", b"GET http://real/ HTTP/1.1\r\n\r\n", R400),
        // Authority form is for CONNECT only (§3.2.3).
        refused("authority-form target with GET", b"GET real.example:443 HTTP/1.1\r\nHost: real.example\r\n\r\n", R400),
        // Asterisk form is for a server-wide OPTIONS only (§3.2.4).
        refused("asterisk-form with GET", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", R400),
        refused("asterisk-form with POST", b"POST * HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", R400),
        refused("HTTP/2 preface method over HTTP/1.1", b"PRI * HTTP/1.1\r\nHost: a\r\n\r\n", R400),
        case(
            "asterisk-form with OPTIONS is forwarded",
            b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
            OK1,
            false,
            Fwd::Exact(vec![fwd(
                &[
                    "OPTIONS * HTTP/1.1",
                    "host: a",
                    "x-forwarded-for: 127.0.0.1",
                    "x-forwarded-proto: http",
                    "x-forwarded-host: a",
                ],
                "",
            )]),
        ),
        // ---- request line and version (RFC 9112 §2.2, §2.3, §3) ----
        // An empty line before the request line SHOULD be ignored (§2.2).
        case(
            "empty line before the request line",
            b"\r\nGET /crlf HTTP/1.1\r\nHost: a\r\n\r\n",
            OK1,
            false,
            Fwd::Exact(vec![fwd_get("/crlf", "a")]),
        ),
        // ... also between pipelined requests (an old client's CRLF after a body).
        case(
            "CRLF after a body, before the next request",
            b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n",
            OK2,
            false,
            Fwd::Exact(vec![post_hello_cl("/p"), fwd_get("/next", "a")]),
        ),
        refused("HTTP/0.9 request line", b"GET /\r\n\r\n", R400),
        refused("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", R400),
        refused("HTTP/2.0 in an HTTP/1 request line", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", R400),
        refused("lower-case version", b"GET / http/1.1\r\nHost: a\r\n\r\n", R400),
        refused("space before the line end", b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", R400),
        refused(
            "target over max_header_bytes",
            format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "u".repeat(40 * 1024)).as_bytes(),
            &[431],
        ),
        refused("two spaces in the request line", b"GET  /a HTTP/1.1\r\nHost: a\r\n\r\n", R400),
        refused("space inside the target", b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", R400),
        // ---- CONNECT: lb is not a forward proxy (SPEC: 405) ----
        refused("CONNECT", b"CONNECT real.example:443 HTTP/1.1\r\nHost: real.example:443\r\n\r\n", R405),
        // ---- Upgrade: h2c is never forwarded (SPEC; h2c is by prior knowledge only) ----
        case(
            "Upgrade: h2c with HTTP2-Settings",
            b"GET /up HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
            OK1,
            false,
            Fwd::Exact(vec![fwd_get("/up", "a")]),
        ),
        case(
            "Upgrade: H2C in odd casing beside a version",
            b"GET /up HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: H2C, h2c-14\r\n\r\n",
            OK1,
            false,
            Fwd::Exact(vec![fwd_get("/up", "a")]),
        ),
        // ---- Connection cannot remove what lb vouches for (SPEC; RFC 9110 §7.6.1) ----
        case(
            "Connection names Host and X-Forwarded-*",
            b"GET /c HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.1\r\nConnection: host, x-forwarded-for, X-Forwarded-Host, x-forwarded-proto\r\n\r\n",
            OK1,
            false,
            Fwd::Exact(vec![fwd(
                &[
                    "GET /c HTTP/1.1",
                    "host: a",
                    "x-forwarded-for: 10.0.0.1, 127.0.0.1",
                    "x-forwarded-proto: http",
                    "x-forwarded-host: a",
                ],
                "",
            )]),
        ),
        // Naming the framing header must not leave the body unframed towards the backend:
        // with its length gone, lb frames the same body one way, chunked.
        case(
            "Connection names Content-Length",
            &post("Content-Length: 5\r\nConnection: content-length", "hello"),
            OK1,
            false,
            Fwd::Exact(vec![post_hello_chunked("/p")]),
        ),
        case(
            "Connection names Transfer-Encoding",
            &post("Transfer-Encoding: chunked\r\nConnection: transfer-encoding", chunked_hello),
            OK1,
            false,
            Fwd::Exact(vec![post_hello_chunked("/p")]),
        ),
        // ---- Host (RFC 9112 §3.2: exactly one valid Host in HTTP/1.1, else 400) ----
        refused("two identical Host headers", b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", R400),
        refused("two differing Host headers", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", R400),
        refused("Host as a list", b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n", R400),
        refused("missing Host", b"GET / HTTP/1.1\r\n\r\n", R400),
        refused("empty Host", b"GET / HTTP/1.1\r\nHost:\r\n\r\n", R400),
        // HTTP/1.0 predates Host: lb names the backend (it forwards HTTP/1.1).
        case(
            "HTTP/1.0 without Host",
            b"GET /old HTTP/1.0\r\n\r\n",
            OK1,
            true,
            Fwd::Exact(vec![fwd(
                &[
                    "GET /old HTTP/1.1",
                    "x-forwarded-for: 127.0.0.1",
                    "x-forwarded-proto: http",
                    &format!("host: {backend}"),
                ],
                "",
            )]),
        ),
        // ---- pipelining and smuggling behind a body (RFC 9112 §9.3.2) ----
        // What follows a well-framed body is the next request: parsed by lb and forwarded
        // as one, never inside the first one's body.
        case(
            "request pipelined behind a Content-Length body",
            b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /next HTTP/1.1\r\nHost: a\r\n\r\n",
            OK2,
            false,
            Fwd::Exact(vec![post_hello_cl("/p"), fwd_get("/next", "a")]),
        ),
        case(
            "request pipelined behind a chunked body",
            format!("POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_hello}GET /next HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes(),
            OK2,
            false,
            Fwd::Exact(vec![post_hello_chunked("/p"), fwd_get("/next", "a")]),
        ),
        case(
            "request pipelined behind a GET's body",
            b"GET /g HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /next HTTP/1.1\r\nHost: a\r\n\r\n",
            OK2,
            false,
            Fwd::Exact(vec![
                fwd(
                    &[
                        "GET /g HTTP/1.1",
                        "host: a",
                        "content-length: 5",
                        "x-forwarded-for: 127.0.0.1",
                        "x-forwarded-proto: http",
                        "x-forwarded-host: a",
                    ],
                    "hello",
                ),
                fwd_get("/next", "a"),
            ]),
        ),
        // A Content-Length shorter than the body: the rest is read as the next request,
        // by lb as by the backend: here `loGET` (a method token), forwarded as a request of
        // its own, never inside the first one's body.
        case(
            "body longer than its Content-Length: the rest is the next request",
            b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nhelloGET /next HTTP/1.1\r\nHost: a\r\n\r\n",
            OK2,
            false,
            Fwd::Exact(vec![
                fwd(
                    &[
                        "POST /p HTTP/1.1",
                        "host: a",
                        "content-length: 3",
                        "x-forwarded-for: 127.0.0.1",
                        "x-forwarded-proto: http",
                        "x-forwarded-host: a",
                    ],
                    "hel",
                ),
                fwd_get_method("loGET", "/next", "a"),
            ]),
        ),
        // ... and where the rest is no request, 400 and close.
        case(
            "body longer than its Content-Length: the rest is no request",
            b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nhello\r\nHost: a\r\n\r\n",
            &[200, 400],
            true,
            Fwd::Exact(vec![fwd(
                &[
                    "POST /p HTTP/1.1",
                    "host: a",
                    "content-length: 3",
                    "x-forwarded-for: 127.0.0.1",
                    "x-forwarded-proto: http",
                    "x-forwarded-host: a",
                ],
                "hel",
            )]),
        ),
        // Chunked trailers end the body; the request after them is its own.
        case(
            "request pipelined behind chunked trailers",
            b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n",
            OK2,
            false,
            Fwd::Exact(vec![post_hello_chunked("/p"), fwd_get("/next", "a")]),
        ),
        // ---- nothing after a rejection (RFC 9112 §9.6: the connection is closed) ----
        // SPEC: "larger request heads get 431" (`max_header_bytes`, 32 KiB by default).
        refused(
            "head over max_header_bytes, then a request",
            format!(
                "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\nGET /after HTTP/1.1\r\nHost: a\r\n\r\n",
                "b".repeat(40 * 1024)
            )
            .as_bytes(),
            &[431],
        ),
        refused("request after a 400 for a missing Host", b"GET / HTTP/1.1\r\n\r\nGET /after HTTP/1.1\r\nHost: a\r\n\r\n", R400),
        refused("request after a 400 for a bad header", b"GET / HTTP/1.1\r\nHost: a\r\nX A: 1\r\n\r\nGET /after HTTP/1.1\r\nHost: a\r\n\r\n", R400),
        refused("request after a 400 for two Content-Lengths", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxGET /after HTTP/1.1\r\nHost: a\r\n\r\n", R400),
        refused("request after a 405 for CONNECT", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\nGET /after HTTP/1.1\r\nHost: a\r\n\r\n", R405),
        refused("request after a 501", format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n{chunked_hello}GET /after HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes(), R501),
    ]
}

/// Runs one case against `lb` and returns what was wrong, if anything.
fn run_case(lb: &LbProc, backend: &RawBackend, c: &Case, n: usize) -> Result<(), String> {
    let mark = backend.mark();
    // lb answers 408 (or closes) by 3 s (`header_read`, `body_read`, `idle`) whatever it
    // waits for.
    let mut client = Client::connect_waiting(lb.addr, Duration::from_secs(6));
    let seen = client.exchange(&c.send, c.statuses.len(), PROBE);
    let mut errors = Vec::new();
    if seen.stalled {
        errors.push("lb neither answered nor closed the connection".to_owned());
    }
    let mut want_statuses = c.statuses.to_vec();
    if !c.closed {
        want_statuses.push(200);
    }
    if seen.statuses() != want_statuses {
        errors.push(format!(
            "client got {:?}, want {want_statuses:?}",
            seen.statuses()
        ));
    }
    if seen.closed != c.closed {
        errors.push(format!(
            "connection closed: {}, want {}",
            seen.closed, c.closed
        ));
    }
    if !seen.rest.is_empty() {
        errors.push(format!("bytes after the answers: {}", show(&seen.rest)));
    }
    client.close();
    // A request after everything the case sent, on a connection of its own: once it has
    // arrived, so has whatever lb forwarded for the case (lb had answered the case, or
    // closed its connection, before this was sent).
    let sentinel = format!("/sentinel-{n}");
    match try_get(lb.addr, &sentinel) {
        Some((200, _)) => {}
        other => errors.push(format!("the sentinel request got {other:?}")),
    }
    let want_sentinel = fwd_get(&sentinel, "good");
    backend.wait_requests(&sentinel, |r| r.contains(&want_sentinel));
    // A cut-off upload's bytes come on a connection of their own: let them land.
    backend.wait_quiet(Duration::from_millis(30));
    let mut got = backend.requests_since(&mark);
    got.retain(|r| *r != want_sentinel);
    let partial = backend.partial_since(&mark);
    match &c.backend {
        Fwd::Exact(want) => {
            let mut want = want.clone();
            if !c.closed {
                want.push(probe_forwarded());
            }
            if got != want {
                errors.push(format!(
                    "backend got {:?}\n     want {:?}",
                    got.iter().map(|r| show(r)).collect::<Vec<_>>(),
                    want.iter().map(|r| show(r)).collect::<Vec<_>>()
                ));
            }
            if !partial.is_empty() {
                errors.push(format!(
                    "backend got partial bytes {:?}",
                    partial.iter().map(|r| show(r)).collect::<Vec<_>>()
                ));
            }
        }
        Fwd::CutOff(prefix_of) => {
            if !got.is_empty() {
                errors.push(format!(
                    "backend got complete requests {:?}",
                    got.iter().map(|r| show(r)).collect::<Vec<_>>()
                ));
            }
            for p in &partial {
                if !prefix_of.starts_with(p) {
                    errors.push(format!(
                        "backend got {}, not a prefix of {}",
                        show(p),
                        show(prefix_of)
                    ));
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("case {n} `{}`:\n  {}", c.name, errors.join("\n  ")))
    }
}

/// The corpus: every case's client answer and backend bytes are exact. One `lb` (with a
/// worker per core) serves all of them, in turn; each case's verdict is collected so a
/// failure lists every failing case at once.
#[test]
fn smuggling_and_desync_corpus() {
    let backend = RawBackend::ok();
    // Short read timeouts: a case lb waits on (wrongly) ends in a 408, not a hang.
    let lb = LbProc::start(
        "hostile-corpus",
        &backend.url(),
        "[timeouts]\nheader_read = \"3s\"\nbody_read = \"3s\"\nidle = \"3s\"\n",
    );
    let cases = corpus(backend.addr);
    let failures: Vec<String> = cases
        .iter()
        .enumerate()
        .filter_map(|(i, c)| run_case(&lb, &backend, c, i).err())
        .collect();
    let status = lb.backend_status();
    report(json!({
        "section": "hostile_h1",
        "case": "corpus",
        "cases": cases.len(),
        "passed": cases.len() - failures.len(),
    }));
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // None of it was the backend's fault.
    assert_eq!(status["failures_total"], 0, "{status}");
    assert_eq!(status["healthy"], true, "{status}");
    assert_eq!(status["active_requests"], 0, "{status}");
}

// === resource attacks ===

/// The timeouts the resource attacks meet: short, so that each attack is bounded within
/// seconds; `idle` is also the send timeout for clients that do not read.
const ATTACK_TIMEOUTS: &str =
    "[timeouts]\nheader_read = \"1s\"\nbody_read = \"1s\"\nidle = \"2s\"\n";

/// Size of the responses the backend sends to `/big`.
const BIG: usize = 32 << 20;

/// A backend answering `/big` with [`BIG`] bytes and everything else with [`OK`].
fn big_backend() -> RawBackend {
    let ok = Arc::new(OK.to_vec());
    let mut big = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n").into_bytes();
    big.resize(big.len() + BIG, b'b');
    let big = Arc::new(big);
    RawBackend::start(Arc::new(move |req: &[u8]| {
        if req.starts_with(b"GET /big ") {
            Arc::clone(&big)
        } else {
            Arc::clone(&ok)
        }
    }))
}

/// What a well-behaved client saw while an attack ran.
#[derive(Debug, Default)]
struct GoodStats {
    latencies: Vec<Duration>,
    failed: usize,
    failures: Vec<String>,
}

impl GoodStats {
    fn requests(&self) -> usize {
        self.latencies.len() + self.failed
    }
}

/// One good request on a connection of its own: `GET /good`, which must get `200 ok`.
fn good_request(addr: SocketAddr, stats: &mut GoodStats) {
    let start = Instant::now();
    match try_get(addr, "/good") {
        Some((200, body)) if body == b"ok" => stats.latencies.push(start.elapsed()),
        other => {
            stats.failed += 1;
            if stats.failures.len() < 5 {
                stats
                    .failures
                    .push(format!("{other:?} after {:?}", start.elapsed()));
            }
        }
    }
}

/// A good client sending requests one after another (paced, not flooding) until stopped.
struct GoodClient {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<GoodStats>,
}

impl GoodClient {
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut stats = GoodStats::default();
            while !s.load(Ordering::SeqCst) {
                good_request(addr, &mut stats);
                std::thread::sleep(Duration::from_millis(20));
            }
            stats
        });
        Self { stop, thread }
    }

    fn finish(self) -> GoodStats {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

/// The good client's latency before any attack: `n` requests in a row.
fn baseline(addr: SocketAddr, n: usize) -> GoodStats {
    let mut stats = GoodStats::default();
    for _ in 0..n {
        good_request(addr, &mut stats);
    }
    assert_eq!(stats.failed, 0, "baseline: {:?}", stats.failures);
    stats
}

/// Asserts the good client was served throughout: every request answered `200 ok`.
fn assert_served(good: &GoodStats, during: &str) {
    assert!(
        good.requests() > 0,
        "the good client sent nothing during {during}"
    );
    assert_eq!(
        good.failed, 0,
        "good requests failed during {during}: {:?}",
        good.failures
    );
}

/// Asserts nothing of the attack was charged to the backend, once lb has nothing in flight.
fn assert_backend_not_charged(lb: &LbProc) {
    let deadline = Instant::now() + WAIT;
    let mut status = lb.backend_status();
    while status["active_requests"] != 0 {
        assert!(
            Instant::now() < deadline,
            "requests left in flight: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
        status = lb.backend_status();
    }
    assert_eq!(
        status["failures_total"], 0,
        "charged to the backend: {status}"
    );
    assert_eq!(status["healthy"], true, "{status}");
    assert_eq!(status["ejected_until"], serde_json::Value::Null, "{status}");
}

/// How a slow attacker misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slow {
    /// Sends a request head one byte per tick, never finishing it.
    Head,
    /// Sends a head with `Content-Length: 1000` and 10 bytes of body, then nothing.
    BodyLength,
    /// Sends a chunked head and one 10-byte chunk, then nothing.
    BodyChunked,
}

impl Slow {
    fn opening(self) -> &'static [u8] {
        match self {
            Self::Head => b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Slow: ",
            Self::BodyLength => {
                b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\naaaaaaaaaa"
            }
            Self::BodyChunked => {
                b"POST /slow HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\na\r\naaaaaaaaaa\r\n"
            }
        }
    }
}

/// The most a slow chunked upload can have reached the backend with: its head and chunk.
fn slow_chunked_forwarded() -> Vec<u8> {
    fwd(
        &[
            "POST /slow HTTP/1.1",
            "host: a",
            "x-forwarded-for: 127.0.0.1",
            "x-forwarded-proto: http",
            "x-forwarded-host: a",
            "transfer-encoding: chunked",
        ],
        // hyper writes chunk sizes in upper-case hex.
        "A\r\naaaaaaaaaa\r\n",
    )
}

struct SlowConn {
    stream: std::net::TcpStream,
    kind: Slow,
    got: Vec<u8>,
}

/// What a slow attack saw.
#[derive(Debug, Default)]
struct SlowOutcome {
    /// Attacker connections opened in all.
    connections: usize,
    /// Of those closed by lb: how many got exactly one 408 first.
    got_408: usize,
    /// The others (first few): what they got before the close.
    other: Vec<String>,
    others: usize,
    rss_kib_max: u64,
}

/// Keeps `concurrent` slow attackers open against lb (each closed one replaced by a new one)
/// until `duration` has passed, then waits (bounded) until lb has closed them all.
fn slow_attack(lb: &LbProc, kinds: &[Slow], concurrent: usize, duration: Duration) -> SlowOutcome {
    let mut out = SlowOutcome::default();
    let open = |i: usize, out: &mut SlowOutcome| {
        let kind = kinds[i % kinds.len()];
        let mut stream = std::net::TcpStream::connect(lb.addr).unwrap();
        stream.write_all(kind.opening()).unwrap();
        stream.set_nonblocking(true).unwrap();
        out.connections += 1;
        SlowConn {
            stream,
            kind,
            got: Vec::new(),
        }
    };
    let start = Instant::now();
    let mut conns: Vec<SlowConn> = (0..concurrent).map(|i| open(i, &mut out)).collect();
    let mut next = concurrent;
    let mut buf = [0u8; 4096];
    let hang = start + duration + WAIT;
    while !conns.is_empty() {
        assert!(
            Instant::now() < hang,
            "{} slow attackers still open long after lb's timeouts",
            conns.len()
        );
        out.rss_kib_max = out.rss_kib_max.max(lb.rss_kib());
        let mut i = 0;
        while i < conns.len() {
            let c = &mut conns[i];
            let mut closed = false;
            // Read first: lb's 408 is taken before a byte of ours could meet its close.
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => c.got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            if !closed && c.got.is_empty() && c.kind == Slow::Head {
                // A write error here means lb closed: the next tick reads what it sent.
                let _ = c.stream.write(b"a");
            }
            if closed {
                let c = conns.swap_remove(i);
                let answers = response_statuses(&c.got);
                if answers == [408] {
                    out.got_408 += 1;
                } else {
                    out.others += 1;
                    if out.other.len() < 5 {
                        out.other.push(format!("{:?}: {}", c.kind, show(&c.got)));
                    }
                }
                if start.elapsed() < duration {
                    conns.push(open(next, &mut out));
                    next += 1;
                }
            } else {
                i += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    out
}

/// The statuses of the whole responses in `bytes`, and 0 for anything left that is not one.
fn response_statuses(mut bytes: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head)) = resp.parse(bytes) else {
            out.push(0);
            break;
        };
        out.push(resp.code.unwrap_or(0));
        let len = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| {
                std::str::from_utf8(h.value)
                    .ok()?
                    .trim()
                    .parse::<usize>()
                    .ok()
            })
            .unwrap_or(0);
        bytes = bytes.get(head + len..).unwrap_or_default();
    }
    out
}

/// Scale of the resource attacks: (attackers at once, duration), bounded in CI.
fn scale(ci: (usize, u64), long_form: (usize, u64)) -> (usize, Duration) {
    let (n, secs) = if long() { long_form } else { ci };
    (n, Duration::from_secs(secs))
}

/// Runs one slow attack with a good client beside it and checks every bound: each attacker
/// got a 408 and was closed, the backend got nothing of theirs but what `kinds` allow (a
/// slow chunked upload's head and chunk), nothing was charged to it, and the good client
/// was served throughout. Prints the figures.
fn slow_attack_case(name: &str, kinds: &[Slow], ci: (usize, u64), long_form: (usize, u64)) {
    let backend = RawBackend::ok();
    let lb = LbProc::start(name, &backend.url(), ATTACK_TIMEOUTS);
    let base = baseline(lb.addr, 50);
    let rss_before = lb.rss_kib();
    let mark = backend.mark();
    let (n, duration) = scale(ci, long_form);
    let good = GoodClient::start(lb.addr);
    let attack = slow_attack(&lb, kinds, n, duration);
    let good = good.finish();
    report(json!({
        "section": "hostile_h1",
        "case": name,
        "attackers": n,
        "attack_connections": attack.connections,
        "attack_408": attack.got_408,
        "duration_s": duration.as_secs(),
        "good_requests": good.requests(),
        "good_failed": good.failed,
        "good_p50_ms": percentile_ms(&good.latencies, 50.0),
        "good_p99_ms": percentile_ms(&good.latencies, 99.0),
        "good_max_ms": percentile_ms(&good.latencies, 100.0),
        "baseline_p99_ms": percentile_ms(&base.latencies, 99.0),
        "lb_rss_kib_before": rss_before,
        "lb_rss_kib_max": attack.rss_kib_max,
        "attack_other": attack.other,
    }));
    assert_eq!(
        (attack.got_408, attack.others),
        (attack.connections, 0),
        "every attacker gets one 408, then its connection closed: {:?}",
        attack.other
    );
    assert_served(&good, name);
    // Bounded: a generous allowance per attacker open at once, whatever the number of
    // connections that came and went (a leak per connection would exceed it).
    let grown = attack.rss_kib_max.saturating_sub(rss_before);
    assert!(
        grown < 32 * 1024 + n as u64 * 128,
        "lb grew by {grown} KiB under {n} slow attackers"
    );
    // The backend saw the good client's requests and nothing else whole.
    let good_forwarded = fwd_get("/good", "good");
    let got = backend.requests_since(&mark);
    assert!(
        got.iter().all(|r| *r == good_forwarded),
        "{:?}",
        got.iter().map(|r| show(r)).collect::<Vec<_>>()
    );
    assert_eq!(got.len(), good.requests());
    let allowed = slow_chunked_forwarded();
    for p in backend.partial_since(&mark) {
        assert!(
            kinds.contains(&Slow::BodyChunked) && allowed.starts_with(&p),
            "the backend got {}",
            show(&p)
        );
    }
    assert_backend_not_charged(&lb);
}

/// Slowloris on the head: request heads dribbled a byte at a time, never finished. SPEC
/// `timeouts.header_read`: "a client must send its whole request head within this" (408,
/// then close: SPEC fine print). Nothing reaches the backend.
#[test]
fn slowloris_head() {
    slow_attack_case("slowloris_head", &[Slow::Head], (200, 3), (2000, 30));
}

/// Slowloris on the body: a head and a few body bytes, then silence. SPEC `body_read`:
/// "longest pause while a client sends a request body (then 408)", and a stalled body "is
/// not charged to the backend nor retried". A body under `replay_buffer` never reaches the
/// backend; a chunked one may have begun to stream (its head and first chunk), never whole.
#[test]
fn slowloris_body() {
    slow_attack_case(
        "slowloris_body",
        &[Slow::BodyLength, Slow::BodyChunked],
        (100, 3),
        (1000, 30),
    );
}

/// Many attackers of every slow kind at once.
#[test]
fn many_slow_attackers_at_once() {
    slow_attack_case(
        "many_slow_attackers",
        &[Slow::Head, Slow::BodyLength, Slow::BodyChunked],
        (300, 3),
        (3000, 30),
    );
}

/// Clients that send requests for large responses and never read them. SPEC: "Bodies
/// stream both ways in constant memory"; conn.rs: a write to the client that makes no
/// progress for `timeouts.idle` resets the connection (NGINX's `send_timeout`), and that is
/// the client's departure, never the backend's failure. So lb's memory stays bounded by
/// its buffers, not by what the attackers asked for; each attacker is cut off before its
/// first response is through; the backend is not blamed; the good client is served.
#[test]
fn clients_that_never_read_their_responses() {
    let backend = big_backend();
    let lb = LbProc::start("never-read", &backend.url(), ATTACK_TIMEOUTS);
    let base = baseline(lb.addr, 50);
    let rss_before = lb.rss_kib();
    let mark = backend.mark();
    let (n, _) = scale((8, 0), (64, 0));
    const PIPELINED: usize = 4;
    let good = GoodClient::start(lb.addr);
    let mut attackers: Vec<std::net::TcpStream> = (0..n)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(lb.addr).unwrap();
            s.write_all(&b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n".repeat(PIPELINED))
                .unwrap();
            s
        })
        .collect();
    // lb gives up on each attacker once its writes have stalled for `idle`: it drops the
    // response, and with it the backend's connection, whose write then fails.
    let deadline = Instant::now() + WAIT;
    let mut rss_max = 0;
    while backend.aborted() < n {
        assert!(
            Instant::now() < deadline,
            "lb still relaying to {} of {n} clients that do not read",
            n - backend.aborted()
        );
        rss_max = rss_max.max(lb.rss_kib());
        std::thread::sleep(Duration::from_millis(50));
    }
    rss_max = rss_max.max(lb.rss_kib());
    let good = good.finish();
    // Each attacker's connection is closed (reset) before even its first response was
    // through; the rest of its pipeline was never forwarded.
    let mut received = Vec::new();
    for s in &mut attackers {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut total = 0usize;
        let mut buf = vec![0u8; 1 << 20];
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(k) => total += k,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    break false
                }
                Err(_) => break true,
            }
        };
        assert!(closed, "an attacker's connection stayed open");
        received.push(total);
    }
    let requested = (n * PIPELINED * BIG) as u64 / 1024;
    report(json!({
        "section": "hostile_h1",
        "case": "never_read",
        "attackers": n,
        "requested_kib": requested,
        "attacker_max_received_kib": received.iter().max().copied().unwrap_or(0) / 1024,
        "good_requests": good.requests(),
        "good_failed": good.failed,
        "good_p50_ms": percentile_ms(&good.latencies, 50.0),
        "good_p99_ms": percentile_ms(&good.latencies, 99.0),
        "good_max_ms": percentile_ms(&good.latencies, 100.0),
        "baseline_p99_ms": percentile_ms(&base.latencies, 99.0),
        "lb_rss_kib_before": rss_before,
        "lb_rss_kib_max": rss_max,
    }));
    assert_served(&good, "the never-read attack");
    for r in &received {
        assert!(*r < BIG, "an attacker got a whole response ({r} bytes)");
    }
    // Bounded: a few MiB per connection of buffers at most, nowhere near what was asked for.
    let grown = rss_max.saturating_sub(rss_before);
    let bound = 16 * 1024 + n as u64 * 2 * 1024;
    assert!(
        grown < bound && bound < requested / 4,
        "lb grew by {grown} KiB relaying {requested} KiB to clients that do not read"
    );
    let big_forwarded = fwd_get("/big", "a");
    let got = backend.requests_since(&mark);
    assert_eq!(
        got.iter().filter(|r| **r == big_forwarded).count(),
        n,
        "one /big per attacker, its pipeline never read further"
    );
    assert_eq!(got.len(), n + good.requests());
    assert_backend_not_charged(&lb);
}

/// A partial request head that arrives in the same read as the request before it (a
/// pipelining client, or a slowloris hiding its first bytes behind a valid request) should
/// get its 408 at `header_read` like any other head (SPEC `timeouts.header_read`: "a client
/// must send its whole request head within this"; fine print: "408, then close").
///
/// Known defect, not fixed: lb arms `idle` instead (the bytes sit in hyper's buffer, which
/// lb's socket wrapper cannot see), so such a connection is closed silently after `idle`
/// rather than answered 408 after `header_read`. The hold is no longer than an idle
/// keep-alive connection's, so nothing is unbounded. Run with `--ignored` to see it.
#[test]
#[ignore = "known defect: a partial head pipelined behind a request waits `idle`, not `header_read`"]
fn a_partial_head_pipelined_behind_a_request_gets_408() {
    let backend = RawBackend::ok();
    let lb = LbProc::start(
        "pipelined-partial",
        &backend.url(),
        "[timeouts]\nheader_read = \"1s\"\nidle = \"4s\"\n",
    );
    let mut c = Client::connect(lb.addr);
    c.send(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\nGET /second HT");
    let mut answers = c.read_answers(2);
    answers.extend(c.read_answers(1));
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [200, 408], "the partial head's 408");
}
