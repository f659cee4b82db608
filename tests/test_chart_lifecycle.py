"""Rules of a real cluster that no single rendered object shows, encoded over the manifests of
`helm install` and `helm upgrade` (no cluster runs here):

- Helm creates pre-install hooks before any regular object: a hook may reference only hooks of
  a lower weight and documented prerequisites.
- Every Secret/ConfigMap key a pod references is rendered by the chart or is a prerequisite
  listed in docs/deploy.md with the command that creates it.
- A Job's pod template is immutable: a plain Job's name changes exactly when its spec does.
- PgBouncer's timeouts and shutdown follow the app's settings; TLS reaches every hop.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support.helm import CHART, ROOT, Rendered, helm, values_args

SHIPPED = sorted(p.name for p in (CHART / "ci").glob("*.yaml"))
VALUE_SETS: list[str | None] = list(SHIPPED)  # try-out-values.yaml: the defaults
POD_KINDS = ("Deployment", "StatefulSet", "Job", "Pod")


def render(values_file: str | None, *sets: str, upgrade: bool = False) -> Rendered:
    args = ["template", "demo", str(CHART), "--namespace", "apps"]
    if upgrade:
        args.append("--is-upgrade")
    out = helm(*args, *values_args(values_file, sets)).stdout
    return Rendered([doc for doc in yaml.safe_load_all(out) if doc])


def renders(values_file: str | None) -> Iterator[tuple[str, Rendered]]:
    yield "install", render(values_file)
    yield "upgrade", render(values_file, upgrade=True)


# --- references --------------------------------------------------------------------------


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] == "Pod":
        return dict(obj["spec"])
    if obj["kind"] in POD_KINDS:
        return dict(obj["spec"]["template"]["spec"])
    return None


def references(obj: dict[str, Any]) -> Iterator[tuple[str, str, str | None]]:
    """(kind, name, key or None) of every object this one needs to exist."""
    if obj["kind"] == "Ingress":
        for tls in obj["spec"].get("tls", []):
            yield "Secret", tls["secretName"], None
    spec = pod_spec(obj)
    if spec is None:
        return
    if "serviceAccountName" in spec:
        yield "ServiceAccount", spec["serviceAccountName"], None
    for secret in spec.get("imagePullSecrets", []):
        yield "Secret", secret["name"], None
    for volume in spec.get("volumes", []):
        if "secret" in volume:
            keys = [i["key"] for i in volume["secret"].get("items", [])] or [None]
            for key in keys:
                yield "Secret", volume["secret"]["secretName"], key
        if "configMap" in volume:
            yield "ConfigMap", volume["configMap"]["name"], None
        if "persistentVolumeClaim" in volume:
            yield "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], None
    for container in spec.get("initContainers", []) + spec["containers"]:
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                yield "Secret", source["secretRef"]["name"], None
            if "configMapRef" in source:
                yield "ConfigMap", source["configMapRef"]["name"], None
        for item in container.get("env", []):
            ref = item.get("valueFrom", {})
            if "secretKeyRef" in ref:
                yield "Secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]
            if "configMapKeyRef" in ref:
                yield "ConfigMap", ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]


def provided(obj: dict[str, Any]) -> set[str | None]:
    """The keys an object carries (None: it exists)."""
    keys: set[str | None] = {None}
    keys |= set(obj.get("data") or {}) | set(obj.get("stringData") or {})
    return keys


def readme_prerequisites() -> dict[tuple[str, str], set[str | None]]:
    """The objects docs/deploy.md tells a user to create first (its `kubectl create` lines)."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    found: dict[tuple[str, str], set[str | None]] = {("ServiceAccount", "default"): {None}}
    for match in re.finditer(
        r"kubectl (?:-n \S+ )?create secret generic (\S+)((?: --from-literal=[\w.-]+=\S+)+)", text
    ):
        keys = set(re.findall(r"--from-literal=([\w.-]+)=", match.group(2)))
        found[("Secret", match.group(1))] = {None, *keys}
    for match in re.finditer(r"kubectl (?:-n \S+ )?create secret tls (\S+)", text):
        found[("Secret", match.group(1))] = {None, "tls.crt", "tls.key"}
    return found


def hook_of(obj: dict[str, Any]) -> tuple[set[str], int] | None:
    annotations = obj["metadata"].get("annotations") or {}
    if "helm.sh/hook" not in annotations:
        return None
    phases = {p.strip() for p in annotations["helm.sh/hook"].split(",")}
    return phases, int(annotations.get("helm.sh/hook-weight", "0"))


