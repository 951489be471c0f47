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
  K-LoRA's S(r), like plan.py's rule "subject iff S_subject ≥ S(r) · S_style";
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
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib_klora.fusion.plan import STYLE, SUBJECT
from lib_klora.fusion.schedule import DEFAULT_ALPHA, Pattern, parse_pattern, progress_at, time_scale
from lib_klora.loras.lora_file import LowRankModule

log = logging.getLogger(__name__)

Direction = Literal["forward", "symmetric"]
DIRECTIONS: tuple[str, ...] = ("forward", "symmetric")
LABELS: tuple[str, str] = ("subject", "style")
DEFAULT_MAX_TOKENS: int | None = 256  # per sample; see the module docstring and bench/dynamic_bench.py
_SYNC_FREE_DEVICES = ("cpu",)  # device types where reading a choice on the host costs no sync

Choice = int | Tensor


# ---------------------------------------------------------------- divergence and rule


def _check_direction(direction: str) -> Direction:
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; use one of {', '.join(DIRECTIONS)}")
    return cast(Direction, direction)


def _check_temperature(temperature: float) -> float:
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
    direction = _check_direction(direction)
    inv_t = 1.0 / _check_temperature(temperature)
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


# ---------------------------------------------------------------- low-rank branches


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair, got {value!r}")
    return (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class ConvSpec:
    """The geometry of the target Conv2d that the LoRA's down convolution must reproduce."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvSpec:
        padding = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
        return cls(
            kernel_size=_pair(conv.kernel_size),
            stride=_pair(conv.stride),
            padding=padding,
            dilation=_pair(conv.dilation),
            groups=int(conv.groups),
            padding_mode=str(conv.padding_mode),
        )

    def explicit_padding(self) -> tuple[int, int, int, int]:
        """F.pad amounts (left, right, top, bottom), for padding modes F.conv2d cannot do itself."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            pads = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size), strict=True):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return (pads[0], pads[1], pads[2], pads[3])
        assert not isinstance(self.padding, str)
        ph, pw = self.padding
        return (pw, pw, ph, ph)


class LowRankBranch:
    """One LoRA's delta computed on the activation side: scale · up(down(x)), never a dense ΔW.

    Linear: ``x @ down.T @ up.T · scale``. Conv (LoCon): ``down`` is a conv with the target's kernel, stride,
    padding and dilation, followed by a 1×1 conv with ``up``. Grouped targets apply the same down/up factors
    to each group (the low-rank form of a grouped ΔW). ``x`` is cast to the factors' dtype and the result to
    the requested output dtype; the factors are copied to each input device once and cached there.
    """

    def __init__(self, up: Tensor, down: Tensor, scale: float = 1.0, *, conv: ConvSpec | None = None) -> None:
        self.scale = float(scale)
        self.conv = conv
        rank = int(down.shape[0])
        if conv is None:
            up = up.reshape(up.shape[0], -1)
            if down.ndim != 2 or up.shape[1] != rank:
                raise ValueError(f"linear branch needs up (out, r) and down (r, in), got {_shapes(up, down)}")
        else:
            kh, kw = conv.kernel_size
            if down.ndim == 2:
                if down.shape[1] % (kh * kw):
                    raise ValueError(f"down {tuple(down.shape)} does not fit a {kh}x{kw} kernel")
                down = down.reshape(rank, -1, kh, kw)
            up = up.reshape(up.shape[0], -1)
            if down.ndim != 4 or tuple(down.shape[2:]) != (kh, kw) or up.shape[1] != rank:
                raise ValueError(f"conv branch shapes do not fit a {kh}x{kw} kernel: {_shapes(up, down)}")
            if up.shape[0] % conv.groups:
                raise ValueError(f"{up.shape[0]} output channels do not split into {conv.groups} groups")
            # Grouped target: every group gets the same r down filters, and its outputs read only its own
            # r channels, so repeat down per group and run both convs grouped.
            if conv.groups > 1:
                down = down.repeat(conv.groups, 1, 1, 1)
            up = up.reshape(up.shape[0], rank, 1, 1)
        if up.dtype != down.dtype:
            up = up.to(down.dtype)
        self.rank = rank
        self._factors: dict[torch.device, tuple[Tensor, Tensor]] = {up.device: (up, down)}

    @classmethod
    def from_module(
        cls,
        module: LowRankModule,
        target: nn.Module | None = None,
        *,
        strength: float = 1.0,
        dtype: torch.dtype | None = None,
    ) -> LowRankBranch:
        """From a parsed LoRA layer (alpha/rank and any CP core folded in) and the module it adapts.

        `target` supplies the conv geometry and, unless `dtype` is given, the compute dtype (its weight's);
        without it a 2-D LoRA is linear and a 4-D one a stride-1, unpadded conv.
        """
        up, down = module.factors()  # fp32, alpha/rank folded into up, CP core folded into down
        if isinstance(target, nn.Conv2d):
            conv: ConvSpec | None = ConvSpec.of(target)
        elif target is None and module.down.ndim == 4:
            kernel = module.mid.shape[2:] if module.mid is not None else module.down.shape[2:]
            conv = ConvSpec(kernel_size=_pair(tuple(kernel)))
        elif target is None or isinstance(target, nn.Linear):
            conv = None
        else:
            raise TypeError(f"only nn.Linear and nn.Conv2d targets are supported: {type(target).__name__}")
        if dtype is None:
            weight = getattr(target, "weight", None)
            floating = isinstance(weight, Tensor) and weight.is_floating_point()
            dtype = weight.dtype if floating else torch.float32
        return cls(up.to(dtype), down.to(dtype), strength, conv=conv)

    @property
    def is_conv(self) -> bool:
        return self.conv is not None

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._factors.values()))[0].dtype

    @property
    def out_features(self) -> int:
        return int(next(iter(self._factors.values()))[0].shape[0])

    def factors_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        cached = self._factors.get(device)
        if cached is None:
            up, down = next(iter(self._factors.values()))
            cached = self._factors[device] = (up.to(device), down.to(device))
        return cached

    def delta(self, x: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
        """The LoRA's output increment for input `x`, as a new tensor in `out_dtype` (default x's dtype)."""
        up, down = self.factors_on(x.device)
        out_dtype = out_dtype or x.dtype
        h = x.to(down.dtype)
        if self.conv is None:
            h = F.linear(h, down)
            if self.scale != 1.0:
                h = h * self.scale  # on the rank-r side: r/out of the work of scaling the output
            return F.linear(h, up).to(out_dtype)
        c = self.conv
        if c.padding_mode != "zeros":
            h = F.pad(h, c.explicit_padding(), mode=c.padding_mode)
            padding: tuple[int, int] | str = (0, 0)
        else:
            padding = c.padding
        h = F.conv2d(h, down, None, c.stride, padding, c.dilation, c.groups)
        if self.scale != 1.0:
            h = h * self.scale
        return F.conv2d(h, up, None, 1, 0, 1, c.groups).to(out_dtype)

    def add_into(self, out: Tensor, x: Tensor) -> Tensor:
        """`out` + delta(x). Linear: accumulated into `out` by one in-place GEMM (`addmm_`, beta=1), with no
        output-sized temporary; use only on a fresh output nobody else holds. Otherwise a new tensor."""
        if self.conv is not None or not _can_write(out) or out.shape[-1] != self.out_features:
            return self.delta(x, out.dtype).add_(out)
        up, down = self.factors_on(x.device)
        h = F.linear(x.to(down.dtype), down)
        if self.scale != 1.0:
            h = h * self.scale
        if h.dtype != out.dtype:
            h, up = h.to(out.dtype), up.to(out.dtype)
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, self.rank), up.t())
        return out


