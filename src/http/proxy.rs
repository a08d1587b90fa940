//! The tenant reverse proxy: every request that is not `POST /v1/sql` goes to one of the
//! HTTP upstreams of the tenant's pod (`[[pod]] http`).
//!
//! Phases: tenant (header or host; unknown → 404) → the tenant's rate limit → pick an
//! upstream (round robin over the healthy ones first; unhealthy ones last, since a mark may
//! be stale) → forward, bodies streamed both ways, `X-Forwarded-For`/`-Proto`/`-Host` set,
//! hop-by-hop headers dropped → answer with `Podrouter-Pod`. A request whose connection to
//! an upstream failed is retried on the next one only when that is safe: an idempotent
//! method and no body (nothing was sent). Failures answer JSON: 502 (no upstream reachable,
//! or a broken response), 503 (the pod has no HTTP upstreams), 504 (no response headers
//! within `http.upstream_timeout`).
//!
//! The proxy asks for no credentials: tenant web traffic is the application's own (its end
//! users have no database role), so `Authorization` and cookies pass through untouched for
//! the application to check. "Same tenant rules" means the same tenant resolution and the
//! same route (a moved tenant's traffic follows it), and the per-tenant rate limit.
//!
//! Health: a probe task connects to every upstream about every [`PROBE_EVERY`]; a failed
//! connect while forwarding marks an upstream down at once, a successful one up.

use super::error::ApiError;
use super::{tenant_of, Gateway};
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub const PROBE_EVERY: Duration = Duration::from_secs(2);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

pub const POD_HEADER: &str = "podrouter-pod";

/// Headers that describe one hop, never forwarded (RFC 9110 section 7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

struct Upstream {
    healthy: AtomicBool,
}

/// The pods' upstreams: health marks, round-robin positions, and one pooled HTTP client.
pub struct Upstreams {
    client: Client<HttpConnector, Body>,
    state: Mutex<HashMap<String, Arc<Upstream>>>,
    turns: Mutex<HashMap<String, Arc<AtomicUsize>>>,
}

impl Upstreams {
    pub fn new(connect_timeout: Duration) -> Upstreams {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        Upstreams {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
            state: Mutex::new(HashMap::new()),
            turns: Mutex::new(HashMap::new()),
        }
    }

    fn upstream(&self, url: &str) -> Arc<Upstream> {
        self.state
            .lock()
            .entry(url.to_owned())
            .or_insert_with(|| {
                Arc::new(Upstream {
                    healthy: AtomicBool::new(true),
                })
            })
            .clone()
    }

    pub fn is_healthy(&self, url: &str) -> bool {
        self.upstream(url).healthy.load(Ordering::Relaxed)
    }

    fn mark(&self, url: &str, healthy: bool) {
        let was = self.upstream(url).healthy.swap(healthy, Ordering::Relaxed);
        if was != healthy {
            if healthy {
                tracing::info!(upstream = url, "HTTP upstream is up");
            } else {
                tracing::warn!(upstream = url, "HTTP upstream is down");
            }
        }
    }

    /// The pod's upstreams in the order to try them: round robin, healthy ones first.
    fn order(&self, pod: &str, urls: &[String]) -> Vec<String> {
        let turn = self
            .turns
            .lock()
            .entry(pod.to_owned())
            .or_default()
            .clone()
            .fetch_add(1, Ordering::Relaxed);
        let n = urls.len();
        let rotated = (0..n).map(|i| urls[(turn + i) % n].clone());
        let (mut up, down): (Vec<String>, Vec<String>) = rotated.partition(|u| self.is_healthy(u));
        up.extend(down);
        up
    }
}

/// Probes every upstream of every pod until `shutdown`; forgets upstreams no pod lists.
pub async fn probe(gw: Arc<Gateway>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let table = gw.fleet.table.load_full();
        let urls: Vec<String> = table
            .pods
            .values()
            .flat_map(|p| p.http.iter().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut checks = tokio::task::JoinSet::new();
        for u in &urls {
            let u = u.clone();
            checks.spawn(async move {
                let ok = reachable(&u).await;
                (u, ok)
            });
        }
        while let Some(Ok((url, ok))) = checks.join_next().await {
            gw.upstreams.mark(&url, ok);
        }
        gw.upstreams.state.lock().retain(|u, _| urls.contains(u));
        let pods: Vec<&String> = table.pods.keys().collect();
        gw.upstreams.turns.lock().retain(|p, _| pods.contains(&p));
    }
}

async fn reachable(url: &str) -> bool {
    let Some(authority) = url.parse::<Uri>().ok().and_then(|u| {
        let port = u.port_u16().unwrap_or(80);
        u.host()
            .map(|h| format!("{}:{port}", h.trim_matches(['[', ']'])))
    }) else {
        return false;
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(authority)).await,
        Ok(Ok(_))
    )
}

