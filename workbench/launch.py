"""Multi-process launch: torch.distributed groups from torchrun, and a launcher for notebooks and tests.

* :func:`init_distributed` initialises the default group inside a process that ``torchrun`` started
  (gloo on CPU, NCCL on GPUs), always with an explicit, short timeout: with gloo's default of 30 minutes
  a stalled rank hangs its peers (ENVIRONMENT.md, section 5).
* :func:`run` starts N ranks on 127.0.0.1 with a free port (the environment torchrun would give them:
  RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), runs a function given by its import path
  (``"package.module:function"`` or ``"path/to/file.py:function"``) on every rank, supervises them,
  and returns each rank's result. Results travel as safetensors files (tensors) and JSON (everything
  else): no pickle. A rank that raises, dies, stalls or never joins ends the whole launch with a
  :class:`LaunchError` carrying the failing rank's traceback, within the timeouts; nothing is left
  running. (It skips torchrun's own launcher process, which costs seconds of start-up on a small CPU;
  :func:`torchrun_command` gives the torchrun command line for the same job.)

Example:
    >>> from workbench import launch
    >>> result = launch.run("workbench.launch:_echo", nproc=2, kwargs={"value": 3})
    >>> [r["rank"] for r in result.results]
    [0, 1]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistributedInfo",
    "LaunchError",
    "LaunchResult",
    "free_port",
    "init_distributed",
    "run",
    "torchrun_command",
]

_REPO_ROOT = Path(__file__).resolve().parent.parent
_TENSORS_KEY = "__json__"


class LaunchError(RuntimeError):
    """A multi-process launch failed: a rank raised, died, stalled past its timeout, or never joined."""


@dataclass(frozen=True)
class DistributedInfo:
    """This process's place in the default group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def init_distributed(*, backend: str | None = None, timeout_s: float = 60.0) -> DistributedInfo:
    """Initialise the default process group from torchrun's environment (or return the existing one).

    Args:
        backend: "gloo" or "nccl"; by default NCCL when CUDA is available, else gloo.
        timeout_s: how long a collective (and the start-up rendezvous) may wait for a peer before it
            raises: a rank that dies or stalls becomes an error, never a hang.

    Raises:
        RuntimeError: the environment of a torchrun worker (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
            is missing.
        ValueError: an unknown backend, or NCCL without a GPU for this rank.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if dist.is_initialized():
        return _info(dist.get_backend())
    missing = [key for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
    if missing:
        raise RuntimeError(
            f"not a torchrun worker (missing {', '.join(missing)}): start with "
            "`torchrun --nproc_per_node=N -m workbench distrifusion ...` or use workbench.launch.run"
        )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"backend 'nccl': local rank {local_rank} has no GPU ({torch.cuda.device_count()} found)")
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return _info(backend)


def _info(backend: str) -> DistributedInfo:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistributedInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(module: str, args: Sequence[str], *, nproc: int, port: int | None = None) -> list[str]:
    """The command that runs ``python -m module args`` on ``nproc`` local ranks over loopback."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={port or free_port()}",
        "--max_restarts=0",
        "--monitor_interval=0.2",
        "-m",
        module,
        *args,
    ]


@dataclass
class LaunchResult:
    """What :func:`run` returns.

    Attributes:
        results: each rank's returned mapping (tensors as CPU tensors, other values from JSON).
        seconds: wall time of the whole launch, start-up included.
        log: the launch's combined output.
    """

    results: list[dict[str, Any]]
    seconds: float
    log: str


