//! The HBONE request: an HTTP/2 `CONNECT` whose `:authority` is the original destination
//! `ip:port`, with a `Forwarded: for="<client>"` header naming the app that connected. The
//! client builds it ([`connect_request`]); the server checks it ([`Target::check`]) before
//! anything local is connected, and answers with one of the [`Refusal`] statuses or `200`.
//!
//! HTTP/2 itself (pseudo-header order and duplicates, header sizes, stream states) is the h2
//! crate's to police; what is left here is what HBONE means by the request: the method, the
//! authority as a socket address, and that its IP is the one the client dialled, so a peer
//! can never make this sidecar relay to another host.

use std::net::{IpAddr, SocketAddr};

use http::{Method, Request, StatusCode, header::FORWARDED};

/// Why a stream was refused, as the status the client sees and the reason we count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a CONNECT, or no `ip:port` authority.
    Malformed(&'static str),
    /// The authority's IP is not the address the peer dialled (no relaying elsewhere).
    WrongAddress,
    /// The sidecar's own ports are never reachable through a tunnel.
    OwnPort,
    /// The inbound policy does not admit the verified peer to this destination.
    Denied,
    /// Connecting the local app failed.
    Unreachable,
}

impl Refusal {
    /// The response status: 400 for a request we cannot honour as asked, 401 for a
    /// destination this peer may not reach, 503 for one that did not answer.
    pub fn status(self) -> StatusCode {
        match self {
            Self::Malformed(_) | Self::WrongAddress => StatusCode::BAD_REQUEST,
            Self::OwnPort | Self::Denied => StatusCode::UNAUTHORIZED,
            Self::Unreachable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `reason` label of `sidecar_inbound_rejections_total` and the exit report.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Malformed(_) => "bad_request",
            Self::WrongAddress => "wrong_address",
            Self::OwnPort => "own_port",
            Self::Denied => "policy_denied",
            Self::Unreachable => "unreachable",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Malformed(why) => write!(f, "malformed CONNECT: {why}"),
            Self::WrongAddress => {
                f.write_str("the CONNECT names another address than the one dialled")
            }
            Self::OwnPort => f.write_str("a tunnel may not reach the sidecar's own ports"),
            Self::Denied => f.write_str("denied by the inbound policy"),
            Self::Unreachable => f.write_str("the destination did not answer"),
        }
    }
}

/// The CONNECT request for one application connection from `client` to `original_dst`.
pub fn connect_request(original_dst: SocketAddr, client: SocketAddr) -> Request<()> {
    let mut req = Request::new(());
    *req.method_mut() = Method::CONNECT;
    // An authority-only URI: h2 sends it as `:authority` and no `:scheme` or `:path`.
    *req.uri_mut() = original_dst
        .to_string()
        .parse()
        .expect("a socket address is a valid authority");
    *req.version_mut() = http::Version::HTTP_2;
    let forwarded = format!("for=\"{}\"", forwarded_node(client));
    if let Ok(value) = forwarded.parse() {
        req.headers_mut().insert(FORWARDED, value);
    }
    req
}

/// RFC 7239 node syntax: an IPv6 address in brackets, the port after it.
fn forwarded_node(client: SocketAddr) -> String {
    match client.ip().to_canonical() {
        IpAddr::V4(ip) => format!("{ip}:{}", client.port()),
        IpAddr::V6(ip) => format!("[{ip}]:{}", client.port()),
    }
}

/// A checked request: where the peer's app was going, and who it says the app was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub original_dst: SocketAddr,
    /// The `for=` of the `Forwarded` header, as sent (informational: the peer chose it).
    pub forwarded_for: Option<String>,
}