@pytest.mark.parametrize("values_file", VALUE_SETS)
def test_every_reference_is_rendered_or_a_documented_prerequisite(values_file: str | None) -> None:
    prerequisites = readme_prerequisites()
    for phase, rendered in renders(values_file):
        present = {(o["kind"], o["metadata"]["name"]): provided(o) for o in rendered.objects}
        for obj in rendered.objects:
            for kind, name, key in references(obj):
                keys = present.get((kind, name)) or prerequisites.get((kind, name))
                where = f"{phase} {values_file}: {obj['kind']}/{obj['metadata']['name']}"
                assert keys is not None, (
                    f"{where} needs {kind} {name}, neither rendered nor in docs/deploy.md"
                )
                assert key in keys, f"{where} needs key {key!r} of {kind} {name}, which has {keys}"


HOOK_CASES: list[tuple[str | None, tuple[str, ...]]] = [
    (
        None,
        ("postgresql.enabled=false", "externalDatabase.host=db", "externalDatabase.password=pw"),
    ),
    ("production-values.yaml", ()),
    ("production-minimal-values.yaml", ()),
]


@pytest.mark.parametrize(("values_file", "sets"), HOOK_CASES)
def test_pre_install_hooks_reference_only_what_exists_before_them(
    values_file: str | None, sets: tuple[str, ...]
) -> None:
    """On `helm install`, pre-install hooks run before Helm creates any regular object (the
    chart's ServiceAccount, Secret, ConfigMap): admission would refuse a pod naming one."""
    prerequisites = readme_prerequisites()
    rendered = render(values_file, *sets)
    hooks: dict[tuple[str, str], tuple[set[str], int, set[str | None]]] = {}
    for obj in rendered.objects:
        hook = hook_of(obj)
        if hook is not None:
            hooks[(obj["kind"], obj["metadata"]["name"])] = (*hook, provided(obj))
    pre_install = [o for o in rendered.objects if "pre-install" in (hook_of(o) or (set(), 0))[0]]
    assert any(o["kind"] == "Job" for o in pre_install), "expected a pre-install migration Job"
    for obj in pre_install:
        _, weight = hook_of(obj) or (set(), 0)
        for kind, name, key in references(obj):
            earlier = hooks.get((kind, name))
            if earlier is not None:
                phases, other_weight, keys = earlier
                assert "pre-install" in phases and other_weight < weight, (obj, kind, name)
                assert key in keys
                continue
            found = prerequisites.get((kind, name))
            assert found is not None and key in found, (
                f"pre-install {obj['kind']}/{obj['metadata']['name']} references {kind} {name} "
                f"(key {key}), which does not exist yet on the first install"
            )


def test_the_docs_list_the_production_prerequisites() -> None:
    prerequisites = readme_prerequisites()
    for secret in ("itemstream-db", "itemstream-llm", "itemstream-redis"):
        assert ("Secret", secret) in prerequisites, secret


# --- the migration Job -----------------------------------------------------------------------

JOB_MODE = (
    "migrations.mode=job",
    "postgresql.enabled=false",
    "externalDatabase.host=db",
    "externalDatabase.password=pw",
)


def job(*sets: str) -> dict[str, Any]:
    found = render(None, *JOB_MODE, *sets).of_kind("Job")
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize(
    "change",
    [
        "logLevel=DEBUG",
        "image.tag=9.9.9",
        "migrations.resources.limits.memory=512Mi",
        "commonLabels.team=payments",
        "migrations.podAnnotations.a=b",
        "migrations.nodeSelector.pool=batch",
        "migrations.backoffLimit=5",
        "externalDatabase.sslmode=require",
        "environment=development",
    ],
)
def test_job_name_changes_with_its_spec(change: str) -> None:
    before, after = job(), job(change)
    assert before["spec"] != after["spec"], f"{change} was expected to change the Job spec"
    assert before["metadata"]["name"] != after["metadata"]["name"], (
        f"{change} changes the Job's spec but not its name: `helm upgrade` fails with "
        "'spec.template: field is immutable'"
    )


@pytest.mark.parametrize(
    "change",
    ["replicaCount=7", "service.port=8080", "config.dbPoolSize=12", "autoscaling.maxReplicas=5"],
)
def test_job_name_stays_when_its_spec_does(change: str) -> None:
    before, after = job(), job(change)
    assert before["spec"] == after["spec"]
    assert before["metadata"]["name"] == after["metadata"]["name"], "a needless new Job"


