#!/usr/bin/env bash
# Create the kind cluster for the skaffold loop and install what the loop needs:
# metrics-server (the HPA's CPU metric) and the local observability stack.
# Needs docker (or podman), kind >= 0.33, kubectl and helm 4. Then: skaffold dev
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
cluster=itemstream
metrics_server=v0.8.0

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
