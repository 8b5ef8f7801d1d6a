//! `http1_head`: HTTP/1 request heads through lb-proxy's request validation and header
//! rewriting ([`lb_proxy::fuzzing::forward_head`], the path of every client request).
//!
//! The bytes are parsed the way hyper's HTTP/1 server does (httparse with hyper's settings,
//! then hyper's framing rules: `Transfer-Encoding` only in HTTP/1.1 and ending in chunked,
//! one decimal `Content-Length`, a `Content-Length` beside `Transfer-Encoding` dropped), so
//! what reaches lb-proxy is what hyper would hand it. Invariants (SPEC.md, "Behaviour on
//! the wire"):
//! 1. no head makes lb panic;
//! 2. a refused request gets 400, 405 (exactly for CONNECT) or 501 (only with a transfer
//!    coding);
//! 3. a forwarded head has no hop-by-hop field (`Connection` only as `upgrade` for an
//!    upgrade, `Transfer-Encoding` only as lb's own `chunked`), none of the fields the
//!    client's `Connection` named, no `_` look-alike of a framing or forwarding header, no
//!    `h2c` upgrade, no CR, LF or NUL in any value;
//! 4. exactly one valid `Host`: the absolute-form target's authority, else the client's,
//!    else (HTTP/1.0) the backend's; `X-Forwarded-Host` the same, `X-Forwarded-Proto: http`;
//! 5. one `X-Forwarded-For` that ends with the client's address, appended once to what the
//!    client sent;
//! 6. the body is framed as hyper read it: chunked stays chunked with no `Content-Length`,
//!    a length stays that length (or, if `Connection` named it, becomes chunked), no body
//!    stays without framing headers; never `Content-Length` and `Transfer-Encoding` both;
//! 7. the target is origin form (or `*` for OPTIONS).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Uri, Version};

/// hyper's default `max_headers`.
const MAX_HEADERS: usize = 100;
/// lb's default `limits.max_header_bytes`, hyper's `max_header_size`.
const MAX_HEAD_BYTES: usize = 32_768;
/// The backend the attempts go to.
const BACKEND: &str = "backend.test:8080";
/// Fields a backend might read for the real ones, with `_` read as `-`.
const LOOK_ALIKES: [&str; 6] = [
    "host",
    "content-length",
    "transfer-encoding",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// What hyper makes of a head: a request and how its body is framed, or its own answer.
#[derive(Debug)]
pub enum Parsed {
    /// Not a whole head yet: hyper waits for more.
    Partial,
    /// hyper answers this status itself; lb never sees the request.
    Refused(u16),
    /// A request for lb.
    Request(Box<Request<()>>, Framing),
}

/// How hyper frames the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// `Content-Length: n`, n > 0.
    Length(u64),
    /// Chunked.
    Chunked,
}

/// The fuzz target: the first byte picks the client's address, the rest is the head.
pub fn http1_head(data: &[u8]) {
    let Some((&pick, head)) = data.split_first() else {
        return;
    };
    let client = match pick % 3 {
        0 => IpAddr::V4(Ipv4Addr::new(192, 0, 2, pick)),
        1 => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(pick))),
        _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    check(head, client);
}

/// Parses `head` as hyper would, as from `client`, and checks every invariant.
///
/// # Panics
/// When an invariant is broken (the message says which).
pub fn check(head: &[u8], client: IpAddr) {
    let (req, framing) = match parse(head) {
        Parsed::Request(r, f) => (*r, f),
        Parsed::Partial | Parsed::Refused(_) => return,
    };
    let original = req.clone();
    let backend = Authority::from_static(BACKEND);
    match lb_proxy::fuzzing::forward_head(req, client, framing == Framing::Empty, &backend) {
        Err(status) => check_refusal(&original, status),
        Ok(out) => check_forwarded(&original, framing, &out, client),
    }
}

