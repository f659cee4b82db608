"""The docs' commands, run as a newcomer runs them. A shell block preceded by
`<!-- runnable ... -->` in README.md, docs/*.md, CONTRIBUTING.md or chart/README.md is run
here (the rest are examples); `needs the API` in the marker runs it against `make run`. The
kind quickstart in docs/deploy.md (`<!-- checked ... -->`) cannot run without a cluster: its
helm install is rendered with the same arguments and checked against the image it builds,
the cluster it loads into and the Service it port-forwards.

The fresh environment: a copy of the working tree (no .venv), `PATH=/usr/local/bin:/usr/bin:/bin`
(no uv on it), a new HOME (so uv is installed on first use, as scripts/uv.sh says), nothing
else of the caller's environment but the machine's network settings (proxies, CA bundle,
package indexes) and uv's package cache (UV_CACHE_DIR, so packages are not downloaded
again)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from harness.processes import free_port, stop_group, wait_until
from tests.support.helm import render

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    ROOT / "README.md",
    ROOT / "CONTRIBUTING.md",
    ROOT / "chart" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]
_MARKED = re.compile(
    r"^(?P<indent>[ \t]*)<!-- (?P<kind>runnable|checked)(?P<note>[^>]*)-->[ \t]*\n"
    r"(?P=indent)```(?P<lang>\w*)\n(?P<body>.*?)\n(?P=indent)```",
    re.MULTILINE | re.DOTALL,
)
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
# The machine's network settings (proxies, the CA bundle, package indexes) are not the
# caller's environment but the machine's: a newcomer has them too.
_NETWORK = re.compile(
    r"(?i)(_proxy$|^ssl_cert_|_ca_bundle$|^pip_|^uv_(native_tls|system_certs|index|default_index|extra_index_url|index_url)$)"
)
DOCS_PORT = 8000  # what the docs say


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    kind: str
    note: str
    text: str

    @property
    def needs_api(self) -> bool:
        return "needs the API" in self.note

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def marked_blocks() -> list[Block]:
    found = []
    for page in PAGES:
        source = page.read_text()
        for match in _MARKED.finditer(source):
            indent = match["indent"]
            lines = [line.removeprefix(indent) for line in match["body"].splitlines()]
            found.append(
                Block(
                    page,
                    source.count("\n", 0, match.start()) + 1,
                    match["kind"],
                    match["note"].strip(),
                    "\n".join(lines),
                )
            )
    return found


def test_the_marked_blocks_are_found() -> None:
    """The markers are where the docs say commands can be run: a marker in a shape this test
    does not read would silently stop testing its block."""
    blocks = marked_blocks()
    where = {(b.page.name, b.kind, b.needs_api) for b in blocks}
    assert ("README.md", "runnable", True) in where
    assert ("api.md", "runnable", True) in where  # the openai client
    assert ("api.md", "runnable", False) in where  # minting a token
    assert ("deploy.md", "checked", False) in where  # the kind quickstart
    markers = sum(page.read_text().count("<!-- runnable") for page in PAGES)
    markers += sum(page.read_text().count("<!-- checked") for page in PAGES)
    assert markers == len(blocks), "a marker not followed by a fenced block"


# --- the kind quickstart, rendered ------------------------------------------------------------


def _commands(text: str) -> list[list[str]]:
    return [words for line in text.splitlines() if (words := shlex.split(line, comments=True))]


def test_the_kind_quickstart_installs_the_image_it_builds() -> None:
    [block] = [b for b in marked_blocks() if b.kind == "checked" and b.page.name == "deploy.md"]
    commands = _commands(block.text)
    by_tool = {words[0]: words for words in commands}
    assert by_tool["make"] == ["make", "kind"]
    assert re.search(r"^kind:", (ROOT / "Makefile").read_text(), re.MULTILINE)
    build = by_tool["docker"]
    image = build[build.index("-t") + 1]
    load = by_tool["kind"]
    assert load[:3] == ["kind", "load", "docker-image"] and load[3] == image
    cluster = yaml.safe_load((ROOT / "k8s" / "kind-config.yaml").read_text())["name"]
    assert load[load.index("--name") + 1] == cluster

    install = next(w for w in commands if w[:2] == ["helm", "install"])
    release, chart = install[2], install[3]
    assert chart == "./chart"
    namespace = install[install.index("--namespace") + 1]
    values = Path(install[install.index("-f") + 1])
    assert values.parent == Path("chart/ci"), "render() reads value sets from chart/ci"
    sets = [install[i + 1] for i, word in enumerate(install) if word == "--set"]
    rendered = render(values.name, *sets, release=release, namespace=namespace)
    api = rendered.one("Deployment", "api")["spec"]["template"]["spec"]["containers"][0]
    repository, tag = image.split(":")
    assert api["image"] == f"{repository}:{tag}", "the chart would pull another image"
    assert api.get("imagePullPolicy", "IfNotPresent") != "Always", "a loaded image is not pulled"

    test = next(w for w in commands if w[:2] == ["helm", "test"])
    assert test[2] == release and test[test.index("--namespace") + 1] == namespace
    assert [p for p in rendered.of_kind("Pod") if "test" in p["metadata"]["name"]]
    forward = by_tool["kubectl"]
    assert forward[forward.index("-n") + 1] == namespace
    service_name = forward[forward.index("port-forward") + 1].removeprefix("svc/")
    service = rendered.get("Service", service_name)
    local, remote = forward[-1].split(":")
    assert int(remote) in [p["port"] for p in service["spec"]["ports"]]
    assert int(local) == DOCS_PORT


def test_kind_up_names_what_is_missing_before_creating_anything(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "env"):  # what the script needs to start, nothing else
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    done = subprocess.run(
        [str(bin_dir / "bash"), str(ROOT / "k8s" / "kind-up.sh")],
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done
    assert "nothing was created" in done.stderr
    for tool in ("kind", "kubectl", "helm", "make", "docker or podman"):
        assert f"  {tool}: " in done.stderr, done.stderr
    assert "command not found" not in done.stderr, done.stderr


# --- the runnable blocks, in a fresh environment ----------------------------------------------


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def fresh_checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The working tree's files as git knows them (tracked and new, not ignored), no .venv."""
    copy = tmp_path_factory.mktemp("checkout")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            target = copy / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    yield copy
    shutil.rmtree(copy, ignore_errors=True)


