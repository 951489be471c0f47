from __future__ import annotations

import pytest
import torch

from lib_klora.engines.tracking import TE_POLICIES, LayerSelection, PassTracker
from lib_klora.fusion.plan import StepSchedule

SUBJECT, STYLE, BOTH = 0, 1, 2
MANAGED = ["diffusion_model_a", "diffusion_model_b", "diffusion_model_c"]
TE = "transformer_text_model_encoder_layers_0_self_attn_q_proj"
ONLY_ONE = "diffusion_model_d"  # a denoiser layer a single LoRA adapts


def _selection(policy: str = "both") -> LayerSelection:
    return LayerSelection(MANAGED, te_policy=policy, is_text_encoder=lambda n: not n.startswith("diffusion_"))


# ---------------------------------------------------------------- LayerSelection


def test_starts_on_the_subject_everywhere() -> None:
    selection = _selection()
    assert selection.current == [SUBJECT] * 3
    assert all(selection.enabled(SUBJECT, name) and not selection.enabled(STYLE, name) for name in MANAGED)


def test_managed_layer_follows_its_choice() -> None:
    selection = _selection()
    selection.apply([SUBJECT, STYLE, BOTH])
    assert [selection.enabled(SUBJECT, n) for n in MANAGED] == [True, False, True]
    assert [selection.enabled(STYLE, n) for n in MANAGED] == [False, True, True]  # BOTH = merge baseline


@pytest.mark.parametrize(
    ("policy", "subject", "style"),
    [("both", True, True), ("subject", True, False), ("style", False, True), ("none", False, False)],
)
def test_text_encoder_policy(policy: str, subject: bool, style: bool) -> None:
    selection = _selection(policy)
    selection.apply([STYLE] * 3)  # the per-step choice never reaches the text encoder
    assert (selection.enabled(SUBJECT, TE), selection.enabled(STYLE, TE)) == (subject, style)


def test_policy_can_change_after_construction() -> None:
    # inject_slots sets the policy of each pass on the shared selection.
    selection = _selection("both")
    selection.te_policy = "none"
    assert not selection.enabled(SUBJECT, TE)


@pytest.mark.parametrize("policy", TE_POLICIES)
def test_single_lora_denoiser_layer_is_always_on(policy: str) -> None:
    selection = _selection(policy)
    for choices in ([SUBJECT] * 3, [STYLE] * 3, [BOTH] * 3):
        selection.apply(choices)
        assert selection.enabled(SUBJECT, ONLY_ONE) and selection.enabled(STYLE, ONLY_ONE)


def test_not_live_enables_nothing() -> None:
    selection = _selection()
    selection.live = False
    assert not any(selection.enabled(w, n) for w in (SUBJECT, STYLE) for n in [*MANAGED, TE, ONLY_ONE])


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="text-encoder policy"):
        _selection("sometimes")


def test_default_classifier_sees_no_text_encoder() -> None:
    selection = LayerSelection(MANAGED, te_policy="none")
    assert selection.enabled(STYLE, TE)  # without a classifier an unknown layer is a single-LoRA layer


def test_apply_returns_the_changed_indices_and_stores_ints() -> None:
    selection = _selection()
    assert selection.apply([SUBJECT, SUBJECT, SUBJECT]) == []
    assert selection.apply(torch.tensor([SUBJECT, STYLE, STYLE], dtype=torch.uint8).tolist()) == [1, 2]
    assert selection.apply([SUBJECT, STYLE, SUBJECT]) == [2]
    assert selection.current == [SUBJECT, STYLE, SUBJECT]
    assert all(type(c) is int for c in selection.current)
    assert selection.apply([BOTH, BOTH, BOTH]) == [0, 1, 2]


def test_apply_with_the_wrong_length_is_an_error() -> None:
    with pytest.raises(ValueError):
        _selection().apply([SUBJECT, STYLE])


