"""The Helm chart, checked with the real Helm 4: lint, render a matrix of value sets, validate
every object against the Kubernetes schemas, and check what each switch does."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app.config import ENV_VARS, Settings
from tests.support.helm import (
    CHART,
    TRY_OUT,
    Rendered,
    helm,
    render,
    render_error,
    values_args,
)

# The defaults, as the try-out installs them (tests/support/helm.py), and every other values
# file shipped in chart/ci.
VALUE_SETS: list[str | None] = [
    None,
    *sorted(p.name for p in (CHART / "ci").glob("*.yaml") if p.name != TRY_OUT),
]
# Oldest supported (Chart.yaml kubeVersion) and newest schema kubernetes-validate ships.
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]
# Custom resources: not in the Kubernetes schemas; checked for their essentials below.
CRD_KINDS = {"ServiceMonitor", "HTTPRoute"}


def pod_specs(rendered: Rendered) -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for obj in rendered.objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            specs.append((obj["metadata"]["name"], obj["spec"]["template"]["spec"]))
        elif obj["kind"] == "Pod":
            specs.append((obj["metadata"]["name"], obj["spec"]))
    return specs


@pytest.mark.parametrize("values_file", VALUE_SETS)
def test_lint_and_schema_validation(values_file: str | None) -> None:
    lint = helm("lint", "--strict", str(CHART), *values_args(values_file))
    assert "0 chart(s) failed" in lint.stdout
    rendered = render(values_file)
    assert rendered.objects
    for obj in rendered.objects:
        if obj["kind"] in CRD_KINDS:
            assert obj["apiVersion"] in ("monitoring.coreos.com/v1", "gateway.networking.k8s.io/v1")
            assert obj["spec"], obj
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                name = f"{obj['kind']}/{obj['metadata']['name']}"
                raise AssertionError(f"{name} invalid for {version}: {error}") from error


@pytest.mark.parametrize("values_file", VALUE_SETS)
def test_restricted_security_everywhere(values_file: str | None) -> None:
    for name, spec in pod_specs(render(values_file)):
        assert spec.get("automountServiceAccountToken") is False, name
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, name
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            where = f"{name}/{container['name']}"
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert "resources" in container, where


def test_bare_defaults_refuse_an_unauthenticated_install() -> None:
    """With no values the chart would serve without authentication in production, which the
    app refuses: the render says so and names both ways out."""
    bare = helm("template", "demo", str(CHART), check=False)
    assert bare.returncode != 0
    assert "auth.allowUnauthenticated=true" in bare.stderr and "auth.mode=jwt" in bare.stderr
    no_audience = render_error(
        None,
        "auth.mode=jwt",
        "auth.issuer=https://id.example.com",
        "auth.allowUnauthenticated=false",
    )
    assert "auth.audience" in no_audience


def test_defaults_hpa_pgbouncer_and_hook_migrations() -> None:
    rendered = render()
    app = rendered.one("Deployment", "api")
    assert "replicas" not in app["spec"], "the HPA owns the replica count"
    hpa = rendered.one("HorizontalPodAutoscaler", "api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert rendered.one("PodDisruptionBudget", "api")["spec"]["maxUnavailable"] == 1
    pod = app["spec"]["template"]
    assert {"checksum/config", "checksum/secret"} <= set(pod["metadata"]["annotations"])
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    # Workers: the app sizes itself from its cgroup's CPU limit (the guard counts the same).
    assert "WEB_CONCURRENCY" not in env
    assert env["DATABASE_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "database-password"
    probes = {
        kind: container[kind]["httpGet"]["path"]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes == {
        "startupProbe": "/livez",
        "livenessProbe": "/livez",
        "readinessProbe": "/readyz",
    }
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace >= container["lifecycle"]["preStop"]["sleep"]["seconds"] + 30 + 5
    config = rendered.one("ConfigMap", "api")["data"]
    assert config["DATABASE_URL"].startswith(
        "postgresql+asyncpg://itemstream@demo-itemstream-pgbouncer:6432/"
    )
    assert "postgresql:5432" in config["MIGRATION_DATABASE_URL"], "migrations bypass PgBouncer"
    assert config["DB_POOLER"] == "pgbouncer"
    ini = rendered.one("Secret", "pgbouncer")["stringData"]["pgbouncer.ini"]
    assert "pool_mode = transaction" in ini and "max_prepared_statements = 200" in ini
    # With the bundled Postgres a pre-install hook could not reach the database: plain Job,
    # and the app waits for the schema.
    job = rendered.one("Job", "migrate")
    assert "helm.sh/hook" not in job["metadata"].get("annotations", {})
    inits = [c["name"] for c in pod["spec"]["initContainers"]]
    assert inits == ["wait-for-migrations"]
    assert rendered.one("StatefulSet", "postgresql")


def test_production_values() -> None:
    # The README's command sets the image on the command line: nothing in the file overrides it.
    rendered = render("production-values.yaml", "image.repository=team/api", "image.tag=1.2.3")
    app = rendered.one("Deployment", "api")
    container = app["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/team/api:1.2.3"
    minimal = render("production-minimal-values.yaml", "image.tag=1.2.4").one("Deployment", "api")
    assert minimal["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":1.2.4")
    env = {e["name"]: e for e in container["env"]}
    assert env["DATABASE_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "itemstream-db",
        "key": "password",
    }
    assert env["LLM_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "itemstream-llm"
    attributes = env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
    assert "k8s.pod.name=$(POD_NAME)" in attributes
    assert "deployment.environment.name=production" in attributes
    config = rendered.one("ConfigMap", "api")["data"]
    assert config["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert config["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(":4318")
    assert "ssl=require" in config["MIGRATION_DATABASE_URL"]
    assert config["AUTH_MODE"] == "jwt"
    assert config["AUTH_ISSUER"] == "https://login.example.com/realms/apps"
    assert config["RATE_LIMIT_ENABLED"] == "true"
    assert "REDIS_URL" not in config, "the Redis URL (with its password) comes from a Secret"
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "itemstream-redis"
    assert config["ALLOWED_HOSTS"] == "api.example.com"
    assert not rendered.of_kind("StatefulSet"), "no bundled database in production"
    assert not [s for s in rendered.of_kind("Secret") if "database-password" in s.get("data", {})]
    # Hook mode: the Job is a hook without TTL; the existingSecret needs no hook copy.
    job = rendered.one("Job", "migrate")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    assert "ttlSecondsAfterFinished" not in job["spec"]
    hpa = rendered.one("HorizontalPodAutoscaler", "api")
    kinds = [m["type"] for m in hpa["spec"]["metrics"]]
    assert kinds == ["Resource", "Resource", "Pods"]
    monitors = {
        m["metadata"]["labels"]["app.kubernetes.io/component"]
        for m in rendered.of_kind("ServiceMonitor")
    }
    assert monitors == {"api", "pgbouncer"}
    pgbouncer = rendered.one("Deployment", "pgbouncer")
    assert [c["name"] for c in pgbouncer["spec"]["template"]["spec"]["containers"]] == [
        "pgbouncer",
        "exporter",
    ]
    policies = {p["metadata"]["name"] for p in rendered.of_kind("NetworkPolicy")}
    assert policies == {"demo-itemstream", "demo-itemstream-migrate", "demo-itemstream-pgbouncer"}
    assert rendered.of_kind("Ingress") and rendered.of_kind("HTTPRoute")


def test_hook_secret_for_a_chart_owned_password() -> None:
    """The pre-install ordering problem: the hook Job gets a hook Secret of its own."""
    rendered = render(
        None, "postgresql.enabled=false", "externalDatabase.host=db", "externalDatabase.password=pw"
    )
    job = rendered.one("Job", "migrate")
    hook_secret = rendered.one("Secret", "migrate")
    assert hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"] == "-10"
    assert int(job["metadata"]["annotations"]["helm.sh/hook-weight"]) > -10
    ref = job["spec"]["template"]["spec"]["containers"][0]["env"][-1]["valueFrom"]
    assert ref["secretKeyRef"]["name"] == hook_secret["metadata"]["name"]
    assert "envFrom" not in job["spec"]["template"]["spec"]["containers"][0]


def test_switches() -> None:
    one_pod = render("hpa-off-initcontainer-values.yaml")
    app = one_pod.one("Deployment", "api")
    assert app["spec"]["replicas"] == 1
    assert not one_pod.of_kind("HorizontalPodAutoscaler")
    assert not one_pod.of_kind("PodDisruptionBudget")
    assert not one_pod.of_kind("Job")
    spec = app["spec"]["template"]["spec"]
    assert [c["args"] for c in spec["initContainers"]] == [["migrate"]]
    env = {e["name"]: e for e in spec["containers"][0]["env"]}
    assert env["WEB_CONCURRENCY"]["value"] == "2"
    config = one_pod.one("ConfigMap", "api")["data"]
    assert config["DB_POOLER"] == "none"
    assert "postgresql:5432" in config["DATABASE_URL"]

    job_mode = render("job-mode-legacy-pgbouncer-values.yaml")
    job = job_mode.one("Job", "migrate")
    assert "annotations" not in job["metadata"]
    assert "ttlSecondsAfterFinished" not in job["spec"]  # GitOps would recreate a deleted Job
    ini = job_mode.one("Secret", "pgbouncer")["stringData"]["pgbouncer.ini"]
    assert "max_prepared_statements" not in ini
    assert job_mode.one("ConfigMap", "api")["data"]["DB_POOLER"] == "pgbouncer-legacy"
    # A changed image gives a new Job name (Jobs are immutable).
    other = render("job-mode-legacy-pgbouncer-values.yaml", "image.tag=9.9.9").one("Job", "migrate")
    assert other["metadata"]["name"] != job["metadata"]["name"]

    pooled = render("external-pooler-values.yaml")
    assert not pooled.of_kind("Job")
    assert (
        "cluster-pooler-rw.databases:5432" in pooled.one("ConfigMap", "api")["data"]["DATABASE_URL"]
    )
    assert not [d for d in pooled.of_kind("Deployment") if "pgbouncer" in d["metadata"]["name"]]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["migrations.mode=sometimes"], "value must be one of 'hook', 'job', 'initContainer'"),
        (["replicaCont=3"], "additional properties 'replicaCont' not allowed"),
        (["postgresql.enabled=false"], "/externalDatabase/host"),
        (["tracing.protocol=grpc"], "/tracing/protocol"),
        (["llm.provider=openai"], "/llm/baseUrl"),
        (["image.digest=latest"], "/image/digest"),
        (["streams.drainSeconds=-1"], "/streams/drainSeconds"),
        (["gunicorn.gracefulTimeout=abc"], "/gunicorn/gracefulTimeout"),
        (["gunicorn.gracefulTimeout=5"], "/gunicorn/gracefulTimeout"),
        (["terminationGracePeriodSeconds=0"], "/terminationGracePeriodSeconds"),
    ],
)
def test_schema_rejects_bad_values(sets: list[str], message: str) -> None:
    assert message in render_error(None, *sets)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["autoscaling.maxReplicas=40"], "exceeds pgbouncer.maxClientConn (1000)"),
        (["pgbouncer.replicaCount=4"], "exceeds the database budget (90)"),
        (["pgbouncer.enabled=false"], "without a pooler"),
        (
            ["terminationGracePeriodSeconds=20", "gunicorn.gracefulTimeout=30"],
            "terminationGracePeriodSeconds (20) must be at least",
        ),
        (["streams.drainSeconds=28", "gunicorn.gracefulTimeout=30"], "streams.drainSeconds"),
        (["terminationGracePeriodSeconds=8"], "gunicorn.gracefulTimeout (-2, from"),
        (
            ["auth.mode=hs256", "auth.hs256.existingSecret=s"],
            "auth.mode=hs256 (a shared secret) is for development only",
        ),
        (["auth.mode=jwt"], "auth.mode=jwt needs auth.issuer"),
        (
            ["postgresql.enabled=false", "externalDatabase.hosts={pg-0,pg-1}"],
            "externalDatabase.hosts: the chart's PgBouncer connects to one host",
        ),
    ],
)
def test_render_time_guards(sets: list[str], message: str) -> None:
    assert message in render_error(None, *sets)


# Shutdown timings, each set or left empty: whatever is left empty follows from what is set.
TIMINGS = {
    "terminationGracePeriodSeconds": (None, 45, 400),
    "gunicorn.gracefulTimeout": (None, 30, 200),
    "streams.drainSeconds": (None, 10, 120),
}


@pytest.mark.parametrize(
    "chosen",
    [
        dict(zip(TIMINGS, combination, strict=True))
        for combination in itertools.product(*TIMINGS.values())
    ],
    ids=lambda chosen: ",".join(f"{k.split('.')[-1]}={v}" for k, v in chosen.items()),
)
def test_shutdown_timings_follow_from_what_is_set(chosen: dict[str, int | None]) -> None:
    """By default a pod lets every open stream end by its own limit (streams.maxSeconds)
    before the kubelet's SIGKILL; a timing set by hand is kept, the empty ones fit inside it,
    and a combination that would cut streams or kill a pod mid-drain fails to render, naming
    the value."""
    sets = [f"{key}={value}" for key, value in chosen.items() if value is not None]
    pre_stop, max_seconds, reserve = 5, 300, 5  # chart defaults; the app's shutdown reserve
    grace, graceful, drain = (chosen[k] for k in TIMINGS)
    # The rule: the graceful timeout covers the drain (or the longest stream) plus 20 s for
    # the other requests, within a grace period that is set; the drain takes what it is given.
    g = graceful if graceful is not None else (drain or max_seconds) + 20
    if graceful is None and grace is not None:
        g = min(g, grace - pre_stop - 5)
    d = drain if drain is not None else max(0, min(max_seconds, g - reserve))
    t = grace if grace is not None else pre_stop + g + 5
    possible = g >= 6 and t >= pre_stop + g + 5 and d <= g - reserve
    result = helm("template", "demo", str(CHART), *values_args(None, sets), check=False)
    if not possible:
        assert result.returncode != 0 and "must be at" in result.stderr, (chosen, result.stderr)
        return
    assert result.returncode == 0, result.stderr
    rendered = Rendered([doc for doc in yaml.safe_load_all(result.stdout) if doc])
    config = rendered.one("ConfigMap", "api")["data"]
    pod = rendered.one("Deployment", "api")["spec"]["template"]["spec"]
    got = (
        pod["terminationGracePeriodSeconds"],
        int(config["GUNICORN_GRACEFUL_TIMEOUT"]),
        float(config["STREAM_DRAIN_SECONDS"]),
    )
    assert got == (t, g, d), chosen
    if not sets:
        assert d == max_seconds, "by default a rollout must not cut a stream"


def test_every_value_is_documented_in_the_chart_readme() -> None:
    import re
    import subprocess
    import sys

    for script in (
        "scripts/chart_readme.py",
        "scripts/chart_schema.py",
        "scripts/grafana_dashboard.py",
    ):
        fresh = subprocess.run(
            [sys.executable, script, "--check"],
            cwd=CHART.parent,
            capture_output=True,
            text=True,
            check=False,
        )
        assert fresh.returncode == 0, fresh.stderr
    documented = set(re.findall(r"^\| `([^`]+)`", (CHART / "README.md").read_text(), re.M))
    opaque = {
        "resources",
        "behavior",
        "podSecurityContext",
        "containerSecurityContext",
        "securityContext",
    }

    def leaves(tree: dict[str, Any], prefix: str = "") -> list[str]:
        out = []
        for key, value in tree.items():
            path = prefix + key
            if isinstance(value, dict) and value and key not in opaque:
                out += leaves(value, path + ".")
            else:
                out.append(path)
        return out

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [
        leaf
        for leaf in leaves(values)
        if not any(leaf == key or leaf.startswith(key + ".") for key in documented)
    ]
    assert not missing, f"undocumented values: {missing}"


# Read by others than the app's settings: gunicorn, prometheus_client, the OpenTelemetry SDK,
# asyncpg (libpq's PGSSLROOTCERT, the database's CA), and the downward API values
# OTEL_RESOURCE_ATTRIBUTES refers to.
NOT_SETTINGS = {
    "GUNICORN_CMD_ARGS",
    "PGSSLROOTCERT",
    "PROMETHEUS_MULTIPROC_DIR",
    "OTEL_RESOURCE_ATTRIBUTES",
    "POD_NAME",
    "POD_NAMESPACE",
    "NODE_NAME",
}


@pytest.mark.parametrize("values_file", VALUE_SETS)
def test_the_app_is_configured_only_with_variables_its_settings_read(
    values_file: str | None,
) -> None:
    """A variable the chart sets under a name the settings tree does not know would be
    ignored without a word; and what the chart sets is a configuration the app accepts."""
    rendered = render(values_file)
    config = rendered.one("ConfigMap", "api")["data"]
    config_name = rendered.one("ConfigMap", "api")["metadata"]["name"]
    names = set(config)
    app_containers = 0
    for _, spec in pod_specs(rendered):
        for container in spec.get("initContainers", []) + spec["containers"]:
            sources = [s.get("configMapRef", {}).get("name") for s in container.get("envFrom", [])]
            if config_name in sources:  # the app's image, in any role
                app_containers += 1
                names |= {e["name"] for e in container.get("env", [])}
    assert app_containers >= 1, "the app"
    unknown = names - set(ENV_VARS) - NOT_SETTINGS
    assert not unknown, f"not read by app.config: {sorted(unknown)}"
    secrets = {"DATABASE_PASSWORD": "x", "AUTH_HS256_SECRET": "x" * 32, "LLM_API_KEY": "x"}
    Settings(_env_file=None, **{k.lower(): v for k, v in {**config, **secrets}.items()})


# One rule for the workers a pod runs, on both sides: the app (app/workers.py, from its cgroup)
# and the chart's connection guard. (CPU limit, gunicorn.workers, gunicorn.maxWorkers).
WORKER_TABLE = [
    ("250m", None, 8),
    ("1", None, 8),
    ("1500m", None, 8),
    ("2", None, 8),
    ("4", None, 2),
    ("12", None, 8),
    ("12", 12, 8),  # WEB_CONCURRENCY is taken as given, past the cap
    ("2", 3, 8),
    (None, None, 8),  # no limit: the app counts the node's CPUs, the guard its cap
    (None, None, 3),
]


def _cpus(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.mark.parametrize(("cpu", "workers", "cap"), WORKER_TABLE)
def test_the_guard_counts_the_workers_the_app_runs(
    cpu: str | None, workers: int | None, cap: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app import workers as sizing

    monkeypatch.setattr(sizing, "affinity_cpus", lambda: 64)  # a big node
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    quota = "max" if cpu is None else str(int(_cpus(cpu) * 100_000))
    (cgroup / "cpu.max").write_text(f"{quota} 100000\n")
    app_runs = sizing.worker_count(workers, maximum=cap, cgroup_root=cgroup)
    sets = [f"gunicorn.maxWorkers={cap}", "pgbouncer.maxClientConn=1", "autoscaling.maxReplicas=4"]
    sets.append(f"resources.limits.cpu={cpu if cpu is not None else 'null'}")
    if workers is not None:
        sets.append(f"gunicorn.workers={workers}")
    refusal = render_error(None, *sets)
    counted = re.search(
        r"up to (\d+) app pods \(with the rollout's surge\) x (\d+) workers", refusal
    )
    assert counted, refusal
    pods, guard_counts = int(counted.group(1)), int(counted.group(2))
    assert pods == 4 + 1, "4 replicas and a quarter more (rounded up) during a rollout"
    if cpu is None and workers is None:
        assert guard_counts == cap >= app_runs  # what the app may run, at most
    else:
        assert guard_counts == app_runs
    rendered = render(None, *sets[:1], *sets[2:], "pgbouncer.maxClientConn=100000")
    env = rendered.one("Deployment", "api")["spec"]["template"]["spec"]["containers"][0]["env"]
    given = [e for e in env if e["name"] == "WEB_CONCURRENCY"]
    assert given == ([{"name": "WEB_CONCURRENCY", "value": str(workers)}] if workers else [])
    config = rendered.one("ConfigMap", "api")["data"]
    assert config["MAX_WORKERS"] == str(cap)


def _redis_egress_ports(rendered: Any) -> set[int]:
    policy = rendered.get("NetworkPolicy", "demo-itemstream")
    return {
        port["port"]
        for rule in policy["spec"]["egress"]
        for port in rule.get("ports", [])
        if port["port"] in (6379, 26379, 26380)
    }


def test_redis_sentinels_are_reachable_through_the_network_policy() -> None:
    """A REDIS_URL naming Sentinels needs their port as well as the primary's, or every
    rate-limit check times out behind the NetworkPolicy."""
    common = ("networkPolicy.enabled=true", "rateLimit.enabled=true")
    plain = render(None, *common, "redis.url=redis://cache:6379/0")
    assert _redis_egress_ports(plain) == {6379}
    sentinels = render(None, *common, r"redis.url=redis+sentinel://s1:26379\,s2:26379/primary")
    assert _redis_egress_ports(sentinels) == {6379, 26379}
    assert sentinels.one("ConfigMap", "api")["data"]["REDIS_URL"].startswith("redis+sentinel://")
    hidden = render(None, *common, "redis.existingSecret=redis", "redis.ports={6379,26380}")
    assert _redis_egress_ports(hidden) == {6379, 26380}
