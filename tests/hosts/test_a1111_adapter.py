"""`lib_klora.hosts.a1111` (the script and its callbacks) driven as AUTOMATIC1111 v1.10.1 drives it.

`fake_a1111_webui.installed_a1111` puts a minimal `modules` package into sys.modules and imports the glue
against it; generations run through the real `KLoraScript`, the registered callbacks and the built-in Lora
stand-in (`fake_lora_extension`), which merges the weights. Expected weights come from the LoRA files
(`slots_fixtures.expected_weight`), expected choices from a plan scored apart from the glue.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import lib_klora.hosts as hosts_package
from lib_klora.dynamic.branches import LowRankBranch
from lib_klora.engines import slots
from lib_klora.engines.kept_merges import kept_layers
from lib_klora.fusion.plan import StepSchedule
from lib_klora.fusion.selection_map import render_selection_map
from lib_klora.params.model import KLoraParams
from tests.engines.slots_fixtures import (
    ALL_LAYERS,
    BOTH,
    MANAGED,
    STEPS,
    STYLE,
    SUBJECT,
    USER_LAYERS,
    USER_STRENGTH,
    D,
    E,
    Host,
    assert_like_merges,
    assert_pristine,
    count_restores,
    dense_delta,
    expected_weight,
    held_states,
    make_host,
    slot_deltas,
    slots_in,
    switching,
)
from tests.hosts.fake_a1111_webui import KLORA_HOST_MODULES, Evaluation, FakeA1111, installed_a1111
from tests.hosts.fake_lora_extension import TE_LAYER, TinyModel

CONSTANT_CHOICE = {D: SUBJECT, E: STYLE, TE_LAYER: BOTH}  # adapted by one LoRA only, or a text encoder
HIRES_STEPS = 4
SWITCHED_OFF = "K-LoRA was switched off for this image: "


@dataclass
class World:
    webui: FakeA1111
    host: Host
    on_activations: bool  # the "klora_switch_on_activations" setting (the hybrid)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[False, True], ids=["merge-at-switch", "on-activations"])
def world(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[World]:
    kept_layers.release(None)  # layers of earlier tests' models are no business of this one
    before = {name: sys.modules.get(name) for name in ("modules", *KLORA_HOST_MODULES)}
    hosts = make_host(tmp_path)
    host = next(hosts)
    with installed_a1111(tmp_path, host.nets, host.inputs) as webui:
        webui.shared.opts.klora_switch_on_activations = request.param
        yield World(webui, host, request.param)
    next(hosts, None)  # the Lora fake's own checks that it is gone
    kept_layers.release(None)
    assert {name: sys.modules.get(name) for name in before} == before
    assert not any(name.startswith("modules.") for name in sys.modules)
    assert "gradio" not in sys.modules or hasattr(sys.modules["gradio"], "__file__")  # no stand-in left
    assert not any(hasattr(hosts_package, name) for name in ("a1111", "webui", "job_start", "guidance_glue"))


def plan_schedule(host: Host, params: KLoraParams, steps: int) -> StepSchedule:
    """The plan's choices, from a job scored apart from the glue (the engine's own caches)."""
    job = host.job(params)
    return job.plan_for(params).schedule(steps)


def run(
    world: World, params: KLoraParams | None, steps: int = STEPS, prompt: str = "a photo", **fields: Any
) -> tuple[Any, Any, list[Evaluation]]:
    """One generation; returns (p, processed, its evaluations). `params` None: the accordion left off."""
    args = (params.to_dict(),) if params is not None else (KLoraParams().to_dict(),)
    p = world.webui.processing(prompt, args, steps, **fields)
    start = len(world.webui.evaluations)
    processed = world.webui.process_images(p)
    return p, processed, world.webui.evaluations[start:]


def merged(records: list[Evaluation]) -> list[str]:
    return [layer for record in records for layer, _ in record.merges]


def assert_exact(
    world: World, records: list[Evaluation], schedule: StepSchedule, evals_per_step: int = 1
) -> None:
    """Every evaluation saw the plan's choice of its step merged, the constant layers their one LoRA; when
    switching on activations, the layers that switch give the merged output from plain weights."""
    host = world.host
    if world.on_activations:
        assert_like_merges(host, host.params(), schedule, records, evals_per_step)
    for record in records:
        step = record.step // evals_per_step
        for i, name in enumerate(MANAGED):
            if world.on_activations:
                break
            want = expected_weight(host, name, slot_deltas(int(schedule.at(step)[i])))
            assert torch.equal(record.weights[name], want), (record.label, record.step, name)
        for name, choice in CONSTANT_CHOICE.items():
            assert torch.equal(record.weights[name], expected_weight(host, name, slot_deltas(choice))), name


def assert_plain(host: Host, records: list[Evaluation]) -> None:
    for record in records:
        assert record.merges == [] and torch.equal(record.output, host.base_output), record.step
        for name in ALL_LAYERS:
            assert torch.equal(record.weights[name], host.pristine[name][0]), (record.step, name)


def assert_clean(world: World) -> None:
    """No hook or callback raised (the host would only have logged it)."""
    assert world.webui.callbacks.errors == [] and world.webui.script_errors == []


def flips(schedule: StepSchedule, step: int) -> list[str]:
    return sorted(MANAGED[i] for i in schedule.changed(step))


def changed_between(before: StepSchedule, at_before: int, after: StepSchedule, at_after: int) -> list[str]:
    pairs = zip(before.at(at_before).tolist(), after.at(at_after).tolist(), strict=True)
    return sorted(MANAGED[i] for i, (a, b) in enumerate(pairs) if a != b)


# ---------------------------------------------------------------- import and registration


def test_the_glue_imports_against_the_fakes_and_registers_its_callbacks(world: World) -> None:
    a1111, registered = world.webui.a1111, world.webui.callbacks.registered
    assert registered == {
        "on_cfg_denoiser": [a1111.on_cfg_denoiser],
        "on_cfg_after_cfg": [a1111.on_cfg_after_cfg],
        "on_model_loaded": [a1111.on_model_loaded],
        "on_script_unloaded": [a1111.on_script_unloaded],
        "on_ui_settings": [registered["on_ui_settings"][0]],
        "on_before_ui": [registered["on_before_ui"][0]],
        "on_app_started": [registered["on_app_started"][0]],
    }
    assert issubclass(a1111.KLoraScript, sys.modules["modules.scripts"].Script)
    assert a1111.KLoraScript().show(False) is sys.modules["modules.scripts"].AlwaysVisible


# ---------------------------------------------------------------- whole jobs


def test_a_job_merges_the_plans_choice_per_step_and_adds_its_selection_map(world: World) -> None:
    host, params = world.host, world.host.params(show_map=True)
    schedule = plan_schedule(host, params, STEPS)
    p, processed, records = run(world, params)
    assert_clean(world)
    assert p.comments == []
    assert [record.step for record in records] == list(range(STEPS))
    assert_exact(world, records, schedule)
    held = held_states(schedule) if world.on_activations else {}  # served by hooks
    plain = {name for name, keep in held.items() if keep is None}
    assert sorted(set(merged(records[:1]))) == sorted(set(ALL_LAYERS) - plain)  # nothing was merged before
    for record in records[1:]:  # then only the layers whose choice flips at this step (none on activations)
        want = [] if world.on_activations else flips(schedule, record.step)
        assert sorted(layer for layer, _ in record.merges) == want, record.step
    assert p._klora is None and slots_in(host.nets) == []
    assert p.extra_generation_params.items() >= params.to_infotext().items()
    plan = host.job(params).plan_for(params)
    title = f"first pass: {plan.title()}"
    want = render_selection_map(MANAGED, schedule.choices.tolist(), tuple(schedule.labels), title)
    assert processed.images[0] == "image" and len(processed.images) == 2
    assert processed.images[1].tobytes() == want.tobytes()
    assert processed.infotexts[1] == f"K-LoRA selection map, {title}"


def test_a_second_identical_job_remerges_only_what_its_steps_change(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, params = world.host, world.host.params()
    schedule = plan_schedule(host, params, STEPS)
    _, _, first = run(world, params)
    restores = count_restores(host, monkeypatch)
    _, _, records = run(world, params)
    assert_clean(world)
    assert_exact(world, records, schedule)
    if world.on_activations:  # the hybrid: no layer is restored or merged again
        assert merged(records) == [] and restores == []
        return
    at_start = changed_between(schedule, STEPS - 1, schedule, 0)
    assert at_start, "the fixture's layers must end on another choice than they start with"
    assert sorted(layer for layer, _ in records[0].merges) == at_start
    for record in records[1:]:
        assert sorted(layer for layer, _ in record.merges) == flips(schedule, record.step)
    assert set(merged(records)).isdisjoint(CONSTANT_CHOICE)  # merged by the first job, kept
    assert len(merged(records)) < len(merged(first))
    _, _, third = run(world, params)
    assert merged(third) == merged(records)


@pytest.mark.parametrize("functional", [False, True], ids=["merging", "functional"])
@pytest.mark.parametrize("script_args", ["accordion-off", "no-args"])
def test_a_plain_job_after_it_sees_bit_exact_plain_weights(
    world: World, functional: bool, script_args: str
) -> None:
    run(world, world.host.params())
    world.host.nets.lora_functional = functional  # P4: functional Lora never restores without networks
    p = world.webui.processing(
        "a photo", (KLoraParams().to_dict(),) if script_args == "accordion-off" else (), STEPS
    )
    world.webui.process_images(p)
    assert_clean(world)
    assert_plain(world.host, world.webui.evaluations[-STEPS:])
    assert_pristine(world.host)


def test_a_user_lora_job_after_it_sees_exactly_its_lora(world: World) -> None:
    host = world.host
    run(world, host.params())
    _, _, records = run(world, None, prompt=f"a photo <lora:user:{USER_STRENGTH}>")
    assert_clean(world)
    for name in ALL_LAYERS:
        applied = [("user", USER_STRENGTH)] if name in USER_LAYERS else []
        assert torch.equal(records[-1].weights[name], expected_weight(host, name, applied)), name


def test_hires_passes_get_their_own_choices_and_maps(world: World) -> None:
    host, params = world.host, world.host.params(show_map=True)
    first, hires = plan_schedule(host, params, STEPS), plan_schedule(host, params, HIRES_STEPS)
    for repeat in range(2):
        _, processed, records = run(world, params, enable_hr=True, hr_second_pass_steps=HIRES_STEPS)
        assert [r.label for r in records] == ["first pass"] * STEPS + ["hires pass"] * HIRES_STEPS
        assert_exact(world, records[:STEPS], first)
        assert_exact(world, records[STEPS:], hires)
        if world.on_activations:  # only the passes' starts may merge (layers constant in one pass only)
            assert merged(records[1:STEPS]) == [] and merged(records[STEPS + 1 :]) == []
            continue
        assert sorted(layer for layer, _ in records[STEPS].merges) == changed_between(
            first, STEPS - 1, hires, 0
        )
        if repeat:
            assert sorted(layer for layer, _ in records[0].merges) == changed_between(
                hires, HIRES_STEPS - 1, first, 0
            )
        assert [text.split(":")[0] for text in processed.infotexts[1:]] == [
            "K-LoRA selection map, first pass",
            "K-LoRA selection map, hires pass",
        ]
    assert_clean(world)


def test_a_second_order_sampler_switches_per_step_not_per_evaluation(world: World) -> None:
    host, params = world.host, world.host.params()
    schedule = plan_schedule(host, params, STEPS)
    _, _, records = run(world, params, second_order=True)
    assert_clean(world)
    assert [record.step for record in records] == list(range(2 * STEPS))  # two evaluations per step
    assert_exact(world, records, schedule, evals_per_step=2)
    for record in records[1:]:
        want = flips(schedule, record.step // 2) if record.step % 2 == 0 else []
        want = [] if world.on_activations else want
        assert sorted(layer for layer, _ in record.merges) == want, record.step


@pytest.mark.parametrize("hires", ["same", "off"])
@pytest.mark.parametrize("activation", [True, False], ids=["activated", "extra-networks-disabled"])
def test_each_pass_gets_the_slots_of_its_own_settings(world: World, hires: str, activation: bool) -> None:
    """Slots go in after the extra networks' activation, or (disabled) in process_batch / before_hr."""
    host, params = world.host, world.host.params(hires=hires)
    _, _, records = run(
        world, params, disable_extra_networks=not activation, enable_hr=True, hr_second_pass_steps=HIRES_STEPS
    )
    assert_clean(world)
    assert [r.label for r in records] == ["first pass"] * STEPS + ["hires pass"] * HIRES_STEPS
    assert_exact(world, records[:STEPS], plan_schedule(host, params, STEPS))
    if hires == "off":
        assert_plain(host, records[STEPS:])
    else:
        assert_exact(world, records[STEPS:], plan_schedule(host, params, HIRES_STEPS))


