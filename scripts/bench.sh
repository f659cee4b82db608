#!/usr/bin/env bash
# `make bench`: installs what the benchmark needs (uv, deps, PgBouncer old and new, wrk), then
# runs bench/run.py. Sends traffic only to loopback; every run is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
. scripts/setup.sh
if ! command -v wrk >/dev/null 2>&1; then
  say "installing wrk"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
exec uv run --frozen python bench/run.py "$@"
