"""Saving and loading: zoo models as safetensors + JSON config, training state for resume.

Everything goes through safetensors (no pickle). A training state file holds the model weights, any
extra modules (an EMA copy), the optimizer's moments, and in its metadata the optimizer's hyper-parameters,
the learning-rate schedule, the data RNG state and the step, so a killed run resumes where it stopped.

A state also carries its *segments*: one entry per run that trained it, with the step it started from
and the run's settings. A killed run resumed with the same settings stays one segment; a finished
model trained further with a longer schedule (``--steps 6000`` on a 3000-step state) gets a second
segment, so ``training.json`` says exactly how the shipped weights came about.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = ["continue_segments", "load_training_state", "read_segments", "save_model", "save_training_state"]


def save_model(model, out_dir: str | Path, *, training: Mapping | None = None, dtype=torch.float16) -> Path:
    """``save_pretrained`` a diffusers model in ``dtype`` (fp16 halves the size) plus ``training.json``."""
    out_dir = Path(out_dir)
    copy.deepcopy(model).to(dtype).save_pretrained(out_dir, safe_serialization=True)
    if training is not None:
        (out_dir / "training.json").write_text(json.dumps(dict(training), indent=2) + "\n")
    return out_dir


def save_training_state(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    rng: np.random.Generator,
    step: int,
    *,
    extra_modules: Mapping[str, torch.nn.Module] | None = None,
    segments: list[dict] | None = None,
) -> None:
    """Write everything a resume needs to one safetensors file (atomically), with the run's ``segments``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for name, module in (extra_modules or {}).items():
        tensors.update({f"{name}.{k}": v.detach().contiguous() for k, v in module.state_dict().items()})
    optimizer_state = optimizer.state_dict()
    for param_id, state in optimizer_state["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{param_id}.{key}"] = torch.as_tensor(value).detach().contiguous()
    metadata = {
        "step": str(step),
        "param_groups": json.dumps(optimizer_state["param_groups"]),
        "schedule": json.dumps(schedule.state_dict()),
        "rng": json.dumps(rng.bit_generator.state),
        "segments": json.dumps(segments or []),
    }
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def load_training_state(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    rng: np.random.Generator,
    *,
    extra_modules: Mapping[str, torch.nn.Module] | None = None,
) -> int:
    """Restore a state written by :func:`save_training_state`; returns the step (0 when there is none)."""
    path = Path(path)
    if not path.exists():
        return 0
    tensors, metadata = _read_state(path, with_tensors=True)

    def take(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        model.load_state_dict(take("model."))
        for name, module in (extra_modules or {}).items():
            module.load_state_dict(take(f"{name}."))
    except RuntimeError as error:
        raise ValueError(f"training state {path} does not match the model ({error})") from error
    state: dict[int, dict] = {}
    for key, value in take("optimizer.").items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    schedule.load_state_dict(json.loads(metadata["schedule"]))
    rng.bit_generator.state = json.loads(metadata["rng"])
    return int(metadata["step"])


def _read_state(path: Path, *, with_tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A training state's tensors (when asked) and metadata, in one open; a corrupt file is a ValueError."""
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()} if with_tensors else {}  # noqa: SIM118 (not iterable)
            return tensors, f.metadata()
    except (SafetensorError, OSError) as error:
        raise ValueError(f"training state {path} is corrupt ({error}); delete it to start from scratch") from error


def read_segments(path: str | Path) -> list[dict]:
    """The segments recorded in a training state (``[]`` when there is no state).

    States written before segments were kept get one segment ``{"from_step": 0, "to_step": step}``.
    """
    path = Path(path)
    if not path.exists():
        return []
    _, metadata = _read_state(path, with_tensors=False)
    if "segments" in metadata:
        return json.loads(metadata["segments"])
    return [{"from_step": 0, "to_step": int(metadata["step"])}]


def continue_segments(path: str | Path, start: int, settings: Mapping) -> list[dict]:
    """The segments after this run starts at ``start`` with ``settings`` (e.g. ``{"steps": 6000}``).

    A resume with the settings of the last segment continues it; anything else opens a new segment.
    """
    segments = read_segments(path) if start > 0 else []
    current = {"from_step": start, **settings}
    if segments and {k: v for k, v in segments[-1].items() if k != "from_step"} == dict(settings):
        return segments
    return [*segments, current]