/// hyper's HTTP/1 server parse (`proto::h1::role::Server::parse`), as lb configures it.
#[must_use]
pub fn parse(bytes: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if bytes.len() > MAX_HEAD_BYTES => {
            return Parsed::Refused(431)
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::Refused(431),
        Err(_) => return Parsed::Refused(400),
    };
    if len > MAX_HEAD_BYTES {
        return Parsed::Refused(431);
    }
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return Parsed::Refused(400);
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Refused(400);
    };
    let Ok(uri) = path.parse::<Uri>() else {
        return Parsed::Refused(400);
    };
    let version = if minor == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let mut map = HeaderMap::new();
    let (mut length, mut te, mut te_chunked, mut cl_seen) = (None, false, false, false);
    for h in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Parsed::Refused(400);
        };
        if name == header::TRANSFER_ENCODING {
            if version != Version::HTTP_11 {
                return Parsed::Refused(400);
            }
            te = true;
            if cl_seen && length.take().is_some() {
                map.remove(header::CONTENT_LENGTH);
            }
            te_chunked = is_chunked(&value);
        } else if name == header::CONTENT_LENGTH {
            cl_seen = true;
            if te {
                continue;
            }
            let Some(n) = content_length(value.as_bytes()) else {
                return Parsed::Refused(400);
            };
            match length {
                Some(prev) if prev != n => return Parsed::Refused(400),
                Some(_) => continue,
                // hyper's `DecodedLength` has no room for these (lb answers 400).
                None if n > u64::MAX - 2 => return Parsed::Refused(400),
                None => length = Some(n),
            }
        }
        map.append(name, value);
    }
    if te && !te_chunked {
        return Parsed::Refused(400);
    }
    let framing = match (te, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) if n > 0 => Framing::Length(n),
        _ => Framing::Empty,
    };
    let mut r = Request::new(());
    *r.method_mut() = method;
    *r.uri_mut() = uri;
    *r.version_mut() = version;
    *r.headers_mut() = map;
    Parsed::Request(Box::new(r), framing)
}

/// hyper's `headers::is_chunked_`: the last coding is `chunked`.
fn is_chunked(value: &HeaderValue) -> bool {
    value
        .to_str()
        .ok()
        .and_then(|s| s.rsplit(',').next())
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
}

/// hyper's `headers::content_length_parse`: decimal digits only, comma lists of one value.
fn content_length(v: &[u8]) -> Option<u64> {
    let mut result = None;
    for part in v.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = std::str::from_utf8(part).ok()?.parse::<u64>().ok()?;
        match result {
            Some(prev) if prev != n => return None,
            _ => result = Some(n),
        }
    }
    result
}

fn check_refusal(req: &Request<()>, status: u16) {
    assert!(
        matches!(status, 400 | 405 | 501),
        "invariant 2: refused with {status}"
    );
    assert_eq!(
        status == 405,
        req.method() == Method::CONNECT,
        "invariant 2: 405 is for CONNECT, and CONNECT gets 405"
    );
    if status == 501 {
        assert!(
            req.headers().contains_key(header::TRANSFER_ENCODING),
            "invariant 2: 501 without a transfer coding"
        );
    }
}

fn tokens(headers: &HeaderMap, name: &HeaderName) -> Vec<Vec<u8>> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|t| t.trim_ascii().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

