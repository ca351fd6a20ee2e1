//! One GCRA step as a pure function — the reference every backend must reproduce.
//!
//! The Generic Cell Rate Algorithm keeps a single number per client, the *theoretical
//! arrival time* (TAT): the instant at which the client's bucket would be full again, i.e.
//! "how far the client has run ahead of its schedule". With
//!
//! * `T` — emission interval, `60 s / requests_per_minute` (one unit of budget returns per `T`),
//! * `τ` — tolerance, `T × (burst − 1)` (how far ahead of schedule a client may run),
//!
//! a request arriving at `now` against a stored `tat` (absent = fresh client, read as `now`):
//!
//! ```text
//! tat   = stored tat, or now if absent
//! if now < tat − τ:                      # more than τ ahead of schedule
//!     LIMITED   retry_after = (tat − τ) − now
//!               reset       = tat − now                  # tat is left unchanged
//! else:
//!     new_tat = max(tat, now) + T                         # store it
//!     ALLOWED   reset       = new_tat − now               # ≤ burst × T
//!               remaining   = ⌊(τ + T − reset) / T⌋       # whole tokens left, 0..=burst−1
//! ```
//!
//! So a fresh client gets `burst` requests at once (each adds `T`; the `burst`-th leaves
//! `new_tat − now = burst·T = τ + T`, and the next one finds `now < tat − τ`), then one per `T`.
//!
//! This is exactly governor 0.10's `Gcra::test_and_update` plus its
//! `StateSnapshot::remaining_burst_capacity` (which the in-memory backend uses), in integer
//! ticks. For governor the tick is one nanosecond and `T = 60_000_000_000 / rpm` (truncated),
//! see [`NANOS_PER_SECOND`]. The Redis Lua script must compute the same thing; Lua numbers are
//! doubles, so it should work in integer microseconds ([`MICROS_PER_SECOND`]: epoch µs fit in
//! 53 bits, epoch ns do not) and store `tat` with a TTL of `reset` (the key is then dropped
//! exactly when it becomes indistinguishable from a fresh client). Compare the two with
//! [`Gcra::from_policy`] at the same tick size.

use super::{Decision, Policy};
use std::time::Duration;

/// Governor's (and so the memory backend's) time resolution.
pub const NANOS_PER_SECOND: u64 = 1_000_000_000;
/// The resolution a Lua script can use without losing precision.
pub const MICROS_PER_SECOND: u64 = 1_000_000;

/// GCRA parameters in integer ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// `T`: ticks per request at the sustained rate. Never 0.
    pub emission: u64,
    /// `τ = T × (burst − 1)`.
    pub tolerance: u64,
    /// Ticks per second, to convert results back to durations.
    pub ticks_per_second: u64,
}

/// The result of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Let the request through and store `new_tat`.
    Allowed {
        new_tat: u64,
        remaining: u32,
        /// Ticks until the bucket is full again.
        reset: u64,
    },
    /// Refuse it; the stored TAT stays as it was.
    Limited {
        /// Ticks until a request will be allowed.
        retry_after: u64,
        /// Ticks until the bucket is full again.
        reset: u64,
    },
}

impl Gcra {
    /// `T = (60 × ticks_per_second) / rpm` (truncated, at least one tick, as governor clamps
    /// it) and `τ = T × (burst − 1)`. Tolerates unvalidated policies (0 is read as 1) so that
    /// it cannot panic; backends validate with [`Policy::validate`] first anyway.
    pub fn from_policy(policy: &Policy, ticks_per_second: u64) -> Gcra {
        let ticks_per_second = ticks_per_second.max(1);
        let rpm = u64::from(policy.requests_per_minute.max(1));
        let emission = (ticks_per_second.saturating_mul(60) / rpm).max(1);
        let tolerance = emission.saturating_mul(u64::from(policy.burst.max(1) - 1));
        Gcra {
            emission,
            tolerance,
            ticks_per_second,
        }
    }

    /// One request at `now` against the stored `tat` (`None` for a key never seen or expired).
    /// Saturating arithmetic throughout: no input can panic.
    pub fn step(&self, tat: Option<u64>, now: u64) -> Step {
        let (t, tau) = (self.emission, self.tolerance);
        let tat = tat.unwrap_or(now);
        let earliest = tat.saturating_sub(tau);
        if now < earliest {
            return Step::Limited {
                retry_after: earliest - now,
                reset: tat - now, // tat ≥ earliest > now
            };
        }
        let new_tat = tat.max(now).saturating_add(t);
        let reset = new_tat - now; // new_tat ≥ now + t (unless saturated; then still ≥ now)
        let remaining = tau.saturating_add(t).saturating_sub(reset) / t;
        Step::Allowed {
            new_tat,
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
            reset,
        }
    }

