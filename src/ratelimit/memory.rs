//! In-process backend: governor's keyed GCRA limiter over a `DashMap<IpAddr, TAT>`.
//!
//! Good for a single replica (each replica counts on its own). Memory is one small entry per
//! client key seen recently; [`MemoryLimiter::sweep`] drops the entries whose bucket is full
//! again (they are indistinguishable from a client never seen), so an attacker spraying
//! distinct addresses — easy with IPv6, hence the /64 keying — only holds memory for about
//! `refill_time + T + sweep interval` per address. Run [`MemoryLimiter::spawn_housekeeping`].

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::StateStore;
use governor::Quota;

use super::{limiter_key, Decision, LimiterError, Policy, PolicyError};

/// Floor for the housekeeping period, so a zero or tiny value cannot spin a worker.
pub const MIN_HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(10);

type Keyed<C> = governor::RateLimiter<IpAddr, SharedStore, C, StateInformationMiddleware>;

/// governor's own DashMap store, shared with the limiter so [`MemoryLimiter`] can ask
/// whether a key is already held before letting governor insert it (`max_keys`):
/// governor's keyed limiter inserts on every check and has no "is this key known" query.
/// Every operation delegates to governor's `DashMapStateStore` implementation.
#[derive(Clone, Default)]
struct SharedStore(Arc<DashMapStateStore<IpAddr>>);

impl StateStore for SharedStore {
    type Key = IpAddr;

    fn measure_and_replace<T, F, E>(&self, key: &IpAddr, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<IpAddr> for SharedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&*self.0, drop_below)
    }
    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&*self.0)
    }
    fn len(&self) -> usize {
        ShrinkableKeyedStateStore::len(&*self.0)
    }
    fn is_empty(&self) -> bool {
        ShrinkableKeyedStateStore::is_empty(&*self.0)
    }
}

/// The memory backend. Generic over governor's clock so tests can drive time with
/// `governor::clock::FakeRelativeClock`; the server uses the default (quanta, monotonic).
pub struct MemoryLimiter<C: Clock = DefaultClock> {
    policy: Policy,
    /// `τ`, to turn governor's "retry after" into "reset" for limited requests.
    tolerance: Duration,
    /// `T`, to turn governor's remaining whole tokens into a "reset" for allowed requests.
    emission: Duration,
    inner: Keyed<C>,
    store: SharedStore,
    /// Distinct keys held at most (`rate_limit.max_keys`); a new key beyond it is refused.
    max_keys: usize,
}

impl<C: Clock> std::fmt::Debug for MemoryLimiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLimiter")
            .field("policy", &self.policy)
            .field("keys", &self.len())
            .finish()
    }
}

impl MemoryLimiter<DefaultClock> {
    /// A limiter on the real (monotonic) clock. Fails if the policy values cannot work.
    pub fn new(policy: Policy) -> Result<Self, PolicyError> {
        Self::with_clock(policy, DefaultClock::default())
    }
}

impl<C: Clock> MemoryLimiter<C> {
    /// A limiter on the given clock (tests: `FakeRelativeClock`).
    pub fn with_clock(policy: Policy, clock: C) -> Result<Self, PolicyError> {
        policy.validate()?;
        let rpm = NonZeroU32::new(policy.requests_per_minute).ok_or(PolicyError::ZeroRate)?;
        let burst = NonZeroU32::new(policy.burst).ok_or(PolicyError::ZeroBurst)?;
        // per_minute(rpm): T = 60 s / rpm (integer nanoseconds); allow_burst: bucket of
        // `burst`, i.e. τ = T × (burst − 1). The same numbers as `gcra::Gcra::from_policy`.
        let quota = Quota::per_minute(rpm).allow_burst(burst);
        let store = SharedStore::default();
        let inner: Keyed<C> = governor::RateLimiter::new(quota, store.clone(), clock);
        Ok(MemoryLimiter {
            tolerance: policy.tolerance(),
            emission: policy.emission_interval(),
            policy,
            inner,
            store,
            max_keys: usize::MAX,
        })
    }

