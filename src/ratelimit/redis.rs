//! Redis (or Valkey) backend: the per-IP limit shared by every replica.
//!
//! One atomic GCRA step per request, in a Lua script run with EVALSHA (the `redis`
//! crate's `Script` falls back to loading it on `NOSCRIPT`), so a request costs exactly
//! one round trip. The script is [`super::gcra`]'s step, in integer microseconds (Lua
//! numbers are doubles: epoch microseconds fit in 53 bits, nanoseconds do not), with
//! the clock taken from Redis `TIME` so replicas with skewed clocks still agree. Each
//! key is one client's TAT with a TTL of its reset time: an idle client costs Redis
//! nothing. A single key per call keeps it valid on Redis Cluster.
//!
//! The connection is a `ConnectionManager` created lazily (the gateway starts and
//! serves even while Redis is down, applying `on_backend_error`) that reconnects by
//! itself; each call is bounded by a short timeout.

use std::net::IpAddr;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::gcra::{Gcra, Step, MICROS_PER_SECOND};
use super::{limiter_key, BoxFuture, Decision, LimiterError, Policy, PolicyError, RateLimiter};

/// Per-call bound: a limiter that stalls must not stall the minting route.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(500);
const BACKEND: &str = "redis";

/// KEYS[1] = the client's bucket; ARGV[1] = T (µs); ARGV[2] = τ (µs).
/// Returns {1, remaining, reset_us} or {0, retry_after_us, reset_us}.
const GCRA_LUA: &str = r#"
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local t = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now) or now
local earliest = tat - tau
if now < earliest then
  return {0, earliest - now, tat - now}
end
local new_tat = math.max(tat, now) + t
local reset = new_tat - now
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil(reset / 1000))
return {1, math.floor((tau + t - reset) / t), reset}
"#;

pub struct RedisLimiter {
    policy: Policy,
    gcra: Gcra,
    prefix: String,
    script: Script,
    connection: ConnectionManager,
}

#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("rate_limit.redis_url: {0}")]
    Url(redis::RedisError),
}

impl RedisLimiter {
    /// Does not connect: the first request (or `/readyz`) does, and failures are
    /// reported per call.
    pub fn new(policy: Policy, redis_url: &str, key_prefix: &str) -> Result<Self, RedisSetupError> {
        policy.validate()?;
        let client = redis::Client::open(redis_url).map_err(RedisSetupError::Url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CALL_TIMEOUT))
            .set_response_timeout(Some(CALL_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(RedisSetupError::Url)?;
        Ok(Self {
            gcra: Gcra::from_policy(&policy, MICROS_PER_SECOND),
            policy,
            prefix: key_prefix.to_string(),
            script: Script::new(GCRA_LUA),
            connection,
        })
    }

    fn key(&self, ip: IpAddr) -> String {
        format!(
            "{}{}",
            self.prefix,
            limiter_key(ip, self.policy.ipv6_prefix)
        )
    }

    async fn step(&self, ip: IpAddr) -> Result<Decision, LimiterError> {
        let mut connection = self.connection.clone();
        let mut invocation = self.script.key(self.key(ip));
        invocation.arg(self.gcra.emission).arg(self.gcra.tolerance);
        let reply: Vec<i64> = bounded(invocation.invoke_async(&mut connection)).await?;
        let step = match reply.as_slice() {
            [1, remaining, reset] => Step::Allowed {
                new_tat: 0,
                remaining: u32::try_from(*remaining).unwrap_or(0),
                reset: u64::try_from(*reset).unwrap_or(0),
            },
            [0, retry_after, reset] => Step::Limited {
                retry_after: u64::try_from(*retry_after).unwrap_or(0),
                reset: u64::try_from(*reset).unwrap_or(0),
            },
            other => {
                return Err(LimiterError::BadReply {
                    backend: BACKEND,
                    detail: format!("{other:?}"),
                })
            }
        };
        Ok(self.gcra.decision(step))
    }
}

/// One Redis call under [`CALL_TIMEOUT`], its failure as a [`LimiterError`].
async fn bounded<T>(
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, LimiterError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| LimiterError::Timeout {
            backend: BACKEND,
            after: CALL_TIMEOUT,
        })?
        .map_err(|e| LimiterError::Unavailable {
            backend: BACKEND,
            source: Box::new(e),
        })
}

impl RateLimiter for RedisLimiter {
    fn check(&self, ip: IpAddr) -> BoxFuture<'_, Result<Decision, LimiterError>> {
        Box::pin(self.step(ip))
    }

    fn policy(&self) -> &Policy {
        &self.policy
    }

    fn health(&self) -> BoxFuture<'_, Result<(), LimiterError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let pong: String = bounded(redis::cmd("PING").query_async(&mut connection)).await?;
            if pong == "PONG" {
                Ok(())
            } else {
                Err(LimiterError::BadReply {
                    backend: BACKEND,
                    detail: pong,
                })
            }
        })
    }
}
