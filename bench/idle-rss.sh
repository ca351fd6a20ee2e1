#!/usr/bin/env bash
# Idle and per-connection memory of the release gateway: starts it (one worker, pinned to
# cpu 0) in front of a trivial upstream, reads idle RSS, then holds CONNS TLS keep-alive
# connections (each has served one proxied GET) and reads RSS again.
#   bench/idle-rss.sh                   # 10,000 HTTP/1.1 connections
#   H2=1 CONNS=5000 bench/idle-rss.sh   # HTTP/2 connections (preface + SETTINGS, idle)
#   GATEWAY_ENV="MALLOC_ARENA_MAX=1" bench/idle-rss.sh
# Needs: python3, openssl, nginx (the upstream). Not a test: numbers only.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
CONNS=${CONNS:-10000}
bin=${GATEWAY_BIN:-target/release/onramp-gateway}
ulimit -n 65536 2>/dev/null || true
dir=$(mktemp -d -t idle-rss.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
bench_self_signed "$dir"
bench_start_app "$dir" 18781
pids+=("$app_pid")
cat > "$dir/config.toml" <<CONF
[server]
listen = "127.0.0.1:18743"
workers = 1
max_connections = 20000
max_connections_per_ip = 0
idle_timeout_ms = 600000
[tls]
cert = "$dir/tls.crt"
key = "$dir/tls.key"
[upstream]
url = "http://127.0.0.1:18781"
[admin]
listen = ""
[log]
level = "warn"
CONF
env ${GATEWAY_ENV:-} taskset -c 0 "$bin" --config "$dir/config.toml" >"$dir/gateway.log" 2>&1 &
gw=$!
pids+=($gw)
for _ in $(seq 100); do curl -sk -o /dev/null https://127.0.0.1:18743/ && break; sleep 0.05; done
sleep 1
echo "idle RSS (after one request): $(grep VmRSS /proc/$gw/status | awk '{print $2/1024 " MiB"}')"
h2=(); [ "${H2:-0}" = 1 ] && h2=(--h2)
taskset -c 1 python3 bench/idle-conns.py --pid "$gw" --port 18743 --conns "$CONNS" "${h2[@]}"
echo "peak RSS: $(grep VmHWM /proc/$gw/status | awk '{print $2/1024 " MiB"}')"
