"""AUTOMATIC1111 v1.10 glue: the always-visible script, callbacks, settings, tag, API and infotext.

This is the only file of the project that imports the WebUI's `modules` for A1111.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import gradio as gr
from modules import devices, extra_networks, script_callbacks, scripts, shared

from .. import __version__
from ..cache import ScoreCache
from ..cli import map_title
from ..engine import plan_from_files
from ..errors import KLoraError
from ..params import KLoraParams, ParamsError
from ..plan import PlanSettings
from ..prompt_tag import find_extra_networks, find_tags, params_from_tag
from ..scores import ScoringInterrupted
from ..selection_map import render_selection_map
from . import a1111_engine as engine

TITLE = "K-LoRA"
SETTINGS_SECTION = ("klora", "K-LoRA")

network_cache = engine.NetworkCache()
score_cache = ScoreCache()


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
        p._klora = None
        if job.failed:
            return
        if any(params is not None and params.show_map for params in (job.params, job.hires_params)):
            for record in job.passes:
                plan = job.plan_for(record.params)
                title = f"{record.label}: {map_title(plan)}"
                image = render_selection_map(
                    plan.layer_names, record.schedule.choices.tolist(), record.schedule.labels, title
                )
                processed.images.append(image)
                processed.infotexts.append(f"K-LoRA selection map, {title}")


# ---------------------------------------------------------------- callbacks


def on_cfg_denoiser(params: Any) -> None:
    denoiser = params.denoiser
    p = getattr(denoiser, "p", None)
    job = getattr(p, "_klora", None)
    if job is None or job.failed:
        return
    try:
        if shared.sd_model is not job.model:
            raise KLoraError("the checkpoint changed during the job (refiner or hires checkpoint)")
        config = getattr(getattr(denoiser, "sampler", None), "config", None)
        second_order = bool(getattr(config, "options", {}).get("second_order", False))
        engine.on_step(job, denoiser, bool(getattr(p, "is_hr_pass", False)), 2 if second_order else 1)
    except Exception as exc:  # callbacks must not raise: the host logs it every step
        fail_job(p, job, exc)


def fail_job(p: Any, job: engine.Job, exc: BaseException) -> None:
    job.failed = str(exc) or type(exc).__name__
    engine.teardown(engine.lora_extension(), job)
    message = f"K-LoRA was switched off for this image: {job.failed}"
    print(message)
    if not isinstance(exc, KLoraError):
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    p.comment(message)


def on_model_loaded(_model: Any) -> None:
    network_cache.clear()


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
    script_callbacks.on_model_loaded(on_model_loaded)
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_before_ui(on_before_ui)
    script_callbacks.on_app_started(on_app_started)