# ---------------------------------------------------------------- the model or the extension goes


def test_loading_another_checkpoint_restores_at_once(world: World) -> None:
    host, params = world.host, world.host.params()
    run(world, params)
    other = TinyModel(seed=5)
    other_pristine = {name: other.layer(name).weight.detach().clone() for name in ALL_LAYERS}
    world.webui.load_other_checkpoint(other)
    assert_pristine(host)  # the previous model's layers, restored by the callback: no forward needed
    _, _, records = run(world, params)  # K-LoRA on the new model: its own weights plus the deltas
    schedule = plan_schedule(host, params, STEPS)
    held = held_states(schedule) if world.on_activations else {}  # served by hooks, one state all pass
    for record in records:
        for i, name in enumerate(MANAGED):
            want = other_pristine[name].clone()
            choice = held[name] if name in held else int(schedule.at(record.step)[i])
            for lora, strength in [] if choice is None else slot_deltas(choice):
                want = want + dense_delta(host, lora, name, strength)
            assert torch.equal(record.weights[name], want), (record.step, name)
    world.webui.load_other_checkpoint(host.model)  # and back
    for name in ALL_LAYERS:
        assert torch.equal(other.layer(name).weight, other_pristine[name]), name
    _, _, records = run(world, None)
    assert_plain(host, records)
    assert_clean(world)


