#!/usr/bin/env bash
# Mint-path benchmark: /onramp through the release gateway (one worker, pinned to cpu 0)
# against a fast local fake CDP (cpu 1), with wrk (cpu 1). Not a test: numbers only.
#   bench/mint-bench.sh            # redirects/s + latency, fake answers at once
#   DELAY_MS=200 CONNS=5000 bench/mint-bench.sh   # slow CDP, many concurrent mints, RSS
#   MODE=both bench/mint-bench.sh  # first proxied HTTPS/1.1 GET / (nginx `return 200` app),
#                                  # then the mint path; prints redirects/s / proxied req/s
#   MODE=proxy bench/mint-bench.sh # the proxied run alone
#   KEY_TYPE=ed25519 bench/mint-bench.sh   # sign with an Ed25519 CDP key (default: ec, ES256)
#   CDP_TLS=0 bench/mint-bench.sh  # the old plain-HTTP/1.1 fake (one CDP connection per
#                                  # mint in flight, which the real CDP never makes us do)
#   CDP_H2_MAX_STREAMS=1000 ...    # the h2 stream limit the fake advertises (default hyper's
#                                  # 200, which bounds a slow fake at 200 calls in flight)
#   BACKEND=redis bench/mint-bench.sh            # the Redis rate-limit backend on loopback
#   GATEWAY_ENV="MALLOC_ARENA_MAX=1" bench/mint-bench.sh   # environment for the gateway only
# By default the fake CDP speaks TLS with ALPN h2 + http/1.1 like the real one, with a
# throw-away CA made here (cdp.ca_file); its TCP connection count is printed at the end.
# Needs: wrk, taskset, openssl, curl; nginx for MODE=both/proxy; redis-server for
# BACKEND=redis. Builds the release binary and the fake with
# `cargo build --release --example bench_fake_cdp`.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
DELAY_MS=${DELAY_MS:-0}
BACKEND=${BACKEND:-memory}
KEY_TYPE=${KEY_TYPE:-ec}
CDP_TLS=${CDP_TLS:-1}
MODE=${MODE:-mint}
case "$MODE" in mint|proxy|both) ;; *) echo "MODE must be mint, proxy or both"; exit 2 ;; esac
target=${CARGO_TARGET_DIR:-target}
cargo build --release --quiet --bin onramp-gateway --example bench_fake_cdp
ulimit -n 65536 2>/dev/null || true
dir=$(mktemp -d -t mint-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT

bench_self_signed "$dir"
if [ "$CDP_TLS" = 1 ]; then
  # A tiny CA and a 127.0.0.1 leaf for the fake CDP; the gateway trusts the CA through
  # cdp.ca_file, on top of its built-in roots.
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=mint-bench CDP CA" -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$dir/cdp-ca.key" -out "$dir/cdp-ca.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
    -keyout "$dir/cdp.key" -out "$dir/cdp.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$dir/cdp.ext"
  openssl x509 -req -in "$dir/cdp.csr" -CA "$dir/cdp-ca.crt" -CAkey "$dir/cdp-ca.key" \
    -CAcreateserial -days 2 -extfile "$dir/cdp.ext" -out "$dir/cdp.crt" 2>/dev/null
  cdp_base="https://127.0.0.1:18990"
  cdp_ca="ca_file = \"$dir/cdp-ca.crt\""
  cdp_env=(CDP_TLS_CERT="$dir/cdp.crt" CDP_TLS_KEY="$dir/cdp.key")
else
  cdp_base="http://127.0.0.1:18990"
  cdp_ca=""
  cdp_env=()
fi
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
if [ "$MODE" != mint ]; then
  # The app for the proxied run.
  bench_start_app "$dir" 18991
  pids+=("$app_pid")
fi
env "${cdp_env[@]}" taskset -c 1 "$target/release/examples/bench_fake_cdp" 18990 "$DELAY_MS" >"$dir/cdp.log" 2>&1 &
cdp=$!
pids+=($cdp)
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
api_base = "$cdp_base"
$cdp_ca
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
threads=1; [ "$CONNS" -gt 1000 ] && threads=2
# The gateway's CPU time (user + system, clock ticks) so far, and a run's CPU figures: busy %
# of its one core, and CPU µs per request. When the gateway is not near 100 % busy, req/s is
# capped by cpu 1 (wrk and the fake CDP, which verifies every JWT), and µs/request is the
# fair figure, as in proxy-bench.
ticks() { awk '{print $14 + $15}' /proc/$gw/stat; }
hz=$(getconf CLK_TCK)
cpu_line() { # TICKS_BEFORE TICKS_AFTER WRK_OUTPUT
  awk -v t0="$1" -v t1="$2" -v hz="$hz" -v d="$DURATION" '/requests in/ { n = $1 }
    END { s = (t1 - t0) / hz; printf "gateway cpu %.0f%% busy, %.1f us/request", 100 * s / d, 1e6 * s / n }' "$3"
}
rss() { echo "peak $(grep VmHWM /proc/$gw/status | awk '{printf "%.1f", $2/1024}') MiB, now $(grep VmRSS /proc/$gw/status | awk '{printf "%.1f", $2/1024}') MiB"; }
# wrk's "Requests/sec" and a latency percentile, in ms.
rps() { awk '/^Requests\/sec:/ {print $2}' "$1"; }
pct() {
  awk -v p="$2%" '$1 == p { v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v);
    m = (u == "us") ? v / 1000 : (u == "s") ? v * 1000 : (u == "m") ? v * 60000 : v; printf "%.2f", m }' "$1"
}

