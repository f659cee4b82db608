#!/usr/bin/env bash
# Create the kind cluster for the skaffold loop and install what the loop needs:
# metrics-server (the HPA's CPU metric) and the local observability stack.
# Needs docker (or podman), kind >= 0.33, kubectl and helm 4. Then: skaffold dev
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
cluster=itemstream
metrics_server=v0.8.0

# Everything this needs, checked before anything is created.
missing=()
need() {  # need TOOL HINT...: note TOOL as missing (with where to get it) unless on PATH
  local tool=$1
  shift
  command -v "$tool" >/dev/null 2>&1 || missing+=("  $tool: $*")
}
need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation (>= 0.33)"
need kubectl "https://kubernetes.io/docs/tasks/tools/"
need helm "https://helm.sh/docs/intro/install/ (Helm 4)"
need make "apt-get install make"
if ! command -v docker >/dev/null 2>&1 && ! command -v podman >/dev/null 2>&1; then
  missing+=("  docker or podman: https://docs.docker.com/engine/install/ or apt-get install podman")
fi
if ! command -v docker >/dev/null 2>&1; then
  export KIND_EXPERIMENTAL_PROVIDER=podman  # kind's switch for podman
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "kind-up.sh: install these first (nothing was created):" >&2
  printf '%s\n' "${missing[@]}" >&2
  exit 2
fi

if ! kind get clusters | grep -qx "$cluster"; then
  kind create cluster --config "$here/kind-config.yaml"
fi
kubectl config use-context "kind-$cluster"

# kind's kubelets serve self-signed certificates: metrics-server must not verify them there.
kubectl apply -f "https://github.com/kubernetes-sigs/metrics-server/releases/download/$metrics_server/components.yaml"
kubectl -n kube-system patch deployment metrics-server --type=json \
  -p='[{"op":"add","path":"/spec/template/spec/containers/0/args/-","value":"--kubelet-insecure-tls"}]' \
  2>/dev/null || true

kubectl apply -f "$here/observability/"
# The chart's alert rules, rendered for the dev release, into Prometheus (rerun after changing
# them: it restarts Prometheus, which reads rule files only at start or on reload).
make -C "$root" k8s-rules
kubectl -n observability rollout status deployment --timeout=180s
echo "ready: run 'skaffold dev' from $root"
