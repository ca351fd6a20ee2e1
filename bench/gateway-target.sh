#!/usr/bin/env bash
# proxy-bench --target for onramp-gateway: writes a config.toml from the BENCH_*
# variables (same contract as shared/bench/examples/nginx-target.sh) and runs the
# release binary in the foreground.
#   ../shared/bench/proxy-bench --target "$PWD/bench/gateway-target.sh" --target-name onramp-gateway
# ACCESS_LOG=1 keeps the per-request access log on (nginx's anchor config has it off).
set -euo pipefail
: "${BENCH_LISTEN:?}" "${BENCH_UPSTREAM:?}" "${BENCH_CERT:?}" "${BENCH_KEY:?}" "${BENCH_WORKERS:=1}"
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${GATEWAY_BIN:-$here/target/release/onramp-gateway}
dir=$(mktemp -d -t onramp-gateway-bench.XXXXXX)
level=warn
[ "${ACCESS_LOG:-0}" = 1 ] && level=info
cat > "$dir/config.toml" <<CONF
[server]
listen = "$BENCH_LISTEN"
workers = $BENCH_WORKERS
max_connections = 16384
[tls]
cert = "$BENCH_CERT"
key = "$BENCH_KEY"
[upstream]
url = "$BENCH_UPSTREAM"
[admin]
listen = ""
[log]
format = "json"
level = "$level"
CONF
exec "$bin" --config "$dir/config.toml" > "$dir/gateway.log"
