"""The HorizontalPodAutoscaler's decision, computed from measured series: what the chart's HPA
would recommend, sync by sync, given the load a fleet really carried. No cluster runs here, so
this is the controller's documented algorithm (kubernetes.io "Horizontal Pod Autoscaling",
"Algorithm details" and "Configurable scaling behavior"), as kube-controller-manager's
`pkg/controller/podautoscaler` applies it:

- per metric, `ratio = current / target` (a Pods metric: the pods' average value; CPU: the
  pods' usage over their requests); within the tolerance (0.1) of 1 the replicas stay,
  else `ceil(ratio * replicas)`; the largest proposal over the metrics wins;
- stabilization: the recommendation is held between the smallest proposal of the scale-up
  window and the largest of the scale-down window (`stabilizationWindowSeconds`);
- rate limits: each policy allows `Pods` more (fewer) or `Percent` of the replicas the
  period started with (scale-up rounds up, scale-down down); `selectPolicy` takes the largest
  change (Max), the smallest (Min), or none (Disabled); then minReplicas..maxReplicas.

What it assumes, where a cluster would differ: the load is the clients' (a Pods metric's sum
does not depend on the pod count, so the average at `n` pods is `sum / n` exactly; CPU
usage is taken as independent of the pod count), new pods are ready by the next sync, and
no metric is missing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

TOLERANCE = 0.1  # --horizontal-pod-autoscaler-tolerance
SYNC_SECONDS = 15.0  # --horizontal-pod-autoscaler-sync-period


@dataclass(frozen=True)
class Sample:
    """What the metrics pipelines report at one sync: sums over the pods."""

    at: float  # seconds
    pods_metric: float  # e.g. the in-flight requests of all pods
    cpu_cores: float  # CPU used by all pods


@dataclass(frozen=True)
class Rules:
    stabilization: float
    policies: tuple[tuple[str, int, float], ...]  # (Pods|Percent, value, periodSeconds)
    select: str = "Max"

    @classmethod
    def of(cls, spec: dict[str, Any] | None, default_window: float) -> Rules:
        # The API's defaults when the chart's behavior leaves a direction out.
        if spec is None:
            if default_window == 0:
                return cls(0, (("Percent", 100, 15), ("Pods", 4, 15)), "Max")
            return cls(default_window, (("Percent", 100, 15),), "Max")
        policies = tuple(
            (p["type"], int(p["value"]), float(p["periodSeconds"]))
            for p in spec.get("policies", [])
        )
        return cls(
            float(spec.get("stabilizationWindowSeconds", default_window)),
            policies or (("Percent", 100, 15),),
            spec.get("selectPolicy", "Max"),
        )


@dataclass
class Autoscaler:
    """One HPA's state across syncs: its recommendations and scale events."""

    min_replicas: int
    max_replicas: int
    pods_target: float | None  # a Pods metric's target averageValue
    cpu_target_percent: float | None  # the CPU target averageUtilization
    cpu_request: float  # cores requested per pod
    up: Rules
    down: Rules
    replicas: int = 0
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    events: list[tuple[float, int]] = field(default_factory=list)  # (when, change)

    @classmethod
    def from_manifest(cls, hpa: dict[str, Any], cpu_request: float) -> Autoscaler:
        """From a rendered autoscaling/v2 HorizontalPodAutoscaler."""
        spec = hpa["spec"]
        pods_target = cpu_target = None
        for metric in spec["metrics"]:
            if metric["type"] == "Pods":
                pods_target = float(metric["pods"]["target"]["averageValue"])
            elif metric["type"] == "Resource" and metric["resource"]["name"] == "cpu":
                cpu_target = float(metric["resource"]["target"]["averageUtilization"])
        behavior = spec.get("behavior") or {}
        minimum = int(spec.get("minReplicas", 1))
        return cls(
            minimum,
            int(spec["maxReplicas"]),
            pods_target,
            cpu_target,
            cpu_request,
            Rules.of(behavior.get("scaleUp"), 0),
            Rules.of(behavior.get("scaleDown"), 300),
            replicas=minimum,
        )

    def proposals(self, sample: Sample) -> dict[str, int]:
        """Each metric's replica proposal at the current count."""
        proposals = {}
        n = self.replicas
        if self.pods_target:
            proposals["pods"] = _proposal(n, sample.pods_metric / n / self.pods_target)
        if self.cpu_target_percent:
            utilization = 100 * sample.cpu_cores / (n * self.cpu_request)
            proposals["cpu"] = _proposal(n, utilization / self.cpu_target_percent)
        return proposals

    def sync(self, sample: Sample) -> int:
        """The replica count after this sync."""
        desired = max(self.proposals(sample).values(), default=self.replicas)
        stabilized = self._stabilize(sample.at, desired)
        limited = self._limit(sample.at, stabilized)
        if limited != self.replicas:
            self.events.append((sample.at, limited - self.replicas))
            self.replicas = limited
        return self.replicas

    def _stabilize(self, now: float, desired: int) -> int:
        up = down = desired
        for at, recommendation in self.recommendations:
            if at > now - self.up.stabilization:
                up = min(up, recommendation)
            if at > now - self.down.stabilization:
                down = max(down, recommendation)
        self.recommendations.append((now, desired))
        return min(max(self.replicas, up), down)

    def _changed_within(self, now: float, period: float, sign: int) -> int:
        return sum(
            abs(change) for at, change in self.events if at > now - period and change * sign > 0
        )

    def _limit(self, now: float, desired: int) -> int:
        current = self.replicas
        if desired > current:
            limit = _select(
                [_policy_limit(current, now, self, policy, up=True) for policy in self.up.policies],
                self.up.select,
                up=True,
                current=current,
            )
            return min(desired, max(limit, current), self.max_replicas)
        if desired < current:
            limit = _select(
                [
                    _policy_limit(current, now, self, policy, up=False)
                    for policy in self.down.policies
                ],
                self.down.select,
                up=False,
                current=current,
            )
            return max(desired, min(limit, current), self.min_replicas)
        return min(max(desired, self.min_replicas), self.max_replicas)


