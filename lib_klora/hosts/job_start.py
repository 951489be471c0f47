"""A job's start and end on every WebUI host: parameters per pass (tag > X/Y/Z > UI/API), stopping a job with
a message, per-job preparation, selection maps and failure reports."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping
from typing import Any

from lib_klora.dynamic.selectors import dynamic_title
from lib_klora.errors import KLoraError
from lib_klora.fusion.plan import FusionPlan
from lib_klora.fusion.selection_map import render_selection_map
from lib_klora.params.model import KLoraParams
from lib_klora.params.parsing import ParamsError
from lib_klora.params.prompt_tag import (
    HIRES_PAIR_RULE,
    find_extra_networks,
    find_tags,
    params_from_tag,
    same_loras,
)


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
    if not same_loras(first, hires):
        raise ParamsError(f"K-LoRA: {HIRES_PAIR_RULE}")
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
    check_loras: Callable[[str, str], None] | None = None,
) -> Any:
    """Parameters of the job, `check_loras(subject, style)` (the plan route's file checks, before the host's
    loader sees a broken file), then `build(first, hires)` (the host's LoRA loading and scoring).

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
    if check_loras is not None:
        try:
            check_loras(pair.subject, pair.style)
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


class TextEncoderCaches:
    """The conditioning caches K-LoRA jobs use instead of the host's.

    The host's cache is class-level and keyed without script args, so a K-LoRA job must not share it (a
    plain job's conds are not this job's: K-LoRA changes the text encoder). K-LoRA's own lists are keyed
    by what it does to the text encoder — LoRAs, strengths and text-encoder policy of each pass — and the
    host keys its entries as usual (prompts, steps, checkpoint, <lora> tags...). An identical next job
    reuses them, as a repeated plain job reuses the host's: SDXL on a CPU otherwise pays two text-encoder
    passes per job (about 17 s, measured live)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.lists: list[list[Any]] = []

    def bind(self, p: Any, key: tuple) -> None:
        if key != self.key or not self.lists:  # one entry, as the host keeps one
            self.key, self.lists = key, [[None, None] for _ in range(4)]
        p.cached_c, p.cached_uc = self.lists[0], self.lists[1]
        if hasattr(p, "cached_hr_c"):
            p.cached_hr_c, p.cached_hr_uc = self.lists[2], self.lists[3]


text_encoder_caches = TextEncoderCaches()


def text_encoder_key(first: KLoraParams | None, hires: KLoraParams | None) -> tuple:
    """What K-LoRA does to the text encoder in each pass."""
    return tuple(
        None
        if params is None
        else (params.subject, params.style, params.subject_strength, params.style_strength, params.te_policy)
        for params in (first, hires)
    )


def prepare_job(p: Any, pair: KLoraParams) -> None:
    """What every host does once a job is set up: warnings, K-LoRA's conditioning caches, infotext."""
    lora_tags = [pos for name, pos, _ in find_extra_networks(first_prompt(p)) if name == "lora"]
    for positional in lora_tags:
        if positional and positional[0] in (pair.subject, pair.style):
            p.comment(f"K-LoRA: '{positional[0]}' is also in a <lora> tag, so it is applied twice")
    job = getattr(p, "_klora", None)
    first, hires = (job.params, job.hires_params) if job is not None else (pair, None)
    text_encoder_caches.bind(p, text_encoder_key(first, hires))
    p.extra_generation_params.update(pair.to_infotext())


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
            title = f"{record.label}: {plan.title()}"
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
