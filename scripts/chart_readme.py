"""Generate the parameter table of chart/README.md from the `# --` comments in values.yaml.

uv run python scripts/chart_readme.py          # rewrite the table
uv run python scripts/chart_readme.py --check  # exit 1 when README.md is out of date
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from anywhere
from scripts.generated import write_or_check

CHART = Path(__file__).resolve().parents[1] / "chart"
BEGIN, END = "<!-- parameters:begin -->", "<!-- parameters:end -->"
_KEY = re.compile(r"^(\s*)([A-Za-z_][\w-]*):(.*)$")


def documented(lines: list[str]) -> list[tuple[str, str]]:
    """(dotted key, description) for every key with a `# --` comment above it."""
    path: list[tuple[int, str]] = []
    pending: list[str] = []
    out: list[tuple[str, str]] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#") and pending:
            pending.append(stripped[1:].strip())
            continue
        match = _KEY.match(line)
        if not match or stripped.startswith("-"):
            pending = []
            continue
        indent = len(match.group(1))
        while path and path[-1][0] >= indent:
            path.pop()
        path.append((indent, match.group(2)))
        if pending:
            out.append((".".join(name for _, name in path), " ".join(pending)))
        pending = []
    return out


def default_of(values: dict[str, Any], key: str) -> str:
    value: Any = values
    for part in key.split("."):
        value = value[part]
    return "`" + json.dumps(value, separators=(", ", ": ")) + "`"


def table() -> str:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    rows = ["| parameter | description | default |", "| --- | --- | --- |"]
    for key, description in documented(text.splitlines()):
        cell = description.replace("|", "\\|")
        default = default_of(values, key).replace("|", "\\|")
        rows.append(f"| `{key}` | {cell} | {default} |")
    return "\n".join(rows)


def main() -> int:
    readme = CHART / "README.md"
    current = readme.read_text()
    head, rest = current.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    updated = f"{head}{BEGIN}\n{table()}\n{END}{tail}"
    return write_or_check(readme, updated, "scripts/chart_readme.py")


if __name__ == "__main__":
    raise SystemExit(main())
