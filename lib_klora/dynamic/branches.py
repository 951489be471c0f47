"""Low-rank, dense and sliced deltas of one LoRA on one layer, computed from the layer's input.

Every method that works on the activation side uses them: `dynamic` everywhere, K-LoRA and the
baselines on Forge/reForge and in the generic torch-module engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib_klora.loras.lora_file import LowRankModule

# ---------------------------------------------------------------- low-rank branches


def branch_dtype(weight: Tensor) -> torch.dtype:
    """The dtype a LoRA branch on a layer with this weight computes in (inputs and outputs are cast at its
    edges): the weight's float dtype, but fp32 for non-float storage (fp8, quantized) and for half-precision
    weights on a CPU, which has no fast half kernels for the branch's skinny matmuls (`add_into`, rank 32 on
    128 tokens of 1280 channels, 1 thread: 9.5 ms in fp16 against 0.65 ms in fp32, next to the layer's own
    42 ms in fp16)."""
    if weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32 if weight.device.type == "cpu" else weight.dtype
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


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

        `target` supplies the conv geometry and, unless `dtype` is given, the compute dtype (`branch_dtype`);
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
            dtype = branch_dtype(weight) if isinstance(weight, Tensor) else torch.float32
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
        output-sized temporary (one when the branch computes in another dtype than `out`); use only on a
        fresh output nobody else holds. Otherwise a new tensor."""
        if self.conv is not None or not _can_write(out) or out.shape[-1] != self.out_features:
            return self.delta(x, out.dtype).add_(out)
        up, down = self.factors_on(x.device)
        h = F.linear(x.to(down.dtype), down)
        if self.scale != 1.0:
            h = h * self.scale
        if h.dtype != out.dtype:  # e.g. an fp32 branch on a half-precision layer on a CPU (`branch_dtype`):
            # both projections in the branch's dtype, then one cast-and-add; a half GEMM here would be the
            # slow kernel the fp32 branch avoids, and casting `up` the copy of a factor at every forward.
            return out.add_(F.linear(h, up))
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


class SumBranch:
    """Several deltas of one layer added together: the activation side of ΔW_a − ΔW_b on a layer whose
    weight holds ΔW_b merged (A1111's switching layers: a branch at +strength and one at −strength)."""

    def __init__(self, parts: list[LowRankBranch | DenseBranch]) -> None:
        if not parts:
            raise ValueError("a sum branch needs at least one part")
        if len({part.is_conv for part in parts}) > 1:
            raise ValueError("a sum branch cannot mix conv and linear parts")
        self.parts = parts

    @property
    def is_conv(self) -> bool:
        return self.parts[0].is_conv

    def delta(self, x: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
        total = self.parts[0].delta(x, out_dtype)
        for part in self.parts[1:]:
            total = part.add_into(total, x)
        return total

    def add_into(self, out: Tensor, x: Tensor) -> Tensor:
        for part in self.parts:
            out = part.add_into(out, x)
        return out


Branch = LowRankBranch | DenseBranch | SlicedBranch | SumBranch
