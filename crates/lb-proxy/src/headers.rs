//! Header rewriting between client and backend (RFC 9110 §7.6.1, hop-by-hop fields).

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// The client's address as an `X-Forwarded-For` value, made once per connection.
pub(crate) fn client_value(ip: IpAddr) -> HeaderValue {
    HeaderValue::try_from(ip.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Returns true if and only if the request asks to switch protocols (WebSocket and the like).
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(b"upgrade"))
}

/// The comma-separated list elements of every `name` field, trimmed, on bytes: a value that
/// is not UTF-8 must not hide its tokens (RFC 9110 §5.6.1).
fn list_tokens<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    list_tokens(headers, &header::CONNECTION)
}

/// Returns true if and only if every protocol a `101` response switches to (its `Upgrade`,
/// not empty) is one the client offered in `offered` (its `Upgrade` values): a server may
/// only switch to one of those (RFC 9110 §7.8). Names compare case-insensitively; a
/// version, when both sides give one, must match too.
pub(crate) fn upgrade_accepted(offered: &[HeaderValue], response: &HeaderMap) -> bool {
    let split = |p: &[u8]| -> (Vec<u8>, Option<Vec<u8>>) {
        let mut parts = p.splitn(2, |&b| b == b'/');
        let name = parts.next().unwrap_or_default().trim_ascii();
        let version = parts.next().map(|v| v.trim_ascii().to_ascii_lowercase());
        (name.to_ascii_lowercase(), version)
    };
    let offers: Vec<_> = offered
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .map(split)
        .collect();
    let mut chosen = list_tokens(response, &header::UPGRADE).peekable();
    chosen.peek().is_some()
        && chosen.map(split).all(|(name, version)| {
            offers
                .iter()
                .any(|(n, v)| *n == name && (v.is_none() || version.is_none() || *v == version))
        })
}

/// Returns true if and only if lb sets or keeps `name` itself, so `Connection` cannot remove it.
fn is_vouched(name: &HeaderName) -> bool {
    *name == header::HOST
        || *name == X_FORWARDED_FOR
        || *name == X_FORWARDED_PROTO
        || *name == X_FORWARDED_HOST
}

