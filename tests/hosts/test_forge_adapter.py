"""`lib_klora.hosts.forge` (ForgeApi / ReForgeApi and the script glue) imported against fake WebUI packages.

`fake_patcher_hosts.installed_webui` puts minimal `modules`, `backend` (Forge), `ldm_patched` (reForge) and
`networks` packages into sys.modules, imports `lib_klora.hosts.forge` and removes everything again. Every
expected value is computed from the LoRA tensors (see `patcher_fixtures`), never from the adapter or engine.
`lib_klora.hosts.webui` imports gradio, so these tests need it.
"""

from __future__ import annotations

import os
import re
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import lib_klora.hosts as hosts_package
from lib_klora.dynamic.branches import DenseBranch, LowRankBranch, SlicedBranch
from lib_klora.engines import patcher as engine
from lib_klora.params.model import KLoraParams
from tests.engines.fused_params import fused_params
from tests.hosts.fake_patcher_hosts import (
    KLORA_HOST_MODULES,
    FakeWebUI,
    ForgeClipPatcher,
    ForgeUnetPatcher,
    LoHaAdapter,
    LoRAAdapter,
    ReForgeClipPatcher,
    TextModel,
    installed_webui,
)
from tests.hosts.patcher_fixtures import (
    ALL_LAYERS,
    CONV,
    FF,
    MANAGED,
    ONLY_STYLE,
    ONLY_SUBJECT,
    PROJ,
    QKV,
    SHAPES,
    STEPS,
    STYLE_LAYERS,
    STYLE_STRENGTH,
    SUBJECT_LAYERS,
    SUBJECT_STRENGTH,
    FakeLora,
    Host,
    Part,
    close,
    finder,
    make_host,
    randn,
    reference_delta,
    reference_dynamic_choice,
    reference_piece,
    schedule_of,
)

pytest.importorskip("gradio")

HOSTS = ("forge", "reforge")
FUSED_STEMS = {0: "to_q", 8: "to_k", 16: "to_v"}
FUSED_KEYS = {  # FLUX-style diffusers keys of the fused qkv layer, as the hosts' key maps produce them
    f"transformer.middle.attn.{stem}": (f"{QKV}.weight", (0, start, 8)) for start, stem in FUSED_STEMS.items()
}
TE_KEY = "clip_l.transformer.text_model.q_proj.weight"
TE_STEM = "lora_te_text_model_q_proj"
FAKE_MODULES = ("modules", "backend", "ldm_patched", "networks")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add spin-up and contention on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def webui(tmp_path: Path) -> Iterator[FakeWebUI]:
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    before = {name: sys.modules.get(name) for name in (*FAKE_MODULES, *KLORA_HOST_MODULES)}
    with installed_webui(tmp_path, lora_dir) as fake:
        yield fake
    # Nothing of the fakes, nor the K-LoRA modules imported against them, outlives the test.
    assert {name: sys.modules.get(name) for name in before} == before
    assert not any(name.startswith(("modules.", "backend.", "ldm_patched.")) for name in sys.modules)
    assert not any(hasattr(hosts_package, name) for name in ("forge", "webui", "job_start", "guidance_glue"))


def api(webui: FakeWebUI, host: str) -> Any:
    return webui.forge.host_api(host)


def value_for(host: str, kind: str, tensors: tuple, alpha: float | None, **extra: Any) -> Any:
    """A patch value in the host's own format: Forge tuples, reForge adapter objects."""
    if kind == "lora":
        up, down = tensors
        mid, dora, reshape = extra.get("mid"), extra.get("dora_scale"), extra.get("reshape")
        if host == "forge":
            return ("lora", (up, down, alpha, mid, dora))
        return LoRAAdapter(set(), (up, down, alpha, mid, dora, reshape))
    if kind == "loha":
        w1a, w1b, w2a, w2b = tensors
        if host == "forge":
            return ("loha", (w1a, w1b, alpha, w2a, w2b, None, None, None))
        return LoHaAdapter(set(), (w1a, w1b, alpha, w2a, w2b, None, None, None))
    return (kind, tensors)  # "diff" / "set": tuples on both hosts


# ---------------------------------------------------------------- the import itself


