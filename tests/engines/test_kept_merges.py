"""A1111: merges kept between jobs (issue 15), against the stand-in of the built-in Lora extension.

A repeated identical job must re-merge only the layers its steps change (counted through the fake's log of
`calc_updown` calls); every other job, and every way a job or the model can end, must see exact weights.
Expected weights come from the LoRA files themselves (slots_fixtures.expected_weight).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lib_klora.engines.kept_merges import KeptLayers, kept_layers
from lib_klora.engines.slots import Job, finish, guard_sample, inject_slots, teardown
from lib_klora.fusion.plan import StepSchedule
from lib_klora.params.model import KLoraParams
from tests.engines.slots_fixtures import (
    ALL_LAYERS,
    BOTH,
    MANAGED,
    STEPS,
    USER_LAYERS,
    USER_STRENGTH,
    D,
    E,
    Evaluation,
    FakeDenoiser,
    Host,
    assert_pristine,
    expected_weight,
    make_host,
    slot_deltas,
)
from tests.hosts.fake_lora_extension import TE_LAYER


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    kept_layers.release(None)  # layers of earlier tests' models are no business of this one
    yield from make_host(tmp_path)
    kept_layers.release(None)


def schedule_of(job: Job, steps: int, is_hires: bool = False) -> StepSchedule:
    params = job.params_for(is_hires)
    assert params is not None
    return job.plan_for(params).schedule(steps)


def run_job(
    host: Host,
    params: KLoraParams,
    steps: int = STEPS,
    *,
    hires: KLoraParams | None = None,
    hires_steps: int = 4,
) -> tuple[Job, list[Evaluation]]:
    """One generation as the WebUI drives it (activation, sampling, postprocess) ending normally."""
    job = host.job(params, hires)
    inject_slots(host.nets, job, is_hires=False)
    records = host.sample(job, steps)
    if hires is not None:
        inject_slots(host.nets, job, is_hires=True)
        records += host.sample(job, hires_steps, is_hires=True, denoiser=FakeDenoiser(hires_steps))
    finish(host.nets, job)
    return job, records


def merged_layers(records: list[Evaluation]) -> list[str]:
    return [layer for record in records for layer, _ in record.merges]


def changed_between(schedule: StepSchedule, before: int, after: StepSchedule, at: int) -> set[str]:
    return {
        MANAGED[i] for i, (a, b) in enumerate(zip(schedule.at(before), after.at(at), strict=True)) if a != b
    }


def assert_exact(host: Host, records: list[Evaluation], schedule: StepSchedule) -> None:
    for record in records:
        for i, name in enumerate(MANAGED):
            want = expected_weight(host, name, slot_deltas(int(schedule.at(record.step)[i])))
            assert torch.equal(record.weights[name], want), (record.step, name)


# ---------------------------------------------------------------- repeated identical jobs


@pytest.mark.parametrize("ended", [True, False], ids=["postprocess", "postprocess-skipped"])
def test_a_second_identical_job_remerges_only_what_its_steps_change(host: Host, ended: bool) -> None:
    params = host.params()
    first = host.job(params)
    inject_slots(host.nets, first, is_hires=False)
    first_records = host.sample(first, STEPS)
    if ended:
        finish(host.nets, first)
    second, records = run_job(host, params)
    schedule = schedule_of(second, STEPS)
    # Step 0: only the layers whose last merged choice (the first job's last step) is not step 0's.
    at_start = changed_between(schedule, STEPS - 1, schedule, 0)
    assert at_start, "the fixture's layers must end on another choice than they start with"
    assert sorted(layer for layer, _ in records[0].merges) == sorted(at_start)
    for record in records[1:]:  # then exactly the flips, as in the first job
        assert sorted(layer for layer, _ in record.merges) == sorted(
            MANAGED[i] for i in schedule.changed(record.step)
        )
    flips = sum(len(schedule.changed(s)) for s in range(1, STEPS))
    assert len(merged_layers(records)) == len(at_start) + flips
    assert {D, E, TE_LAYER}.isdisjoint(merged_layers(records))  # constant layers: merged once, kept
    assert len(merged_layers(first_records)) > len(merged_layers(records))
    assert_exact(host, records, schedule)
    for name, lora in ((D, "subject"), (E, "style")):
        assert torch.equal(
            host.weight(name), expected_weight(host, name, slot_deltas(0 if lora == "subject" else 1))
        )


def test_every_repeated_job_costs_the_same_merges(host: Host) -> None:
    params = host.params()
    counts = [len(merged_layers(run_job(host, params)[1])) for _ in range(3)]
    assert counts[0] > counts[1] == counts[2]


def test_a_repeated_merge_baseline_job_merges_nothing(host: Host) -> None:
    params = host.params(method="merge")  # a constant choice: nothing switches within the pass
    run_job(host, params)
    _, records = run_job(host, params)
    assert merged_layers(records) == []
    for name in MANAGED:
        assert torch.equal(records[-1].weights[name], expected_weight(host, name, slot_deltas(BOTH)))


def test_a_repeated_dynamic_job_merges_nothing(host: Host) -> None:
    params = host.params(method="dynamic")
    run_job(host, params)
    _, records = run_job(host, params)
    assert merged_layers(records) == []  # denoiser layers by hooks (plain weights kept), TE kept merged
    for name in (*MANAGED, D, E):
        assert torch.equal(records[0].weights[name], host.pristine[name][0])


def test_other_strengths_remerge_every_touched_layer(host: Host) -> None:
    run_job(host, host.params())
    _, records = run_job(host, host.params(style_strength=0.9))
    assert set(merged_layers(records[:1])) == {*MANAGED, D, E, TE_LAYER}  # other slot names: Lora redoes all


def test_a_lora_file_saved_again_is_merged_again(host: Host) -> None:
    params = host.params()
    run_job(host, params)
    path = host.lora_dir / "style.safetensors"
    stat = path.stat()
    os.utime(path, (stat.st_atime, stat.st_mtime + 10))
    _, records = run_job(host, params)
    assert {E, TE_LAYER} <= set(merged_layers(records[:1]))


# ---------------------------------------------------------------- the next job needs other weights


def test_a_plain_job_after_klora_sees_bit_exact_plain_weights(host: Host) -> None:
    run_job(host, host.params())
    host.nets.load_networks([])  # the next job's activation without any <lora> tag
    host.nets.calc_updown_calls.clear()
    assert torch.equal(host.forward(), host.base_output)  # Lora restored each layer from its backup
    assert host.nets.calc_updown_calls == []
    assert_pristine(host)


def test_a_user_lora_job_after_klora_sees_exactly_its_lora(host: Host) -> None:
    run_job(host, host.params())
    host.nets.load_networks(["user"], [USER_STRENGTH])
    host.forward()
    for name in ALL_LAYERS:
        applied = [("user", USER_STRENGTH)] if name in USER_LAYERS else []
        assert torch.equal(host.weight(name), expected_weight(host, name, applied)), name


def test_release_restores_at_once(host: Host) -> None:
    """What a job without K-LoRA, a model (re)load and unloading the extension do: no forward needed."""
    run_job(host, host.params())
    assert kept_layers.release(host.nets) == len(ALL_LAYERS)
    assert_pristine(host)
    assert kept_layers.release(host.nets) == 0  # nothing kept any more


def test_release_protects_a_functional_mode_plain_job(host: Host) -> None:
    """P4: functional mode returns before restoring when no network is loaded, so only release helps."""
    run_job(host, host.params())
    kept_layers.release(host.nets)
    host.nets.lora_functional = True
    host.nets.load_networks([])
    assert torch.equal(host.forward(), host.base_output)


def test_a_job_after_release_merges_again_exactly(host: Host) -> None:
    params = host.params()
    run_job(host, params)
    kept_layers.release(host.nets)
    job, records = run_job(host, params)
    assert set(merged_layers(records[:1])) == {*MANAGED, D, E, TE_LAYER}
    assert_exact(host, records, schedule_of(job, STEPS))


def test_a_checkpoint_loaded_in_place_is_never_overwritten_by_a_release(host: Host) -> None:
    params = host.params()
    run_job(host, params)
    generator = torch.Generator().manual_seed(11)
    other = {k: torch.randn(v.shape, generator=generator) for k, v in host.model.state_dict().items()}
    host.model.load_state_dict(other)  # Lora's load patch forgets backups and merged names
    assert kept_layers.release(host.nets) == 0
    for name in ALL_LAYERS:
        host.pristine[name] = (host.weight(name), None)
    assert_pristine(host)  # the new checkpoint's weights, untouched
    job, records = run_job(host, params)  # and K-LoRA merges onto them exactly
    assert_exact(host, records, schedule_of(job, STEPS))


def test_a_dropped_model_leaves_nothing_kept() -> None:
    registry = KeptLayers()
    layer = torch.nn.Linear(2, 2)
    registry.add([layer])
    assert len(registry) == 1
    del layer
    assert len(registry) == 0


# ---------------------------------------------------------------- interrupted and failing jobs


def test_an_interrupted_job_restores_and_the_next_one_is_exact(host: Host) -> None:
    params = host.params()
    job = host.job(params)
    inject_slots(host.nets, job, is_hires=False)
    host.sample(job, STEPS, stop_after=3)
    teardown(host.nets, job)  # postprocess of an interrupted job
    assert_pristine(host)
    again, records = run_job(host, params)
    assert_exact(host, records, schedule_of(again, STEPS))


def test_a_failing_job_restores_and_the_next_one_is_exact(host: Host) -> None:
    params = host.params()
    run_job(host, params)  # merges kept from a good job ...
    job = host.job(params)
    inject_slots(host.nets, job, is_hires=False)

    def sample(*_args: Any) -> None:
        host.sample(job, 4)
        raise RuntimeError("out of memory")  # ... then a job dies mid-sampling

    p = type("P", (), {"sample": staticmethod(sample)})()
    guard_sample(p, job, host.nets)
    with pytest.raises(RuntimeError, match="out of memory"):
        p.sample()
    assert_pristine(host)
    again, records = run_job(host, params)
    assert_exact(host, records, schedule_of(again, STEPS))


# ---------------------------------------------------------------- passes keep their own states


def test_hires_passes_keep_their_own_states(host: Host) -> None:
    base = host.params(hires="separate", hires_pattern="s*", hires_alpha=0.5)
    first, hires = base.for_pass(False), base.for_pass(True)
    hires_steps = 4
    for _ in range(2):
        job, records = run_job(host, first, hires=hires, hires_steps=hires_steps)
        assert_exact(host, records[:STEPS], schedule_of(job, STEPS))
        assert_exact(host, records[STEPS:], schedule_of(job, hires_steps, is_hires=True))


def test_a_same_settings_hires_pass_remerges_only_what_it_changes(host: Host) -> None:
    params = host.params()
    hires_steps = 4
    job, records = run_job(host, params, hires=params, hires_steps=hires_steps)
    first, second = schedule_of(job, STEPS), schedule_of(job, hires_steps, is_hires=True)
    assert sorted(layer for layer, _ in records[STEPS].merges) == sorted(
        changed_between(first, STEPS - 1, second, 0)
    )
    assert_exact(host, records[STEPS:], second)


def test_an_img2img_pass_then_a_txt2img_job_keep_their_own_states(host: Host) -> None:
    params = host.params()
    img2img_steps = 6  # img2img samples only the steps its denoising strength leaves
    img2img, records = run_job(host, params, steps=img2img_steps)
    short = schedule_of(img2img, img2img_steps)
    assert_exact(host, records, short)
    txt2img, records = run_job(host, params)
    full = schedule_of(txt2img, STEPS)
    assert sorted(layer for layer, _ in records[0].merges) == sorted(
        changed_between(short, img2img_steps - 1, full, 0)
    )
    assert_exact(host, records, full)
