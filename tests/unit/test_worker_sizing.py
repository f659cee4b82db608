from __future__ import annotations

from pathlib import Path

import pytest

from app import workers


@pytest.fixture(autouse=True)
def eight_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "affinity_cpus", lambda: 8)


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    root = write(tmp_path, {"cpu.max": "150000 100000"})
    assert workers.cgroup_cpu_limit(root) == 1.5
    assert workers.worker_count(cgroup_root=root) == 2


def test_cgroup_v2_unlimited_falls_back_to_affinity(tmp_path: Path) -> None:
    root = write(tmp_path, {"cpu.max": "max 100000"})
    assert workers.cgroup_cpu_limit(root) is None
    assert workers.worker_count(cgroup_root=root) == 8


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    root = write(
        tmp_path,
        {"cpu,cpuacct/cpu.cfs_quota_us": "50000", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
    )
    assert workers.cgroup_cpu_limit(root) == 0.5
    assert workers.worker_count(cgroup_root=root) == 1


def test_cgroup_v1_unlimited(tmp_path: Path) -> None:
    root = write(tmp_path, {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert workers.cgroup_cpu_limit(root) is None


def test_no_cgroup_files(tmp_path: Path) -> None:
    assert workers.worker_count(cgroup_root=tmp_path) == 8


def test_quota_above_affinity_is_capped_by_affinity(tmp_path: Path) -> None:
    root = write(tmp_path, {"cpu.max": "1600000 100000"})
    assert workers.worker_count(cgroup_root=root) == 8


def test_cap_and_explicit_override(tmp_path: Path) -> None:
    assert workers.worker_count(maximum=3, cgroup_root=tmp_path) == 3
    assert workers.worker_count(5, cgroup_root=tmp_path) == 5
    with pytest.raises(ValueError, match="at least 1"):
        workers.worker_count(0, cgroup_root=tmp_path)
