"""The A1111 engine's hybrid: layers that switch within a pass on the activation side, the rest merged.

References are computed here from the LoRA files (merged weights, `slots_fixtures.expected_weight`); the
hooked layers must give the same outputs as those merges while their weights keep one state all pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lib_klora.engines.kept_merges import kept_layers
from lib_klora.engines.slots import Job, finish, inject_slots, teardown
from lib_klora.fusion.plan import StepSchedule
from lib_klora.params.model import KLoraParams
from lib_klora.tools.synthetic import write_lora
from tests.engines.slots_fixtures import (
    ALL_LAYERS,
    MANAGED,
    STEPS,
    A,
    B,
    C,
    D,
    E,
    Evaluation,
    FakeDenoiser,
    Host,
    assert_like_merges,
    assert_pristine,
    count_restores,
    expected_choices,
    held_states,
    make_host,
    switching,
)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    kept_layers.release(None)
    yield from make_host(tmp_path)
    kept_layers.release(None)


@pytest.fixture
def restores(host: Host, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return count_restores(host, monkeypatch)


def hooked(host: Host) -> list[str]:
    return [name for name in ALL_LAYERS if host.model.layer(name)._forward_hooks]


def merged(records: list[Evaluation]) -> list[str]:
    return [layer for record in records for layer, _ in record.merges]


def run_job(host: Host, params: KLoraParams, *, on_activations: bool = True) -> tuple[Job, list[Evaluation]]:
    job = host.job(params, switch_on_activations=on_activations)
    inject_slots(host.nets, job, is_hires=False)
    records = host.sample(job, STEPS)
    finish(host.nets, job)
    return job, records


def test_switching_layers_stay_plain_and_get_the_chosen_delta_on_their_activations(
    host: Host, restores: list[str]
) -> None:
    params = host.params()
    job = host.job(params, switch_on_activations=True)
    inject_slots(host.nets, job, is_hires=False)
    denoiser = FakeDenoiser(total_steps=STEPS)
    records = host.sample(job, STEPS, denoiser=denoiser, stop_after=1)
    first_step = list(restores)
    records += host.sample(job, STEPS, denoiser=denoiser, start=1)
    finish(host.nets, job)
    schedule = expected_choices(job, STEPS)
    assert switching(schedule), "the fixture's plan must switch some layer within the pass"
    assert job.selection.hooked == held_states(schedule)
    assert set(held_states(schedule).values()) - {None}, "the fixture must hold a LoRA in some layer"
    assert_like_merges(host, params, schedule, records)
    assert merged(records[1:]) == [] and restores == first_step  # no switch rewrites a weight
    assert hooked(host) == []  # the hooks end with the job


def test_without_the_hybrid_the_same_plan_merges_at_each_switch(host: Host) -> None:
    _, records = run_job(host, host.params(), on_activations=False)
    assert merged(records[1:])  # the comparison the hybrid is measured against


def test_a_second_identical_job_rewrites_no_weight(host: Host, restores: list[str]) -> None:
    params = host.params()
    job, _ = run_job(host, params)
    schedule = expected_choices(job, STEPS)
    restores.clear()
    _, records = run_job(host, params)
    assert merged(records) == [] and restores == []
    assert_like_merges(host, params, schedule, records)


def test_a_plain_job_after_it_sees_plain_weights_and_no_hook(host: Host) -> None:
    run_job(host, host.params())
    kept_layers.release(host.nets)  # what a job without K-LoRA does first
    assert_pristine(host)
    assert hooked(host) == []
    assert torch.equal(host.forward(), host.base_output)


@pytest.mark.parametrize("stop_after", [1, 4])
def test_an_interrupted_job_restores_and_unhooks(host: Host, stop_after: int) -> None:
    job = host.job(host.params(), switch_on_activations=True)
    inject_slots(host.nets, job, is_hires=False)
    host.sample(job, STEPS, stop_after=stop_after)
    assert hooked(host)
    teardown(host.nets, job)
    assert_pristine(host)
    assert hooked(host) == []
    assert torch.equal(host.forward(), host.base_output)


def test_a_hires_pass_hooks_the_layers_that_switch_in_it(host: Host) -> None:
    base = host.params(hires="separate", hires_pattern="s*", hires_alpha=2.0)
    first, hires = base.for_pass(False), base.for_pass(True)
    assert first is not None and hires is not None
    job = host.job(first, hires, switch_on_activations=True)
    inject_slots(host.nets, job, is_hires=False)
    host.sample(job, STEPS)
    inject_slots(host.nets, job, is_hires=True)
    records = host.sample(job, 4, is_hires=True, denoiser=FakeDenoiser(total_steps=4))
    schedule = job.plan_for(hires).schedule(4)
    assert job.selection.hooked == held_states(schedule)
    assert_like_merges(host, hires, schedule, records)
    teardown(host.nets, job)
    assert_pristine(host)


def test_a_dynamic_pass_takes_the_switching_layers_hooks_off(host: Host) -> None:
    base = host.params(hires="separate", hires_method="dynamic")
    job = host.job(base.for_pass(False), base.for_pass(True), switch_on_activations=True)
    inject_slots(host.nets, job, is_hires=False)
    host.sample(job, STEPS)
    assert job.switching is not None and job.selection.hooked
    inject_slots(host.nets, job, is_hires=True)
    host.sample(job, 2, is_hires=True, denoiser=FakeDenoiser(total_steps=2))
    assert job.switching is None and job.selection.hooked == {}
    assert all(len(host.model.layer(name)._forward_hooks) == 1 for name in (A, B, C, D, E))  # dynamic's own
    teardown(host.nets, job)
    assert hooked(host) == []


def test_a_layer_of_another_kind_keeps_merging_at_its_switch(host: Host) -> None:
    """A LoHa layer's activation form would be a dense ΔW: merging it at the switch is cheaper."""
    path = host.lora_dir / "style.safetensors"
    tensors = load_file(str(path))
    stem = "lora_unet_" + A.removeprefix("diffusion_model_")
    up, down = tensors.pop(f"{stem}.lora_up.weight"), tensors.pop(f"{stem}.lora_down.weight")
    generator = torch.Generator().manual_seed(5)
    tensors |= {
        f"{stem}.hada_w1_a": up,
        f"{stem}.hada_w1_b": down,
        f"{stem}.hada_w2_a": torch.randn(up.shape, generator=generator) * 0.3,  # keeps the layer switching
        f"{stem}.hada_w2_b": torch.randn(down.shape, generator=generator),
    }
    write_lora(path, tensors)
    params = host.params()
    job, records = run_job(host, params)
    schedule = expected_choices(job, STEPS)
    assert A in switching(schedule), "the LoHa layer must switch within the pass"
    flips = [record.step for record in records[1:] if A in schedule_changes(schedule, record.step)]
    assert flips
    for record in records[1:]:
        want = [A] if record.step in flips else []
        assert [layer for layer, _ in record.merges if layer == A] == want, record.step
    others = [name for name in switching(schedule) if name != A]
    assert others and set(merged(records[1:])) == {A}  # the plain LoRA layers still switch on activations


def schedule_changes(schedule: StepSchedule, step: int) -> list[str]:
    return [MANAGED[i] for i in schedule.changed(step)]


def test_branches_are_built_once_per_loaded_network(host: Host) -> None:
    params = host.params()
    first, _ = run_job(host, params)
    branches = {id(b) for net in first.nets for b in net.__dict__["_klora_branches"].values()}
    second, _ = run_job(host, params)
    assert second.nets == first.nets
    assert {id(b) for net in second.nets for b in net.__dict__["_klora_branches"].values()} == branches
