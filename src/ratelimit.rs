//! A route's `rate_limit`: a token bucket per key (the client's address, a
//! header, ...), `governor`'s GCRA, which holds one timestamp per key and
//! takes no lock. Keys are hashed with a random secret of the limiter's, so a
//! client cannot choose keys that collide with another's bucket; an IPv6
//! client is keyed by its /64. The buckets are kept across reloads that keep
//! the route's limit, and a key whose bucket has filled up again is
//! forgotten at the next housekeeping tick, so memory follows the keys
//! active within a bucket's refill time.

use std::hash::BuildHasher;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::RateLimitConfig;

pub struct RateLimit {
    pub config: RateLimitConfig,
    buckets: DefaultKeyedRateLimiter<u64>,
    hasher: std::hash::RandomState,
    clock: DefaultClock,
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit").field("config", &self.config).field("keys", &self.buckets.len()).finish()
    }
}

impl RateLimit {
    pub fn new(config: &RateLimitConfig) -> RateLimit {
        let burst = NonZeroU32::new(config.burst).expect("validated: at least 1");
        let quota = Quota::with_period(config.per / config.requests).expect("validated: a period of 1s or more");
        RateLimit {
            config: config.clone(),
            buckets: DefaultKeyedRateLimiter::keyed(quota.allow_burst(burst)),
            hasher: std::hash::RandomState::new(),
            clock: DefaultClock::default(),
        }
    }

    /// Keyed by a claim of the route's verified token (checked after it).
    pub fn by_claim(&self) -> bool {
        matches!(self.config.key, crate::config::RateLimitKey::Claim(_))
    }

    /// The bucket of a key's bytes.
    pub fn key(&self, bytes: &[u8]) -> u64 {
        self.hasher.hash_one(bytes)
    }

    /// The bucket of a client address: an IPv4 address's own, an IPv6
    /// address's /64 (one host is given a /64 and can use any address in
    /// it), an IPv4-mapped IPv6 address's as the IPv4 address.
    pub fn client_key(&self, client: std::net::IpAddr) -> u64 {
        match client.to_canonical() {
            std::net::IpAddr::V4(v4) => self.hasher.hash_one((4u8, v4.octets())),
            std::net::IpAddr::V6(v6) => self.hasher.hash_one((6u8, &v6.octets()[..8])),
        }
    }

    /// Takes a token from `key`'s bucket; `Err` says how long until one is there.
    pub fn take(&self, key: u64) -> Result<(), Duration> {
        self.buckets.check_key(&key).map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets the keys whose bucket is full again: they are as new.
    pub fn forget_idle(&self) {
        self.buckets.retain_recent();
    }

    /// Keys with a bucket now.
    pub fn keys(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_nothing_until_a_token_is_back_and_each_key_has_its_own_bucket() {
        let config = RateLimitConfig {
            requests: 10,
            per: Duration::from_secs(1),
            burst: 3,
            key: crate::config::RateLimitKey::Request(crate::config::KeySpec::ClientIp),
        };
        let limit = RateLimit::new(&config);
        let (a, b) = (limit.key(b"10.0.0.1"), limit.key(b"10.0.0.2"));
        for _ in 0..3 {
            assert_eq!(limit.take(a), Ok(()));
        }
        let wait = limit.take(a).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        assert_eq!(limit.take(b), Ok(()), "another key's bucket is full");
        assert_eq!(limit.keys(), 2);
    }
}
