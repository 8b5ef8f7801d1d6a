//! Which client requests are forwarded at all, and the routing and framing headers they are
//! forwarded with (RFC 9110 §7.2, RFC 9112 §3.2 and §6, RFC 9113 §8.3).
//!
//! # Why the proxy is strict here
//! A backend behind lb trusts what lb tells it: where a request was addressed (`Host`), how
//! long its body is, who sent it (`X-Forwarded-*`). Whenever lb and a backend could read one
//! request two ways (two `Host` lines, a `Host` that disagrees with the target, a
//! `Content_Length` that some servers fold into `Content-Length`, a transfer coding lb
//! would pass on undecoded), an attacker picks the reading that suits them: cache
//! poisoning, routing around access rules, request smuggling. So every such request is
//! answered by lb itself and never reaches a backend (NGINX and HAProxy do the same);
//! what is forwarded has exactly one `Host`, a body framed one way, and no look-alikes of
//! the headers lb sets.
//!
//! hyper has already rejected what it cannot frame (a `Transfer-Encoding` whose last coding
//! is not chunked, differing or non-decimal `Content-Length`s): [`admit`] sees the rest.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};

use crate::body::ResponseBody;
use crate::respond;

/// Why a request is answered by the proxy itself and never forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rejection {
    /// What the client gets.
    pub(crate) status: StatusCode,
    /// For the debug log.
    pub(crate) reason: &'static str,
}

const fn reject(status: StatusCode, reason: &'static str) -> Rejection {
    Rejection { status, reason }
}

/// What `Allow` says in a 405: lb forwards every method but CONNECT.
const ALLOWED: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH";

impl Rejection {
    /// The response: the status and its reason, and, for HTTP/1, `Connection: close`.
    ///
    /// A rejected request's body is never read, so where it ends on the connection is
    /// unknown (and for framing errors, ambiguous): the connection cannot carry another
    /// request (RFC 9112 §6.3, §9.6).
    pub(crate) fn response(&self, version: Version) -> Response<ResponseBody> {
        let mut resp = respond::synthetic(self.status);
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(ALLOWED));
        }
        if version < Version::HTTP_2 {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// Request headers a backend might read in place of the ones lb vouches for, were it to
/// read `_` as `-` (as CGI-style servers do); the real ones never contain `_`.
const LOOK_ALIKES: [&str; 6] = [
    "host",
    "content-length",
    "transfer-encoding",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// Checks a client's request head and settles its routing and framing headers, or says why
/// it must not be forwarded. On success the request has exactly one valid `Host` (except an
/// HTTP/1.0 request that had none): the target's authority if it has one (absolute form,
/// HTTP/2 `:authority`), otherwise the client's `Host`. Also removes the `h2c` upgrade
/// (lb speaks h2c by prior knowledge only), headers that read as ones lb vouches for, and
/// joins HTTP/2 cookie crumbs into the one `Cookie` an HTTP/1.1 backend expects.
pub(crate) fn admit<B>(req: &mut Request<B>) -> Result<(), Rejection> {
    if req.method() == Method::CONNECT {
        // lb is a reverse proxy: it has no tunnel to offer (RFC 9110 §9.3.6).
        return Err(reject(StatusCode::METHOD_NOT_ALLOWED, "CONNECT"));
    }
    if req.uri().path() == "*" && req.method() != Method::OPTIONS {
        // Asterisk form is for a server-wide OPTIONS only (RFC 9112 §3.2.4); a backend
        // reading `GET *` (or HTTP/2's `PRI *` preface as a request) its own way is the risk.
        return Err(reject(StatusCode::BAD_REQUEST, "asterisk-form target"));
    }
    let version = req.version();
    let target = match target_authority(req.uri())? {
        Some(a) => Some(
            HeaderValue::from_str(a)
                .map_err(|_| reject(StatusCode::BAD_REQUEST, "invalid target authority"))?,
        ),
        None => None,
    };
    let headers = req.headers_mut();
    match target {
        Some(host) => {
            // The target wins (RFC 9112 §3.2.2, RFC 9113 §8.3.1), but an HTTP/1 request must
            // still carry one valid Host of its own (RFC 9112 §3.2).
            if version < Version::HTTP_2 {
                client_host(headers, version)?;
            }
            headers.insert(header::HOST, host);
        }
        None => {
            if client_host(headers, version)?.is_none() && version == Version::HTTP_2 {
                // `http` and `https` need an authority (RFC 9113 §8.3.1).
                return Err(reject(StatusCode::BAD_REQUEST, "no :authority or Host"));
            }
        }
    }
    if version < Version::HTTP_2 {
        transfer_codings(headers)?;
        upgrade_readable(headers)?;
        drop_h2c_upgrade(headers);
    } else {
        h2_fields(headers)?;
        join_cookies(headers);
    }
    drop_look_alikes(headers);
    Ok(())
}

/// The target in origin form, as an attempt sends it: `/` for an empty path (RFC 9112
/// §3.2.1). An absolute-form target with an empty path and a fragment (`http://a#f`)
/// parses to an empty path-and-query, which would go out as no target at all
/// (`GET  HTTP/1.1`).
pub(crate) fn origin_form(uri: &http::Uri) -> http::uri::PathAndQuery {
    // An empty one reads as `/` (`as_str`, `path`) but is written as nothing.
    uri.path_and_query()
        .filter(|pq| pq.path() != "/" || pq.query().is_some())
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))
}

