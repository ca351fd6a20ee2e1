#!/usr/bin/env python3
"""Start-up to ready: exec the release gateway (shipped-style config, self-signed
certificate, a CDP key so /readyz can turn 200) and poll /readyz on the admin listener
every millisecond until it answers 200. Prints each run and the median.

    bench/startup.py [--runs 20] [--bin target/release/onramp-gateway]
Not a test: numbers only."""
import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import time

p = argparse.ArgumentParser()
p.add_argument("--runs", type=int, default=20)
p.add_argument("--bin", default="target/release/onramp-gateway")
a = p.parse_args()
d = tempfile.mkdtemp(prefix="startup.")
subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", f"{d}/tls.key",
                "-out", f"{d}/tls.crt"], check=True, capture_output=True)
key = subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout"],
                     check=True, capture_output=True, text=True).stdout
with open(f"{d}/config.toml", "w") as f:
    f.write(f"""[server]
listen = "127.0.0.1:18843"
[tls]
cert = "{d}/tls.crt"
key = "{d}/tls.key"
[upstream]
url = "http://127.0.0.1:18881"
[admin]
listen = "127.0.0.1:18844"
[addresses]
source = "upstream"
[log]
level = "warn"
""")
env = dict(os.environ, CDP_API_KEY_ID="bench-key", CDP_API_KEY_SECRET=key)
times = []
for _ in range(a.runs):
    t0 = time.monotonic()
    proc = subprocess.Popen([a.bin, "--config", f"{d}/config.toml"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", 18844, timeout=1)
            c.request("GET", "/readyz")
            if c.getresponse().status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None:
            sys.exit("gateway exited: " + proc.stderr.read().decode())
        time.sleep(0.001)
    times.append((time.monotonic() - t0) * 1000)
    proc.terminate()
    proc.wait()
print("start-up to /readyz 200, ms:", " ".join(f"{t:.1f}" for t in times))
print(f"median {statistics.median(times):.1f} ms, min {min(times):.1f}, max {max(times):.1f} ({a.runs} runs)")
