"""Method `dynamic`: per layer and step, apply the LoRA whose output diverges more (KL) from the base output.

This is the Feature-Level Selection of "Dynamic Training-Free Fusion of Subject and Style LoRAs"
(design: dynamic-fusion.md §2.2). Unlike K-LoRA the choice depends on the live activations, so it cannot be
merged into the weights: each managed module gets a per-instance forward hook that computes both low-rank
deltas from the module's input, compares their divergence from the base output and adds the chosen one.

Choices made here (the paper leaves them open):

* distributions: softmax over the output channels per token (per pixel for convolutions), fp32, temperature τ;
* divergence: KL(p_base ‖ p_lora), or, with ``direction="symmetric"``, Jeffreys' J = KL(p0‖p) + KL(p‖p0)
  = Σ (p0 − p)(log p0 − log p). Jeffreys rather than Jensen-Shannon because it is ≥ the forward KL, costs
  one extra exp and needs no mixture distribution;
* reduction: mean over tokens and batch, one decision per (pass, step, layer) shared by every UNet call of
  the step. With batched CFG (one call holding cond and uncond rows) the decision covers cond + uncond;
  with separate calls the first call of the step (the cond rows) decides and later calls reuse it.
  ``per_sample=True`` instead decides per batch row on every call (cond and uncond rows may disagree);
* larger divergence wins, ties go to the subject; the hybrid option multiplies the style divergence by
  K-LoRA's S(r), like fusion/plan.py's rule "subject iff S_subject ≥ S(r) · S_style";
* token subsample (``max_tokens``, default 256 per sample): the mean divergence is estimated on a strided
  subset of tokens; the chosen delta is still applied to every token. Three softmaxes and two KL
  reductions over every token cost more than the layer's own matmul at SD1.5 widths (320 channels), so
  deciding on all tokens would more than double a step; 256 tokens per sample (512 with CFG) estimate a
  mean well enough that only near-ties, where either choice is fine, can flip. ``max_tokens=None`` is
  the exact mean. bench/dynamic_bench.py measures both;
* the result is ``out + delta`` out of place by default; hosts whose layer outputs are fresh tensors (plain
  Linear/Conv2d forwards under no_grad) pass ``in_place=True`` to `install_hooks`, which accumulates the
  chosen delta into the output with one in-place GEMM instead.

Host-free: nothing here imports the WebUI. Hosts feed `DynamicSelector` the pass and step, and install the
hooks with `install_hooks`.
"""

from __future__ import annotations

import logging
import math
from typing import Literal, cast

import torch
from torch import Tensor

from lib_klora.fusion.options import STYLE, SUBJECT

log = logging.getLogger(__name__)

Direction = Literal["forward", "symmetric"]
DIRECTIONS: tuple[str, ...] = ("forward", "symmetric")
LABELS: tuple[str, str] = ("subject", "style")
DEFAULT_MAX_TOKENS: int | None = 256  # per sample; see the module docstring and bench/dynamic_bench.py

Choice = int | Tensor

# ---------------------------------------------------------------- divergence and rule


def check_direction(direction: str) -> Direction:
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; use one of {', '.join(DIRECTIONS)}")
    return cast(Direction, direction)


def check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return temperature


def kl_divergences(
    base: Tensor,
    delta_subject: Tensor,
    delta_style: Tensor,
    *,
    channel_dim: int,
    temperature: float = 1.0,
    direction: Direction = "forward",
    per_sample: bool = False,
) -> tuple[Tensor, Tensor]:
    """Divergence of softmax((base + delta)/τ) from softmax(base/τ) over `channel_dim`, for both deltas.

    Returns fp32 tensors: 0-dim (mean over every token and the batch) or, with `per_sample`, one value per
    index of dim 0. `direction` "forward" is KL(p0 ‖ p); "symmetric" is Jeffreys' KL(p0‖p) + KL(p‖p0).
    """
    direction = check_direction(direction)
    inv_t = 1.0 / check_temperature(temperature)
    if base.ndim == 0:
        raise ValueError("base must have a channel dimension")
    dim = channel_dim % base.ndim if -base.ndim <= channel_dim < base.ndim else None
    if dim is None:
        raise ValueError(f"channel_dim {channel_dim} is out of range for a {base.ndim}-D tensor")
    for name, delta in (("delta_subject", delta_subject), ("delta_style", delta_style)):
        if delta.shape != base.shape:
            raise ValueError(f"{name} has shape {tuple(delta.shape)}, base has {tuple(base.shape)}")
    if per_sample and (dim == 0 or base.ndim < 2):
        raise ValueError("per_sample keeps dim 0 as the batch, so the channels must be on another dim")

    # Shared by both branches: log p0 and p0, computed once. `z` aliases `base` when it is already fp32
    # at τ = 1, so nothing below may write into it.
    z = base.float()
    if inv_t != 1.0:
        z = z * inv_t
    log_p0 = torch.log_softmax(z, dim)
    p0 = log_p0.exp()

    def one(delta: Tensor) -> Tensor:
        log_p = torch.log_softmax(torch.add(z, delta, alpha=inv_t), dim)  # add promotes fp16 deltas to fp32
        if direction == "forward":
            # Σ p0 (log p0 − log p), done in place in log_p's buffer: no further full-size temporaries.
            per_token = log_p.neg_().add_(log_p0).mul_(p0).sum(dim)
        else:
            p = log_p.exp()
            per_token = log_p.neg_().add_(log_p0).mul_(p.neg_().add_(p0)).sum(dim)
        if not per_sample:
            return per_token.mean()
        return per_token.flatten(1).mean(1) if per_token.ndim > 1 else per_token

    return one(delta_subject), one(delta_style)


def choose(div_subject: float | Tensor, div_style: float | Tensor, *, style_scale: float = 1.0) -> Choice:
    """0 (subject) iff div_subject ≥ style_scale · div_style, else 1 (style). Ties and NaN go to the subject.

    Numbers give an int; tensors give a uint8 tensor of the same shape (0-dim or per row), computed on their
    device without a host sync.
    """
    style_wins = div_subject < div_style * style_scale  # "<" makes ties and NaN fall to the subject
    if isinstance(style_wins, Tensor):
        return style_wins.to(torch.uint8)
    return STYLE if style_wins else SUBJECT


def _token_dims(ndim: int, channel_dim: int) -> list[int]:
    """Dims that index tokens: all but the channels and, for 3-D+ tensors not channel-first, the batch."""
    skip_batch = ndim >= 3 and channel_dim != 0
    return [d for d in range(ndim) if d != channel_dim and not (skip_batch and d == 0)]


def subsample_tokens(t: Tensor, channel_dim: int, max_tokens: int) -> Tensor:
    """At most `max_tokens` tokens per sample of `t`, taken with a fixed odd stride over the flattened tokens.

    Odd, because latent widths are even: an even stride would keep the same few columns of every row, an
    odd one walks through all of them. A view when `t` is contiguous (no copy).
    """
    dim = channel_dim % t.ndim
    dims = _token_dims(t.ndim, dim)
    if not dims or dims != list(range(dims[0], dims[-1] + 1)):
        return t  # channels between token dims: leave it whole rather than guess
    tokens = math.prod(t.shape[d] for d in dims)
    if tokens <= max_tokens:
        return t
    stride = -(-tokens // max_tokens)
    stride += 1 - stride % 2
    flat = t.flatten(dims[0], dims[-1])
    index = [slice(None)] * flat.ndim
    index[dims[0]] = slice(None, None, stride)
    return flat[tuple(index)]
