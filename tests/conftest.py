"""Shared fixtures: quick mode on, tiny random diffusers models built from configs (no downloads)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WORKBENCH_QUICK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_sd_pipeline(tmp_path_factory):
    """A tiny random StableDiffusionPipeline, round-tripped through save_pretrained/from_pretrained."""
    from workbench.testing import tiny_stable_diffusion_pipeline

    return tiny_stable_diffusion_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline(tmp_path_factory):
    """A tiny random StableDiffusionXLPipeline (two text encoders, text/time conditioning), round-tripped."""
    from workbench.testing import tiny_stable_diffusion_xl_pipeline

    return tiny_stable_diffusion_xl_pipeline(tmp_path_factory.mktemp("tiny-sdxl"))
