"""Glue shared by every WebUI host (A1111, Forge, reForge): settings, the LoRA list, the script's accordion,
the `<klora>` tag name and the HTTP routes.

A job's start and end live in `job_start.py`, reference guidance in `guidance_glue.py`; host specifics in
`a1111.py` and `forge.py`. Nothing here touches layers or samplers.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any

import gradio as gr
from modules import devices, extra_networks, scripts, shared

from lib_klora import __version__
from lib_klora.engines.job import PickleLoraError, resolve_lora
from lib_klora.errors import KLoraError
from lib_klora.fusion.cache import ScoreCache
from lib_klora.fusion.plan import FusionPlan, PlanSettings
from lib_klora.loras.oft import BaseWeights
from lib_klora.params.model import KLoraParams

TITLE = "K-LoRA"
NOTE_KEY = "K-LoRA note"
SETTINGS_SECTION = ("klora", "K-LoRA")
EXTRA_NETWORK_TAG = re.compile(r"<\w+:[^>]*>")

score_cache = ScoreCache()  # lives as long as the WebUI: scores are reused across jobs


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


def is_flux_model() -> bool:
    """Forge's FLUX (and other non-SD) models report themselves as not "webui legacy" models."""
    legacy = getattr(shared.sd_model, "is_webui_legacy_model", None)
    return callable(legacy) and not legacy() and not getattr(shared.sd_model, "is_sd3", False)


def score_device() -> Any:
    choice = opt("klora_score_device", "auto")
    return devices.device if choice == "auto" else choice


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
        "klora_switch_on_activations": shared.OptionInfo(
            True,
            "AUTOMATIC1111: layers that switch LoRA during sampling take it on their activations",
            section=SETTINGS_SECTION,
        ).info(
            "no weight is rewritten at a switch or by a repeated job; off re-merges those layers at each "
            "switch (Forge and reForge always work on activations)"
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


def plan_for_names(
    subject: str, style: str, settings: PlanSettings, base_weights: BaseWeights | None = None
) -> FusionPlan:
    """The `/klora/v1/plan` route's plan: the LoRA files read by this extension's own reader; OFT/BOFT
    layers rotate the loaded model's weights (`base_weights`, from the host)."""
    from lib_klora.fusion.from_files import plan_from_files

    files = [lora_file(name) for name in (subject, style)]
    return plan_from_files(
        *files, settings, device=score_device(), cache=score_cache, base_weights=base_weights
    )


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
