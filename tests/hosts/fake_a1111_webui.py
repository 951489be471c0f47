"""A minimal, faithful stand-in for AUTOMATIC1111 v1.10.1's `modules` package as `lib_klora.hosts.a1111` uses
it, and a driver that runs a generation the way the WebUI does, for CPU tests of the A1111 glue.

Written from scratch (no host code copied) after stable-diffusion-webui tag v1.10.1 (commit 82a973c):

- `modules/script_callbacks.py`: the registrations the glue uses, `CFGDenoiserParams`,
  `AfterCFGCallbackParams`, and the runners `cfg_denoiser_callback`, `cfg_after_cfg_callback`,
  `model_loaded_callback` and `script_unloaded_callback` (reverse order): each callback's exception is
  reported and swallowed.
- `modules/scripts.py`: `Script`, `AlwaysVisible`, and `ScriptRunner`'s `before_process`, `process`,
  `after_extra_networks_activate`, `process_batch`, `before_hr`, `postprocess` (each script called with
  `p.script_args[args_from:args_to]`, its exception reported and swallowed).
- `modules/processing.py` `process_images` / `process_images_inner` L819-1148: before_process, process, then
  per batch (none once interrupted) the extra networks' activation (`extra_networks.activate` L126-150:
  the built-in Lora's `activate` loads the prompt's `<lora>` networks, none when there is no tag, then the
  scripts' `after_extra_networks_activate`), `process_batch`, `p.sample`; `postprocess(p, processed)` last,
  never reached when `p.sample` raises. Txt2img's `sample` / `sample_hr_pass` L1307-1463: the hires pass
  (none once interrupted) sets `is_hr_pass`, activates the hires prompt's networks, calls `before_hr`,
  samples with a new sampler.
- `modules/sd_samplers_cfg_denoiser.py` `CFGDenoiser.forward`: `InterruptedException` when
  `state.interrupted` (the sampler then returns what it has: `sd_samplers_common.launch_sampling`, which also
  sets `total_steps` from the sampler config), `cfg_denoiser_callback(CFGDenoiserParams(..., denoiser=self))`,
  the model, `cfg_after_cfg_callback`, `step += 1`. `sd_samplers_timesteps.CFGDenoiserTimesteps` subclasses
  it.
- `modules/sd_models.py` `reload_model_weights` L940-1002: another checkpoint as a new model, or the same
  model's weights loaded in place; both end in `model_loaded_callback`. `webui.py` L151: a UI reload runs
  `script_unloaded_callback`.

Reductions: one image, one batch, first-order samplers; no conditioning, VAE or options; the "UNet" is the
Lora fake's tiny model evaluated on fixed inputs once per sampler step; `<lora:name:weight>` tags only.
When gradio is not installed, a stand-in with the three component names `hosts/webui.py` refers to (only in
its settings page, which these tests do not build) takes its place.
Test-only instrumentation: `FakeA1111.evaluations` logs every UNet evaluation (merges, weights, output).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import traceback
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tests.hosts.fake_lora_extension import FakeNetworks
from tests.hosts.module_swap import swapped_modules

KLORA_HOST_MODULES = (
    "lib_klora.hosts.a1111",
    "lib_klora.hosts.webui",
    "lib_klora.hosts.job_start",
    "lib_klora.hosts.guidance_glue",
)
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]+))?>")


class InterruptedException(BaseException):
    """`sd_samplers_common.InterruptedException` (a BaseException there too)."""


# ---------------------------------------------------------------- script_callbacks


class CFGDenoiserParams:
    def __init__(
        self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser
    ):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x, self.sampling_step, self.total_sampling_steps = x, sampling_step, total_sampling_steps


@dataclass
class Callbacks:
    """`modules.script_callbacks`: registrations by kind, and the runners that swallow (and log) errors."""

    registered: dict[str, list[Callable]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def run(self, kind: str, *args: Any, reverse: bool = False) -> None:
        callbacks = self.registered.get(kind, [])
        for callback in reversed(callbacks) if reverse else callbacks:
            try:
                callback(*args)
            except Exception as exc:  # report_exception
                self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")

    def module(self) -> types.ModuleType:
        module = types.ModuleType("modules.script_callbacks")
        kinds = (
            "on_cfg_denoiser",
            "on_cfg_after_cfg",
            "on_model_loaded",
            "on_script_unloaded",
            "on_ui_settings",
            "on_before_ui",
            "on_app_started",
        )
        for kind in kinds:
            setattr(
                module,
                kind,
                lambda fn, *, name=None, _kind=kind: self.registered.setdefault(_kind, []).append(fn),
            )
        module.CFGDenoiserParams = CFGDenoiserParams
        module.AfterCFGCallbackParams = AfterCFGCallbackParams
        module.cfg_denoiser_callback = lambda params: self.run("on_cfg_denoiser", params)
        module.cfg_after_cfg_callback = lambda params: self.run("on_cfg_after_cfg", params)
        module.model_loaded_callback = lambda sd_model: self.run("on_model_loaded", sd_model)
        module.script_unloaded_callback = lambda: self.run("on_script_unloaded", reverse=True)
        return module


# ---------------------------------------------------------------- scripts


class Script:
    """`modules.scripts.Script`, the attributes a runner sets."""

    args_from: int = 0
    args_to: int = 0
    alwayson = False
    infotext_fields = None
    paste_field_names = None


@dataclass
class ScriptRunner:
    """`modules.scripts.ScriptRunner` for always-on scripts: every hook guarded, errors reported."""

    scripts: list[Any]
    errors: list[str] = field(default_factory=list)

    def _call(self, hook: str, p: Any, *args: Any, **kwargs: Any) -> None:
        for script in self.scripts:
            method = getattr(script, hook, None)
            if method is None:
                continue
            try:
                method(p, *args, *p.script_args[script.args_from : script.args_to], **kwargs)
            except Exception as exc:  # errors.report(f"Error running {hook}: ...")
                traceback.print_exc()
                self.errors.append(f"{hook}: {type(exc).__name__}: {exc}")

    def before_process(self, p: Any) -> None:
        self._call("before_process", p)

    def process(self, p: Any) -> None:
        self._call("process", p)

    def after_extra_networks_activate(self, p: Any, **kwargs: Any) -> None:
        self._call("after_extra_networks_activate", p, **kwargs)

    def process_batch(self, p: Any, **kwargs: Any) -> None:
        self._call("process_batch", p, **kwargs)

    def before_hr(self, p: Any) -> None:
        self._call("before_hr", p)

    def postprocess(self, p: Any, processed: Any) -> None:
        self._call("postprocess", p, processed)


# ---------------------------------------------------------------- samplers


class CFGDenoiser:
    """`sd_samplers_cfg_denoiser.CFGDenoiser`: one per sampler; counts evaluations in `step`."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.p: Any = None
        self.step = 0
        self.total_steps: int | None = None
        self.mask = None


