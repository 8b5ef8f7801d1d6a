//! The request-head path of [`service`](crate::service) without sockets, for the fuzz
//! targets in `lb-fuzz` (cargo feature `fuzzing`; not part of the supported API).

use std::net::IpAddr;

use http::uri::Authority;
use http::{Request, Uri, Version};

use crate::{headers, validate};

/// What lb does with a request head that hyper accepted from a client at `client`: the
/// head each attempt sends to the backend at `backend`, or the status lb answers with
/// itself. `end_stream`: the request has no body (hyper's `is_end_stream`).
///
/// # Errors
/// The status of a request lb refuses to forward (400, 405, 501).
pub fn forward_head(
    mut req: Request<()>,
    client: IpAddr,
    end_stream: bool,
    backend: &Authority,
) -> Result<Request<()>, u16> {
    // As `service::handle`, step for step.
    validate::admit(&mut req).map_err(|r| r.status.as_u16())?;
    let upgrade = req.version() == Version::HTTP_11 && headers::is_upgrade(req.headers());
    let (mut parts, ()) = req.into_parts();
    let authority = parts.uri.authority().map(|a| a.as_str().to_owned());
    let xff = headers::client_value(client);
    headers::forward(
        &mut parts.headers,
        authority.as_deref(),
        &xff,
        false,
        upgrade,
    );
    headers::frame_unknown_length(&mut parts.headers, end_stream);
    let path_and_query = validate::origin_form(&parts.uri);
    // As `Outgoing::attempt`.
    let mut out = Request::new(());
    *out.method_mut() = parts.method;
    *out.uri_mut() = Uri::from(path_and_query);
    *out.version_mut() = Version::HTTP_11;
    *out.headers_mut() = parts.headers;
    headers::host_or(out.headers_mut(), backend);
    Ok(out)
}
