//! Admission as a tower layer, in front of every route: per source address a token-bucket
//! request rate (`limits.http_requests_per_ip`) and a cap on requests in flight
//! (`limits.http_in_flight_per_ip`), both answered `429` with `Retry-After`; and a cap on
//! requests in flight in all (`limits.http_in_flight`), answered `503` at once rather than
//! queued, so a flood sheds load instead of growing a queue everyone waits in. Checks are a
//! hash lookup under a sharded lock each: one address over its limit costs the others
//! nothing.

use super::error::ApiError;
use super::Gateway;
use crate::limits::Rate;
use axum::extract::{ConnectInfo, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{Layer, Service};

#[derive(Clone)]
pub struct AdmissionLayer {
    gw: Arc<Gateway>,
}

impl AdmissionLayer {
    pub fn new(gw: Arc<Gateway>) -> Self {
        AdmissionLayer { gw }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;
    fn layer(&self, inner: S) -> Admission<S> {
        Admission {
            inner,
            gw: self.gw.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    gw: Arc<Gateway>,
}

/// The source address of a request (0.0.0.0 when it came without one, as in `oneshot`).
pub fn peer_ip(req: &Request) -> IpAddr {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip())
}

impl<S> Service<Request> for Admission<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let ip = peer_ip(&req);
        let refuse = |e: ApiError| -> Self::Future {
            let resp = e.into_response();
            Box::pin(async move { Ok(resp) })
        };
        let gw = &self.gw;
        let l = gw.fleet.config.load().limits.clone();
        gw.ip_rate.set_max_keys(l.max_tracked_keys as usize);
        let rate = Rate::new(l.http_requests_per_ip, l.http_request_burst);
        if let Err(wait) = gw.ip_rate.check(&ip, rate) {
            return refuse(ApiError::too_many(
                format!(
                    "too many requests from this address: the limit is {} per second (limits.http_requests_per_ip); retry after the time in Retry-After",
                    l.http_requests_per_ip
                ),
                wait,
            ));
        }
        let Some(mine) = gw
            .ip_in_flight
            .acquire(&ip, l.http_in_flight_per_ip as usize)
        else {
            return refuse(ApiError::too_many(
                format!(
                    "too many requests in flight from this address: at most {} at once (limits.http_in_flight_per_ip)",
                    l.http_in_flight_per_ip
                ),
                Duration::from_secs(1),
            ));
        };
        let Some(all) = gw.in_flight.acquire(&(), l.http_in_flight as usize) else {
            return refuse(
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    format!(
                        "the gateway has {} requests in flight (limits.http_in_flight); retry shortly",
                        l.http_in_flight
                    ),
                )
                .retry_after(Duration::from_secs(1)),
            );
        };
        // The inner service was made ready by poll_ready; keep that one, leave a clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let resp = inner.call(req).await;
            drop((mine, all));
            resp
        })
    }
}