class CFGDenoiserTimesteps(CFGDenoiser):
    """`sd_samplers_timesteps.CFGDenoiserTimesteps` (DDIM, PLMS, UniPC)."""


@dataclass
class Sampler:
    """A k-diffusion sampler (`sd_samplers_common.Sampler`) of a first-order kind."""

    webui: FakeA1111
    config: Any = field(default_factory=lambda: types.SimpleNamespace(options={}))
    model_wrap_cfg: CFGDenoiser = field(init=False)

    def __post_init__(self) -> None:
        self.model_wrap_cfg = CFGDenoiser(self)

    def sample(self, p: Any, steps: int, label: str) -> Any:
        denoiser = self.model_wrap_cfg
        denoiser.p, denoiser.step = p, 0
        evals_per_step = 2 if self.config.options.get("second_order") else 1  # Heun, DPM2, DPM++ 2S ...
        denoiser.total_steps = steps * evals_per_step  # SamplerData.total_steps
        state = self.webui.shared.state
        state.sampling_steps, state.sampling_step = steps, 0
        latent = None
        try:
            for evaluation in range(denoiser.total_steps):
                state.sampling_step = evaluation // evals_per_step
                latent = self.webui.denoise(denoiser, label)
        except InterruptedException:  # launch_sampling: the latent so far
            pass
        return latent


# ---------------------------------------------------------------- processing


@dataclass
class Processing:
    """`StableDiffusionProcessingTxt2Img`, the fields the glue and this driver read."""

    webui: FakeA1111
    prompt: str
    script_args: tuple
    steps: int
    enable_hr: bool = False
    hr_prompt: str = ""
    hr_second_pass_steps: int = 0
    disable_extra_networks: bool = False
    sampler_name: str = "Euler"
    second_order: bool = False  # the sampler's config.options["second_order"]
    is_hr_pass: bool = False
    iteration: int = 0
    comments: list[str] = field(default_factory=list)
    extra_generation_params: dict = field(default_factory=dict)
    override_settings: dict = field(default_factory=dict)
    scripts: ScriptRunner | None = None

    def __post_init__(self) -> None:
        self.all_prompts = [self.prompt]
        self.all_hr_prompts = [self.hr_prompt or self.prompt] if self.enable_hr else []
        self.sd_model = self.webui.shared.sd_model

    def comment(self, text: str) -> None:
        self.comments.append(text)

    def sampler(self) -> Sampler:
        """`sd_samplers.create_sampler`: a new sampler (and CFGDenoiser) per pass."""
        return Sampler(self.webui, types.SimpleNamespace(options={"second_order": self.second_order}))

    def sample(self, *args: Any, **kwargs: Any) -> Any:
        samples = self.sampler().sample(self, self.steps, "first pass")
        if not self.enable_hr or self.webui.shared.state.interrupted:  # sample_hr_pass returns at once
            return samples
        self.is_hr_pass = True
        if not self.disable_extra_networks:
            self.webui.activate_extra_networks(self, self.all_hr_prompts[0])
        assert self.scripts is not None
        self.scripts.before_hr(self)
        samples = self.sampler().sample(self, self.hr_second_pass_steps or self.steps, "hires pass")
        self.is_hr_pass = False
        return samples