    fn duration(&self, ticks: u64) -> Duration {
        let tps = u128::from(self.ticks_per_second);
        let nanos = u128::from(ticks) * u128::from(NANOS_PER_SECOND) / tps;
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// The [`Decision`] a backend reports for a step.
    pub fn decision(&self, step: Step) -> Decision {
        match step {
            Step::Allowed {
                remaining, reset, ..
            } => Decision::Allowed {
                remaining,
                reset: self.duration(reset),
            },
            Step::Limited { retry_after, reset } => Decision::Limited {
                retry_after: self.duration(retry_after),
                reset: self.duration(reset),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = NANOS_PER_SECOND;

    fn gcra(rpm: u32, burst: u32) -> Gcra {
        Gcra::from_policy(
            &Policy {
                requests_per_minute: rpm,
                burst,
                ipv6_prefix: 64,
            },
            S,
        )
    }

    /// Runs requests at the given instants; returns allowed/limited per request.
    fn pattern(g: &Gcra, at: &[u64]) -> Vec<bool> {
        let mut tat = None;
        at.iter()
            .map(|&now| match g.step(tat, now) {
                Step::Allowed { new_tat, .. } => {
                    tat = Some(new_tat);
                    true
                }
                Step::Limited { .. } => false,
            })
            .collect()
    }

    #[test]
    fn parameters() {
        let g = gcra(10, 5);
        assert_eq!((g.emission, g.tolerance), (6 * S, 24 * S));
        let g = Gcra::from_policy(&Policy::default(), MICROS_PER_SECOND);
        assert_eq!((g.emission, g.tolerance), (6_000_000, 24_000_000));
        // Unvalidated zeros do not divide by zero.
        let g = Gcra::from_policy(
            &Policy {
                requests_per_minute: 0,
                burst: 0,
                ipv6_prefix: 0,
            },
            0,
        );
        assert_eq!((g.emission, g.tolerance), (60, 0));
    }

    #[test]
    fn fresh_client_gets_burst_then_one_per_interval() {
        let g = gcra(10, 5);
        let mut tat = None;
        for expected_remaining in (0..5).rev() {
            match g.step(tat, 0) {
                Step::Allowed {
                    new_tat,
                    remaining,
                    reset,
                } => {
                    assert_eq!(remaining, expected_remaining);
                    assert_eq!(reset, (5 - u64::from(remaining)) * 6 * S);
                    tat = Some(new_tat);
                }
                other => panic!("expected allowed, got {other:?}"),
            }
        }
        assert_eq!(
            g.step(tat, 0),
            Step::Limited {
                retry_after: 6 * S,
                reset: 30 * S
            }
        );
        assert_eq!(
            g.step(tat, 6 * S - 1),
            Step::Limited {
                retry_after: 1,
                reset: 24 * S + 1
            }
        );
        assert!(matches!(
            g.step(tat, 6 * S),
            Step::Allowed { remaining: 0, .. }
        ));
    }

    #[test]
    fn sustained_pattern() {
        // burst 2, one per 6 s: at 0,0,0 → yes,yes,no; at 6 → yes; 7 → no; 12 → yes.
        let g = gcra(10, 2);
        assert_eq!(
            pattern(&g, &[0, 0, 0, 6 * S, 7 * S, 12 * S]),
            vec![true, true, false, true, false, true]
        );
        // burst 1 is a strict interval.
        let g = gcra(60, 1);
        assert_eq!(
            pattern(&g, &[0, S - 1, S, 2 * S - 1, 2 * S]),
            vec![true, false, true, false, true]
        );
    }

    #[test]
    fn idle_client_is_fresh_again_after_reset() {
        let g = gcra(10, 5);
        let mut tat = None;
        for _ in 0..5 {
            if let Step::Allowed { new_tat, .. } = g.step(tat, 0) {
                tat = Some(new_tat);
            }
        }
        // After the full reset (30 s) the stored TAT behaves like no TAT at all.
        assert_eq!(g.step(tat, 30 * S), g.step(None, 30 * S));
    }

    #[test]
    fn fractional_remaining_and_reset() {
        // One request at 0, another at 3 s: 1.5 tokens used → 3 whole left, full at 9 s.
        let g = gcra(10, 5);
        let Step::Allowed { new_tat, .. } = g.step(None, 0) else {
            panic!("fresh client refused")
        };
        assert_eq!(
            g.step(Some(new_tat), 3 * S),
            Step::Allowed {
                new_tat: 12 * S,
                remaining: 3,
                reset: 9 * S
            }
        );
    }

    #[test]
    fn decision_conversion() {
        let g = Gcra::from_policy(&Policy::default(), MICROS_PER_SECOND);
        assert_eq!(
            g.decision(Step::Limited {
                retry_after: 1_500_000,
                reset: 25_500_000
            }),
            Decision::Limited {
                retry_after: Duration::from_millis(1_500),
                reset: Duration::from_millis(25_500)
            }
        );
    }

    #[test]
    fn extreme_inputs_do_not_panic() {
        let g = gcra(1, 1440);
        let _ = g.step(Some(u64::MAX), 0);
        let _ = g.step(Some(0), u64::MAX);
        let _ = g.step(None, u64::MAX);
        let _ = g.decision(g.step(Some(u64::MAX), u64::MAX - 1));
    }
}
