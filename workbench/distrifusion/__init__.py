"""DistriFusion: displaced patch parallelism for diffusers UNets (Li et al., CVPR 2024, arXiv 2402.19481).

The idea: split the latent into N row patches, one per device. Convolutions need a few rows of their
neighbours, self-attention the keys and values of the whole image, GroupNorm the whole image's statistics.
Because the inputs of consecutive denoising steps are nearly the same, each device can use the *previous*
step's activations of the other patches (stale, "displaced") and gather this step's asynchronously, hiding
communication behind computation (Sec. 4.1); GroupNorm's statistics get a correction (Sec. 4.2).

=========================  ==================================================================================
module                     what it holds
=========================  ==================================================================================
``config``                 :class:`PatchParallelConfig` (mode, warm-up, batch split), the rank layout
``layers``                 halo convolution, whole-image GroupNorm, K/V-gathering self-attention processor
``comm``                   all-gather backends: torch.distributed (gloo/NCCL) and the one-process simulator
``parallel``               the context managers: :func:`parallelize` (any backend), :func:`patch_parallel`
``agreement``              what the ranks compare (config, weights, every UNet argument, the number of calls)
``simulate``               :func:`simulate_patch_parallel` (N ranks in one process), :func:`measure_staleness`
``runner``                 whole generations: :func:`generate`, :func:`sample_images`, :func:`launch_generation`
``compare``                patch-parallel images against the single-device one (PSNR, bytes per step)
``experiment``             the notebook's staleness experiment and the reproduction report's section
``cli``                    ``torchrun --nproc_per_node=N -m workbench distrifusion ...``
=========================  ==================================================================================

The method is ``config``, ``comm``, ``layers``, ``parallel`` (with ``agreement``) and ``simulate``; the rest
runs it. What one rank computes, its modelled speed-up and where its time goes are measured by
:mod:`workbench.benchmarks.distrifusion` (``python -m workbench bench distrifusion``).

Symbols: N devices (``world_size``), patch i (``patch_index``), step t (``step``), layer l's activation of
patch i at step t A_t^(l,i), the warm-up (``warmup_steps``) of synchronous steps after step 0.
"""

from workbench.distrifusion.config import MODES, Mode, PatchLayout, PatchParallelConfig, resolve_layout
from workbench.distrifusion.layers import check_supported
from workbench.distrifusion.parallel import PatchParallelRun, parallelize, patch_parallel
from workbench.distrifusion.runner import GenerationResult, generate, launch_generation, sample_images
from workbench.distrifusion.simulate import StalenessRecord, measure_staleness, simulate_patch_parallel

__all__ = [
    "MODES",
    "GenerationResult",
    "Mode",
    "PatchLayout",
    "PatchParallelConfig",
    "PatchParallelRun",
    "StalenessRecord",
    "check_supported",
    "generate",
    "launch_generation",
    "measure_staleness",
    "parallelize",
    "patch_parallel",
    "resolve_layout",
    "sample_images",
    "simulate_patch_parallel",
]