fn check_forwarded(req: &Request<()>, framing: Framing, out: &Request<()>, client: IpAddr) {
    let h = out.headers();
    let show = || {
        format!(
            "{:?} {} {:?}\n{h:?}",
            req.method(),
            req.uri(),
            req.headers()
        )
    };
    assert_ne!(
        out.method(),
        Method::CONNECT,
        "invariant 2: CONNECT forwarded"
    );
    let upgrade = h.contains_key(header::UPGRADE);

    // 3: hop-by-hop fields.
    let connection: Vec<&HeaderValue> = h.get_all(header::CONNECTION).iter().collect();
    if upgrade {
        assert_eq!(
            connection,
            ["upgrade"],
            "invariant 3: Connection of an upgrade: {}",
            show()
        );
    } else {
        assert!(
            connection.is_empty(),
            "invariant 3: Connection forwarded: {}",
            show()
        );
    }
    for name in h.keys() {
        let n = name.as_str();
        assert!(
            !matches!(n, "keep-alive" | "te" | "trailer" | "http2-settings")
                && !n.starts_with("proxy-"),
            "invariant 3: {n} forwarded: {}",
            show()
        );
        let look_alike = n.contains('_')
            && LOOK_ALIKES.iter().any(|real| {
                real.len() == n.len()
                    && real
                        .bytes()
                        .zip(n.bytes())
                        .all(|(r, c)| r == c || (r == b'-' && c == b'_'))
            });
        assert!(
            !look_alike,
            "invariant 3: look-alike {n} forwarded: {}",
            show()
        );
    }
    for t in tokens(req.headers(), &header::CONNECTION) {
        let Ok(name) = HeaderName::from_bytes(&t) else {
            continue;
        };
        let lb_sets = [
            header::HOST,
            header::TRANSFER_ENCODING,
            header::CONNECTION,
            header::UPGRADE,
            HeaderName::from_static("x-forwarded-for"),
            HeaderName::from_static("x-forwarded-proto"),
            HeaderName::from_static("x-forwarded-host"),
        ];
        if !lb_sets.contains(&name) {
            assert!(
                !h.contains_key(&name),
                "invariant 3: {name}, named by Connection, forwarded: {}",
                show()
            );
        }
    }
    for t in tokens(h, &header::UPGRADE) {
        let proto = t.split(|&b| b == b'/').next().unwrap_or_default();
        assert!(
            proto != b"h2c" && proto != b"h2" && !proto.starts_with(b"h2c-"),
            "invariant 3: h2c upgrade forwarded: {}",
            show()
        );
    }
    for (name, v) in h {
        assert!(
            !v.as_bytes().iter().any(|b| matches!(b, b'\r' | b'\n' | 0)),
            "invariant 3: CR, LF or NUL in {name}: {}",
            show()
        );
    }

    // 4: Host.
    let hosts: Vec<&HeaderValue> = h.get_all(header::HOST).iter().collect();
    assert_eq!(hosts.len(), 1, "invariant 4: one Host: {}", show());
    let host = hosts[0];
    let want = match req.uri().authority() {
        Some(a) => a.as_str().as_bytes().to_vec(),
        None => match req.headers().get(header::HOST) {
            Some(v) => v.as_bytes().to_vec(),
            None => BACKEND.as_bytes().to_vec(),
        },
    };
    assert_eq!(
        host.as_bytes(),
        &want[..],
        "invariant 4: which Host: {}",
        show()
    );
    assert!(
        !host.is_empty()
            && !host
                .as_bytes()
                .iter()
                .any(|b| b.is_ascii_whitespace() || *b == b'@' || *b == b'/'),
        "invariant 4: Host is valid: {}",
        show()
    );
    let xfh: Vec<&HeaderValue> = h.get_all("x-forwarded-host").iter().collect();
    let xfp: Vec<&HeaderValue> = h.get_all("x-forwarded-proto").iter().collect();
    assert_eq!(xfp, ["http"], "invariant 4: X-Forwarded-Proto: {}", show());
    // X-Forwarded-Host is the client's Host (or the target's), never the backend's.
    if req.uri().authority().is_some() || req.headers().contains_key(header::HOST) {
        assert_eq!(xfh, [host], "invariant 4: X-Forwarded-Host: {}", show());
    } else {
        assert!(
            xfh.is_empty(),
            "invariant 4: X-Forwarded-Host without a Host: {}",
            show()
        );
    }

    // 5: X-Forwarded-For.
    let xff: Vec<&HeaderValue> = h.get_all("x-forwarded-for").iter().collect();
    assert_eq!(xff.len(), 1, "invariant 5: one X-Forwarded-For: {}", show());
    let prior: Vec<&str> = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let ip = client.to_string();
    let want = if prior.is_empty() {
        ip.clone()
    } else {
        format!("{}, {ip}", prior.join(", "))
    };
    assert_eq!(
        xff[0].as_bytes(),
        want.as_bytes(),
        "invariant 5: X-Forwarded-For: {}",
        show()
    );

    // 6: framing.
    let lengths: Vec<&HeaderValue> = h.get_all(header::CONTENT_LENGTH).iter().collect();
    let codings: Vec<&HeaderValue> = h.get_all(header::TRANSFER_ENCODING).iter().collect();
    assert!(
        lengths.is_empty() || codings.is_empty(),
        "invariant 6: Content-Length and Transfer-Encoding both: {}",
        show()
    );
    assert!(
        lengths.len() <= 1,
        "invariant 6: Content-Length twice: {}",
        show()
    );
    let chunked = codings == ["chunked"];
    assert!(
        codings.is_empty() || chunked,
        "invariant 6: codings {codings:?}: {}",
        show()
    );
    let length = lengths.first().and_then(|v| content_length(v.as_bytes()));
    match framing {
        Framing::Chunked => assert!(
            chunked,
            "invariant 6: a chunked body not sent chunked: {}",
            show()
        ),
        Framing::Length(n) => assert!(
            length == Some(n) || (chunked && lengths.is_empty()),
            "invariant 6: a body of {n} bytes framed otherwise: {}",
            show()
        ),
        Framing::Empty => assert!(
            !chunked && length.is_none_or(|n| n == 0),
            "invariant 6: a request without a body framed with one: {}",
            show()
        ),
    }

    // 7: target.
    let target = out.uri().to_string();
    assert!(
        target.starts_with('/') || (target == "*" && out.method() == Method::OPTIONS),
        "invariant 7: target {target:?}: {}",
        show()
    );
    assert_eq!(out.version(), Version::HTTP_11);
}