    /// Caps the distinct keys held (`rate_limit.max_keys`). The cap is checked before
    /// governor inserts, so it can be overshot by at most the number of concurrent checks.
    pub fn with_max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys.max(1);
        self
    }

    /// Like [`check_now`](Self::check_now), but a key not yet held while `max_keys` keys
    /// are held is refused with [`LimiterError::Full`] instead of growing the map: an
    /// address spray then meets the operator's `on_backend_error` policy, not an OOM kill.
    pub fn check_capped(&self, ip: IpAddr) -> Result<Decision, LimiterError> {
        let key = limiter_key(ip, self.policy.ipv6_prefix);
        if self.store.0.len() >= self.max_keys && !self.store.0.contains_key(&key) {
            return Err(LimiterError::Full {
                max_keys: self.max_keys,
            });
        }
        Ok(self.check_now(ip))
    }

    /// Counts one request from `ip` (keyed with [`limiter_key`]) — synchronous, never blocks
    /// beyond one map-shard lock.
    pub fn check_now(&self, ip: IpAddr) -> Decision {
        let key = limiter_key(ip, self.policy.ipv6_prefix);
        match self.inner.check_key(&key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                // governor keeps the exact TAT private and only reports whole tokens left, so
                // the time until full is bounded from above: the used fraction of the bucket
                // is at most (burst − remaining) tokens, each taking T to come back. Exact for
                // requests on whole-interval boundaries (e.g. a burst at one instant), at most
                // one T too long otherwise — which only makes the `RateLimit` header more
                // cautious.
                let used = self.policy.burst.saturating_sub(remaining);
                Decision::Allowed {
                    remaining,
                    reset: self.emission.saturating_mul(used),
                }
            }
            Err(not_until) => {
                let retry_after = not_until.wait_time_from(self.inner.clock().now());
                Decision::Limited {
                    retry_after,
                    // Limited means TAT − τ > now, so time to full = (TAT − τ − now) + τ.
                    reset: retry_after.saturating_add(self.tolerance),
                }
            }
        }
    }

    /// Evicts every key whose bucket has been full again for at least one emission interval
    /// (governor's `retain_recent`: TAT ≤ now − T), then returns the freed capacity to the
    /// allocator (`shrink_to_fit`), so memory follows the live client count back down after
    /// a spray of addresses. Cost is a walk over all keys, one shard lock at a time.
    pub fn sweep(&self) {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
    }

    /// The bucket numbers.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Keys currently held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// The clock the limiter runs on (tests advance a fake one).
    pub fn clock(&self) -> &C {
        self.inner.clock()
    }

    /// A sensible period for [`spawn_housekeeping`](Self::spawn_housekeeping): the bucket
    /// refill time (no entry can be evicted sooner than that anyway), kept between 10 s and
    /// 60 s so a sweep is neither constant work nor rare enough to let a spray pile up.
    /// 30 s with the default policy.
    pub fn recommended_housekeeping_interval(&self) -> Duration {
        self.policy
            .refill_time()
            .clamp(Duration::from_secs(10), Duration::from_secs(60))
    }
}

