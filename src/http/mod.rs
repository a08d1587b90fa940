//! The HTTP gateway on `http_listen`: SQL over HTTP for a tenant ([`sql`]) and the reverse
//! proxy of tenant HTTP traffic to its pod's upstreams ([`proxy`]), behind abuse limits.
//!
//! Layers, outside in: [`server`] accepts (open connections per source address), reads
//! headers within `limits.http_header_timeout` and closes connections idle for
//! `limits.http_idle_timeout`; [`admission`] is a tower layer with the per-address request
//! rate, the per-address and total requests in flight; the handlers then apply the
//! per-tenant rate (once the tenant is known, and for SQL once the role is authenticated) and
//! the body caps. Every limit is read from the running config at each use, so a reload
//! applies it. Errors are JSON, mapped to statuses in one place ([`error`]).

pub mod admission;
pub mod auth;
pub mod error;
pub mod pg;
pub mod proxy;
pub mod server;
pub mod sql;
pub mod types;

use crate::fleet::Fleet;
use crate::limits::{InFlight, Rate, RateLimiter};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use error::ApiError;
use std::net::IpAddr;
use std::sync::Arc;

pub use server::serve;

/// The header that names the tenant (else the first label of `Host`).
pub const TENANT_HEADER: &str = "podrouter-tenant";

/// The gateway's shared state: the fleet (routes, pools, config) and the limiters.
pub struct Gateway {
    pub fleet: Arc<Fleet>,
    ip_rate: RateLimiter<IpAddr>,
    tenant_rate: RateLimiter<String>,
    ip_in_flight: Arc<InFlight<IpAddr>>,
    in_flight: Arc<InFlight<()>>,
    ip_connections: Arc<InFlight<IpAddr>>,
    logins: auth::Logins,
    upstreams: proxy::Upstreams,
}

impl Gateway {
    pub fn new(fleet: Arc<Fleet>) -> Arc<Gateway> {
        let config = fleet.config.load_full();
        let keys = config.limits.max_tracked_keys as usize;
        Arc::new(Gateway {
            ip_rate: RateLimiter::new(keys),
            tenant_rate: RateLimiter::new(keys),
            ip_in_flight: InFlight::new(),
            in_flight: InFlight::new(),
            ip_connections: InFlight::new(),
            logins: auth::Logins::default(),
            upstreams: proxy::Upstreams::new(config.http.upstream_connect_timeout.0),
            fleet,
        })
    }

    /// One request of `tenant` against its rate limit (`limits.http_requests_per_tenant`).
    fn admit_tenant(&self, tenant: &str) -> Result<(), ApiError> {
        let l = &self.fleet.config.load().limits;
        self.tenant_rate.set_max_keys(l.max_tracked_keys as usize);
        let rate = Rate::new(l.http_requests_per_tenant, l.http_tenant_burst);
        self.tenant_rate
            .check(&tenant.to_owned(), rate)
            .map_err(|wait| {
                ApiError::too_many(
                    format!(
                        "tenant \"{tenant}\" is over its limit of {} HTTP requests per second (limits.http_requests_per_tenant); retry after the time in Retry-After",
                        l.http_requests_per_tenant
                    ),
                    wait,
                )
            })
    }
}

/// The routes: `POST /v1/sql`, everything else to the tenant's upstreams; behind the
/// admission layer.
pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route(
            "/v1/sql",
            post(sql::handle).fallback(|| async {
                ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "use POST /v1/sql with a JSON body",
                )
                .into_response()
            }),
        )
        .fallback(proxy::forward)
        .layer(admission::AdmissionLayer::new(gw.clone()))
        .with_state(gw)
}

/// The whole HTTP app for `fleet`, for tests that drive it with `oneshot` (requests without
/// a peer address count as coming from 0.0.0.0).
pub fn app(fleet: Arc<Fleet>) -> Router {
    router(Gateway::new(fleet))
}

/// The tenant a request is for: the `Podrouter-Tenant` header, else the first label of a
/// `Host` that is a DNS name with at least two labels (`tenant1.db.example.com`).
pub fn tenant_of(headers: &HeaderMap) -> Option<String> {
    if let Some(t) = headers.get(TENANT_HEADER) {
        return t
            .to_str()
            .ok()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned);
    }
    let host = headers.get(header::HOST)?.to_str().ok()?;
    if host.starts_with('[') {
        return None; // an IPv6 literal
    }
    let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
    if name.parse::<IpAddr>().is_ok() {
        return None;
    }
    let (first, _) = name.split_once('.')?;
    (!first.is_empty()).then(|| first.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_from_header_or_host() {
        let check = |pairs: &[(&str, &str)], want: Option<&str>| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                let name = axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
                h.insert(name, v.parse().unwrap());
            }
            assert_eq!(tenant_of(&h).as_deref(), want, "{pairs:?}");
        };
        check(&[("podrouter-tenant", "tenant1")], Some("tenant1"));
        check(
            &[("podrouter-tenant", "a"), ("host", "b.example.com")],
            Some("a"),
        );
        check(&[("host", "tenant2.db.example.com")], Some("tenant2"));
        check(&[("host", "Tenant2.localhost:8080")], Some("tenant2"));
        check(&[("host", "127.0.0.1:8080")], None);
        check(&[("host", "localhost:8080")], None);
        check(&[("host", "[::1]:8080")], None);
        check(&[], None);
    }
}
