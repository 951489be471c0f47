"""From LoRA files to a fusion plan: read, check compatibility, score once (cached), plan."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lib_klora.errors import IncompatibleLorasError
from lib_klora.fusion.cache import ScoreCache
from lib_klora.fusion.plan import FusionPlan, PlanSettings
from lib_klora.fusion.scores import ScoreTable, compute_scores
from lib_klora.loras.lora_file import LoraFile, read_lora_file

default_cache = ScoreCache()
DENOISER_COMPONENTS = ("unet:", "transformer:")


def denoiser_modules(lora: LoraFile) -> dict:
    """Only denoiser layers take part in per-step selection: a text encoder runs once per prompt, so its
    LoRA layers follow the text-encoder policy instead, and they stay out of scores and γ."""
    return {name: m for name, m in lora.modules.items() if name.startswith(DENOISER_COMPONENTS)}


def check_compatible(loras: Sequence[LoraFile]) -> None:
    """Refuse LoRAs made for different base models before any scoring work."""
    known = [(lora.architecture, lora.path) for lora in loras if lora.architecture]
    if len({arch for arch, _ in known}) > 1:
        detail = ", ".join(f"{path.name} is {arch}" for arch, path in known)
        raise IncompatibleLorasError(f"the LoRAs were trained for different base models ({detail})")


def load_score_table(
    paths: Sequence[str | os.PathLike[str]],
    *,
    device: str | torch.device | None = "auto",
    cache: ScoreCache | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ScoreTable:
    cache = default_cache if cache is None else cache
    files = [Path(p) for p in paths]
    known = [cache.digests.peek(f) for f in files]
    looked_up = all(known)
    if looked_up:  # unchanged files: answer without reading them
        table = cache.get(tuple(known))  # type: ignore[arg-type]
        if table is not None:
            return table
    loras = [read_lora_file(f) for f in files]
    for lora in loras:
        cache.digests.remember(lora.path, lora.sha256)
    digests = tuple(lora.sha256 for lora in loras)
    if not looked_up and (table := cache.get(digests)) is not None:
        return table
    check_compatible(loras)
    table = compute_scores(
        [denoiser_modules(lora) for lora in loras],
        device=device,
        progress=progress,
        labels=[str(f) for f in files],
    )
    cache.put(digests, table)
    return table


def plan_from_files(
    subject: str | os.PathLike[str],
    style: str | os.PathLike[str],
    settings: PlanSettings | None = None,
    *,
    device: str | torch.device | None = "auto",
    cache: ScoreCache | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FusionPlan:
    table = load_score_table([subject, style], device=device, cache=cache, progress=progress)
    return FusionPlan(table, settings)