def _fresh_env(home: Path, **extra: str) -> dict[str, str]:
    cache = subprocess.run(
        [str(ROOT / "scripts" / "uv.sh"), "cache", "dir"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return {
        **{name: value for name, value in os.environ.items() if _NETWORK.search(name)},
        "PATH": SYSTEM_PATH,
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "UV_CACHE_DIR": cache,
        **extra,
    }


def _dev_only_packages() -> set[str]:
    """The development group's packages that the runtime does not need as well."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dev = {
        re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]
        for spec in project["dependency-groups"]["dev"]
    }
    runtime = subprocess.run(
        [str(ROOT / "scripts" / "uv.sh"), "export", "--frozen", "--no-dev", "--no-hashes"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    needed = {
        _name(line)
        for line in runtime.splitlines()
        if line and not line.startswith(("#", " ", "-"))
    }
    return dev - needed


def _name(requirement: str) -> str:
    """A requirement's project name, normalized (PEP 503)."""
    return _normalize(re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0])


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed(venv: Path) -> set[str]:
    return {
        _normalize(info.name.split("-")[0])
        for info in venv.glob("lib/python*/site-packages/*.dist-info")
    }


@pytest.mark.slow
def test_the_docs_commands_run_in_a_fresh_environment(fresh_checkout: Path, tmp_path: Path) -> None:
    port = DOCS_PORT if _port_is_free(DOCS_PORT) else free_port()
    home = tmp_path / "home"
    home.mkdir()
    env = _fresh_env(home, PORT=str(port))
    log = tmp_path / "make-run.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            ["make", "run"],
            cwd=fresh_checkout,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if server.poll() is not None:
                return True
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(ready, 300), log.read_text()[-3000:]
        assert server.poll() is None, log.read_text()[-3000:]
        assert "installing it from PyPI" in log.read_text(), "uv was not installed on first use"

        # `make run` installed the runtime and no development tool.
        dev_only = _dev_only_packages()
        assert {"pytest", "ruff", "mypy", "schemathesis", "py-spy"} <= dev_only
        installed = _installed(fresh_checkout / ".venv")
        assert "fastapi" in installed and "gunicorn" in installed
        assert not dev_only & installed, sorted(dev_only & installed)

        for block in marked_blocks():
            if block.kind != "runnable":
                continue
            text = block.text.replace(f":{DOCS_PORT}", f":{port}")
            done = subprocess.run(
                ["bash", "-e", "-c", text],
                cwd=fresh_checkout,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            output = done.stdout + done.stderr
            print(f"--- {block}: exit {done.returncode}\n{output[-600:]}")
            assert done.returncode == 0, f"{block}:\n{output[-3000:]}"
            assert not re.search(r"HTTP/1\.1 5\d\d", output), f"{block}:\n{output[-3000:]}"
            assert done.stdout.strip(), f"{block} printed nothing"
    finally:
        stop_group(server)
    served = log.read_text()
    assert "Traceback" not in served, served[-3000:]
    assert '"status": 5' not in served and " 500 " not in served, served[-3000:]
