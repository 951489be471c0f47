"""OFT and BOFT layers: parsed from the file, turned into ΔW once the base layer's weight is known.

An OFT layer does not add a learnt matrix to the base weight W; it rotates W's output rows, so its
ΔW = W' − W depends on W, which a LoRA file does not hold. The reader parses each OFT/BOFT layer into an
`OftModule`; whoever has the model (the WebUI plan route, the hosts, `plan --model`, the generic engine)
binds it to the layer's weight (`OftModule.bind`), which gives an ordinary scoring source (`BoundOft`).

Files read: kohya sd-scripts OFT (`oft_blocks` (blocks, b, b) + `alpha`), LyCORIS ≥ 2 diag-OFT (the same
names) and BOFT (4-D `oft_blocks` (m, blocks, b, b), optional `rescale`), and old LyCORIS `oft_diag`, which
stores the rotation itself. The maths are AUTOMATIC1111 v1.10.1's (extensions-builtin/Lora/network_oft.py),
the host that applies all of them:

* Q = B − Bᵀ per block (skew-symmetric). With an alpha (a norm constraint, not a scale), Q's Frobenius norm
  over all blocks is clamped to alpha · out. R = (I + Q)(I − Q)⁻¹ (Cayley: orthogonal). `oft_diag` is R.
* OFT: each block of b output rows becomes Rᵀ·(those rows): W'[k·b + m] = Σₙ R[k, n, m] · W[k·b + n].
* BOFT: m butterfly factors; factor i interleaves the rows in pairs of groups of 2ⁱ·b/2 rows, rotates each
  block of b rows by R_i, and undoes the interleave.
* `rescale` (one number per output row) multiplies W'. The layer's scale is 1 (A1111 sets it so); the
  strength multiplies ΔW, as A1111's `finalize_updown` does.

K: a rotation moves every row, so ΔW has no rank bound below the layer's own: K = min(out, in·kh·kw), the
full-rank bound (`structured.full_rank`) that every host engine also gives a module without a rank.
reForge applies OFT/BOFT with ComfyUI's maths (constraint alpha instead of alpha·out); its scores use its
own ΔW, with the same K. Forge does not read OFT layers (its key loader skips them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lib_klora.loras.structured import full_rank

OFT_PARTS = ("oft_blocks", "oft_diag", "rescale")
# (file, canonical layer name, key stem as written) -> the base model's weight of that layer, or None
BaseWeightLookup = Callable[[Path, str, str], torch.Tensor | None]


@dataclass(frozen=True)
class BaseWeights:
    """The base model's layer weights, for LoRA layers whose ΔW depends on them (OFT/BOFT).

    `identity` names the model (and its weights) for the score cache: scores of such layers hold only for
    the model they were computed with."""

    lookup: BaseWeightLookup
    identity: str


class OftShapeError(ValueError):
    """An OFT layer's tensors do not fit together; `key_part` names the tensor at fault."""

    def __init__(self, message: str, key_part: str) -> None:
        super().__init__(message)
        self.key_part = key_part


