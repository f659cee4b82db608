"""How many gunicorn workers: WEB_CONCURRENCY when set, else the CPU this container may really
use (cgroup v2 cpu.max, cgroup v1 CFS quota, then CPU affinity), never the host's core count.
Async workers each run one event loop, so one per usable core saturates the CPU."""

from __future__ import annotations

import math
import os
from pathlib import Path

DEFAULT_MAX_WORKERS = 8


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup quota, or None when unlimited/unknown."""
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        quota_text, _, period_text = v2.partition(" ")
        if quota_text == "max":
            return None
        try:
            return int(quota_text) / int(period_text or "100000")
        except ValueError:
            return None
    for v1_dir in (root / "cpu", root / "cpu,cpuacct", root):
        v1_quota = _read(v1_dir / "cpu.cfs_quota_us")
        v1_period = _read(v1_dir / "cpu.cfs_period_us")
        if v1_quota is None or v1_period is None:
            continue
        try:
            quota, period = int(v1_quota), int(v1_period)
        except ValueError:
            return None
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def usable_cpus(root: Path = Path("/sys/fs/cgroup")) -> float:
    limit = cgroup_cpu_limit(root)
    cpus = float(affinity_cpus())
    return cpus if limit is None else min(limit, cpus)


def worker_count(
    explicit: int | None = None,
    *,
    maximum: int = DEFAULT_MAX_WORKERS,
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    per_core: float = 1.0,
) -> int:
    """`explicit` (WEB_CONCURRENCY) when set, else the usable CPUs, at most `maximum`
    (MAX_WORKERS); both come from the settings."""
    if explicit is not None:
        if explicit < 1:
            raise ValueError("WEB_CONCURRENCY must be at least 1")
        return explicit
    return max(1, min(maximum, math.ceil(usable_cpus(cgroup_root) * per_core)))
