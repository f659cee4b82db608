"""The release path end to end, against a throwaway OCI registry on loopback (Debian's
docker-registry) with a throwaway key: a clone of this checkout is bumped to a test version
and committed as a maintainer would, `release.py release` builds, SBOMs, signs and pushes it,
and `release.py verify` (what `make verify-release` runs) must pass on what was pushed and
fail on a tampered chart, an unsigned image under the released tag, or the wrong key.

Needs podman (or docker), skopeo, gpg, helm and the registry; `make test` installs them."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts.release import ReleaseError, engine, make_keys
from tests.support.helm import helm_binary
from tests.support.skips import missing

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.0.0-rc.1"  # semver and PEP 440 (0.0.0rc1) alike; "0.0.0-test" is not PEP 440
pytestmark = pytest.mark.slow


@dataclass
class Released:
    clone: Path
    registry: str
    keys: Path
    record: dict[str, str]
    chart_version: str
    env: dict[str, str]

    def script(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "scripts/release.py", *args, "--registry", self.registry],
            cwd=self.clone,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=900,
        )

    def verify(self, keys: Path | None = None) -> subprocess.CompletedProcess[str]:
        return self.script("verify", VERSION, "--keys", str(keys or self.keys))


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=release-test", "-c", "user.email=t@t", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Released]:
    from harness.registry import binary, registry

    for tool, package in (("skopeo", "skopeo"), ("gpg", "gnupg")):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed (apt-get install {package})")
    if binary() is None:
        missing("no OCI registry (apt-get install docker-registry)")
    try:
        engine()  # the one the release will build with
    except ReleaseError as error:
        missing(str(error))
    work = tmp_path_factory.mktemp("release")
    clone = work / "repo"
    git(ROOT, "clone", "-q", str(ROOT), str(clone))

    # What a release refuses, before anything is built.
    from scripts.release import bump, release_problems

    refused = "\n".join(release_problems(VERSION, clone))
    for reason in ("pyproject.toml says", "appVersion is not", f"no `## [{VERSION}]`"):
        assert reason in refused, refused
    bump(VERSION, clone)
    assert "uncommitted changes" in "\n".join(release_problems(VERSION, clone))
    git(clone, "commit", "-qam", f"Release {VERSION}")
    assert release_problems(VERSION, clone) == []

    made = make_keys(work / "keys")
    keys = made.path
    env = {k: v for k, v in os.environ.items() if k not in ("REGISTRY", "RELEASE_KEYS")}
    env["HELM"] = helm_binary()
    with registry() as address:
        run = Released(clone, address, keys, {}, "", env)
        result = run.script("release", VERSION, "--keys", str(keys), "--dist", str(work / "dist"))
        print(result.stdout[-3000:])
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        run.record = json.loads((work / "dist" / f"itemstream-{VERSION}.release.json").read_text())
        run.chart_version = run.record["chart"].rsplit(":", 1)[1]
        try:
            yield run
        finally:
            made.stop_agent()


def pulled_chart(released: Released, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            helm_binary(),
            "pull",
            f"oci://{released.registry}/charts/itemstream",
            "--version",
            released.chart_version,
            "--plain-http",
            "--prov",
            "-d",
            str(into),
        ],
        check=True,
        capture_output=True,
    )
    return into / f"itemstream-{released.chart_version}.tgz"


def push_chart(released: Released, archive: Path) -> None:
    subprocess.run(
        [helm_binary(), "push", str(archive), f"oci://{released.registry}/charts", "--plain-http"],
        check=True,
        capture_output=True,
    )


def test_a_release_verifies_names_its_image_by_digest_and_is_never_redone(
    released: Released, tmp_path: Path
) -> None:
    verified = released.verify()
    print(verified.stdout)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    image = released.record["image"]
    digest = image.rsplit("@", 1)[1]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    assert f"verified: chart {released.chart_version}" in verified.stdout

    # What a platform team installs: the pulled chart renders the digest, never a tag.
    archive = pulled_chart(released, tmp_path / "pulled")
    dry_run = subprocess.run(
        [
            helm_binary(),
            "install",
            "demo",
            str(archive),
            "--dry-run=client",
            "--set",
            "auth.allowUnauthenticated=true",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    app_images = set(re.findall(r"image: (\S*itemstream\S*)", dry_run))
    assert app_images == {f"{released.registry}/itemstream@{digest}"}, app_images

    # A released version is never pushed again (a tag never gets a new digest).
    again = released.script("release", VERSION, "--keys", str(released.keys))
    assert again.returncode == 1 and "already released" in again.stderr, again.stderr


def locked_runtime_packages(clone: Path) -> dict[str, str]:
    exported = subprocess.run(
        [
            str(ROOT / "scripts" / "uv.sh"),
            "export",
            "--frozen",
            "--no-dev",
            "--no-hashes",
            "--no-emit-project",
            "--no-header",
        ],
        cwd=clone,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    packages = {}
    for line in exported.splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", line)
        if match:
            packages[normalize(match.group(1))] = match.group(2)
    return packages


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_sbom_lists_the_locked_packages_in_the_image_and_its_debian_packages(
    released: Released,
) -> None:
    bom = json.loads(Path(released.record["sbom"]).read_text())
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.6"
    assert bom["metadata"]["component"]["version"] == VERSION
    python = {
        normalize(c["name"]): c["version"]
        for c in bom["components"]
        if c.get("purl", "").startswith("pkg:pypi/")
    }
    debian = {c["name"] for c in bom["components"] if c.get("purl", "").startswith("pkg:deb/")}
    locked = locked_runtime_packages(released.clone)
    print(f"SBOM: {len(python)} Python packages, {len(debian)} Debian packages")
    assert python == locked, {
        "in the lock, not the SBOM": sorted(set(locked.items()) - set(python.items())),
        "in the SBOM, not the lock": sorted(set(python.items()) - set(locked.items())),
    }
    assert {"libc6", "dpkg", "bash"} <= debian, sorted(debian)[:20]


def flip_one_byte_of_values(archive: Path) -> None:
    """One character of the image digest in the packaged values.yaml, the archive otherwise
    intact (a registry-side swap of the chart, not a corrupt download)."""
    raw = bytearray(gzip.decompress(archive.read_bytes()))
    at = raw.index(b'digest: "sha256:') + len(b'digest: "sha256:')
    raw[at] = ord("0") if raw[at] != ord("0") else ord("1")
    archive.write_bytes(gzip.compress(bytes(raw)))
    with tarfile.open(fileobj=io.BytesIO(archive.read_bytes())) as tar:
        assert tar.getmembers(), "still a chart archive"


def test_a_tampered_chart_fails_verification(released: Released, tmp_path: Path) -> None:
    archive = pulled_chart(released, tmp_path / "original")
    original, provenance = archive.read_bytes(), archive.with_suffix(".tgz.prov").read_bytes()
    tampered_dir = tmp_path / "tampered"
    tampered_dir.mkdir()
    tampered = tampered_dir / archive.name
    tampered.write_bytes(original)
    flip_one_byte_of_values(tampered)
    tampered.with_suffix(".tgz.prov").write_bytes(provenance)  # the genuine signature beside it
    push_chart(released, tampered)
    try:
        result = released.verify()
        print(result.stderr[-600:])
        assert result.returncode == 1, result.stdout + result.stderr
        assert "helm pull" in result.stderr and "sha256 sum does not match" in result.stderr
    finally:
        push_chart(released, archive)  # restore the release for the other tests
    assert released.verify().returncode == 0


def test_the_wrong_key_or_an_unsigned_image_under_the_tag_fails(
    released: Released, tmp_path: Path
) -> None:
    stranger = make_keys(tmp_path / "stranger", name="not the release key")
    stranger.stop_agent()  # verifying needs only its exported public halves
    result = released.verify(stranger.path)
    assert result.returncode == 1 and "helm pull" in result.stderr, result.stderr

    # The chart's provenance checks out, the image's signature is judged by another key.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(released.keys / "pubring.gpg", mixed / "pubring.gpg")
    shutil.copy(stranger.path / "public.asc", mixed / "public.asc")
    result = released.verify(mixed)
    print(result.stderr[-600:])
    assert result.returncode == 1 and "Source image rejected" in result.stderr, result.stderr

    # Last (it replaces the release): an unsigned image pushed under the released tag.
    base = "docker.io/library/python:3.11-slim"
    source = f"containers-storage:{base}" if engine() == "podman" else f"docker-daemon:{base}"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            source,
            f"docker://{released.registry}/itemstream:{VERSION}",
        ],
        check=True,
        capture_output=True,
    )
    result = released.verify()
    print(result.stderr[-600:])
    assert result.returncode == 1, result.stdout
    assert "A signature was required, but no signature exists" in result.stderr