if [ "$MODE" != mint ]; then
  code=$(curl -sk -o /dev/null -w '%{http_code}' https://127.0.0.1:18643/)
  [ "$code" = 200 ] || { echo "proxied warm-up request got $code, expected 200"; cat "$dir/gateway.log"; exit 1; }
  echo "== proxied HTTPS/1.1 GET / (app: nginx return 200), $CONNS conns"
  t0=$(ticks)
  taskset -c 1 wrk -t"$threads" -c"$CONNS" -d"${DURATION}s" --latency --timeout 10s https://127.0.0.1:18643/ | tee "$dir/wrk-proxy.txt"
  proxy_cpu=$(cpu_line "$t0" "$(ticks)" "$dir/wrk-proxy.txt")
  echo "proxied run: $proxy_cpu"
  echo "gateway RSS after the proxied run: $(rss)"
fi
if [ "$MODE" != proxy ]; then
  url='https://127.0.0.1:18643/onramp?address=0x1111111111111111111111111111111111111111&blockchains=base&defaultAsset=USDC'
  code=$(curl -sk -o /dev/null -w '%{http_code}' "$url")
  [ "$code" = 302 ] || { echo "warm-up request got $code, expected 302"; cat "$dir/gateway.log"; exit 1; }
  echo "== mint path GET /onramp (302), $CONNS conns, fake CDP $cdp_base delay ${DELAY_MS} ms"
  t0=$(ticks)
  taskset -c 1 wrk -t"$threads" -c"$CONNS" -d"${DURATION}s" --latency --timeout 10s "$url" | tee "$dir/wrk.txt"
  mint_cpu=$(cpu_line "$t0" "$(ticks)" "$dir/wrk.txt")
  echo "mint run: $mint_cpu"
  echo "gateway RSS after the mint run: $(rss)"
  p50=$(pct "$dir/wrk.txt" 50); p99=$(pct "$dir/wrk.txt" 99)
  echo "mint p50 ${p50} ms, p99 ${p99} ms, p99/p50 $(awk -v a="$p99" -v b="$p50" 'BEGIN { if (b > 0) printf "%.2f", a / b }')"
fi
if [ "$MODE" = both ]; then
  echo "redirects/s / proxied req/s = $(rps "$dir/wrk.txt") / $(rps "$dir/wrk-proxy.txt") = $(awk -v a="$(rps "$dir/wrk.txt")" -v b="$(rps "$dir/wrk-proxy.txt")" 'BEGIN { if (b > 0) printf "%.3f", a / b }')"
  echo "cpu: proxied ($proxy_cpu) vs mint ($mint_cpu)"
fi
kill -INT "$cdp" 2>/dev/null || true
for _ in $(seq 50); do kill -0 "$cdp" 2>/dev/null || break; sleep 0.1; done
echo "fake CDP: $(grep -E '^(final|connections)' "$dir/cdp.log" | tail -1)"
grep -v '^fake CDP on\|^connections accepted\|^final' "$dir/cdp.log" || true
# wrk sends "127.0.0.1" as SNI, which rustls logs (and ignores) on every handshake.
sni=$(grep -c 'Illegal SNI extension' "$dir/gateway.log" || true)
if grep -v -q 'Illegal SNI extension' "$dir/gateway.log"; then
  echo "gateway log (warn and above, without $sni IP-as-SNI warnings):"
  grep -v 'Illegal SNI extension' "$dir/gateway.log" | tail -5
fi
echo "mode=$MODE cdp_tls=$CDP_TLS backend=$BACKEND key=$KEY_TYPE delay_ms=$DELAY_MS conns=$CONNS duration=${DURATION}s"
