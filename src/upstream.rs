//! The app as wsrelay reaches it: the pooled HTTP client (shared by the
//! proxy and the hooks), the `X-Forwarded-*` headers, and paths as the app's
//! router would read them.

use std::net::SocketAddr;
use std::time::Duration;

use http::Uri;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::Body;
use crate::config::ProxyConfig;

/// The pooled HTTP client to the app, shared by the proxy and the hooks.
pub type UpstreamClient = Client<HttpConnector, Body>;

pub fn client(cfg: &ProxyConfig) -> UpstreamClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(cfg.connect_timeout));
    conn.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        // The idle reaper only runs with a timer; keep idle connections
        // shorter-lived than the app's keep-alive so we never reuse one it
        // is closing.
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(cfg.idle_timeout)
        .pool_max_idle_per_host(256)
        .build(conn)
}

/// Appends the peer to `X-Forwarded-For` and sets `X-Forwarded-Proto` and
/// `X-Forwarded-Host` unless a front proxy already did (wsrelay runs behind
/// one, which knows the original scheme and host).
pub fn set_forwarded(headers: &mut HeaderMap, remote: SocketAddr, host: Option<HeaderValue>) {
    let xff = HeaderName::from_static("x-forwarded-for");
    let ip = remote.ip().to_canonical().to_string();
    // Several X-Forwarded-For lines are one list (RFC 9110 §5.3).
    let prev: Vec<&str> =
        headers.get_all(&xff).iter().filter_map(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty()).collect();
    let value = if prev.is_empty() { ip } else { format!("{}, {ip}", prev.join(", ")) };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(xff, v);
    }
    let proto = HeaderName::from_static("x-forwarded-proto");
    if !headers.contains_key(&proto) {
        headers.insert(proto, HeaderValue::from_static("http"));
    }
    let fhost = HeaderName::from_static("x-forwarded-host");
    if let (false, Some(h)) = (headers.contains_key(&fhost), host) {
        headers.insert(fhost, h);
    }
}

/// The app's URI for a path (and query) of ours.
pub fn uri(upstream: &Uri, path_and_query: &str) -> Result<Uri, http::Error> {
    let mut parts = upstream.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse()?);
    Ok(Uri::from_parts(parts)?)
}

/// A path as a lenient app framework would route it: percent-decoded,
/// lower-cased, `//` collapsed, `;` path parameters dropped from every
/// segment (Tomcat, Jetty and Spring route `/a;x/b` and `/a/..;/b` as `/a/b`
/// and `/b`), `.`/`..` resolved, no trailing slash. Used to keep clients
/// away from hook paths whatever spelling they try.
pub fn normalized_path(raw: &str) -> String {
    let decoded = percent_encoding::percent_decode_str(raw).decode_utf8_lossy().to_lowercase();
    let mut parts: Vec<&str> = Vec::new();
    for seg in decoded.split(['/', '\\']) {
        let seg = seg.split(';').next().unwrap_or(seg);
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_like_lenient_routers() {
        assert_eq!(normalized_path("/Internal/WS/%6Dessage/"), "/internal/ws/message");
        assert_eq!(normalized_path("//internal/./ws/x/../message"), "/internal/ws/message");
        assert_eq!(normalized_path("/"), "/");
        assert_eq!(normalized_path("/a%2Fb"), "/a/b");
        assert_eq!(normalized_path("/internal;x/ws/connect"), "/internal/ws/connect");
        assert_eq!(normalized_path("/internal/..;/internal/ws/connect"), "/internal/ws/connect");
        assert_eq!(normalized_path("/internal/ws;x/connect"), "/internal/ws/connect");
        assert_eq!(normalized_path("/internal/ws/connect%3Bjsessionid=1"), "/internal/ws/connect");
    }

    #[test]
    fn forwarded_for_lines_are_one_list() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("2.2.2.2, 3.3.3.3"));
        set_forwarded(&mut h, "127.0.0.1:9".parse().unwrap(), None);
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1");
    }
}