pub async fn forward(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    match forward_inner(&gw, peer, req).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn forward_inner(gw: &Gateway, peer: SocketAddr, req: Request) -> Result<Response, ApiError> {
    let tenant = tenant_of(req.headers()).ok_or_else(ApiError::no_tenant)?;
    let route = gw
        .fleet
        .table
        .load()
        .tenant(&tenant)
        .cloned()
        .ok_or_else(|| ApiError::unknown_tenant(&tenant))?;
    gw.admit_tenant(&route.name)?;
    let pod = route.pod.clone();
    if pod.http.is_empty() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_upstream",
            format!("pod \"{}\" of tenant \"{tenant}\" has no HTTP upstreams; an operator lists them in its [[pod]] http = [...]", pod.name),
        ));
    }
    let (limit, upstream_timeout) = {
        let c = gw.fleet.config.load();
        (c.limits.http_proxy_max_body.0, c.http.upstream_timeout.0)
    };
    if super::sql::declared_too_large(req.headers(), limit) {
        return Err(body_too_large(limit));
    }
    let (mut parts, body) = req.into_parts();
    let bodiless = is_bodiless(&parts.headers);
    let retry_safe = bodiless && is_idempotent(&parts.method);
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    forwarding_headers(&mut parts.headers, peer);
    let mut body = Some(Body::new(http_body_util::Limited::new(
        body,
        limit as usize,
    )));
    let mut last = None;
    for url in gw.upstreams.order(&pod.name, &pod.http) {
        let Some(uri) = upstream_uri(&url, &path) else {
            last = Some(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "bad_upstream",
                format!("the upstream {url:?} of pod \"{}\" is not a plain http:// URL; the gateway speaks HTTP/1.1 without TLS to upstreams", pod.name),
            ));
            continue;
        };
        let mut out = axum::http::Request::builder()
            .method(parts.method.clone())
            .uri(uri)
            .version(axum::http::Version::HTTP_11)
            .body(match body.take() {
                Some(b) => b,
                None => Body::empty(),
            })
            .expect("a valid request");
        *out.headers_mut() = parts.headers.clone();
        match tokio::time::timeout(upstream_timeout, gw.upstreams.client.request(out)).await {
            Ok(Ok(resp)) => {
                gw.upstreams.mark(&url, true);
                return Ok(answer(resp, &pod.name));
            }
            Ok(Err(e)) if e.is_connect() => {
                gw.upstreams.mark(&url, false);
                tracing::debug!(upstream = %url, "connect failed: {e}");
                last = Some(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_unreachable",
                    format!("no HTTP upstream of pod \"{}\" accepted the connection; retry shortly", pod.name),
                ));
                if !retry_safe {
                    break;
                }
            }
            Ok(Err(e)) => {
                if source_is::<http_body_util::LengthLimitError>(&e) {
                    return Err(body_too_large(limit));
                }
                tracing::debug!(upstream = %url, "upstream failed: {e}");
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_failed",
                    format!("the HTTP upstream of pod \"{}\" failed: {e}", pod.name),
                ));
            }
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    format!("the HTTP upstream of pod \"{}\" sent no response within {upstream_timeout:?} (http.upstream_timeout)", pod.name),
                ))
            }
        }
    }
    Err(last.expect("at least one upstream"))
}

fn body_too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the request body is larger than {limit} bytes (limits.http_proxy_max_body)"),
    )
}

fn source_is<E: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if s.is::<E>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// The response to the client: the upstream's, streamed, with hop-by-hop headers dropped
/// and the pod named.
fn answer(resp: axum::http::Response<hyper::body::Incoming>, pod: &str) -> Response {
    let (mut parts, body) = resp.into_parts();
    // This hop is HTTP/1.1 whatever the upstream spoke (an HTTP/1.0 answer would end the
    // client's keep-alive connection).
    parts.version = axum::http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(v) = HeaderValue::from_str(pod) {
        parts.headers.insert(HeaderName::from_static(POD_HEADER), v);
    }
    Response::from_parts(parts, Body::new(body))
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for h in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        headers.remove(h);
    }
}

/// Drops hop-by-hop headers and records the client: `X-Forwarded-For` (appended to what the
/// client sent), `X-Forwarded-Proto`, `X-Forwarded-Host`. `Host` stays the client's, so the
/// application sees the tenant's host name.
fn forwarding_headers(headers: &mut HeaderMap, peer: SocketAddr) {
    strip_hop_by_hop(headers);
    let ip = peer.ip().to_string();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{prior}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert("x-forwarded-host", host);
    }
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// No body: neither a length above 0 nor chunked transfer.
fn is_bodiless(h: &HeaderMap) -> bool {
    let length = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim() == "0");
    length.unwrap_or(true) && !h.contains_key(header::TRANSFER_ENCODING)
}

/// `http://10.0.0.7:8000` (optionally with a base path) + `/path?query`.
fn upstream_uri(base: &str, path: &str) -> Option<Uri> {
    let rest = base.strip_prefix("http://")?;
    let (authority, prefix) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    format!("http://{authority}{prefix}{path}").parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_uris() {
        let check = |base: &str, path: &str, want: Option<&str>| {
            assert_eq!(
                upstream_uri(base, path).map(|u| u.to_string()),
                want.map(str::to_owned),
                "{base} {path}"
            )
        };
        check(
            "http://10.0.0.7:8000",
            "/a?b=1",
            Some("http://10.0.0.7:8000/a?b=1"),
        );
        check(
            "http://app:8000/base/",
            "/x",
            Some("http://app:8000/base/x"),
        );
        check("https://app", "/x", None);
    }

    #[test]
    fn forwarding_headers_are_set_and_hop_by_hop_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "tenant1.example.com".parse().unwrap());
        h.insert("x-forwarded-for", "10.1.1.1".parse().unwrap());
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        forwarding_headers(&mut h, "127.0.0.9:5000".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.1.1.1, 127.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "tenant1.example.com");
        assert_eq!(h[header::HOST], "tenant1.example.com");
        for gone in ["connection", "x-secret", "keep-alive"] {
            assert!(!h.contains_key(gone), "{gone}");
        }
    }

    #[test]
    fn retries_only_when_nothing_was_sent_and_the_method_allows() {
        let mut h = HeaderMap::new();
        assert!(is_bodiless(&h) && is_idempotent(&Method::GET));
        assert!(!is_idempotent(&Method::POST));
        h.insert(header::CONTENT_LENGTH, "0".parse().unwrap());
        assert!(is_bodiless(&h));
        h.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        assert!(!is_bodiless(&h));
        h.remove(header::CONTENT_LENGTH);
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        assert!(!is_bodiless(&h));
    }
}