def _can_write(out: Tensor) -> bool:
    """Whether the hook may add into the host's output in place: a contiguous float tensor that autograd
    does not track (sampling runs under no_grad / inference_mode)."""
    return (
        out.is_contiguous()
        and out.is_floating_point()
        and not (out.requires_grad and torch.is_grad_enabled())
    )


def _shapes(up: Tensor, down: Tensor) -> str:
    return f"up {tuple(up.shape)}, down {tuple(down.shape)}"


class DenseBranch:
    """A delta given as a dense ΔW (LoHa, LoKr, DoRA, CP cores the host folds): F.linear / F.conv2d with it.

    Same interface as :class:`LowRankBranch`; costs a full matmul per forward, so it is the fallback for
    layers whose LoRA has no plain low-rank form.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None, *, conv: ConvSpec | None = None) -> None:
        if conv is None and weight.ndim != 2:
            weight = weight.reshape(weight.shape[0], -1)
        if conv is not None and weight.ndim != 4:
            kh, kw = conv.kernel_size
            weight = weight.reshape(weight.shape[0], -1, kh, kw)
        self.conv = conv
        self.scale = 1.0
        self._weights: dict[torch.device, tuple[Tensor, Tensor | None]] = {weight.device: (weight, bias)}

    @property
    def is_conv(self) -> bool:
        return self.conv is not None

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._weights.values()))[0].dtype

    def weights_on(self, device: torch.device) -> tuple[Tensor, Tensor | None]:
        cached = self._weights.get(device)
        if cached is None:
            weight, bias = next(iter(self._weights.values()))
            cached = self._weights[device] = (weight.to(device), None if bias is None else bias.to(device))
        return cached

    def delta(self, x: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
        weight, bias = self.weights_on(x.device)
        out_dtype = out_dtype or x.dtype
        h = x.to(weight.dtype)
        if self.conv is None:
            return F.linear(h, weight, None if bias is None else bias.to(weight.dtype)).to(out_dtype)
        c = self.conv
        padding: tuple[int, int] | str = c.padding
        if c.padding_mode != "zeros":
            h = F.pad(h, c.explicit_padding(), mode=c.padding_mode)
            padding = (0, 0)
        b = None if bias is None else bias.to(weight.dtype)
        out = F.conv2d(h, weight, b, stride=c.stride, padding=padding, dilation=c.dilation, groups=c.groups)
        return out.to(out_dtype)

    def add_into(self, out: Tensor, x: Tensor) -> Tensor:
        return self.delta(x, out.dtype).add_(out)


class SlicedBranch:
    """Deltas of parts of a fused layer's outputs (FLUX: one LoRA per q, k, v of a fused qkv linear).

    `parts` are (branch, start, size) along the output channels; channels no part covers get no delta.
    """

    def __init__(self, out_features: int, parts: list[tuple[LowRankBranch | DenseBranch, int, int]]) -> None:
        if not parts:
            raise ValueError("a sliced branch needs at least one part")
        for branch, start, size in parts:
            if branch.is_conv or start < 0 or size <= 0 or start + size > out_features:
                raise ValueError(f"bad slice {start}:{start + size} of {out_features} output features")
        self.out_features = int(out_features)
        self.parts = parts
        self.conv = None

    @property
    def is_conv(self) -> bool:
        return False

    def delta(self, x: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
        out_dtype = out_dtype or x.dtype
        out = x.new_zeros((*x.shape[:-1], self.out_features), dtype=out_dtype)
        for branch, start, size in self.parts:
            out[..., start : start + size] += branch.delta(x, out_dtype)
        return out

    def add_into(self, out: Tensor, x: Tensor) -> Tensor:
        if not _can_write(out):
            return self.delta(x, out.dtype).add_(out)
        for branch, start, size in self.parts:
            out[..., start : start + size] += branch.delta(x, out.dtype)
        return out


Branch = LowRankBranch | DenseBranch | SlicedBranch
BOTH = 2  # a schedule's "both" choice (the merge baseline)


class FusionSelector:
    """Serves hooks that apply every method on the activation side (Forge, reForge): per pass, either a
    precomputed schedule (K-LoRA and the baselines; `lookup` reads it) or the `dynamic` selector.
    """

    def __init__(self, layer_count: int, dynamic: DynamicSelector | None = None) -> None:
        self.layer_count = int(layer_count)
        self.dynamic = dynamic
        self._choices: Tensor | None = None  # uint8 [layers, steps] of a static pass
        self._column: list[int] = []
        self._step = 0
        self.mode: Literal["static", "dynamic", "off"] = "off"

    @property
    def per_sample(self) -> bool:
        return self.mode == "dynamic" and self.dynamic is not None and self.dynamic.per_sample

    @property
    def max_tokens(self) -> int | None:
        return self.dynamic.max_tokens if self.dynamic is not None else DEFAULT_MAX_TOKENS

    def begin_static_pass(self, choices: Tensor) -> None:
        if choices.shape[0] != self.layer_count:
            raise ValueError(f"schedule has {choices.shape[0]} layers, the hooks {self.layer_count}")
        self.mode, self._choices, self._step = "static", choices.to("cpu", torch.uint8), -1
        self.set_step(0)

    def begin_dynamic_pass(self, pass_key: Hashable, steps: int) -> None:
        if self.dynamic is None:
            raise ValueError("this job has no dynamic selector")
        self.mode = "dynamic"
        self.dynamic.begin_pass(pass_key, steps)

    def set_step(self, step: int) -> None:
        if self.mode == "dynamic":
            assert self.dynamic is not None
            self.dynamic.set_step(step)
        elif self.mode == "static" and step != self._step:
            assert self._choices is not None
            self._step = step
            column = min(max(step, 0), self._choices.shape[1] - 1)
            self._column = self._choices[:, column].tolist()

    def lookup(self, layer_index: int) -> int | None:
        if self.mode == "static":
            return self._column[layer_index]
        assert self.dynamic is not None
        return self.dynamic.lookup(layer_index)

    def decide(
        self, layer_index: int, base_out: Tensor, delta_subject: Tensor, delta_style: Tensor, channel_dim: int
    ) -> Tensor:
        assert self.dynamic is not None and self.mode == "dynamic"
        return self.dynamic.decide(layer_index, base_out, delta_subject, delta_style, channel_dim)


# ---------------------------------------------------------------- selector


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


class DynamicSelector:
    """Makes and remembers the `dynamic` choices: one per (pass, step, layer), shared by the step's calls.

    Hosts call `begin_pass(key, steps)` at the start of every sampling pass (first pass, hires, img2img) and
    `set_step(step)` before each step's UNet calls. The first call of a step decides (`decide`), later calls
    of the same step reuse it (`lookup`). Decisions are recorded in a uint8 [layers × steps] table per pass
    (`table`), labelled `LABELS`, which `selection_map.render_selection_map` draws directly.

    Options: `temperature`, `direction` (see `kl_divergences`); `per_sample` decides per batch row on every
    call (the table keeps the majority of the first call's rows); `hybrid` multiplies the style divergence
    by K-LoRA's S(r) with `pattern`/`alpha`/`beta`; `max_tokens` estimates the mean divergence on at most
    that many tokens per sample (None: all; see the module docstring for the default).

    On accelerators the decisions stay on the device (no host sync per layer) and the table is filled in
    one transfer per step; on the CPU, where reading them is free, the hooks use them directly. Without
    `begin_pass`, `decide` still works but nothing is cached or recorded.
    """

    labels = LABELS

    def __init__(
        self,
        layer_count: int,
        *,
        temperature: float = 1.0,
        direction: Direction = "forward",
        per_sample: bool = False,
        hybrid: bool = False,
        pattern: str | Pattern = Pattern.S,
        alpha: float = DEFAULT_ALPHA,
        beta: float | None = None,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
    ) -> None:
        if layer_count < 0:
            raise ValueError(f"layer_count must be >= 0, got {layer_count}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
        self.layer_count = int(layer_count)
        self.temperature = _check_temperature(temperature)
        self.direction = _check_direction(direction)
        self.per_sample = bool(per_sample)
        self.hybrid = bool(hybrid)
        self.pattern = parse_pattern(pattern)
        self.alpha = float(alpha)
        self.beta = beta
        self.max_tokens = max_tokens
        if self.hybrid:  # reject a bad pattern/alpha now rather than in the middle of sampling
            time_scale(0.0, self.pattern, self.alpha, self.beta)
        self._tables: dict[Hashable, Tensor] = {}
        self._decided: dict[Hashable, Tensor] = {}
        self._pass_key: Hashable | None = None
        self._steps = 0
        self._step = 0
        self._current: dict[int, Choice] = {}  # this step's decisions, by layer
        self._pending: list[tuple[int, int, Tensor]] = []  # (layer, column, 0-dim choice) for the table

    @classmethod
    def for_params(cls, layer_count: int, params: Any) -> DynamicSelector:
        """The selector a KLoraParams' KL options describe (hybrid mode uses its pattern, alpha and beta)."""
        return cls(
            layer_count,
            temperature=params.kl_temperature,
            direction=params.kl_direction,
            per_sample=params.kl_per_sample,
            hybrid=params.kl_hybrid,
            pattern=params.pattern,
            alpha=params.alpha,
            beta=params.beta,
        )

    # -- progress

    @property
    def pass_key(self) -> Hashable | None:
        return self._pass_key

    @property
    def step(self) -> int:
        return self._step

    @property
    def steps(self) -> int:
        return self._steps

    def begin_pass(self, pass_key: Hashable, steps: int) -> None:
        """Start a pass of `steps` steps at step 0. A key seen before starts its table over."""
        if steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {steps}")
        self._flush()
        self._pass_key = pass_key
        self._steps = int(steps)
        self._step = 0
        self._current.clear()
        # Ordinary tensors even when sampling runs under inference_mode (Forge): the host reads the records
        # after sampling, outside it, where an inference tensor could not be written to any more.
        with torch.inference_mode(False):
            self._tables[pass_key] = torch.zeros((self.layer_count, self._steps), dtype=torch.uint8)
            self._decided[pass_key] = torch.zeros((self.layer_count, self._steps), dtype=torch.bool)

    def set_step(self, step: int) -> None:
        """Move to `step` (0-based); a new step forgets the previous step's decisions."""
        step = int(step)
        if step != self._step:
            self._flush()
            self._current.clear()
            self._step = step

    def style_scale(self) -> float:
        """The factor on the style divergence: S(r) in hybrid mode, else 1."""
        if not self.hybrid or self._steps == 0:
            return 1.0
        return time_scale(progress_at(self._column(), self._steps), self.pattern, self.alpha, self.beta)

    def _column(self) -> int:
        return min(max(self._step, 0), self._steps - 1)

    # -- decisions

    def lookup(self, layer_index: int) -> int | None:
        """The choice already made for `layer_index` in this step, or None (per-sample mode: always None)."""
        if self.per_sample:
            return None
        choice = self._current.get(layer_index)
        if isinstance(choice, Tensor):  # a later call of the step: one sync, then a plain int
            choice = self._current[layer_index] = int(choice)
        return choice

    def decide(
        self, layer_index: int, base_out: Tensor, delta_subject: Tensor, delta_style: Tensor, channel_dim: int
    ) -> Tensor:
        """Decide for `layer_index` from this call's base output and deltas; cache and record the choice.

        Returns a uint8 tensor on the outputs' device: 0-dim, or one value per batch row in per-sample mode.
        """
        if not 0 <= layer_index < self.layer_count:
            raise IndexError(f"layer index {layer_index} outside 0..{self.layer_count - 1}")
        tensors = (base_out, delta_subject, delta_style)
        if self.max_tokens is not None:
            tensors = tuple(subsample_tokens(t, channel_dim, self.max_tokens) for t in tensors)
        div_subject, div_style = kl_divergences(
            *tensors,
            channel_dim=channel_dim,
            temperature=self.temperature,
            direction=self.direction,
            per_sample=self.per_sample,
        )
        choice = choose(div_subject, div_style, style_scale=self.style_scale())
        assert isinstance(choice, Tensor)
        if self._pass_key is not None and layer_index not in self._current:  # the step's first decision
            self._current[layer_index] = choice
            # Per-sample mode still decides on every call; its table cell is the first call's majority.
            record = (choice.float().mean() > 0.5).to(torch.uint8) if self.per_sample else choice
            self._pending.append((layer_index, self._column(), record))
        return choice

    def _flush(self) -> None:
        if not self._pending or self._pass_key is None:
            self._pending.clear()
            return
        table, decided = self._tables[self._pass_key], self._decided[self._pass_key]
        by_device: dict[torch.device, list[tuple[int, int, Tensor]]] = {}
        for item in self._pending:
            by_device.setdefault(item[2].device, []).append(item)
        with torch.inference_mode(False):
            for items in by_device.values():
                values = torch.stack([c.reshape(()) for _, _, c in items]).to(
                    "cpu", torch.uint8
                )  # one transfer
                rows = torch.tensor([layer for layer, _, _ in items])
                cols = torch.tensor([col for _, col, _ in items])
                table[rows, cols] = values
                decided[rows, cols] = True
        self._pending.clear()

    # -- records

    def passes(self) -> list[Hashable]:
        return list(self._tables)

    def table(self, pass_key: Hashable) -> Tensor:
        """uint8 [layers × steps] choices of a pass (0 subject, 1 style); undecided cells read 0."""
        if pass_key == self._pass_key:
            self._flush()
        return self._tables[pass_key]

    def decided(self, pass_key: Hashable) -> Tensor:
        """bool [layers × steps]: which cells of `table(pass_key)` hold a decision."""
        if pass_key == self._pass_key:
            self._flush()
        return self._decided[pass_key]


# ---------------------------------------------------------------- hooks


class HookSet:
    """The forward hooks of one fusion run. `remove()` (idempotent) or use it as a context manager.

    A hook that raises does not break the host's forward: the first failure is logged and kept in
    `.error` (with the layer in `.failed_layer`), every hook of the set is removed and, until then, returns
    None, so the host continues with its own output (base plus whatever else it applies) from that point on.
    """

    def __init__(self) -> None:
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.error: Exception | None = None
        self.failed_layer: str | None = None
        self._active = True

    @property
    def active(self) -> bool:
        return self._active

    def __len__(self) -> int:
        return len(self.handles)

    def remove(self) -> None:
        self._active = False
        while self.handles:
            self.handles.pop().remove()

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def _fail(self, layer: str, exc: Exception) -> None:
        if self.error is None:
            self.error, self.failed_layer = exc, layer
            log.warning("dynamic fusion disabled: hook on %s failed", layer, exc_info=exc)
        self.remove()


def _hook_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, Tensor):
        raise TypeError(f"expected the module's input tensor, got {type(x).__name__}")
    return x


