"""AUTOMATIC1111 v1.10 glue: the always-visible script, callbacks, settings, tag, API and infotext.

This is the only file of the project that imports the WebUI's `modules` for A1111.
"""

from __future__ import annotations

import re
import traceback
import weakref
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from modules import devices, extra_networks, paths, script_callbacks, scripts, shared

from .. import __version__
from ..cache import ScoreCache
from ..cli import map_title
from ..engine import plan_from_files
from ..errors import KLoraError
from ..guidance_run import GuidanceModels, GuidanceRun
from ..params import KLoraParams, ParamsError
from ..plan import PlanSettings
from ..prompt_tag import find_extra_networks, find_tags, params_from_tag
from ..scores import ScoringInterrupted
from ..selection_map import render_selection_map
from . import a1111_engine as engine

TITLE = "K-LoRA"
NOTE_KEY = "K-LoRA note"
SETTINGS_SECTION = ("klora", "K-LoRA")

network_cache = engine.NetworkCache()
score_cache = ScoreCache()
guidance_models = GuidanceModels(Path(paths.models_path) / "klora")
_taesd_decoders: dict[str, Any] = {}  # private differentiable copies, by latent kind
# The denoiser of the evaluation in progress: `on_cfg_after_cfg` gets no processing object, only x̂0. A weak
# reference, so nothing of a finished generation is kept alive by it.
_current_denoiser: Any = None
_EXTRA_NETWORK_TAG = re.compile(r"<\w+:[^>]*>")


def _opt(name: str, default: Any) -> Any:
    return getattr(shared.opts, name, default)


def lora_names() -> list[str]:
    nets = engine.lora_extension()
    if nets is None:
        return []
    if not nets.available_networks:
        nets.list_available_networks()
    return sorted(nets.available_networks, key=str.lower)


def lora_exists(name: str) -> bool:
    nets = engine.lora_extension()
    if nets is None:
        return False
    try:
        engine.resolve_lora(nets, name)
    except KLoraError:
        return False
    return True


def score_device() -> Any:
    choice = _opt("klora_score_device", "auto")
    return devices.device if choice == "auto" else choice


# ---------------------------------------------------------------- parameters of one job


def job_params(p: Any, args: tuple) -> tuple[KLoraParams | None, KLoraParams | None]:
    """First-pass and hires-pass params (None = off): tag > X/Y/Z > UI/API args.

    Raises ParamsError on bad input. As with <lora> tags, a tag in the hires prompt controls the
    hires pass; without tags the accordion's "apply to hires pass" setting decides.
    """
    base = KLoraParams.from_any(list(args))
    overrides = getattr(p, "_klora_xyz", None)
    if overrides:
        base = base.with_overrides(overrides)
    first_tags = find_tags((getattr(p, "all_prompts", None) or [p.prompt])[0] or "")
    first = params_from_tag(*first_tags[0], base) if first_tags else (base if base.enabled else None)
    hires = None
    if getattr(p, "enable_hr", False):
        hr_prompts = getattr(p, "all_hr_prompts", None) or [getattr(p, "hr_prompt", "") or ""]
        hr_tags = find_tags(hr_prompts[0] or "")
        if hr_tags:
            hires = params_from_tag(*hr_tags[0], first or base)
        elif first is not None and not first_tags:
            hires = first.for_pass(is_hires=True)
    if (
        hires is not None
        and first is not None
        and (hires.subject, hires.style) != (first.subject, first.style)
    ):
        raise ParamsError("K-LoRA: the hires prompt's <klora> tag must name the same subject and style LoRAs")
    return first, hires


def _stop_job(p: Any, message: str) -> None:
    """Script hooks cannot stop a job by raising (the host catches and logs), but `p.sample` is called
    outside those guards: replacing it makes the job end with this message, before any sampling."""
    print(message)
    p.comment(message)

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise KLoraError(message)

    p.sample = refuse


# ---------------------------------------------------------------- the script


