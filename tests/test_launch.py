"""The multi-process launcher: results come back, and a rank that raises, dies, stalls or never joins ends
the launch with an error that names that rank and what it was doing; nothing is left behind, also when the
launcher itself gets SIGTERM. Every launch here is bounded (its own timeout, and the hard limit below), so a
hang fails the test; how long each fault takes to be reported is measured elsewhere, not asserted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from workbench import launch

_THIS = Path(__file__).resolve()
_REPO = _THIS.parent.parent
_HARD_LIMIT_S = 120  # far above any launch here: reaching it means something hung

# The "never joins" tests: this rank sleeps while importing the target, before it joins the group.
if os.environ.get("WORKBENCH_TEST_STALL_IMPORT_RANK", "-") == os.environ.get("RANK"):
    time.sleep(300)


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
    launch.report_phase("before the stall")
    if dist.get_rank() == 1:
        launch.report_phase("stalling on purpose")
        time.sleep(300)
    dist.all_reduce(torch.zeros(1))
    return {}


def _everyone_sleeps() -> dict[str, object]:
    time.sleep(300)
    return {}


@pytest.fixture(autouse=True)
def _hard_limit():
    """Fail a test that runs past the hard limit (SIGALRM raises in the test, whose clean-up then runs)."""

    def expire(signum, frame):
        raise TimeoutError(f"test still running after {_HARD_LIMIT_S} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(_HARD_LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _run(name: str, **kwargs) -> launch.LaunchResult:
    return launch.run(f"{_THIS}:{name}", nproc=2, threads_per_process=1, **kwargs)


def _fails(name: str, **kwargs) -> launch.LaunchError:
    with pytest.raises(launch.LaunchError) as info:
        _run(name, **kwargs)
    return info.value


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie waiting for its parent to reap it is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _no_worker_left() -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if str(_THIS).encode() in command and b"workbench.launch" in command and _alive(int(pid)):
                return False
    return True


@pytest.mark.distributed
def test_run_returns_every_ranks_result():
    result = _run("_sum_ranks", kwargs={"scale": 2.0}, timeout_s=60)
    assert [r["rank"] for r in result.results] == [0, 1]
    assert all(torch.equal(r["sum"], torch.tensor([6.0])) for r in result.results)
    assert result.results[0]["backend"] == "gloo"


@pytest.mark.distributed
def test_a_rank_that_raises_is_named_with_its_error():
    error = _fails("_rank1_raises", timeout_s=60, init_timeout_s=20)
    assert error.rank == 1 and error.faulty[0].state == "raised"
    assert [r.rank for r in error.faulty] == [1]  # rank 0 only lost its peer
    assert error.faulty[0].phase == "running the target"
    assert "rank 1 raised ValueError: rank one refuses" in str(error)
    assert "Traceback" in error.faulty[0].detail
    assert _no_worker_left()


@pytest.mark.distributed
def test_a_rank_that_dies_is_named_with_its_exit_status():
    error = _fails("_rank1_dies", timeout_s=60, init_timeout_s=20)
    assert error.rank == 1 and error.faulty[0].state == "died"
    assert [r.rank for r in error.faulty] == [1]
    assert error.faulty[0].returncode == 3
    assert "rank 1 died (exit status 3)" in str(error)
    assert _no_worker_left()


@pytest.mark.distributed
def test_a_stalled_rank_is_named_with_its_phase_and_stack():
    # The group's timeout (3 s) makes rank 0's collective raise; rank 1 is the one that never came.
    error = _fails("_rank1_stalls", timeout_s=60, init_timeout_s=3)
    assert error.rank == 1 and error.faulty[0].state == "stalled"
    assert [r.rank for r in error.faulty] == [1]
    assert error.ranks[0].state == "failed_in_collective"
    assert error.faulty[0].phase == "stalling on purpose"
    assert "_rank1_stalls" in error.faulty[0].detail  # its stack shows where it was
    assert "rank 1 stalled" in str(error) and "'stalling on purpose'" in str(error)
    assert _no_worker_left()


@pytest.mark.distributed
def test_the_launch_timeout_names_a_stalled_rank_before_the_group_timeout():
    # The group would wait 600 s (past the hard limit): the launch's own 12 s governs and still names rank 1.
    error = _fails("_rank1_stalls", timeout_s=12, init_timeout_s=600)
    assert "timed out after 12 s" in str(error)
    assert error.rank == 1 and error.faulty[0].state == "stalled"
    assert [r.rank for r in error.faulty] == [1]
    assert error.ranks[0].state == "waiting_in_collective" and error.ranks[0].phase == "before the stall"
    assert error.faulty[0].phase == "stalling on purpose"
    assert _no_worker_left()


@pytest.mark.distributed
@pytest.mark.parametrize("missing", [1, 0], ids=["peer", "store-host"])
def test_a_rank_that_never_joins_is_named(missing):
    # Rank 0 hosts the rendezvous store: without it, its peer's connection attempts alone would take
    # twice the timeout plus a back-off; the launcher's rendezvous timeout names rank 0 as well.
    error = _fails("_sum_ranks", timeout_s=60, init_timeout_s=4, env={"WORKBENCH_TEST_STALL_IMPORT_RANK": str(missing)})
    assert error.rank == missing and error.faulty[0].state == "never_joined"
    assert [r.rank for r in error.faulty] == [missing]
    assert error.faulty[0].phase == "importing the target"
    assert f"rank {missing} never joined the group" in str(error)
    assert _no_worker_left()


@pytest.mark.distributed
def test_the_whole_launch_is_stopped_at_its_timeout():
    error = _fails("_everyone_sleeps", timeout_s=12)
    assert "timed out after 12 s" in str(error)
    assert {r.rank for r in error.faulty} == {0, 1} and {r.state for r in error.faulty} == {"stalled"}
    assert _no_worker_left()


def _start_launcher(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """A launcher process running ``_rank1_stalls`` with its temporary folder under ``tmp_path``; its rank pids."""
    script = (
        "from workbench import launch\n"
        f"launch.run({f'{_THIS}:_rank1_stalls'!r}, nproc=2, threads_per_process=1, timeout_s=100, init_timeout_s=100)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(_REPO)}
    launcher = subprocess.Popen([sys.executable, "-c", script], env=env)
    while True:  # until rank 1 stalls and rank 0 waits for it (bounded by the hard limit)
        phases = [json.loads(p.read_text()) for p in tmp_path.glob("workbench-launch-*/rank*.phase.json")]
        if sorted(p["phase"] for p in phases) == ["before the stall", "stalling on purpose"]:
            return launcher, [p["pid"] for p in phases]
        assert launcher.poll() is None, "the launcher ended before its ranks stalled"
        time.sleep(0.2)


@pytest.mark.distributed
def test_sigterm_to_the_launcher_leaves_no_rank_and_no_folder(tmp_path):
    launcher, pids = _start_launcher(tmp_path)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=60) == -signal.SIGTERM  # cleaned up, then ended by the signal as usual
    assert not any(_alive(pid) for pid in pids)
    assert list(tmp_path.glob("workbench-launch-*")) == []


@pytest.mark.distributed
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_ranks_die_with_a_launcher_killed_outright(tmp_path):
    launcher, pids = _start_launcher(tmp_path)
    launcher.kill()
    launcher.wait(timeout=60)
    while any(_alive(pid) for pid in pids):  # the kernel sends SIGKILL; bounded by the hard limit
        time.sleep(0.1)


def test_report_phase_outside_a_launch_does_nothing_and_checks_its_argument(monkeypatch, tmp_path):
    monkeypatch.delenv("WORKBENCH_LAUNCH_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    launch.report_phase("loading")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match="phase must be a str"):
        launch.report_phase(3)


def test_bad_arguments_are_refused_before_starting():
    with pytest.raises(ValueError, match="target must be"):
        launch.run("no_function_here", nproc=2)
    with pytest.raises(ValueError, match="timeout_s"):
        launch.run("workbench.launch:_echo", nproc=2, timeout_s=0)
    with pytest.raises(ValueError, match="nproc"):
        launch.run("workbench.launch:_echo", nproc=0)
    with pytest.raises(ValueError, match="backend"):
        launch.run("workbench.launch:_echo", nproc=2, backend="mpi")
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
