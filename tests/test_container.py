"""Build the real Dockerfile and run the image as production would: read-only root filesystem,
its non-root user, host networking to reach Postgres on loopback. Needs podman (or docker);
`make test` sets podman up where the project's container helper is available."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from harness.postgres import PostgresServer
from harness.processes import free_port, wait_until
from tests.support.skips import missing

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "localhost/itemstream:test"
pytestmark = pytest.mark.slow


def engine() -> str:
    for name in ("podman", "docker"):
        if (
            shutil.which(name)
            and subprocess.run([name, "info"], capture_output=True).returncode == 0
        ):
            return name
    missing("no working podman or docker to build the image")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def image() -> tuple[str, str]:
    tool = engine()
    build = subprocess.run(
        [tool, "build", "--network", "host", "-t", IMAGE, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return tool, IMAGE


def run_args(tool: str, *extra: str) -> list[str]:
    return [
        tool,
        "run",
        "--rm",
        "--network",
        "host",
        "--read-only",
        "--tmpfs",
        "/tmp",
        *extra,
        IMAGE,
    ]


def test_image_is_small_non_root_and_runs_migrate_then_serve(
    image: tuple[str, str], pg: PostgresServer
) -> None:
    tool, _ = image
    info = json.loads(
        subprocess.run(
            [tool, "image", "inspect", IMAGE], capture_output=True, text=True, check=True
        ).stdout
    )[0]
    config = info.get("Config") or info.get("ContainerConfig") or {}
    assert config.get("User") == "10001:10001"
    assert config.get("Entrypoint") == ["itemstream"] and config.get("Cmd") == ["serve"]
    size_mb = info["Size"] / 1e6
    print(f"image size: {size_mb:.0f} MB")
    assert size_mb < 600

    database = pg.create_database("itemstream_image")
    url = pg.url(database).render_as_string(hide_password=False).replace("+asyncpg", "")
    migrate = subprocess.run(
        [*run_args(tool, "-e", f"DATABASE_URL={url}"), "migrate"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrate.returncode == 0, migrate.stdout[-2000:] + migrate.stderr[-2000:]
    assert "migrations applied" in migrate.stdout

    port = free_port()
    name = f"itemstream-test-{port}"
    started = subprocess.run(
        [
            tool,
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            "--read-only",
            "--tmpfs",
            "/tmp",
            "-e",
            f"DATABASE_URL={url}",
            "-e",
            f"PORT={port}",
            "-e",
            "AUTH_ALLOW_UNAUTHENTICATED=true",  # no identity provider in this test
            "-e",
            "CURSOR_SECRETS=container-cursor-key-0123456789",
            IMAGE,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 0, started.stderr
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(ready, 60), subprocess.run(
            [tool, "logs", name], capture_output=True, text=True
        ).stdout[-2000:]
        created = httpx.post(
            f"http://127.0.0.1:{port}/v1/items", json={"name": "boxed", "price": 1}
        )
        assert created.status_code == 201
        whoami = subprocess.run([tool, "exec", name, "id", "-u"], capture_output=True, text=True)
        assert whoami.stdout.strip() == "10001"
        subprocess.run(
            [tool, "stop", "-t", "30", name], capture_output=True, check=True, timeout=60
        )
        code = subprocess.run(
            [tool, "inspect", name, "--format", "{{.State.ExitCode}}"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        assert code == "0"
    finally:
        subprocess.run([tool, "rm", "-f", name], capture_output=True)
        pg.drop_database(database)


def test_image_refuses_to_start_without_a_real_database(image: tuple[str, str]) -> None:
    tool, _ = image
    done = subprocess.run(
        [*run_args(tool), "check-config"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "SQLite database is for development only" in done.stderr


def test_dev_target_for_the_skaffold_loop(image: tuple[str, str]) -> None:
    """The `dev` target runs `serve --reload` as the same non-root user, with /app/app
    writable for skaffold's file sync; the default target stays the runtime image."""
    tool, _ = image
    dev = f"{IMAGE}-dev"
    build = subprocess.run(
        [tool, "build", "--network", "host", "--target", "dev", "-t", dev, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    try:
        config = json.loads(
            subprocess.run(
                [tool, "image", "inspect", dev], capture_output=True, text=True, check=True
            ).stdout
        )[0]["Config"]
        assert config["User"] == "10001:10001"
        assert config["Cmd"] == ["serve", "--reload"]
        owner = subprocess.run(
            [tool, "run", "--rm", "--entrypoint", "stat", dev, "-c", "%u", "/app/app"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert owner == "10001"
        runtime = json.loads(
            subprocess.run(
                [tool, "image", "inspect", IMAGE], capture_output=True, text=True, check=True
            ).stdout
        )[0]["Config"]
        assert runtime["Cmd"] == ["serve"]
        assert "ENVIRONMENT=production" in runtime["Env"]
    finally:
        subprocess.run([tool, "rmi", "-f", dev], capture_output=True, check=False)