def _proposal(replicas: int, ratio: float) -> int:
    if abs(ratio - 1.0) <= TOLERANCE:
        return replicas
    return math.ceil(ratio * replicas)


def _policy_limit(
    current: int, now: float, hpa: Autoscaler, policy: tuple[str, int, float], *, up: bool
) -> int:
    kind, value, period = policy
    start = current - hpa._changed_within(now, period, +1) + hpa._changed_within(now, period, -1)
    if kind == "Pods":
        return start + value if up else start - value
    if up:
        return math.ceil(start * (1 + value / 100))
    return int(start * (1 - value / 100))


def _select(limits: Sequence[int], select: str, *, up: bool, current: int) -> int:
    if select == "Disabled" or not limits:
        return current
    # Max: the largest change (up: the highest limit; down: the lowest), Min the smallest.
    if select == "Min":
        return min(limits) if up else max(limits)
    return max(limits) if up else min(limits)


def adapter_query(rule: dict[str, Any], namespace: str, pods: Sequence[str]) -> str:
    """The query prometheus-adapter sends for a custom-metrics rule when the HPA asks for its
    metric over `pods`: the rule's `metricsQuery` template with its series, label matchers
    (the resources' overrides) and group-by filled in as the adapter fills them."""
    series = rule["seriesQuery"].split("{", 1)[0]
    overrides = rule["resources"]["overrides"]
    by_resource = {v["resource"]: label for label, v in overrides.items()}
    matchers = f'{by_resource["namespace"]}="{namespace}",{by_resource["pod"]}=~"{"|".join(pods)}"'
    query = (
        str(rule["metricsQuery"])
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", matchers)
        .replace("<<.GroupBy>>", by_resource["pod"])
    )
    if "<<" in query:
        raise ValueError(f"a template field this model does not fill: {query}")
    return query


def recommend(hpa: Autoscaler, samples: Sequence[Sample]) -> list[tuple[float, int]]:
    """(time, replicas) after each sync over `samples` (one per sync period)."""
    return [(sample.at, hpa.sync(sample)) for sample in samples]
