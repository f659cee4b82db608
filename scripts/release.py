"""The release path: one version's image and chart, signed, with an SBOM, in an OCI registry,
and the check a platform team runs before installing it.

    uv run python scripts/release.py bump 1.2.0        # write the version where it lives
    make release VERSION=1.2.0 [REGISTRY=host[/path]]  # build, SBOM, sign, push
    make verify-release VERSION=1.2.0 [REGISTRY=...]   # pull both back and verify them
    uv run python scripts/release.py keys .release     # a throwaway signing key (tests, demos)
    make registry                                      # a local registry on 127.0.0.1:5000

The procedure around it is in CONTRIBUTING.md ("Releasing"); installing a release with the
verify commands is in docs/deploy.md ("Install a release").

Signatures. One OpenPGP key signs both artifacts. The chart carries helm's provenance file
(`helm package --sign`), checked by `helm pull --verify`. The image is signed with the
containers tools' simple signing (`skopeo copy --sign-by`) and checked by skopeo under a
containers-policy `signedBy` requirement, the form CRI-O and podman enforce on a node.
Sigstore (cosign) signatures were the first choice and are not what ships, for a measured
reason: Debian 12's skopeo and podman are built with sigstore compiled out, to sign and to
verify alike ("Debian-local change: sigstore disabled"), and cosign cannot be installed here,
so nothing on this machine could have verified one independently.

Where the image's signatures live. skopeo writes simple signatures to a "lookaside" store (a
directory or a web server), which an OCI registry does not have. The release pushes them into
the registry beside the image, as an OCI artifact tagged `sha256-<hex>.simplesig` (the tag
scheme cosign uses for `.sig` and `.sbom`), with oras-py; `verify` pulls them back into a
lookaside directory and lets skopeo judge them. Carrying the bytes cannot make a bad signature
pass: skopeo checks them against the key. The SBOM (CycloneDX: the image's Python environment
by cyclonedx-py, run inside the image, and its Debian packages) is attached the same way at
`sha256-<hex>.sbom` and written to dist/.

A version is released once: the release refuses an image tag or chart version the registry
already has, so a tag never gets a new digest. The packaged chart names the image by digest.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.chart_version import SEMVER, problems  # noqa: E402
from scripts.install_helm import installed  # noqa: E402

IMAGE_NAME = "itemstream"
CHART_PATH = "charts"  # the chart's repository: oci://<registry>/charts/itemstream
SIGNATURE_MEDIA_TYPE = "application/vnd.containers.image.signature.v1+openpgp"
SBOM_MEDIA_TYPE = "application/vnd.cyclonedx+json"
EMPTY_CONFIG_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


class ReleaseError(Exception):
    """A refusal or a failed step, with what to do about it."""


def run(
    argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path = ROOT, both: bool = False
) -> str:
    """Run a tool; its stdout (and stderr with `both`), or ReleaseError with its complaint."""
    result = subprocess.run(
        list(argv), cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-2000:]
        raise ReleaseError(f"`{' '.join(argv[:3])} ...` failed ({result.returncode}):\n{tail}")
    return result.stdout + (result.stderr if both else "")


def helm_binary() -> str:
    found = installed()
    if not found:
        raise ReleaseError("helm 4 is not installed (scripts/setup.sh installs it; or set HELM)")
    return found


def need(tool: str, package: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise ReleaseError(f"{tool} is not installed (apt-get install {package})")
    return found


def engine() -> str:
    """The container engine that builds the image: podman, else docker."""
    for name in ("podman", "docker"):
        if (
            shutil.which(name)
            and subprocess.run([name, "info"], capture_output=True, check=False).returncode == 0
        ):
            return name
    raise ReleaseError("no working podman or docker to build the image")


# --- where the version lives ------------------------------------------------------------------


def package_version(root: Path = ROOT) -> str:
    return str(tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"])


def chart_meta(root: Path = ROOT) -> dict[str, Any]:
    meta: dict[str, Any] = yaml.safe_load((root / "chart" / "Chart.yaml").read_text())
    return meta


def same_version(semver: str, pep440: str) -> bool:
    """`1.2.0-rc.1` (image tag, chart appVersion) and `1.2.0rc1` (Python) are one version."""
    try:
        return Version(semver) == Version(pep440)
    except InvalidVersion:
        return False


def release_problems(version: str, root: Path = ROOT) -> list[str]:
    """Why `version` cannot be released from this checkout (empty: it can)."""
    found: list[str] = []
    if not SEMVER.match(version):
        return [f"VERSION {version!r} is not semver (x.y.z or x.y.z-rc.N)"]
    try:
        Version(version)
    except InvalidVersion:
        return [
            f"VERSION {version!r} is not also a Python version (pre-releases: -rc.N, -a.N, -b.N)"
        ]
    declared = package_version(root)
    if not same_version(version, declared):
        found.append(
            f"pyproject.toml says {declared}, not {version} (run: release.py bump {version})"
        )
    if str(chart_meta(root).get("appVersion")) != version:
        found.append(f"chart/Chart.yaml appVersion is not {version} (release.py bump {version})")
    if f"## [{version}]" not in (root / "CHANGELOG.md").read_text():
        found.append(f"CHANGELOG.md has no `## [{version}]` section (release.py bump {version})")
    found += problems(root)
    dirty = run(["git", "status", "--porcelain"], cwd=root).strip()
    if dirty:
        found.append("uncommitted changes: a release is built from a commit\n" + dirty[:500])
    return found


def bump(version: str, root: Path = ROOT, today: dt.date | None = None) -> None:
    """Write `version` everywhere it is declared and open its CHANGELOG section from
    [Unreleased]. The chart's own version is not touched: it moves with the chart."""
    if not SEMVER.match(version):
        raise ReleaseError(f"{version!r} is not semver")
    old = package_version(root)
    edits = {
        "pyproject.toml": (f'version = "{old}"', f'version = "{version}"'),
        "uv.lock": (
            f'name = "itemstream"\nversion = "{old}"',
            f'name = "itemstream"\nversion = "{version}"',
        ),
        "Dockerfile": (f"ARG VERSION={old}", f"ARG VERSION={version}"),
    }
    for name, (before, after) in edits.items():
        path = root / name
        text = path.read_text()
        if before not in text:
            raise ReleaseError(f"{name}: `{before.splitlines()[-1]}` not found")
        path.write_text(text.replace(before, after, 1))
    chart = root / "chart" / "Chart.yaml"
    chart.write_text(
        re.sub(r"(?m)^appVersion: .*$", f'appVersion: "{version}"', chart.read_text(), count=1)
    )
    changelog = root / "CHANGELOG.md"
    text = changelog.read_text()
    if f"## [{version}]" not in text:
        date = (today or dt.date.today()).isoformat()
        text = text.replace("## [Unreleased]\n", f"## [Unreleased]\n\n## [{version}] - {date}\n", 1)
        changelog.write_text(text)