@dataclass
class Evaluation:
    label: str  # "first pass" / "hires pass"
    step: int
    merges: list[tuple[str, str]]  # (layer, network) pairs Lora merged during this evaluation
    weights: dict[str, torch.Tensor]  # every Lora-named layer of the evaluated model, after it
    output: torch.Tensor


@dataclass
class FakeA1111:
    """The installed fakes, the glue imported against them, and the generation driver."""

    a1111: types.ModuleType  # lib_klora.hosts.a1111, imported against the fakes
    callbacks: Callbacks
    shared: types.ModuleType
    nets: FakeNetworks
    inputs: tuple[torch.Tensor, torch.Tensor]
    evaluations: list[Evaluation] = field(default_factory=list)
    script_errors: list[str] = field(default_factory=list)  # what ScriptRunner reported, over all jobs
    # Test hooks, by index into `evaluations`: run (once) at the start of that evaluation's forward.
    before_evaluation: dict[int, Callable[[], None]] = field(default_factory=dict)
    # Test hook run (once) where the WebUI computes the prompts' conditioning (`p.setup_conds`).
    setup_conds: Callable[[], None] | None = None

    # ------------------------------------------------------------ driving a generation

    def processing(self, prompt: str, script_args: tuple, steps: int, **fields: Any) -> Processing:
        script = self.a1111.KLoraScript()
        script.args_from, script.args_to = 0, len(script_args)
        p = Processing(self, prompt, script_args, steps, **fields)
        p.scripts = ScriptRunner([script], self.script_errors)
        return p

    def process_images(self, p: Processing) -> Any:
        """`process_images`: returns `Processed` (images, infotexts); a raising `p.sample` propagates."""
        assert p.scripts is not None
        state = self.shared.state
        p.scripts.before_process(p)
        p.scripts.process(p)
        processed = types.SimpleNamespace(images=[], infotexts=[], comments=p.comments)
        with torch.no_grad():
            if not (state.interrupted or getattr(state, "stopping_generation", False)):
                if not p.disable_extra_networks:
                    self.activate_extra_networks(p, p.all_prompts[0])
                p.scripts.process_batch(p, batch_number=0, prompts=p.all_prompts, seeds=[1], subseeds=[1])
                setup_conds, self.setup_conds = self.setup_conds, None
                if setup_conds is not None:
                    setup_conds()
                p.sample(conditioning=None, unconditional_conditioning=None, seeds=[1], subseeds=[1])
                processed.images.append("image")
                processed.infotexts.append("infotext")
        p.scripts.postprocess(p, processed)
        return processed

    def activate_extra_networks(self, p: Processing, prompt: str) -> None:
        """The built-in Lora's `activate` (its tags, or none), then the scripts' hook."""
        tags = LORA_TAG.findall(prompt)
        self.nets.load_networks([name for name, _ in tags], [float(weight or 1.0) for _, weight in tags])
        assert p.scripts is not None
        p.scripts.after_extra_networks_activate(
            p, batch_number=p.iteration, prompts=p.all_prompts, seeds=[1], subseeds=[1], extra_network_data={}
        )

    def denoise(self, denoiser: CFGDenoiser, label: str) -> torch.Tensor:
        """`CFGDenoiser.forward` for one step: callbacks around one evaluation of the current model."""
        index = len(self.evaluations)
        hook = self.before_evaluation.pop(index, None)  # once: a raising hook is not logged
        if hook is not None:
            hook()
        state = self.shared.state
        if state.interrupted or state.skipped:
            raise InterruptedException
        x, sigma = self.inputs[0], torch.full((self.inputs[0].shape[0],), 1.0)
        script_callbacks = sys.modules["modules.script_callbacks"]
        script_callbacks.cfg_denoiser_callback(
            CFGDenoiserParams(x, None, sigma, state.sampling_step, state.sampling_steps, None, None, denoiser)
        )
        self.nets.calc_updown_calls.clear()
        model = self.shared.sd_model
        output = model(*self.inputs)
        weights = {name: layer.weight.detach().clone() for name, layer in model.network_layer_mapping.items()}
        self.evaluations.append(
            Evaluation(label, denoiser.step, list(self.nets.calc_updown_calls), weights, output)
        )
        after = AfterCFGCallbackParams(output, state.sampling_step, state.sampling_steps)
        script_callbacks.cfg_after_cfg_callback(after)
        denoiser.step += 1
        return after.x

    # ------------------------------------------------------------ the WebUI around jobs

    def load_other_checkpoint(self, model: torch.nn.Module) -> None:
        """`reload_model_weights` of a checkpoint with another config: a new model, then the callbacks."""
        self.shared.sd_model = model
        self.nets.sd_model = model
        self.callbacks.run("on_model_loaded", model)

    def switch_to_loaded_model(self, model: torch.nn.Module) -> None:
        """`reload_model_weights` of a checkpoint still in memory (`sd_checkpoints_limit` > 1):
        `reuse_model_from_already_loaded` makes it current without any callback."""
        self.shared.sd_model = model
        self.nets.sd_model = model

    def load_weights_in_place(self, state_dict: dict[str, torch.Tensor]) -> None:
        """`reload_model_weights` into the current model (Lora's load patch resets its backups)."""
        self.shared.sd_model.load_state_dict(state_dict)
        self.callbacks.run("on_model_loaded", self.shared.sd_model)

    def reload_ui(self) -> None:
        """The settings page's "Reload UI" (also after disabling an extension): scripts are unloaded."""
        self.callbacks.run("on_script_unloaded", reverse=True)


