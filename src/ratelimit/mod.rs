//! Per-client-IP rate limiting for the token-minting routes.
//!
//! Every request to the onramp and offramp routes is counted against one budget per client
//! (`[rate_limit]` in `config.toml`) *before* anything else happens, so a flood can never turn
//! into CDP calls. The algorithm is GCRA (the "virtual scheduling" form of a token bucket):
//!
//! * emission interval `T = 60 s / requests_per_minute` — one request's worth of budget comes
//!   back every `T`;
//! * tolerance `τ = T × (burst − 1)` — how far ahead of schedule a client may run, so a fresh
//!   client may send `burst` requests at once and then one every `T`.
//!
//! [`gcra::Gcra::step`] is that arithmetic as a pure function; [`MemoryLimiter`] (governor)
//! and the Redis backend of a later issue must both agree with it.
//!
//! Backends sit behind the object-safe [`RateLimiter`] trait, so the server holds an
//! `Arc<dyn RateLimiter>` and does not care where the state lives.

use std::future::Future;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

pub mod gcra;
pub mod layers;
pub mod memory;
pub mod redis;

pub use layers::{BucketKind, Layer, LayeredMemory, Layers, Verdict};
pub use memory::MemoryLimiter;
pub use redis::RedisLimiter;

/// Longest refill time (`burst × 60 / requests_per_minute`) a policy may have. A bucket that
/// takes more than a day to refill is a configuration mistake, and the cap keeps every
/// nanosecond computation (here and in governor) far from `u64` overflow.
pub const MAX_REFILL_SECS: u64 = 86_400;

