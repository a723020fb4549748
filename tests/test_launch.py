"""The multi-process launcher: results come back, and a rank that fails, dies, stalls or never joins ends
the launch with a clear error within its timeout (never a hang, nothing left running)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from workbench import launch

_THIS = Path(__file__).resolve()

# The "never joins" test: this rank sleeps while importing the target, before joining the group.
if os.environ.get("WORKBENCH_TEST_STALL_IMPORT_RANK", "-") == os.environ.get("RANK"):
    time.sleep(120)


def _sum_ranks(scale: float = 1.0) -> dict[str, object]:
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    return {"rank": dist.get_rank(), "sum": value * scale, "backend": dist.get_backend()}


def _rank1_raises() -> dict[str, object]:
    if dist.get_rank() == 1:
        raise ValueError("rank one refuses")
    dist.all_reduce(torch.zeros(1))
    return {}


def _rank1_dies() -> dict[str, object]:
    if dist.get_rank() == 1:
        os._exit(3)
    dist.all_reduce(torch.zeros(1))
    return {}


def _rank1_stalls() -> dict[str, object]:
    if dist.get_rank() == 1:
        time.sleep(120)
    dist.all_reduce(torch.zeros(1))
    return {}


def _everyone_sleeps() -> dict[str, object]:
    time.sleep(120)
    return {}


def _run(name: str, **kwargs) -> launch.LaunchResult:
    return launch.run(f"{_THIS}:{name}", nproc=2, threads_per_process=1, **kwargs)


def _no_worker_left() -> bool:
    time.sleep(0.2)
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if str(_THIS).encode() in command and b"workbench.launch" in command:
                return False
    return True


@pytest.mark.distributed
def test_run_returns_every_ranks_result():
    result = _run("_sum_ranks", kwargs={"scale": 2.0}, timeout_s=60)
    assert [r["rank"] for r in result.results] == [0, 1]
    assert all(torch.equal(r["sum"], torch.tensor([6.0])) for r in result.results)
    assert result.results[0]["backend"] == "gloo"


@pytest.mark.distributed
def test_a_rank_that_raises_names_itself_and_its_error():
    start = time.perf_counter()
    with pytest.raises(launch.LaunchError, match="rank one refuses") as info:
        _run("_rank1_raises", timeout_s=60, init_timeout_s=20)
    assert "rank 1 exited with status" in str(info.value)
    assert time.perf_counter() - start < 40
    assert _no_worker_left()


@pytest.mark.distributed
def test_a_rank_that_dies_fails_fast():
    start = time.perf_counter()
    with pytest.raises(launch.LaunchError, match="rank 1 exited with status 3"):
        _run("_rank1_dies", timeout_s=60, init_timeout_s=20)
    assert time.perf_counter() - start < 40  # the peer's collective fails at once (connection closed)
    assert _no_worker_left()


@pytest.mark.distributed
def test_a_stalled_rank_times_out_instead_of_hanging():
    start = time.perf_counter()
    with pytest.raises(launch.LaunchError, match="rank 0 exited"):
        _run("_rank1_stalls", timeout_s=60, init_timeout_s=4)
    assert time.perf_counter() - start < 40
    assert _no_worker_left()


@pytest.mark.distributed
def test_a_rank_that_never_joins_times_out():
    start = time.perf_counter()
    with pytest.raises(launch.LaunchError, match="rank 0 exited"):
        _run("_sum_ranks", timeout_s=60, init_timeout_s=4, env={"WORKBENCH_TEST_STALL_IMPORT_RANK": "1"})
    assert time.perf_counter() - start < 40
    assert _no_worker_left()


@pytest.mark.distributed
def test_the_whole_launch_is_killed_at_its_timeout():
    start = time.perf_counter()
    with pytest.raises(launch.LaunchError, match="timed out after 8 s"):
        _run("_everyone_sleeps", timeout_s=8)
    assert time.perf_counter() - start < 25
    assert _no_worker_left()


def test_bad_arguments_are_refused_before_starting():
    with pytest.raises(ValueError, match="target must be"):
        launch.run("no_function_here", nproc=2)
    with pytest.raises(ValueError, match="timeout_s"):
        launch.run("workbench.launch:_echo", nproc=2, timeout_s=0)
    with pytest.raises(ValueError, match="nproc"):
        launch.torchrun_command("workbench", [], nproc=0)


def test_init_distributed_outside_torchrun_says_how_to_launch(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        launch.init_distributed()
    with pytest.raises(ValueError, match="timeout_s"):
        launch.init_distributed(timeout_s=0)


def test_torchrun_command_uses_loopback_and_a_port():
    command = launch.torchrun_command("workbench", ["distrifusion", "--steps", "3"], nproc=2, port=29999)
    assert "--nproc_per_node=2" in command and "--master_addr=127.0.0.1" in command
    assert "--master_port=29999" in command and command[-4:] == ["workbench", "distrifusion", "--steps", "3"]
    assert 0 < launch.free_port() < 65536
