//! Per-peer token buckets for inbound requests: anything a peer can send is
//! rate-limited, so one peer can't keep a node busy answering it.

use std::time::Instant;

/// Requests a peer may send in a burst.
pub const BURST: f64 = 100.0;
/// Requests per second a peer may sustain: a busy worker sends results,
/// bids and streamed text (at most ~8 pieces a second per answer).
pub const PER_SECOND: f64 = 50.0;

/// Gossiped CFPs one requester may publish in a burst: a node's tasks
/// start a few at a time.
pub const CFP_BURST: f64 = 20.0;
/// Gossiped CFPs per second one requester may sustain. CFPs go by gossip
/// only when a requester knows too few workers; past this rate they are
/// neither relayed nor bid on.
pub const CFPS_PER_SECOND: f64 = 5.0;

/// One peer's allowance.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
    burst: f64,
    per_second: f64,
}

impl TokenBucket {
    /// A full bucket for requests ([`BURST`], [`PER_SECOND`]).
    pub fn new(now: Instant) -> Self {
        Self::with_rate(now, BURST, PER_SECOND)
    }

    /// A full bucket of `burst` tokens refilled at `per_second`.
    pub fn with_rate(now: Instant, burst: f64, per_second: f64) -> Self {
        Self { tokens: burst, last: now, burst, per_second }
    }

    /// Takes one token if there is one.
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_bucket_takes_its_own_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::with_rate(t0, CFP_BURST, CFPS_PER_SECOND);
        assert_eq!((0..100).filter(|_| b.allow(t0)).count(), CFP_BURST as usize);
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!((0..100).filter(|_| b.allow(t1)).count(), 2 * CFPS_PER_SECOND as usize);
    }

    #[test]
    fn bursts_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0);
        let burst = (0..100).filter(|_| b.allow(t0)).count();
        assert_eq!(burst, BURST as usize);
        assert!(!b.allow(t0));
        // One second later: PER_SECOND more.
        let t1 = t0 + Duration::from_secs(1);
        let refilled = (0..100).filter(|_| b.allow(t1)).count();
        assert_eq!(refilled, PER_SECOND as usize);
    }
}