def test_the_module_imports_against_the_fakes_and_registers_its_callbacks(webui: FakeWebUI) -> None:
    forge = webui.forge
    assert type(forge.API) is forge.ForgeApi and forge.API.name == "forge"
    assert type(forge.host_api("reforge")) is forge.ReForgeApi and forge.host_api("forge").name == "forge"
    forge.register_callbacks("reforge")
    assert type(forge.API) is forge.ReForgeApi
    registered = webui.callbacks.registered
    assert registered["on_cfg_denoiser"] == [forge.on_cfg_denoiser]
    assert registered["on_model_loaded"] == [forge.on_model_loaded]
    assert set(registered) == {
        "on_cfg_denoiser",
        "on_model_loaded",
        "on_ui_settings",
        "on_before_ui",
        "on_app_started",
    }
    assert issubclass(forge.KLoraScript, sys.modules["modules.scripts"].Script)


# ---------------------------------------------------------------- 4. decode


def _factors() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return randn(g, 16, 4), randn(g, 4, 8)


@pytest.mark.parametrize(
    ("alpha", "scale"), [(2.0, 0.5), (4, 1.0), (None, 1.0)], ids=["alpha", "int-alpha", "no-alpha"]
)
@pytest.mark.parametrize("host", HOSTS)
def test_decode_reads_a_plain_lora_in_the_hosts_format(webui: FakeWebUI, host: str, alpha, scale) -> None:
    up, down = _factors()
    factors = api(webui, host).decode(value_for(host, "lora", (up, down), alpha))
    assert isinstance(factors, engine.LowRankFactors)
    assert factors.up is up and factors.down is down  # no copy: the host's tensors
    assert factors.alpha == alpha and (alpha is None or type(factors.alpha) is float)
    assert factors.rank == 4 and factors.scale == scale


def test_reforge_decode_reads_a_five_tuple_adapter(webui: FakeWebUI) -> None:
    up, down = _factors()  # adapters of older reForge builds carry no `reshape`
    factors = api(webui, "reforge").decode(LoRAAdapter(set(), (up, down, 8.0, None, None)))
    assert factors is not None and factors.scale == 2.0


OTHER_FORMS = [
    (host, form)
    for host in HOSTS
    for form in ("dora_scale", "reshape", "loha", "diff", "set")
    if not (host == "forge" and form == "reshape")  # Forge's values have no reshape field
]


@pytest.mark.parametrize(("host", "extra"), OTHER_FORMS)
def test_decode_sends_every_other_form_to_the_dense_path(webui: FakeWebUI, host: str, extra: str) -> None:
    up, down = _factors()
    if extra in ("dora_scale", "reshape"):
        payload = {"dora_scale": torch.ones(16, 1), "reshape": [16, 12]}
        value = value_for(host, "lora", (up, down), 2.0, **{extra: payload[extra]})
    elif extra == "loha":
        value = value_for(host, "loha", (up, down, up, down), 2.0)
    else:
        value = value_for(host, extra, (up @ down,), None)
    assert api(webui, host).decode(value) is None


@pytest.mark.parametrize("host", HOSTS)
def test_decode_folds_a_locon_cp_core_into_rank_r_factors(webui: FakeWebUI, host: str) -> None:
    g = torch.Generator().manual_seed(3)
    up, down, mid = randn(g, 6, 3, 1, 1), randn(g, 3, 4, 1, 1), randn(g, 3, 3, 3, 3)
    factors = api(webui, host).decode(value_for(host, "lora", (up, down), 1.5, mid=mid))
    assert factors is not None and factors.rank == 3 and factors.down.shape == (3, 4, 3, 3)
    # ΔW[o, i, h, w] = alpha/r · Σ_ab up[o, a] mid[a, b, h, w] down[b, i], as both hosts merge a CP core.
    want = torch.einsum("oa,abhw,bi->oihw", up.flatten(1), mid, down.flatten(1)) * (1.5 / 3)
    got = (factors.up.reshape(6, -1) @ factors.down.reshape(3, -1)).reshape(6, 4, 3, 3) * factors.scale
    torch.testing.assert_close(got, want)