/// Removes hop-by-hop fields: `Connection` and every field it names, `Keep-Alive`, `Proxy-*`,
/// `TE`, `Trailer`, `Transfer-Encoding` and `Upgrade`. With `upgrade`, `Upgrade` stays and
/// `Connection: upgrade` is set, so the protocol switch reaches the other side.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // One pass over the names finds whether there is anything to remove at all: most
    // messages carry no hop-by-hop field, and a removal costs a hash and a probe per name.
    let is_hop = |k: &HeaderName| {
        *k == header::CONNECTION
            || *k == KEEP_ALIVE
            || *k == header::TE
            || *k == header::TRAILER
            || *k == header::TRANSFER_ENCODING
            || *k == header::UPGRADE
            || k.as_str().starts_with("proxy-")
    };
    if headers.keys().any(is_hop) {
        // `Connection` may name any field, but not the ones lb vouches for: `Connection: Host`
        // must not leave the backend guessing where the request was addressed.
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .filter(|n| !is_vouched(n))
            .collect();
        let listed: Vec<HeaderName> = headers.keys().filter(|k| is_hop(k)).cloned().collect();
        for name in named.into_iter().chain(listed) {
            if !(upgrade && name == header::UPGRADE) {
                headers.remove(&name);
            }
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Prepares a backend's response headers for the client: hop-by-hop fields removed (but
/// `Upgrade` with `upgrade`), and, when the backend sent `Transfer-Encoding`, its
/// `Content-Length` too: hyper framed the body by Transfer-Encoding (RFC 9112 §6.3), so
/// the length is not the body's and must not frame it towards the client.
pub(crate) fn backward(headers: &mut HeaderMap, upgrade: bool) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(headers, upgrade);
}

/// Prepares the client's headers for every attempt: hop-by-hop fields removed, the client's
/// `Host` kept (taken from the URI's authority for HTTP/2 clients), `X-Forwarded-For` with
/// the client's address appended once, `X-Forwarded-Proto` (`https` for a client over TLS)
/// and `X-Forwarded-Host` set to this hop's values.
pub(crate) fn forward(
    headers: &mut HeaderMap,
    authority: Option<&str>,
    client: &HeaderValue,
    https: bool,
    upgrade: bool,
) {
    strip_hop_by_hop(headers, upgrade);
    let host = headers
        .get(header::HOST)
        .cloned()
        .or_else(|| authority.and_then(|a| HeaderValue::from_str(a).ok()));
    if let Some(host) = &host {
        headers.insert(header::HOST, host.clone());
    }
    let prior: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if prior.is_empty() {
        headers.insert(&X_FORWARDED_FOR, client.clone());
    } else {
        let xff = format!(
            "{}, {}",
            prior.join(", "),
            client.to_str().unwrap_or_default()
        );
        if let Ok(v) = HeaderValue::from_str(&xff) {
            headers.insert(&X_FORWARDED_FOR, v);
        }
    }
    let proto = if https { "https" } else { "http" };
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    match host {
        Some(h) => headers.insert(&X_FORWARDED_HOST, h),
        None => headers.remove(&X_FORWARDED_HOST),
    };
}

/// A body of unknown length (chunked, or HTTP/2 without a length) is sent chunked: hyper
/// frames one as chunked by itself only for methods that usually carry one, and silently
/// sends none for GET or HEAD. Said outright, every method's body is sent, and read, so a
/// fault in it is caught as the client's.
pub(crate) fn frame_unknown_length(headers: &mut HeaderMap, end_stream: bool) {
    if !end_stream && !headers.contains_key(header::CONTENT_LENGTH) {
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
}

/// An attempt's `Host`: the client's (see [`forward`]), or, for an HTTP/1.0 client that
/// sent none, the backend's `authority`.
pub(crate) fn host_or(headers: &mut HeaderMap, authority: &http::uri::Authority) {
    if !headers.contains_key(header::HOST) {
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            headers.insert(header::HOST, host);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn forward_sets_and_strips() {
        let mut h = map(&[
            ("host", "app.example"),
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic x"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil"),
            ("x-keep", "yes"),
        ]);
        forward(
            &mut h,
            None,
            &client_value("127.0.0.9".parse().unwrap()),
            false,
            false,
        );
        assert_eq!(h["host"], "app.example");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 127.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app.example");
        assert_eq!(h["x-keep"], "yes");
        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "proxy-authorization",
            "te",
            "upgrade",
        ] {
            assert!(!h.contains_key(gone), "{gone} kept");
        }
    }

    #[test]
    fn connection_cannot_remove_what_lb_vouches_for() {
        let mut h = map(&[
            ("host", "app.example"),
            (
                "connection",
                "Host, X-Forwarded-For, x-forwarded-proto, X-Forwarded-Host, x-other",
            ),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-other", "1"),
        ]);
        forward(
            &mut h,
            None,
            &client_value("127.0.0.9".parse().unwrap()),
            true,
            false,
        );
        assert_eq!(h["host"], "app.example");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https", "a client over TLS");
        assert_eq!(h["x-forwarded-host"], "app.example");
        assert!(!h.contains_key("x-other"));
    }

    #[test]
    fn a_response_framed_by_transfer_encoding_loses_its_content_length() {
        let mut h = map(&[
            ("content-length", "3"),
            ("transfer-encoding", "chunked"),
            ("x-keep", "1"),
        ]);
        backward(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        let mut h = map(&[("content-length", "3")]);
        backward(&mut h, false);
        assert_eq!(h["content-length"], "3");
    }

    #[test]
    fn upgrade_keeps_upgrade_and_http2_authority_becomes_host() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(&h));
        forward(
            &mut h,
            Some("svc:8080"),
            &client_value("::1".parse().unwrap()),
            false,
            true,
        );
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["host"], "svc:8080");
        assert_eq!(h["x-forwarded-for"], "::1");
        assert!(
            !is_upgrade(&map(&[("upgrade", "websocket")])),
            "Upgrade without Connection: upgrade"
        );
    }

    #[test]
    fn connection_tokens_are_read_on_bytes() {
        let mut h = map(&[("x-secret", "1"), ("x-other", "2")]);
        h.append(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-secret, \xff").unwrap(),
        );
        h.append(
            header::CONNECTION,
            HeaderValue::from_bytes(b"Upgrade\x80, x-other").unwrap(),
        );
        h.append(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!is_upgrade(&h), "`Upgrade\\x80` is not `upgrade`");
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
        let mut h = map(&[("upgrade", "websocket")]);
        h.append(
            header::CONNECTION,
            HeaderValue::from_bytes(b"\xfe, upgrade").unwrap(),
        );
        assert!(is_upgrade(&h));
    }

    #[test]
    fn a_101_must_switch_to_an_offered_protocol() {
        let offered = |v: &str| vec![HeaderValue::from_str(v).unwrap()];
        let resp = |v: &str| map(&[("upgrade", v)]);
        assert!(upgrade_accepted(&offered("websocket"), &resp("WebSocket")));
        assert!(upgrade_accepted(
            &offered("foo/2, websocket"),
            &resp("websocket")
        ));
        assert!(upgrade_accepted(&offered("foo/2"), &resp("foo")));
        assert!(upgrade_accepted(&offered("foo"), &resp("foo/2")));
        assert!(!upgrade_accepted(&offered("foo/1"), &resp("foo/2")));
        assert!(!upgrade_accepted(&offered("websocket"), &resp("h2c")));
        assert!(!upgrade_accepted(
            &offered("websocket"),
            &resp("websocket, h2c")
        ));
        assert!(!upgrade_accepted(&offered("websocket"), &map(&[])));
        assert!(!upgrade_accepted(&offered("websocket"), &resp(" ")));
        assert!(!upgrade_accepted(&[], &resp("websocket")));
    }
}