class KLoraScript(scripts.Script):
    sorting_priority = 15

    def title(self) -> str:
        return TITLE

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list:
        from ..ui import build_ui

        defaults = KLoraParams(
            pattern=_opt("klora_default_pattern", "s"), show_map=_opt("klora_show_map", False)
        )
        built = build_ui(is_img2img, lora_names, defaults)
        self.infotext_fields = built.infotext_fields
        self.paste_field_names = built.paste_field_names
        return built.components

    def before_process(self, p: Any, *args: Any) -> None:
        # Self-healing: a previous job that died before postprocess may have left slots behind.
        engine.remove_slots(engine.lora_extension())

    def process(self, p: Any, *args: Any) -> None:
        p._klora = None
        try:
            first, hires = job_params(p, args)
        except (ParamsError, ValueError) as exc:
            _stop_job(p, f"K-LoRA: {exc}" if not str(exc).startswith("K-LoRA") else str(exc))
            return
        if first is None and hires is None:
            return
        nets = engine.lora_extension()
        if nets is None:
            _stop_job(p, "K-LoRA: the built-in Lora extension is not loaded (is it disabled?)")
            return
        try:
            p._klora = engine.build_job(
                nets,
                network_cache,
                score_cache,
                shared.sd_model,
                first,
                hires,
                device=score_device(),
                digest=lambda path: score_cache.digests.digest(Path(path)),
                should_stop=lambda: bool(shared.state.interrupted),
            )
        except ScoringInterrupted:
            return
        except KLoraError as exc:
            _stop_job(p, str(exc))
            return
        pair = first or hires
        prompt = (getattr(p, "all_prompts", None) or [p.prompt])[0]
        job = p._klora
        engine.guard_sample(p, job, nets, on_failure=lambda exc: _end_guidance(job))
        if any(params is not None and params.uses_guidance for params in (first, hires)):
            try:
                job.guidance = build_guidance(pair, _EXTRA_NETWORK_TAG.sub("", prompt or ""))
            except (KLoraError, ValueError, OSError) as exc:
                engine.teardown(nets, job)
                p._klora = None
                _stop_job(p, f"K-LoRA guidance: {exc}")
                return
        lora_tags = [pos for name, pos, _ in find_extra_networks(prompt) if name == "lora"]
        for positional in lora_tags:
            if positional and positional[0] in (pair.subject, pair.style):
                p.comment(f"K-LoRA: '{positional[0]}' is also in a <lora> tag, so it is applied twice")
        # The text-encoder cache is class-level and keyed without script args: bind per-job lists.
        p.cached_c, p.cached_uc = [None, None], [None, None]
        if hasattr(p, "cached_hr_c"):
            p.cached_hr_c, p.cached_hr_uc = [None, None], [None, None]
        p.extra_generation_params.update(pair.to_infotext())

    def after_extra_networks_activate(self, p: Any, *args: Any, **kwargs: Any) -> None:
        job = getattr(p, "_klora", None)
        if job is not None:
            engine.inject_slots(engine.lora_extension(), job, bool(getattr(p, "is_hr_pass", False)))

    def process_batch(self, p: Any, *args: Any, **kwargs: Any) -> None:
        if getattr(p, "disable_extra_networks", False):  # no activation, so no hook above: inject here
            self.after_extra_networks_activate(p)

    def before_hr(self, p: Any, *args: Any) -> None:
        if getattr(p, "disable_extra_networks", False):
            self.after_extra_networks_activate(p)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        job = getattr(p, "_klora", None)
        if job is None:
            return
        engine.teardown(engine.lora_extension(), job)
        _end_guidance(job)
        p._klora = None
        if job.failed:
            return
        if any(params is not None and params.show_map for params in (job.params, job.hires_params)):
            names = [layer.canonical for layer in job.table.layers]
            for record in job.passes:
                if record.schedule is None:
                    title = f"{record.label}: {engine.dynamic_title(record.params)}"
                else:
                    title = f"{record.label}: {map_title(job.plan_for(record.params))}"
                choices, labels = engine.pass_choices(job, record)
                processed.images.append(render_selection_map(names, choices, labels, title))
                processed.infotexts.append(f"K-LoRA selection map, {title}")


# ---------------------------------------------------------------- callbacks


def on_cfg_denoiser(params: Any) -> None:
    global _current_denoiser
    denoiser = params.denoiser
    p = getattr(denoiser, "p", None)
    job = getattr(p, "_klora", None)
    if job is None or job.failed:
        return
    _current_denoiser = weakref.ref(denoiser)
    job.sigma = params.sigma
    try:
        if shared.sd_model is not job.model:
            raise KLoraError("the checkpoint changed during the job (refiner or hires checkpoint)")
        config = getattr(getattr(denoiser, "sampler", None), "config", None)
        second_order = bool(getattr(config, "options", {}).get("second_order", False))
        engine.on_step(job, denoiser, bool(getattr(p, "is_hr_pass", False)), 2 if second_order else 1)
    except Exception as exc:  # callbacks must not raise: the host logs it every step
        fail_job(p, job, exc)


