#!/usr/bin/env bash
# Builds a fully static onramp-gateway for `FROM scratch` / distroless/static images and
# for the empty-root test (tests/integration/container.rs). Prints the binary's path.
#
#   deploy/build-static.sh                    # release profile (fat LTO; minutes of CPU)
#   PROFILE=static-ci deploy/build-static.sh  # what CI builds: release code, faster link
#
# glibc is linked statically through `-C target-feature=+crt-static` on the gnu target.
# `--target` is explicit on purpose: with it, RUSTFLAGS apply to the target only, so build
# scripts and proc macros (aws-lc-sys's among them) stay ordinary dynamic host programs.
# getrandom_backend="linux_getrandom": the getrandom crate (rand's) otherwise finds the
# getrandom(2) wrapper through a weak symbol, which a static binary does not resolve, and
# falls back to /dev/urandom, which an empty root does not have (a panic on first use).
# The syscall needs Linux 3.17+.
# Name lookups still work: glibc (2.34+) has its `files` and `dns` backends built in, so
# /etc/hosts and /etc/resolv.conf are read; other NSS modules cannot be loaded.
set -euo pipefail
cd "$(dirname "$0")/.."

profile="${PROFILE:-release}"
case "$(uname -m)" in
  x86_64) target=x86_64-unknown-linux-gnu ;;
  aarch64) target=aarch64-unknown-linux-gnu ;;
  *) echo "build-static.sh: unsupported machine $(uname -m)" >&2; exit 1 ;;
esac

RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static --cfg getrandom_backend=\"linux_getrandom\"" \
  cargo build --locked --profile "$profile" --target "$target" --bin onramp-gateway >&2

bin="${CARGO_TARGET_DIR:-target}/$target/$profile/onramp-gateway"
# A dynamic executable names its loader in a PT_INTERP program header; a static one has none.
if LC_ALL=C readelf -lW "$bin" 2>/dev/null | grep -q 'Requesting program interpreter'; then
  echo "build-static.sh: $bin is dynamically linked" >&2
  exit 1
fi
echo "$bin"