@dataclass
class OftModule:
    """One OFT or BOFT layer of a file: its blocks, alpha (norm constraint) and rescale."""

    canonical: str
    stem: str
    blocks: torch.Tensor  # OFT (blocks, b, b), BOFT (m, blocks, b, b); `oft_diag` holds R itself
    stores_rotation: bool = False  # old LyCORIS `oft_diag`
    alpha: float | None = None
    rescale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        part = "oft_diag" if self.stores_rotation else "oft_blocks"
        shape = tuple(self.blocks.shape)
        if (
            self.blocks.dim() not in (3, 4)
            or shape[-1] != shape[-2]
            or (self.stores_rotation and len(shape) != 3)
        ):
            raise OftShapeError(
                f"{self.format_name} layer has {part} of shape {shape}; expected (blocks, b, b)"
                + ("" if self.stores_rotation else " or BOFT's (m, blocks, b, b)"),
                part,
            )
        if self.is_butterfly:
            factors, blocks, size = shape[0], shape[1], shape[2]
            # factor i interleaves groups of 2^i·b/2 rows: the rows must split into 2^(m-1)·b evenly
            if size % 2 or blocks % (2 ** (factors - 1)):
                raise OftShapeError(
                    f"BOFT layer has oft_blocks of shape {shape}: {factors} butterfly factors need an even "
                    f"block size and a block count divisible by {2 ** (factors - 1)}",
                    part,
                )
        if self.rescale is not None and self.rescale.numel() != self.out_features:
            raise OftShapeError(
                f"{self.format_name} layer has rescale with {self.rescale.numel()} entries for "
                f"{self.out_features} output rows",
                "rescale",
            )

    @property
    def is_butterfly(self) -> bool:
        return self.blocks.dim() == 4

    @property
    def format_name(self) -> str:
        return "BOFT" if self.is_butterfly else "OFT"

    @property
    def block_size(self) -> int:
        return int(self.blocks.shape[-1])

    @property
    def out_features(self) -> int:
        return int(self.blocks.shape[-3]) * self.block_size

    def rotations(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """R per block in fp32: (blocks, b, b), or (m, blocks, b, b) for BOFT."""
        blocks = self.blocks.to(device=device, dtype=torch.float32)
        if self.stores_rotation:
            return blocks
        eye = torch.eye(self.block_size, device=blocks.device, dtype=torch.float32)
        skew = blocks - blocks.transpose(-1, -2)
        if self.alpha:  # A1111: constraint = alpha · out; none when alpha is absent or 0
            norm = torch.norm(skew.flatten())
            clamped = torch.clamp(norm, max=self.alpha * self.out_features)
            skew = skew * ((clamped + 1e-8) / (norm + 1e-8))
        return (eye + skew) @ torch.linalg.inv(eye - skew)

    def check_weight(self, weight: torch.Tensor) -> None:
        if weight.dim() < 2 or int(weight.shape[0]) != self.out_features:
            raise OftShapeError(
                f"{self.format_name} layer {self.stem} rotates {self.out_features} output rows; the model's "
                f"layer has weight of shape {tuple(weight.shape)}",
                "oft_diag" if self.stores_rotation else "oft_blocks",
            )

    def rotated(self, weight: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """W' (the layer's weight after the rotation and rescale), fp32, in the weight's shape."""
        self.check_weight(weight)
        rotation = self.rotations(device)
        w = weight.to(device=device, dtype=torch.float32)
        rest = tuple(w.shape[1:])
        size = self.block_size
        if not self.is_butterfly:
            out = torch.einsum("knm,kn...->km...", rotation, w.reshape(-1, size, *rest)).reshape(w.shape)
        else:
            half = size // 2
            out = w
            for i, factor in enumerate(rotation):
                group = 2**i * half
                out = out.unflatten(0, (-1, 2, group)).transpose(1, 2).flatten(0, 2)  # interleave
                out = torch.einsum("dij,dj...->di...", factor, out.unflatten(0, (-1, size))).flatten(0, 1)
                out = out.unflatten(0, (-1, group, 2)).transpose(1, 2).flatten(0, 2)  # undo it
        if self.rescale is not None:
            scale = self.rescale.to(device=device, dtype=torch.float32)
            out = out * scale.reshape(-1, *([1] * len(rest)))
        return out

    def delta_for(self, weight: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """ΔW = W' − W at strength 1, as a 2-D fp32 matrix (out, in·kh·kw). `weight` is not modified."""
        out = self.rotated(weight, device) - weight.to(device=device, dtype=torch.float32)
        return out.reshape(out.shape[0], -1)

    def bind(self, weight: torch.Tensor) -> BoundOft:
        self.check_weight(weight)
        return BoundOft(self, weight)


@dataclass
class BoundOft:
    """An OFT/BOFT layer together with the base weight it rotates: a scoring source like any LoRA layer."""

    module: OftModule
    weight: torch.Tensor

    @property
    def canonical(self) -> str:
        return self.module.canonical

    @property
    def stem(self) -> str:
        return self.module.stem

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight[0].numel())

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def rank(self) -> int:
        return oft_rank(self.out_features, self.in_features)

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.module.delta_for(self.weight, device)


def oft_rank(out_features: int, in_size: int) -> int:
    """K's factor for an OFT/BOFT layer: the full-rank bound (see the module docstring)."""
    return full_rank(out_features, in_size)