def on_cfg_after_cfg(params: Any) -> None:
    """Reference guidance: nudge the CFG-combined x̂0 of a guided step (k-diffusion samplers only)."""
    denoiser = _current_denoiser() if _current_denoiser is not None else None
    p = getattr(denoiser, "p", None)
    job = getattr(p, "_klora", None)
    if job is None or job.failed or job.guidance is None or shared.state.interrupted:
        return
    pass_params = job.params_for(bool(getattr(p, "is_hr_pass", False)))
    if pass_params is None or not pass_params.uses_guidance:
        return
    from modules import sd_samplers_timesteps

    if isinstance(denoiser, sd_samplers_timesteps.CFGDenoiserTimesteps):
        # DDIM, PLMS, UniPC: the value after CFG is the noise prediction, not x̂0.
        _guidance_off(p, job, f"guidance needs a k-diffusion sampler; {p.sampler_name} passes no x̂0 here")
        return
    try:
        x0 = params.x
        nudged = job.guidance.apply(x0, _sigma_of(job.sigma), job.tracker.step, job.tracker.steps)
        if nudged is not x0:
            if getattr(denoiser, "mask", None) is not None:  # inpainting: keep the unmasked area as given
                nudged = nudged * denoiser.nmask + denoiser.init_latent * denoiser.mask
            params.x = nudged
    except Exception as exc:  # callbacks must not raise; guidance stops, the fusion goes on
        traceback.print_exception(type(exc), exc, exc.__traceback__)
        _guidance_off(p, job, f"guidance failed and was switched off: {exc}")


def _sigma_of(sigma: Any) -> Any:
    # sigma_in holds one value per row (cond rows, then uncond rows); they are equal within a step.
    return sigma.reshape(-1)[0] if isinstance(sigma, torch.Tensor) and sigma.numel() else sigma


def _guidance_off(p: Any, job: engine.Job, reason: str) -> None:
    message = f"K-LoRA: {reason}"
    print(message)
    p.comment(message)  # shown under the images in the UI
    # API clients see only the infotext; from_infotext ignores this key, so pasting still works.
    p.extra_generation_params[NOTE_KEY] = reason
    _end_guidance(job)


def _end_guidance(job: engine.Job) -> None:
    job.guidance = None
    if _opt("klora_guidance_offload", True):
        guidance_models.offload()
        for decoder in _taesd_decoders.values():
            decoder.to("cpu")
        devices.torch_gc()


def build_guidance(params: KLoraParams, prompt: str) -> GuidanceRun:
    shared.state.textinfo = "K-LoRA: loading guidance models"

    def progress(text: str) -> None:
        shared.state.textinfo = f"K-LoRA: {text}"
        print(f"K-LoRA: {text}")

    decode = guidance_decoder(params.guidance_decoder)
    return GuidanceRun.build(
        params, guidance_models, decode, prompt=prompt, device=devices.device, progress=progress
    )


def guidance_decoder(kind: str) -> Any:
    """A differentiable latent → [0, 1] image decode for guidance: a private TAESD copy, or the full VAE."""
    from ..taesd import DECODER_FILES, load_taesd_decoder

    model = shared.sd_model
    if kind == "vae":
        vae, scale = model.first_stage_model, float(model.scale_factor)

        def decode_vae(z: torch.Tensor) -> torch.Tensor:
            weight = next(vae.parameters())
            image = vae.decode(z.to(device=weight.device, dtype=weight.dtype) / scale)
            return ((image.float() + 1.0) / 2.0).clamp(0.0, 1.0)

        return decode_vae
    if getattr(model, "is_sd3", False):
        raise KLoraError("TAESD guidance supports SD1/SD2/SDXL latents; choose the 'vae' decoder for SD3")
    latent = "sdxl" if getattr(model, "is_sdxl", False) else "sd"
    decoder = _taesd_decoders.get(latent)
    if decoder is None:
        local = guidance_models.weights_dir / DECODER_FILES[latent]
        if local.is_file():
            decoder = load_taesd_decoder(local)
        else:
            from modules import sd_vae_taesd

            host_file = ("taesdxl" if latent == "sdxl" else "taesd") + "_decoder.pth"
            try:  # the WebUI's own loader (and download) of the live-preview decoder
                host_decoder = sd_vae_taesd.decoder_model()
            except Exception as exc:
                host_dir = Path(paths.models_path) / "VAE-taesd"
                raise KLoraError(
                    f"no TAESD decoder for guidance ({type(exc).__name__}: {exc}). "
                    f"Put {DECODER_FILES[latent]} into {guidance_models.weights_dir}, or {host_file} into "
                    f"{host_dir} (both from https://github.com/madebyollin/taesd); or use the 'vae' decoder"
                ) from exc
            decoder = load_taesd_decoder(state_dict=host_decoder.state_dict())
        _taesd_decoders[latent] = decoder
    decoder.to(devices.device)
    return decoder.decode