def test_forge_decode_does_not_mistake_an_adapter_for_a_tuple(webui: FakeWebUI) -> None:
    up, down = _factors()
    adapter = value_for("reforge", "lora", (up, down), 2.0)
    assert adapter[0] == "lora"  # reForge's compatibility shim answers value[0] like a tuple
    assert api(webui, "forge").decode(adapter) is None


# ---------------------------------------------------------------- dense


@pytest.mark.parametrize("host", HOSTS)
def test_dense_is_the_hosts_merge_onto_zeros(webui: FakeWebUI, host: str) -> None:
    g = torch.Generator().manual_seed(3)
    loha = Part("loha", (randn(g, 8, 2), randn(g, 2, 8), randn(g, 8, 2), randn(g, 2, 8)), alpha=1.0)
    mid = Part("mid", (randn(g, 6, 2, 1, 1), randn(g, 2, 2, 3, 3), randn(g, 2, 4, 1, 1)), alpha=4.0)
    diff = randn(g, 8, 8)
    cases = [
        (value_for(host, "loha", loha.tensors, loha.alpha), (8, 8), reference_piece(loha)),
        (
            value_for(host, "lora", (mid.tensors[0], mid.tensors[2]), mid.alpha, mid=mid.tensors[1]),
            SHAPES[CONV],
            reference_piece(mid).reshape(SHAPES[CONV]),
        ),
        (("diff", (diff,)), (8, 8), diff),
    ]
    for value, shape, want in cases:
        delta = api(webui, host).dense(value, "diffusion_model.x.weight", torch.zeros(shape))
        torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- key maps, loaders, module_deltas


def lora_file_tensors(lora: FakeLora, te: bool = True) -> dict[str, torch.Tensor]:
    """The LoRA as a file: kohya keys (lora_unet_..., LoHa hada_*), PEFT lora_A/B for the fused q/k/v."""
    tensors: dict[str, torch.Tensor] = {}
    for layer, parts in lora.parts.items():
        for part in parts:
            if part.size is not None:
                stem = f"transformer.middle.attn.{FUSED_STEMS[part.start]}"
                tensors[f"{stem}.lora_B.weight"], tensors[f"{stem}.lora_A.weight"] = part.tensors
            else:
                stem = "lora_unet_" + layer[len("diffusion_model.") :].replace(".", "_")
                if part.kind == "loha":
                    for name, tensor in zip(("w1_a", "w1_b", "w2_a", "w2_b"), part.tensors, strict=True):
                        tensors[f"{stem}.hada_{name}"] = tensor
                else:
                    tensors[f"{stem}.lora_up.weight"], tensors[f"{stem}.lora_down.weight"] = part.tensors
            tensors[f"{stem}.alpha"] = torch.tensor(part.alpha)
    if te:
        g = torch.Generator().manual_seed(len(lora.name))
        tensors[f"{TE_STEM}.lora_up.weight"] = randn(g, 8, 2)
        tensors[f"{TE_STEM}.lora_down.weight"] = randn(g, 2, 8)
    return {k: v.contiguous() for k, v in tensors.items()}


LORA_KINDS = {"subject": SUBJECT_LAYERS, "style": STYLE_LAYERS}
BRANCH_KINDS = {"plain": LowRankBranch, "locon": LowRankBranch, "loha": DenseBranch, "qkv": SlicedBranch}


@pytest.fixture
def host_model() -> Host:
    return make_host(FUSED_KEYS)


@pytest.mark.parametrize("host", HOSTS)
def test_unet_patches_through_module_deltas_give_every_layers_delta(
    webui: FakeWebUI, host_model: Host, host: str
) -> None:
    adapter = api(webui, host)
    unet = ForgeUnetPatcher(host_model.model)
    for lora in host_model.loras:
        tensors = lora_file_tensors(lora)
        tensors["lora_unet_input_blocks_0_proj.diff_b"] = torch.ones(16)  # a bias patch
        tensors["lora_unet_not_in_this_model.lora_up.weight"] = torch.ones(4, 2)  # another model's key
        patches = adapter.unet_patches(unet, tensors)
        assert f"{PROJ}.bias" in patches and all("not_in_this_model" not in str(k) for k in patches)
        deltas, skipped = engine.module_deltas(
            patches, finder(host_model.model), adapter.decode, adapter.dense
        )
        assert skipped == [f"{PROJ}.bias"]
        assert set(deltas) == set(lora.parts)
        for name, delta in deltas.items():
            want = reference_delta(lora, name).reshape(SHAPES[name][0], -1)
            torch.testing.assert_close(delta.delta(), want, rtol=1e-5, atol=1e-6, msg=name)
            want_branch = BRANCH_KINDS[LORA_KINDS[lora.name][name][0]]
            assert isinstance(delta.branch(1.0, torch.float32), want_branch), name