impl Target {
    /// Checks `req`, which arrived on a connection to `dialled` (our address, as the peer
    /// reached it).
    pub fn check<B>(req: &Request<B>, dialled: IpAddr) -> Result<Self, Refusal> {
        if req.method() != Method::CONNECT {
            return Err(Refusal::Malformed("the method is not CONNECT"));
        }
        let uri = req.uri();
        if uri.scheme().is_some() || uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err(Refusal::Malformed("a CONNECT carries only an authority"));
        }
        let authority = uri.authority().ok_or(Refusal::Malformed("no :authority"))?;
        let original_dst: SocketAddr = authority
            .as_str()
            .parse()
            .map_err(|_| Refusal::Malformed("the authority is not ip:port"))?;
        if original_dst.port() == 0 {
            return Err(Refusal::Malformed("port 0"));
        }
        let original_dst = SocketAddr::new(original_dst.ip().to_canonical(), original_dst.port());
        if original_dst.ip() != dialled.to_canonical() {
            return Err(Refusal::WrongAddress);
        }
        let forwarded_for = req
            .headers()
            .get(FORWARDED)
            .and_then(|v| v.to_str().ok())
            .and_then(forwarded_for);
        Ok(Self {
            original_dst,
            forwarded_for,
        })
    }
}

/// The first `for=` of a `Forwarded` header, quotes removed.
fn forwarded_for(header: &str) -> Option<String> {
    header
        .split([';', ','])
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| key.eq_ignore_ascii_case("for"))
        .map(|(_, value)| value.trim_matches('"').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIALLED: &str = "10.0.0.2";

    fn check(req: &Request<()>) -> Result<Target, Refusal> {
        Target::check(req, DIALLED.parse().unwrap())
    }

    fn with_authority(authority: &str) -> Request<()> {
        let mut req = connect_request(
            "10.0.0.2:80".parse().unwrap(),
            "10.0.0.1:5000".parse().unwrap(),
        );
        *req.uri_mut() = authority.parse().unwrap();
        req
    }

    #[test]
    fn a_request_we_build_is_one_we_accept() {
        for (dst, client, dialled, forwarded) in [
            (
                "10.0.0.2:8080",
                "10.0.0.1:40000",
                "10.0.0.2",
                "10.0.0.1:40000",
            ),
            ("[fd00::2]:443", "[fd00::1]:5", "fd00::2", "[fd00::1]:5"),
            // A v4-mapped dialled address is the same host.
            (
                "10.0.0.2:80",
                "[::ffff:10.0.0.1]:7",
                "::ffff:10.0.0.2",
                "10.0.0.1:7",
            ),
        ] {
            let dst: SocketAddr = dst.parse().unwrap();
            let req = connect_request(dst, client.parse().unwrap());
            assert_eq!(req.uri().to_string(), dst.to_string());
            let target = Target::check(&req, dialled.parse().unwrap()).unwrap();
            assert_eq!(target.original_dst, dst);
            assert_eq!(target.forwarded_for.as_deref(), Some(forwarded));
        }
    }

    #[test]
    fn refusals_have_their_status() {
        let mut get = with_authority("10.0.0.2:80");
        *get.method_mut() = Method::GET;
        assert_eq!(
            check(&get),
            Err(Refusal::Malformed("the method is not CONNECT"))
        );
        for bad in ["example.org:80", "10.0.0.2", "10.0.0.2:0", "10.0.0.2:99999"] {
            let refused = check(&with_authority(bad)).unwrap_err();
            assert!(
                matches!(refused, Refusal::Malformed(_)),
                "{bad}: {refused:?}"
            );
            assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        }
        let elsewhere = check(&with_authority("10.0.0.3:80")).unwrap_err();
        assert_eq!(elsewhere, Refusal::WrongAddress);
        assert_eq!(elsewhere.status(), StatusCode::BAD_REQUEST);
        let mut with_path = with_authority("10.0.0.2:80");
        *with_path.uri_mut() = "http://10.0.0.2:80/x".parse().unwrap();
        assert!(matches!(check(&with_path), Err(Refusal::Malformed(_))));
        assert_eq!(Refusal::Denied.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            Refusal::Unreachable.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn forwarded_header_is_optional_and_read_leniently() {
        let mut req = with_authority("10.0.0.2:80");
        req.headers_mut().remove(FORWARDED);
        assert_eq!(check(&req).unwrap().forwarded_for, None);
        req.headers_mut().insert(
            FORWARDED,
            "proto=http;For=\"10.9.9.9\", for=1.2.3.4".parse().unwrap(),
        );
        assert_eq!(
            check(&req).unwrap().forwarded_for.as_deref(),
            Some("10.9.9.9")
        );
    }
}
