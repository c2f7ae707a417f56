//! A route's `rate_limit`: a token bucket per key (the client's address, a
//! header, ...), `governor`'s GCRA, which holds one timestamp per key and
//! takes no lock. Keys are hashed with a random secret of the limiter's, so a
//! client cannot choose keys that collide with another's bucket; an IPv6
//! client is keyed by its /64. The buckets are kept across reloads that keep
//! the route's limit, and a key whose bucket has filled up again is
//! forgotten at the next housekeeping tick, so memory follows the keys
//! active within a bucket's refill time.
//!
//! With `scope: cluster` the buckets are shared by the replicas in Redis
//! (`cluster`'s GCRA script, one round trip a request); while Redis does not
//! answer, each replica's own buckets hold the limit.

use std::hash::BuildHasher;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::cluster::Cluster;
use crate::config::{ConcurrencyScope, RateLimitConfig};

pub struct RateLimit {
    pub config: RateLimitConfig,
    /// The route's name: its buckets' place in Redis.
    route: std::sync::Arc<str>,
    /// With `scope: cluster`: where the shared buckets are. While Redis
    /// cannot be reached, the replica's own buckets hold the limit.
    cluster: Option<std::sync::Arc<Cluster>>,
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
    pub fn new(config: &RateLimitConfig, route: &str, cluster: Option<&std::sync::Arc<Cluster>>) -> RateLimit {
        let burst = NonZeroU32::new(config.burst).expect("validated: at least 1");
        let quota = Quota::with_period(config.per / config.requests).expect("validated: a period of 1s or more");
        RateLimit {
            config: config.clone(),
            route: route.into(),
            cluster: cluster.filter(|_| config.scope == ConcurrencyScope::Cluster).cloned(),
            buckets: DefaultKeyedRateLimiter::keyed(quota.allow_burst(burst)),
            hasher: std::hash::RandomState::new(),
            clock: DefaultClock::default(),
        }
    }

    /// The route it limits.
    pub fn route(&self) -> &str {
        &self.route
    }

    /// The Redis link its buckets are shared through, while Redis answers.
    pub fn shared(&self) -> bool {
        self.cluster.as_ref().is_some_and(|cluster| cluster.rate_limits_shared())
    }

    /// Whether it has a Redis link to share its buckets through (`scope:
    /// cluster` with a link that started).
    pub fn has_link(&self) -> bool {
        self.cluster.is_some()
    }

    /// Whether it shares its buckets through this link (a reload that
    /// changes `cluster:` gives it new buckets).
    pub fn shares_through(&self, cluster: Option<&std::sync::Arc<Cluster>>) -> bool {
        match (&self.cluster, cluster) {
            (None, _) => self.config.scope == ConcurrencyScope::Replica || cluster.is_none(),
            (Some(mine), Some(theirs)) => std::sync::Arc::ptr_eq(mine, theirs),
            (Some(_), None) => false,
        }
    }

    /// A shared bucket's name for a key's bytes: the same in every replica,
    /// and not one a client can aim at another's (SHA-256, where the local
    /// buckets use a secret of the process's own).
    pub fn shared_key(&self, bytes: &[u8]) -> String {
        shared_name(b'k', bytes)
    }

    /// The shared bucket of a client address (an IPv6 client's /64): named
    /// apart from every key's, whatever bytes a key holds.
    pub fn shared_client_key(&self, client: std::net::IpAddr) -> String {
        match client.to_canonical() {
            std::net::IpAddr::V4(v4) => shared_name(b'4', &v4.octets()),
            std::net::IpAddr::V6(v6) => shared_name(b'6', &v6.octets()[..8]),
        }
    }

    /// A token from the shared bucket `bucket`; from this replica's own
    /// bucket for the same key, `local`, when Redis does not answer within
    /// the cluster's command timeout (the one later requests take while
    /// Redis is away).
    pub async fn take_shared(&self, bucket: &str, local: u64) -> Result<(), Duration> {
        if let Some(cluster) = self.cluster.as_ref().filter(|cluster| cluster.available()) {
            let interval = self.config.per / self.config.requests;
            match cluster.take_token(&self.route, bucket, interval, self.config.burst).await {
                Ok(None) => return Ok(()),
                Ok(Some(wait)) => return Err(wait),
                Err(crate::cluster::Unreachable) => {}
            }
        }
        self.take(local)
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

/// `kind` and the first 16 bytes of the SHA-256 of `kind` then `bytes`, in hex.
fn shared_name(kind: u8, bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(&[kind]);
    context.update(bytes);
    let digest = context.finish();
    let mut name = String::with_capacity(33);
    name.push(char::from(kind));
    for byte in &digest.as_ref()[..16] {
        name.push(char::from(HEX[usize::from(byte >> 4)]));
        name.push(char::from(HEX[usize::from(byte & 15)]));
    }
    name
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
            scope: ConcurrencyScope::Replica,
        };
        let limit = RateLimit::new(&config, "route", None);
        let (a, b) = (limit.key(b"10.0.0.1"), limit.key(b"10.0.0.2"));
        for _ in 0..3 {
            assert_eq!(limit.take(a), Ok(()));
        }
        let wait = limit.take(a).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        assert_eq!(limit.take(b), Ok(()), "another key's bucket is full");
        assert_eq!(limit.keys(), 2);
    }

    #[test]
    fn a_keys_shared_bucket_is_never_a_clients() {
        let config = RateLimitConfig {
            requests: 10,
            per: Duration::from_secs(1),
            burst: 3,
            key: crate::config::RateLimitKey::Claim("sub".to_owned()),
            scope: ConcurrencyScope::Cluster,
        };
        let limit = RateLimit::new(&config, "route", None);
        let client = limit.shared_client_key(std::net::IpAddr::from([10, 0, 0, 5]));
        assert_ne!(limit.shared_key(&[4, 10, 0, 0, 5]), client, "a claim holding an address's bytes");
        assert_eq!(client, limit.shared_client_key("::ffff:10.0.0.5".parse().unwrap()), "a mapped address is its IPv4");
        assert_eq!(client.len(), 33);
    }
}
