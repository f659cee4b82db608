"""The layout is the architecture: each package of `app` imports only the layers below it.

    domain                       models, errors, ids, the principal, ports: imports nothing
    config, lifecycle, probes    process-wide facts
    telemetry                    metrics, tracing, logs
    db, providers, security      adapters: the database, LLM upstreams, tokens and limits
    services                     use cases, free of FastAPI
    api                          HTTP: routes, schemas, middleware (never the database)
    main, cli, gunicorn_*        composition roots and entry points

Checked on the source (imports anywhere in a module, lazy ones included), so a new arrow
that points up, or from the API straight to the database, fails here with its line."""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app"

BASE = {"domain", "config", "lifecycle", "probes"}
ALLOWED: dict[str, set[str]] = {
    "domain": set(),
    "config": {"domain"},  # the domain's defaults (e.g. the admin scope's name)
    "lifecycle": set(),
    "probes": set(),
    "telemetry": {"config", "probes"},
    "db": BASE | {"telemetry"},
    "providers": BASE | {"telemetry"},
    "security": BASE | {"telemetry"},
    "services": BASE | {"telemetry", "db", "providers", "security"},
    "api": BASE | {"telemetry", "services", "providers", "security"},
}
ROOTS = {
    "main",
    "cli",
    "gunicorn_conf",
    "gunicorn_worker",
    "protocol",
    "workers",
    "__main__",
    "__init__",
}


def _package(path: Path) -> str:
    parts = path.relative_to(APP).with_suffix("").parts
    return parts[0]


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return [(line, name.split(".")[1]) for line, name in found if name.startswith("app.")]


def test_every_package_imports_only_the_layers_below_it() -> None:
    wrong = []
    packages = set()
    for path in sorted(APP.rglob("*.py")):
        package = _package(path)
        packages.add(package)
        if package in ROOTS:
            continue
        allowed = ALLOWED.get(package)
        assert allowed is not None, f"app/{package} is in no layer: add it to ALLOWED"
        for line, target in _imports(path):
            if target != package and target not in allowed:
                wrong.append(f"{path.relative_to(APP.parent)}:{line} imports app.{target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)
    assert {"domain", "db", "services", "api"} <= packages


def test_the_domain_and_services_know_nothing_of_http() -> None:
    frameworks = ("fastapi", "starlette", "pydantic", "sqlalchemy", "asyncpg")
    for package, banned in (("domain", frameworks), ("services", frameworks)):
        for path in (APP / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                for name in names:
                    assert not name.startswith(banned), f"{path}:{node.lineno} imports {name}"


def _module(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_imports_itself_through_others() -> None:
    """No import circle among the app's modules, lazy imports included: a circle hides a
    dependency that points up (it is why a lazy import gets written)."""
    graph: dict[str, set[str]] = {}
    for path in APP.rglob("*.py"):
        here = _module(path)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            targets |= {name for name in names if name.startswith("app.")}
        graph[here] = targets
    modules = set(graph)
    graph = {m: {t for t in targets if t in modules and t != m} for m, targets in graph.items()}
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)
