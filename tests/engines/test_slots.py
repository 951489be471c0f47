"""The A1111 engine (slot networks) against a CPU stand-in of the built-in Lora extension.

Every expected weight is computed here from the LoRA files themselves (up @ down · alpha/rank · strength,
added in the host's order), never from the engine or the fake's modules.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lib_klora.dynamic.kl import kl_divergences
from lib_klora.engines import slots as engine
from lib_klora.engines.kept_merges import DIRTY, restore_layers
from lib_klora.engines.network_modules import HostDelta
from lib_klora.engines.slots import (
    JobError,
    NetworkCache,
    guard_sample,
    inject_slots,
    on_step,
    teardown,
)
from lib_klora.loras.safetensors_header import pickle_refusal
from tests.engines.slots_fixtures import (
    ALL_LAYERS,
    BOTH,
    MANAGED,
    STEPS,
    STYLE,
    STYLE_LAYERS,
    STYLE_STRENGTH,
    SUBJECT,
    SUBJECT_LAYERS,
    SUBJECT_STRENGTH,
    USER_LAYERS,
    USER_STRENGTH,
    A,
    B,
    C,
    D,
    E,
    FakeDenoiser,
    Host,
    assert_pristine,
    dense_delta,
    expected_choices,
    expected_weight,
    make_host,
    slot_deltas,
    slots_in,
)
from tests.hosts.fake_lora_extension import TE_LAYER, TinyModel, write_kohya_lora


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    yield from make_host(tmp_path)


# ---------------------------------------------------------------- 1. exact weights


def test_step0_merges_base_plus_chosen_delta_exactly(host: Host) -> None:
    job = host.job(host.params())
    assert inject_slots(host.nets, job, is_hires=False)
    schedule = expected_choices(job, STEPS)
    records = host.sample(job, STEPS)
    for record in records:
        choices = schedule.at(record.step).tolist()
        for i, name in enumerate(MANAGED):
            want = expected_weight(host, name, slot_deltas(choices[i]))
            assert torch.equal(record.weights[name], want), (record.step, name)
    # The schedule really is a per-layer, per-step choice here (not one LoRA everywhere).
    assert schedule.at(0).tolist() == [SUBJECT] * 3
    assert set(schedule.choices.flatten().tolist()) == {SUBJECT, STYLE}


def test_merge_baseline_is_base_plus_both(host: Host) -> None:
    job = host.job(host.params(method="merge"))
    inject_slots(host.nets, job, is_hires=False)
    for record in host.sample(job, 4):
        for name in MANAGED:
            assert torch.equal(record.weights[name], expected_weight(host, name, slot_deltas(BOTH))), name


def test_scores_come_from_the_host_modules_at_strength_one(host: Host) -> None:
    job = host.job(host.params(subject_strength=2.5))
    assert [layer.canonical for layer in job.table.layers] == MANAGED
    assert job.nets[0].unet_multiplier == job.nets[0].te_multiplier == 2.5  # set back after scoring
    again = host.job(host.params(subject_strength=0.3))
    assert again.table is job.table  # strengths are not part of the score key
    assert host.scores.hits == 1
    for layer_scores in job.table.layers:
        for which, lora in enumerate(("subject", "style")):
            delta = dense_delta(host, lora, layer_scores.canonical, 1.0).abs().flatten()
            k = layer_scores.k
            assert layer_scores.scores[which] == pytest.approx(float(delta.topk(k).values.sum()), rel=1e-5)
            assert layer_scores.l1[which] == pytest.approx(float(delta.sum()), rel=1e-5)


def test_host_delta_factors_match_calc_updown(host: Host) -> None:
    job = host.job(host.params())
    for net in job.nets:
        net.unet_multiplier = 1.0
        for name in MANAGED:
            module = net.modules[name]
            source = HostDelta(module, host.model.layer(name))
            up, down = source.factors("cpu")
            assert torch.allclose(up @ down, source.delta("cpu"), atol=1e-6)
            assert source.rank == module.dim and source.numel == host.pristine[name][0].numel()


# ---------------------------------------------------------------- 2. only flipped layers re-merge


def test_only_flipped_layers_remerge(host: Host) -> None:
    job = host.job(host.params())
    inject_slots(host.nets, job, is_hires=False)
    schedule = expected_choices(job, STEPS)
    records = host.sample(job, STEPS)
    # First ever forward: Lora merges every layer any slot applies to (TE: both LoRAs, by policy).
    assert Counter(layer for layer, _ in records[0].merges) == {A: 1, B: 1, C: 1, D: 1, E: 1, TE_LAYER: 2}
    partial = [s for s in range(1, STEPS) if 0 < len(schedule.changed(s)) < len(MANAGED)]
    quiet = [s for s in range(1, STEPS) if not schedule.changed(s)]
    assert partial and quiet, "the test LoRAs must give steps with some flips and steps with none"
    for record in records[1:]:
        flipped = {MANAGED[i] for i in schedule.changed(record.step)}
        assert sorted(layer for layer, _ in record.merges) == sorted(flipped), record.step
    for step in quiet:
        assert records[step].merges == []


# ---------------------------------------------------------------- 3. back-to-back jobs: test_kept_merges.py


# ---------------------------------------------------------------- 4. teardown


@pytest.mark.parametrize("stop_after", [STEPS, 3, 1], ids=["complete", "interrupted", "after-step-0"])
def test_teardown_restores_every_touched_layer_bit_for_bit(host: Host, stop_after: int) -> None:
    job = host.job(host.params())
    inject_slots(host.nets, job, is_hires=False)
    host.sample(job, STEPS, stop_after=stop_after)
    assert not torch.equal(host.weight(A), host.pristine[A][0])
    restored = teardown(host.nets, job)
    assert restored == len(ALL_LAYERS)
    assert slots_in(host.nets) == []
    assert job.selection.live is False
    assert_pristine(host)
    for name in ALL_LAYERS:
        assert host.model.layer(name).network_current_names == ()
    # A later job without networks (Lora's empty activation) leaves the weights untouched.
    host.nets.load_networks([])
    host.nets.calc_updown_calls.clear()
    assert torch.equal(host.forward(), host.base_output)
    assert host.nets.calc_updown_calls == []
    assert_pristine(host)


def test_teardown_twice_and_before_any_forward_is_harmless(host: Host) -> None:
    job = host.job(host.params())
    inject_slots(host.nets, job, is_hires=False)
    assert teardown(host.nets, job) == 0  # nothing merged yet
    assert teardown(host.nets, job) == 0
    assert_pristine(host)


def test_eager_restore_protects_a_functional_mode_job_after_merge_mode(host: Host) -> None:
    """P4: network_forward returns before restoring when no network is loaded."""
    job = host.job(host.params())
    inject_slots(host.nets, job, is_hires=False)
    host.sample(job, STEPS)
    teardown(host.nets, job)
    host.nets.load_networks([])
    host.nets.lora_functional = True
    assert torch.equal(host.forward(), host.base_output)


def test_restore_layers_skips_layers_without_a_backup(host: Host) -> None:
    layer = host.model.layer(A)
    layer.network_current_names = DIRTY  # marked, but Lora never merged it (no backup)
    assert restore_layers(host.nets, [layer]) == 1
    assert layer.network_current_names == ()
    assert torch.equal(layer.weight, host.pristine[A][0])


# ---------------------------------------------------------------- 5. user LoRAs stay applied


def test_user_lora_before_the_slots_stays_applied(host: Host) -> None:
    host.nets.load_networks(["user"], [USER_STRENGTH])  # what a <lora:user:0.5> tag does
    job = host.job(host.params())
    inject_slots(host.nets, job, is_hires=False)
    assert host.nets.loaded_networks[0].name == "user"
    assert len(slots_in(host.nets)) == 2
    schedule = expected_choices(job, STEPS)
    user = [("user", USER_STRENGTH)]
    records = host.sample(job, STEPS)
    for record in records:
        choices = schedule.at(record.step).tolist()
        for i, name in enumerate(MANAGED):
            applied = (user if name in USER_LAYERS else []) + slot_deltas(choices[i])
            assert torch.equal(record.weights[name], expected_weight(host, name, applied)), (
                record.step,
                name,
            )
        if record.step:  # a flip of a user-adapted layer re-merges the user LoRA too
            flipped = {MANAGED[i] for i in schedule.changed(record.step)}
            want = sum(2 if name in USER_LAYERS else 1 for name in flipped)
            assert len(record.merges) == want
    teardown(host.nets, job)
    assert [net.name for net in host.nets.loaded_networks] == ["user"]
    host.forward()
    assert torch.equal(host.weight(A), expected_weight(host, A, user))
    assert torch.equal(host.weight(B), host.pristine[B][0])


# ---------------------------------------------------------------- 6. functional mode


def test_functional_mode_matches_merge_mode(host: Host) -> None:
    merged = host.job(host.params())
    inject_slots(host.nets, merged, is_hires=False)
    merge_records = host.sample(merged, STEPS)
    teardown(host.nets, merged)

    host.nets.lora_functional = True
    functional = host.job(host.params())
    inject_slots(host.nets, functional, is_hires=False)
    functional_records = host.sample(functional, STEPS)
    schedule = expected_choices(functional, STEPS)
    assert any(schedule.changed(s) for s in range(1, STEPS))
    for m, f in zip(merge_records, functional_records, strict=True):
        assert torch.allclose(m.output, f.output, atol=1e-5), m.step
        assert f.merges == []  # functional mode never merges
        for name in ALL_LAYERS:  # and never writes a weight
            assert torch.equal(f.weights[name], host.pristine[name][0])
    assert not torch.allclose(merge_records[0].output, merge_records[-1].output)
    teardown(host.nets, functional)
    assert_pristine(host)


# ---------------------------------------------------------------- 7. slots never raise


def test_slot_modules_serve_the_choice_and_stay_empty(host: Host) -> None:
    job = host.job(host.params())
    inject_slots(host.nets, job, is_hires=False)
    subject_slot, style_slot = job.slots
    assert len(subject_slot.modules) == 0 and list(subject_slot.modules.items()) == []
    assert subject_slot.modules.get(A) is job.nets[0].modules[A]
    assert style_slot.modules.get(A) is None  # step-0 choice is the subject everywhere
    assert A in subject_slot.modules and A not in style_slot.modules
    assert subject_slot.modules[A] is job.nets[0].modules[A]
    with pytest.raises(KeyError):
        style_slot.modules[A]
    assert style_slot.modules.get("not_a_layer", "default") == "default"
    assert subject_slot.mentioned_name is None and subject_slot.dyn_dim is None
    assert subject_slot.te_multiplier == subject_slot.unet_multiplier == SUBJECT_STRENGTH
    assert isinstance(subject_slot, sys.modules["network"].Network)


@pytest.mark.parametrize("breakage", ["selection", "owner", "nets", "current"])
def test_slot_get_never_raises_on_a_broken_job(host: Host, breakage: str) -> None:
    job = host.job(host.params())
    inject_slots(host.nets, job, is_hires=False)
    sentinel = object()
    if breakage == "selection":
        job.selection = None  # type: ignore[assignment]
    elif breakage == "owner":
        job.owner = None  # type: ignore[assignment]
    elif breakage == "nets":
        job.nets = ()  # type: ignore[assignment]
    else:
        job.selection.current = []  # index out of range
    # A broken per-layer choice only blinds the managed layers; the other breakages blind all of them.
    names = MANAGED if breakage == "current" else ALL_LAYERS
    for slot in job.slots:
        for name in names:
            assert slot.modules.get(name, sentinel) is sentinel
            assert name not in slot.modules
    host.forward()  # and the UNet forward goes through


def test_stale_slot_applies_nothing(host: Host) -> None:
    job = host.job(host.params())
    inject_slots(host.nets, job, is_hires=False)
    slots = list(job.slots)
    host.sample(job, 2)
    teardown(host.nets, job)
    sentinel = object()
    for slot in slots:
        for name in ALL_LAYERS:
            assert slot.modules.get(name, sentinel) is sentinel
    # A leaked reference back in the list merges nothing.
    host.nets.loaded_networks.extend(slots)
    host.forward()
    assert_pristine(host)


# ---------------------------------------------------------------- 8. text-encoder policy


@pytest.mark.parametrize(
    ("policy", "applied"),
    [
        ("both", [("subject", SUBJECT_STRENGTH), ("style", STYLE_STRENGTH)]),
        ("subject", [("subject", SUBJECT_STRENGTH)]),
        ("style", [("style", STYLE_STRENGTH)]),
        ("none", []),
    ],
)
def test_text_encoder_policy(host: Host, policy: str, applied: list[tuple[str, float]]) -> None:
    job = host.job(host.params(te_policy=policy))
    inject_slots(host.nets, job, is_hires=False)
    for record in host.sample(job, STEPS):
        assert torch.equal(record.weights[TE_LAYER], expected_weight(host, TE_LAYER, applied)), record.step
    assert not engine.is_text_encoder_layer(A) and engine.is_text_encoder_layer(TE_LAYER)


def test_text_encoder_uses_the_te_multiplier(host: Host) -> None:
    job = host.job(host.params(te_policy="subject"))
    inject_slots(host.nets, job, is_hires=False)
    host.forward()
    assert job.nets[0].modules[TE_LAYER].multiplier() == job.nets[0].te_multiplier == SUBJECT_STRENGTH


# ---------------------------------------------------------------- 9. sampler bookkeeping


def test_second_order_sampler_maps_two_evaluations_to_one_step(host: Host) -> None:
    job = host.job(host.params())
    inject_slots(host.nets, job, is_hires=False)
    schedule = expected_choices(job, STEPS)
    denoiser = FakeDenoiser(total_steps=2 * STEPS)
    records = host.sample(job, 2 * STEPS, evals_per_step=2, denoiser=denoiser)
    assert job.tracker.steps == STEPS and job.tracker.step == STEPS - 1
    assert [(r.label, r.schedule.steps) for r in job.passes] == [("first pass", STEPS)]
    for record in records:
        step = record.step // 2
        choices = schedule.at(step).tolist()
        for i, name in enumerate(MANAGED):
            assert torch.equal(record.weights[name], expected_weight(host, name, slot_deltas(choices[i])))
        if record.step % 2:  # the second evaluation of a step never switches
            assert record.merges == []


def test_tracker_clamps_an_odd_evaluation_count(host: Host) -> None:
    job = host.job(host.params())
    inject_slots(host.nets, job, is_hires=False)
    host.sample(job, 2 * STEPS + 1, evals_per_step=2)
    assert job.tracker.steps == STEPS and job.tracker.step == STEPS - 1


def test_hires_pass_is_a_new_pass_with_its_own_settings(host: Host) -> None:
    base = host.params(hires="separate", hires_method="merge")
    job = host.job(base.for_pass(False), base.for_pass(True))
    inject_slots(host.nets, job, is_hires=False)
    host.sample(job, STEPS)
    first_slots = list(job.slots)
    inject_slots(host.nets, job, is_hires=True)  # after_extra_networks_activate of the hires pass
    assert len(slots_in(host.nets)) == 2 and job.slots != first_slots
    assert job.slots[0].name != first_slots[0].name  # another method: another signature
    hires_steps = 4
    records = host.sample(job, hires_steps, is_hires=True)
    assert [(r.label, r.schedule.steps) for r in job.passes] == [
        ("first pass", STEPS),
        ("hires pass", hires_steps),
    ]
    assert job.tracker.pass_index == 1
    for record in records:
        for name in MANAGED:
            assert torch.equal(record.weights[name], expected_weight(host, name, slot_deltas(BOTH)))


def test_a_new_denoiser_object_starts_a_new_pass_even_mid_count(host: Host) -> None:
    job = host.job(host.params())
    inject_slots(host.nets, job, is_hires=False)
    host.sample(job, STEPS)
    again = FakeDenoiser(total_steps=STEPS, step=5)
    host.nets.calc_updown_calls.clear()
    on_step(job, again, False, 1)
    assert job.tracker.pass_index == 1 and job.tracker.step == 5
    assert len(job.passes) == 1  # one record per pass label
    host.forward()
    schedule = expected_choices(job, STEPS)
    differing = {
        MANAGED[i] for i, (a, b) in enumerate(zip(schedule.at(9), schedule.at(5), strict=True)) if a != b
    }
    # New pass: exactly the layers whose merged choice (the last step's) is not step 5's.
    assert {layer for layer, _ in host.nets.calc_updown_calls} == differing
    for i, name in enumerate(MANAGED):
        want = expected_weight(host, name, slot_deltas(int(schedule.at(5)[i])))
        assert torch.equal(host.weight(name), want), name


def test_hires_off_means_no_slots_in_the_hires_pass(host: Host) -> None:
    base = host.params(hires="off")
    job = host.job(base.for_pass(False), base.for_pass(True))
    assert inject_slots(host.nets, job, is_hires=False)
    assert not inject_slots(host.nets, job, is_hires=True)
    assert slots_in(host.nets) == []
    on_step(job, FakeDenoiser(total_steps=3), True, 1)  # no-op
    assert job.passes == []


def test_inject_reapplies_this_jobs_strengths_to_the_shared_networks(host: Host) -> None:
    job = host.job(host.params())
    host.job(host.params(subject_strength=0.3, style_strength=2.0))  # same cached Network objects
    assert job.nets[0].unet_multiplier == 0.3
    inject_slots(host.nets, job, is_hires=False)
    assert job.nets[0].unet_multiplier == job.nets[0].te_multiplier == SUBJECT_STRENGTH
    assert job.nets[1].unet_multiplier == STYLE_STRENGTH
    record = host.sample(job, 1)[0]
    assert torch.equal(record.weights[A], expected_weight(host, A, slot_deltas(SUBJECT)))


def test_failed_job_injects_nothing(host: Host) -> None:
    job = host.job(host.params())
    job.failed = "boom"
    assert not inject_slots(host.nets, job, is_hires=False)
    assert slots_in(host.nets) == []


def test_inject_is_idempotent_and_keeps_the_list_object(host: Host) -> None:
    host.nets.load_networks(["user"], [USER_STRENGTH])
    the_list = host.nets.loaded_networks
    job = host.job(host.params())
    for _ in range(3):
        inject_slots(host.nets, job, is_hires=False)
    assert host.nets.loaded_networks is the_list
    assert [net.name.split(":")[:2] for net in the_list] == [
        ["user"],
        ["klora", "subject"],
        ["klora", "style"],
    ]


# ---------------------------------------------------------------- P5: the backup guard


def test_step0_on_a_fresh_model_marks_nothing_and_the_forward_works(host: Host) -> None:
    job = host.job(host.params())
    inject_slots(host.nets, job, is_hires=False)
    on_step(job, FakeDenoiser(total_steps=STEPS), False, 1)
    for name in MANAGED:
        assert getattr(host.model.layer(name), "network_current_names", ()) == ()
    host.forward()


def test_fake_host_raises_on_a_marked_layer_without_backup(host: Host) -> None:
    """The host behaviour the guard exists for (networks.py L427-428)."""
    job = host.job(host.params())
    inject_slots(host.nets, job, is_hires=False)
    host.model.layer(A).network_current_names = DIRTY
    with pytest.raises(RuntimeError, match="no backup weights found"):
        host.forward()


# ---------------------------------------------------------------- 10. single-LoRA layers


def test_layers_only_one_lora_adapts_are_always_applied(host: Host) -> None:
    job = host.job(host.params())
    inject_slots(host.nets, job, is_hires=False)
    assert D in job.table.exclusive[0] and E in job.table.exclusive[1]
    want_d = expected_weight(host, D, [("subject", SUBJECT_STRENGTH)])
    want_e = expected_weight(host, E, [("style", STYLE_STRENGTH)])
    for record in host.sample(job, STEPS):
        assert torch.equal(record.weights[D], want_d), record.step
        assert torch.equal(record.weights[E], want_e), record.step
    assert {m.network_layer_name for m in job.touched_modules} == set(ALL_LAYERS)
    assert [m.network_layer_name for m in job.layer_modules] == MANAGED


# ---------------------------------------------------------------- 11. errors and loading


def test_unknown_lora_is_named(host: Host) -> None:
    with pytest.raises(JobError, match="'nonexistent'"):
        host.job(host.params(style="nonexistent"))


def test_a_file_added_after_startup_is_found(host: Host) -> None:
    write_kohya_lora(host.lora_dir / "late.safetensors", host.model, STYLE_LAYERS, rank=2, alpha=1.0, seed=9)
    assert "late" not in host.nets.available_networks
    job = host.job(host.params(style="late"))
    assert job.nets[1].name == "late"


def test_alias_resolves_and_pickles_are_refused(host: Host) -> None:
    write_kohya_lora(
        host.lora_dir / "file_name.safetensors",
        host.model,
        STYLE_LAYERS,
        rank=2,
        alpha=1.0,
        seed=9,
        metadata={"ss_output_name": "pretty"},
    )
    torch.save({"lora_unet_a.lora_down.weight": torch.zeros(1, 8)}, host.lora_dir / "pickled.pt")
    host.nets.list_available_networks()
    assert host.job(host.params(style="pretty")).nets[1].network_on_disk.name == "file_name"
    with pytest.raises(JobError) as refused:
        host.job(host.params(style="pickled"))
    assert pickle_refusal(host.lora_dir / "pickled.pt") in str(refused.value)  # the reader's own words
    assert "pickled" not in host.nets.loads


def test_forbidden_alias_resolves_by_name_only(host: Host) -> None:
    for name in ("one", "two"):
        write_kohya_lora(
            host.lora_dir / f"{name}.safetensors",
            host.model,
            STYLE_LAYERS,
            rank=2,
            alpha=1.0,
            seed=5,
            metadata={"ss_output_name": "shared"},
        )
    host.nets.list_available_networks()
    assert "shared" in host.nets.forbidden_network_aliases
    assert host.job(host.params(style="two")).nets[1].name == "two"
    with pytest.raises(JobError, match="'shared'"):
        host.job(host.params(style="shared"))


@pytest.mark.parametrize("layers", [{TE_LAYER: 1.0}, {}], ids=["text-encoder-only", "no-key-matches"])
def test_lora_without_unet_layers_is_refused(host: Host, layers: dict[str, float]) -> None:
    path = host.lora_dir / "other.safetensors"
    if layers:
        write_kohya_lora(path, host.model, layers, rank=2, alpha=1.0, seed=4)
    else:  # keys for another model: the host drops them silently (debug log)
        other = TinyModel()
        other.network_layer_mapping = {"diffusion_model_zzz": other.unet["a"]}
        write_kohya_lora(path, other, {"diffusion_model_zzz": 1.0}, rank=2, alpha=1.0, seed=4)
    host.nets.list_available_networks()
    with pytest.raises(JobError, match=r"found no UNet layer .* in LoRA 'other'"):
        host.job(host.params(style="other"))


def test_loras_sharing_no_unet_layer_are_refused(host: Host) -> None:
    write_kohya_lora(host.lora_dir / "only_e.safetensors", host.model, {E: 1.0}, rank=2, alpha=1.0, seed=4)
    host.nets.list_available_networks()
    with pytest.raises(JobError, match="in common"):
        host.job(host.params(style="only_e"))


def test_build_job_needs_parameters(host: Host) -> None:
    with pytest.raises(ValueError):
        host.job(None, None)


def test_network_cache_reuses_private_networks_per_model(host: Host) -> None:
    cache = host.cache
    first = cache.load(host.nets, "subject", host.model)
    assert cache.load(host.nets, "subject", host.model) is first
    assert host.nets.loads == ["subject"]
    other_model = object()  # another checkpoint: NetworkModule.sd_module would point at the old one
    assert cache.load(host.nets, "subject", other_model) is not first
    cache.clear()
    assert cache.load(host.nets, "subject", host.model) is not first
    small = NetworkCache(max_entries=1)
    a = small.load(host.nets, "subject", host.model)
    small.load(host.nets, "style", host.model)
    assert small.load(host.nets, "subject", host.model) is not a
    assert host.nets.loaded_networks == []  # private loads never touch the user's list


def test_lora_extension_is_found_by_identity(host: Host) -> None:
    assert engine.lora_extension() is host.nets
    saved = sys.modules["networks"]
    sys.modules["networks"] = type(sys)("networks")  # an unrelated module of that generic name
    try:
        assert engine.lora_extension() is None
    finally:
        sys.modules["networks"] = saved


# ---------------------------------------------------------------- method "dynamic" (forward hooks)


def _layer_out(host: Host, name: str, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    bias = host.pristine[name][1]
    if weight.ndim == 4:
        return torch.nn.functional.conv2d(h, weight, bias, padding=1)
    return torch.nn.functional.linear(h, weight, bias)


def reference_dynamic_forward(
    host: Host, te_loras: list[tuple[str, float]]
) -> tuple[torch.Tensor, list[int]]:
    """TinyModel.forward with pristine UNet weights, each managed layer's delta chosen by the KL rule
    (larger divergence wins, computed here on every token), single-LoRA layers always applied."""
    strengths = {"subject": SUBJECT_STRENGTH, "style": STYLE_STRENGTH}
    choices: list[int] = []

    def unet_layer(name: str, h: torch.Tensor) -> torch.Tensor:
        base = _layer_out(host, name, h, host.pristine[name][0])
        zero = torch.zeros_like(host.pristine[name][0])
        deltas = [
            _layer_out(host, name, h, dense_delta(host, lora, name, strengths[lora]))
            - _layer_out(host, name, h, zero)
            for lora, layers in (("subject", SUBJECT_LAYERS), ("style", STYLE_LAYERS))
            if name in layers
        ]
        if len(deltas) == 1:
            return base + deltas[0]
        div_subject, div_style = kl_divergences(base, *deltas, channel_dim=1 if base.ndim == 4 else -1)
        choice = 0 if div_subject >= div_style else 1
        choices.append(choice)
        return base + deltas[choice]

    x, text = host.inputs
    te_weight = expected_weight(host, TE_LAYER, te_loras)
    h = torch.tanh(unet_layer(A, x) + torch.nn.functional.linear(text, te_weight, host.pristine[TE_LAYER][1]))
    h = unet_layer(B, h).reshape(-1, 4, 4, 4)
    h = torch.tanh(unet_layer(C, h)).flatten(1)
    return unet_layer(E, unet_layer(D, h)), choices


def hooked(host: Host) -> list[str]:
    return [name for name in ALL_LAYERS if host.model.layer(name)._forward_hooks]


def test_dynamic_applies_the_more_divergent_delta_through_hooks(host: Host) -> None:
    job = host.job(host.params(method="dynamic"))
    assert hooked(host) == [A, B, C, D, E]  # every UNet layer either LoRA adapts; never the text encoder
    inject_slots(host.nets, job, is_hires=False)
    records = host.sample(job, 4)
    expected, choices = reference_dynamic_forward(
        host, [("subject", SUBJECT_STRENGTH), ("style", STYLE_STRENGTH)]
    )
    for record in records:
        torch.testing.assert_close(record.output, expected, rtol=1e-5, atol=1e-5)
        # No UNet weight is merged: the slots serve only the text encoder (te_policy "both").
        assert {layer for layer, _ in record.merges} <= {TE_LAYER}
        for name in (A, B, C, D, E):
            assert torch.equal(record.weights[name], host.pristine[name][0])
    table, labels = job.passes[0].choices()
    assert labels == ("subject", "style")
    assert [row[0] for row in table] == choices  # one decision per (pass, step, layer), recorded
    assert all(len(set(row)) == 1 for row in table)  # same input every step: same decision


def test_dynamic_te_policy_still_goes_through_the_slots(host: Host) -> None:
    job = host.job(host.params(method="dynamic", te_policy="style"))
    inject_slots(host.nets, job, is_hires=False)
    record = host.sample(job, 1)[0]
    expected, _ = reference_dynamic_forward(host, [("style", STYLE_STRENGTH)])
    torch.testing.assert_close(record.output, expected, rtol=1e-5, atol=1e-5)


def test_dynamic_hooks_are_gone_after_teardown(host: Host) -> None:
    job = host.job(host.params(method="dynamic"))
    inject_slots(host.nets, job, is_hires=False)
    host.sample(job, 2)
    teardown(host.nets, job)
    assert hooked(host) == []
    torch.testing.assert_close(host.forward(), host.base_output)


def test_a_failing_job_removes_hooks_and_restores_weights_at_once(host: Host) -> None:
    job = host.job(host.params(method="dynamic", hires="separate", hires_method="klora"))
    inject_slots(host.nets, job, is_hires=False)
    failures: list[BaseException] = []

    def sample(*_args: Any) -> None:
        host.sample(job, 2)
        inject_slots(host.nets, job, is_hires=True)  # a hires pass merges K-LoRA choices ...
        host.sample(job, 1, is_hires=True, denoiser=FakeDenoiser(total_steps=3))
        raise RuntimeError("out of memory")  # ... then sampling dies

    p = type("P", (), {"sample": staticmethod(sample)})()
    guard_sample(p, job, host.nets, failures.append)
    with pytest.raises(RuntimeError, match="out of memory"):
        p.sample()
    assert [str(f) for f in failures] == ["out of memory"]
    assert hooked(host) == []
    assert not any(isinstance(n, type(job.slots[0])) for n in host.nets.loaded_networks)
    for name in ALL_LAYERS:
        assert torch.equal(host.weight(name), host.pristine[name][0])
    torch.testing.assert_close(host.forward(), host.base_output)


def test_klora_first_pass_then_dynamic_hires_unmerges_and_hooks(host: Host) -> None:
    base = host.params(hires="separate", hires_method="dynamic")
    job = host.job(base.for_pass(False), base.for_pass(True))
    inject_slots(host.nets, job, is_hires=False)
    first = host.sample(job, 3)
    assert any(layer in MANAGED for layer, _ in first[0].merges)  # K-LoRA merges in the first pass
    assert job.dynamic is not None and not job.dynamic.live
    inject_slots(host.nets, job, is_hires=True)
    hires = host.sample(job, 2, is_hires=True, denoiser=FakeDenoiser(total_steps=2))
    expected, _ = reference_dynamic_forward(host, [("subject", SUBJECT_STRENGTH), ("style", STYLE_STRENGTH)])
    torch.testing.assert_close(hires[-1].output, expected, rtol=1e-5, atol=1e-5)
    assert [r.label for r in job.passes] == ["first pass", "hires pass"]
    assert job.passes[0].schedule is not None and job.passes[1].schedule is None


def test_a_dynamic_first_pass_then_klora_hires_remerges_single_lora_layers(host: Host) -> None:
    base = host.params(method="dynamic", hires="separate", hires_method="klora")
    job = host.job(base.for_pass(False), base.for_pass(True))
    inject_slots(host.nets, job, is_hires=False)
    host.sample(job, 2)
    inject_slots(host.nets, job, is_hires=True)
    record = host.sample(job, 1, is_hires=True, denoiser=FakeDenoiser(total_steps=4))[0]
    assert torch.equal(record.weights[D], expected_weight(host, D, [("subject", SUBJECT_STRENGTH)]))
    assert torch.equal(record.weights[E], expected_weight(host, E, [("style", STYLE_STRENGTH)]))
    teardown(host.nets, job)
    assert hooked(host) == []