/// The request target's authority, if it has one; invalid target forms are rejected.
fn target_authority(uri: &http::Uri) -> Result<Option<&str>, Rejection> {
    let Some(authority) = uri.authority() else {
        return Ok(None);
    };
    match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https") => {}
        // Authority form is for CONNECT only (RFC 9112 §3.2.3).
        None => return Err(reject(StatusCode::BAD_REQUEST, "authority-form target")),
        Some(_) => return Err(reject(StatusCode::BAD_REQUEST, "target scheme not http")),
    }
    // Userinfo is deprecated and treated as an error (RFC 9110 §4.2.4).
    if !valid_host(authority.as_str().as_bytes()) {
        return Err(reject(StatusCode::BAD_REQUEST, "invalid target authority"));
    }
    Ok(Some(authority.as_str()))
}

/// The client's one `Host`. Two, an invalid one, or none in HTTP/1.1 is a 400 (RFC 9112
/// §3.2); HTTP/1.0 predates `Host`.
fn client_host(headers: &HeaderMap, version: Version) -> Result<Option<&HeaderValue>, Rejection> {
    let mut all = headers.get_all(header::HOST).iter();
    let host = all.next();
    if all.next().is_some() {
        return Err(reject(StatusCode::BAD_REQUEST, "more than one Host"));
    }
    match host {
        Some(h) if !valid_host(h.as_bytes()) => {
            Err(reject(StatusCode::BAD_REQUEST, "invalid Host"))
        }
        None if version == Version::HTTP_11 => Err(reject(StatusCode::BAD_REQUEST, "no Host")),
        _ => Ok(host),
    }
}

/// Returns true if and only if `v` is `uri-host [ ":" port ]` (RFC 9110 §7.2, RFC 3986
/// §3.2.2) with a non-empty host and a port of at most 65535 ([`valid_port`]): no userinfo,
/// no path, no whitespace.
fn valid_host(v: &[u8]) -> bool {
    let (host_ok, rest) = if v.first() == Some(&b'[') {
        match v.iter().position(|&b| b == b']') {
            Some(end) => (ip_literal(&v[1..end]), &v[end + 1..]),
            None => return false,
        }
    } else {
        let end = v.iter().position(|&b| b == b':').unwrap_or(v.len());
        (reg_name(&v[..end]), &v[end..])
    };
    let port_ok = match rest.split_first() {
        None => true,
        Some((b':', port)) => valid_port(port),
        Some(_) => false,
    };
    host_ok && port_ok
}

/// `port = *DIGIT` (RFC 3986 §3.2.3) that a TCP port can be: empty (the scheme's default,
/// as RFC 3986 §6.2.3 reads `a:`), or a number up to 65535, leading zeros allowed.
/// A larger one is refused: a backend would read it as some other port, or fail on it.
fn valid_port(port: &[u8]) -> bool {
    port.iter().all(u8::is_ascii_digit)
        && port
            .iter()
            .try_fold(0u32, |n, &d| {
                let n = n * 10 + u32::from(d - b'0');
                (n <= u32::from(u16::MAX)).then_some(n)
            })
            .is_some()
}

const fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

const fn sub_delim(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
    )
}

/// `reg-name` (or an IPv4 address, which is one), not empty.
fn reg_name(h: &[u8]) -> bool {
    let mut i = 0;
    while i < h.len() {
        match h[i] {
            b'%' => {
                let hex = h.get(i + 1..i + 3);
                if !hex.is_some_and(|x| x.iter().all(u8::is_ascii_hexdigit)) {
                    return false;
                }
                i += 3;
            }
            b if unreserved(b) || sub_delim(b) => i += 1,
            _ => return false,
        }
    }
    !h.is_empty()
}

/// What is between `[` and `]`: an IPv6 address or an `IPvFuture`.
fn ip_literal(l: &[u8]) -> bool {
    if let Some((b'v' | b'V', rest)) = l.split_first() {
        let dot = rest.iter().position(|&b| b == b'.');
        return dot.is_some_and(|d| {
            d > 0
                && rest[..d].iter().all(u8::is_ascii_hexdigit)
                && rest.len() > d + 1
                && rest[d + 1..]
                    .iter()
                    .all(|&b| unreserved(b) || sub_delim(b) || b == b':')
        });
    }
    std::str::from_utf8(l)
        .ok()
        .and_then(|s| s.parse::<std::net::Ipv6Addr>().ok())
        .is_some()
}

/// Transfer codings lb can pass on: `chunked`, once. hyper decodes chunked and has made
/// sure it comes last; any other coding would reach the backend still applied but no
/// longer declared (RFC 9112 §6.1: 501), and `chunked` twice is a framing error (§7).
fn transfer_codings(headers: &HeaderMap) -> Result<(), Rejection> {
    let mut chunked = 0;
    for line in headers.get_all(header::TRANSFER_ENCODING) {
        let line = line
            .to_str()
            .map_err(|_| reject(StatusCode::BAD_REQUEST, "invalid Transfer-Encoding"))?;
        for coding in line.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if !coding.eq_ignore_ascii_case("chunked") {
                return Err(reject(StatusCode::NOT_IMPLEMENTED, "transfer coding"));
            }
            chunked += 1;
        }
    }
    if chunked > 1 {
        return Err(reject(StatusCode::BAD_REQUEST, "chunked more than once"));
    }
    Ok(())
}

/// `Connection` and `Upgrade` decide what is hop-by-hop and whether the connection becomes a
/// tunnel: a value with bytes outside visible ASCII (obs-text, which no token may hold, RFC
/// 9110 §5.6.2) is refused rather than read one way here and another way by the backend.
fn upgrade_readable(headers: &HeaderMap) -> Result<(), Rejection> {
    let readable = |name| headers.get_all(name).iter().all(|v| v.to_str().is_ok());
    if readable(header::CONNECTION) && readable(header::UPGRADE) {
        Ok(())
    } else {
        Err(reject(
            StatusCode::BAD_REQUEST,
            "Connection or Upgrade not visible ASCII",
        ))
    }
}

static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Removes the `h2c` offer (and its drafts', and `h2`'s) from `Upgrade` (and its `HTTP2-Settings`): lb speaks h2c by prior
/// knowledge only, and a backend's `101` to it would open a raw tunnel past lb. What is left
/// (a WebSocket offer beside it, say) still upgrades; with nothing left the request goes on
/// as plain HTTP/1.1 (RFC 9110 §7.8: the server may ignore an upgrade).
fn drop_h2c_upgrade(headers: &mut HeaderMap) {
    headers.remove(&HTTP2_SETTINGS);
    // Its drafts (`h2c-14`) and `h2`, which is for TLS only (RFC 9113 §3.2), alike.
    let is_h2c = |p: &str| {
        let name = p.split('/').next().unwrap_or(p).trim().to_ascii_lowercase();
        name == "h2c" || name == "h2" || name.starts_with("h2c-")
    };
    let offers: Vec<String> = headers
        .get_all(header::UPGRADE)
        .iter()
        // `upgrade_readable` has refused any value that is not visible ASCII.
        .map(|v| v.to_str().unwrap_or(""))
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    if !offers.iter().any(|p| is_h2c(p)) {
        return;
    }
    let kept: Vec<&str> = offers
        .iter()
        .map(String::as_str)
        .filter(|p| !is_h2c(p))
        .collect();
    headers.remove(header::UPGRADE);
    if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
        if !kept.is_empty() {
            headers.insert(header::UPGRADE, v);
        }
    }
}

