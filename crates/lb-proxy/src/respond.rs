//! Every response the proxy makes up itself, built in one place.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode, Version};
use lb_core::Failure;

use crate::body::{ClientFault, ResponseBody};

/// The response for a request the core gave up on: 502, 503 or 504.
pub(crate) fn failure(f: Failure) -> Response<ResponseBody> {
    let status = StatusCode::from_u16(f.status()).unwrap_or(StatusCode::BAD_GATEWAY);
    synthetic(status)
}

/// A small plain-text response with the status's reason as its body.
pub(crate) fn synthetic(status: StatusCode) -> Response<ResponseBody> {
    let text = format!(
        "{} {}\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    );
    let mut resp = Response::new(ResponseBody::full(Bytes::from(text)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The response to a fault of the client's own body (400, 408); an HTTP/1 connection closes
/// after it, since the rest of the body would be read as the next request.
pub(crate) fn client_fault(fault: ClientFault, version: Version) -> Response<ResponseBody> {
    let mut resp = synthetic(fault.status());
    if version < Version::HTTP_2 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// The bytes sent to a client whose request head did not arrive within `header_read`.
pub(crate) const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";

/// The bytes sent for a malformed request head hyper would have answered otherwise.
pub(crate) const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";

/// The bytes sent, in the clear, to a client speaking plain HTTP to a TLS port (NGINX says
/// as much), so that the mistake is plain to whoever made it.
pub(crate) const PLAIN_HTTP_TO_TLS: &[u8] = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: 51\r\n\r\nThis port speaks HTTPS: a plain HTTP request came.\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_http_answer_is_framed_right() {
        let text = std::str::from_utf8(PLAIN_HTTP_TO_TLS).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.ends_with(&format!("Content-Length: {}", body.len())));
    }

    #[test]
    fn failures_map_to_their_status() {
        assert_eq!(failure(Failure::NoBackend).status(), 503);
        assert_eq!(failure(Failure::BadGateway).status(), 502);
        assert_eq!(failure(Failure::GatewayTimeout).status(), 504);
    }
}
