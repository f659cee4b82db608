HELM ?= helm
# uv from PATH, ~/.local/bin, `python3 -m uv`, or installed on first use (scripts/uv.sh).
UV ?= ./scripts/uv.sh

.PHONY: run stack kind fleet release verify-release registry test-fast test-sqlite test bench soak failover lint fmt typecheck check migrate k8s-rules

run:  ## run the service on the embedded SQLite database at http://127.0.0.1:8000
	$(UV) run --frozen --no-dev itemstream serve

stack:  ## the real stack as local processes: PostgreSQL, PgBouncer (and Redis), the app on :8000
	$(UV) run --frozen python scripts/local_stack.py

fleet:  ## three instances behind HAProxy with Prometheus and the chart's rules, on loopback
	$(UV) run --frozen python scripts/fleet.py

kind:  ## a kind cluster with metrics-server and the local observability stack (k8s/kind-up.sh)
	k8s/kind-up.sh

test-fast:  ## the unit tier: pure rules and the layering, no database or server (under 2 s)
	$(UV) run --frozen pytest -q -p no:schemathesis -p no:llmock -p no:hypothesispytest tests/unit

test-sqlite:  ## everything that needs no PostgreSQL and starts no servers (about 1.5 min)
	$(UV) run --frozen pytest -q -m "not slow and not postgres"

test:  ## the whole test suite (installs uv, Python deps and PgBouncer where missing)
	./scripts/test.sh

bench:  ## benchmark: routes vs bare FastAPI and the limit, streams, export, 2M-row scale (~40 min)
	./scripts/bench.sh

soak:  ## the service under a steady mix for SOAK_SECONDS (1800): RSS, fds, tasks, p99 over time
	./scripts/soak.sh

failover:  ## PostgreSQL (Patroni + etcd + HAProxy) and Redis (Sentinel) failovers under load, with figures (~7 min)
	./scripts/test.sh -q -s -p no:cacheprovider tests/test_failover.py tests/test_redis_failover.py

# The release path (scripts/release.py; CONTRIBUTING.md "Releasing"). REGISTRY defaults to a
# local one (`make registry`); RELEASE_KEYS to .release (`release.py keys .release` makes one).
release:  ## build, SBOM, sign and push the image and chart of VERSION to REGISTRY
	@test -n "$(VERSION)" || { echo "usage: make release VERSION=x.y.z [REGISTRY=host[/path]]"; exit 2; }
	$(UV) run --frozen python scripts/release.py release $(VERSION)

verify-release:  ## pull VERSION's chart and image from REGISTRY and verify their signatures
	@test -n "$(VERSION)" || { echo "usage: make verify-release VERSION=x.y.z [REGISTRY=...]"; exit 2; }
	$(UV) run --frozen python scripts/release.py verify $(VERSION)

registry:  ## a throwaway OCI registry on 127.0.0.1:5000 (Debian's docker-registry)
	$(UV) run --frozen python scripts/release.py registry

lint:
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .

fmt:
	$(UV) run --frozen ruff check --fix .
	$(UV) run --frozen ruff format .

typecheck:
	$(UV) run --frozen mypy

check: lint typecheck

migrate:
	$(UV) run --frozen itemstream migrate

k8s-rules:  ## load the chart's alert rules into the kind cluster's Prometheus (k8s/kind-up.sh runs it)
	$(HELM) template itemstream-dev chart -n itemstream -f chart/values-dev.yaml \
	  --set prometheusRule.enabled=true --show-only templates/prometheusrule.yaml \
	  | $(UV) run --frozen python -c 'import sys, yaml; print(yaml.safe_dump(yaml.safe_load(sys.stdin)["spec"]))' \
	  > k8s/.rules.yaml
	kubectl -n observability create configmap prometheus-rules --from-file=rules.yaml=k8s/.rules.yaml \
	  --dry-run=client -o yaml | kubectl apply -f -
	rm -f k8s/.rules.yaml
	kubectl -n observability rollout restart deployment/prometheus
	kubectl -n observability rollout status deployment/prometheus --timeout=120s
