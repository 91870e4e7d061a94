//! `auth.external`: asks an HTTP authorization service about a request
//! before any backend is contacted, as Envoy's ext_authz (HTTP mode) and
//! nginx's `auth_request` do. The service gets the request's method, the
//! route's URL path followed by the request's path and query, the headers
//! the route names, and `X-Forwarded-For`; no body. A 2xx allows the request
//! (with the headers the route takes from the answer); any other answer
//! goes back to the client as the service gave it.
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{
    header::{HeaderName, HeaderValue},
    HeaderMap, Method, StatusCode,
};
use hyper_util::rt::TokioIo;

use crate::config::External;

pub enum Decision {
    /// Allowed, with these headers for the backend.
    Allow(Vec<(HeaderName, HeaderValue)>),
    /// Refused: the service's own answer, for the client.
    Deny { status: StatusCode, headers: HeaderMap, body: Bytes },
}

/// Largest answer body passed back to a client.
const MAX_BODY: usize = 64 << 10;

/// Asks the service; `Err` when it cannot be asked or does not answer in time.
pub async fn check(
    ext: &External,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    client: SocketAddr,
) -> Result<Decision, String> {
    let ask = async {
        let tcp = tokio::net::TcpStream::connect(&ext.authority).await.map_err(|e| format!("connect: {e}"))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = hyper::Request::builder()
            .method(method.clone())
            .uri(format!("{}{path_and_query}", ext.path_prefix))
            .header(hyper::header::HOST, &ext.authority)
            .header("x-forwarded-for", client.ip().to_string());
        for name in &ext.headers {
            for v in headers.get_all(name.as_str()) {
                req = req.header(name.as_str(), v);
            }
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let body = http_body_util::Limited::new(body, MAX_BODY).collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>((parts, body))
    };
    let (parts, body) =
        tokio::time::timeout(ext.timeout, ask).await.map_err(|_| format!("no answer within {:?}", ext.timeout))??;
    if parts.status.is_success() {
        let add = ext
            .upstream_headers
            .iter()
            .filter_map(|n| Some((HeaderName::from_bytes(n.as_bytes()).ok()?, parts.headers.get(n.as_str())?.clone())))
            .collect();
        return Ok(Decision::Allow(add));
    }
    let mut headers = parts.headers;
    // The connection's own headers are not the service's to set.
    for h in ["connection", "keep-alive", "transfer-encoding", "content-length", "upgrade"] {
        headers.remove(h);
    }
    Ok(Decision::Deny { status: parts.status, headers, body })
}
