#!/usr/bin/env bash
# Mint-path benchmark: /onramp through the release gateway (one worker, pinned to cpu 0)
# against a fast local fake CDP (cpu 1), with wrk (cpu 1). Not a test: numbers only.
#   bench/mint-bench.sh            # redirects/s + latency, fake answers at once
#   DELAY_MS=200 CONNS=5000 bench/mint-bench.sh   # slow CDP, many concurrent mints, RSS
#   BACKEND=redis bench/mint-bench.sh            # the Redis rate-limit backend on loopback
#   GATEWAY_ENV="MALLOC_ARENA_MAX=1" bench/mint-bench.sh   # environment for the gateway only
# Needs: wrk, taskset, openssl; redis-server for BACKEND=redis. Builds the release binary
# and the fake with `cargo build --release --example bench_fake_cdp`.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
DELAY_MS=${DELAY_MS:-0}
BACKEND=${BACKEND:-memory}
KEY_TYPE=${KEY_TYPE:-ec}
target=${CARGO_TARGET_DIR:-target}
cargo build --release --quiet --bin onramp-gateway --example bench_fake_cdp
ulimit -n 65536 2>/dev/null || true
dir=$(mktemp -d -t mint-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -keyout "$dir/tls.key" -out "$dir/tls.crt" 2>/dev/null
if [ "$KEY_TYPE" = ed25519 ]; then
  secret=$(python3 -c 'import os,base64,hashlib
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives import serialization as s
k=Ed25519PrivateKey.generate(); seed=k.private_bytes(s.Encoding.Raw,s.PrivateFormat.Raw,s.NoEncryption()); pub=k.public_key().public_bytes(s.Encoding.Raw,s.PublicFormat.Raw)
print(base64.b64encode(seed+pub).decode())')
else
  secret=$(openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null)
fi
redis_url="redis://127.0.0.1:18379/0"
if [ "$BACKEND" = redis ]; then
  taskset -c 1 redis-server --port 18379 --bind 127.0.0.1 --save '' --appendonly no >"$dir/redis.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do redis-cli -p 18379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
taskset -c 1 "$target/release/examples/bench_fake_cdp" 18990 "$DELAY_MS" >"$dir/cdp.log" 2>&1 &
pids+=($!)
cat > "$dir/config.toml" <<CONF
[server]
listen = "127.0.0.1:18643"
workers = 1
max_connections = 20000
[tls]
cert = "$dir/tls.crt"
key = "$dir/tls.key"
[upstream]
url = "http://127.0.0.1:18991"
[admin]
listen = ""
[cdp]
api_base = "http://127.0.0.1:18990"
timeout_ms = 5000
[rate_limit]
requests_per_minute = 100000000
burst = 100000000
backend = "$BACKEND"
redis_url = "$redis_url"
[log]
level = "warn"
CONF
CDP_API_KEY_ID=bench-key CDP_API_KEY_SECRET="$secret" env ${GATEWAY_ENV:-} taskset -c 0 "$target/release/onramp-gateway" \
  --config "$dir/config.toml" >"$dir/gateway.log" 2>&1 &
gw=$!
pids+=($gw)
for _ in $(seq 100); do curl -sk -o /dev/null https://127.0.0.1:18643/healthz-probe && break; sleep 0.1; done
url='https://127.0.0.1:18643/onramp?address=0x1111111111111111111111111111111111111111&blockchains=base&defaultAsset=USDC'
code=$(curl -sk -o /dev/null -w '%{http_code}' "$url")
[ "$code" = 302 ] || { echo "warm-up request got $code, expected 302"; cat "$dir/gateway.log"; exit 1; }
threads=1; [ "$CONNS" -gt 1000 ] && threads=2
taskset -c 1 wrk -t"$threads" -c"$CONNS" -d"${DURATION}s" --latency --timeout 10s "$url" | tee "$dir/wrk.txt"
echo "gateway RSS peak: $(grep VmHWM /proc/$gw/status | awk '{print $2/1024 " MiB"}'), now: $(grep VmRSS /proc/$gw/status | awk '{print $2/1024 " MiB"}')"
echo "backend=$BACKEND key=$KEY_TYPE delay_ms=$DELAY_MS conns=$CONNS duration=${DURATION}s"