@pytest.mark.parametrize("host", HOSTS)
def test_clip_patches_use_the_text_encoder_key_map(webui: FakeWebUI, host_model: Host, host: str) -> None:
    tensors = lora_file_tensors(host_model.subject)
    patches = api(webui, host).clip_patches(types.SimpleNamespace(cond_stage_model=TextModel()), tensors)
    assert list(patches) == [TE_KEY]
    factors = api(webui, host).decode(patches[TE_KEY])
    assert factors is not None and factors.up is not None
    assert torch.equal(factors.up, tensors[f"{TE_STEM}.lora_up.weight"])


# ---------------------------------------------------------------- build_job and the script's hooks


@dataclass
class FakeP:
    """The processing object as far as the Forge glue reads it."""

    sd_model: Any
    is_hr_pass: bool = False
    comments: list[str] = field(default_factory=list)
    extra_generation_params: dict = field(default_factory=dict)
    _klora: Any = None

    def comment(self, text: str) -> None:
        self.comments.append(text)


def make_p(host: str, host_model: Host) -> FakeP:
    clip_type = ForgeClipPatcher if host == "forge" else ReForgeClipPatcher
    forge_objects = types.SimpleNamespace(
        unet=ForgeUnetPatcher(host_model.model), clip=clip_type(TextModel())
    )
    return FakeP(types.SimpleNamespace(forge_objects=forge_objects))


def write_loras(webui: FakeWebUI, host_model: Host, loras: tuple | None = None) -> None:
    """Write the fixture's two LoRAs (or `loras`) into the LoRA folder and let the host list them."""
    for lora in loras or host_model.loras:
        save_file(lora_file_tensors(lora), str(webui.networks.lora_dir / f"{lora.name}.safetensors"))
    webui.networks.list_available_networks()


def cfg_callback(webui: FakeWebUI, p: FakeP, step: int, total: int, denoiser: Any = None) -> Any:
    """Forge's on_cfg_denoiser for one evaluation (the denoiser object is the pass's identity)."""
    denoiser = denoiser or types.SimpleNamespace(p=p, total_steps=total, sampler=None)
    denoiser.step = step
    webui.forge.on_cfg_denoiser(types.SimpleNamespace(denoiser=denoiser))
    return denoiser


@pytest.mark.parametrize("host", HOSTS)
def test_build_job_reads_both_loras_through_the_hosts_key_maps(
    webui: FakeWebUI, host_model: Host, host: str
) -> None:
    forge = webui.forge
    forge.register_callbacks(host)
    write_loras(webui, host_model)
    p = make_p(host, host_model)
    job = forge.build_job(p, fused_params(), None)
    assert job.layer_names == MANAGED and job.table.exclusive == ((ONLY_SUBJECT,), (ONLY_STYLE,))
    for deltas, lora in zip(job.deltas, host_model.loras, strict=True):
        assert set(deltas) == set(lora.parts)
    for layer in job.table.layers:
        for which, lora in enumerate(host_model.loras):
            flat = reference_delta(lora, layer.canonical).abs().flatten().double()
            assert layer.scores[which] == pytest.approx(float(flat.topk(layer.k).values.sum()), rel=1e-5)
    assert list(job.te_patches[0]) == [TE_KEY] and list(job.te_patches[1]) == [TE_KEY]
    again = forge.build_job(p, fused_params(subject_strength=0.3), None)
    assert again.table is job.table  # scores cached by file content and host/model kind
    assert forge.build_job(p, fused_params(te_policy="none"), None).te_patches == ({}, {})