def test_a_model_kept_in_memory_keeps_its_merges_until_a_plain_job(world: World) -> None:
    """With `sd_checkpoints_limit` > 1 the WebUI switches to a loaded model without any callback."""
    host, params = world.host, world.host.params()
    schedule = plan_schedule(host, params, STEPS)
    run(world, params)
    other = TinyModel(seed=5)
    other_pristine = {name: other.layer(name).weight.detach().clone() for name in ALL_LAYERS}
    world.webui.switch_to_loaded_model(other)
    run(world, params)  # a job on the other model leaves the first one's merges alone ...
    world.webui.switch_to_loaded_model(host.model)
    _, _, records = run(world, params)  # ... so its next identical job re-merges only what it changes
    at_start = [] if world.on_activations else changed_between(schedule, STEPS - 1, schedule, 0)
    assert sorted(layer for layer, _ in records[0].merges) == at_start
    assert_exact(world, records, schedule)
    _, _, records = run(world, None)  # a plain job restores both models' layers
    assert_plain(host, records)
    for name in ALL_LAYERS:
        assert torch.equal(other.layer(name).weight, other_pristine[name]), name
    assert_clean(world)


def test_weights_loaded_in_place_are_never_overwritten_and_get_exact_merges(world: World) -> None:
    host, params = world.host, world.host.params()
    run(world, params)
    generator = torch.Generator().manual_seed(11)
    loaded = {k: torch.randn(v.shape, generator=generator) for k, v in host.model.state_dict().items()}
    world.webui.load_weights_in_place(loaded)
    for name in ALL_LAYERS:
        host.pristine[name] = (host.weight(name), host.model.layer(name).bias.detach().clone())
        key = next(k for k, m in host.model.named_modules() if m is host.model.layer(name))
        assert torch.equal(host.pristine[name][0], loaded[f"{key}.weight"]), name
    _, _, records = run(world, params)
    assert_exact(world, records, plan_schedule(host, params, STEPS))
    assert_clean(world)


