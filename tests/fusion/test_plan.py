from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lib_klora.fusion.from_files import plan_from_files
from lib_klora.fusion.options import GammaVariant, Method
from lib_klora.fusion.plan import FusionPlan, PlanSettings, balance_factors
from lib_klora.fusion.schedule import OFFICIAL_CODE_STAR_BETA, progress_at, time_scale
from lib_klora.fusion.scores import LayerScores, ScoreTable
from lib_klora.tools.synthetic import make_lora_tensors, write_lora
from tests.conftest import SMALL_SHAPES


def _table(scores: list[tuple[float, float]], l1: list[tuple[float, float]] | None = None) -> ScoreTable:
    l1 = l1 or [(1.0, 1.0)] * len(scores)
    layers = tuple(
        LayerScores(f"layer{i}", (f"s{i}", f"t{i}"), (4, 8), 32, sc, m)
        for i, (sc, m) in enumerate(zip(scores, l1, strict=True))
    )
    return ScoreTable(layers=layers, exclusive=((), ()))


# Values from the K-LoRA spec's schedule table (design/klora-algorithm.md §3.6).
@pytest.mark.parametrize(
    ("r", "want"), [(0.0, 0.5), (0.1, 0.65), (0.3, 0.95), (0.5, 1.25), (0.9, 1.85), (1.0, 2.0)]
)
def test_time_scale_s(r: float, want: float) -> None:
    assert time_scale(r, "s") == pytest.approx(want)


@pytest.mark.parametrize(("r", "want"), [(0.0, 1.3), (0.1, 1.45), (0.15, 0.025), (0.5, 0.55), (1.0, 1.3)])
def test_time_scale_s_star_paper(r: float, want: float) -> None:
    assert time_scale(r, "s*") == pytest.approx(want)


def test_s_star_wraps_at_015_with_official_constants() -> None:
    assert time_scale(0.15, "s*", 1.5, OFFICIAL_CODE_STAR_BETA) == 0.0
    assert time_scale(0.1, "s*", 1.5, OFFICIAL_CODE_STAR_BETA) == pytest.approx(1.425)
    assert time_scale(0.2, "s*", 1.5, OFFICIAL_CODE_STAR_BETA) == pytest.approx(0.075)
    # Progress is 0-based: step 3 of 20 is r = 0.15, exactly the wrap.
    assert progress_at(3, 20) == 0.15


def test_gamma_variants_by_hand() -> None:
    # Per-layer ratios 1, 1, 1, 20: mean 5.75, and 20 >= 3 * 5.75 is dropped -> official gamma 1.
    table = _table([(1, 1)] * 4, l1=[(2.0, 2.0), (3.0, 3.0), (1.0, 1.0), (100.0, 5.0)])
    assert balance_factors(table, (1.0, 1.0), GammaVariant.OFFICIAL) == [1.0, pytest.approx(1.0)]
    assert balance_factors(table, (1.0, 1.0), GammaVariant.PAPER) == [1.0, pytest.approx(106.0 / 11.0)]
    # Ratios 1, 1, 10: mean 4, nothing reaches 12, so all three are averaged.
    kept = _table([(1, 1)] * 3, l1=[(2.0, 2.0), (3.0, 3.0), (50.0, 5.0)])
    assert balance_factors(kept, (1.0, 1.0), GammaVariant.OFFICIAL)[1] == pytest.approx(4.0)
    # Strengths scale the L1 masses they balance.
    assert balance_factors(table, (1.0, 0.5), GammaVariant.PAPER)[1] == pytest.approx(106.0 / 5.5)


def test_klora_rule_matches_the_formula_at_every_step() -> None:
    scores = [(3.0, 1.0), (1.0, 1.0), (1.0, 3.0), (2.0, 1.5), (0.4, 1.0)]
    l1 = [(1.0, 2.0), (2.0, 1.0), (3.0, 3.0), (1.0, 1.0), (2.0, 2.0)]
    for pattern in ("s", "s*"):
        plan = FusionPlan(_table(scores, l1), PlanSettings(pattern=pattern, gamma="paper"))
        steps = 25
        schedule = plan.schedule(steps)
        for li, (sc, ss) in enumerate(scores):
            for step in range(steps):
                scale = time_scale(step / steps, pattern)
                want = 0 if sc >= plan.gamma * scale * ss else 1
                assert int(schedule.choices[li, step]) == want, (pattern, li, step)


def test_exact_tie_goes_to_subject() -> None:
    # gamma 1 (equal L1), S(0) = 0.5: subject score 0.5 equals 0.5 * style score 1.
    plan = FusionPlan(_table([(0.5, 1.0)]), PlanSettings(gamma="paper"))
    assert plan.gamma == 1.0
    assert plan.schedule(10).choices[0, 0] == 0
    assert plan.schedule(10).choices[0, 1] == 1


