"""Glue shared by every WebUI host (A1111, Forge, reForge): their common `modules` API.

The settings section, the accordion, parameters of a job (tag > X/Y/Z > UI/API), the `<klora>` tag, the
HTTP routes and validator, selection maps and the guidance models. Host specifics live in `a1111.py` and
`forge.py`; nothing here touches layers or samplers.
"""

from __future__ import annotations

import re
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gradio as gr
from modules import devices, extra_networks, paths, scripts, shared

from lib_klora import __version__
from lib_klora.engines.slots import PickleLoraError, resolve_lora
from lib_klora.errors import KLoraError
from lib_klora.fusion.cache import ScoreCache
from lib_klora.fusion.plan import FusionPlan, PlanSettings
from lib_klora.fusion.selection_map import render_selection_map
from lib_klora.guidance.refine import Decode
from lib_klora.guidance.run import GuidanceModels, GuidanceRun
from lib_klora.params.model import KLoraParams, ParamsError
from lib_klora.params.prompt_tag import find_extra_networks, find_tags, params_from_tag
from lib_klora.tools.cli import map_title

TITLE = "K-LoRA"
NOTE_KEY = "K-LoRA note"
SETTINGS_SECTION = ("klora", "K-LoRA")
EXTRA_NETWORK_TAG = re.compile(r"<\w+:[^>]*>")

score_cache = ScoreCache()
guidance_models = GuidanceModels(Path(paths.models_path) / "klora")
taesd_decoders: dict[str, Any] = {}  # private differentiable TAESD copies, by latent kind


def opt(name: str, default: Any) -> Any:
    return getattr(shared.opts, name, default)


def networks_module() -> Any:
    """The built-in Lora extension's `networks` module (A1111, Forge and reForge all name it so)."""
    module = sys.modules.get("networks")
    if module is not None and hasattr(module, "available_networks") and hasattr(module, "load_networks"):
        return module
    return None


def lora_names() -> list[str]:
    nets = networks_module()
    if nets is None:
        return []
    if not nets.available_networks:
        nets.list_available_networks()
    return sorted(nets.available_networks, key=str.lower)


def lora_exists(name: str) -> bool:
    """Whether the WebUI lists this LoRA; a listed pickle raises its own message (the same on every path)."""
    nets = networks_module()
    if nets is None:
        return False
    try:
        resolve_lora(nets, name)
    except PickleLoraError:
        raise
    except KLoraError:
        return False
    return True


def model_architecture() -> str | None:
    """The loaded model's base architecture in the file reader's words, None when unknown."""
    model = getattr(shared, "sd_model", None)
    if model is None:
        return None
    if getattr(model, "is_sd3", False):
        return "sd3"
    if is_flux_model():
        return "flux"
    for flag, arch in (("is_sdxl", "sdxl"), ("is_sd2", "sd2"), ("is_sd1", "sd1")):
        if getattr(model, flag, False) is True:
            return arch
    return None


def check_lora_pair(subject: str, style: str) -> None:
    """The plan route's file checks for a job's two LoRAs, against the loaded model too; raises KLoraError
    naming the file. Our reading never renames or modifies a file (Forge's loader renames a corrupt one)."""
    from lib_klora.fusion.from_files import check_lora_files

    check_lora_files([lora_file(subject), lora_file(style)], model_architecture())


def lora_file(name: str) -> str:
    nets = networks_module()
    if nets is None:
        raise KLoraError("K-LoRA: the built-in Lora extension is not loaded (is it disabled?)")
    return resolve_lora(nets, name).filename


def score_device() -> Any:
    choice = opt("klora_score_device", "auto")
    return devices.device if choice == "auto" else choice


# ---------------------------------------------------------------- parameters of one job


def _pattern_chosen(args: tuple, base: KLoraParams) -> bool:
    """Whether the UI/API arguments chose the pattern: an API dict names it; positional (accordion) values
    count only when K-LoRA is enabled there (a disabled accordion just carries its defaults)."""
    first = args[0] if args else None
    if isinstance(first, Mapping):
        return "pattern" in first
    return base.enabled


