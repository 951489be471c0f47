from __future__ import annotations

import math

import pytest
import torch

from lib_klora.fusion import scores
from lib_klora.fusion.scores import compute_scores
from lib_klora.loras.lora_file import LowRankModule


@pytest.fixture(params=["numpy", "torch"], autouse=True)
def selection_backend(request, monkeypatch):
    """Run every scoring test through both exact top-K implementations."""
    if request.param == "torch":
        monkeypatch.setattr(scores, "_numpy", lambda: None)
    elif scores._numpy() is None:
        pytest.skip("numpy not installed")
    return request.param


def _module(
    name: str, out_f: int, in_f: int, rank: int, seed: int, alpha: float | None = None
) -> LowRankModule:
    g = torch.Generator().manual_seed(seed)
    return LowRankModule(
        canonical=name,
        stem=name,
        down=torch.randn(rank, in_f, generator=g).half(),
        up=torch.randn(out_f, rank, generator=g).half(),
        alpha=alpha,
    )


def _brute_force(module: LowRankModule, k: int) -> tuple[float, float]:
    up = module.up.double().reshape(module.up.shape[0], -1) * module.scale
    dense = (up @ module.down.double().reshape(module.rank, -1)).abs().flatten()
    return float(dense.sort(descending=True).values[:k].sum()), float(dense.sum())


@pytest.mark.parametrize(
    ("out_f", "in_f", "r1", "r2"),
    [(320, 320, 4, 8), (640, 2560, 16, 32), (1280, 768, 8, 8), (6, 5, 4, 8), (2048, 640, 32, 64)],
    ids=["small", "ff", "cross", "k-capped", "wide"],
)
def test_scores_match_brute_force(out_f: int, in_f: int, r1: int, r2: int) -> None:
    a = {"l": _module("l", out_f, in_f, r1, seed=1, alpha=r1 / 2)}
    b = {"l": _module("l", out_f, in_f, r2, seed=2)}
    table = compute_scores([a, b], device="cpu")
    (layer,) = table.layers
    k = min(r1 * r2, out_f * in_f)
    assert layer.k == k and layer.ranks == (r1, r2)
    for got_score, got_l1, module in zip(layer.scores, layer.l1, (a["l"], b["l"]), strict=True):
        want_score, want_l1 = _brute_force(module, k)
        assert got_score == pytest.approx(want_score, rel=1e-5)
        assert got_l1 == pytest.approx(want_l1, rel=1e-5)


def test_dense_only_sources_are_scored_too() -> None:
    """Host loaders (LoHa, LoKr, ...) only give a dense ΔW; the scorer must accept that."""

    class Dense:
        def __init__(self, delta: torch.Tensor, rank: int) -> None:
            self._delta, self.rank, self.numel = delta, rank, delta.numel()

        def delta(self, device="cpu") -> torch.Tensor:
            return self._delta.to(device)

    g = torch.Generator().manual_seed(5)
    d1, d2 = torch.randn(64, 48, generator=g), torch.randn(64, 48, generator=g)
    table = compute_scores([{"x": Dense(d1, 2)}, {"x": Dense(d2, 3)}], device="cpu")
    (layer,) = table.layers
    assert layer.k == 6
    assert layer.scores[0] == pytest.approx(float(d1.abs().flatten().topk(6).values.sum()), rel=1e-6)
    assert layer.l1[1] == pytest.approx(float(d2.abs().sum()), rel=1e-6)


def test_ties_and_constant_deltas_stay_exact() -> None:
    """A constant |ΔW| defeats any sampled threshold estimate; the result must still be exact."""
    rank = 2
    down = torch.ones(rank, 300)
    up = torch.ones(400, rank)
    a = {"l": LowRankModule("l", "l", down=down, up=up)}
    b = {"l": LowRankModule("l", "l", down=down * 3, up=up)}
    (layer,) = compute_scores([a, b], device="cpu").layers
    assert layer.k == 4
    assert layer.scores == (pytest.approx(4 * 2.0), pytest.approx(4 * 6.0))
    assert layer.l1[0] == pytest.approx(2.0 * 120000)


def test_exclusive_layers_and_natural_order() -> None:
    a = {n: _module(n, 8, 8, 2, seed=i) for i, n in enumerate(["blocks_10", "blocks_9", "only_a"])}
    b = {n: _module(n, 8, 8, 2, seed=i) for i, n in enumerate(["blocks_10", "blocks_9", "only_b"])}
    table = compute_scores([a, b], device="cpu")
    assert [layer.canonical for layer in table.layers] == ["blocks_9", "blocks_10"]
    assert table.exclusive == (("only_a",), ("only_b",))


def test_progress_reports_every_layer() -> None:
    a = {f"l{i}": _module(f"l{i}", 8, 8, 2, seed=i) for i in range(5)}
    seen: list[tuple[int, int]] = []
    compute_scores([a, a], device="cpu", progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 5) for i in range(1, 6)]


def test_k_uses_product_of_ranks_for_three_loras() -> None:
    loras = [{"l": _module("l", 64, 64, r, seed=r)} for r in (2, 3, 4)]
    (layer,) = compute_scores(loras, device="cpu").layers
    assert layer.k == math.prod((2, 3, 4))
    assert len(layer.scores) == 3