/// `RateLimit-Policy` field name (lower case, as HTTP/2 requires).
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` field name.
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The `[rate_limit]` numbers that define the GCRA bucket of every client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Sustained rate: one request every `60 / requests_per_minute` seconds.
    pub requests_per_minute: u32,
    /// Bucket size: how many requests a fresh (or long idle) client may send at once.
    pub burst: u32,
    /// IPv6 clients are counted per network of this many leading bits (see [`limiter_key`]).
    pub ipv6_prefix: u8,
}

impl Default for Policy {
    /// The defaults of `config.toml`'s `[rate_limit]` table.
    fn default() -> Self {
        Policy {
            requests_per_minute: 10,
            burst: 5,
            ipv6_prefix: 64,
        }
    }
}

/// A `[rate_limit]` value that cannot work. Messages name the config key, so the config loader
/// can prefix the file name and print them as they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("rate_limit.requests_per_minute must be at least 1 (got 0)")]
    ZeroRate,
    #[error("rate_limit.burst must be at least 1 (got 0)")]
    ZeroBurst,
    #[error("rate_limit.ipv6_prefix must be between 1 and 128 (got {0})")]
    Ipv6Prefix(u8),
    #[error(
        "rate_limit.burst = {burst} with rate_limit.requests_per_minute = {rpm} takes {secs} s \
         to refill; at most {max} s is supported (raise requests_per_minute or lower burst)",
        max = MAX_REFILL_SECS
    )]
    RefillTooLong { burst: u32, rpm: u32, secs: u64 },
    /// Any other bad `[rate_limit]` value (the message names the key).
    #[error("{0}")]
    Invalid(String),
}

impl Policy {
    /// Checks the values; every backend calls this in its constructor.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.requests_per_minute == 0 {
            return Err(PolicyError::ZeroRate);
        }
        if self.burst == 0 {
            return Err(PolicyError::ZeroBurst);
        }
        if !(1..=128).contains(&self.ipv6_prefix) {
            return Err(PolicyError::Ipv6Prefix(self.ipv6_prefix));
        }
        // burst × 60 / rpm, rounded up; u64 cannot overflow here (u32 × 60).
        let secs = (u64::from(self.burst) * 60).div_ceil(u64::from(self.requests_per_minute));
        if secs > MAX_REFILL_SECS {
            return Err(PolicyError::RefillTooLong {
                burst: self.burst,
                rpm: self.requests_per_minute,
                secs,
            });
        }
        Ok(())
    }

    /// GCRA emission interval `T = 60 s / requests_per_minute`, truncated to whole nanoseconds
    /// exactly as governor's `Quota::per_minute` does (so both compute the same schedule).
    pub fn emission_interval(&self) -> Duration {
        Duration::from_nanos(gcra::Gcra::from_policy(self, gcra::NANOS_PER_SECOND).emission)
    }

    /// GCRA tolerance `τ = T × (burst − 1)`: how far ahead of its schedule a client may be.
    pub fn tolerance(&self) -> Duration {
        Duration::from_nanos(gcra::Gcra::from_policy(self, gcra::NANOS_PER_SECOND).tolerance)
    }

    /// `T × burst`: how long an empty bucket takes to become full again.
    pub fn refill_time(&self) -> Duration {
        let g = gcra::Gcra::from_policy(self, gcra::NANOS_PER_SECOND);
        Duration::from_nanos(g.tolerance.saturating_add(g.emission))
    }
}

/// The outcome of counting one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Let it through.
    Allowed {
        /// Requests the client may still send right now (the bucket's whole tokens).
        remaining: u32,
        /// Time until the bucket is full again if the client sends nothing more. The memory
        /// backend reports an upper bound, exact to within one emission interval (governor does
        /// not expose the fractional token); see [`MemoryLimiter`].
        reset: Duration,
    },
    /// Answer 429.
    Limited {
        /// Earliest time after which a request will be allowed again.
        retry_after: Duration,
        /// Time until the bucket is full again (`retry_after + τ`).
        reset: Duration,
    },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed { .. })
    }
}

/// A backend failed (the memory backend never does; Redis will). The server applies
/// `rate_limit.on_backend_error` ("deny" → 503, "allow" → let the request through).
#[derive(Debug, thiserror::Error)]
pub enum LimiterError {
    /// The backend could not be reached or refused the operation.
    #[error("rate-limit backend {backend} unavailable: {source}")]
    Unavailable {
        backend: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The backend did not answer in time.
    #[error("rate-limit backend {backend} did not answer within {after:?}")]
    Timeout {
        backend: &'static str,
        after: Duration,
    },
    /// The backend answered something this code does not understand (e.g. a script reply of
    /// the wrong shape) — a bug or a version mismatch, not a client problem.
    #[error("rate-limit backend {backend} sent an unexpected reply: {detail}")]
    BadReply {
        backend: &'static str,
        detail: String,
    },
    /// The memory backend holds `rate_limit.max_keys` buckets and this client is new.
    #[error("rate-limit memory backend holds rate_limit.max_keys = {max_keys} buckets")]
    Full { max_keys: usize },
}

/// A boxed, `Send` future borrowing the limiter: keeps the trait object-safe without
/// `async_trait`, so the server can hold `Arc<dyn RateLimiter>`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A layered rate limiter ([`Layers`]). Callers pass the client IP as decided by the
/// client-IP logic (socket peer / trusted proxy); each layer derives its bucket key.
pub trait RateLimiter: Send + Sync + 'static {
    /// Counts one request from `ip` against every layer and says whether it may proceed.
    fn check(&self, ip: IpAddr) -> BoxFuture<'_, Result<Verdict, LimiterError>>;
    /// Health for /readyz (memory: always Ok).
    fn health(&self) -> BoxFuture<'_, Result<(), LimiterError>>;
}

/// The key a client is counted under: IPv4 as is; IPv6 masked to `ipv6_prefix` bits (so one
/// /64 is one client, since a single subscriber usually gets a whole /64 and can pick any
/// address in it); IPv4-mapped IPv6 (`::ffff:a.b.c.d`, what a dual-stack socket reports for an
/// IPv4 peer) treated as IPv4, so the same client is never counted under two keys.
///
/// Total for any input: a prefix of 0 puts all of IPv6 in one bucket, a prefix above 128 is
/// read as 128 ([`Policy::validate`] refuses both, but this function must not panic).
pub fn limiter_key(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let prefix = u32::from(ipv6_prefix.min(128));
            // checked_shl: a shift by 128 (prefix 0) would overflow; that mask is all zeros.
            let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(v6.to_bits() & mask))
        }
    }
}

/// Whole seconds for a delay-seconds field: rounded UP, so a client that waits exactly that
/// long is never early.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The `Retry-After` value for a wait: whole seconds rounded up, and at least 1 — `0` would
/// invite an immediate retry that is bound to fail (the wait can round to zero when the
/// decision and the measurement straddle the refill instant). Also usable for other 429/503
/// answers (e.g. CDP throttling).
pub fn retry_after_secs(wait: Duration) -> u64 {
    ceil_secs(wait).max(1)
}

/// Response fields for a decision, following draft-ietf-httpapi-ratelimit-headers-11
/// ("RateLimit header fields for HTTP", 23 May 2026), whose fields are Structured Field Lists
/// (RFC 9651) of policy items:
///
/// ```text
/// RateLimit-Policy: "<bucket>";q=<burst>;w=<ceil(burst × 60 / rpm)>
/// RateLimit:        "<bucket>";r=<remaining>;t=<seconds>
/// Retry-After:      <seconds>                        (Limited only)
/// ```
///
/// Mapping GCRA `(T = 60/rpm s, burst)` onto the draft's quota model (q units per w seconds,
/// r available now, t = effective window):
///
/// * `q = burst`, `w = burst × T` rounded up. GCRA is a token bucket of `burst` tokens
///   refilled one per `T`; "at most `burst` requests in any `burst × T` seconds" is a schedule
///   that such a bucket never refuses (over any span `L` it admits at most
///   `burst × ⌈L / (burst·T)⌉ ≤ burst + L/T` requests, which is exactly the bucket's
///   allowance), and `burst / (burst·T)` is the true sustained rate. `q = rpm; w = 60` would be
///   wrong: a client sending `rpm` at once would be refused after `burst`. Rounding `w` up only
///   makes the advertised policy slower than the real one, never faster. (`w` must be a
///   non-zero integer, so it is at least 1.)
/// * `r` = whole tokens left after this request (0 when limited).
/// * `t` (allowed) = seconds until the bucket is full again ([`Decision::Allowed::reset`],
///   rounded up) — the GCRA analogue of the draft's fixed-window examples (`q=100;w=60` →
///   `r=99;t=50`): "you have `r`; by `t` you have all `q` again". It is conservative: tokens
///   trickle back before `t`, so a client that keeps within `r` until `t` is never refused.
/// * `t` (limited) = the `Retry-After` value, not the full reset: the draft (section 6) says
///   `Retry-After` SHOULD NOT point earlier than the end of the effective window, and `r=0`
///   holds exactly until the first token is back, i.e. until `Retry-After`.
/// * No `qu` (the default unit, "requests", is right) and no `pk`: the partition key would be
///   the client's address, which the draft advises against echoing (section 6.1).
///
/// Note (draft section 6): on 3xx answers these fields may make a client delay following the
/// `Location`, so the server should send them on 429 (and JSON) answers, not on the redirects.
///
/// `<bucket>` is the layer that answered ([`BucketKind::name`]: `ip`, `prefix`, `global`).
pub fn response_headers(verdict: &Verdict) -> Vec<(HeaderName, HeaderValue)> {
    let (name, policy, decision) = (verdict.bucket.name(), &verdict.policy, &verdict.decision);
    let q = policy.burst;
    let w = ceil_secs(policy.refill_time()).max(1);
    let (r, t, retry_after) = match *decision {
        // min(): a remote backend's numbers are clamped to the advertised quota.
        Decision::Allowed { remaining, reset } => (remaining.min(q), ceil_secs(reset), None),
        Decision::Limited { retry_after, .. } => {
            let secs = retry_after_secs(retry_after);
            (0, secs, Some(secs))
        }
    };

    let mut out = Vec::with_capacity(3);
    // The values are ASCII digits, quotes and separators, so the conversions cannot fail;
    // skipping a field is still better than a panic if that ever changes.
    let mut push = |name: &HeaderName, value: String| {
        if let Ok(v) = HeaderValue::try_from(value) {
            out.push((name.clone(), v));
        }
    };
    push(&RATELIMIT_POLICY, format!("\"{name}\";q={q};w={w}"));
    push(&RATELIMIT, format!("\"{name}\";r={r};t={t}"));
    if let Some(secs) = retry_after {
        push(&http::header::RETRY_AFTER, secs.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse().expect("test literal"))
    }

    fn rendered(policy: &Policy, d: &Decision) -> Vec<(String, String)> {
        response_headers(&Verdict {
            bucket: BucketKind::Ip,
            policy: *policy,
            decision: *d,
        })
        .into_iter()
        .map(|(n, v)| (n.to_string(), v.to_str().expect("ascii").to_owned()))
        .collect()
    }

    fn pair(n: &str, v: &str) -> (String, String) {
        (n.to_owned(), v.to_owned())
    }

    #[test]
    fn validate_refuses_bad_values_naming_the_key() {
        let ok = Policy::default();
        assert_eq!(ok.validate(), Ok(()));

        let e = Policy {
            requests_per_minute: 0,
            ..ok
        }
        .validate()
        .unwrap_err();
        assert_eq!(e, PolicyError::ZeroRate);
        assert!(e.to_string().contains("rate_limit.requests_per_minute"));

        let e = Policy { burst: 0, ..ok }.validate().unwrap_err();
        assert!(e.to_string().contains("rate_limit.burst"));

        for bad in [0u8, 129, 255] {
            let e = Policy {
                ipv6_prefix: bad,
                ..ok
            }
            .validate()
            .unwrap_err();
            assert_eq!(e, PolicyError::Ipv6Prefix(bad));
            assert!(e.to_string().contains("rate_limit.ipv6_prefix"));
        }
        for good in [1u8, 48, 64, 128] {
            assert_eq!(
                Policy {
                    ipv6_prefix: good,
                    ..ok
                }
                .validate(),
                Ok(())
            );
        }

        // One day is the cap: 1440 per minute-rate unit is fine, one more is not.
        let day = Policy {
            requests_per_minute: 1,
            burst: 1440,
            ipv6_prefix: 64,
        };
        assert_eq!(day.validate(), Ok(()));
        let e = Policy { burst: 1441, ..day }.validate().unwrap_err();
        assert!(matches!(e, PolicyError::RefillTooLong { secs: 86_460, .. }));
        // Extreme values must not overflow anything.
        let huge = Policy {
            requests_per_minute: u32::MAX,
            burst: u32::MAX,
            ipv6_prefix: 64,
        };
        assert!(huge.validate().is_ok());
        let _ = (
            huge.emission_interval(),
            huge.tolerance(),
            huge.refill_time(),
        );
    }

    #[test]
    fn gcra_numbers_are_explicit() {
        let p = Policy::default(); // 10/min, burst 5
        assert_eq!(p.emission_interval(), Duration::from_secs(6));
        assert_eq!(p.tolerance(), Duration::from_secs(24));
        assert_eq!(p.refill_time(), Duration::from_secs(30));
        // Truncated to whole nanoseconds like governor's Quota::per_minute.
        let p7 = Policy {
            requests_per_minute: 7,
            burst: 2,
            ipv6_prefix: 64,
        };
        assert_eq!(p7.emission_interval(), Duration::from_nanos(8_571_428_571));
        assert_eq!(p7.tolerance(), Duration::from_nanos(8_571_428_571));
    }

    #[test]
    fn ipv4_is_its_own_key() {
        let ip = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
        assert_eq!(limiter_key(ip, 64), ip);
        assert_eq!(limiter_key(ip, 1), ip);
    }

    #[test]
    fn ipv6_is_masked_to_the_prefix() {
        let a = v6("2001:db8:1:2:aaaa:bbbb:cccc:dddd");
        let b = v6("2001:db8:1:2::1");
        let other = v6("2001:db8:1:3::1");
        assert_eq!(limiter_key(a, 64), v6("2001:db8:1:2::"));
        assert_eq!(limiter_key(a, 64), limiter_key(b, 64));
        assert_ne!(limiter_key(a, 64), limiter_key(other, 64));
        assert_eq!(limiter_key(a, 48), limiter_key(other, 48));
        assert_eq!(limiter_key(a, 128), a);
        assert_eq!(limiter_key(a, 56), v6("2001:db8:1::"));
        // Out-of-range prefixes are total, not panics.
        assert_eq!(limiter_key(a, 0), v6("::"));
        assert_eq!(limiter_key(a, 200), a);
    }

    #[test]
    fn ipv4_mapped_ipv6_is_ipv4() {
        let mapped = v6("::ffff:198.51.100.9");
        let v4 = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 9));
        assert_eq!(limiter_key(mapped, 64), v4);
        // Only the mapped form: "::1" is IPv6 loopback, not 0.0.0.1.
        assert_eq!(limiter_key(v6("::1"), 128), v6("::1"));
    }

    #[test]
    fn headers_for_allowed() {
        let p = Policy::default();
        let d = Decision::Allowed {
            remaining: 4,
            reset: Duration::from_secs(6),
        };
        assert_eq!(
            rendered(&p, &d),
            vec![
                pair("ratelimit-policy", "\"ip\";q=5;w=30"),
                pair("ratelimit", "\"ip\";r=4;t=6"),
            ]
        );
        // Sub-second remainders round up.
        let d = Decision::Allowed {
            remaining: 0,
            reset: Duration::from_millis(29_001),
        };
        assert_eq!(rendered(&p, &d)[1].1, "\"ip\";r=0;t=30");
    }

    #[test]
    fn headers_for_limited() {
        let p = Policy::default();
        let d = Decision::Limited {
            retry_after: Duration::from_millis(5_200),
            reset: Duration::from_millis(29_200),
        };
        assert_eq!(
            rendered(&p, &d),
            vec![
                pair("ratelimit-policy", "\"ip\";q=5;w=30"),
                pair("ratelimit", "\"ip\";r=0;t=6"),
                pair("retry-after", "6"),
            ]
        );
    }

    #[test]
    fn retry_after_is_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_nanos(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_nanos(1_000_000_001)), 2);
        let d = Decision::Limited {
            retry_after: Duration::ZERO,
            reset: Duration::ZERO,
        };
        let h = rendered(&Policy::default(), &d);
        assert_eq!(h[1].1, "\"ip\";r=0;t=1");
        assert_eq!(h[2], pair("retry-after", "1"));
    }

    #[test]
    fn window_rounds_up_and_is_never_zero() {
        let fast = Policy {
            requests_per_minute: 600, // T = 100 ms
            burst: 1,
            ipv6_prefix: 64,
        };
        let d = Decision::Allowed {
            remaining: 0,
            reset: Duration::from_millis(100),
        };
        assert_eq!(
            rendered(&fast, &d),
            vec![
                pair("ratelimit-policy", "\"ip\";q=1;w=1"),
                pair("ratelimit", "\"ip\";r=0;t=1"),
            ]
        );
        let odd = Policy {
            requests_per_minute: 7,
            burst: 1,
            ipv6_prefix: 64,
        };
        assert_eq!(rendered(&odd, &d)[0].1, "\"ip\";q=1;w=9");
    }

    #[test]
    fn remote_remaining_is_clamped_to_the_quota() {
        let d = Decision::Allowed {
            remaining: 99,
            reset: Duration::ZERO,
        };
        assert_eq!(rendered(&Policy::default(), &d)[1].1, "\"ip\";r=5;t=0");
    }
}
