#!/bin/sh
# Run uv wherever it is: on PATH, else as `python3 -m uv` (pip's user install puts the binary
# in ~/.local/bin, which is often not on PATH), else install it now with pip and say so.
set -eu
if command -v uv >/dev/null 2>&1; then
  exec uv "$@"
fi
if python3 -c 'import uv' 2>/dev/null; then
  exec python3 -m uv "$@"
fi
echo "==> uv is not installed: installing it with pip (python3 -m pip install --user uv)" >&2
python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv
exec python3 -m uv "$@"
