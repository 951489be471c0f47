from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib_klora.dynamic import hooks
from lib_klora.dynamic import selectors as dynamic
from lib_klora.dynamic.branches import ConvSpec, LowRankBranch, SumBranch
from lib_klora.dynamic.hooks import install_hooks
from lib_klora.dynamic.kl import LABELS, choose, kl_divergences, subsample_tokens
from lib_klora.dynamic.selectors import DynamicSelector
from lib_klora.fusion.schedule import progress_at, time_scale
from lib_klora.fusion.selection_map import render_selection_map
from lib_klora.loras.lora_file import LowRankModule

SUBJECT, STYLE = 0, 1


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- brute-force reference (numpy, float64)


def _reference(
    base: Tensor, delta: Tensor, channel_dim: int, temperature: float, direction: str, per_sample: bool
) -> np.ndarray:
    z0 = np.moveaxis(base.double().numpy(), channel_dim, -1) / temperature
    z1 = np.moveaxis((base.double() + delta.double()).numpy(), channel_dim, -1) / temperature
    out = np.zeros(z0.shape[:-1])
    for idx in np.ndindex(*z0.shape[:-1]):  # token by token, the textbook formulas
        e0, e1 = np.exp(z0[idx] - z0[idx].max()), np.exp(z1[idx] - z1[idx].max())
        p0, p1 = e0 / e0.sum(), e1 / e1.sum()
        kl = float(np.sum(p0 * np.log(p0 / p1)))
        if direction == "symmetric":
            kl += float(np.sum(p1 * np.log(p1 / p0)))
        out[idx] = kl
    if per_sample:
        return out.reshape(out.shape[0], -1).mean(axis=1)
    return np.asarray(out.mean())