# ---------------------------------------------------------------- install / remove


def _module(name: str, package: bool = False, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    if package:
        module.__path__ = []  # so `from modules import x` resolves through sys.modules
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


class OptionInfo:
    def __init__(self, default: Any = None, label: str = "", *args: Any, **kwargs: Any) -> None:
        self.default, self.label = default, label

    def info(self, _text: str) -> OptionInfo:
        return self


class ExtraNetwork:
    def __init__(self, name: str) -> None:
        self.name = name


def webui_modules(
    models_path: Path, callbacks: Callbacks, model: torch.nn.Module
) -> dict[str, types.ModuleType]:
    opts = types.SimpleNamespace(klora_score_device="cpu", klora_guidance_offload=False)
    state = types.SimpleNamespace(
        interrupted=False,
        skipped=False,
        stopping_generation=False,
        textinfo="",
        sampling_step=0,
        sampling_steps=0,
    )
    subs = {
        "script_callbacks": callbacks.module(),
        "scripts": _module(
            "modules.scripts", Script=Script, AlwaysVisible=object(), ScriptRunner=ScriptRunner
        ),
        "shared": _module(
            "modules.shared",
            opts=opts,
            state=state,
            sd_model=model,
            OptionInfo=OptionInfo,
            cmd_opts=types.SimpleNamespace(api_auth=None),
        ),
        "paths": _module("modules.paths", models_path=str(models_path)),
        "devices": _module("modules.devices", device=torch.device("cpu"), torch_gc=lambda: None),
        "extra_networks": _module(
            "modules.extra_networks", ExtraNetwork=ExtraNetwork, register_extra_network=lambda _net: None
        ),
        "sd_samplers_common": _module(
            "modules.sd_samplers_common", InterruptedException=InterruptedException
        ),
        "sd_samplers_cfg_denoiser": _module(
            "modules.sd_samplers_cfg_denoiser", CFGDenoiser=CFGDenoiser, CFGDenoiserParams=CFGDenoiserParams
        ),
        "sd_samplers_timesteps": _module(
            "modules.sd_samplers_timesteps", CFGDenoiserTimesteps=CFGDenoiserTimesteps
        ),
    }
    package = _module("modules", package=True, **subs)
    return {"modules": package, **{f"modules.{name}": module for name, module in subs.items()}}


def gradio_stand_in() -> dict[str, types.ModuleType]:
    if importlib.util.find_spec("gradio") is not None:
        return {}
    return {"gradio": _module("gradio", Dropdown=object, Slider=object, Radio=object)}


@contextmanager
def installed_a1111(tmp_path: Path, nets: FakeNetworks, inputs: tuple) -> Iterator[FakeA1111]:
    """Put the fake `modules` (and gradio, if missing) into sys.modules, import `lib_klora.hosts.a1111`
    against them and register its callbacks; afterwards take all of it (the K-LoRA modules too) out again.
    The Lora fake (`fake_lora_extension.installed`) must already be installed, with `nets.sd_model` loaded."""
    callbacks = Callbacks()
    fakes = {**webui_modules(tmp_path / "models", callbacks, nets.sd_model), **gradio_stand_in()}
    with swapped_modules(fakes, KLORA_HOST_MODULES):
        a1111 = importlib.import_module("lib_klora.hosts.a1111")
        a1111.register_callbacks()
        yield FakeA1111(a1111, callbacks, fakes["modules.shared"], nets, inputs)