def run(
    target: str,
    *,
    nproc: int,
    kwargs: Mapping[str, Any] | None = None,
    timeout_s: float = 300.0,
    init_timeout_s: float = 30.0,
    backend: str | None = None,
    threads_per_process: int | None = None,
    env: Mapping[str, str] | None = None,
) -> LaunchResult:
    """Run ``target(**kwargs)`` on ``nproc`` local ranks (127.0.0.1, a free port) and collect their results.

    Args:
        target: ``"package.module:function"`` or ``"path/to/file.py:function"``. The function runs after
            the default group is initialised and returns a mapping of names to tensors or JSON values.
        nproc: number of ranks.
        kwargs: JSON-serialisable keyword arguments for the target.
        timeout_s: limit for the whole launch; past it every process is killed.
        init_timeout_s: the process group's timeout: a rank that never joins, or a collective that a
            stalled rank never enters, raises after this long.
        backend: "gloo" or "nccl" (default: NCCL when there is a GPU per rank, else gloo).
        threads_per_process: OMP threads per rank (default: the CPU cores shared evenly, at least 1).
        env: extra environment variables for the ranks.

    Raises:
        LaunchError: a rank failed or the launch timed out (the message names the rank and shows its error).
    """
    if timeout_s <= 0 or init_timeout_s <= 0:
        raise ValueError(f"timeout_s and init_timeout_s must be > 0, got {timeout_s} and {init_timeout_s}")
    if ":" not in target:
        raise ValueError(f"target must be 'module:function' or 'file.py:function', got {target!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nproc else "gloo"
    threads = threads_per_process or max(1, (os.cpu_count() or 1) // nproc)
    with tempfile.TemporaryDirectory(prefix="workbench-launch-") as folder:
        out_dir = Path(folder)
        (out_dir / "kwargs.json").write_text(json.dumps(dict(kwargs or {})))
        command = [
            sys.executable,
            "-m",
            "workbench.launch",
            "--target",
            target,
            "--out",
            str(out_dir),
            "--backend",
            backend,
            "--init-timeout",
            str(init_timeout_s),
        ]
        port = free_port()
        child_env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), child_env.get("PYTHONPATH")]))
        start = time.perf_counter()
        processes = []
        try:
            for rank in range(nproc):
                rank_env = {
                    **child_env,
                    "RANK": str(rank),
                    "LOCAL_RANK": str(rank),
                    "WORLD_SIZE": str(nproc),
                    "LOCAL_WORLD_SIZE": str(nproc),
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port),
                }
                log_file = open(out_dir / f"rank{rank}.log", "wb")  # noqa: SIM115 (closed below)
                processes.append(
                    (
                        subprocess.Popen(
                            command, stdout=log_file, stderr=subprocess.STDOUT, env=rank_env, start_new_session=True
                        ),
                        log_file,
                    )
                )
            failure = _supervise([p for p, _ in processes], timeout_s)
        finally:
            for process, log_file in processes:
                _kill(process)
                log_file.close()
        seconds = time.perf_counter() - start
        log = "\n".join(
            f"--- rank {r} ---\n" + (out_dir / f"rank{r}.log").read_text(errors="replace") for r in range(nproc)
        )
        if failure is not None:
            errors = sorted(out_dir.glob("rank*.error.txt"))
            causes = [f"{path.name.split('.')[0]}: {_last_line(path.read_text())}" for path in errors]
            detail = "\n".join(f"--- {path.name.split('.')[0]} ---\n{path.read_text()}" for path in errors)
            raise LaunchError(
                f"launch of {target} on {nproc} ranks failed: {failure}"
                + "".join(f"\n  {cause}" for cause in causes)
                + "\n"
                + (detail or _tail(log))
            )
        results = [_read_result(out_dir / f"rank{rank}.safetensors") for rank in range(nproc)]
    return LaunchResult(results=results, seconds=seconds, log=log)


def _supervise(processes: list[subprocess.Popen], timeout_s: float) -> str | None:
    """Wait for all ranks; on the first failure give the others a moment to report theirs, then stop."""
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [process.poll() for process in processes]
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            grace = time.monotonic() + 2.0  # peers usually fail at once with "connection closed by peer"
            while time.monotonic() < grace and any(process.poll() is None for process in processes):
                time.sleep(0.05)
            failed = [rank for rank, process in enumerate(processes) if process.poll() not in (None, 0)]
            return "; ".join(f"rank {rank} exited with status {processes[rank].returncode}" for rank in failed)
        if all(code == 0 for code in codes):
            return None
        if time.monotonic() > deadline:
            stuck = [rank for rank, code in enumerate(codes) if code is None]
            return f"timed out after {timeout_s:.0f} s with rank(s) {stuck} still running (killed)"
        time.sleep(0.05)


def _kill(process: subprocess.Popen) -> None:
    """Terminate a rank and anything it started (its own session), then kill what is left."""
    if process.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=5.0)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no traceback)"


def _tail(log: str, lines: int = 40) -> str:
    return "log tail:\n" + "\n".join(log.splitlines()[-lines:])


def _read_result(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    if not path.exists():
        raise LaunchError(f"a rank finished without writing its result ({path.name})")
    with safe_open(str(path), framework="pt") as handle:
        result: dict[str, Any] = json.loads((handle.metadata() or {}).get(_TENSORS_KEY, "{}"))
        result |= {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iterator)
    return result


def _write_result(path: Path, result: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    if not isinstance(result, Mapping):
        raise TypeError(f"a launch target must return a mapping, got {type(result).__name__}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in result.items() if isinstance(v, torch.Tensor)}
    others = {k: v for k, v in result.items() if not isinstance(v, torch.Tensor)}
    save_file(tensors, str(path), metadata={_TENSORS_KEY: json.dumps(others)})


def _resolve(target: str) -> Callable[..., Mapping[str, Any]]:
    location, _, name = target.rpartition(":")
    if location.endswith(".py"):
        spec = importlib.util.spec_from_file_location(f"_launch_target_{Path(location).stem}", location)
        if spec is None or spec.loader is None:
            raise ValueError(f"target: cannot import {location}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(location)
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"target: {location} has no function {name!r}")
    return function


def _echo(value: Any = None) -> dict[str, Any]:
    """A trivial launch target (for the docstring example and smoke tests): rank, world size, a sum."""
    tensor = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(tensor)
    return {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "value": value, "sum": tensor}


def _worker(argv: Sequence[str]) -> None:
    """A rank of :func:`run`: import the target, join the group, call it, write its result or traceback."""
    parser = argparse.ArgumentParser(prog="python -m workbench.launch")
    parser.add_argument("--target", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--init-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        function = _resolve(args.target)  # import errors surface before anyone waits for this rank
        kwargs = json.loads((args.out / "kwargs.json").read_text())
        init_distributed(backend=args.backend, timeout_s=args.init_timeout)
        result = function(**kwargs)
        _write_result(args.out / f"rank{rank}.safetensors", result)
    except BaseException:
        (args.out / f"rank{rank}.error.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1:])
