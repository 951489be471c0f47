"""What every engine's job shares: parameters per pass, plans, pass tracking, LoRA lookup, failure guard.

A job lives on the WebUI's processing object (`p._klora`) or on a library fusion, and dies with it.
The kinds: slot networks (engines/slots.py, A1111), patcher hooks (engines/patcher.py, Forge/reForge).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lib_klora.engines.tracking import PassRecord, PassTracker
from lib_klora.errors import KLoraError
from lib_klora.fusion.plan import FusionPlan, PlanSettings
from lib_klora.fusion.scores import ScoreTable
from lib_klora.loras.safetensors_header import PICKLE_SUFFIXES, pickle_refusal
from lib_klora.params.model import KLoraParams


class JobError(KLoraError):
    """A K-LoRA job cannot run as configured (unknown LoRA, bad tag, unusable file, nothing in common)."""


class PickleLoraError(JobError):
    """The LoRA exists but is a pickle file, which K-LoRA never loads."""


@dataclass(kw_only=True)
class FusionJob:
    """The state every engine keeps for one generation."""

    params: KLoraParams | None  # first pass; None = K-LoRA off there (hires-only tag)
    hires_params: KLoraParams | None
    table: ScoreTable
    tracker: PassTracker = field(default_factory=PassTracker)
    plans: dict[PlanSettings, FusionPlan] = field(default_factory=dict)
    passes: list[PassRecord] = field(default_factory=list)
    failed: str | None = None
    guidance: Any = None  # GuidanceRun of the host glue, when reference guidance is on

    def params_for(self, is_hires: bool) -> KLoraParams | None:
        return self.hires_params if is_hires else self.params

    def plan_for(self, params: KLoraParams) -> FusionPlan:
        settings = params.to_plan_settings()  # frozen and hashable: equal settings share one plan
        if settings not in self.plans:
            self.plans[settings] = FusionPlan(self.table, settings)
        return self.plans[settings]


def resolve_lora(nets: Any, name: str) -> Any:
    """Find a LoRA by name or alias in the WebUI's list only: never a filesystem path."""

    def lookup() -> Any:
        if name.lower() in nets.forbidden_network_aliases:
            return nets.available_networks.get(name)
        return nets.available_network_aliases.get(name)

    found = lookup()
    if found is None:
        nets.list_available_networks()  # the user may have added the file since start-up
        found = lookup()
    if found is None:
        raise JobError(f"K-LoRA: LoRA '{name}' is not in the WebUI's LoRA list")
    if os.path.splitext(found.filename)[1].lower() in PICKLE_SUFFIXES:
        raise PickleLoraError(f"K-LoRA: LoRA '{name}': {pickle_refusal(found.filename)}")
    return found


def on_sampling_failure(p: Any, cleanup: Callable[[BaseException], None]) -> None:
    """Run `cleanup` the moment `p.sample` raises, then let the exception go on.

    The WebUI skips scripts' `postprocess` when sampling raises, and a next job's `before_process` would
    only clean up later; wrapping the processing object's own `sample` covers every exit of sampling.
    An interrupt is not a failure here: samplers return normally after one.
    """
    original = p.sample

    def sample(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except BaseException as exc:
            cleanup(exc)
            raise

    p.sample = sample