def test_reloading_the_ui_restores_at_once(world: World) -> None:
    run(world, world.host.params())
    world.webui.reload_ui()  # disabling the extension ends in the same reload
    assert_pristine(world.host)
    assert_clean(world)


# ---------------------------------------------------------------- interrupted and failing jobs


def test_an_interrupted_job_restores_and_the_next_one_is_exact(world: World) -> None:
    host, params, state = world.host, world.host.params(), world.webui.shared.state
    run(world, params)  # merges kept from a good job ...
    start = len(world.webui.evaluations)
    world.webui.before_evaluation[start + 3] = lambda: setattr(state, "interrupted", True)
    _, _, records = run(world, params, enable_hr=True, hr_second_pass_steps=HIRES_STEPS)
    assert len(records) == 3  # ... then one interrupted at its fourth step (no hires pass)
    assert_pristine(host)
    assert slots_in(host.nets) == []
    state.interrupted = False  # shared.state.begin() of the next job
    _, _, records = run(world, params)
    assert_exact(world, records, plan_schedule(host, params, STEPS))
    assert_clean(world)


def test_a_failing_callback_switches_the_job_off_with_exact_weights(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, params = world.host, world.host.params(show_map=True)
    run(world, params)
    calls = []
    original = slots.on_step

    def on_step(*args: Any) -> None:
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")
        original(*args)

    monkeypatch.setattr(slots, "on_step", on_step)
    p, processed, records = run(world, params)
    assert_clean(world)  # the callback caught it ...
    assert p.comments == [SWITCHED_OFF + "boom"]  # ... and said so
    assert_plain(host, records[3:])  # the rest of the image without K-LoRA, plain weights
    assert_pristine(host)
    assert processed.images == ["image"]  # no selection map of a failed job
    monkeypatch.setattr(slots, "on_step", original)
    _, _, records = run(world, params)
    assert_exact(world, records, plan_schedule(host, params, STEPS))


@pytest.mark.parametrize("world", [True], indirect=True, ids=["on-activations"])
def test_a_failing_hook_switches_the_job_off_with_exact_weights(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, params = world.host, world.host.params(show_map=True)
    per_evaluation = len(switching(plan_schedule(host, params, STEPS)))
    calls = []
    original = LowRankBranch.add_into

    def add_into(self: LowRankBranch, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2 * per_evaluation + 1:  # the third evaluation's first hook
            raise RuntimeError("boom")
        return original(self, out, x)

    monkeypatch.setattr(LowRankBranch, "add_into", add_into)
    p, processed, records = run(world, params)
    assert_clean(world)  # the hook and the callback caught it ...
    assert len(p.comments) == 1 and p.comments[0].startswith(SWITCHED_OFF + "K-LoRA: the forward hook on ")
    assert p.comments[0].endswith(" failed: boom")  # ... and the next step said so
    assert_plain(host, records[3:])  # the rest of the image without K-LoRA, plain weights
    assert_pristine(host)
    assert processed.images == ["image"]
    monkeypatch.setattr(LowRankBranch, "add_into", original)
    _, _, records = run(world, params)
    assert_exact(world, records, plan_schedule(host, params, STEPS))


def test_a_job_that_died_before_sampling_leaves_no_slot_behind(world: World) -> None:
    """A failure between the activation and `p.sample` skips postprocess and the sampling guard; a next job
    without extra network activation (which would replace Lora's list) must not find the dead job's slots."""
    host, params = world.host, world.host.params()
    run(world, params)

    def text_encoder_out_of_memory() -> None:
        raise RuntimeError("CUDA out of memory")

    world.webui.setup_conds = text_encoder_out_of_memory
    with pytest.raises(RuntimeError, match="out of memory"):
        run(world, params)
    assert len(slots_in(host.nets)) == 2  # what the WebUI leaves; the next job's before_process cleans up
    _, _, records = run(world, None, disable_extra_networks=True)
    assert_plain(host, records)
    assert_clean(world)


def test_a_failing_sampler_restores_at_once(world: World) -> None:
    host, params = world.host, world.host.params()
    run(world, params)
    start = len(world.webui.evaluations)

    def out_of_memory() -> None:
        raise RuntimeError("CUDA out of memory")

    world.webui.before_evaluation[start + 4] = out_of_memory
    with pytest.raises(RuntimeError, match="out of memory"):  # postprocess never runs
        run(world, params)
    assert_pristine(host)
    assert slots_in(host.nets) == []
    _, _, records = run(world, params)
    assert_exact(world, records, plan_schedule(host, params, STEPS))
    assert_clean(world)


def test_a_checkpoint_change_during_the_job_fails_it_cleanly(world: World) -> None:
    host, params = world.host, world.host.params()
    run(world, params)
    refiner = TinyModel(seed=9)
    refiner_pristine = {name: refiner.layer(name).weight.detach().clone() for name in ALL_LAYERS}
    start = len(world.webui.evaluations)
    world.webui.before_evaluation[start + 4] = lambda: world.webui.load_other_checkpoint(refiner)
    p, _, records = run(world, params)
    assert p.comments == [
        SWITCHED_OFF + "the checkpoint changed during the job (refiner or hires checkpoint)"
    ]
    assert [record.step for record in records] == list(range(STEPS))
    assert_exact(world, records[:4], plan_schedule(host, params, STEPS))
    for record in records[4:]:  # the refiner runs untouched by K-LoRA
        assert record.merges == []
        for name in ALL_LAYERS:
            assert torch.equal(record.weights[name], refiner_pristine[name]), (record.step, name)
    assert_pristine(host)
    assert_clean(world)
