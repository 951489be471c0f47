"""LyCORIS LoHa, LoKr and full (`diff`) layers: their ΔW, their scale and the rank bound K-LoRA uses as K.

K-LoRA's Top-K takes K = r_subject · r_style, where r is a LoRA's rank. A structured delta has no single
rank factor, so its "rank" here is the bound on the numerical rank of its ΔW (as a 2-D matrix
out × in·kh·kw), capped at min(out, in·kh·kw):

* LoHa, ΔW = (w1a·w1b) ⊙ (w2a·w2b): rank(A ⊙ B) ≤ rank(A)·rank(B), so r1·r2.
* LoKr, ΔW = w1 ⊗ w2: rank(A ⊗ B) = rank(A)·rank(B); a factored half (w_a·w_b, or a Tucker core) has
  rank ≤ its inner dimension, a full half ≤ its smaller side.
* full, ΔW = diff: min(out, in·kh·kw).

The file reader and the three hosts' engines all call these functions, so a plan made from the file makes
the same choices as the host. Scales follow the hosts (A1111's `calc_scale`, ComfyUI/Forge `lora.py`):
LoHa alpha / w1_b rows; LoKr alpha / the inner dimension of w2's factors, else of w1's, else 1; full 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STRUCTURED_PARTS = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "full": ("diff",),
}
FORMAT_NAMES = {"loha": "LoHa", "lokr": "LoKr", "full": "full (diff)", "lora": "LoRA"}


class StructureError(ValueError):
    """A structured layer's tensors do not fit together; `key_part` names the tensor at fault."""

    def __init__(self, message: str, key_part: str | None = None) -> None:
        super().__init__(message)
        self.key_part = key_part


def capped(rank: int, out_features: int, in_size: int) -> int:
    return max(1, min(rank, out_features, in_size))


def loha_rank(w1_b: torch.Tensor, w2_b: torch.Tensor, out_features: int, in_size: int) -> int:
    return capped(int(w1_b.shape[0]) * int(w2_b.shape[0]), out_features, in_size)


def _half_rank(full: torch.Tensor | None, inner: torch.Tensor | None) -> int:
    if full is not None:
        return min(int(full.shape[0]), int(full[0].numel())) if full.dim() >= 2 else 1
    assert inner is not None
    return int(inner.shape[0])


def lokr_rank(
    w1: torch.Tensor | None,
    w1_b: torch.Tensor | None,
    w2: torch.Tensor | None,
    w2_b: torch.Tensor | None,
    out_features: int,
    in_size: int,
) -> int:
    return capped(_half_rank(w1, w1_b) * _half_rank(w2, w2_b), out_features, in_size)


def full_rank(out_features: int, in_size: int) -> int:
    return capped(out_features, out_features, in_size)


def loha_scale(alpha: float | None, w1_b: torch.Tensor) -> float:
    return 1.0 if alpha is None else alpha / int(w1_b.shape[0])


def lokr_scale(alpha: float | None, w1_b: torch.Tensor | None, w2_b: torch.Tensor | None) -> float:
    inner = w2_b if w2_b is not None else w1_b
    return 1.0 if alpha is None or inner is None else alpha / int(inner.shape[0])


def _f32(tensor: torch.Tensor | None, device: torch.device | str) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device=device, dtype=torch.float32)


def _tucker(core: torch.Tensor, inner_b: torch.Tensor, inner_a: torch.Tensor) -> torch.Tensor:
    """Tucker rebuild as LyCORIS and the hosts do it: (out, in, kh, kw) from core (r, r, kh, kw)."""
    return torch.einsum("i j k l, j r, i p -> p r k l", core, inner_b, inner_a)


