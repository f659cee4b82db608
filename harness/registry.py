"""A throwaway OCI registry on loopback: the distribution registry (Debian's
`docker-registry`), storing on disk in a temporary directory. What `make registry` runs for
a local release and tests/test_release.py pushes to."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from harness.processes import free_port, stop, wait_until


def binary() -> str | None:
    """The registry's binary: Debian names it docker-registry, upstream registry."""
    return shutil.which("docker-registry") or shutil.which("registry")


def config(root: Path, port: int) -> str:
    return (
        "version: 0.1\n"
        "log: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {root}}}, delete: {{enabled: false}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}'}}\n"
    )


@contextmanager
def registry(port: int | None = None) -> Iterator[str]:
    """Run a registry until the block ends; yields its address, `127.0.0.1:<port>`."""
    found = binary()
    if found is None:
        raise RuntimeError("no OCI registry binary (apt-get install docker-registry)")
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="itemstream-registry-") as work:
        path = Path(work) / "config.yml"
        path.write_text(config(Path(work) / "data", port))
        log = open(Path(work) / "registry.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([found, "serve", str(path)], stdout=log, stderr=log)
        address = f"127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"http://{address}/v2/", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None  # stop waiting; reported below

        try:
            wait_until(up, timeout=20)
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the registry exited: {(Path(work) / 'registry.log').read_text()}"
                )
            yield address
        finally:
            stop(proc)
            log.close()