def job_params(
    p: Any, args: tuple, *, model_pattern: str | None = None
) -> tuple[KLoraParams | None, KLoraParams | None]:
    """First-pass and hires-pass params (None = off): tag > X/Y/Z > UI/API args.

    Raises ParamsError on bad input. As with <lora> tags, a tag in the hires prompt controls the
    hires pass; without tags the accordion's "apply to hires pass" setting decides. `model_pattern` is the
    loaded model's recommended pattern (s* for FLUX), used when nothing chose one.
    """
    base = KLoraParams.from_any(list(args))
    if model_pattern is not None and model_pattern != base.pattern and not _pattern_chosen(args, base):
        first_arg = args[0] if args else None
        beta_given = isinstance(first_arg, Mapping) and "beta" in first_arg
        base = base.with_overrides({"pattern": model_pattern, **({} if beta_given else {"beta": None})})
    overrides = getattr(p, "_klora_xyz", None)
    if overrides:
        base = base.with_overrides(overrides)
    first_tags = find_tags(first_prompt(p))
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


def stop_job(p: Any, message: str) -> None:
    """Script hooks cannot stop a job by raising (the host catches and logs), but `p.sample` is called
    outside those guards: replacing it makes the job end with this message, before any sampling."""
    print(message)
    p.comment(message)

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise KLoraError(message)

    p.sample = refuse


def begin_job(
    p: Any,
    args: tuple,
    build: Callable[[KLoraParams | None, KLoraParams | None], Any],
    *,
    model_pattern: str | None = None,
) -> Any:
    """Parameters of the job, then `build(first, hires)` (the host's LoRA loading and scoring).

    Returns the job, or None when K-LoRA is off or the job was stopped with a message (bad parameters,
    unusable LoRAs, any failure while preparing them: an image without the fusion asked for is worse).
    """
    from lib_klora.fusion.scores import ScoringInterrupted

    p._klora = None
    try:
        first, hires = job_params(p, args, model_pattern=model_pattern)
    except (ParamsError, ValueError) as exc:
        stop_job(p, f"K-LoRA: {exc}" if not str(exc).startswith("K-LoRA") else str(exc))
        return None
    if first is None and hires is None:
        return None
    pair = first or hires
    try:
        check_lora_pair(pair.subject, pair.style)  # before the host's loader sees a broken file
    except (KLoraError, OSError) as exc:
        stop_job(p, str(exc) if str(exc).startswith("K-LoRA") else f"K-LoRA: {exc}")
        return None
    try:
        job = build(first, hires)
    except ScoringInterrupted:
        return None
    except KLoraError as exc:
        stop_job(p, str(exc))
        return None
    except Exception as exc:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
        stop_job(p, f"K-LoRA could not prepare the LoRAs: {type(exc).__name__}: {exc}")
        return None
    p._klora = job
    return job


def first_prompt(p: Any) -> str:
    return (getattr(p, "all_prompts", None) or [p.prompt])[0] or ""


def prepare_job(p: Any, pair: KLoraParams) -> None:
    """What every host does once a job is set up: warnings, per-job conditioning cache, infotext."""
    lora_tags = [pos for name, pos, _ in find_extra_networks(first_prompt(p)) if name == "lora"]
    for positional in lora_tags:
        if positional and positional[0] in (pair.subject, pair.style):
            p.comment(f"K-LoRA: '{positional[0]}' is also in a <lora> tag, so it is applied twice")
    # The text-encoder cache is class-level and keyed without script args: bind per-job lists.
    p.cached_c, p.cached_uc = [None, None], [None, None]
    if hasattr(p, "cached_hr_c"):
        p.cached_hr_c, p.cached_hr_uc = [None, None], [None, None]
    p.extra_generation_params.update(pair.to_infotext())


