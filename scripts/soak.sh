#!/usr/bin/env bash
# `make soak`: installs what it needs (uv, deps, a modern PgBouncer), then runs bench/soak.py:
# the service under a steady mix for SOAK_SECONDS (1800), loopback only, bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
. scripts/setup.sh
exec uv run --frozen python bench/soak.py "$@"
