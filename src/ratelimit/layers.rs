//! Layered buckets: per client IP, per network prefix, and global.
//!
//! A per-IP bucket alone is cheap to dodge: one IPv6 /48 (free from tunnel brokers) is
//! 65,536 separate /64 "clients", a /24 of IPv4 is 256, and nothing caps the total mint
//! rate that protects the operator's CDP quota. So a request is counted against every
//! bucket that applies, in the order ip → prefix → global, and the first exhausted one
//! answers. A later refusal does not refund an earlier bucket: GCRA has no refund, and a
//! client that keeps hitting a full prefix bucket should not keep its own budget intact.
//!
//! [`Layers`] is the one place the `[rate_limit]` keys become buckets; the memory backend
//! ([`LayeredMemory`]) and the Redis script both take their buckets from it, and
//! `config::validate` builds it too, so `check` refuses exactly what start-up would.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};

use super::{
    limiter_key, BoxFuture, Decision, LimiterError, MemoryLimiter, Policy, PolicyError, RateLimiter,
};
use crate::config::RateLimitConfig;

/// Most mints per second the global bucket may be set to (keeps `× 60` far from overflow).
pub const MAX_GLOBAL_PER_SECOND: u32 = 1_000_000;

/// Which bucket a decision came from. The name goes into `RateLimit-Policy`/`RateLimit`,
/// the reason into `onramp_gateway_mint_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BucketKind {
    /// One client: an IPv4 address, or an IPv6 `rate_limit.ipv6_prefix` network.
    Ip,
    /// A neighbourhood: IPv4 `/aggregate_ipv4_prefix`, IPv6 `/aggregate_ipv6_prefix`.
    Prefix,
    /// Everybody together.
    Global,
}

impl BucketKind {
    /// The policy name in the `RateLimit-Policy` / `RateLimit` fields.
    pub fn name(self) -> &'static str {
        match self {
            BucketKind::Ip => "ip",
            BucketKind::Prefix => "prefix",
            BucketKind::Global => "global",
        }
    }

    /// The `reason` label of `onramp_gateway_mint_refused_total` when this bucket refuses.
    pub fn refused_reason(self) -> &'static str {
        match self {
            BucketKind::Ip => "rate_limited",
            BucketKind::Prefix => "aggregate_limited",
            BucketKind::Global => "global_limited",
        }
    }
}

/// One bucket: its numbers and how a client IP maps to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layer {
    pub kind: BucketKind,
    /// Rate and burst; `ipv6_prefix` is the IPv6 keying of this layer.
    pub policy: Policy,
    /// IPv4 keying of this layer (32 = one address).
    pub ipv4_prefix: u8,
}

impl Layer {
    /// The bucket key of `ip` in this layer: masked to the layer's prefixes; all clients
    /// share `0.0.0.0` in the global layer. IPv4-mapped IPv6 counts as IPv4.
    pub fn key(&self, ip: IpAddr) -> IpAddr {
        match self.kind {
            BucketKind::Global => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            BucketKind::Ip | BucketKind::Prefix => match limiter_key(ip, self.policy.ipv6_prefix) {
                IpAddr::V4(v4) => {
                    let bits = u32::from(self.ipv4_prefix.min(32));
                    let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
                    IpAddr::V4(Ipv4Addr::from(v4.to_bits() & mask))
                }
                v6 => v6,
            },
        }
    }
}

/// The buckets every minting request is counted against, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layers {
    layers: Vec<Layer>,
}

impl Layers {
    /// A single per-IP bucket (the `[api]` endpoints' own budget uses this).
    pub fn per_ip(policy: Policy) -> Result<Self, PolicyError> {
        policy.validate()?;
        Ok(Layers {
            layers: vec![Layer {
                kind: BucketKind::Ip,
                policy,
                ipv4_prefix: 32,
            }],
        })
    }

    /// A single bucket for everybody: `per_second` sustained, burst `max(1, per_second)`.
    pub fn global(per_second: u32) -> Result<Self, PolicyError> {
        if per_second == 0 || per_second > MAX_GLOBAL_PER_SECOND {
            return Err(PolicyError::Invalid(format!(
                "a global budget must be between 1 and {MAX_GLOBAL_PER_SECOND} per second"
            )));
        }
        let policy = Policy {
            requests_per_minute: per_second * 60,
            burst: per_second,
            ipv6_prefix: 128,
        };
        policy.validate()?;
        Ok(Layers {
            layers: vec![Layer {
                kind: BucketKind::Global,
                policy,
                ipv4_prefix: 32,
            }],
        })
    }