class KLoraScriptBase(scripts.Script):
    """Title, visibility and accordion; each host adds its processing hooks."""

    sorting_priority = 15

    def title(self) -> str:
        return TITLE

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list:
        from lib_klora.web.ui import build_ui

        defaults = KLoraParams(
            pattern=opt("klora_default_pattern", "s"), show_map=opt("klora_show_map", False)
        )
        built = build_ui(is_img2img, lora_names, defaults)
        self.infotext_fields = built.infotext_fields
        self.paste_field_names = built.paste_field_names
        return built.components


def dynamic_title(params: KLoraParams) -> str:
    options = [f"KL {params.kl_direction}", f"T={params.kl_temperature:g}"]
    if params.kl_per_sample:
        options.append("per image")
    if params.kl_hybrid:
        options.append(f"hybrid {params.pattern}")
    return f"dynamic ({', '.join(options)})"


def add_selection_maps(processed: Any, job: Any) -> None:
    """Append one selection map per pass (when asked for) to the outputs."""
    if not any(params is not None and params.show_map for params in (job.params, job.hires_params)):
        return
    names = [layer.canonical for layer in job.table.layers]
    for record in job.passes:
        if record.schedule is None:
            title = f"{record.label}: {dynamic_title(record.params)}"
        else:
            plan: FusionPlan = job.plan_for(record.params)
            title = f"{record.label}: {map_title(plan)}"
        choices, labels = record.choices()
        processed.images.append(render_selection_map(names, choices, labels, title))
        processed.infotexts.append(f"K-LoRA selection map, {title}")


def evals_per_step(denoiser: Any) -> int:
    """Model evaluations per sampler step: 2 for second-order samplers (Heun, DPM2, DPM++ 2S/SDE ...)."""
    config = getattr(getattr(denoiser, "sampler", None), "config", None)
    return 2 if bool(getattr(config, "options", {}).get("second_order", False)) else 1


def report_failure(p: Any, job: Any, exc: BaseException) -> None:
    job.failed = str(exc) or type(exc).__name__
    message = f"K-LoRA was switched off for this image: {job.failed}"
    print(message)
    if not isinstance(exc, KLoraError):
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    p.comment(message)


# ---------------------------------------------------------------- guidance


def build_guidance(params: KLoraParams, prompt: str, decode: Decode) -> GuidanceRun:
    """Guidance models and reference embeddings for one job (call outside inference mode)."""
    shared.state.textinfo = "K-LoRA: loading guidance models"

    def progress(text: str) -> None:
        shared.state.textinfo = f"K-LoRA: {text}"
        print(f"K-LoRA: {text}")

    return GuidanceRun.build(
        params,
        guidance_models,
        decode,
        prompt=EXTRA_NETWORK_TAG.sub("", prompt),
        device=devices.device,
        progress=progress,
    )


def is_flux_model() -> bool:
    """Forge's FLUX (and other non-SD) models report themselves as not "webui legacy" models."""
    legacy = getattr(shared.sd_model, "is_webui_legacy_model", None)
    return callable(legacy) and not legacy() and not getattr(shared.sd_model, "is_sd3", False)


def latent_kind() -> str:
    model = shared.sd_model
    if getattr(model, "is_sd3", False):
        raise KLoraError(
            "TAESD guidance supports SD1/SD2, SDXL and FLUX latents; use the 'vae' decoder for SD3"
        )
    if is_flux_model():
        return "flux"
    return "sdxl" if getattr(model, "is_sdxl", False) else "sd"