def test_job_mode_is_gitops_friendly() -> None:
    plain = job(
        "migrations.annotations.argocd\\.argoproj\\.io/sync-wave=-1",
        "migrations.tolerations[0].key=batch",
        "migrations.tolerations[0].operator=Exists",
        "migrations.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=pool",
        "migrations.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
    )
    assert "ttlSecondsAfterFinished" not in plain["spec"], "a deleted Job shows out of sync"
    assert plain["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"] == "-1"
    pod = plain["spec"]["template"]["spec"]
    assert pod["tolerations"] == [{"key": "batch", "operator": "Exists"}]
    assert "nodeAffinity" in pod["affinity"]
    assert "serviceAccountName" not in pod  # no API token needed: the namespace's default
    with_ttl = job("migrations.ttlSecondsAfterFinished=600")
    assert with_ttl["spec"]["ttlSecondsAfterFinished"] == 600


# --- PgBouncer -------------------------------------------------------------------------------


def pgbouncer_ini(rendered: Rendered) -> str:
    return str(rendered.one("Secret", "pgbouncer")["stringData"]["pgbouncer.ini"])


@pytest.mark.parametrize(("timeout", "recycle"), [(5, 60), (3, 20), (10, 300)])
def test_pgbouncer_follows_the_apps_timeouts(timeout: int, recycle: int) -> None:
    rendered = render(
        None,
        f"config.dbRequestTimeout={timeout}",
        f"config.dbStatementTimeout={timeout}",
        f"config.dbPoolRecycle={recycle}",
    )
    assert f"query_wait_timeout = {timeout}\n" in pgbouncer_ini(rendered)
    config = rendered.one("ConfigMap", "api")["data"]
    assert config["DB_REQUEST_TIMEOUT"] == str(timeout)
    assert config["DB_POOL_RECYCLE"] == str(recycle)
    pod = rendered.one("Deployment", "pgbouncer")["spec"]["template"]["spec"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    # SIGTERM comes after preStop; PgBouncer then waits for its clients, which the app moves
    # within its recycle age. The kubelet's SIGKILL must come later than that.
    assert pod["terminationGracePeriodSeconds"] > pre_stop + recycle


def test_readiness_timeout_fits_inside_the_probe() -> None:
    for seconds in (2, 3, 10):
        rendered = render(None, f"probes.readiness.timeoutSeconds={seconds}")
        probe = rendered.one("Deployment", "api")["spec"]["template"]["spec"]["containers"][0]
        assert probe["readinessProbe"]["timeoutSeconds"] == seconds
        app_bound = float(rendered.one("ConfigMap", "api")["data"]["READINESS_TIMEOUT"])
        assert app_bound < seconds


@pytest.mark.parametrize("sslmode", ["require", "verify-full"])
def test_tls_to_the_database_reaches_every_hop(sslmode: str) -> None:
    rendered = render(
        None,
        "postgresql.enabled=false",
        "externalDatabase.host=db",
        "externalDatabase.password=pw",
        f"externalDatabase.sslmode={sslmode}",
        "externalDatabase.caSecret=db-ca",
    )
    ini = pgbouncer_ini(rendered)
    assert f"server_tls_sslmode = {sslmode}" in ini
    assert "server_tls_ca_file = /etc/itemstream/db-ca/ca.crt" in ini
    config = rendered.one("ConfigMap", "api")["data"]
    assert f"ssl={sslmode}" in config["MIGRATION_DATABASE_URL"]
    for obj in rendered.objects:
        spec = pod_spec(obj)
        if spec is None or obj["metadata"]["labels"]["app.kubernetes.io/component"] not in (
            "api",
            "migrate",
            "pgbouncer",
        ):
            continue
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        assert volumes["db-ca"]["secret"]["secretName"] == "db-ca", obj["metadata"]["name"]
        for container in spec.get("initContainers", []) + spec["containers"][:1]:
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            assert "db-ca" in mounts, (obj["metadata"]["name"], container["name"])


def test_exporter_has_no_password_and_not_the_apps_user() -> None:
    rendered = render(None, "pgbouncer.metrics.enabled=true")
    pod = rendered.one("Deployment", "pgbouncer")["spec"]["template"]["spec"]
    exporter = next(c for c in pod["containers"] if c["name"] == "exporter")
    (dsn,) = [a for a in exporter["args"] if a.startswith("--pgBouncer.connectionString=")]
    assert "$(" not in dsn and ":" not in dsn.split("@")[0].split("//")[1], dsn
    assert "//itemstream_stats@" in dsn
    assert not exporter.get("env"), "no credential is passed to the exporter"
    ini = pgbouncer_ini(rendered)
    assert "stats_users = itemstream_stats" in ini
    hba = rendered.one("Secret", "pgbouncer")["stringData"]["pgbouncer_hba.conf"]
    assert "host pgbouncer itemstream_stats 127.0.0.1/32 trust" in hba


# --- smaller rules -------------------------------------------------------------------------


def test_generated_bundled_password_outlives_uninstall() -> None:
    secret = render(None).get("Secret", "demo-itemstream")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    given = render(None, "postgresql.auth.password=chosen").get("Secret", "demo-itemstream")
    assert "annotations" not in given["metadata"]


def test_a_parent_charts_condition_value_is_accepted() -> None:
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    jsonschema.validate({"enabled": True}, schema)
    render(None, "enabled=true")


def test_network_policy_admits_what_the_release_needs() -> None:
    rendered = render(
        None,
        "networkPolicy.enabled=true",
        "networkPolicy.allowExternal=false",
        "auth.mode=jwt",
        "auth.issuer=https://login.example.com",
        "auth.audience=itemstream",
        "httpRoute.enabled=true",
        "httpRoute.parentRefs[0].name=public",
        "httpRoute.parentRefs[0].namespace=gateway-system",
        "networkPolicy.ingressNamespaces={ingress-nginx}",
    )
    policy = rendered.get("NetworkPolicy", "demo-itemstream")["spec"]
    peers = policy["ingress"][0]["from"]
    labels = [p.get("podSelector", {}).get("matchLabels", {}) for p in peers]
    assert any(m.get("app.kubernetes.io/component") == "test" for m in labels), "helm test blocked"
    namespaces = {
        p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for p in peers
        if "namespaceSelector" in p
    }
    assert namespaces == {"gateway-system", "ingress-nginx"}
    assert any(
        rule.get("ports") == [{"port": 443, "protocol": "TCP"}] for rule in policy["egress"]
    ), "no egress to the OIDC issuer (JWKS)"
    assert {} not in policy["egress"]
    open_egress = render(
        None, "networkPolicy.enabled=true", "networkPolicy.allowExternalEgress=true"
    )
    assert {} in open_egress.get("NetworkPolicy", "demo-itemstream")["spec"]["egress"]


def test_httproute_timeout_follows_the_stream_limit() -> None:
    sets = ("httpRoute.enabled=true", "httpRoute.parentRefs[0].name=public")
    route = render(None, *sets, "streams.maxSeconds=900").of_kind("HTTPRoute")[0]
    assert route["spec"]["rules"][0]["timeouts"]["request"] == "930s"
    chosen = render(None, *sets, "httpRoute.requestTimeout=1h").of_kind("HTTPRoute")[0]
    assert chosen["spec"]["rules"][0]["timeouts"]["request"] == "1h"


def test_artifacthub_images_are_the_images_the_chart_renders() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    listed = {i["image"] for i in yaml.safe_load(chart["annotations"]["artifacthub.io/images"])}
    everything = (
        "pgbouncer.metrics.enabled=true",
        "redis.enabled=true",
        "rateLimit.enabled=true",
    )
    rendered = render(None, *everything)
    images = set()
    for obj in rendered.objects:
        spec = pod_spec(obj)
        if spec is not None:
            images |= {c["image"] for c in spec.get("initContainers", []) + spec["containers"]}
    assert images == listed, images ^ listed


def test_every_make_target_the_repository_mentions_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.MULTILINE))
    mentioned: set[str] = set()
    docs = [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("k8s/**/*")]
    for path in [*docs, ROOT / "chart" / "README.md"]:
        if path.is_file():
            mentioned |= set(re.findall(r"\bmake ([a-z][\w-]+)", path.read_text()))
    assert mentioned <= targets, mentioned - targets


def test_kind_up_reloads_the_alert_rules() -> None:
    script = (ROOT / "k8s" / "kind-up.sh").read_text()
    assert "make" in script and "k8s-rules" in script
    rules = re.search(
        r"^k8s-rules:.*?(?=^\S)", (ROOT / "Makefile").read_text() + "\nx", re.S | re.M
    )
    assert rules is not None
    assert "rollout restart" in rules.group(0) or "/-/reload" in rules.group(0)


def test_notes_warn_about_the_unpublished_default_image() -> None:
    def notes(*sets: str) -> str:
        out = helm("install", "demo", str(CHART), "--dry-run=client", *values_args(None, sets))
        return out.stdout

    assert "is the chart's default, which is not published" in notes()
    assert "not published" not in notes("image.repository=team/itemstream")
