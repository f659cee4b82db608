"""The paths probers and scrapers call. Written once: telemetry keeps them quiet (no access
log at INFO, no metrics, no spans) and the host allowlist lets them through, since every
prober sends its own Host header (kubelet: the pod IP; `helm test`: the Service name)."""

from __future__ import annotations

PROBE_PATHS = frozenset({"/livez", "/readyz", "/metrics"})
