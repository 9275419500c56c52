"""The all-reduce check's decisions: a hand-made healthy 2x H200 NVLink machine (labelled so in the fixture), and
edited copies of it: a wrong sum, a hang, a crashed rank, slow consumer cards on PCIe, several nodes, one GPU."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from builder.selftest.checks_interconnect import P2P_OFF
from tests.selftest.conftest import findings, load_readings, severities


@pytest.fixture
def h200x2() -> dict[str, Any]:
    return copy.deepcopy(load_readings("h200x2_handmade"))


def allreduce(r: dict[str, Any]) -> dict[str, Any]:
    return r["allreduce"]


def consumer_pcie(r: dict[str, Any], busbw: float) -> None:
    """Two RTX 4090s on PCIe gen4 x16, no NVLink."""
    for d in r["nvml"]["devices"]:
        d.update(name="NVIDIA GeForce RTX 4090", nvlink_active=None, pcie_max_gen=4, pcie_gpu_max_gen=4)
    allreduce(r).update(busbw_gbps=busbw, algbw_gbps=busbw)


def test_healthy_h200_pair() -> None:
    r = load_readings("h200x2_handmade")
    assert r["fixture_source"].startswith("hand-made") and "measured on 2 x H200" in r["fixture_source"]
    found = findings(r, "allreduce")
    assert [f.severity for f in found] == ["ok", "ok"]
    assert "the sum is right" in found[0].message
    assert "297.8 GB/s" in found[1].message and "nvlink:H200 reference 300" in found[1].message


def test_wrong_sum_fails(h200x2) -> None:
    allreduce(h200x2)["wrong_elements"] = 4096
    [f] = findings(h200x2, "allreduce")
    assert f.severity == "fail" and "wrong sum in 4096 of 67108864 elements" in f.message
    assert "corrupts data" in f.remediation and "NCCL_P2P_DISABLE" not in f.remediation


def test_wrong_sum_on_consumer_cards_suggests_p2p_off(h200x2) -> None:
    consumer_pcie(h200x2, 12.0)
    allreduce(h200x2)["wrong_elements"] = 1
    [f] = findings(h200x2, "allreduce")
    assert f.severity == "fail" and "NCCL_P2P_DISABLE=1" in f.remediation


def test_hang_is_a_finding(h200x2) -> None:
    a = allreduce(h200x2)
    a.update(timed_out=True, ranks_reported=[])
    for key in ("expected", "wrong_elements", "busbw_gbps", "algbw_gbps"):
        a.pop(key)
    [f] = findings(h200x2, "allreduce")
    assert f.severity == "fail" and "did not finish in 90 s: a hang" in f.message
    assert "NCCL_DEBUG=INFO" in f.remediation
    consumer_pcie(h200x2, 0.0)
    [f] = findings(h200x2, "allreduce")
    assert f.remediation == P2P_OFF


def test_crashed_rank_fails_with_its_error(h200x2) -> None:
    allreduce(h200x2).update(error="rank 1: DistBackendError: NCCL error: unhandled system error", timed_out=True)
    [f] = findings(h200x2, "allreduce")
    assert f.severity == "fail" and "unhandled system error" in f.message


def test_slow_consumer_cards_on_pcie_warn_with_p2p_off(h200x2) -> None:
    consumer_pcie(h200x2, 3.1)
    found = findings(h200x2, "allreduce")
    assert [f.severity for f in found] == ["ok", "warn"]
    assert "0.17x the pcie:4 reference 18" in found[1].message
    assert "NCCL_P2P_DISABLE=1" in found[1].remediation


def test_consumer_cards_with_p2p_off_at_host_memory_speed_pass(h200x2) -> None:
    consumer_pcie(h200x2, 13.5)
    allreduce(h200x2)["nccl_env"]["NCCL_P2P_DISABLE"] = "1"
    assert severities(h200x2, "allreduce") == ["ok", "ok"]


def test_slow_nvlink_warns_without_the_consumer_advice(h200x2) -> None:
    allreduce(h200x2)["busbw_gbps"] = 40.0
    found = findings(h200x2, "allreduce")
    assert found[1].severity == "warn" and "NCCL_P2P_DISABLE=1" not in found[1].remediation
    assert "nvidia-smi topo -m" in found[1].remediation


def test_nvlink_down_is_judged_as_pcie(h200x2) -> None:
    """One GPU's NVLinks inactive: NCCL falls back to PCIe, and so does the reference."""
    h200x2["nvml"]["devices"][1]["nvlink_active"] = 0
    assert "pcie:5 reference" in findings(h200x2, "allreduce")[1].message


def test_across_nodes_speed_is_not_judged(h200x2) -> None:
    allreduce(h200x2).update(launcher="torchrun", nodes=2, world_size=16, busbw_gbps=40.0)
    assert severities(h200x2, "allreduce") == ["ok", "n/a"]


def test_one_gpu_is_not_applicable(healthy) -> None:
    healthy["allreduce"] = {"world_size": 1}
    assert severities(healthy, "allreduce") == ["n/a"]


def test_readings_from_before_the_probe(healthy) -> None:
    """The H100 capture predates the all-reduce probe: said so, not 'no GPU'."""
    [f] = findings(healthy, "allreduce")
    assert f.severity == "n/a" and "did not run" in f.message
