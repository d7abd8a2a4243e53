//! Per-client rate limiting: a token bucket per client address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::ApiError;

/// Buckets kept before idle (full) ones are dropped.
const MAX_CLIENTS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by client address, shared by every request.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate_per_s: f64,
    burst: f64,
    buckets: Arc<Mutex<HashMap<IpAddr, Bucket>>>,
}

impl RateLimiter {
    /// `rate_per_s` requests per second per client, bursts of `burst`;
    /// a rate of 0 means no limit.
    pub fn new(rate_per_s: f64, burst: f64) -> Self {
        Self { rate_per_s, burst: burst.max(1.0), buckets: Arc::default() }
    }

    /// Takes one request's token for `client`, if it has one.
    pub fn allow(&self, client: IpAddr, now: Instant) -> bool {
        if self.rate_per_s <= 0.0 {
            return true;
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_CLIENTS {
            let (rate, burst) = (self.rate_per_s, self.burst);
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let bucket = buckets.entry(client).or_insert(Bucket { tokens: self.burst, at: now });
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * self.rate_per_s).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Middleware: 429 in OpenAI's error shape once a client is over its rate.
pub async fn limit(State(limiter): State<RateLimiter>, request: Request, next: Next) -> Response {
    let client =
        request.extensions().get::<ConnectInfo<SocketAddr>>().map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
    if limiter.allow(client, Instant::now()) {
        next.run(request).await
    } else {
        crate::openai::error_response(ApiError::RateLimited(limiter.rate_per_s))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn bursts_then_refills_at_the_rate_per_client() {
        let limiter = RateLimiter::new(2.0, 3.0);
        let (a, b) = (IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        let t = Instant::now();
        assert!((0..3).all(|_| limiter.allow(a, t)));
        assert!(!limiter.allow(a, t), "burst spent");
        assert!(limiter.allow(b, t), "another client has its own bucket");
        assert!(limiter.allow(a, t + Duration::from_millis(500)), "one token back after 1/rate");
        assert!(!limiter.allow(a, t + Duration::from_millis(500)));
        assert!(RateLimiter::new(0.0, 1.0).allow(a, t), "0 = unlimited");
    }
}