def test_more_loras_all_means_every_lora() -> None:
    selection = LayerSelection(["x"], lora_count=3)
    selection.apply([3])
    assert all(selection.enabled(w, "x") for w in range(3))
    selection.apply([2])
    assert [selection.enabled(w, "x") for w in range(3)] == [False, False, True]


def test_given_current_is_kept() -> None:
    assert LayerSelection(MANAGED, current=[STYLE, STYLE, SUBJECT]).current == [STYLE, STYLE, SUBJECT]


# ---------------------------------------------------------------- PassTracker


def test_first_update_starts_a_pass() -> None:
    tracker = PassTracker()
    assert tracker.pass_index == -1 and tracker.progress == 0.0
    key = object()
    assert tracker.update(key, 0, 20) is True
    assert (tracker.pass_index, tracker.steps, tracker.step) == (0, 20, 0)


def test_same_key_later_evaluations_continue_the_pass() -> None:
    tracker, key = PassTracker(), object()
    tracker.update(key, 0, 20)
    assert tracker.update(key, 1, 20) is False
    assert tracker.update(key, 7, 20) is False
    assert (tracker.pass_index, tracker.step) == (0, 7)
    assert tracker.progress == pytest.approx(7 / 20)


def test_new_key_starts_a_pass_mid_count() -> None:
    # Hires fix and img2img use a new denoiser object; the first call seen need not be evaluation 0.
    tracker = PassTracker()
    tracker.update(object(), 0, 20)
    assert tracker.update(object(), 3, 8) is True
    assert (tracker.pass_index, tracker.steps, tracker.step) == (1, 8, 3)


def test_evaluation_zero_starts_a_pass_on_the_same_key() -> None:
    tracker, key = PassTracker(), object()
    tracker.update(key, 0, 20)
    tracker.update(key, 5, 20)
    assert tracker.update(key, 0, 10) is True
    assert (tracker.pass_index, tracker.steps, tracker.step) == (1, 10, 0)


def test_key_is_compared_by_identity() -> None:
    tracker = PassTracker()
    tracker.update([1], 0, 4)
    assert tracker.update([1], 1, 4) is True  # equal but another object: another denoiser


def test_second_order_maps_two_evaluations_to_one_step() -> None:
    tracker, key = PassTracker(), object()
    steps = []
    for evaluation in range(20):
        tracker.update(key, evaluation, 20, evals_per_step=2)
        steps.append(tracker.step)
    assert tracker.steps == 10
    assert steps == [e // 2 for e in range(20)]


def test_steps_is_total_floor_divided_and_at_least_one() -> None:
    tracker = PassTracker()
    tracker.update(object(), 0, 21, evals_per_step=2)
    assert tracker.steps == 10
    tracker.update(object(), 0, 1, evals_per_step=2)
    assert tracker.steps == 1
    tracker.update(object(), 0, 0)
    assert tracker.steps == 1


@pytest.mark.parametrize("evals_per_step", [0, -3])
def test_nonpositive_evals_per_step_counts_as_one(evals_per_step: int) -> None:
    tracker = PassTracker()
    tracker.update(object(), 0, 6, evals_per_step=evals_per_step)
    assert tracker.steps == 6


def test_step_is_clamped_at_the_last_step() -> None:
    tracker, key = PassTracker(), object()
    tracker.update(key, 0, 21, evals_per_step=2)
    tracker.update(key, 20, 21, evals_per_step=2)  # one evaluation more than 10 full steps
    assert tracker.step == 9
    tracker.update(key, 57, 21, evals_per_step=2)  # an extra sampler call past the end
    assert tracker.step == 9


def test_choices_at_reads_one_column() -> None:
    choices = torch.tensor([[0, 1, 1], [0, 0, 1]], dtype=torch.uint8)
    schedule = StepSchedule(3, ("subject", "style", "both"), choices, ((0, 1), (0,), (1,)))
    assert schedule.at(1).tolist() == [1, 0]
    assert schedule.at(99).tolist() == [1, 1]  # clamped by the schedule