/// What HTTP/2 framing lets through but an HTTP/1.1 backend would read its own way: a field
/// value with leading or trailing whitespace is malformed (RFC 9113 §8.2.1), and
/// `Content-Length` more than once is one length if they all agree (RFC 9110 §8.6: then sent
/// once) and ambiguous if not (h2 checks the body against the first one only).
fn h2_fields(headers: &mut HeaderMap) -> Result<(), Rejection> {
    let padded = |v: &HeaderValue| {
        let b = v.as_bytes();
        let ws = |c: Option<&u8>| matches!(c, Some(b' ' | b'\t'));
        ws(b.first()) || ws(b.last())
    };
    if headers.values().any(padded) {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            "field value with surrounding whitespace",
        ));
    }
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    if let (Some(first), Some(_)) = (lengths.next(), lengths.next()) {
        let first = first.clone();
        if headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| *v != first)
        {
            return Err(reject(StatusCode::BAD_REQUEST, "differing Content-Length"));
        }
        headers.insert(header::CONTENT_LENGTH, first);
    }
    Ok(())
}

/// HTTP/2 may split `Cookie` into crumbs, one field each; HTTP/1.1 wants one field, joined
/// with `; ` (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (crumbs.next(), crumbs.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for crumb in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(crumb.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// Returns true if and only if `name` reads as one of [`LOOK_ALIKES`] when `_` is read as
/// `-`, and is not that header itself.
fn is_look_alike(name: &str) -> bool {
    name.contains('_')
        && LOOK_ALIKES.iter().any(|real| {
            real.len() == name.len()
                && real
                    .bytes()
                    .zip(name.bytes())
                    .all(|(r, n)| r == n || (r == b'-' && n == b'_'))
        })
}

fn drop_look_alikes(headers: &mut HeaderMap) {
    // Names are few and short; the scan costs less than a removal would.
    if !headers.keys().any(|k| is_look_alike(k.as_str())) {
        return;
    }
    let found: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_look_alike(k.as_str()))
        .cloned()
        .collect();
    for name in found {
        headers.remove(&name);
    }
}

/// The bytes of the request head being read, kept to correct hyper's own answer to a head
/// it refused before the service saw it.
///
/// # Why
/// hyper answers a `Content-Length` of `u64::MAX` or `u64::MAX - 1` with 431, as if the
/// head were too large (its `DecodedLength` has no room for them), where the request is
/// malformed: 400 (SPEC). hyper has no hook for its automatic responses, so the client
/// socket keeps what it read of the current head (up to the head size limit, a copy of a
/// few hundred bytes per request) and, when hyper writes a 431 while a head is being read,
/// looks at the head: a head within the limits whose `Content-Length` is such a number gets
/// a 400 instead. A head that arrives while the previous request is still being served
/// (pipelining) is not kept and keeps hyper's 431.
#[derive(Debug)]
pub(crate) struct HeadCopy {
    bytes: Vec<u8>,
    limit: usize,
}

/// As many headers as hyper parses (its `DEFAULT_MAX_HEADERS`): more is a true 431.
const HYPER_MAX_HEADERS: usize = 100;

impl HeadCopy {
    /// Keeps up to `limit` bytes (hyper's `max_header_size`).
    pub(crate) const fn new(limit: usize) -> Self {
        Self {
            bytes: Vec::new(),
            limit,
        }
    }

    /// More bytes of the head being read.
    pub(crate) fn record(&mut self, new: &[u8]) {
        let room = self.limit.saturating_sub(self.bytes.len());
        self.bytes.extend_from_slice(&new[..new.len().min(room)]);
    }

