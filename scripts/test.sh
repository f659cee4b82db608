#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what it needs, then runs pytest.
#   - uv (from PyPI with pip) and the locked Python dependencies
#   - PgBouncer: an old one (< 1.21, Debian's 1.18) and a modern one (>= 1.21), because the
#     service supports both and the tests run against both
#   - PostgreSQL: uses TEST_POSTGRES_URL, else 127.0.0.1:5432, else starts a throwaway cluster
#     from the local binaries (apt-get install postgresql)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

. scripts/setup.sh

say "running pytest"
exec uv run --frozen pytest "$@"
