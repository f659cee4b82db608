#!/bin/sh
# Run uv wherever it is: on PATH, in ~/.local/bin (pip's and the wheel's user install, often
# not on PATH), or as the `uv` Python package; else install it now from PyPI and say so.
# `scripts/uv.sh --which` prints the binary's path instead (scripts/setup.sh puts it on PATH).
set -eu

find_uv() {
  command -v uv 2>/dev/null && return 0
  [ -x "$HOME/.local/bin/uv" ] && { echo "$HOME/.local/bin/uv"; return 0; }
  python3 -c 'import sys, uv; sys.stdout.write(uv.find_uv_bin() + "\n")' 2>/dev/null
}

install_uv() {
  echo "==> uv is not installed: installing it from PyPI into ~/.local/bin" >&2
  if python3 -m pip install --quiet --user uv 2>/dev/null; then
    return 0
  fi
  # A Python that refuses pip installs outside a virtual environment (PEP 668: Debian 12,
  # Ubuntu 24.04): uv is one static binary, so take it out of its wheel instead.
  wheels=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$wheels" uv
  python3 - "$wheels" "$HOME/.local/bin" <<'PY'
import glob, os, sys, zipfile

wheel = zipfile.ZipFile(glob.glob(os.path.join(sys.argv[1], "uv-*.whl"))[0])
os.makedirs(sys.argv[2], exist_ok=True)
for name in wheel.namelist():
    if "/scripts/" in name:
        target = os.path.join(sys.argv[2], os.path.basename(name))
        with wheel.open(name) as source, open(target, "wb") as out:
            out.write(source.read())
        os.chmod(target, 0o755)
PY
  rm -rf "$wheels"
}

uv=$(find_uv) || {
  install_uv
  uv=$(find_uv)
  case ":$PATH:" in
    *":$(dirname "$uv"):"*) ;;
    *) echo "==> uv is in $(dirname "$uv"), which is not on PATH: the docs' commands use ./scripts/uv.sh (or add it: export PATH=\"$(dirname "$uv"):\$PATH\")" >&2 ;;
  esac
}
if [ "${1:-}" = "--which" ]; then
  echo "$uv"
  exit 0
fi
exec "$uv" "$@"
