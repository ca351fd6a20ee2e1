# Shared by the bench scripts (sourced, not run): the throw-away server certificate and
# the app the gateway proxies to, so every benchmark measures against the same app.

# bench_self_signed DIR: a P-256 self-signed leaf for localhost in DIR/tls.{crt,key}.
bench_self_signed() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
    -keyout "$1/tls.key" -out "$1/tls.crt" 2>/dev/null
}

# bench_start_app DIR PORT: nginx (1 worker, cpu 1) answering `return 200` with a
# 100-byte body on 127.0.0.1:PORT; waits until it answers. Its pid is in $app_pid.
bench_start_app() {
  local dir=$1 port=$2 nginx=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
  mkdir -p "$dir/nginx"
  cat >"$dir/nginx/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $dir/nginx/nginx.pid;
error_log $dir/nginx/error.log warn;
events { worker_connections 16384; }
http {
  access_log off;
  client_body_temp_path $dir/nginx; proxy_temp_path $dir/nginx; fastcgi_temp_path $dir/nginx;
  uwsgi_temp_path $dir/nginx; scgi_temp_path $dir/nginx;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  server { listen 127.0.0.1:$port; location / { default_type text/plain; return 200 "bench upstream: a small static body for the proxied runs, about 100 bytes long, always the same....\n"; } }
}
NGINX
  taskset -c 1 "$nginx" -c "$dir/nginx/nginx.conf" -e "$dir/nginx/error.log" >"$dir/nginx.log" 2>&1 &
  app_pid=$!
  for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$port/" && return 0; sleep 0.1; done
  echo "the nginx app on port $port did not start:" >&2
  cat "$dir/nginx/error.log" "$dir/nginx.log" >&2
  return 1
}