def taesd_decoder() -> Any:
    """A private, differentiable TAESD decoder for the current model on the WebUI's device, built outside
    inference mode: from models/klora (safetensors), else from the WebUI's own live-preview decoder."""
    from lib_klora.guidance.taesd import DECODER_FILES, load_taesd_decoder

    kind = latent_kind()
    decoder = taesd_decoders.get(kind)
    if decoder is None:
        local = guidance_models.weights_dir / DECODER_FILES[kind]
        if local.is_file():
            decoder = load_taesd_decoder(local)
        else:
            from modules import sd_vae_taesd

            host_file = DECODER_FILES[kind].replace(".safetensors", ".pth")
            try:  # the WebUI's own loader (and download) of the live-preview decoder
                host_decoder = sd_vae_taesd.decoder_model()
            except Exception as exc:
                host_dir = Path(paths.models_path) / "VAE-taesd"
                raise KLoraError(
                    f"no TAESD decoder for guidance ({type(exc).__name__}: {exc}). Put "
                    f"{DECODER_FILES[kind]} into {guidance_models.weights_dir}, or {host_file} into "
                    f"{host_dir} (both from https://github.com/madebyollin/taesd); or use the 'vae' decoder"
                ) from exc
            decoder = load_taesd_decoder(state_dict=host_decoder.state_dict())
        taesd_decoders[kind] = decoder
    decoder.to(devices.device)
    return decoder


def start_guidance(
    p: Any, job: Any, pair: KLoraParams, decoder: Callable[[], Decode], teardown: Callable[[], None]
) -> bool:
    """Build the job's guidance when a pass uses it; on failure end the job with its message (False)."""
    if not any(params is not None and params.uses_guidance for params in (job.params, job.hires_params)):
        return True
    try:
        job.guidance = build_guidance(pair, first_prompt(p), decoder())
    except (KLoraError, ValueError, OSError) as exc:
        teardown()
        p._klora = None
        stop_job(p, f"K-LoRA guidance: {exc}")
        return False
    return True


def end_guidance(job: Any) -> None:
    """Guidance is over for this job; models go to the CPU when the setting says so."""
    job.guidance = None
    if opt("klora_guidance_offload", True):
        guidance_models.offload()
        for decoder in taesd_decoders.values():
            decoder.to("cpu")
        devices.torch_gc()


def guidance_off(p: Any, job: Any, reason: str) -> None:
    message = f"K-LoRA: {reason}"
    print(message)
    p.comment(message)  # shown under the images in the UI
    # API clients see only the infotext; from_infotext ignores this key, so pasting still works.
    p.extra_generation_params[NOTE_KEY] = reason
    end_guidance(job)


# ---------------------------------------------------------------- settings, tag, API


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
    score_cache.max_entries = int(opt("klora_cache_entries", 16))


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
    from lib_klora.hosts import xyz

    xyz.register_xyz_axes(xyz.find_xyz_module(scripts), lambda: lora_names())


PlanForNames = Callable[[str, str, PlanSettings], FusionPlan]


def plan_for_names(subject: str, style: str, settings: PlanSettings) -> FusionPlan:
    """The `/klora/v1/plan` route's plan: the LoRA files read by this extension's own reader."""
    from lib_klora.fusion.from_files import plan_from_files

    files = [lora_file(name) for name in (subject, style)]
    return plan_from_files(*files, settings, device=score_device(), cache=score_cache)


def make_app_started(plan_for_names: PlanForNames = plan_for_names) -> Callable[[Any, Any], None]:
    def on_app_started(_demo: Any, app: Any) -> None:
        from lib_klora.hosts import detect_host
        from lib_klora.web import api

        api.register_routes(app, version=__version__, plan_for_names=plan_for_names, host=detect_host())
        credentials = getattr(shared.cmd_opts, "api_auth", None)
        # With --api-auth, unauthenticated requests must get the host's 401, not our 422 (pitfall P7).
        authorize = (
            api.basic_auth_checker(dict(c.split(":", 1) for c in credentials.split(",") if ":" in c))
            if credentials
            else None
        )
        api.install_request_validator(
            app,
            script_title=TITLE,
            resolve_lora=lora_exists,
            check_loras=check_lora_pair,
            authorize=authorize,
        )

    return on_app_started