def fail_job(p: Any, job: engine.Job, exc: BaseException) -> None:
    job.failed = str(exc) or type(exc).__name__
    engine.teardown(engine.lora_extension(), job)
    _end_guidance(job)
    message = f"K-LoRA was switched off for this image: {job.failed}"
    print(message)
    if not isinstance(exc, KLoraError):
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    p.comment(message)


def on_model_loaded(_model: Any) -> None:
    network_cache.clear()
    _taesd_decoders.clear()  # SD1 and SDXL latents need different decoders


def on_ui_settings() -> None:
    options = {
        "klora_score_device": shared.OptionInfo(
            "auto",
            "Device for K-LoRA scoring",
            gr.Dropdown,
            {"choices": ["auto", "cpu"]},
            section=SETTINGS_SECTION,
        ).info("auto = the WebUI's device; scores are computed once per LoRA pair and cached"),
        "klora_cache_entries": shared.OptionInfo(
            16,
            "LoRA pairs whose scores stay cached",
            gr.Slider,
            {"minimum": 0, "maximum": 256, "step": 1},
            section=SETTINGS_SECTION,
        ),
        "klora_default_pattern": shared.OptionInfo(
            "s", "Default time-scale pattern", gr.Radio, {"choices": ["s", "s*"]}, section=SETTINGS_SECTION
        ).info("s: subject early, style late (paper); s*: style first (official code's default, FLUX)"),
        "klora_show_map": shared.OptionInfo(
            False, "Add the selection map to outputs by default", section=SETTINGS_SECTION
        ),
        "klora_guidance_offload": shared.OptionInfo(
            True,
            "Move guidance models (CLIP, DINO, TAESD) to the CPU between generations",
            section=SETTINGS_SECTION,
        ).info("frees GPU memory; off keeps them on the GPU for faster repeated guided generations"),
    }
    for key, info in options.items():
        shared.opts.add_option(key, info)
    score_cache.max_entries = int(_opt("klora_cache_entries", 16))


class ExtraNetworkKLora(extra_networks.ExtraNetwork):
    """Registers the `klora` tag name; the script reads the tags from the prompts itself in `process`,
    where a bad tag can still stop the job (activation errors are only logged by the host)."""

    def __init__(self) -> None:
        super().__init__("klora")

    def activate(self, p: Any, params_list: list) -> None:
        pass

    def deactivate(self, p: Any) -> None:
        pass


def on_before_ui() -> None:
    extra_networks.register_extra_network(ExtraNetworkKLora())
    from . import xyz

    xyz.register_xyz_axes(xyz.find_xyz_module(scripts), lambda: lora_names())


def plan_for_names(subject: str, style: str, settings: PlanSettings):
    nets = engine.lora_extension()
    if nets is None:
        raise KLoraError("the built-in Lora extension is not loaded")
    files = [engine.resolve_lora(nets, name).filename for name in (subject, style)]
    return plan_from_files(*files, settings, device=score_device(), cache=score_cache)


def on_app_started(_demo: Any, app: Any) -> None:
    from .. import api

    api.register_routes(app, version=__version__, plan_for_names=plan_for_names)
    credentials = getattr(shared.cmd_opts, "api_auth", None)
    # With --api-auth, unauthenticated requests must get the host's 401, not our 422 (pitfall P7).
    authorize = (
        api.basic_auth_checker(dict(c.split(":", 1) for c in credentials.split(",") if ":" in c))
        if credentials
        else None
    )
    api.install_request_validator(app, script_title=TITLE, resolve_lora=lora_exists, authorize=authorize)


def register_callbacks() -> None:
    script_callbacks.on_cfg_denoiser(on_cfg_denoiser)
    script_callbacks.on_cfg_after_cfg(on_cfg_after_cfg)
    script_callbacks.on_model_loaded(on_model_loaded)
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_before_ui(on_before_ui)
    script_callbacks.on_app_started(on_app_started)