impl<C> MemoryLimiter<C>
where
    C: Clock + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    /// Runs [`sweep`](Self::sweep) every `every` (at least [`MIN_HOUSEKEEPING_INTERVAL`]) on
    /// the Tokio runtime, the walk itself on the blocking pool so it never stalls request
    /// handling. The task holds only a weak reference: it ends by itself once the limiter is
    /// dropped (or abort the handle). Must be called inside a Tokio runtime.
    pub fn spawn_housekeeping(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let every = every.max(MIN_HOUSEKEEPING_INTERVAL);
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            // After a stall, sweep once and carry on; catching up with a burst of sweeps would
            // just repeat the same work.
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(limiter) = weak.upgrade() else {
                    break;
                };
                let swept = tokio::task::spawn_blocking(move || {
                    let before = limiter.len();
                    limiter.sweep();
                    (before, limiter.len())
                })
                .await;
                match swept {
                    Ok((before, after)) => tracing::debug!(
                        before,
                        after,
                        evicted = before.saturating_sub(after),
                        "rate-limit housekeeping"
                    ),
                    // A sweep that panicked or was cancelled at shutdown: keep the schedule.
                    Err(e) => tracing::warn!(error = %e, "rate-limit housekeeping sweep failed"),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::gcra::{Gcra, Step, NANOS_PER_SECOND};
    use super::super::{
        response_headers, retry_after_secs, BucketKind, LayeredMemory, Layers, RateLimiter, Verdict,
    };
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Instant;

    const SEC: Duration = Duration::from_secs(1);

    fn limiter(rpm: u32, burst: u32) -> MemoryLimiter<FakeRelativeClock> {
        MemoryLimiter::with_clock(
            Policy {
                requests_per_minute: rpm,
                burst,
                ipv6_prefix: 64,
            },
            FakeRelativeClock::default(),
        )
        .expect("valid test policy")
    }

    fn verdict(lim: &MemoryLimiter<FakeRelativeClock>, decision: Decision) -> Verdict {
        Verdict {
            bucket: BucketKind::Ip,
            policy: *lim.policy(),
            decision,
        }
    }

    fn ip4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn ip6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse::<Ipv6Addr>().expect("test literal"))
    }

    #[test]
    fn constructor_validates() {
        let bad = Policy {
            burst: 0,
            ..Policy::default()
        };
        assert_eq!(MemoryLimiter::new(bad).unwrap_err(), PolicyError::ZeroBurst);
        let bad = Policy {
            requests_per_minute: 0,
            ..Policy::default()
        };
        assert_eq!(MemoryLimiter::new(bad).unwrap_err(), PolicyError::ZeroRate);
        let bad = Policy {
            ipv6_prefix: 0,
            ..Policy::default()
        };
        assert_eq!(
            MemoryLimiter::new(bad).unwrap_err(),
            PolicyError::Ipv6Prefix(0)
        );
        assert!(MemoryLimiter::new(Policy::default()).is_ok());
    }

    #[test]
    fn burst_then_limited_with_remaining_counting_down() {
        let lim = limiter(10, 5);
        let ip = ip4(192, 0, 2, 1);
        for (n, expected) in [4u32, 3, 2, 1, 0].into_iter().enumerate() {
            assert_eq!(
                lim.check_now(ip),
                Decision::Allowed {
                    remaining: expected,
                    reset: 6 * SEC * (n as u32 + 1),
                },
                "request {}",
                n + 1
            );
        }
        assert_eq!(
            lim.check_now(ip),
            Decision::Limited {
                retry_after: 6 * SEC,
                reset: 30 * SEC,
            }
        );
        // Another client is not affected.
        assert!(lim.check_now(ip4(192, 0, 2, 2)).is_allowed());
    }

    #[test]
    fn retry_after_is_one_emission_interval_and_honest() {
        let lim = limiter(10, 5); // T = 6 s
        let ip = ip4(198, 51, 100, 1);
        for _ in 0..5 {
            assert!(lim.check_now(ip).is_allowed());
        }
        lim.clock().advance(Duration::from_millis(1_500));
        let Decision::Limited { retry_after, reset } = lim.check_now(ip) else {
            panic!("sixth request allowed")
        };
        assert_eq!(retry_after, Duration::from_millis(4_500));
        assert_eq!(reset, Duration::from_millis(28_500));
        assert_eq!(retry_after_secs(retry_after), 5);

        // Just before the advertised instant: still limited; at it: allowed.
        lim.clock().advance(retry_after - Duration::from_nanos(1));
        assert!(!lim.check_now(ip).is_allowed());
        lim.clock().advance(Duration::from_nanos(1));
        assert_eq!(
            lim.check_now(ip),
            Decision::Allowed {
                remaining: 0,
                reset: 30 * SEC
            }
        );
    }

    #[test]
    fn retry_after_header_never_zero_and_matches_t() {
        let lim = limiter(600, 1); // T = 100 ms: the raw wait is always below one second
        let ip = ip4(203, 0, 113, 5);
        assert!(lim.check_now(ip).is_allowed());
        for step_ms in [0u64, 30, 30, 30] {
            lim.clock().advance(Duration::from_millis(step_ms));
            let d = lim.check_now(ip);
            assert!(!d.is_allowed());
            let h = response_headers(&verdict(&lim, d));
            let get = |name: &str| {
                h.iter()
                    .find(|(n, _)| n.as_str() == name)
                    .map(|(_, v)| v.to_str().expect("ascii").to_owned())
            };
            assert_eq!(get("retry-after").as_deref(), Some("1"));
            assert_eq!(get("ratelimit").as_deref(), Some("\"ip\";r=0;t=1"));
        }
    }

    #[test]
    fn headers_through_a_burst() {
        let lim = limiter(10, 5);
        let ip = ip4(192, 0, 2, 77);
        let mut seen = Vec::new();
        for _ in 0..6 {
            let d = lim.check_now(ip);
            let h = response_headers(&verdict(&lim, d));
            seen.push(
                h.iter()
                    .map(|(n, v)| format!("{n}: {}", v.to_str().expect("ascii")))
                    .collect::<Vec<_>>()
                    .join(" | "),
            );
        }
        let policy = "ratelimit-policy: \"ip\";q=5;w=30";
        assert_eq!(
            seen,
            vec![
                format!("{policy} | ratelimit: \"ip\";r=4;t=6"),
                format!("{policy} | ratelimit: \"ip\";r=3;t=12"),
                format!("{policy} | ratelimit: \"ip\";r=2;t=18"),
                format!("{policy} | ratelimit: \"ip\";r=1;t=24"),
                format!("{policy} | ratelimit: \"ip\";r=0;t=30"),
                format!("{policy} | ratelimit: \"ip\";r=0;t=6 | retry-after: 6"),
            ]
        );
    }

    #[test]
    fn ipv6_addresses_in_one_slash64_share_a_bucket() {
        let lim = limiter(10, 2);
        let a = ip6("2001:db8:aa:bb::1");
        let b = ip6("2001:db8:aa:bb:ffff:ffff:ffff:fffe");
        let other = ip6("2001:db8:aa:bc::1");
        assert!(lim.check_now(a).is_allowed());
        assert!(lim.check_now(b).is_allowed());
        assert!(!lim.check_now(a).is_allowed(), "/64 budget spent");
        assert!(!lim.check_now(b).is_allowed());
        assert!(
            lim.check_now(other).is_allowed(),
            "another /64 is another client"
        );
        assert_eq!(lim.len(), 2);
    }

    #[test]
    fn ipv4_mapped_shares_the_ipv4_bucket() {
        let lim = limiter(10, 2);
        assert!(lim.check_now(ip6("::ffff:192.0.2.10")).is_allowed());
        assert!(lim.check_now(ip4(192, 0, 2, 10)).is_allowed());
        assert!(!lim.check_now(ip6("::ffff:192.0.2.10")).is_allowed());
        assert!(!lim.check_now(ip4(192, 0, 2, 10)).is_allowed());
        assert_eq!(lim.len(), 1);
    }

    #[test]
    fn trait_object_works() {
        let layers = Layers::per_ip(Policy {
            burst: 1,
            ..Policy::default()
        })
        .expect("valid");
        let lim: Arc<dyn RateLimiter> = Arc::new(
            LayeredMemory::with_clock(&layers, 10, FakeRelativeClock::default).expect("valid"),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let ip = ip4(192, 0, 2, 200);
            assert!(lim.check(ip).await.expect("not full").is_allowed());
            let v = lim.check(ip).await.expect("not full");
            assert!(!v.is_allowed());
            assert_eq!(v.bucket, BucketKind::Ip);
            assert!(lim.health().await.is_ok());
        });
    }

    /// Governor (this backend) and the pure `gcra::step` must agree request by request —
    /// the Redis script is checked against the same function.
    #[test]
    fn governor_agrees_with_the_pure_gcra_step() {
        for (rpm, burst) in [(10u32, 5u32), (7, 3), (60, 1), (1, 4), (600, 10)] {
            let lim = limiter(rpm, burst);
            let g = Gcra::from_policy(lim.policy(), NANOS_PER_SECOND);
            let ip = ip4(10, 0, 0, 1);
            let mut tat = None;
            // Deterministic pseudo-random gaps between 0 and 2T, often exactly 0 or T.
            let mut seed: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(rpm);
            let mut now: u64 = 0;
            let mut allowed = 0;
            for i in 0..2_000 {
                seed = seed
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let r = seed >> 33;
                let gap = match r % 4 {
                    0 => 0,
                    1 => g.emission,
                    _ => (r % 1_000) * g.emission / 500,
                };
                lim.clock().advance(Duration::from_nanos(gap));
                now += gap;
                let got = lim.check_now(ip);
                let want = g.step(tat, now);
                match (got, want) {
                    (
                        Decision::Allowed { remaining, reset },
                        Step::Allowed {
                            new_tat,
                            remaining: want_remaining,
                            reset: want_reset,
                        },
                    ) => {
                        tat = Some(new_tat);
                        allowed += 1;
                        assert_eq!(remaining, want_remaining, "rpm {rpm} burst {burst} #{i}");
                        // Memory reports an upper bound within one T of the exact reset.
                        let exact = Duration::from_nanos(want_reset);
                        assert!(reset >= exact && reset - exact < lim.emission, "#{i}");
                    }
                    (
                        Decision::Limited { retry_after, reset },
                        Step::Limited {
                            retry_after: want_retry,
                            reset: want_reset,
                        },
                    ) => {
                        assert_eq!(retry_after, Duration::from_nanos(want_retry), "#{i}");
                        assert_eq!(reset, Duration::from_nanos(want_reset), "#{i}");
                    }
                    (got, want) => {
                        panic!("rpm {rpm} burst {burst} #{i} at {now}: {got:?} vs pure {want:?}")
                    }
                }
            }
            assert!(
                allowed > 100 && allowed < 2_000,
                "schedule exercised both outcomes"
            );
        }
    }

    #[test]
    fn sweep_keeps_clients_that_still_owe() {
        let lim = limiter(10, 5);
        let busy = ip4(192, 0, 2, 1);
        let idle = ip4(192, 0, 2, 2);
        for _ in 0..6 {
            lim.check_now(busy);
        }
        lim.check_now(idle); // full again at 6 s, evictable from 12 s
        lim.clock().advance(12 * SEC);
        lim.sweep();
        assert_eq!(
            lim.len(),
            1,
            "idle key evicted, busy key (full at 30 s) kept"
        );
        // The kept state still limits: 12 s after a 5-burst only 2 tokens are back.
        assert!(lim.check_now(busy).is_allowed());
        assert!(lim.check_now(busy).is_allowed());
        assert!(!lim.check_now(busy).is_allowed());
    }

    /// Feeds `n` distinct client keys, lets every bucket fill up again, sweeps, and expects
    /// an empty store. Returns (fill, sweep) timings for the report.
    fn spray(n: u32) -> (Duration, Duration) {
        let lim = limiter(10, 5);
        let t0 = Instant::now();
        for i in 0..n {
            // Distinct IPv6 /64s: the realistic spray (one host can own many).
            let net = u128::from(i) << 64 | 0xdead_beef;
            let ip = IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | net));
            assert!(lim.check_now(ip).is_allowed());
        }
        let fill = t0.elapsed();
        assert_eq!(lim.len(), n as usize);

        // Nothing is evictable while the buckets still owe.
        lim.sweep();
        assert_eq!(lim.len(), n as usize);

        // Each key used one token: full again after T, evictable once TAT ≤ now − T. Go past
        // the worst case for any key (full refill + T).
        lim.clock()
            .advance(lim.policy().refill_time() + lim.emission + Duration::from_nanos(1));
        let t1 = Instant::now();
        lim.sweep();
        let sweep = t1.elapsed();
        assert_eq!(lim.len(), 0);
        assert!(lim.is_empty());
        // The store is usable afterwards and starts fresh.
        assert_eq!(
            lim.check_now(ip4(192, 0, 2, 1)),
            Decision::Allowed {
                remaining: 4,
                reset: 6 * SEC
            }
        );
        (fill, sweep)
    }

    #[test]
    fn spray_of_100k_keys_is_swept() {
        let (fill, sweep) = spray(100_000);
        eprintln!("100k keys: fill {fill:?}, sweep {sweep:?}");
    }

    #[test]
    fn spray_of_1m_keys_is_swept() {
        let (fill, sweep) = spray(1_000_000);
        eprintln!("1M keys: fill {fill:?}, sweep {sweep:?}");
    }

    #[tokio::test]
    async fn housekeeping_task_sweeps_and_stops_with_the_limiter() {
        let lim = Arc::new(limiter(60, 1));
        for i in 0..100u8 {
            lim.check_now(ip4(10, 1, 0, i));
        }
        assert_eq!(lim.len(), 100);
        lim.clock().advance(3 * SEC);
        let task = lim.spawn_housekeeping(Duration::from_millis(20));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !lim.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(lim.is_empty(), "housekeeping never swept");
        drop(lim);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("task ends once the limiter is gone")
            .expect("task did not panic");
    }

    #[test]
    fn recommended_interval() {
        assert_eq!(limiter(10, 5).recommended_housekeeping_interval(), 30 * SEC);
        assert_eq!(
            limiter(600, 1).recommended_housekeeping_interval(),
            10 * SEC
        );
        assert_eq!(
            limiter(1, 100).recommended_housekeeping_interval(),
            60 * SEC
        );
    }
}