    /// The `[rate_limit]` table's buckets: per-IP always; the prefix bucket when
    /// `aggregate_requests_per_minute > 0`; the global bucket when
    /// `global_mints_per_second > 0` (its burst is `max(1, global_mints_per_second)`).
    pub fn from_config(rl: &RateLimitConfig) -> Result<Self, PolicyError> {
        let mut layers = Self::per_ip(Policy {
            requests_per_minute: rl.requests_per_minute,
            burst: rl.burst,
            ipv6_prefix: rl.ipv6_prefix,
        })?;
        if rl.aggregate_requests_per_minute > 0 {
            if !(1..=32).contains(&rl.aggregate_ipv4_prefix) {
                return Err(PolicyError::Invalid(format!(
                    "rate_limit.aggregate_ipv4_prefix must be between 1 and 32 (got {})",
                    rl.aggregate_ipv4_prefix
                )));
            }
            let burst = if rl.aggregate_burst == 0 {
                rl.burst.saturating_mul(4)
            } else {
                rl.aggregate_burst
            };
            let policy = Policy {
                requests_per_minute: rl.aggregate_requests_per_minute,
                burst,
                ipv6_prefix: rl.aggregate_ipv6_prefix,
            };
            policy
                .validate()
                .map_err(|e| PolicyError::Invalid(format!("aggregate bucket: {e}")))?;
            layers.layers.push(Layer {
                kind: BucketKind::Prefix,
                policy,
                ipv4_prefix: rl.aggregate_ipv4_prefix,
            });
        }
        if rl.global_mints_per_second > MAX_GLOBAL_PER_SECOND {
            return Err(PolicyError::Invalid(format!(
                "rate_limit.global_mints_per_second must be at most {MAX_GLOBAL_PER_SECOND}"
            )));
        }
        if rl.global_mints_per_second > 0 {
            layers
                .layers
                .extend(Self::global(rl.global_mints_per_second)?.layers);
        }
        Ok(layers)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Layer> {
        self.layers.iter()
    }

    /// The per-IP layer (always the first).
    pub fn first(&self) -> &Layer {
        &self.layers[0]
    }
}

/// The outcome of counting one request against every layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The bucket that refused, or the per-IP bucket when all allowed.
    pub bucket: BucketKind,
    /// That bucket's numbers (for the response headers).
    pub policy: Policy,
    pub decision: Decision,
}

impl Verdict {
    pub fn is_allowed(&self) -> bool {
        self.decision.is_allowed()
    }
}

/// Memory backend over [`Layers`]: one governor limiter per layer, each capped at
/// `max_keys` distinct keys.
pub struct LayeredMemory<C: Clock = DefaultClock> {
    layers: Vec<(Layer, Arc<MemoryLimiter<C>>)>,
}

impl LayeredMemory<DefaultClock> {
    /// Builds the limiters and starts their housekeeping (needs a Tokio runtime).
    pub fn new(layers: &Layers, max_keys: usize) -> Result<Self, PolicyError> {
        let built = Self::with_clock(layers, max_keys, DefaultClock::default)?;
        for (_, limiter) in &built.layers {
            limiter.spawn_housekeeping(limiter.recommended_housekeeping_interval());
        }
        Ok(built)
    }
}

impl<C: Clock> LayeredMemory<C> {
    /// Builds the limiters on clocks from `clock` (tests: fake clocks), no housekeeping.
    pub fn with_clock(
        layers: &Layers,
        max_keys: usize,
        clock: impl Fn() -> C,
    ) -> Result<Self, PolicyError> {
        let mut out = Vec::new();
        for layer in layers.iter() {
            let limiter = MemoryLimiter::with_clock(layer.policy, clock())?.with_max_keys(max_keys);
            out.push((*layer, Arc::new(limiter)));
        }
        Ok(Self { layers: out })
    }

    /// Counts one request from `ip` against each layer in order, stopping at the first
    /// refusal (or at the first layer that is full: `LimiterError::Full`).
    pub fn check_now(&self, ip: IpAddr) -> Result<Verdict, LimiterError> {
        let mut verdict = None;
        for (layer, limiter) in &self.layers {
            let decision = limiter.check_capped(layer.key(ip))?;
            let this = Verdict {
                bucket: layer.kind,
                policy: layer.policy,
                decision,
            };
            if !decision.is_allowed() {
                return Ok(this);
            }
            verdict.get_or_insert(this);
        }
        verdict.ok_or_else(|| LimiterError::BadReply {
            backend: "memory",
            detail: "no rate-limit layer configured".into(),
        })
    }

    /// Keys held, per layer in order (tests, debugging).
    pub fn lens(&self) -> Vec<usize> {
        self.layers.iter().map(|(_, l)| l.len()).collect()
    }
}

