"""The Forge/reForge engine (`engines/patcher.py`: forward hooks over the host's own layers) on CPU stand-ins.

The layers are the hosts' classes as `fake_patcher_hosts` reproduces them (Forge's Linear is not an
nn.Linear); the patch dicts are in Forge's value format, ("lora", (up, down, alpha, mid, dora_scale)) etc.,
and non-plain patches go through the stand-in of Forge's own `merge_lora_to_weight`.

Every expected value is computed here from the LoRA tensors (up @ down · alpha/rank, the LoHa product, the
CP-core contraction, each at its strength; KL divergences with `kl_divergences` on those deltas), never
from the engine's factors, branches or hooks.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib_klora.dynamic.branches import DenseBranch, LowRankBranch, SlicedBranch
from lib_klora.dynamic.kl import kl_divergences
from lib_klora.engines.patcher import (
    JobError,
    build_patcher_job,
    compute_dtype,
    guard_sample,
    install,
    module_deltas,
    on_step,
    teardown,
)
from lib_klora.errors import IncompatibleLorasError
from lib_klora.fusion.scores import ScoringInterrupted
from lib_klora.params.model import KLoraParams
from tests.hosts.fake_patcher_hosts import ForgeLinear, GGUFLinear, Packed4BitLinear
from tests.hosts.patcher_fixtures import (
    ALL_LAYERS,
    BOTH,
    CONV,
    FF,
    MANAGED,
    ONLY_STYLE,
    ONLY_SUBJECT,
    PROJ,
    QKV,
    SECOND_CALL_SCALE,
    SHAPES,
    STEPS,
    STRENGTHS,
    STYLE,
    STYLE_STRENGTH,
    SUBJECT,
    SUBJECT_STRENGTH,
    FakeDenoiser,
    Host,
    Part,
    apply_delta,
    build_model,
    close,
    decode,
    dense,
    finder,
    make_host,
    make_lora,
    randn,
    reference_delta,
    reference_dynamic_choice,
    reference_piece,
    schedule_of,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add spin-up and contention (12 ms per conv on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def host() -> Host:
    return make_host()


# ---------------------------------------------------------------- 1. module_deltas


def test_the_fixture_loras_differ_on_every_managed_layer(host: Host) -> None:
    for name in MANAGED:
        subject = host.expected(name, host.chosen(SUBJECT))
        style = host.expected(name, host.chosen(STYLE))
        assert (subject - style).abs().max() > 0.05, name  # far above the comparison tolerance


def test_plain_linear_and_locon_patches_become_low_rank_branches(host: Host) -> None:
    subject, _ = host.deltas()
    for name in (PROJ, CONV, ONLY_SUBJECT):
        delta = subject[name]
        assert delta.module is host.layer(name)
        assert delta.shape == SHAPES[name] and delta.has_factors() and delta.rank == 4
        torch.testing.assert_close(
            delta.delta(), reference_delta(host.subject, name).reshape(SHAPES[name][0], -1)
        )
        up, down = delta.factors("cpu")  # alpha/rank folded into up, fp32, 2-D
        torch.testing.assert_close(up @ down, delta.delta())
        branch = delta.branch(SUBJECT_STRENGTH, torch.float32)
        assert isinstance(branch, LowRankBranch) and branch.scale == pytest.approx(SUBJECT_STRENGTH * 0.5)
    conv = subject[CONV].branch(1.0, torch.float32)
    assert conv.conv is not None and conv.conv.kernel_size == (3, 3) and conv.conv.padding == (1, 1)
    assert subject[PROJ].branch(1.0, torch.float32).conv is None


def test_forge_linear_is_not_an_nn_linear_and_is_still_managed(host: Host) -> None:
    assert not isinstance(host.layer(PROJ), nn.Linear)  # Forge's operations.Linear
    assert isinstance(host.layer(FF), nn.Linear)  # reForge's ops.Linear
    assert isinstance(host.layer(CONV), nn.Conv2d)
    subject, style = host.deltas()
    assert set(subject) == {PROJ, CONV, FF, QKV, ONLY_SUBJECT} and set(style) == {*MANAGED, ONLY_STYLE}


def test_fused_qkv_slices_become_one_sliced_branch(host: Host) -> None:
    subject, style = host.deltas()
    fused = subject[QKV]
    assert [(p.start, p.size) for p in fused.parts] == [(0, 8), (8, 8), (16, 8)]
    assert fused.shape == (24, 8) and fused.rank == 12 and not fused.has_factors()
    torch.testing.assert_close(fused.delta(), reference_delta(host.subject, QKV))
    branch = fused.branch(SUBJECT_STRENGTH, torch.float32)
    assert isinstance(branch, SlicedBranch) and all(isinstance(b, LowRankBranch) for b, _, _ in branch.parts)
    x = host.inputs[QKV]
    close(branch.delta(x), apply_delta(x, reference_delta(host.subject, QKV) * SUBJECT_STRENGTH))
    assert style[QKV].has_factors()  # the style's plain whole-layer patch stays low-rank


def test_a_partly_covered_fused_layer_leaves_the_other_channels_alone(host: Host) -> None:
    patches = {k: v for k, v in host.subject.patches.items() if not isinstance(k, tuple) or k[1][1] != 8}
    deltas, skipped = module_deltas(patches, finder(host.model), decode, dense)
    assert skipped == []
    qkv = deltas[QKV]
    assert [(p.start, p.size) for p in qkv.parts] == [(0, 8), (16, 8)]
    want = reference_delta(host.subject, QKV).clone()
    want[8:16] = 0  # k has no patch
    torch.testing.assert_close(qkv.delta(), want)
    x = host.inputs[QKV]
    out = qkv.branch(1.0, torch.float32).delta(x)
    assert torch.equal(out[..., 8:16], torch.zeros_like(out[..., 8:16]))
    close(out, apply_delta(x, want))


def test_non_plain_patches_go_through_the_dense_callback(host: Host) -> None:
    g = torch.Generator().manual_seed(11)
    up, down = randn(g, 6, 3, 1, 1), randn(g, 3, 4, 1, 1)
    mid = randn(g, 3, 3, 3, 3, scale=0.3)
    mid_part = Part("mid", (up, mid, down), alpha=1.5)
    patches = {
        f"{CONV}.weight": ("lora", (up, down, 1.5, mid, None)),  # LoCon with a CP core
        f"{FF}.weight": host.subject.patches[f"{FF}.weight"],  # LoHa
    }
    calls: list[tuple[str, tuple[int, ...], bool]] = []

    def recording_dense(value: Any, key: str, weight: torch.Tensor) -> torch.Tensor:
        # The host merges into a float copy of the real weight (DoRA needs its norm); the engine
        # subtracts the weight again.
        layer_weight = host.model.get_submodule(key[: -len(".weight")]).weight
        calls.append((key, tuple(weight.shape), torch.equal(weight, layer_weight.float())))
        return dense(value, key, weight)

    deltas, skipped = module_deltas(patches, finder(host.model), decode, recording_dense)
    assert skipped == []
    assert sorted(calls) == [(f"{CONV}.weight", SHAPES[CONV], True), (f"{FF}.weight", SHAPES[FF], True)]
    conv_want = reference_piece(mid_part).reshape(SHAPES[CONV])
    torch.testing.assert_close(deltas[CONV].delta().reshape(SHAPES[CONV]), conv_want)
    torch.testing.assert_close(deltas[FF].delta(), reference_delta(host.subject, FF))
    for name, want in ((CONV, conv_want), (FF, reference_delta(host.subject, FF))):
        delta = deltas[name]
        assert not delta.has_factors() and delta.rank == min(SHAPES[name][0], delta.in_size)
        branch = delta.branch(0.5, torch.float32)
        assert isinstance(branch, DenseBranch)
        x = host.inputs[name]
        close(branch.delta(x), apply_delta(x, want * 0.5), name)


def test_patches_that_are_no_weight_delta_are_skipped_and_reported(host: Host) -> None:
    plain = host.subject.patches[f"{PROJ}.weight"]
    patches = {
        f"{PROJ}.weight": plain,
        f"{PROJ}.bias": ("diff", (torch.ones(16),)),  # diff_b
        f"{FF}.weight": ("set", (torch.ones(8, 8),)),  # the dense callback refuses it
        "diffusion_model.not_a_layer.weight": plain,  # the model has no such module
        "text_model.encoder.q_proj.weight": plain,  # outside the UNet prefix
        (f"{QKV}.weight", (1, 0, 4)): plain,  # a slice along the inputs
        (f"{QKV}.weight", (0, 0, 8), lambda w: w): plain,  # a slice with a host function
    }
    deltas, skipped = module_deltas(patches, finder(host.model), decode, dense)
    assert list(deltas) == [PROJ]
    assert sorted(skipped) == sorted(str(k) for k in patches if k != f"{PROJ}.weight")


def test_a_packed_4bit_weight_takes_its_shape_from_the_factors() -> None:
    g = torch.Generator().manual_seed(5)
    layer = Packed4BitLinear(randn(g, 16, 8, scale=0.3), bias=randn(g, 16))
    model = build_model({PROJ: layer})
    packed = layer.weight.detach().clone()
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (64, 1)
    loras = [make_lora(n, {PROJ: ("plain", 1.0)}, rank=2, alpha=2.0, seed=s) for n, s in (("s", 1), ("t", 2))]
    sliced = {(f"{PROJ}.weight", (0, 0, 8)): loras[0].patches[f"{PROJ}.weight"]}
    loha = {
        f"{PROJ}.weight": (
            "loha",
            (randn(g, 16, 2), randn(g, 2, 8), 2.0, randn(g, 16, 2), randn(g, 2, 8)),
        )
    }
    for patches in (sliced, loha):  # no factors of the whole layer: the logical shape is unknown
        deltas, skipped = module_deltas(patches, finder(model), decode, dense)
        assert deltas == {} and skipped == [str(k) for k in patches]
    found = [module_deltas(lora.patches, finder(model), decode, dense)[0] for lora in loras]
    assert found[0][PROJ].shape == (16, 8) and compute_dtype(layer) == torch.float32
    job = build_patcher_job(
        KLoraParams(enabled=True, subject="s", style="t", method="merge"), None, (found[0], found[1])
    )
    install(job, (1.0, 0.5))
    x = torch.randn(3, 8, generator=g)
    on_step(job, FakeDenoiser(total_steps=2), False, 1)
    with torch.inference_mode():
        out = layer(x)
    want = F.linear(x, layer.dequantize(), layer.bias.detach())
    want = (
        want
        + apply_delta(x, reference_delta(loras[0], PROJ))
        + apply_delta(x, 0.5 * reference_delta(loras[1], PROJ))
    )
    close(out, want)
    teardown(job)
    assert torch.equal(layer.weight.detach(), packed)


def test_a_gguf_weight_takes_its_shape_from_real_shape() -> None:
    g = torch.Generator().manual_seed(6)
    layer = GGUFLinear(randn(g, 24, 8, scale=0.3))
    assert layer.weight.dtype == torch.uint8 and layer.weight.ndim == 1
    model = build_model({QKV: layer})
    lora = make_lora("s", {QKV: ("qkv", 1.0)}, rank=2, alpha=2.0, seed=1)
    deltas, skipped = module_deltas(lora.patches, finder(model), decode, dense)
    assert skipped == [] and deltas[QKV].shape == (24, 8)
    x = torch.randn(3, 8, generator=g)
    close(deltas[QKV].branch(1.0, compute_dtype(layer)).delta(x), apply_delta(x, reference_delta(lora, QKV)))


def _half_layer_branch(layer: ForgeLinear) -> tuple[Any, Any]:
    """A rank-2 LoRA on `layer` and its branch in the dtype `compute_dtype` picks for the layer."""
    lora = make_lora("s", {PROJ: ("plain", 1.0)}, rank=2, alpha=2.0, seed=1)
    deltas, _ = module_deltas(lora.patches, finder(build_model({PROJ: layer})), decode, dense)
    return lora, deltas[PROJ].branch(1.0, compute_dtype(layer))


@pytest.mark.parametrize("flag", ["parameters_manual_cast", "ldm_patched_cast_weights", "comfy_cast_weights"])
def test_a_half_precision_layer_the_host_casts_gets_an_fp32_branch(flag: str) -> None:
    """Forge/reForge manual cast (fp16 storage computed in fp32, as on a CPU): the branch runs in fp32, the
    layer's computation dtype, not in the storage dtype (fp16 matmuls on a CPU are ~20x slower)."""
    layer = ForgeLinear(8, 16, dtype=torch.float16)
    setattr(layer, flag, True)
    lora, branch = _half_layer_branch(layer)
    assert compute_dtype(layer) == torch.float32 and branch.dtype == torch.float32
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    out = branch.delta(x)
    assert out.dtype == torch.float32
    close(out, apply_delta(x, reference_delta(lora, PROJ)))
    on_accelerator = layer.to("meta")  # off the CPU, only the host's cast decides
    assert compute_dtype(on_accelerator) == torch.float32
    setattr(on_accelerator, flag, False)
    assert compute_dtype(on_accelerator) == torch.float16