@dataclass
class StructuredModule:
    """One LyCORIS layer of a file that is not a plain up/down pair (a `DeltaSource` for scoring)."""

    canonical: str
    stem: str
    kind: str  # "loha" | "lokr" | "full"
    weights: dict[str, torch.Tensor]  # part name ("hada_w1_a", "lokr_t2", "diff", ...) -> tensor
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None  # DoRA magnitude; see lora_file.py for how it is scored
    out_features: int = 0
    in_features: int = 0  # flattened: in · kh · kw

    def __post_init__(self) -> None:
        self.out_features, self.in_features = structured_shape(self.kind, self.weights)

    @property
    def format_name(self) -> str:
        return FORMAT_NAMES[self.kind]

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def rank(self) -> int:
        w = self.weights.get
        if self.kind == "loha":
            return loha_rank(w("hada_w1_b"), w("hada_w2_b"), self.out_features, self.in_features)
        if self.kind == "lokr":
            return lokr_rank(
                w("lokr_w1"),
                w("lokr_w1_b"),
                w("lokr_w2"),
                w("lokr_w2_b"),
                self.out_features,
                self.in_features,
            )
        return full_rank(self.out_features, self.in_features)

    @property
    def scale(self) -> float:
        w = self.weights.get
        if self.kind == "loha":
            return loha_scale(self.alpha, w("hada_w1_b"))
        if self.kind == "lokr":
            return lokr_scale(self.alpha, w("lokr_w1_b"), w("lokr_w2_b"))
        return 1.0

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Dense ΔW (out, in·kh·kw) in fp32, scale included (the DoRA magnitude is not: see lora_file)."""
        w = {name: _f32(t, device) for name, t in self.weights.items()}
        if self.kind == "loha":
            halves = []
            for n in ("1", "2"):
                a, b, core = w[f"hada_w{n}_a"], w[f"hada_w{n}_b"], w.get(f"hada_t{n}")
                halves.append(_tucker(core, b, a) if core is not None else a @ b.reshape(b.shape[0], -1))
            delta = halves[0].reshape(self.out_features, -1) * halves[1].reshape(self.out_features, -1)
        elif self.kind == "lokr":
            w1 = w.get("lokr_w1")
            if w1 is None:
                w1 = w["lokr_w1_a"] @ w["lokr_w1_b"]
            w2 = w.get("lokr_w2")
            if w2 is None:
                core = w.get("lokr_t2")
                if core is not None:
                    w2 = _tucker(core, w["lokr_w2_b"], w["lokr_w2_a"])
                else:
                    w2 = w["lokr_w2_a"] @ w["lokr_w2_b"].reshape(w["lokr_w2_b"].shape[0], -1)
            # contiguous: torch.kron views its inputs and fails on a Tucker rebuild's strided result
            delta = torch.kron(
                w1.reshape(w1.shape[0], -1).contiguous(), w2.reshape(w2.shape[0], -1).contiguous()
            )
        else:
            delta = w["diff"].reshape(self.out_features, -1)
        return delta * self.scale if self.scale != 1.0 else delta


def _need(kind: str, weights: dict[str, torch.Tensor], have: str, needed: str) -> torch.Tensor:
    if needed not in weights:
        raise StructureError(f"{FORMAT_NAMES[kind]} layer has {have} but no {needed}", have)
    return weights[needed]


def _matmul_shape(kind: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> tuple[int, int]:
    if a.dim() != 2 or b.dim() < 2 or a.shape[1] != b.shape[0]:
        raise StructureError(
            f"{FORMAT_NAMES[kind]} shapes do not multiply: "
            f"{a_name} {tuple(a.shape)} · {b_name} {tuple(b.shape)}",
            b_name,
        )
    return int(a.shape[0]), int(b[0].numel())


def _tucker_shape(
    kind: str, names: tuple[str, str, str], tensors: tuple[torch.Tensor, ...]
) -> tuple[int, ...]:
    core, a, b = tensors
    if (
        core.dim() != 4
        or a.dim() != 2
        or b.dim() != 2
        or core.shape[0] != a.shape[0]
        or core.shape[1] != b.shape[0]
    ):
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, tensors, strict=True))
        raise StructureError(f"{FORMAT_NAMES[kind]} Tucker shapes do not fit: {shapes}", names[0])
    return int(a.shape[1]), int(b.shape[1]) * int(core.shape[2]) * int(core.shape[3])


def structured_shape(kind: str, weights: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(out, in·kh·kw) of the ΔW the parts make; raises `StructureError` naming the format and the part."""
    if kind == "loha":
        halves = []
        for n in ("1", "2"):
            a_name, b_name, t_name = f"hada_w{n}_a", f"hada_w{n}_b", f"hada_t{n}"
            present = next((p for p in (a_name, b_name, t_name) if p in weights), "hada_w1_a")
            a, b = _need(kind, weights, present, a_name), _need(kind, weights, present, b_name)
            if t_name in weights:
                halves.append(_tucker_shape(kind, (t_name, a_name, b_name), (weights[t_name], a, b)))
            else:
                halves.append(_matmul_shape(kind, a_name, a, b_name, b))
        if halves[0] != halves[1]:
            raise StructureError(f"LoHa halves differ in shape: {halves[0]} and {halves[1]}", "hada_w2_a")
        return halves[0]
    if kind == "lokr":
        first = next(p for p in STRUCTURED_PARTS["lokr"] if p in weights)
        if "lokr_w1" in weights:
            w1 = weights["lokr_w1"]
            w1_shape = (int(w1.shape[0]), int(w1[0].numel()))
        else:
            w1_shape = _matmul_shape(
                kind,
                "lokr_w1_a",
                _need(kind, weights, first, "lokr_w1_a"),
                "lokr_w1_b",
                _need(kind, weights, first, "lokr_w1_b"),
            )
        if "lokr_w2" in weights:
            w2 = weights["lokr_w2"]
            w2_shape = (int(w2.shape[0]), int(w2[0].numel()))
        elif "lokr_t2" in weights:
            w2_shape = _tucker_shape(
                kind,
                ("lokr_t2", "lokr_w2_a", "lokr_w2_b"),
                (
                    weights["lokr_t2"],
                    _need(kind, weights, "lokr_t2", "lokr_w2_a"),
                    _need(kind, weights, "lokr_t2", "lokr_w2_b"),
                ),
            )
        else:
            w2_shape = _matmul_shape(
                kind,
                "lokr_w2_a",
                _need(kind, weights, first, "lokr_w2_a"),
                "lokr_w2_b",
                _need(kind, weights, first, "lokr_w2_b"),
            )
        return w1_shape[0] * w2_shape[0], w1_shape[1] * w2_shape[1]
    diff = weights["diff"]
    if diff.dim() not in (2, 4):
        raise StructureError(
            f"a full (diff) weight must be 2-D or 4-D, got shape {tuple(diff.shape)}", "diff"
        )
    return int(diff.shape[0]), int(diff[0].numel())


def structured_kind(parts: set[str]) -> str | None:
    for kind, names in STRUCTURED_PARTS.items():
        if parts & set(names):
            return kind
    return None
