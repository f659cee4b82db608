"""itemstream: items on PostgreSQL and LLM token streams over SSE.

The version is the package's (pyproject.toml), written once: `itemstream --version`, the
OpenAPI document, `itemstream_build_info` and the chart's appVersion (a test) all read it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("itemstream")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"


def build_revision() -> str:
    """The commit the image was built from (the Dockerfile writes app/REVISION), else
    "unknown"."""
    from pathlib import Path

    try:
        return (Path(__file__).parent / "REVISION").read_text().strip() or "unknown"
    except OSError:
        return "unknown"