# --- registry addresses -----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    registry: str  # host[:port][/path]
    version: str
    chart_version: str

    @property
    def host(self) -> str:
        return self.registry.split("/", 1)[0]

    @property
    def plain_http(self) -> bool:
        """Loopback registries speak plain HTTP (a local one, a test's)."""
        return self.host.rsplit(":", 1)[0] in LOOPBACK

    @property
    def repository(self) -> str:
        return f"{self.registry}/{IMAGE_NAME}"

    @property
    def image(self) -> str:
        return f"{self.repository}:{self.version}"

    @property
    def chart_repository(self) -> str:
        return f"oci://{self.registry}/{CHART_PATH}"

    def tls(self, flag: str) -> list[str]:
        return [f"--{flag}=false"] if self.plain_http else []

    def helm_http(self) -> list[str]:
        return ["--plain-http"] if self.plain_http else []


def attachment_tag(digest: str, kind: str) -> str:
    return f"{digest.replace(':', '-')}.{kind}"


def image_digest(target: Target, ref: str) -> str | None:
    """The manifest digest `ref` has in the registry, or None when it has none."""
    result = subprocess.run(
        [
            need("skopeo", "skopeo"),
            "inspect",
            "--raw",
            *target.tls("tls-verify"),
            f"docker://{ref}",
        ],
        capture_output=True,
        check=False,
    )
    if result.returncode == 0:
        return "sha256:" + hashlib.sha256(result.stdout).hexdigest()
    error = result.stderr.decode(errors="replace")
    if "manifest unknown" in error or "not found" in error.lower():
        return None
    raise ReleaseError(f"cannot ask the registry about {ref}:\n{error.strip()[-1000:]}")


