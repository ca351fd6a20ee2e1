//! Redis (or Valkey) backend: the layered limits shared by every replica.
//!
//! One atomic script call per request covers every layer ([`super::Layers`]: per IP,
//! per prefix, global), run with EVALSHA (the `redis` crate's `Script` falls back to
//! loading it on `NOSCRIPT`), so a request costs exactly one round trip. For each layer
//! in order the script runs [`super::gcra`]'s step, in integer microseconds (Lua numbers
//! are doubles: epoch microseconds fit in 53 bits, nanoseconds do not), with the clock
//! taken from Redis `TIME` so replicas with skewed clocks still agree, and stops at the
//! first refusal (earlier layers are not refunded, as in the memory backend). Each key is
//! one bucket's TAT with a TTL of its reset time: an idle client costs Redis nothing.
//!
//! With Redis Cluster (`rate_limit.redis_cluster`) the buckets of one request hash to
//! different slots, which one script call cannot touch: there the script runs once per
//! bucket, in the same order, stopping at the first refusal (same semantics, one round
//! trip per layer). Each node then reads its own `TIME`.
//!
//! The connection is the shared [`crate::redis_conn::RedisConn`] (plain or TLS, single
//! server or cluster), created lazily (the gateway starts and serves even while Redis is
//! down, applying `on_backend_error`) and reconnecting by itself; each call is bounded
//! by a short timeout.

use std::net::IpAddr;
use std::time::Duration;

use redis::Script;

use crate::redis_conn::{eval_script, RedisConn};

use super::gcra::{Gcra, Step, MICROS_PER_SECOND};
use super::{BoxFuture, Layer, Layers, LimiterError, PolicyError, RateLimiter, Verdict};

/// Per-call bound: a limiter that stalls must not stall the minting route.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(500);
const BACKEND: &str = "redis";

/// KEYS[i] = layer i's bucket; ARGV[2i-1] = its T (µs), ARGV[2i] = its τ (µs).
/// Returns {1, 1, remaining, reset_us} (all allowed; numbers of layer 1) or
/// {0, i, retry_after_us, reset_us} (layer i refused; later layers untouched).
const GCRA_LUA: &str = r#"
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local first_remaining, first_reset = 0, 0
for i = 1, #KEYS do
  local t = tonumber(ARGV[2 * i - 1])
  local tau = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now) or now
  local earliest = tat - tau
  if now < earliest then
    return {0, i, earliest - now, tat - now}
  end
  local new_tat = math.max(tat, now) + t
  local reset = new_tat - now
  redis.call('SET', KEYS[i], string.format('%d', new_tat), 'PX', math.ceil(reset / 1000))
  if i == 1 then
    first_remaining = math.floor((tau + t - reset) / t)
    first_reset = reset
  end
end
return {1, 1, first_remaining, first_reset}
"#;

pub struct RedisLimiter {
    layers: Vec<(Layer, Gcra)>,
    prefix: String,
    script: Script,
    connection: RedisConn,
}

#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

impl RedisLimiter {
    /// Does not connect: the first request (or `/readyz`) does, and failures are
    /// reported per call.
    pub fn new(
        layers: &Layers,
        connection: RedisConn,
        key_prefix: &str,
    ) -> Result<Self, RedisSetupError> {
        let mut built = Vec::new();
        for layer in layers.iter() {
            layer.policy.validate()?;
            built.push((*layer, Gcra::from_policy(&layer.policy, MICROS_PER_SECOND)));
        }
        Ok(Self {
            layers: built,
            prefix: key_prefix.to_string(),
            script: Script::new(GCRA_LUA),
            connection,
        })
    }

    /// `{prefix}{bucket}:{key}`, e.g. `onramp-gateway:rl:prefix:2001:db8:1::`.
    fn key(&self, layer: &Layer, ip: IpAddr) -> String {
        format!("{}{}:{}", self.prefix, layer.kind.name(), layer.key(ip))
    }

    async fn step(&self, ip: IpAddr) -> Result<Verdict, LimiterError> {
        let mut connection = self.connection.clone();
        let keys: Vec<String> = self
            .layers
            .iter()
            .map(|(layer, _)| self.key(layer, ip))
            .collect();
        let args: Vec<i64> = self
            .layers
            .iter()
            .flat_map(|(_, gcra)| [to_i64(gcra.emission), to_i64(gcra.tolerance)])
            .collect();
        if !connection.is_cluster() {
            let reply = self.call(&mut connection, &keys, &args).await?;
            return self.verdict(&reply, 0);
        }
        // Cluster: one call per bucket (each key is its own slot). The first layer's
        // remaining/reset are the ones reported when every layer allows.
        let mut first = None;
        for (i, key) in keys.iter().enumerate() {
            let reply = self
                .call(
                    &mut connection,
                    std::slice::from_ref(key),
                    &args[2 * i..2 * i + 2],
                )
                .await?;
            let verdict = self.verdict(&reply, i)?;
            if !verdict.decision.is_allowed() {
                return Ok(verdict);
            }
            first.get_or_insert(verdict);
        }
        first.ok_or_else(|| LimiterError::BadReply {
            backend: BACKEND,
            detail: "no layer".into(),
        })
    }

    async fn call(
        &self,
        connection: &mut RedisConn,
        keys: &[String],
        args: &[i64],
    ) -> Result<Vec<i64>, LimiterError> {
        bounded(eval_script(connection, &self.script, GCRA_LUA, keys, args)).await
    }

    /// The script's reply for the layers from `offset` on, as a verdict.
    fn verdict(&self, reply: &[i64], offset: usize) -> Result<Verdict, LimiterError> {
        let bad = |detail: String| LimiterError::BadReply {
            backend: BACKEND,
            detail,
        };
        let (allowed, index, a, b) = match reply {
            [allowed @ (0 | 1), index, a, b] => (*allowed == 1, *index, *a, *b),
            other => return Err(bad(format!("{other:?}"))),
        };
        let (layer, gcra) = usize::try_from(index)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| self.layers.get(i + offset))
            .ok_or_else(|| bad(format!("layer index {index}")))?;
        let step = if allowed {
            Step::Allowed {
                new_tat: 0,
                remaining: u32::try_from(a).unwrap_or(0),
                reset: u64::try_from(b).unwrap_or(0),
            }
        } else {
            Step::Limited {
                retry_after: u64::try_from(a).unwrap_or(0),
                reset: u64::try_from(b).unwrap_or(0),
            }
        };
        Ok(Verdict {
            bucket: layer.kind,
            policy: layer.policy,
            decision: gcra.decision(step),
        })
    }
}

/// The script's arguments are Lua numbers (doubles); the GCRA values are far below 2^53.
fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// One Redis call under [`CALL_TIMEOUT`], its failure as a [`LimiterError`].
pub async fn bounded<T>(
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
    fn check(&self, ip: IpAddr) -> BoxFuture<'_, Result<Verdict, LimiterError>> {
        Box::pin(self.step(ip))
    }

    fn health(&self) -> BoxFuture<'_, Result<(), LimiterError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let pong = bounded(connection.ping()).await?;
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
