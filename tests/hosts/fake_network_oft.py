"""AUTOMATIC1111 v1.10.1's OFT/BOFT maths (`extensions-builtin/Lora/network_oft.py`) written out as
matrices, independent of `lib_klora/loras/oft.py` (which uses einsums and
reshapes): the reference the tests compare the reader with.

Written from the maths the host implements (nothing copied): kohya `oft_blocks` + alpha (constraint =
alpha · out rows), old LyCORIS `oft_diag` (R stored), LyCORIS BOFT (4-D `oft_blocks`), `rescale`, scale 1
and the multiplier applied last, as `finalize_updown` does (no bias, no DoRA).
"""

from __future__ import annotations

import torch


def cayley(blocks: torch.Tensor, constraint: float | None) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ with Q = B − Bᵀ, Q's overall norm clamped to `constraint` (none when 0/None)."""
    q = blocks.double() - blocks.double().transpose(-1, -2)
    if constraint:
        norm = float(q.norm())
        q = q * ((min(norm, constraint) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(blocks.shape[-1], dtype=torch.float64)
    # (I − Q)⁻¹ as the solution X of (I − Q) X = I, one identity per block (a (b, b) right-hand side
    # would be read as a batch of vectors when there are b blocks)
    return (eye + q) @ torch.linalg.solve(eye - q, eye.expand_as(q))


def interleave_permutation(rows: int, group: int) -> torch.Tensor:
    """The row order of BOFT's "(c g k) -> (c k g)" with g = 2, k = `group`: a list of source rows."""
    order = []
    for c in range(rows // (2 * group)):
        for k in range(group):
            for g in range(2):
                order.append(c * 2 * group + g * group + k)
    return torch.tensor(order)


def reference_rotated(
    weight: torch.Tensor,
    blocks: torch.Tensor,
    *,
    alpha: float | None,
    stores_rotation: bool = False,
    rescale: torch.Tensor | None = None,
) -> torch.Tensor:
    """W' of an OFT/BOFT layer, as dense matrices in float64: M · W with M built block by block."""
    w = weight.double().reshape(weight.shape[0], -1)
    rows = w.shape[0]
    constraint = None if stores_rotation or not alpha else alpha * rows
    rotation = blocks.double() if stores_rotation else cayley(blocks, constraint)
    if blocks.dim() == 3:
        # row block k: new row m = Σ_n R[k, n, m] · old row n, i.e. Rᵀ on the block
        matrix = torch.block_diag(*[r.T for r in rotation])
    else:
        matrix = torch.eye(rows, dtype=torch.float64)
        half = blocks.shape[-1] // 2
        for i, factor in enumerate(rotation):
            order = interleave_permutation(rows, 2**i * half)
            perm = torch.eye(rows, dtype=torch.float64)[order]  # (P x)[j] = x[order[j]]
            matrix = perm.T @ torch.block_diag(*factor) @ perm @ matrix
    out = matrix @ w
    if rescale is not None:
        out = out * rescale.double().reshape(-1, 1)
    return out.reshape(weight.shape)