impl<C> RateLimiter for LayeredMemory<C>
where
    C: Clock + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    fn check(&self, ip: IpAddr) -> BoxFuture<'_, Result<Verdict, LimiterError>> {
        Box::pin(std::future::ready(self.check_now(ip)))
    }

    fn health(&self) -> BoxFuture<'_, Result<(), LimiterError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn config() -> RateLimitConfig {
        RateLimitConfig {
            requests_per_minute: 10,
            burst: 2,
            aggregate_requests_per_minute: 20,
            aggregate_burst: 3,
            global_mints_per_second: 0,
            ..RateLimitConfig::default()
        }
    }

    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse().expect("literal"))
    }

    #[test]
    fn keys_follow_each_layers_prefix() {
        let layers = Layers::from_config(&RateLimitConfig {
            global_mints_per_second: 5,
            ..config()
        })
        .expect("valid");
        let kinds: Vec<_> = layers.iter().map(|l| l.kind).collect();
        assert_eq!(
            kinds,
            [BucketKind::Ip, BucketKind::Prefix, BucketKind::Global]
        );
        let [ip, prefix, global] = [0, 1, 2].map(|i| layers.layers[i]);
        let a = v6("2001:db8:aa:1::5");
        assert_eq!(ip.key(a), v6("2001:db8:aa:1::"));
        assert_eq!(prefix.key(a), v6("2001:db8:aa::"));
        assert_eq!(global.key(a), IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let b: IpAddr = "198.51.100.77".parse().unwrap();
        assert_eq!(ip.key(b), b);
        assert_eq!(prefix.key(b), "198.51.100.0".parse::<IpAddr>().unwrap());
        assert_eq!(
            prefix.key(v6("::ffff:198.51.100.9")),
            "198.51.100.0".parse::<IpAddr>().unwrap()
        );
        // The global bucket's burst is max(1, per second).
        assert_eq!(global.policy.burst, 5);
        assert_eq!(global.policy.requests_per_minute, 300);
    }

    #[test]
    fn off_by_default_and_bad_values_refused() {
        let layers = Layers::from_config(&RateLimitConfig::default()).expect("defaults");
        assert_eq!(layers.iter().count(), 1);
        let e = Layers::from_config(&RateLimitConfig {
            aggregate_ipv4_prefix: 0,
            ..config()
        })
        .unwrap_err();
        assert!(e.to_string().contains("aggregate_ipv4_prefix"), "{e}");
        let e = Layers::from_config(&RateLimitConfig {
            aggregate_ipv6_prefix: 0,
            ..config()
        })
        .unwrap_err();
        assert!(e.to_string().contains("aggregate bucket"), "{e}");
        let e = Layers::from_config(&RateLimitConfig {
            global_mints_per_second: MAX_GLOBAL_PER_SECOND + 1,
            ..config()
        })
        .unwrap_err();
        assert!(e.to_string().contains("global_mints_per_second"), "{e}");
        // aggregate_burst 0 = 4 x burst.
        let l = Layers::from_config(&RateLimitConfig {
            aggregate_burst: 0,
            ..config()
        })
        .unwrap();
        assert_eq!(l.layers[1].policy.burst, 8);
    }

    /// A /48 spray of distinct /64s: each /64 has its own per-IP budget, the prefix bucket
    /// holds them all together.
    #[test]
    fn prefix_bucket_holds_a_slash48_spray() {
        let layers = Layers::from_config(&config()).unwrap();
        let lim = LayeredMemory::with_clock(&layers, 1000, FakeRelativeClock::default).unwrap();
        let mut allowed = 0;
        let mut refused_by = None;
        for n in 0..100u16 {
            let ip = v6(&format!("2001:db8:77:{n:x}::1"));
            let v = lim.check_now(ip).unwrap();
            if v.is_allowed() {
                allowed += 1;
            } else {
                refused_by.get_or_insert(v.bucket);
            }
        }
        assert_eq!(allowed, 3, "the /48 bucket's burst");
        assert_eq!(refused_by, Some(BucketKind::Prefix));
        // Another /48 is unaffected.
        assert!(lim.check_now(v6("2001:db8:78::1")).unwrap().is_allowed());
    }

    #[test]
    fn first_refusal_answers_and_earlier_buckets_are_not_refunded() {
        let layers = Layers::from_config(&RateLimitConfig {
            aggregate_burst: 1,
            ..config()
        })
        .unwrap();
        let lim = LayeredMemory::with_clock(&layers, 1000, FakeRelativeClock::default).unwrap();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let v = lim.check_now(a).unwrap();
        assert!(v.is_allowed());
        assert_eq!(v.bucket, BucketKind::Ip);
        // b's per-IP bucket allows, the /24 bucket refuses: b's own token is spent.
        let v = lim.check_now(b).unwrap();
        assert_eq!(v.bucket, BucketKind::Prefix);
        assert!(!v.is_allowed());
        assert_eq!(lim.lens(), vec![2, 1]);
    }

    #[test]
    fn max_keys_refuses_new_keys_but_serves_known_ones() {
        let layers = Layers::per_ip(Policy::default()).unwrap();
        let lim = LayeredMemory::with_clock(&layers, 3, FakeRelativeClock::default).unwrap();
        for d in 1..=3u8 {
            assert!(lim
                .check_now(IpAddr::V4(Ipv4Addr::new(192, 0, 2, d)))
                .unwrap()
                .is_allowed());
        }
        let e = lim
            .check_now(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 4)))
            .unwrap_err();
        assert!(matches!(e, LimiterError::Full { max_keys: 3 }), "{e}");
        assert!(lim
            .check_now(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)))
            .unwrap()
            .is_allowed());
        assert_eq!(lim.lens(), vec![3]);
    }
}
