"""The engine's thread count follows the cgroup's CPU quota (a Kubernetes CPU limit), not
only the affinity mask, on cgroup v2 and v1."""
from __future__ import annotations

from pathlib import Path

from llm_backend.decoder import cpu_quota


def test_cgroup_v2_quota_rounds_up_to_whole_cores(tmp_path: Path):
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cpu_quota(tmp_path) == 3
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert cpu_quota(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(tmp_path) is None


def test_cgroup_v1_quota_and_no_cgroup(tmp_path: Path):
    assert cpu_quota(tmp_path) is None
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(tmp_path) == 4
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(tmp_path) is None