def test_a_half_precision_layer_gets_a_half_precision_branch_except_on_the_cpu() -> None:
    """On a CPU the branch computes in fp32 (no fast half kernels for its skinny matmuls) and answers in the
    layer's fp16; on an accelerator it stays in half precision."""
    layer = ForgeLinear(8, 16, dtype=torch.float16)
    lora, branch = _half_layer_branch(layer)
    assert compute_dtype(layer) == torch.float32 and branch.dtype == torch.float32
    assert compute_dtype(ForgeLinear(8, 16, dtype=torch.bfloat16).to("meta")) == torch.bfloat16
    assert compute_dtype(ForgeLinear(8, 16, dtype=torch.float16).to("meta")) == torch.float16
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2)).half()
    out = branch.delta(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(
        out.float(), apply_delta(x.float(), reference_delta(lora, PROJ)), rtol=2e-2, atol=2e-2
    )


# ---------------------------------------------------------------- 2. scoring


def test_scores_cover_exactly_the_shared_layers(host: Host) -> None:
    job = host.job(host.params())
    assert job.layer_names == MANAGED
    assert job.table.exclusive == ((ONLY_SUBJECT,), (ONLY_STYLE,))
    for layer in job.table.layers:
        name = layer.canonical
        ranks = (host.subject.ranks[name], host.style.ranks[name])
        numel = SHAPES[name][0] * torch.Size(SHAPES[name][1:]).numel()
        assert layer.ranks == ranks and layer.k == min(ranks[0] * ranks[1], numel), name
        assert layer.names == (name, name)
        for which, lora in enumerate(host.loras):
            flat = reference_delta(lora, name).abs().flatten().double()
            assert layer.scores[which] == pytest.approx(float(flat.topk(layer.k).values.sum()), rel=1e-5)
            assert layer.l1[which] == pytest.approx(float(flat.sum()), rel=1e-5)


def test_scores_do_not_depend_on_strengths_and_a_cached_table_is_reused(host: Host) -> None:
    job = host.job(host.params(subject_strength=2.5))
    other = host.job(host.params(subject_strength=0.3))
    assert [layer.scores for layer in job.table.layers] == [layer.scores for layer in other.table.layers]
    cached = build_patcher_job(host.params(), None, host.deltas(), table=job.table)
    assert cached.table is job.table


def test_scoring_stops_when_asked(host: Host) -> None:
    with pytest.raises(ScoringInterrupted):
        build_patcher_job(host.params(), None, host.deltas(), should_stop=lambda: True)


def test_job_errors_name_the_problem(host: Host) -> None:
    subject, style = host.deltas()
    with pytest.raises(ValueError):
        build_patcher_job(None, None, (subject, style))
    with pytest.raises(JobError, match="LoRA 'style'"):
        build_patcher_job(host.params(), None, (subject, {}))
    with pytest.raises(IncompatibleLorasError, match="no layer in common"):
        build_patcher_job(host.params(), None, ({ONLY_SUBJECT: subject[ONLY_SUBJECT]}, {FF: style[FF]}))


def test_a_sliced_convolution_is_refused_when_installing(host: Host) -> None:
    value = ("lora", (torch.ones(3, 2, 1, 1), torch.ones(2, 4, 3, 3), 2.0, None, None))
    subject, _ = module_deltas({(f"{CONV}.weight", (0, 0, 3)): value}, finder(host.model), decode, dense)
    _, style = host.deltas()
    job = build_patcher_job(host.params(), None, (subject, {CONV: style[CONV]}))
    with pytest.raises(JobError, match="partial LoRA patches of a convolution"):
        install(job, STRENGTHS)


# ---------------------------------------------------------------- 3. hooks: static methods


@pytest.mark.parametrize("method", ["klora", "fixed", "random"])
def test_static_methods_apply_the_scheduled_delta(host: Host, method: str) -> None:
    params = host.params(method=method)
    job = host.job(params)
    install(job, STRENGTHS)
    schedule = schedule_of(job, params, STEPS)
    records = host.sample(job, STEPS)
    for step, outputs in enumerate(records):
        choices = schedule.at(step).tolist()
        for i, name in enumerate(MANAGED):
            close(outputs[name], host.expected(name, host.chosen(choices[i])), (method, step, name))
        close(outputs[ONLY_SUBJECT], host.expected(ONLY_SUBJECT, host.chosen(SUBJECT)), step)
        close(outputs[ONLY_STYLE], host.expected(ONLY_STYLE, host.chosen(STYLE)), step)
    assert [(r.label, r.schedule.steps) for r in job.passes] == [("first pass", STEPS)]
    table, labels = job.passes[0].choices()
    assert table == schedule.choices.tolist() and labels == ("subject", "style", "both")
    if method == "klora":  # the test is only meaningful if layers really switch, and at different steps
        switches = {tuple(schedule.switch_steps(i)) for i in range(len(MANAGED))}
        assert schedule.at(0).tolist() == [SUBJECT] * len(MANAGED)
        assert set(schedule.choices.flatten().tolist()) == {SUBJECT, STYLE} and len(switches) > 1
    host.assert_weights_untouched()


def test_merge_applies_both_deltas_on_every_shared_layer(host: Host) -> None:
    job = host.job(host.params(method="merge"))
    install(job, STRENGTHS)
    for step, outputs in enumerate(host.sample(job, 3)):
        for name in MANAGED:
            close(outputs[name], host.expected(name, host.chosen(BOTH)), (step, name))
    host.assert_weights_untouched()


def test_second_order_samplers_count_two_evaluations_per_step(host: Host) -> None:
    params = host.params()
    job = host.job(params)
    install(job, STRENGTHS)
    schedule = schedule_of(job, params, STEPS)
    records = host.sample(job, 2 * STEPS, evals_per_step=2)
    assert job.tracker.steps == STEPS
    for evaluation, outputs in enumerate(records):
        choices = schedule.at(evaluation // 2).tolist()
        for i, name in enumerate(MANAGED):
            close(outputs[name], host.expected(name, host.chosen(choices[i])), (evaluation, name))


def test_hooks_are_inert_until_the_first_step(host: Host) -> None:
    job = host.job(host.params())
    install(job, STRENGTHS)
    assert host.hooked() == ALL_LAYERS
    outputs = host.outputs()
    for name in ALL_LAYERS:
        assert torch.equal(outputs[name], host.base[name]), name


# ---------------------------------------------------------------- 3. hooks: method dynamic


def test_dynamic_applies_the_more_divergent_delta(host: Host) -> None:
    job = host.job(host.params(method="dynamic"))
    install(job, STRENGTHS)
    choices = [reference_dynamic_choice(host, name) for name in MANAGED]
    assert set(choices) == {SUBJECT, STYLE}  # both outcomes occur in this fixture
    records = host.sample(job, 3)
    for step, outputs in enumerate(records):
        for name, choice in zip(MANAGED, choices, strict=True):
            close(outputs[name], host.expected(name, host.chosen(choice)), (step, name))
        close(outputs[ONLY_SUBJECT], host.expected(ONLY_SUBJECT, host.chosen(SUBJECT)))
        close(outputs[ONLY_STYLE], host.expected(ONLY_STYLE, host.chosen(STYLE)))
    record = job.passes[0]
    assert record.label == "first pass" and record.schedule is None
    table, labels = record.choices()
    assert labels == ("subject", "style")
    assert table == [[choice] * 3 for choice in choices]  # one decision per (pass, step, layer)
    assert bool(job.selector.dynamic.decided("first pass").all())
    host.assert_weights_untouched()


def test_dynamic_records_are_readable_after_sampling_under_inference_mode(host: Host) -> None:
    """Forge samples (callbacks included) under inference_mode and reads the records after it."""
    job = host.job(host.params(method="dynamic"))
    install(job, STRENGTHS)
    with torch.inference_mode():
        host.sample(job, 3)
    choices = [reference_dynamic_choice(host, name) for name in MANAGED]
    table, _ = job.passes[0].choices()  # flushes the last step's decisions, outside the mode
    assert table == [[choice] * 3 for choice in choices]


def test_dynamic_decides_once_per_step_and_later_calls_reuse_it(host: Host) -> None:
    job = host.job(host.params(method="dynamic"))
    install(job, STRENGTHS)
    first = [reference_dynamic_choice(host, name) for name in MANAGED]
    scale = SECOND_CALL_SCALE
    other = [reference_dynamic_choice(host, name, scale) for name in MANAGED]
    assert first != other  # another input would decide otherwise on some layer
    denoiser = FakeDenoiser(total_steps=2)
    on_step(job, denoiser, False, 1)
    host.outputs()  # the step's first call decides ...
    second = host.outputs(scale)  # ... a later call of the step (the uncond half) reuses it
    for name, choice in zip(MANAGED, first, strict=True):
        close(second[name], host.expected(name, host.chosen(choice), scale), name)
    denoiser.step = 1
    on_step(job, denoiser, False, 1)
    fresh = host.outputs(scale)  # the next step decides afresh from its own first call
    for name, choice in zip(MANAGED, other, strict=True):
        close(fresh[name], host.expected(name, host.chosen(choice), scale), name)
    table, _ = job.passes[0].choices()
    assert table == [[a, b] for a, b in zip(first, other, strict=True)]


def test_dynamic_per_sample_decides_per_batch_row(host: Host) -> None:
    job = host.job(host.params(method="dynamic", kl_per_sample=True))
    install(job, STRENGTHS)
    outputs = host.sample(job, 1)[0]
    for name in MANAGED:
        x = host.inputs[name]
        base = host.base[name]
        d_subject = apply_delta(x, reference_delta(host.subject, name) * SUBJECT_STRENGTH)
        d_style = apply_delta(x, reference_delta(host.style, name) * STYLE_STRENGTH)
        div_subject, div_style = kl_divergences(
            base, d_subject, d_style, channel_dim=1 if x.ndim == 4 else -1, per_sample=True
        )
        for row in range(x.shape[0]):
            want = base[row] + (d_subject if div_subject[row] >= div_style[row] else d_style)[row]
            close(outputs[name][row], want, (name, row))


# ---------------------------------------------------------------- 3. hooks: passes, reinstall, teardown


def test_hires_pass_with_another_method(host: Host) -> None:
    base = host.params(hires="separate", hires_method="merge")
    first, hires = base.for_pass(False), base.for_pass(True)
    job = host.job(first, hires)
    install(job, STRENGTHS)
    host.sample(job, STEPS)
    for _ in range(2):  # Forge calls process_before_every_sampling twice before the hires pass
        install(job, STRENGTHS)
    records = host.sample(job, 4, is_hires=True)
    for outputs in records:
        for name in MANAGED:
            close(outputs[name], host.expected(name, host.chosen(BOTH)), name)
    assert [(r.label, r.schedule.steps) for r in job.passes] == [("first pass", STEPS), ("hires pass", 4)]
    assert job.passes[1].choices() == ([[BOTH] * 4] * len(MANAGED), ("subject", "style", "both"))


def test_klora_first_pass_then_dynamic_hires_pass(host: Host) -> None:
    base = host.params(hires="separate", hires_method="dynamic")
    job = host.job(base.for_pass(False), base.for_pass(True))
    install(job, STRENGTHS)
    host.sample(job, 3)
    install(job, STRENGTHS)
    outputs = host.sample(job, 2, is_hires=True)[-1]
    choices = [reference_dynamic_choice(host, name) for name in MANAGED]
    for name, choice in zip(MANAGED, choices, strict=True):
        close(outputs[name], host.expected(name, host.chosen(choice)), name)
    assert [r.label for r in job.passes] == ["first pass", "hires pass"]
    assert job.passes[0].schedule is not None and job.passes[1].schedule is None
    table, labels = job.passes[1].choices()
    assert labels == ("subject", "style") and table == [[c] * 2 for c in choices]


def test_hires_off_leaves_the_hires_pass_alone(host: Host) -> None:
    base = host.params(hires="off")
    job = host.job(base.for_pass(False), base.for_pass(True))
    assert job.hires_params is None
    install(job, STRENGTHS)
    host.sample(job, 2)
    for outputs in host.sample(job, 2, is_hires=True):
        for name in ALL_LAYERS:
            assert torch.equal(outputs[name], host.base[name]), name
    assert [r.label for r in job.passes] == ["first pass"]


def test_installing_twice_leaves_one_hook_per_module(host: Host) -> None:
    job = host.job(host.params(method="merge"))
    first = install(job, STRENGTHS)
    second = install(job, STRENGTHS)
    assert not first.active and second.active and job.hooks is second
    for name in ALL_LAYERS:
        assert len(host.layer(name)._forward_hooks) == 1, name
    outputs = host.sample(job, 1)[0]
    for name in MANAGED:  # each delta added exactly once
        close(outputs[name], host.expected(name, host.chosen(BOTH)), name)


@pytest.mark.parametrize("method", ["klora", "dynamic"])
def test_teardown_removes_every_hook_and_the_plain_output_returns(host: Host, method: str) -> None:
    job = host.job(host.params(method=method))
    install(job, STRENGTHS)
    host.sample(job, 3)
    assert host.hooked() == ALL_LAYERS
    teardown(job)
    assert host.hooked() == [] and job.hooks is None and not job.live
    outputs = host.outputs()
    for name in ALL_LAYERS:
        assert torch.equal(outputs[name], host.base[name]), name
    host.assert_weights_untouched()
    teardown(job)  # twice is harmless
    on_step(job, FakeDenoiser(total_steps=3), False, 1)  # a late callback does not revive the job
    assert not job.live and host.hooked() == []


def test_guard_sample_tears_down_when_sampling_raises(host: Host) -> None:
    job = host.job(host.params())
    install(job, STRENGTHS)
    failures: list[BaseException] = []

    def sample(*_args: Any, **_kwargs: Any) -> None:
        host.sample(job, 2)
        raise RuntimeError("out of memory")

    p = SimpleNamespace(sample=sample)
    guard_sample(p, job, failures.append)
    with pytest.raises(RuntimeError, match="out of memory"):
        p.sample("conditioning")
    assert [str(f) for f in failures] == ["out of memory"]
    assert host.hooked() == [] and not job.live
    for name, out in host.outputs().items():
        assert torch.equal(out, host.base[name]), name
    host.assert_weights_untouched()


def test_guard_sample_passes_results_through(host: Host) -> None:
    job = host.job(host.params())
    install(job, STRENGTHS)
    p = SimpleNamespace(sample=lambda *args, **kwargs: (args, kwargs))
    guard_sample(p, job)
    assert p.sample(1, two=2) == ((1,), {"two": 2})
    assert host.hooked() == ALL_LAYERS


def test_a_failed_job_stays_inert(host: Host) -> None:
    job = host.job(host.params())
    install(job, STRENGTHS)
    job.failed = "boom"
    on_step(job, FakeDenoiser(total_steps=3), False, 1)
    for name, out in host.outputs().items():
        assert torch.equal(out, host.base[name]), name


# ---------------------------------------------------------------- patches that are not plain deltas


@pytest.mark.parametrize("form", ["factors", "dense"])
def test_a_patch_wider_than_its_layer_is_skipped(host: Host, form: str) -> None:
    g = torch.Generator().manual_seed(9)
    value = ("lora", (randn(g, 16, 2), randn(g, 2, 12), 2.0, None, None))  # 12 inputs, the layer has 8
    decoder = decode if form == "factors" else (lambda _value: None)  # dense: the host merge pads to 12
    deltas, skipped = module_deltas({f"{PROJ}.weight": value}, finder(host.model), decoder, dense)
    assert deltas == {} and skipped == [f"{PROJ}.weight"]


def test_conv_shaped_factors_on_a_linear_layer_work(host: Host) -> None:
    g = torch.Generator().manual_seed(9)
    up, down = randn(g, 16, 2, 1, 1), randn(g, 2, 8, 1, 1)
    deltas, _ = module_deltas(
        {f"{PROJ}.weight": ("lora", (up, down, 2.0, None, None))}, finder(host.model), decode, dense
    )
    x = host.inputs[PROJ]
    want = apply_delta(x, (up.flatten(1) @ down.flatten(1)) * 1.0)
    close(deltas[PROJ].branch(1.0, torch.float32).delta(x), want)


def test_sliced_patches_on_a_packed_4bit_weight_use_the_quant_state_shape() -> None:
    g = torch.Generator().manual_seed(5)
    layer = Packed4BitLinear(randn(g, 24, 8, scale=0.3))
    model = build_model({QKV: layer})
    lora = make_lora("s", {QKV: ("qkv", 1.0)}, rank=2, alpha=2.0, seed=1)
    deltas, skipped = module_deltas(lora.patches, finder(model), decode, dense)
    assert skipped == [] and deltas[QKV].shape == (24, 8)