@pytest.mark.parametrize("direction", ["forward", "symmetric"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("layout", ["tokens", "conv"])
def test_kl_matches_double_reference(
    direction: str, temperature: float, per_sample: bool, layout: str
) -> None:
    g = _gen(0)
    shape, channel_dim = ((2, 5, 7), -1) if layout == "tokens" else ((2, 7, 3, 4), 1)
    base = torch.randn(shape, generator=g) * 2
    d_sub = torch.randn(shape, generator=g) * 0.3
    d_sty = torch.randn(shape, generator=g) * 0.7
    got = kl_divergences(
        base,
        d_sub,
        d_sty,
        channel_dim=channel_dim,
        temperature=temperature,
        direction=direction,  # type: ignore[arg-type]
        per_sample=per_sample,
    )
    for value, delta in zip(got, (d_sub, d_sty), strict=True):
        want = _reference(base, delta, channel_dim, temperature, direction, per_sample)
        assert value.dtype == torch.float32
        assert value.shape == ((2,) if per_sample else ())
        np.testing.assert_allclose(value.double().numpy(), want, rtol=1e-4, atol=1e-7)


def test_kl_of_half_precision_inputs_is_computed_in_fp32() -> None:
    g = _gen(1)
    base, d_sub, d_sty = (torch.randn(3, 6, 16, generator=g) * s for s in (1.0, 0.2, 0.4))
    full = kl_divergences(base, d_sub, d_sty, channel_dim=-1)
    half = kl_divergences(base.half(), d_sub.half(), d_sty.half(), channel_dim=-1)
    for a, b in zip(full, half, strict=True):
        assert b.dtype == torch.float32
        assert b.item() == pytest.approx(a.item(), rel=2e-2)


def test_zero_style_delta_has_zero_divergence_and_the_subject_wins() -> None:
    g = _gen(2)
    base, d_sub = torch.randn(2, 9, 12, generator=g), torch.randn(2, 9, 12, generator=g) * 0.1
    div_sub, div_sty = kl_divergences(base, d_sub, torch.zeros_like(base), channel_dim=-1)
    assert div_sty.item() == 0.0 and div_sub.item() > 0
    assert choose(div_sub, div_sty).item() == SUBJECT
    div_sub, div_sty = kl_divergences(base, torch.zeros_like(base), d_sub, channel_dim=-1)
    assert choose(div_sub, div_sty).item() == STYLE


def test_large_style_delta_beats_tiny_subject_delta() -> None:
    g = _gen(3)
    base = torch.randn(2, 8, 10, 10, generator=g)
    d_sub = torch.randn(base.shape, generator=g) * 1e-3
    d_sty = torch.randn(base.shape, generator=g) * 0.5
    div_sub, div_sty = kl_divergences(base, d_sub, d_sty, channel_dim=1)
    assert div_sty > 100 * div_sub
    assert choose(div_sub, div_sty).item() == STYLE


def test_ties_go_to_the_subject() -> None:
    assert choose(1.0, 1.0) == SUBJECT
    assert choose(0.0, 0.0) == SUBJECT
    assert choose(1.0, 1.0 + 1e-9) == STYLE
    assert choose(torch.tensor(0.25), torch.tensor(0.25)).item() == SUBJECT
    g = _gen(4)
    base, delta = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    div_sub, div_sty = kl_divergences(base, delta, delta.clone(), channel_dim=-1)  # identical branches
    assert div_sub.item() == div_sty.item()
    assert choose(div_sub, div_sty).item() == SUBJECT


def test_choose_returns_int_for_numbers_and_uint8_tensors_for_tensors() -> None:
    assert isinstance(choose(0.1, 0.2), int)
    got = choose(torch.tensor([0.3, 0.1, 0.2]), torch.tensor([0.2, 0.2, 0.2]))
    assert isinstance(got, Tensor) and got.dtype == torch.uint8
    assert got.tolist() == [SUBJECT, STYLE, SUBJECT]
    assert choose(float("nan"), 1.0) == SUBJECT


def test_style_scale_multiplies_the_style_divergence() -> None:
    assert choose(1.0, 0.6) == SUBJECT
    assert choose(1.0, 0.6, style_scale=2.0) == STYLE
    assert choose(1.0, 0.6, style_scale=1.0 / 0.6) == SUBJECT  # exact tie after scaling
    assert choose(1.0, 5.0, style_scale=0.0) == SUBJECT


def test_higher_temperature_flattens_and_shrinks_divergence() -> None:
    g = _gen(5)
    base = torch.randn(2, 16, 32, generator=g)
    delta = torch.randn(base.shape, generator=g) * 0.05
    values = [
        kl_divergences(base, delta, delta, channel_dim=-1, temperature=t)[0].item() for t in (0.5, 1, 2, 4)
    ]
    assert values == sorted(values, reverse=True)
    # For small deltas KL ≈ Var_p0(δ)/(2τ²); at high τ p0 is almost uniform, so doubling τ quarters it.
    assert values[3] / values[2] == pytest.approx(0.25, rel=0.1)


def test_temperature_can_flip_the_decision() -> None:
    # Sharp softmax: only the style delta dethrones the winning channel. Flat softmax: the subject delta's
    # larger spread across channels matters more.
    base = torch.zeros(1, 1, 8)
    base[..., 0] = 10.0
    d_sub = torch.tensor([0.0, 5, -5, 5, -5, 5, -5, 5]).view(1, 1, 8)
    d_sty = torch.zeros(1, 1, 8)
    d_sty[..., 0] = -11.0
    low = kl_divergences(base, d_sub, d_sty, channel_dim=-1, temperature=1.0)
    high = kl_divergences(base, d_sub, d_sty, channel_dim=-1, temperature=100.0)
    assert choose(*low).item() == STYLE
    assert choose(*high).item() == SUBJECT


def test_symmetric_is_at_least_the_forward_divergence() -> None:
    g = _gen(6)
    for _ in range(5):
        base = torch.randn(3, 7, 9, generator=g) * 3
        d_sub, d_sty = torch.randn(base.shape, generator=g), torch.randn(base.shape, generator=g) * 2
        fwd = kl_divergences(base, d_sub, d_sty, channel_dim=-1, per_sample=True)
        sym = kl_divergences(base, d_sub, d_sty, channel_dim=-1, direction="symmetric", per_sample=True)
        for f, s in zip(fwd, sym, strict=True):
            assert (f >= 0).all()
            assert (s >= f).all()
    zero = torch.zeros(2, 3, 4)
    assert kl_divergences(zero, zero, zero, channel_dim=-1, direction="symmetric")[0].item() == 0.0


def test_per_sample_decides_each_row() -> None:
    g = _gen(7)
    base = torch.randn(3, 6, 10, generator=g)
    d_sub, d_sty = torch.zeros_like(base), torch.zeros_like(base)
    d_sub[0] = torch.randn(6, 10, generator=g) * 0.5  # row 0: only the subject moves
    d_sty[1] = torch.randn(6, 10, generator=g) * 0.5  # row 1: only the style moves
    d_sub[2], d_sty[2] = 0.01 * torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    div_sub, div_sty = kl_divergences(base, d_sub, d_sty, channel_dim=-1, per_sample=True)
    assert div_sub.shape == div_sty.shape == (3,)
    assert choose(div_sub, div_sty).tolist() == [SUBJECT, STYLE, STYLE]
    pooled = kl_divergences(base, d_sub, d_sty, channel_dim=-1)
    assert pooled[0].item() == pytest.approx(div_sub.mean().item(), rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"direction": "backward"}, ValueError),
        ({"temperature": 0.0}, ValueError),
        ({"temperature": float("inf")}, ValueError),
        ({"channel_dim": 3}, ValueError),
        ({"channel_dim": 0, "per_sample": True}, ValueError),
    ],
)
def test_kl_rejects_bad_arguments(kwargs: dict, error: type[Exception]) -> None:
    base = torch.zeros(2, 3, 4)
    kwargs = {"channel_dim": -1, **kwargs}
    with pytest.raises(error):
        kl_divergences(base, base, base, **kwargs)
    with pytest.raises(ValueError, match="shape"):
        kl_divergences(base, base, torch.zeros(2, 3, 5), channel_dim=-1)


