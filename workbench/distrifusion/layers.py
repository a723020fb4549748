"""Patch-parallel layers: halo convolution, whole-image GroupNorm, self-attention over all patches' K/V.

DistriFusion (Li et al., CVPR 2024, arXiv 2402.19481) splits the latent into N row patches, one per device
(Sec. 4.1). Three kinds of layer need the other patches (Sec. 4.2, "sparse operations"):

* a convolution with kernel > 1 needs ``padding`` rows above and below its patch (a *halo*);
* self-attention needs keys and values of the whole image (queries stay local);
* GroupNorm needs the statistics of the whole image.

Each exchange is an all-gather. In a synchronous step the gathered data is fresh (the result equals the
single-device UNet). In an asynchronous step a layer uses what was gathered *in the previous step*
(stale, "displaced") for the other patches and its own fresh data for its patch, and starts the gather of
its fresh data with ``async_op=True``; the next step waits on it, so communication overlaps the rest of
the UNet. GroupNorm's *corrected asynchronous* statistic (Sec. 4.2) is

    E[A_t] ~ E[A_{t+1}] + (E[A_t^(i)] - E[A_{t+1}^(i)])

for both E[x] and E[x^2]: the stale global moment plus the change of this patch's own moment. A
negative variance falls back to the patch's own variance, as in the official code.

The layers wrap the stock modules (``nn.Conv2d``, ``nn.GroupNorm``) or act as an attention processor on
the stock diffusers ``Attention``; :func:`install` puts them in and returns the function that takes them
out. Symbols: A_t^(l,i) is layer l's activation of patch i at step t; "halo" is the ``padding`` rows next
to a patch; P is the number of patches one process computes (1 on a real rank, N in the simulator).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from workbench.distrifusion.comm import PatchComm, PendingGather
from workbench.distrifusion.config import Mode

__all__ = [
    "HaloConv2d",
    "LayerContext",
    "PatchGroupNorm",
    "PatchSelfAttnProcessor",
    "check_supported",
    "count_downsamples",
    "install",
    "is_self_attention",
]

Phase = Literal["sync", "async", "frozen", "local"]

# Module types that mix rows in ways the patch layers do not handle.
_UNSUPPORTED_TYPES = (nn.ConvTranspose2d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.Upsample, nn.AdaptiveAvgPool2d)
_UNSUPPORTED_NAMES = {
    "FirUpsample2D",
    "FirDownsample2D",
    "KUpsample2D",
    "KDownsample2D",
    "AdaGroupNorm",
    "SpatialNorm",
    "ResnetBlockCondNorm2D",
    "GLIGENTextBoundingboxProjection",
}


@dataclass
class LayerContext:
    """What the patch layers share during one UNet call (set by the runner before each call).

    Attributes:
        mode: the config's mode.
        warmup_steps: synchronous calls after call 0.
        comm: the communicator of the current layout.
        step: index of the current UNet call within the run (0-based).
        input_rows: for the first convolution, the UNet's input rows with its halo, (P * b, C, h + 2p, W)
            per padding p, cut from the replicated input: that layer needs no exchange.
    """

    mode: Mode
    warmup_steps: int
    comm: PatchComm | None = None
    step: int = 0
    input_rows: dict[int, torch.Tensor] = field(default_factory=dict)

    def _synchronous(self) -> bool:
        return self.mode in ("full_sync",) or self.step <= self.warmup_steps

    def activation_phase(self) -> Phase:
        """How convolution halos and attention K/V are exchanged in this call."""
        if self._synchronous():
            return "sync"
        return "frozen" if self.mode == "no_sync" else "async"

    def norm_phase(self) -> Phase | Literal["corrected", "stale"]:
        """How GroupNorm statistics are exchanged in this call."""
        if self._synchronous() or self.mode == "sync_gn":
            return "sync"
        if self.mode == "corrected_async_gn":
            return "corrected"
        if self.mode == "stale_gn":
            return "stale"
        return "local"  # separate_gn, no_sync

    def require_comm(self) -> PatchComm:
        if self.comm is None:
            raise RuntimeError("patch-parallel layers were called outside a patch-parallel UNet call")
        return self.comm


class _Exchanger:
    """One layer's all-gather state: the last gathered tensor and the gather still in flight."""

    def __init__(self, kind: str):
        self.kind = kind
        self.stale: torch.Tensor | None = None
        self.pending: PendingGather | None = None

    def sync(self, comm: PatchComm, fresh: torch.Tensor) -> torch.Tensor:
        """Gather now; the result is fresh and also serves the next asynchronous step."""
        self.finish()
        self.stale = comm.all_gather(fresh, kind=self.kind).wait()
        return self.stale

    def displaced(self, comm: PatchComm, fresh: torch.Tensor) -> torch.Tensor:
        """The previous step's gather; start this step's gather in the background."""
        previous = self.latest(fresh)
        self.pending = comm.all_gather(fresh, kind=self.kind, async_op=True)
        return previous

    def latest(self, fresh: torch.Tensor) -> torch.Tensor:
        """The last completed gather (waiting for one in flight), checked against ``fresh``'s shape."""
        self.finish()
        if self.stale is None:
            raise RuntimeError("an asynchronous step ran before any synchronous one (no stale activations)")
        if self.stale.shape[2:] != fresh.shape[1:] or self.stale.shape[0] != fresh.shape[0]:
            raise RuntimeError(
                f"activation shape changed within a run ({tuple(self.stale.shape[2:])} -> {tuple(fresh.shape[1:])});"
                " reset the run between generations of different sizes"
            )
        return self.stale

    def finish(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.stale = pending.wait()

    def reset(self) -> None:
        self.finish()
        self.stale = None


def _own_slot(gathered: torch.Tensor, comm: PatchComm) -> torch.Tensor:
    """Each local patch's own slot of a gathered (P, Np, ...) tensor, (P, ...); a view on a real rank."""
    if comm.num_local == 1:
        return gathered[:, comm.patch_rows[0]]
    return gathered[comm.own_slots]


def _with_own(gathered: torch.Tensor, fresh: torch.Tensor, comm: PatchComm) -> torch.Tensor:
    """``gathered`` (P, Np, ...) with each local patch's own slot replaced by its fresh value (P, ...)."""
    out = gathered.clone()
    out[comm.own_slots] = fresh
    return out


def _neighbour_rows(gathered: torch.Tensor, patch_rows: list[int], offset: int, rows: slice) -> torch.Tensor:
    """For each local patch, ``rows`` of the patch ``offset`` away (zeros past the image's edge), stacked (P * b, ...).

    ``gathered`` is (P, Np, b, ...). Plain indexing with Python ints: on a real rank (P = 1) this is a view,
    not a gather.
    """
    num_patches = gathered.shape[1]
    parts = [
        gathered[k, i + offset, ..., rows, :] if 0 <= i + offset < num_patches else None
        for k, i in enumerate(patch_rows)
    ]
    if any(part is None for part in parts):
        zeros = gathered.new_zeros(gathered[0, 0, ..., rows, :].shape)
        parts = [zeros if part is None else part for part in parts]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class HaloConv2d(nn.Module):
    """A ``nn.Conv2d`` on a row patch: the rows above and below come from the neighbouring patches.

    The stock convolution's vertical zero padding is replaced by ``padding`` real rows of the neighbours
    (zeros only at the image's top and bottom), so the output rows equal the single-device ones; a stride
    of 2 works when the patch's first row and height are even. Width padding is unchanged.

    Args:
        conv: the stock convolution (its parameters are used, not copied).
        context: the shared :class:`LayerContext`.
        is_input_conv: the UNet's first convolution, whose halo is cut from the replicated input.
    """

    def __init__(self, conv: nn.Conv2d, context: LayerContext, *, is_input_conv: bool = False):
        super().__init__()
        self.conv = conv
        self.context = context
        self.is_input_conv = is_input_conv
        self.halo = conv.padding[0]
        self.exchanger = _Exchanger("halo")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        comm = self.context.require_comm()
        p, stride = self.halo, self.conv.stride[0]
        _, channels, height, width = x.shape
        if height < p:
            raise ValueError(f"a patch of {height} rows is thinner than the convolution's halo of {p} rows")
        if height % stride:
            raise ValueError(f"a patch of {height} rows cannot be strided by {stride}")
        rows = self.context.input_rows.get(p) if self.is_input_conv else None
        if rows is not None and torch.equal(rows[:, :, p : p + height], x):
            return self._conv(rows)
        edges = torch.cat([x[..., :p, :], x[..., height - p :, :]], dim=-2)
        fresh = edges.view(comm.num_local, -1, channels, 2 * p, width)  # each patch's top and bottom p rows
        phase = self.context.activation_phase()
        if phase == "sync":
            gathered = self.exchanger.sync(comm, fresh)
        elif phase == "async":
            gathered = self.exchanger.displaced(comm, fresh)
        else:
            gathered = self.exchanger.latest(fresh)
        # gathered is (P, Np, b, C, 2p, W): above a patch are the bottom rows of the one before it
        above = _neighbour_rows(gathered, comm.patch_rows, -1, slice(p, None))
        below = _neighbour_rows(gathered, comm.patch_rows, +1, slice(None, p))

        # One taller input and one convolution: measured faster than the stock convolution plus two thin
        # edge-slab convolutions for the boundary rows (those fall to a slow im2col path on CPU).
        return self._conv(torch.cat([above, x, below], dim=-2))

    def _conv(self, extended: torch.Tensor) -> torch.Tensor:
        """The convolution over rows that already carry their halo (no vertical padding)."""
        conv = self.conv
        return F.conv2d(extended, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups)

    def reset(self) -> None:
        self.exchanger.reset()


class PatchGroupNorm(nn.Module):
    """``nn.GroupNorm`` with whole-image statistics (biased variance, fp32 accumulation).

    Each patch computes per-group mean and variance; patches are the same size, so the whole-image
    mean is the mean of the means and the variance is the mean of the variances plus the variance of the
    means (exact, without E[x^2] - E[x]^2 cancellation). The corrected asynchronous mode works on the
    moments E[x], E[x^2] as the paper does, so a patch sends (E[x], Var[x] + eps, E[x^2] + eps): the
    variance with GroupNorm's eps added is what the fused statistics pass gives (1 / rstd^2) and what the
    normalisation takes (with eps 0).

    Two passes over the activation, as few as the exchange allows: one fused pass for the patch's
    statistics (``torch.native_group_norm``), one that normalises with the whole-image statistics and
    applies the affine (``batch_norm`` in inference mode, one running mean and variance per
    sample-channel). The arithmetic on the statistics is kept to a few ops: on a CPU each costs about as
    much as a pass over a small patch.
    """

    def __init__(self, norm: nn.GroupNorm, context: LayerContext):
        super().__init__()
        self.norm = norm
        self.context = context
        self.exchanger = _Exchanger("gn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        comm = self.context.require_comm()
        norm = self.norm
        phase = self.context.norm_phase()
        if phase == "local":
            return norm(x)
        batch, channels = x.shape[:2]
        groups = norm.num_groups
        full = x if x.dtype == torch.float32 else x.float()
        size = math.prod(x.shape[2:])
        _, mean, rstd = torch.native_group_norm(full, None, None, batch, channels, size, groups, norm.eps)
        var = rstd.pow(-2)  # + eps
        local = torch.stack([mean, var, torch.addcmul(var, mean, mean)], dim=-1).view(comm.num_local, -1, groups, 3)
        if phase == "sync":
            mean, var = _combine(self.exchanger.sync(comm, local))
        elif phase == "stale":
            mean, var = _combine(_with_own(self.exchanger.displaced(comm, local), local, comm))
        else:  # corrected
            mean, var = _corrected(self.exchanger.displaced(comm, local), local, comm, eps=norm.eps)
        # (2, P * b * G) -> (2, b * C), contiguous (batch_norm is ~4x slower on strided statistics)
        per_channel = torch.stack([mean.reshape(-1), var.reshape(-1)])
        if channels > groups:
            per_channel = per_channel.repeat_interleave(channels // groups, dim=1)
        mean, var = per_channel
        y = F.batch_norm(full.reshape(1, batch * channels, size), mean, var, *self._affine(batch), False, 0.0, 0.0)
        return y.view(x.shape) if y.dtype == x.dtype else y.view(x.shape).to(x.dtype)

    def _affine(self, batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The per-channel weight and bias as float32 per sample-channel, (b * C,) (the parameters at b = 1)."""
        norm = self.norm
        if not norm.affine:
            return None, None
        weight, bias = norm.weight, norm.bias
        if weight.dtype != torch.float32:
            weight, bias = weight.float(), bias.float()
        return (weight, bias) if batch == 1 else (weight.repeat(batch), bias.repeat(batch))

    def reset(self) -> None:
        self.exchanger.reset()


def _combine(gathered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-image mean and variance + eps, (P, b, G) each, from equal-size patches' statistics (P, Np, b, G, 3).

    The mean of the means, and the mean of the variances plus the variance of the means.
    """
    means = gathered[..., 0]
    return means.mean(dim=1), gathered[..., 1].mean(dim=1) + means.var(dim=1, correction=0)


def _corrected(
    stale: torch.Tensor, fresh: torch.Tensor, comm: PatchComm, *, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrected asynchronous GroupNorm (Sec. 4.2): stale global moments + (fresh - stale) own moments.

    From (P, Np, b, G, 3) stale and (P, b, G, 3) fresh statistics (E[x], Var[x] + eps, E[x^2] + eps) to the
    mean and variance + eps, (P, b, G) each: E[x] = mean_j E[x]_j + (E[x] - E[x]_own), the same for
    E[x^2], the stale values indexed j and own, this step's unindexed. A negative variance estimate falls
    back to this step's own variance.
    """
    estimate = stale.mean(dim=1) + (fresh - _own_slot(stale, comm))
    mean, second = estimate[..., 0], estimate[..., 2]
    var = second.addcmul_(mean, mean, value=-1.0)
    return mean, torch.where(var < eps, fresh[..., 1], var)


class PatchSelfAttnProcessor:
    """Self-attention of a row patch's queries over the keys and values of the whole image.

    A processor for the stock diffusers ``Attention`` (the computation of ``AttnProcessor2_0``): the
    patch's K and V are concatenated, all-gathered and laid out in token order (row patches of a
    row-major flattening are contiguous token ranges). In asynchronous steps the other patches' K/V are
    the previous step's, so (N-1)/N of the keys are stale.
    """

    def __init__(self, context: LayerContext):
        self.context = context
        self.exchanger = _Exchanger("kv")

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("a patch-parallel self-attention layer was given encoder_hidden_states")
        if attention_mask is not None:
            raise ValueError("attention masks are not supported under patch parallelism")
        comm = self.context.require_comm()
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        key_dim = key.shape[-1]
        fresh = torch.cat([key, value], dim=-1).reshape(comm.num_local, batch // comm.num_local, tokens, -1)
        phase = self.context.activation_phase()
        if phase == "sync":
            gathered = self.exchanger.sync(comm, fresh)
        elif phase == "async":
            gathered = _with_own(self.exchanger.displaced(comm, fresh), fresh, comm)
        else:
            gathered = _with_own(self.exchanger.latest(fresh), fresh, comm)
        # (P, Np, b, L, 2D) -> (P * b, Np * L, 2D): patches in row order are the image's token order.
        full = gathered.permute(0, 2, 1, 3, 4).reshape(batch, comm.num_patches * tokens, -1)
        key, value = full[..., :key_dim], full[..., key_dim:]

        head_dim = key_dim // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.reshape(batch, -1, attn.heads, value.shape[-1] // attn.heads).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, dropout_p=0.0, is_causal=False, scale=attn.scale
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * value.shape[-1])
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def reset(self) -> None:
        self.exchanger.reset()


def is_self_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a diffusers ``Attention`` over the image's own tokens (``attn1``), the kind that
    needs the keys and values of every patch; cross-attention (``attn2``) reads the prompt and stays local."""
    return isinstance(module, Attention) and not module.is_cross_attention


def check_supported(unet: nn.Module) -> list[str]:
    """Problems that stop ``unet`` from running patch-parallel (an empty list when it can).

    Supported: ``nn.Conv2d`` with "same" vertical padding (including stride-2 downsamplers), nearest
    upsampling and average pooling, ``nn.GroupNorm``, self-attention through ``AttnProcessor2_0`` or
    ``AttnProcessor``, cross-attention through any processor, and per-pixel layers.
    """
    problems = []
    for name, module in unet.named_modules():
        label = f"{name or '<root>'} ({type(module).__name__})"
        if isinstance(module, _UNSUPPORTED_TYPES) or type(module).__name__ in _UNSUPPORTED_NAMES:
            problems.append(f"{label}: this layer type mixes rows and has no patch-parallel version")
        elif isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                problems.append(f"{label}: padding must be integer zero padding, got {module.padding!r}")
            elif (module.kernel_size[0] - 1) * module.dilation[0] != 2 * module.padding[0]:
                problems.append(
                    f"{label}: only 'same' vertical padding is supported, got kernel "
                    f"{module.kernel_size}, padding {module.padding}"
                )
        elif isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
            if module.kernel_size != module.stride or module.padding not in (0, (0, 0)):
                problems.append(f"{label}: only non-overlapping pooling is supported")
        elif isinstance(module, Downsample2D) and module.use_conv and module.padding == 0:
            problems.append(f"{label}: padding=0 pads the bottom row of the whole image only")
        elif isinstance(module, ResnetBlock2D):
            for resample in (module.upsample, module.downsample):
                if resample is not None and not isinstance(resample, (Upsample2D, Downsample2D, functools.partial)):
                    problems.append(f"{label}: FIR resampling is not supported")
        elif isinstance(module, Attention):
            if module.spatial_norm is not None or module.added_kv_proj_dim is not None:
                problems.append(f"{label}: attention with spatial norm or added K/V is not supported")
            elif is_self_attention(module) and type(module.processor) not in (AttnProcessor2_0, AttnProcessor):
                problems.append(
                    f"{label}: self-attention processor {type(module.processor).__name__} is not supported "
                    "(use the default AttnProcessor2_0)"
                )
    return problems


def count_downsamples(unet: nn.Module) -> int:
    """Number of stride-2 levels of a diffusers UNet (down blocks with a downsampler)."""
    return sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))


def install(unet: nn.Module, context: LayerContext) -> tuple[list, Callable[[], None]]:
    """Swap in the patch layers; returns (the layers, a function that restores the stock modules).

    Convolutions with kernel > 1 become :class:`HaloConv2d`, every ``nn.GroupNorm`` a
    :class:`PatchGroupNorm`, and self-attention modules get a :class:`PatchSelfAttnProcessor`.
    """
    problems = check_supported(unet)
    if problems:
        raise TypeError("the UNet cannot run patch-parallel:\n  " + "\n  ".join(problems))
    input_conv = getattr(unet, "conv_in", None)
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    processors: list[tuple[Attention, object]] = []
    layers: list = []
    wrapped: dict[int, nn.Module] = {}
    for parent in list(unet.modules()):
        for child_name, child in list(parent._modules.items()):
            replacement = None
            if id(child) in wrapped:  # the same module under two names (Downsample2D.conv / .Conv2d_0)
                replacement = wrapped[id(child)]
            elif isinstance(child, nn.Conv2d) and child.padding[0] > 0:
                replacement = HaloConv2d(child, context, is_input_conv=child is input_conv)
            elif isinstance(child, nn.GroupNorm):
                replacement = PatchGroupNorm(child, context)
            if replacement is None:
                continue
            if id(child) not in wrapped:
                wrapped[id(child)] = replacement
                layers.append(replacement)
            swaps.append((parent, child_name, child))
            setattr(parent, child_name, replacement)
    for module in unet.modules():
        if isinstance(module, Attention) and is_self_attention(module):
            processor = PatchSelfAttnProcessor(context)
            processors.append((module, module.processor))
            module.set_processor(processor)
            layers.append(processor)

    def restore() -> None:
        for parent, child_name, child in reversed(swaps):
            setattr(parent, child_name, child)
        for module, processor in processors:
            module.set_processor(processor)

    return layers, restore