def install_hooks(
    modules: Mapping[str, nn.Module],
    branches: Mapping[str, tuple[Branch | None, Branch | None]],
    selector: DynamicSelector | FusionSelector,
    layer_index: Mapping[str, int],
    is_live: Callable[[], bool],
    *,
    in_place: bool = False,
) -> HookSet:
    """Hook every module that has a branch: out + the chosen delta (or + the only delta it has).

    `branches[name]` is (subject, style); a module with one branch gets it unconditionally, one with none
    is not hooked. Modules with both need a `layer_index` (their row in the selector's table). While
    `is_live()` is false the hooks return None and the output is left alone.

    `in_place`: add the chosen delta into the module's output tensor instead of returning a new one (one
    in-place GEMM for linear layers, no output-sized temporary: the cheapest way to apply a LoRA on the
    activation side). Only for hosts whose layer outputs are fresh tensors no one else holds, as plain
    Linear/Conv2d forwards under no_grad are; never while autograd records.
    """
    checked: list[tuple[str, nn.Module, Branch | None, Branch | None, int | None]] = []
    for name, (subject, style) in branches.items():
        if subject is None and style is None:
            continue
        if name not in modules:
            raise KeyError(f"no module given for layer {name!r}")
        index = None
        if subject is not None and style is not None:
            if subject.is_conv != style.is_conv:
                raise ValueError(f"layer {name!r}: one branch is a conv, the other linear")
            if name not in layer_index:
                raise KeyError(f"layer {name!r} is adapted by both LoRAs but has no layer index")
            index = int(layer_index[name])
            if not 0 <= index < selector.layer_count:
                raise IndexError(f"layer {name!r}: index {index} outside 0..{selector.layer_count - 1}")
        checked.append((name, modules[name], subject, style, index))

    hooks = HookSet()
    for name, module, subject, style, index in checked:
        hook = _make_hook(hooks, name, subject, style, index, selector, is_live, in_place)
        hooks.handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return hooks


