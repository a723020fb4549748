"""Multi-process launch: torch.distributed groups from torchrun, and a launcher for notebooks and tests.

* :func:`init_distributed` initialises the default group inside a process that ``torchrun`` started
  (gloo on CPU, NCCL on GPUs), always with an explicit, short timeout: gloo's default is 30 minutes, so
  without one a rank whose peer stalls blocks in its next collective for that long.
* :func:`run` starts N ranks on 127.0.0.1 with a free port (the environment torchrun would give them:
  RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), runs a function given by its import path
  (``"package.module:function"`` or ``"path/to/file.py:function"``) on every rank, supervises them,
  and returns each rank's result. Results travel as safetensors files (tensors) and JSON (everything
  else): no pickle. (It skips torchrun's own launcher process, which costs seconds of start-up on a
  small CPU; :func:`torchrun_command` gives the torchrun command line for the same job.)
* :func:`report_phase` lets a rank of :func:`run` say what it is doing ("loading the pipeline",
  "denoising step 3/20"); a failed launch shows each rank's last phase.

How :func:`run` names what went wrong. Every rank writes its current phase to a small file in the
launch's temporary folder (the worker itself reports "starting", "importing the target", "joining the
group", "running the target"; the target adds its own with :func:`report_phase`) and, if it raises, its
traceback. When a rank fails, or the launch's own timeouts pass, the launcher asks every rank still alive
for its Python stack (SIGUSR1, answered by :mod:`faulthandler` even while the rank is blocked in C code,
so a target must leave SIGUSR1 alone), then sorts the ranks into

* the faulty ones, in this order: **died** (exited with no Python traceback: a signal, ``os._exit``, a
  crash in C code), **raised** (an exception that is not a communication error), **never joined** (alive
  but still before the group's rendezvous while a peer waits to join), **stalled** (joined, alive, and
  not waiting in torch.distributed while its peers failed or waited in a collective, or when the launch
  timed out);
* the ones that only reacted: failed or waiting inside torch.distributed (a collective that lost its
  peer, the rendezvous), or finished.

:class:`LaunchError` names the faulty ranks first, each with its last phase and its traceback or stack,
and carries the same as :class:`RankReport` values. A rank counts as waiting in torch.distributed when
its innermost Python frame is in the ``torch.distributed`` package or on a line that waits on a
``Work`` handle (``.wait(``); a rank's error counts as a communication error when it is a
``torch.distributed.DistError``, comes from gloo or c10d, or was raised inside ``torch.distributed``.

Time to fail (worst cases; add about 2 s to collect the stacks and stop the ranks, and up to 5 s more
for a rank that ignores SIGTERM):

* a rank raises or dies: at once (its peers' collectives fail as soon as its sockets close);
* a rank stalls: ``min(init_timeout_s, timeout_s)``: the group's timeout makes the peers' collectives
  raise, and the launch's own timeout stops everything when it is the shorter;
* a rank never joins: ``min(init_timeout_s + 1 s, timeout_s)`` after the first rank starts to join, also
  when the missing rank is rank 0, which hosts the rendezvous store (on their own, the peers would retry
  the store for twice the timeout plus a back-off);
* anything else: ``timeout_s``.

Nothing is left behind: each rank runs in its own session, and the launcher ends every rank's process
group (SIGTERM, then SIGKILL) and removes its temporary folder on success, failure, timeout, Ctrl-C
(SIGINT), SIGTERM and SIGHUP; after SIGTERM or SIGHUP it then lets the signal take its usual effect
(called from the main thread; from another thread only SIGINT is caught). On Linux the ranks also die
with the launcher if it is killed outright (SIGKILL), though the folder then stays behind.

Example:
    >>> from workbench import launch
    >>> result = launch.run("workbench.launch:_echo", nproc=2, kwargs={"value": 3})
    >>> [r["rank"] for r in result.results]
    [0, 1]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import faulthandler
import importlib
import importlib.util
import json
import linecache
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

__all__ = [
    "DistributedInfo",
    "LaunchError",
    "LaunchResult",
    "RankReport",
    "free_port",
    "init_distributed",
    "report_phase",
    "run",
    "torchrun_command",
]

logger = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parent.parent
_TORCH_DISTRIBUTED_DIR = str(Path(dist.__file__).resolve().parent)
_TENSORS_KEY = "__json__"
_LAUNCH_DIR_ENV = "WORKBENCH_LAUNCH_DIR"  # set by run() for its ranks: where report_phase writes

# The phases a rank of run() reports on its own, before and around the target.
_STARTING, _IMPORTING, _JOINING, _RUNNING, _WRITING = (
    "starting",
    "importing the target",
    "joining the group",
    "running the target",
    "writing the result",
)

_POLL_S = 0.05
_GRACE_S = 1.0  # after a first failure, time for the peers to fail too, so the launcher sees the whole picture
_STACK_WAIT_S = 1.0  # how long a live rank gets to write its stack
_TERM_WAIT_S = 5.0  # between SIGTERM and SIGKILL
_JOIN_MARGIN_S = 1.0  # gloo's own rendezvous timeout gets this head start on the launcher's
_GLOO_OR_C10D = re.compile(r"gloo/|\[c10d\]|c10d::|ProcessGroup", re.IGNORECASE)

RankState = Literal[
    "died",
    "raised",
    "never_joined",
    "stalled",
    "failed_in_collective",
    "waiting_in_collective",
    "waiting_to_join",
    "finished",
]
_FAULTY: tuple[RankState, ...] = ("died", "raised", "never_joined", "stalled")


class _Terminated(BaseException):
    """SIGTERM or SIGHUP reached the launcher during :func:`run` (raised to unwind through the clean-up)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _TerminationRequest:
    """Remembers the first SIGTERM/SIGHUP; the launcher raises it where that is safe, never mid-clean-up."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def handle(self, signum: int, frame: object) -> None:
        self.signum = self.signum or signum

    def check(self) -> None:
        if self.signum is not None:
            raise _Terminated(self.signum)


@dataclass(frozen=True)
class RankReport:
    """What one rank of a failed launch was doing when the launcher stopped it.

    Attributes:
        rank: the rank.
        state: ``"died"``, ``"raised"``, ``"never_joined"``, ``"stalled"`` (the faulty states), or
            ``"failed_in_collective"``, ``"waiting_in_collective"``, ``"waiting_to_join"``, ``"finished"``
            (ranks that only reacted to a fault elsewhere).
        phase: its last reported phase (see :func:`report_phase`), None if it never reported one.
        phase_age_s: seconds it had been in that phase when the launcher looked (None without a phase).
        summary: one line: the exception, the exit status, or the line it was executing.
        detail: its traceback, its Python stack, or the tail of its output.
        returncode: its exit status (negative: killed by that signal), None if it was still running.
    """

    rank: int
    state: RankState
    phase: str | None
    phase_age_s: float | None
    summary: str
    detail: str = ""
    returncode: int | None = None

    @property
    def faulty(self) -> bool:
        """Whether this rank caused the failure (died, raised, never joined or stalled)."""
        return self.state in _FAULTY

    def describe(self) -> str:
        """``rank 1 stalled ... in phase 'x' (for 3.2 s)``: the rank, what it did, and its phase."""
        where = "" if self.phase is None else f", in phase {self.phase!r} (for {self.phase_age_s:.1f} s)"
        return f"rank {self.rank} {self.summary}{where}"


class LaunchError(RuntimeError):
    """A multi-process launch failed: a rank raised, died, stalled, or never joined, or the launch timed out.

    Attributes:
        ranks: a :class:`RankReport` for every rank (empty when the failure was not a rank's).
        faulty: the reports of the ranks that caused the failure, the most likely cause first.
    """

    def __init__(self, message: str, *, ranks: Sequence[RankReport] = ()) -> None:
        super().__init__(message)
        self.ranks = tuple(ranks)
        self.faulty = _faulty(self.ranks)

    @property
    def rank(self) -> int | None:
        """The rank that most likely caused the failure (None if none could be named)."""
        return self.faulty[0].rank if self.faulty else None


def _faulty(reports: Sequence[RankReport]) -> tuple[RankReport, ...]:
    """The faulty ranks, the most likely cause first (died, raised, never joined, stalled; then by rank)."""
    return tuple(sorted((r for r in reports if r.faulty), key=lambda r: (_FAULTY.index(r.state), r.rank)))


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


def report_phase(phase: str) -> None:
    """Tell the launcher what this rank is doing now; a failed :func:`run` shows each rank's last phase.

    Call it at the boundaries of a rank's work ("loading the pipeline", "warm-up", "denoising step
    3/20"): if the launch fails, :class:`LaunchError` gives the phase each rank was in and for how
    long, which tells a rank that stalled while loading from one stuck at step 3. Cheap enough for
    every denoising step (one small file written and renamed). In a process that :func:`run` did not
    start (torchrun, a notebook, a single process) it does nothing.

    Args:
        phase: a short description, shown as is.

    Raises:
        TypeError: ``phase`` is not a string.
    """
    if not isinstance(phase, str):
        raise TypeError(f"phase must be a str, got {type(phase).__name__}")
    folder = os.environ.get(_LAUNCH_DIR_ENV)
    if not folder:
        return
    rank = int(os.environ.get("RANK", "0"))
    joined = dist.is_available() and dist.is_initialized()
    state = {"phase": phase, "since": time.time(), "joined": joined, "pid": os.getpid()}
    _write_json(Path(folder) / f"rank{rank}.phase.json", state)


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

    A failure names the rank that caused it and what it was doing (see the module docstring for how the
    ranks are told apart and how long each kind of failure takes to be reported). The ranks and the
    temporary folder are removed on every way out, SIGTERM to the launcher included.

    Args:
        target: ``"package.module:function"`` or ``"path/to/file.py:function"``. The function runs after
            the default group is initialised and returns a mapping of names to tensors or JSON values.
            It may call :func:`report_phase` to say what it is doing.
        nproc: number of ranks.
        kwargs: JSON-serialisable keyword arguments for the target.
        timeout_s: limit for the whole launch; past it every rank is stopped, and the ranks not waiting
            in torch.distributed are named as stalled (or as never joined).
        init_timeout_s: the process group's timeout: a collective that a stalled rank never enters raises
            on its peers after this long, and a rank that has not joined this long (plus 1 s) after the
            first rank began to join is named as never joined.
        backend: "gloo" or "nccl" (default: NCCL when there is a GPU per rank, else gloo).
        threads_per_process: OMP threads per rank (default: the CPU cores shared evenly, at least 1).
        env: extra environment variables for the ranks.

    Raises:
        ValueError: a bad target, count or timeout (before anything starts).
        LaunchError: a rank failed or the launch timed out; the message names the faulty rank, its phase
            and its traceback or stack, and ``error.ranks`` / ``error.faulty`` hold the same per rank.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if timeout_s <= 0 or init_timeout_s <= 0:
        raise ValueError(f"timeout_s and init_timeout_s must be > 0, got {timeout_s} and {init_timeout_s}")
    if ":" not in target:
        raise ValueError(f"target must be 'module:function' or 'file.py:function', got {target!r}")
    if threads_per_process is not None and threads_per_process < 1:
        raise ValueError(f"threads_per_process must be >= 1 or None, got {threads_per_process}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nproc else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    threads = threads_per_process or max(1, (os.cpu_count() or 1) // nproc)
    try:
        with _termination_raises() as termination:
            return _launch(
                target, nproc, dict(kwargs or {}), timeout_s, init_timeout_s, backend, threads, env or {}, termination
            )
    except _Terminated as stop:
        # The ranks and the folder are gone; now the signal does what it would have done without us.
        logger.warning("launch of %s stopped by %s; ranks and temporary folder removed", target, stop)
        handler = signal.getsignal(stop.signum)
        if callable(handler):
            handler(stop.signum, None)
        else:
            os.kill(os.getpid(), stop.signum)
        raise LaunchError(f"launch of {target} stopped by {stop}") from None


def _launch(
    target: str,
    nproc: int,
    kwargs: dict[str, Any],
    timeout_s: float,
    init_timeout_s: float,
    backend: str,
    threads: int,
    env: Mapping[str, str],
    termination: _TerminationRequest,
) -> LaunchResult:
    with tempfile.TemporaryDirectory(prefix="workbench-launch-", ignore_cleanup_errors=True) as folder:
        out_dir = Path(folder)
        (out_dir / "kwargs.json").write_text(json.dumps(kwargs))
        command = [sys.executable, "-m", "workbench.launch", "--target", target, "--out", str(out_dir)]
        command += ["--backend", backend, "--init-timeout", str(init_timeout_s)]
        port = free_port()
        child_env = {**os.environ, "OMP_NUM_THREADS": str(threads), **env, _LAUNCH_DIR_ENV: str(out_dir)}
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), child_env.get("PYTHONPATH")]))
        start = time.perf_counter()
        processes: list[subprocess.Popen] = []
        log_files = []
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
                log_files.append(open(out_dir / f"rank{rank}.log", "wb"))  # noqa: SIM115 (closed below)
                processes.append(
                    subprocess.Popen(
                        command,
                        stdout=log_files[-1],
                        stderr=subprocess.STDOUT,
                        env=rank_env,
                        start_new_session=True,  # its own process group, which _stop ends as a whole
                        preexec_fn=_die_with_parent(),
                    )
                )
            failure = _supervise(processes, out_dir, timeout_s, init_timeout_s, start, termination)
        finally:
            _stop(processes)
            for log_file in log_files:
                log_file.close()
        seconds = time.perf_counter() - start
        log = "\n".join(
            f"--- rank {r} ---\n" + (out_dir / f"rank{r}.log").read_text(errors="replace") for r in range(nproc)
        )
        if failure is not None:
            headline, reports = failure
            raise LaunchError(f"launch of {target} on {nproc} ranks {headline}" + _explain(reports), ranks=reports)
        results = [_read_result(out_dir / f"rank{rank}.safetensors") for rank in range(nproc)]
    return LaunchResult(results=results, seconds=seconds, log=log)


@contextlib.contextmanager
def _termination_raises() -> Iterator[_TerminationRequest]:
    """Catch SIGTERM and SIGHUP for the block, to raise :class:`_Terminated` once the ranks can be stopped.

    Python's default for both is to end the process at once, skipping every ``finally``: the ranks would
    live on (re-parented) and the temporary folder would stay. The handler only records the signal; the
    supervision loop raises it, and so does the end of the block, so a signal never cuts a clean-up
    short. Only the main thread can set handlers; a signal that is ignored stays ignored, and one whose
    handler Python cannot see (installed from C) is left alone.
    """
    request = _TerminationRequest()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            handler = signal.getsignal(signum)
            if handler is not None and handler is not signal.SIG_IGN:
                previous[signum] = handler
                signal.signal(signum, request.handle)
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    request.check()


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux SIGKILL the rank when the launcher dies, even by SIGKILL; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, launcher = 1, os.getpid()

    def set_parent_death_signal() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL))
        if os.getppid() != launcher:  # the launcher died before the request took hold
            os._exit(1)

    return set_parent_death_signal


def _supervise(
    processes: list[subprocess.Popen],
    folder: Path,
    timeout_s: float,
    init_timeout_s: float,
    start: float,
    termination: _TerminationRequest,
) -> tuple[str, list[RankReport]] | None:
    """Wait for all ranks; on a failure, a rendezvous past its timeout or the deadline, say who and why."""
    deadline = start + timeout_s
    while True:
        termination.check()
        codes = [process.poll() for process in processes]
        if all(code == 0 for code in codes):
            return None
        errors = [rank for rank in range(len(processes)) if (folder / f"rank{rank}.error.json").exists()]
        exited = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if errors or exited:
            grace = time.perf_counter() + _GRACE_S  # its peers usually fail at once ("connection closed by peer")
            while time.perf_counter() < grace and any(process.poll() is None for process in processes):
                time.sleep(_POLL_S)
            return "failed", _reports(processes, folder)
        if _late_to_join(folder, len(processes), init_timeout_s):
            return f"failed at the rendezvous (timeout {init_timeout_s:g} s)", _reports(processes, folder)
        if time.perf_counter() > deadline:
            return f"timed out after {timeout_s:g} s", _reports(processes, folder)
        time.sleep(_POLL_S)


def _late_to_join(folder: Path, nproc: int, init_timeout_s: float) -> list[int]:
    """Ranks not yet at the rendezvous although a peer has waited there longer than the group's timeout."""
    phases = [_read_json(folder / f"rank{rank}.phase.json") for rank in range(nproc)]
    waiting_since = [p["since"] for p in phases if p and p["phase"] == _JOINING and not p["joined"]]
    if not waiting_since or time.time() - min(waiting_since) < init_timeout_s + _JOIN_MARGIN_S:
        return []
    return [rank for rank, p in enumerate(phases) if not p or (not p["joined"] and p["phase"] != _JOINING)]


def _reports(processes: list[subprocess.Popen], folder: Path) -> list[RankReport]:
    """Each rank's state: its error or exit status if it ended, else its phase and Python stack."""
    nproc = len(processes)
    # Taken before the stack requests: SIGUSR1 can cut a blocking call short (a store connect returns
    # EINTR and raises), and that error is the launcher's doing, not the rank's.
    codes = [process.poll() for process in processes]
    errors = [_read_json(folder / f"rank{rank}.error.json") for rank in range(nproc)]
    stacks = _dump_stacks(
        [rank for rank in range(nproc) if codes[rank] is None and errors[rank] is None], processes, folder
    )
    now = time.time()
    reports = []
    for rank, (code, error) in enumerate(zip(codes, errors, strict=True)):
        phase = _read_json(folder / f"rank{rank}.phase.json")
        name, age = (phase["phase"], now - phase["since"]) if phase else (None, None)
        frames = _main_thread_frames(stacks.get(rank, ""))
        stack = "\n".join(_format_frame(frame) for frame in frames)
        if error is not None:
            state: RankState = "failed_in_collective" if error["communication"] else "raised"
            verb = "failed inside torch.distributed with" if error["communication"] else "raised"
            summary = f"{verb} {error['type']}: {_first_line(error['message'])}"
            reports.append(RankReport(rank, state, name, age, summary, error["traceback"], code))
        elif code == 0:
            reports.append(RankReport(rank, "finished", name, age, "finished", "", code))
        elif code is not None:
            summary = f"died ({_describe_status(code)}) with no Python traceback"
            reports.append(RankReport(rank, "died", name, age, summary, _tail(folder / f"rank{rank}.log"), code))
        elif not (phase and phase["joined"]):
            if name == _JOINING:
                summary, state = "was waiting for the others to join the group", "waiting_to_join"
            else:
                started = "" if phase else " (had not reached the launch worker: still starting Python)"
                summary, state = f"never joined the group{started}", "never_joined"
            reports.append(RankReport(rank, state, name, age, summary, stack, None))
        else:
            where = _format_frame(frames[0]) if frames else "an unknown place (no stack)"
            if frames and _waits_in_torch_distributed(frames[0]):
                state, summary = "waiting_in_collective", f"was waiting in torch.distributed at {where}"
            else:
                state, summary = "stalled", f"stalled: alive and not in a collective, at {where}"
            reports.append(RankReport(rank, state, name, age, summary, stack, None))
    return reports


def _explain(reports: list[RankReport]) -> str:
    """The faulty ranks first (or, when none stands out, every rank), then each rank's one line, then details."""
    named = _faulty(reports) or tuple(r for r in reports if r.state != "finished") or tuple(reports)
    lines = [": " + "; ".join(r.describe() for r in named)]
    lines += [f"  {r.describe()}" for r in reports]
    lines += [f"--- rank {r.rank} ({r.state}) ---\n{r.detail.rstrip()}" for r in named if r.detail.strip()]
    return "\n".join(lines)


def _dump_stacks(ranks: list[int], processes: list[subprocess.Popen], folder: Path) -> dict[int, str]:
    """Ask these live ranks for their Python stacks (those that already answer SIGUSR1); what each wrote."""
    asked = {}
    for rank in ranks:
        stack_file = folder / f"rank{rank}.stack.txt"
        # A rank writes its phase only once faulthandler listens: before that, SIGUSR1 would kill it.
        if stack_file.exists() and (folder / f"rank{rank}.phase.json").exists():
            asked[rank] = stack_file.stat().st_size
            with contextlib.suppress(ProcessLookupError):
                os.kill(processes[rank].pid, signal.SIGUSR1)
    until = time.perf_counter() + _STACK_WAIT_S
    stacks: dict[int, str] = {}
    while asked and time.perf_counter() < until:
        time.sleep(_POLL_S)
        for rank, offset in list(asked.items()):
            with open(folder / f"rank{rank}.stack.txt", errors="replace") as handle:
                handle.seek(offset)
                text = handle.read()
            if text and text == stacks.get(rank):  # unchanged since the last look: the dump is complete
                del asked[rank]
            stacks[rank] = text
    return stacks


def _main_thread_frames(dump: str) -> list[tuple[str, int, str]]:
    """The frames ``(file, line, function)``, innermost first, of the thread running the worker."""
    blocks = re.split(r"\n\s*(?=(?:Current thread|Thread) 0x)", dump.strip())
    block = next((b for b in blocks if " in _worker" in b), blocks[0])
    frames = re.findall(r'^\s*File "(.*)", line (\d+) in (.*)$', block, flags=re.MULTILINE)
    return [(path, int(line), function.strip()) for path, line, function in frames]


def _format_frame(frame: tuple[str, int, str]) -> str:
    path, line, function = frame
    return f"{path}:{line} in {function}"


def _waits_in_torch_distributed(frame: tuple[str, int, str]) -> bool:
    """Whether a frame is inside torch.distributed or on a line that waits on a ``Work`` handle."""
    path, line, _ = frame
    return path.startswith(_TORCH_DISTRIBUTED_DIR) or ".wait(" in linecache.getline(path, line)


def _stop(processes: list[subprocess.Popen]) -> None:
    """End every rank's process group: SIGTERM, then SIGKILL for what is left; wait for the ranks."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in processes:
            # Also after the rank itself exited: anything it started may still be in its group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)
        until = time.perf_counter() + _TERM_WAIT_S
        while any(process.poll() is None for process in processes) and time.perf_counter() < until:
            time.sleep(_POLL_S)
        if all(process.poll() is not None for process in processes):
            return
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=_TERM_WAIT_S)


def _describe_status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _first_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


def _tail(path: Path, lines: int = 20) -> str:
    text = path.read_text(errors="replace").strip() if path.exists() else ""
    return "its output ends:\n" + "\n".join(text.splitlines()[-lines:]) if text else ""


def _write_json(path: Path, value: Mapping[str, Any]) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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


def _is_communication_error(error: BaseException) -> bool:
    """A torch.distributed error, a gloo/c10d message, or anything raised inside torch.distributed."""
    if isinstance(error, dist.DistError) or _GLOO_OR_C10D.search(str(error)):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(_TORCH_DISTRIBUTED_DIR)


@contextlib.contextmanager
def _answers_stack_requests(out: Path, rank: int) -> Iterator[None]:
    """For the block, SIGUSR1 makes this rank append every thread's Python stack to its stack file."""
    # Appending: the launcher reads from the size it saw before it asked.
    with open(out / f"rank{rank}.stack.txt", "a") as stack_file:
        # Ignored underneath, so a request that comes after the dump handler is gone cannot kill the rank.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
        try:
            report_phase(_STARTING)  # tells the launcher that this rank now answers SIGUSR1
            yield
        finally:
            faulthandler.unregister(signal.SIGUSR1)  # back to ignoring it


def _worker(argv: Sequence[str]) -> None:
    """A rank of :func:`run`: import the target, join the group, call it, write its result or traceback."""
    parser = argparse.ArgumentParser(prog="python -m workbench.launch")
    parser.add_argument("--target", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--init-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    with _answers_stack_requests(args.out, rank):
        try:
            report_phase(_IMPORTING)
            function = _resolve(args.target)  # import errors surface before anyone waits for this rank
            kwargs = json.loads((args.out / "kwargs.json").read_text())
            report_phase(_JOINING)
            init_distributed(backend=args.backend, timeout_s=args.init_timeout)
            report_phase(_RUNNING)
            result = function(**kwargs)
            report_phase(_WRITING)
            _write_result(args.out / f"rank{rank}.safetensors", result)
        except BaseException as error:
            report = {
                "type": type(error).__qualname__,
                "message": str(error),
                "traceback": traceback.format_exc(),
                "communication": _is_communication_error(error),
                "time": time.time(),
            }
            _write_json(args.out / f"rank{rank}.error.json", report)
            raise
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1:])