@pytest.mark.parametrize("host", HOSTS)
def test_an_identical_next_job_reuses_the_reading_of_both_files(
    webui: FakeWebUI, host_model: Host, host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    forge = webui.forge
    forge.register_callbacks(host)
    plain_subject = replace(
        host_model.subject, parts={k: v for k, v in host_model.subject.parts.items() if k != FF}
    )  # no LoHa: every layer has plain factors
    write_loras(webui, host_model, (plain_subject, host_model.style))
    reads: list[str] = []
    load_file = forge.API.load_file
    monkeypatch.setattr(forge.API, "load_file", lambda file: reads.append(Path(file).stem) or load_file(file))
    p = make_p(host, host_model)

    def reads_for(**overrides: Any) -> list[str]:
        reads.clear()
        job = forge.build_job(p, fused_params(**overrides), None)
        assert set(job.deltas[0]) == set(plain_subject.parts) and set(job.deltas[1]) == set(STYLE_LAYERS)
        return sorted(reads)

    assert reads_for() == ["style", "subject"]
    assert reads_for(subject_strength=0.3, beta=0.9) == []  # strengths and settings are applied later
    assert reads_for(te_policy="none") == ["style", "subject"]  # no text-encoder patches read
    assert reads_for(te_policy="none") == []
    assert reads_for() == ["style", "subject"]
    webui.forge.on_model_loaded(host_model.model)  # a model (re)load drops what holds the old layers
    assert reads_for() == ["style", "subject"]
    style = webui.networks.lora_dir / "style.safetensors"
    tensors = lora_file_tensors(host_model.style)
    tensors[next(iter(tensors))] *= 2
    save_file(tensors, str(style))  # the same name with other contents
    os.utime(style, ns=(style.stat().st_atime_ns, style.stat().st_mtime_ns + 10**9))
    assert reads_for() == ["style", "subject"]
    # With the fixture's LoHa layer the ΔW is dense: read every job.
    write_loras(webui, host_model)
    assert forge.build_job(p, fused_params(), None) and reads
    reads.clear()
    forge.build_job(p, fused_params(), None)
    assert sorted(reads) == ["style", "subject"]


@pytest.mark.parametrize("method", ["klora", "dynamic"])
@pytest.mark.parametrize("host", HOSTS)
def test_the_script_hooks_layers_once_and_applies_the_choices(
    webui: FakeWebUI, host_model: Host, host: str, method: str
) -> None:
    forge = webui.forge
    forge.register_callbacks(host)
    write_loras(webui, host_model)
    p = make_p(host, host_model)
    first = fused_params(show_map=True, method=method)
    p._klora = job = forge.build_job(p, first, None)
    script = forge.KLoraScript()
    for _ in range(2):  # Forge calls process_before_every_sampling twice before hires; idempotent
        script.process_before_every_sampling(p)
    for name in ALL_LAYERS:
        assert len(host_model.layer(name)._forward_hooks) == 1, name
    if method == "klora":
        schedule = schedule_of(job, first, STEPS).choices.tolist()
    else:
        schedule = [[reference_dynamic_choice(host_model, name)] * STEPS for name in MANAGED]
    denoiser = None
    for step in range(STEPS):
        with torch.inference_mode():  # Forge samples, callbacks included, under inference mode
            denoiser = cfg_callback(webui, p, step, STEPS, denoiser)
            outputs = host_model.outputs()
        choices = [row[step] for row in schedule]
        for i, name in enumerate(MANAGED):
            close(outputs[name], host_model.expected(name, host_model.chosen(choices[i])), (step, name))
    assert job.passes[0].choices()[0] == schedule
    processed = types.SimpleNamespace(images=[], infotexts=[])
    script.postprocess(p, processed)  # outside inference mode, as the host does
    assert p._klora is None and host_model.hooked() == []
    assert len(processed.images) == 1 and processed.infotexts[0].startswith(
        "K-LoRA selection map, first pass"
    )
    for name, out in host_model.outputs().items():
        assert torch.equal(out, host_model.base[name]), name
    host_model.assert_weights_untouched()
    assert p.comments == []


def test_hires_off_removes_the_hooks_before_the_hires_pass(webui: FakeWebUI, host_model: Host) -> None:
    forge = webui.forge
    write_loras(webui, host_model)
    p = make_p("forge", host_model)
    base = fused_params(hires="off")
    p._klora = forge.build_job(p, base.for_pass(False), base.for_pass(True))
    script = forge.KLoraScript()
    script.process_before_every_sampling(p)
    assert host_model.hooked() == ALL_LAYERS
    p.is_hr_pass = True
    script.process_before_every_sampling(p)
    assert host_model.hooked() == []


def test_a_failing_callback_switches_k_lora_off_with_a_comment(webui: FakeWebUI, host_model: Host) -> None:
    forge = webui.forge
    write_loras(webui, host_model)
    p = make_p("forge", host_model)
    p._klora = job = forge.build_job(p, fused_params(), None)
    forge.KLoraScript().process_before_every_sampling(p)
    broken = types.SimpleNamespace(p=p, step=0, sampler=None)  # no total_steps: on_step raises
    forge.on_cfg_denoiser(types.SimpleNamespace(denoiser=broken))  # ... and the callback does not
    assert job.failed and host_model.hooked() == []
    assert p.comments == [f"K-LoRA was switched off for this image: {job.failed}"]
    forge.KLoraScript().process_before_every_sampling(p)  # a failed job installs nothing again
    assert host_model.hooked() == []


def clip_patches_of(clip: Any) -> list[tuple[str | None, float, list[str], list[Any]]]:
    """(label, strength, patched keys, patch values) per add_patches call, for either host's clip."""
    if isinstance(clip, ForgeClipPatcher):
        return [
            (label, strength, list(patch), [entries[0][1] for entries in patch.values()])
            for (label, strength, _, _), patch in clip.lora_patches.items()
        ]
    return [(None, strength, list(patch), list(patch.values())) for patch, strength, _ in clip.patches]


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize(
    ("policy", "applied"), [("both", (0, 1)), ("subject", (0,)), ("style", (1,)), ("none", ())]
)
def test_text_encoder_policy_patches_a_clone_of_the_clip(
    webui: FakeWebUI, host_model: Host, host: str, policy: str, applied: tuple[int, ...]
) -> None:
    forge = webui.forge
    forge.register_callbacks(host)
    write_loras(webui, host_model)
    p = make_p(host, host_model)
    original = p.sd_model.forge_objects.clip
    first = fused_params(te_policy=policy, hires="separate")
    p._klora = job = forge.build_job(p, first, first.for_pass(True))
    script = forge.KLoraScript()
    roles = ("subject", "style")
    want = [
        (f"klora:{roles[i]}:{roles[i]}" if host == "forge" else None, (SUBJECT_STRENGTH, STYLE_STRENGTH)[i])
        for i in applied
    ]
    # Each hook acts in its own pass only: process_batch in the first, the activation hook in hires.
    for is_hires, hook in ((True, script.process_batch), (False, script.after_extra_networks_activate)):
        p.is_hr_pass = is_hires
        hook(p)
        assert p.sd_model.forge_objects.clip is original
    for is_hires, hook in ((False, script.process_batch), (True, script.after_extra_networks_activate)):
        p.sd_model.forge_objects.clip = original  # the host restores its clip between passes
        p.is_hr_pass = is_hires
        hook(p)
        clip = p.sd_model.forge_objects.clip
        assert clip_patches_of(original) == []
        if not applied:
            assert clip is original
            continue
        assert clip is not original and clip.cond_stage_model is original.cond_stage_model
        patched = clip_patches_of(clip)
        assert [(label, strength) for label, strength, _, _ in patched] == want
        assert all(keys == [TE_KEY] for _, _, keys, _ in patched)
        for (_, _, _, values), i in zip(patched, applied, strict=True):
            assert values[0] is job.te_patches[i][TE_KEY]  # the job's own patch values


# ---------------------------------------------------------------- guidance as the post-CFG function


@dataclass
class FakeGuidance:
    calls: list[tuple] = field(default_factory=list)
    error: Exception | None = None

    def apply(self, denoised: torch.Tensor, sigma: Any, step: int, steps: int) -> torch.Tensor:
        self.calls.append((sigma, step, steps))
        if self.error is not None:
            raise self.error
        return denoised + 1.0


def test_guidance_runs_as_the_post_cfg_function(webui: FakeWebUI, host_model: Host) -> None:
    forge = webui.forge
    write_loras(webui, host_model)
    p = make_p("forge", host_model)
    first = fused_params(guidance=True, guidance_text=1.0)
    p._klora = job = forge.build_job(p, first, None)
    job.guidance = guidance = FakeGuidance()
    original = p.sd_model.forge_objects.unet
    script = forge.KLoraScript()
    script.process_before_every_sampling(p)
    # Forge resets forge_objects from forge_objects_after_applying_lora between its two calls.
    p.sd_model.forge_objects.unet = original
    script.process_before_every_sampling(p)
    unet = p.sd_model.forge_objects.unet
    assert unet is not original and unet.model is original.model and original.model_options == {}
    (post_cfg,) = unet.model_options["sampler_post_cfg_function"]
    cfg_callback(webui, p, 3, 8)
    denoised = torch.zeros(1, 4, 2, 2)
    assert torch.equal(post_cfg({"denoised": denoised, "sigma": 0.5}), denoised + 1.0)
    assert guidance.calls == [(0.5, 3, 8)]
    webui.shared.state.interrupted = True
    assert post_cfg({"denoised": denoised, "sigma": 0.5}) is denoised
    webui.shared.state.interrupted = False
    guidance.error = RuntimeError("decoder exploded")
    assert post_cfg({"denoised": denoised, "sigma": 0.5}) is denoised  # guidance stops, the fusion goes on
    assert job.guidance is None and not job.failed
    assert p.comments == ["K-LoRA: guidance failed and was switched off: decoder exploded"]
    assert post_cfg({"denoised": denoised, "sigma": 0.5}) is denoised


# ---------------------------------------------------------------- patches that are not plain deltas


@pytest.mark.parametrize("host", HOSTS)
def test_a_set_patch_is_skipped(webui: FakeWebUI, host_model: Host, host: str) -> None:
    adapter = api(webui, host)
    patches = {f"{PROJ}.weight": ("set", (torch.full((16, 8), 3.0),))}
    deltas, skipped = engine.module_deltas(patches, finder(host_model.model), adapter.decode, adapter.dense)
    assert deltas == {} and skipped == [f"{PROJ}.weight"]


@pytest.mark.parametrize("host", HOSTS)
def test_a_dora_patch_adds_what_the_host_would_merge(webui: FakeWebUI, host_model: Host, host: str) -> None:
    adapter = api(webui, host)
    g = torch.Generator().manual_seed(4)
    up, down, magnitude = randn(g, 16, 2), randn(g, 2, 8, scale=0.3), torch.rand(16, 1, generator=g) + 0.5
    value = value_for(host, "lora", (up, down), 2.0, dora_scale=magnitude)
    deltas, skipped = engine.module_deltas(
        {f"{PROJ}.weight": value}, finder(host_model.model), adapter.decode, adapter.dense
    )
    # DoRA as both hosts merge it at strength 1 (magnitude along the outputs): (W + ΔW) · m / ‖W‖_row.
    weight = host_model.pristine[f"{PROJ}.weight"]
    merged = (
        (weight + up @ down) * magnitude / (weight.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
    )
    assert skipped == []
    torch.testing.assert_close(deltas[PROJ].delta(), merged - weight, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- S* for FLUX


class _FluxModel:
    is_sd3 = False
    is_sdxl = False

    def __init__(self, flux: bool) -> None:
        self.flux = flux

    def is_webui_legacy_model(self) -> bool:
        return not self.flux


def _p(prompt: str = "a dog") -> Any:
    return types.SimpleNamespace(prompt=prompt, all_prompts=[prompt], enable_hr=False)


@pytest.mark.parametrize("flux", [True, False])
def test_flux_defaults_to_s_star_unless_the_request_chose(webui: FakeWebUI, flux: bool) -> None:
    webui.shared.sd_model = _FluxModel(flux)
    model_pattern = "s*" if webui.webui.is_flux_model() else None
    assert (model_pattern == "s*") is flux
    job_params = webui.job_start.job_params
    chosen = {"enabled": True, "subject": "a", "style": "b"}
    # An API dict without a pattern, or a tag with the accordion off, takes the model's recommendation.
    first, _ = job_params(_p(), (chosen,), model_pattern=model_pattern)
    assert first.pattern == ("s*" if flux else "s") and first.effective_beta == (1.3 if flux else 0.5)
    disabled_ui = KLoraParams(pattern="s", beta=0.5).to_positional()
    tagged, _ = job_params(_p("a dog <klora:a:b>"), tuple(disabled_ui), model_pattern=model_pattern)
    assert tagged.pattern == ("s*" if flux else "s")
    # A pattern the request names, or an enabled accordion's, is kept; so is an explicit beta.
    kept, _ = job_params(_p(), ({**chosen, "pattern": "s"},), model_pattern=model_pattern)
    assert kept.pattern == "s"
    with_beta, _ = job_params(_p(), ({**chosen, "beta": 0.9},), model_pattern=model_pattern)
    assert with_beta.beta == 0.9
    ui = KLoraParams(enabled=True, subject="a", style="b", pattern="s").to_positional()
    assert job_params(_p(), tuple(ui), model_pattern=model_pattern)[0].pattern == "s"
    tag_pattern, _ = job_params(
        _p("x <klora:a:b:pattern=s>"), tuple(disabled_ui), model_pattern=model_pattern
    )
    assert tag_pattern.pattern == "s"


@pytest.mark.parametrize("host", HOSTS)
def test_process_stops_the_job_when_preparing_the_loras_fails(
    webui: FakeWebUI, host_model: Host, host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    forge = webui.forge
    forge.register_callbacks(host)
    write_loras(webui, host_model)
    p = make_p(host, host_model)
    p.prompt, p.all_prompts, p.enable_hr = "a dog", ["a dog"], False

    def broken(*_args: Any) -> Any:
        raise RuntimeError("key map exploded")

    monkeypatch.setattr(forge.API, "unet_patches", broken)
    forge.KLoraScript().process(p, fused_params().to_dict())
    assert p._klora is None
    assert p.comments == ["K-LoRA could not prepare the LoRAs: RuntimeError: key map exploded"]
    with pytest.raises(Exception, match="key map exploded"):  # the job ends before any sampling
        p.sample()


@pytest.mark.parametrize("damage", ["nan", "truncated", "pickle"])
@pytest.mark.parametrize("host", HOSTS)
def test_process_refuses_an_unusable_lora_file_before_the_hosts_loader_reads_it(
    webui: FakeWebUI, host_model: Host, host: str, damage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plan route's file checks at the job's start: the message names the file, the host's loader (which
    renames a corrupt file on Forge) never sees it, nothing is sampled and the file is unchanged."""
    forge = webui.forge
    forge.register_callbacks(host)
    write_loras(webui, host_model)
    style = webui.networks.lora_dir / "style.safetensors"
    tensors = lora_file_tensors(host_model.loras[1])
    if damage == "nan":
        next(iter(tensors.values()))[0] = float("nan")
        save_file(tensors, str(style))
    elif damage == "truncated":
        style.write_bytes(style.read_bytes()[:-7])
    else:
        style.unlink()
        torch.save(tensors, str(webui.networks.lora_dir / "style.pt"))
        webui.networks.list_available_networks()
    files = {path: path.read_bytes() for path in webui.networks.lora_dir.iterdir()}
    monkeypatch.setattr(forge.API, "load_file", lambda *_: pytest.fail("the host's loader ran"))
    p = make_p(host, host_model)
    p.prompt, p.all_prompts, p.enable_hr = "a dog", ["a dog"], False
    forge.KLoraScript().process(p, fused_params().to_dict())
    assert p._klora is None and len(p.comments) == 1
    expected = {"nan": "style.safetensors.*NaN or Inf", "truncated": "style.safetensors.*truncated"}
    expected["pickle"] = "style.pt' is a pickle checkpoint"
    assert re.search(expected[damage], p.comments[0]), p.comments[0]
    with pytest.raises(Exception, match=re.escape(p.comments[0])):
        p.sample()
    assert {path: path.read_bytes() for path in webui.networks.lora_dir.iterdir()} == files