# ---------------------------------------------------------------- low-rank branches


def test_linear_branch_equals_the_dense_delta() -> None:
    g = _gen(10)
    up, down = torch.randn(12, 4, generator=g), torch.randn(4, 20, generator=g)
    x = torch.randn(2, 7, 20, generator=g)
    branch = LowRankBranch(up, down, 0.3)
    want = F.linear(x, 0.3 * up @ down)
    torch.testing.assert_close(branch.delta(x), want, rtol=1e-5, atol=1e-5)
    assert not branch.is_conv and branch.rank == 4 and branch.out_features == 12


def test_sum_branch_adds_its_parts_and_a_negative_part_takes_a_merged_delta_out() -> None:
    g = _gen(11)
    up_a, down_a = torch.randn(12, 4, generator=g), torch.randn(4, 20, generator=g)
    up_b, down_b = torch.randn(12, 2, generator=g), torch.randn(2, 20, generator=g)
    weight, x = torch.randn(12, 20, generator=g), torch.randn(2, 7, 20, generator=g)
    difference = SumBranch([LowRankBranch(up_a, down_a, 0.3), LowRankBranch(up_b, down_b, -0.7)])
    torch.testing.assert_close(difference.delta(x), F.linear(x, 0.3 * up_a @ down_a - 0.7 * up_b @ down_b))
    held = F.linear(x, weight + 0.7 * up_b @ down_b)  # a layer holding b merged, switched to a
    want = F.linear(x, weight + 0.3 * up_a @ down_a)
    torch.testing.assert_close(difference.add_into(held.clone(), x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at least one part"):
        SumBranch([])
    up_conv, down_conv = torch.randn(12, 2, generator=g), torch.randn(2, 3, 3, 3, generator=g)
    conv = LowRankBranch(up_conv, down_conv, conv=ConvSpec((3, 3)))
    with pytest.raises(ValueError, match="mix conv and linear"):
        SumBranch([LowRankBranch(up_a, down_a), conv])


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=False),
        nn.Conv2d(6, 10, 3, stride=1, padding="same", bias=False),
        nn.Conv2d(6, 10, (3, 1), stride=(2, 1), padding=(2, 0), dilation=2, bias=False),
        nn.Conv2d(6, 10, 3, padding=1, groups=2, bias=False),
        nn.Conv2d(6, 10, 3, padding=1, padding_mode="reflect", bias=False),
        nn.Conv2d(6, 10, 1, bias=False),
    ],
    ids=["3x3-s2-p1", "same", "dilated", "groups", "reflect", "1x1"],
)
def test_conv_branch_equals_the_dense_locon_kernel(conv: nn.Conv2d) -> None:
    g = _gen(11)
    rank = 3
    spec = ConvSpec.of(conv)
    kh, kw = spec.kernel_size
    in_per_group = 6 // spec.groups
    down = torch.randn(rank, in_per_group, kh, kw, generator=g)
    up = torch.randn(10, rank, 1, 1, generator=g)
    scale = 0.7
    x = torch.randn(2, 6, 9, 8, generator=g)
    dense = (scale * up.flatten(1) @ down.flatten(1)).reshape(10, in_per_group, kh, kw)
    with torch.no_grad():
        conv.weight.copy_(dense)  # the module itself is the reference: same padding mode, groups, ...
        want = conv(x)
    got = LowRankBranch(up, down, scale, conv=spec).delta(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_from_module_folds_alpha_strength_and_cp_core() -> None:
    g = _gen(12)
    linear = nn.Linear(16, 8)
    lora = LowRankModule(
        "a", "a", down=torch.randn(4, 16, generator=g), up=torch.randn(8, 4, generator=g), alpha=2.0
    )
    x = torch.randn(3, 16, generator=g)
    branch = LowRankBranch.from_module(lora, linear, strength=0.5)
    torch.testing.assert_close(branch.delta(x), 0.5 * F.linear(x, lora.delta()), rtol=1e-5, atol=1e-5)

    conv = nn.Conv2d(5, 6, 3, stride=2, padding=1)
    cp = LowRankModule(
        "c",
        "c",
        down=torch.randn(4, 5, 1, 1, generator=g),
        up=torch.randn(6, 4, 1, 1, generator=g),
        mid=torch.randn(4, 4, 3, 3, generator=g),
        alpha=1.0,
    )
    branch = LowRankBranch.from_module(cp, conv)
    assert branch.is_conv
    x = torch.randn(2, 5, 7, 7, generator=g)
    want = F.conv2d(x, cp.delta().reshape(6, 5, 3, 3), stride=2, padding=1)
    torch.testing.assert_close(branch.delta(x), want, rtol=1e-4, atol=1e-4)

    no_target = LowRankBranch.from_module(cp)  # 4-D without a module: stride 1, unpadded
    assert no_target.conv == ConvSpec(kernel_size=(3, 3))
    with pytest.raises(TypeError):
        LowRankBranch.from_module(lora, nn.Conv1d(16, 8, 1))


def test_branch_casts_input_and_output_and_caches_factors_per_device() -> None:
    g = _gen(13)
    lora = LowRankModule("a", "a", down=torch.randn(2, 6, generator=g), up=torch.randn(4, 2, generator=g))
    target = nn.Linear(6, 4).to(torch.bfloat16)
    assert LowRankBranch.from_module(lora, target).dtype == torch.float32  # branch_dtype: half on a CPU
    on_accelerator = nn.Linear(6, 4, device="meta", dtype=torch.bfloat16)
    assert LowRankBranch.from_module(lora, on_accelerator).dtype == torch.bfloat16  # elsewhere: the target's
    half = LowRankBranch.from_module(lora, target, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    x = torch.randn(3, 6, dtype=torch.float64, generator=g)
    assert half.delta(x).dtype == torch.float64
    assert half.delta(x, torch.float16).dtype == torch.float16
    cpu = torch.device("cpu")
    assert half.factors_on(cpu)[0] is half.factors_on(cpu)[0]
    meta = torch.device("meta")
    moved = half.factors_on(meta)
    assert moved[0].device.type == "meta" and half.factors_on(meta)[0] is moved[0]
    assert half.delta(torch.empty(3, 6, device=meta)).device.type == "meta"


def test_branch_rejects_mismatched_factors() -> None:
    with pytest.raises(ValueError):
        LowRankBranch(torch.zeros(4, 3), torch.zeros(2, 5))
    with pytest.raises(ValueError):
        LowRankBranch(torch.zeros(4, 2), torch.zeros(2, 5), conv=ConvSpec(kernel_size=(3, 3)))
    with pytest.raises(ValueError):
        LowRankBranch(torch.zeros(5, 2), torch.zeros(2, 3, 1, 1), conv=ConvSpec(kernel_size=(1, 1), groups=2))


# ---------------------------------------------------------------- token subsample


def test_subsample_tokens_uses_an_odd_stride_and_keeps_batch_and_channels() -> None:
    t = torch.arange(2 * 64 * 3, dtype=torch.float32).reshape(2, 64, 3)
    sub = subsample_tokens(t, -1, 16)
    assert sub.shape == (2, 13, 3)  # stride 4 -> 5
    torch.testing.assert_close(sub, t[:, ::5])
    assert sub.data_ptr() == t.data_ptr()  # a view, no copy
    conv = torch.randn(2, 4, 8, 8)
    sub = subsample_tokens(conv, 1, 20)
    assert sub.shape == (2, 4, 13)  # 64 pixels, stride 4 -> 5
    torch.testing.assert_close(sub, conv.flatten(2)[..., ::5])
    assert subsample_tokens(t, -1, 64) is t


def test_selector_decides_on_the_subsample() -> None:
    g = _gen(14)
    base = torch.randn(2, 300, 8, generator=g)
    d_sub = torch.randn(base.shape, generator=g) * 0.2
    quiet = torch.randn(base.shape, generator=g) * 0.02
    loud = torch.randn(base.shape, generator=g) * 2.0
    on_sample, off_sample = quiet.clone(), quiet.clone()
    on_sample[:, ::7] = loud[:, ::7]  # 300 tokens, at most 50: stride 6, made odd -> 7
    off_sample[:, 1::7] = loud[:, 1::7]  # only tokens the subsample skips move
    sampled, full = DynamicSelector(1, max_tokens=50), DynamicSelector(1, max_tokens=None)
    assert sampled.decide(0, base, d_sub, on_sample, -1).item() == STYLE
    want = kl_divergences(base[:, ::7], d_sub[:, ::7], on_sample[:, ::7], channel_dim=-1)
    assert choose(*want).item() == STYLE
    assert sampled.decide(0, base, d_sub, off_sample, -1).item() == SUBJECT
    assert full.decide(0, base, d_sub, off_sample, -1).item() == STYLE


# ---------------------------------------------------------------- hooks

IN, OUT = 6, 5


def _linear(seed: int = 20) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT)


def _reader_branch(channel: int, gain: float, seed: int) -> LowRankBranch:
    """A rank-2 branch that mostly reads input `channel`: input decides which branch moves the output."""
    g = _gen(seed)
    down = torch.randn(2, IN, generator=g) * 0.01
    down[:, channel] = torch.tensor([1.0, -1.0])
    return LowRankBranch(torch.randn(OUT, 2, generator=g), down, gain)


def _x(channel: int, batch: int = 2, tokens: int = 4) -> Tensor:
    x = torch.randn(batch, tokens, IN, generator=_gen(30 + channel)) * 0.05
    x[..., channel] += 3.0
    return x


def _base(module: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return F.linear(x, module.weight, module.bias)


@pytest.fixture(params=["host", "device"])
def select_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a hook test on both paths: the CPU's host-side choice and the sync-free torch.where one."""
    if request.param == "device":
        monkeypatch.setattr(hooks, "SYNC_FREE_DEVICES", ())
    return request.param


@pytest.fixture
def pair() -> tuple[LowRankBranch, LowRankBranch]:
    return _reader_branch(0, 1.0, 1), _reader_branch(1, 1.0, 2)  # subject reads channel 0, style channel 1


def _install(modules: dict, branches: dict, selector: DynamicSelector, live: list[bool] | None = None):
    live = live if live is not None else [True]
    index = {name: i for i, name in enumerate(branches)}
    return install_hooks(modules, branches, selector, index, lambda: live[0])


def test_hook_output_is_base_plus_the_chosen_delta(
    pair: tuple[LowRankBranch, LowRankBranch], select_path: str
) -> None:
    subject, style = pair
    module = _linear()
    selector = DynamicSelector(1)
    with _install({"m": module}, {"m": pair}, selector):
        for step, (channel, chosen) in enumerate(((0, subject), (1, style))):
            selector.begin_pass("p", 2) if step == 0 else selector.set_step(step)
            x = _x(channel)
            base = _base(module, x)
            want_choice = choose(*kl_divergences(base, subject.delta(x), style.delta(x), channel_dim=-1))
            assert want_choice.item() == (SUBJECT if chosen is subject else STYLE)
            with torch.no_grad():
                torch.testing.assert_close(module(x), base + chosen.delta(x))
        assert selector.table("p").tolist() == [[SUBJECT, STYLE]]


def test_one_decision_per_step_and_layer_across_calls(
    pair: tuple[LowRankBranch, LowRankBranch], monkeypatch: pytest.MonkeyPatch, select_path: str
) -> None:
    subject, style = pair
    module = _linear()
    calls = []
    original = dynamic.kl_divergences
    monkeypatch.setattr(dynamic, "kl_divergences", lambda *a, **k: calls.append(1) or original(*a, **k))
    selector = DynamicSelector(1)
    selector.begin_pass("p", 3)
    with _install({"m": module}, {"m": pair}, selector), torch.no_grad():
        cond, uncond = _x(0), _x(1)  # alone, cond picks the subject and uncond the style
        module(cond)
        out = module(uncond)  # same step: reuses the cond call's decision
        torch.testing.assert_close(out, _base(module, uncond) + subject.delta(uncond))
        module(uncond)
        assert len(calls) == 1
        selector.set_step(1)  # a new step decides afresh, from its own first call
        out = module(uncond)
        torch.testing.assert_close(out, _base(module, uncond) + style.delta(uncond))
        module(cond)
        assert len(calls) == 2
    assert selector.table("p")[0, :2].tolist() == [SUBJECT, STYLE]
    assert selector.decided("p").tolist() == [[True, True, False]]


def test_hooks_are_removed_by_remove_and_by_an_exception_in_the_with_block(
    pair: tuple[LowRankBranch, LowRankBranch],
) -> None:
    module = _linear()
    x = _x(0)
    selector = DynamicSelector(1)
    hooks = _install({"m": module}, {"m": pair}, selector)
    assert len(hooks) == 1 and len(module._forward_hooks) == 1
    with torch.no_grad():
        assert not torch.equal(module(x), _base(module, x))
    hooks.remove()
    hooks.remove()  # idempotent
    assert len(module._forward_hooks) == 0 and not hooks.active
    with torch.no_grad():
        torch.testing.assert_close(module(x), _base(module, x))

    with pytest.raises(RuntimeError, match="sampler blew up"), _install({"m": module}, {"m": pair}, selector):
        assert len(module._forward_hooks) == 1
        raise RuntimeError("sampler blew up")
    assert len(module._forward_hooks) == 0


def test_not_live_leaves_the_output_alone(pair: tuple[LowRankBranch, LowRankBranch]) -> None:
    module, live = _linear(), [False]
    x = _x(0)
    selector = DynamicSelector(1)
    with _install({"m": module}, {"m": pair}, selector, live), torch.no_grad():
        torch.testing.assert_close(module(x), _base(module, x))
        live[0] = True
        assert not torch.equal(module(x), _base(module, x))


class _Broken(LowRankBranch):
    def delta(self, x: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
        raise RuntimeError("bug in a branch")


def test_a_failing_hook_disables_the_set_and_the_forward_returns_base(
    pair: tuple[LowRankBranch, LowRankBranch], caplog: pytest.LogCaptureFixture
) -> None:
    subject = pair[0]
    good, bad = _linear(1), _linear(2)
    broken = _Broken(torch.zeros(OUT, 1), torch.zeros(1, IN))
    selector = DynamicSelector(2)
    hooks = _install({"good": good, "bad": bad}, {"good": pair, "bad": (subject, broken)}, selector)
    x = _x(0)
    with torch.no_grad():
        torch.testing.assert_close(bad(x), _base(bad, x))  # no exception reaches the host's forward
        assert isinstance(hooks.error, RuntimeError) and hooks.failed_layer == "bad"
        assert not hooks.active
        assert len(good._forward_hooks) == 0 and len(bad._forward_hooks) == 0
        torch.testing.assert_close(good(x), _base(good, x))
    assert "bad" in caplog.text


def test_single_branch_modules_get_their_delta_unconditionally(
    pair: tuple[LowRankBranch, LowRankBranch],
) -> None:
    subject, style = pair
    a, b, c = _linear(1), _linear(2), _linear(3)
    selector = DynamicSelector(0)
    branches = {"a": (subject, None), "b": (None, style), "c": (None, None)}
    hooks = install_hooks({"a": a, "b": b, "c": c}, branches, selector, {}, lambda: True)
    assert len(hooks) == 2 and len(c._forward_hooks) == 0
    x = _x(1)
    with hooks, torch.no_grad():
        torch.testing.assert_close(a(x), _base(a, x) + subject.delta(x))
        torch.testing.assert_close(b(x), _base(b, x) + style.delta(x))


def test_install_validates_names_and_indices(pair: tuple[LowRankBranch, LowRankBranch]) -> None:
    module = _linear()
    selector = DynamicSelector(1)
    with pytest.raises(KeyError, match="no layer index"):
        install_hooks({"m": module}, {"m": pair}, selector, {}, lambda: True)
    with pytest.raises(KeyError, match="no module"):
        install_hooks({}, {"m": pair}, selector, {"m": 0}, lambda: True)
    with pytest.raises(IndexError):
        install_hooks({"m": module}, {"m": pair}, selector, {"m": 1}, lambda: True)
    assert len(module._forward_hooks) == 0


def test_keyword_input_is_supported(pair: tuple[LowRankBranch, LowRankBranch]) -> None:
    subject, _ = pair
    module = _linear()
    x = _x(0)
    with _install({"m": module}, {"m": pair}, DynamicSelector(1)), torch.no_grad():
        torch.testing.assert_close(module(input=x), _base(module, x) + subject.delta(x))


def test_conv_module_hook(select_path: str) -> None:
    g = _gen(40)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    spec = ConvSpec.of(conv)
    subject = LowRankBranch(
        torch.randn(6, 2, generator=g), torch.randn(2, 4, 3, 3, generator=g), 0.01, conv=spec
    )
    style = LowRankBranch(
        torch.randn(6, 3, generator=g), torch.randn(3, 4, 3, 3, generator=g), 1.0, conv=spec
    )
    x = torch.randn(2, 4, 10, 10, generator=g)
    selector = DynamicSelector(1)
    selector.begin_pass("p", 1)
    with _install({"c": conv}, {"c": (subject, style)}, selector), torch.no_grad():
        out = conv(x)
    with torch.no_grad():
        base = conv(x)
    torch.testing.assert_close(out, base + style.delta(x))
    assert selector.table("p").tolist() == [[STYLE]]


def test_per_sample_hook_picks_per_row(pair: tuple[LowRankBranch, LowRankBranch]) -> None:
    subject, style = pair
    module = _linear()
    x = torch.cat([_x(0, batch=1), _x(1, batch=1)])  # row 0 favours the subject, row 1 the style
    selector = DynamicSelector(1, per_sample=True)
    selector.begin_pass("p", 1)
    with _install({"m": module}, {"m": pair}, selector), torch.no_grad():
        out = module(x)
    base = _base(module, x)
    torch.testing.assert_close(out[0], base[0] + subject.delta(x)[0])
    torch.testing.assert_close(out[1], base[1] + style.delta(x)[1])
    assert selector.table("p").tolist() == [[SUBJECT]]  # 1 of 2 rows is no majority: the tie goes to subject


def test_decision_table_feeds_the_selection_map(
    pair: tuple[LowRankBranch, LowRankBranch], select_path: str
) -> None:
    names = ["l0", "l1", "l2"]
    modules = {n: _linear(i) for i, n in enumerate(names)}
    selector = DynamicSelector(3)
    steps = 4
    with _install(modules, dict.fromkeys(names, pair), selector), torch.no_grad():
        for pass_key in ("first", "hires"):
            selector.begin_pass(pass_key, steps)
            for step in range(steps):
                selector.set_step(step)
                x = _x(step % 2)  # even steps favour the subject, odd the style
                for name in names:
                    modules[name](x)
    assert selector.passes() == ["first", "hires"]
    for pass_key in ("first", "hires"):
        table = selector.table(pass_key)
        assert table.dtype == torch.uint8 and table.shape == (3, steps)
        assert table.tolist() == [[SUBJECT, STYLE, SUBJECT, STYLE]] * 3
        assert bool(selector.decided(pass_key).all())
    image = render_selection_map(names, selector.table("first").tolist(), labels=selector.labels)
    assert image.size[0] > 0 and selector.labels == LABELS == ("subject", "style")


def test_steps_beyond_the_pass_land_in_the_last_column(pair: tuple[LowRankBranch, LowRankBranch]) -> None:
    module = _linear()
    selector = DynamicSelector(1)
    selector.begin_pass("p", 2)
    selector.set_step(5)
    with _install({"m": module}, {"m": pair}, selector), torch.no_grad():
        module(_x(1))
    assert selector.table("p").tolist() == [[SUBJECT, STYLE]]
    assert selector.decided("p").tolist() == [[False, True]]


def test_decide_without_a_pass_neither_caches_nor_records() -> None:
    selector = DynamicSelector(1)
    base = torch.randn(2, 3, 4)
    assert selector.decide(0, base, base * 0.1, base * 0, -1).item() == SUBJECT
    assert selector.lookup(0) is None and selector.passes() == []
    with pytest.raises(IndexError):
        selector.decide(1, base, base, base, -1)


def test_hybrid_scales_the_style_divergence_by_the_time_scale(
    pair: tuple[LowRankBranch, LowRankBranch], select_path: str
) -> None:
    subject, style = pair
    x = _x(0)  # subject divergence larger on its own
    module = _linear()
    # S(r) = α·r + β. A huge S favours the style; S = 0 leaves the subject unbeatable.
    for beta, alpha, want in ((1e9, 1.5, style), (0.0, 0.0, subject)):
        selector = DynamicSelector(1, hybrid=True, alpha=alpha, beta=beta)
        selector.begin_pass("p", 10)
        selector.set_step(3)
        assert selector.style_scale() == time_scale(progress_at(3, 10), "s", alpha, beta)
        with _install({"m": module}, {"m": pair}, selector), torch.no_grad():
            torch.testing.assert_close(module(x), _base(module, x) + want.delta(x))
    plain = DynamicSelector(1)
    plain.begin_pass("p", 10)
    assert plain.style_scale() == 1.0
    star = DynamicSelector(1, hybrid=True, pattern="s*")
    star.begin_pass("p", 20)
    star.set_step(3)
    assert star.style_scale() == time_scale(0.15, "s*")
    assert math.isfinite(star.style_scale())


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -1.0}, {"direction": "js"}, {"max_tokens": 0}, {"hybrid": True, "pattern": "q"}],
)
def test_selector_rejects_bad_options(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        DynamicSelector(1, **kwargs)
    with pytest.raises(ValueError):
        DynamicSelector(1).begin_pass("p", 0)


@pytest.mark.parametrize("tokens", [8, 40])
def test_linear_hook_with_token_subsample(tokens: int, select_path: str) -> None:
    g = _gen(50)
    module = _linear()
    subject = LowRankBranch(torch.randn(OUT, 2, generator=g), torch.randn(2, IN, generator=g), 0.2)
    style = LowRankBranch(torch.randn(OUT, 3, generator=g), torch.randn(3, IN, generator=g), 0.2)
    x = torch.randn(2, tokens, IN, generator=g) * 2
    selector = DynamicSelector(1, max_tokens=10)
    selector.begin_pass("p", 1)
    with _install({"m": module}, {"m": (subject, style)}, selector), torch.no_grad():
        out = module(x)
    base = _base(module, x)
    stride = 1 if tokens <= 10 else 5  # 40 tokens, at most 10: stride 4, made odd
    want = choose(
        *kl_divergences(
            base[:, ::stride], subject.delta(x)[:, ::stride], style.delta(x)[:, ::stride], channel_dim=-1
        )
    )
    chosen = subject if want.item() == SUBJECT else style
    torch.testing.assert_close(out, base + chosen.delta(x))
    assert selector.table("p").tolist() == [[want.item()]]


# ---------------------------------------------------------------- in-place accumulation


def _linear_branch(out_f: int, in_f: int, rank: int, seed: int, scale: float = 0.7) -> LowRankBranch:
    g = _gen(seed)
    return LowRankBranch(torch.randn(out_f, rank, generator=g), torch.randn(rank, in_f, generator=g), scale)


def test_add_into_accumulates_in_the_output_buffer_with_the_same_result() -> None:
    branch = _linear_branch(12, 6, 3, seed=5)
    x = torch.randn(2, 9, 6, generator=_gen(6))
    out = torch.randn(2, 9, 12, generator=_gen(7))
    expected = out + branch.delta(x)
    with torch.no_grad():
        result = branch.add_into(out, x)
    assert result is out  # no output-sized temporary: written into the host's fresh output
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_an_fp32_branch_on_a_half_output_runs_no_half_matmul() -> None:
    """`branch_dtype` gives half-precision layers on a CPU an fp32 branch, because CPUs have no fast half
    GEMM: the up projection must not fall back to one when the result is added into the half output."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[torch.dtype] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm):
                self.seen += [a.dtype for a in args if isinstance(a, torch.Tensor)]
            return func(*args, **(kwargs or {}))

    branch = _linear_branch(12, 6, 3, seed=5)  # fp32 factors
    x = torch.randn(2, 9, 6, generator=_gen(6)).half()
    out = torch.randn(2, 9, 12, generator=_gen(7)).half()
    expected = (out.float() + branch.delta(x.float())).half()
    with torch.no_grad(), MatmulDtypes() as recorded:
        result = branch.add_into(out, x)
    assert result is out and result.dtype == torch.float16
    assert recorded.seen and set(recorded.seen) == {torch.float32}
    torch.testing.assert_close(result, expected, rtol=2e-3, atol=2e-3)


def test_add_into_leaves_tracked_or_strided_outputs_alone() -> None:
    branch = _linear_branch(12, 6, 3, seed=5)
    x = torch.randn(4, 6, generator=_gen(1))
    tracked = torch.randn(4, 12, generator=_gen(2), requires_grad=True)
    result = branch.add_into(tracked, x)  # autograd records: never in place
    assert result is not tracked
    strided = torch.randn(12, 4, generator=_gen(3)).t()  # a transposed view is not contiguous
    before = strided.clone()
    result = branch.add_into(strided, x)
    assert result is not strided and torch.equal(strided, before)
    torch.testing.assert_close(result, before + branch.delta(x))


@pytest.mark.parametrize("in_place", [False, True])
def test_in_place_hooks_give_the_out_of_place_result(in_place: bool) -> None:
    layer = nn.Linear(6, 12)
    pair = (_linear_branch(12, 6, 3, seed=1), _linear_branch(12, 6, 2, seed=2, scale=1.3))
    single = nn.Linear(6, 12)
    x = torch.randn(2, 300, 6, generator=_gen(3))  # more tokens than the subsample: two-stage decision
    with torch.no_grad():
        base, base_single = layer(x), single(x)
    selector = DynamicSelector(1)
    selector.begin_pass("p", 1)
    modules = {"a": layer, "b": single}
    branches = {"a": pair, "b": (pair[0], None)}
    with (
        install_hooks(modules, branches, selector, {"a": 0}, lambda: True, in_place=in_place),
        torch.no_grad(),
    ):
        hooked, hooked_single = layer(x), single(x)
    choice = int(selector.table("p")[0, 0])
    torch.testing.assert_close(hooked, base + pair[choice].delta(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hooked_single, base_single + pair[0].delta(x), rtol=1e-5, atol=1e-5)


def test_records_made_under_inference_mode_are_readable_after_it() -> None:
    # Forge samples under torch.inference_mode(); the selection map is drawn afterwards, outside it.
    selector = DynamicSelector(2)
    base = torch.randn(1, 8, 6, generator=_gen(1))
    deltas = (torch.randn(1, 8, 6, generator=_gen(2)), torch.randn(1, 8, 6, generator=_gen(3)))
    with torch.inference_mode():
        selector.begin_pass("p", 2)
        selector.decide(0, base, *deltas, channel_dim=-1)
        selector.set_step(1)
        selector.decide(1, base, *deltas, channel_dim=-1)
    table = selector.table("p")  # flushes the pending decisions outside inference mode
    assert not table.is_inference() and selector.decided("p").tolist() == [[True, False], [False, True]]