def chart_released(target: Target) -> bool:
    result = subprocess.run(
        [
            helm_binary(),
            "show",
            "chart",
            f"{target.chart_repository}/{IMAGE_NAME}",
            "--version",
            target.chart_version,
            *target.helm_http(),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode == 0:
        return True
    if "not found" in result.stderr.lower() or "manifest unknown" in result.stderr:
        return False
    raise ReleaseError(f"cannot ask the registry about the chart:\n{result.stderr.strip()[-1000:]}")


def oras_client(target: Target) -> Any:
    import oras.client

    return oras.client.OrasClient(hostname=target.host, insecure=target.plain_http)


def push_attachment(
    target: Target, digest: str, kind: str, files: dict[str, bytes], media_type: str
) -> None:
    """Push `files` as one OCI artifact tagged `sha256-<hex>.<kind>` next to the image."""
    with tempfile.TemporaryDirectory() as work:
        names = []
        for name, data in files.items():
            (Path(work) / name).write_bytes(data)
            names.append(f"{name}:{media_type}")
        (Path(work) / "config.json").write_text("{}")
        previous = os.getcwd()
        os.chdir(work)  # oras-py names layers by their path
        try:
            response = oras_client(target).push(
                target=f"{target.repository}:{attachment_tag(digest, kind)}",
                files=names,
                manifest_config=f"config.json:{EMPTY_CONFIG_MEDIA_TYPE}",
                disable_path_validation=True,
                quiet=True,
            )
        finally:
            os.chdir(previous)
        if response.status_code not in (200, 201):
            raise ReleaseError(
                f"pushing {kind} failed: {response.status_code} {response.text[:300]}"
            )


def pull_attachment(target: Target, digest: str, kind: str) -> list[bytes]:
    """The layers of the `sha256-<hex>.<kind>` artifact, in order (empty when none)."""
    client = oras_client(target)
    ref = f"{target.repository}:{attachment_tag(digest, kind)}"
    try:
        manifest = client.get_manifest(ref)
    except Exception as error:  # oras-py raises ValueError/HTTP errors for a missing tag
        if (
            "not found" in str(error).lower()
            or "manifest unknown" in str(error).lower()
            or "404" in str(error)
        ):
            return []
        raise
    container = client.get_container(ref)
    blobs = []
    for layer in manifest.get("layers", []):
        data = client.get_blob(container, layer["digest"]).content
        if "sha256:" + hashlib.sha256(data).hexdigest() != layer["digest"]:
            raise ReleaseError(f"the registry served a {kind} blob that is not {layer['digest']}")
        blobs.append(data)
    return blobs


# --- keys ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    """A release key directory: `gnupg/` (GNUPGHOME with the secret key), `passphrase`,
    and the exports helm and skopeo read: `secring.gpg`, `pubring.gpg`, `public.asc`.
    Verifying needs only `pubring.gpg` and `public.asc`."""

    path: Path

    @property
    def gnupg(self) -> Path:
        return self.path / "gnupg"

    @property
    def passphrase(self) -> Path:
        return self.path / "passphrase"

    def env(self) -> dict[str, str]:
        return {**os.environ, "GNUPGHOME": str(self.gnupg)}

    def stop_agent(self) -> None:
        """gpg starts an agent per GNUPGHOME and leaves it running: stop this one's."""
        gpgconf = shutil.which("gpgconf")
        if gpgconf is not None and self.gnupg.exists():
            subprocess.run(
                [gpgconf, "--homedir", str(self.gnupg), "--kill", "gpg-agent"],
                capture_output=True,
                check=False,
            )

    def uid(self) -> tuple[str, str]:
        """The signing key's (fingerprint, user id)."""
        listing = run(
            [need("gpg", "gnupg"), "--batch", "--list-secret-keys", "--with-colons"], env=self.env()
        )
        fingerprint = uid = ""
        for line in listing.splitlines():
            fields = line.split(":")
            if fields[0] == "fpr" and not fingerprint:
                fingerprint = fields[9]
            if fields[0] == "uid" and not uid:
                uid = fields[9]
        if not fingerprint:
            raise ReleaseError(f"no secret key in {self.gnupg} (release.py keys {self.path})")
        return fingerprint, uid


def make_keys(path: Path, name: str = "itemstream release (test key)") -> Keys:
    """A new RSA 3072 signing key with a random passphrase (helm reads RSA keys; the OpenPGP
    library it uses has no EdDSA)."""
    keys = Keys(path)
    keys.gnupg.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys.passphrase.write_text(os.urandom(16).hex())
    keys.passphrase.chmod(0o600)
    params = (
        "Key-Type: RSA\nKey-Length: 3072\nKey-Usage: sign\n"
        f"Name-Real: {name}\nName-Email: release@itemstream.invalid\nExpire-Date: 0\n"
        f"Passphrase: {keys.passphrase.read_text()}\n%commit\n"
    )
    env = keys.env()
    subprocess.run(
        [need("gpg", "gnupg"), "--batch", "--pinentry-mode", "loopback", "--gen-key"],
        input=params,
        text=True,
        env=env,
        capture_output=True,
        check=True,
    )
    secret = subprocess.run(
        [
            need("gpg", "gnupg"),
            "--batch",
            "--pinentry-mode",
            "loopback",
            "--passphrase-file",
            str(keys.passphrase),
            "--export-secret-keys",
        ],
        env=env,
        capture_output=True,
        check=True,
    ).stdout
    (path / "secring.gpg").write_bytes(secret)
    (path / "secring.gpg").chmod(0o600)
    (path / "pubring.gpg").write_bytes(
        subprocess.run(
            [need("gpg", "gnupg"), "--batch", "--export"], env=env, capture_output=True, check=True
        ).stdout
    )
    (path / "public.asc").write_text(
        run([need("gpg", "gnupg"), "--batch", "--armor", "--export"], env=env)
    )
    return keys


# --- the SBOM -----------------------------------------------------------------------------------


def python_sbom(tool: str, image: str) -> dict[str, Any]:
    """cyclonedx-py run by the image's own interpreter against the image's virtual environment
    (the image has no cyclonedx; this environment's copy is mounted read-only and put on the
    path of the process that writes the SBOM only, not of the interpreter it inspects)."""
    import cyclonedx_py

    site = Path(cyclonedx_py.__file__).resolve().parents[1]
    script = (
        "import runpy, sys; sys.path.insert(0, '/opt/sbom-tool'); "
        "sys.argv = ['cyclonedx-py', 'environment', '--of', 'JSON', '--output-reproducible', "
        "'--mc-type', 'application', '/app/.venv/bin/python']; "
        "runpy.run_module('cyclonedx_py', run_name='__main__')"
    )
    out = run(
        [
            tool,
            "run",
            "--rm",
            "--network",
            "none",
            "--read-only",
            "--tmpfs",
            "/tmp",  # noqa: S108 - the container's own tmpfs
            "-v",
            f"{site}:/opt/sbom-tool:ro",
            "--entrypoint",
            "/usr/local/bin/python",
            image,
            "-c",
            script,
        ]
    )
    bom: dict[str, Any] = json.loads(out)
    return bom


def parse_dpkg_status(text: str) -> list[dict[str, str]]:
    packages = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields.get("Package") and "installed" in fields.get("Status", "").split():
            packages.append(fields)
    return packages


def os_components(tool: str, image: str) -> list[dict[str, Any]]:
    """The image's Debian packages, as dpkg recorded them, with Debian package URLs."""

    def cat(path: str) -> str:
        return run(
            [tool, "run", "--rm", "--network", "none", "--entrypoint", "/bin/cat", image, path]
        )

    release = dict(
        line.split("=", 1) for line in cat("/etc/os-release").splitlines() if "=" in line
    )
    distro = f"{release.get('ID', 'debian')}-{release.get('VERSION_ID', '').strip(chr(34))}"
    components = []
    for package in parse_dpkg_status(cat("/var/lib/dpkg/status")):
        name, version, arch = (
            package["Package"],
            package.get("Version", ""),
            package.get("Architecture", ""),
        )
        purl = f"pkg:deb/debian/{name}@{version}?arch={arch}&distro={distro}"
        components.append(
            {"type": "library", "bom-ref": purl, "name": name, "version": version, "purl": purl}
        )
    return components


def image_sbom(tool: str, image: str, version: str) -> dict[str, Any]:
    bom = python_sbom(tool, image)
    bom.setdefault("components", []).extend(os_components(tool, image))
    component = bom.setdefault("metadata", {}).setdefault("component", {})
    component.update({"name": IMAGE_NAME, "version": version, "type": "container"})
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(bom))
    if error is not None:
        raise ReleaseError(f"the SBOM is not valid CycloneDX 1.6: {error}")
    return bom


# --- the chart ------------------------------------------------------------------------------


def yaml_string(value: str) -> str:
    """A YAML double-quoted scalar on one line (JSON's escapes are not YAML's: a surrogate pair
    would load as two lone surrogates)."""
    return yaml.safe_dump(value, default_style='"', width=float("inf")).rstrip("\n")


def pin_image(values: str, registry: str, repository: str, tag: str, digest: str) -> str:
    """values.yaml with the top-level `image:` block naming the released image by digest
    (comments and layout kept: the packaged values are read by people too)."""
    lines = values.splitlines(keepends=True)
    start = lines.index("image:\n")
    wanted = {"registry": registry, "repository": repository, "tag": tag, "digest": digest}
    for index in range(start + 1, len(lines)):
        line = lines[index]
        if line.strip() and not line.startswith((" ", "#")):
            break
        match = re.match(r"^  (registry|repository|tag|digest): .*$", line.rstrip("\n"))
        if match:
            lines[index] = f"  {match.group(1)}: {yaml_string(wanted.pop(match.group(1)))}\n"
    if wanted:
        raise ReleaseError(f"chart/values.yaml image block lacks {sorted(wanted)}")
    return "".join(lines)


def package_chart(target: Target, digest: str, keys: Keys, dist: Path) -> Path:
    _, uid = keys.uid()
    with tempfile.TemporaryDirectory() as work:
        chart = Path(work) / "itemstream"
        shutil.copytree(ROOT / "chart", chart)
        registry, _, path = target.registry.partition("/")
        repository = f"{path}/{IMAGE_NAME}" if path else IMAGE_NAME
        values = chart / "values.yaml"
        values.write_text(
            pin_image(values.read_text(), registry, repository, target.version, digest)
        )
        meta = chart / "Chart.yaml"
        meta.write_text(
            re.sub(
                r"(?m)^(      image: )\S*/itemstream:\S+$",
                lambda m: f"{m.group(1)}{target.repository}:{target.version}@{digest}",
                meta.read_text(),
                count=1,
            )
        )
        run(
            [
                helm_binary(),
                "package",
                str(chart),
                "-d",
                str(dist),
                "--sign",
                "--key",
                uid,
                "--keyring",
                str(keys.path / "secring.gpg"),
                "--passphrase-file",
                str(keys.passphrase),
            ]
        )
    return dist / f"{IMAGE_NAME}-{target.chart_version}.tgz"


# --- release and verify ---------------------------------------------------------------------


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def release(target: Target, keys: Keys, dist: Path) -> dict[str, str]:
    reasons = release_problems(target.version)
    if reasons:
        raise ReleaseError("cannot release:\n- " + "\n- ".join(reasons))
    need("skopeo", "skopeo")
    need("gpg", "gnupg")
    fingerprint, uid = keys.uid()
    if image_digest(target, target.image) is not None:
        raise ReleaseError(f"{target.image} is already released: a tag never gets a new digest")
    if chart_released(target):
        raise ReleaseError(
            f"chart {target.chart_version} is already in {target.chart_repository}: "
            "bump chart/Chart.yaml version"
        )
    tool = engine()
    revision = run(["git", "rev-parse", "HEAD"]).strip()
    local = f"localhost/{IMAGE_NAME}:release-{target.version}"
    say(f"building {local} at {revision[:12]} with {tool}")
    run(
        [
            tool,
            "build",
            "--network",
            "host",
            "--build-arg",
            f"REVISION={revision}",
            "--build-arg",
            f"VERSION={target.version}",
            "-t",
            local,
            str(ROOT),
        ]
    )
    dist.mkdir(parents=True, exist_ok=True)
    say("writing the SBOM (Python environment and Debian packages)")
    bom = image_sbom(tool, local, target.version)
    sbom_path = dist / f"{IMAGE_NAME}-{target.version}.cdx.json"
    sbom_path.write_text(json.dumps(bom, indent=1))

    say(f"pushing {target.image}, signed by {uid} ({fingerprint[-16:]})")
    source = f"containers-storage:{local}" if tool == "podman" else f"docker-daemon:{local}"
    with lookaside(target) as (store, registries_d):
        with tempfile.NamedTemporaryFile("r") as digest_file:
            run(
                [
                    need("skopeo", "skopeo"),
                    "--registries.d",
                    str(registries_d),
                    "copy",
                    "--quiet",
                    *target.tls("dest-tls-verify"),
                    "--sign-by",
                    fingerprint,
                    "--sign-passphrase-file",
                    str(keys.passphrase),
                    "--digestfile",
                    digest_file.name,
                    source,
                    f"docker://{target.image}",
                ],
                env=keys.env(),
            )
            digest = Path(digest_file.name).read_text().strip()
        signatures = sorted(store.rglob("signature-*"))
        if not signatures:
            raise ReleaseError("skopeo wrote no signature")
        push_attachment(
            target,
            digest,
            "simplesig",
            {f"signature-{i + 1}": p.read_bytes() for i, p in enumerate(signatures)},
            SIGNATURE_MEDIA_TYPE,
        )
    push_attachment(
        target, digest, "sbom", {sbom_path.name: sbom_path.read_bytes()}, SBOM_MEDIA_TYPE
    )

    say(f"packaging and signing chart {target.chart_version} with the image's digest")
    archive = package_chart(target, digest, keys, dist)
    out = run(
        [helm_binary(), "push", str(archive), target.chart_repository, *target.helm_http()],
        both=True,
    )
    chart_digest = re.search(r"Digest: (sha256:[0-9a-f]{64})", out)
    record = {
        "version": target.version,
        "revision": revision,
        "image": f"{target.image}@{digest}",
        "chart": f"{target.chart_repository}/{IMAGE_NAME}:{target.chart_version}",
        "chart_digest": chart_digest.group(1) if chart_digest else "",
        "sbom": str(sbom_path),
        "signed_by": fingerprint,
    }
    (dist / f"{IMAGE_NAME}-{target.version}.release.json").write_text(json.dumps(record, indent=1))
    for key, value in record.items():
        print(f"{key:>13}: {value}")
    return record


@contextmanager
def lookaside(target: Target) -> Iterator[tuple[Path, Path]]:
    """A registries.d telling skopeo to keep the registry's simple signatures in a local
    directory (read and write): yields (the directory, the registries.d)."""
    with tempfile.TemporaryDirectory(prefix="itemstream-signatures-") as work:
        store, registries_d = Path(work) / "store", Path(work) / "registries.d"
        store.mkdir()
        registries_d.mkdir()
        (registries_d / "itemstream.yaml").write_text(
            yaml.safe_dump(
                {
                    "docker": {
                        target.host: {
                            "lookaside": f"file://{store}",
                            "lookaside-staging": f"file://{store}",
                        }
                    }
                }
            )
        )
        yield store, registries_d


def chart_values(archive: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    with tarfile.open(archive) as tar:

        def read(name: str) -> dict[str, Any]:
            member = tar.extractfile(f"{IMAGE_NAME}/{name}")
            assert member is not None
            loaded: dict[str, Any] = yaml.safe_load(member.read())
            return loaded

        return read("Chart.yaml"), read("values.yaml")


def verify(target: Target, keys: Path) -> dict[str, str]:
    """Pull the chart with its provenance checked, then the image it names with its signature
    checked; raise ReleaseError at the first thing that does not hold."""
    need("skopeo", "skopeo")
    pubring, public = keys / "pubring.gpg", keys / "public.asc"
    for path in (pubring, public):
        if not path.exists():
            raise ReleaseError(f"{path} is missing: the release's public key")
    with tempfile.TemporaryDirectory(prefix="itemstream-verify-") as work:
        say(
            f"helm pull {target.chart_repository}/{IMAGE_NAME} --version {target.chart_version} --verify"
        )
        run(
            [
                helm_binary(),
                "pull",
                f"{target.chart_repository}/{IMAGE_NAME}",
                "--version",
                target.chart_version,
                "--verify",
                "--keyring",
                str(pubring),
                "-d",
                work,
                *target.helm_http(),
            ]
        )
        archive = Path(work) / f"{IMAGE_NAME}-{target.chart_version}.tgz"
        meta, values = chart_values(archive)
        if str(meta.get("appVersion")) != target.version:
            raise ReleaseError(
                f"the chart's appVersion is {meta.get('appVersion')}, not {target.version}"
            )
        image = values["image"]
        digest = str(image.get("digest") or "")
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise ReleaseError("the chart names its image by tag, not by digest")
        named = f"{image['registry']}/{image['repository']}"
        if named != target.repository:
            raise ReleaseError(f"the chart's image is {named}, not {target.repository}")

        say(f"checking the signature of {target.image} (policy: signedBy the release key)")
        policy = Path(work) / "policy.json"
        policy.write_text(
            json.dumps(
                {
                    "default": [{"type": "reject"}],
                    "transports": {
                        "docker": {
                            target.repository: [
                                {
                                    "type": "signedBy",
                                    "keyType": "GPGKeys",
                                    "keyPath": str(public),
                                    "signedIdentity": {"type": "matchRepository"},
                                }
                            ]
                        }
                    },
                }
            )
        )
        tag_digest = image_digest(target, target.image)
        if tag_digest is None:
            raise ReleaseError(f"{target.image} is not in the registry")
        with lookaside(target) as (store, registries_d):
            for ref_digest in {tag_digest, digest}:
                blobs = pull_attachment(target, ref_digest, "simplesig")
                folder = (
                    store / f"{target.repository.split('/', 1)[1]}@{ref_digest.replace(':', '=')}"
                )
                folder.mkdir(parents=True)
                for index, blob in enumerate(blobs):
                    (folder / f"signature-{index + 1}").write_bytes(blob)
            for ref in (target.image, f"{target.repository}@{digest}"):
                out = Path(work) / "image"
                shutil.rmtree(out, ignore_errors=True)
                run(
                    [
                        need("skopeo", "skopeo"),
                        "--policy",
                        str(policy),
                        "--registries.d",
                        str(registries_d),
                        "copy",
                        "--quiet",
                        *target.tls("src-tls-verify"),
                        f"docker://{ref}",
                        f"dir:{out}",
                    ]
                )
        if tag_digest != digest:
            raise ReleaseError(f"{target.image} is {tag_digest}, the chart names {digest}")
        rendered = run(
            [
                helm_binary(),
                "template",
                "verify",
                str(archive),
                "--set",
                "auth.allowUnauthenticated=true",
            ]
        )
        pinned = f"{target.repository}@{digest}"
        if f"image: {pinned}" not in rendered and f'image: "{pinned}"' not in rendered:
            raise ReleaseError(f"the chart does not render the image as {pinned}")
    say(f"verified: chart {target.chart_version} and {target.image}@{digest}")
    return {"image": f"{target.repository}@{digest}", "chart_version": target.chart_version}


# --- command line -----------------------------------------------------------------------------


def serve_registry(port: int) -> None:
    from harness.registry import registry

    with registry(port) as address:
        print(
            f"a local OCI registry at {address} (data removed on exit); Ctrl-C stops it", flush=True
        )
        try:
            while True:
                import time

                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("release", "verify"):
        command = sub.add_parser(name)
        command.add_argument("version")
        command.add_argument("--registry", default=os.environ.get("REGISTRY") or "127.0.0.1:5000")
        command.add_argument(
            "--keys", type=Path, default=Path(os.environ.get("RELEASE_KEYS") or ROOT / ".release")
        )
        command.add_argument("--chart-version", default=os.environ.get("CHART_VERSION") or "")
        command.add_argument("--dist", type=Path, default=ROOT / "dist")
    sub.add_parser("bump").add_argument("version")
    sub.add_parser("keys").add_argument("path", type=Path)
    sub.add_parser("registry").add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    try:
        if args.command == "bump":
            bump(args.version)
            print(f"version {args.version} written; fill CHANGELOG.md's section, then commit")
        elif args.command == "keys":
            fingerprint, uid = make_keys(args.path).uid()
            print(f"{uid} {fingerprint} in {args.path}")
        elif args.command == "registry":
            serve_registry(args.port)
        else:
            target = Target(
                args.registry.rstrip("/"),
                args.version,
                args.chart_version or str(chart_meta()["version"]),
            )
            if args.command == "release":
                release(target, Keys(args.keys), args.dist)
            else:
                verify(target, args.keys)
    except ReleaseError as error:
        print(f"{args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