    /// The head was taken up (or the connection moved on): forget it.
    pub(crate) fn clear(&mut self) {
        self.bytes.clear();
    }

    /// What to send instead of `out`, hyper's automatic response to the kept head, if that
    /// response is wrong.
    pub(crate) fn correct(&self, out: &[u8]) -> Option<&'static [u8]> {
        if !out.starts_with(b"HTTP/1.1 431 ") {
            return None;
        }
        let mut headers = [httparse::EMPTY_HEADER; HYPER_MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(&self.bytes), Ok(httparse::Status::Complete(_))) {
            return None; // too large or too many headers: 431 is right
        }
        let beyond_hyper = |v: &[u8]| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .is_some_and(|n| n > u64::MAX - 2)
        };
        req.headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("content-length") && beyond_hyper(h.value))
            .then_some(respond::BAD_REQUEST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri).version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn h1(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        req(Version::HTTP_11, "GET", uri, headers)
    }

    fn status(r: &mut Request<()>) -> u16 {
        match admit(r) {
            Ok(()) => 200,
            Err(e) => e.status.as_u16(),
        }
    }

    #[test]
    fn host_is_required_single_and_valid_in_http_1_1() {
        for (headers, want) in [
            (&[("host", "app.example")][..], 200),
            (&[("host", "app.example:8080")], 200),
            (&[("host", "127.0.0.1:80")], 200),
            (&[("host", "[::1]:80")], 200),
            (&[("host", "[v1.fe80::a+en1]")], 200),
            (&[("host", "a%20b")], 200),
            (&[], 400),
            (&[("host", "a"), ("host", "a")], 400),
            (&[("host", "")], 400),
            (&[("host", "a b")], 400),
            (&[("host", "user@a")], 400),
            (&[("host", "a/b")], 400),
            (&[("host", "a:80x")], 400),
            (&[("host", "a%zz")], 400),
            (&[("host", "[::1")], 400),
            (&[("host", "[nothex]")], 400),
            (&[("host", "[::1]x")], 400),
            (&[("host", "a\\b")], 400),
        ] {
            assert_eq!(status(&mut h1("/", headers)), want, "{headers:?}");
        }
        // HTTP/1.0 predates Host; two are still ambiguous.
        let mut old = req(Version::HTTP_10, "GET", "/", &[]);
        assert_eq!(status(&mut old), 200);
        let mut old = req(
            Version::HTTP_10,
            "GET",
            "/",
            &[("host", "a"), ("host", "b")],
        );
        assert_eq!(status(&mut old), 400);
    }

    #[test]
    fn the_target_authority_replaces_host() {
        let mut r = h1("http://real.example:81/x", &[("host", "other")]);
        assert_eq!(status(&mut r), 200);
        assert_eq!(r.headers()["host"], "real.example:81");
        assert_eq!(r.headers().get_all("host").iter().count(), 1);
        for bad in ["http://u:p@real/", "ftp://real/"] {
            assert_eq!(status(&mut h1(bad, &[("host", "real")])), 400, "{bad}");
        }
        assert_eq!(status(&mut h1("real:80", &[("host", "real")])), 400);
        assert_eq!(
            status(&mut h1("http://real/", &[])),
            400,
            "HTTP/1.1 needs Host"
        );

        let h2 = |uri, headers| req(Version::HTTP_2, "GET", uri, headers);
        let mut r = h2("http://auth.example/", &[("host", "other")]);
        assert_eq!(status(&mut r), 200);
        assert_eq!(r.headers()["host"], "auth.example");
        let mut r = h2("/", &[("host", "only.host")]);
        assert_eq!(status(&mut r), 200);
        assert_eq!(r.headers()["host"], "only.host");
        assert_eq!(status(&mut h2("/", &[])), 400);
        assert_eq!(status(&mut h2("https://user@auth.example/", &[])), 400);
    }

    #[test]
    fn connect_gets_405_with_allow() {
        let mut r = req(Version::HTTP_11, "CONNECT", "a:443", &[("host", "a:443")]);
        let e = admit(&mut r).unwrap_err();
        assert_eq!(e.status, 405);
        let resp = e.response(Version::HTTP_11);
        assert!(!resp.headers()["allow"]
            .to_str()
            .unwrap()
            .contains("CONNECT"));
        assert_eq!(resp.headers()["connection"], "close");
        assert!(!e
            .response(Version::HTTP_2)
            .headers()
            .contains_key("connection"));
    }

    #[test]
    fn transfer_codings_other_than_one_chunked_are_refused() {
        let te = |v: &[&str]| {
            let headers: Vec<(&str, &str)> = std::iter::once(("host", "a"))
                .chain(v.iter().map(|v| ("transfer-encoding", *v)))
                .collect();
            status(&mut h1("/", &headers))
        };
        assert_eq!(te(&["chunked"]), 200);
        assert_eq!(te(&["Chunked"]), 200);
        assert_eq!(te(&["gzip, chunked"]), 501);
        assert_eq!(te(&["gzip", "chunked"]), 501);
        assert_eq!(te(&["chunked;x=1"]), 501);
        assert_eq!(te(&["chunked, chunked"]), 400);
        assert_eq!(te(&["chunked", "chunked"]), 400);
    }

    #[test]
    fn h2c_upgrade_is_removed_and_other_offers_kept() {
        let mut r = h1(
            "/",
            &[
                ("host", "a"),
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", "h2c"),
                ("http2-settings", "AAMAAABkAAQAAP__"),
            ],
        );
        assert_eq!(status(&mut r), 200);
        assert!(!r.headers().contains_key("upgrade"));
        assert!(!r.headers().contains_key("http2-settings"));
        assert!(!crate::headers::is_upgrade(r.headers()));

        let mut r = h1(
            "/",
            &[
                ("host", "a"),
                ("connection", "upgrade"),
                ("upgrade", "H2C, websocket"),
            ],
        );
        assert_eq!(status(&mut r), 200);
        assert_eq!(r.headers()["upgrade"], "websocket");
        assert!(crate::headers::is_upgrade(r.headers()));

        let mut r = h1(
            "/",
            &[
                ("host", "a"),
                ("connection", "upgrade"),
                ("upgrade", "h2c-14, H2, foo/1"),
                ("upgrade", "h2c/1"),
            ],
        );
        assert_eq!(status(&mut r), 200);
        let left: Vec<_> = r.headers().get_all("upgrade").iter().collect();
        assert_eq!(left, ["foo/1"]);
    }

    #[test]
    fn look_alikes_of_framing_and_forwarding_headers_are_dropped() {
        let mut r = h1(
            "/",
            &[
                ("host", "a"),
                ("content_length", "5"),
                ("transfer_encoding", "chunked"),
                ("x_forwarded_for", "6.6.6.6"),
                ("x-forwarded_proto", "https"),
                ("x_forwarded-host", "evil"),
                ("x_custom_thing", "kept"),
                ("x-forwarded-for", "1.1.1.1"),
            ],
        );
        assert_eq!(status(&mut r), 200);
        let mut names: Vec<&str> = r.headers().keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["host", "x-forwarded-for", "x_custom_thing"]);
    }

    #[test]
    fn only_hypers_431_for_a_huge_content_length_becomes_400() {
        let auto = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        let copy = |head: &[u8], limit| {
            let mut c = HeadCopy::new(limit);
            for piece in head.chunks(7) {
                c.record(piece);
            }
            c
        };
        for n in [u64::MAX, u64::MAX - 1] {
            let head = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {n}\r\n\r\n");
            let c = copy(head.as_bytes(), 1024);
            assert_eq!(c.correct(auto), Some(respond::BAD_REQUEST));
            assert_eq!(c.correct(b"HTTP/1.1 400 Bad Request\r\n\r\n"), None);
            assert_eq!(
                copy(head.as_bytes(), 20).correct(auto),
                None,
                "over the limit"
            );
        }
        let fine = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551613\r\n\r\n";
        assert_eq!(copy(fine, 1024).correct(auto), None);
        let many: String = (0..101).map(|i| format!("x{i}: 1\r\n")).collect();
        let many = format!(
            "GET / HTTP/1.1\r\nContent-Length: {}\r\n{many}\r\n",
            u64::MAX
        );
        assert_eq!(
            copy(many.as_bytes(), 1 << 16).correct(auto),
            None,
            "too many headers"
        );
        let mut c = copy(fine, 1024);
        c.clear();
        assert_eq!(c.correct(auto), None);
    }

    #[test]
    fn http2_cookie_crumbs_are_joined() {
        let mut r = req(
            Version::HTTP_2,
            "GET",
            "http://a/",
            &[("cookie", "a=1"), ("cookie", "b=2"), ("cookie", "c=3")],
        );
        assert_eq!(status(&mut r), 200);
        let cookies: Vec<_> = r.headers().get_all("cookie").iter().collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);
    }

    #[test]
    fn connection_or_upgrade_with_obs_text_is_refused() {
        for (name, value) in [
            ("upgrade", &b"h2c, \x80"[..]),
            ("upgrade", b"h2c\x80"),
            ("connection", b"x-secret, \xff"),
        ] {
            let mut r = h1("/", &[("host", "a"), ("connection", "upgrade")]);
            r.headers_mut()
                .append(name, HeaderValue::from_bytes(value).unwrap());
            assert_eq!(status(&mut r), 400, "{name}: {value:?}");
        }
        let mut r = h1("/", &[("host", "a"), ("x-other", "x")]);
        r.headers_mut()
            .insert("x-other", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        assert_eq!(
            status(&mut r),
            200,
            "obs-text elsewhere is the backend's business"
        );
    }

    #[test]
    fn http2_fields_padded_or_with_differing_lengths_are_refused() {
        let h2 = |headers: &[(&str, &str)]| req(Version::HTTP_2, "POST", "http://a/", headers);
        let mut r = h2(&[("content-length", "3"), ("content-length", "3")]);
        assert_eq!(status(&mut r), 200);
        let lengths: Vec<_> = r.headers().get_all("content-length").iter().collect();
        assert_eq!(lengths, ["3"]);
        for bad in [
            &[("content-length", "3"), ("content-length", "4")][..],
            &[("x-a", " 1")],
            &[("x-a", "1 ")],
            &[("x-a", "1\t")],
            &[("content-length", "3 ")],
        ] {
            assert_eq!(status(&mut h2(bad)), 400, "{bad:?}");
        }
        assert_eq!(status(&mut h2(&[("x-a", "1 2")])), 200);
        // HTTP/1 parsing has trimmed whatever surrounded a value already.
        let mut r = req(
            Version::HTTP_11,
            "GET",
            "/",
            &[("host", "a"), ("x-a", " 1")],
        );
        assert_eq!(status(&mut r), 200);
    }

    #[test]
    fn asterisk_form_is_for_options_only() {
        for version in [Version::HTTP_11, Version::HTTP_2] {
            let host: &[(&str, &str)] = &[("host", "a")];
            for method in ["GET", "POST", "PRI", "HEAD", "DELETE"] {
                let mut r = req(version, method, "*", host);
                assert_eq!(status(&mut r), 400, "{method} * {version:?}");
            }
            let mut r = req(version, "OPTIONS", "*", host);
            assert_eq!(status(&mut r), 200, "OPTIONS * {version:?}");
        }
        let mut r = req(Version::HTTP_2, "GET", "http://a/*", &[]);
        assert_eq!(status(&mut r), 200, "a path named * is not asterisk form");
    }

    #[test]
    fn ports_must_fit_a_tcp_port() {
        for (host, want) in [
            ("a:65535", 200),
            ("a:0", 200),
            ("a:00080", 200),
            ("a:", 200),
            ("[::1]:443", 200),
            ("a:65536", 400),
            ("a:99999", 400),
            ("a:999999999999999999999999", 400),
            ("[::1]:70000", 400),
            ("a:8o", 400),
        ] {
            assert_eq!(
                status(&mut h1("/", &[("host", host)])),
                want,
                "Host: {host}"
            );
        }
        for (uri, want) in [("http://real:8080/p", 200), ("http://real:99999/p", 400)] {
            assert_eq!(status(&mut h1(uri, &[("host", "a")])), want, "{uri}");
            let mut r = req(Version::HTTP_2, "GET", uri, &[]);
            assert_eq!(status(&mut r), want, "h2 {uri}");
        }
    }
}