def test_choices_unchanged_under_uniform_rescaling(tmp_path: Path, cache) -> None:
    base_s = make_lora_tensors(SMALL_SHAPES, 4, seed=1, key_format="kohya", alpha=4.0)
    base_t = make_lora_tensors(SMALL_SHAPES, 8, seed=2, key_format="kohya", alpha=8.0)
    subject = write_lora(tmp_path / "s.safetensors", base_s)
    style = write_lora(tmp_path / "t.safetensors", base_t)
    # The same style LoRA with every up weight times 3.7 (as a stronger training run would give).
    scaled = {k: (v.float() * 3.7).half() if k.endswith("lora_up.weight") else v for k, v in base_t.items()}
    style_scaled = write_lora(tmp_path / "t37.safetensors", scaled)
    for variant in ("official", "paper"):
        for pattern in ("s", "s*"):
            settings = PlanSettings(pattern=pattern, gamma=variant)
            a = plan_from_files(subject, style, settings, cache=cache).schedule(30).choices
            b = plan_from_files(subject, style_scaled, settings, cache=cache).schedule(30).choices
            c = (
                plan_from_files(
                    subject,
                    style,
                    PlanSettings(pattern=pattern, gamma=variant, strengths=(0.3, 2.0)),
                    cache=cache,
                )
                .schedule(30)
                .choices
            )
            assert torch.equal(a, b) and torch.equal(a, c)
            assert 0 < int((a == 0).sum()) < a.numel()  # a real mix, so the check can fail


def test_merge_baseline_uses_both_everywhere() -> None:
    plan = FusionPlan(_table([(1, 1), (5, 1)]), PlanSettings(method=Method.MERGE))
    document = plan.to_json(4)
    assert all(layer["choices"] == ["both"] * 4 for layer in document["layers"])


def test_fixed_baseline_ignores_scores() -> None:
    plan = FusionPlan(_table([(100.0, 1.0), (1.0, 100.0)]), PlanSettings(method="fixed"))
    schedule = plan.schedule(10)
    want = torch.tensor([0 if time_scale(s / 10, "s") <= 1 else 1 for s in range(10)], dtype=torch.uint8)
    assert torch.equal(schedule.choices[0], want) and torch.equal(schedule.choices[1], want)


def test_random_baseline_is_seeded_and_one_third_subject() -> None:
    table = _table([(1.0, 1.0)] * 3000)
    a = FusionPlan(table, PlanSettings(method="random", seed=7)).schedule(5).choices
    b = FusionPlan(table, PlanSettings(method="random", seed=7)).schedule(5).choices
    c = FusionPlan(table, PlanSettings(method="random", seed=8)).schedule(5).choices
    assert torch.equal(a, b) and not torch.equal(a, c)
    share = float((a[:, 0] == 0).float().mean())
    assert 0.30 < share < 0.37
    assert torch.equal(a[:, 0], a[:, 4])  # one draw per layer, constant over steps


def test_changes_list_only_flips_after_step_zero() -> None:
    plan = FusionPlan(_table([(0.7, 1.0), (5.0, 1.0), (1.2, 1.0)]), PlanSettings(gamma="paper"))
    schedule = plan.schedule(10)
    assert schedule.changed(0) == (0, 1, 2)
    flips = {step: schedule.changed(step) for step in range(1, 10) if schedule.changed(step)}
    # tau 0.7 -> S(r) > 0.7 from r = 0.2 (step 2); tau 1.2 -> from r = 0.5 (step 5); tau 5 never.
    assert flips == {2: (0,), 5: (2,)}
    assert schedule.switch_steps(0) == [2] and schedule.switch_steps(1) == []


def test_json_contract(lora_pair, cache) -> None:
    subject, style = lora_pair
    plan = plan_from_files(subject, style, PlanSettings(pattern="s*"), cache=cache)
    document = plan.to_json(12)
    assert {"steps", "gamma", "alpha", "beta", "pattern", "layers"} <= set(document)
    assert document["steps"] == 12 and document["pattern"] == "s*" and document["beta"] == 1.3
    assert len(document["layers"]) == len(SMALL_SHAPES)
    for layer in document["layers"]:
        assert layer["name"].startswith("lora_unet_")  # the subject file's own key stem
        assert isinstance(layer["k"], int) and layer["k"] == 4 * 8
        assert len(layer["choices"]) == 12 and set(layer["choices"]) <= {"subject", "style"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "blend"},
        {"pattern": "t"},
        {"gamma": "median"},
        {"alpha": float("nan")},
        {"strengths": (1, float("inf"))},
    ],
)
def test_invalid_settings_are_clear(kwargs) -> None:
    with pytest.raises(ValueError, match=r"unknown|finite"):
        PlanSettings(**kwargs)