def _make_hook(
    hooks: HookSet,
    name: str,
    subject: Branch | None,
    style: Branch | None,
    index: int | None,
    selector: DynamicSelector | FusionSelector,
    is_live: Callable[[], bool],
    in_place: bool = False,
) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], Tensor | None]:
    def add(branch: Branch, x: Tensor, out: Tensor) -> Tensor:
        if in_place:
            return branch.add_into(out, x)
        return branch.delta(x, out.dtype).add_(out)  # delta is a fresh tensor: add in place, one alloc

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Tensor | None:
        if not hooks.active or not is_live():
            return None
        try:
            return _apply(_hook_input(args, kwargs), out)
        except Exception as exc:  # our failure must not kill the host's sampling; see HookSet
            hooks._fail(name, exc)
            return None

    def _apply(x: Tensor, out: Tensor) -> Tensor:
        if subject is None or style is None:
            only = subject if style is None else style
            assert only is not None
            return add(only, x, out)
        assert index is not None
        known = selector.lookup(index)
        if known == BOTH:  # the merge baseline: both deltas
            return add(style, x, add(subject, x, out))
        if known is not None:  # a later call of this step, or a schedule: only the chosen delta is needed
            return add(subject if known == SUBJECT else style, x, out)
        channel_dim = 1 if subject.is_conv else -1
        if out.device.type in _SYNC_FREE_DEVICES and not selector.per_sample:
            return _decide_on_host(x, out, channel_dim)
        d_subject = subject.delta(x, out.dtype)
        d_style = style.delta(x, out.dtype)
        choice = selector.decide(index, out, d_subject, d_style, channel_dim)
        # Select on the device (no host sync per layer): a 0-dim mask broadcasts, a per-row mask is
        # shaped (B, 1, ...).
        mask = choice.bool()
        if mask.ndim == 1:
            mask = mask.reshape(mask.shape[0], *([1] * (out.ndim - 1)))
        return torch.where(mask, d_style, d_subject).add_(out)

    def _decide_on_host(x: Tensor, out: Tensor, channel_dim: int) -> Tensor:
        # On the CPU reading the choice costs nothing, and a broadcast torch.where is slow there. A linear
        # layer's tokens line up between input and output, so both deltas are needed only on the token
        # subsample; then just the chosen one is computed in full.
        xs, outs = x, out
        if selector.max_tokens is not None and channel_dim == -1 and x.shape[:-1] == out.shape[:-1]:
            xs = subsample_tokens(x, -1, selector.max_tokens)
            outs = subsample_tokens(out, -1, selector.max_tokens)
        assert subject is not None and style is not None and index is not None
        d_subject, d_style = subject.delta(xs, out.dtype), style.delta(xs, out.dtype)
        choice = int(selector.decide(index, outs, d_subject, d_style, channel_dim))
        if xs is x:
            return (d_subject if choice == SUBJECT else d_style).add_(out)
        return add(subject if choice == SUBJECT else style, x, out)

    return hook
