"""PEFT / diffusers adapter settings stored in a safetensors file's metadata, in every spelling trainers use.

PEFT keeps a LoRA's alpha outside the tensors. diffusers (0.3x+) saves it as JSON under
``lora_adapter_metadata``, each key prefixed with the component (``unet.lora_alpha``, ``unet.r``,
``unet.alpha_pattern``, ``text_encoder.lora_alpha``, ``transformer.rank_pattern``, ...); older files and
hand-made ones write a plain adapter config (``{"r": 8, "lora_alpha": 16}``) or a bare number. Per-module
``alpha_pattern`` entries win over ``lora_alpha`` and match as PEFT matches them: the pattern is a regular
expression for the end of the module's dotted path. The rank itself always comes from the tensors (which
``rank_pattern`` only describes); ``use_rslora`` divides by √r instead of r.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

CONFIG_KEYS = ("lora_adapter_metadata", "unet_lora_adapter_metadata", "transformer_lora_adapter_metadata")
PLAIN_ALPHA_KEYS = ("lora_alpha", "alpha", "ss_network_alpha")
COMPONENT_PREFIXES = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior")
_KOHYA_COMPONENTS = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
_KOHYA_STEM = re.compile(r"^lora_(unet|te[12]?)_")


@dataclass(frozen=True)
class AdapterConfig:
    lora_alpha: float | None = None
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False

    def alpha_for(self, path: str, rank: int) -> float | None:
        """The kohya-style alpha (scale · rank) of the module at dotted `path` with this `rank`."""
        alpha = self.lora_alpha
        for pattern, value in self.alpha_pattern.items():
            try:
                if re.match(rf"(.*\.)?({pattern})$", path):
                    alpha = value
                    break
            except re.error:
                if path == pattern or path.endswith("." + pattern):
                    alpha = value
                    break
        if alpha is None:
            return None
        return alpha * math.sqrt(rank) if self.use_rslora else alpha


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _config(data: Mapping[str, object]) -> AdapterConfig | None:
    alpha = _number(data.get("lora_alpha"))
    raw_patterns = data.get("alpha_pattern")
    patterns = {}
    if isinstance(raw_patterns, Mapping):
        patterns = {str(k): v for k, v in ((k, _number(v)) for k, v in raw_patterns.items()) if v is not None}
    if alpha is None and not patterns:
        return None
    return AdapterConfig(alpha, patterns, data.get("use_rslora") is True)


def _split_prefixed(data: Mapping[str, object]) -> dict[str | None, dict[str, object]]:
    """{"unet.lora_alpha": 8, "r": 4} -> {"unet": {"lora_alpha": 8}, None: {"r": 4}}."""
    groups: dict[str | None, dict[str, object]] = {}
    for key, value in data.items():
        prefix, dot, rest = str(key).partition(".")
        if dot and prefix in COMPONENT_PREFIXES:
            groups.setdefault(prefix, {})[rest] = value
        else:
            groups.setdefault(None, {})[str(key)] = value
    return groups


@dataclass(frozen=True)
class AdapterSettings:
    """Adapter configs by component (None: applies to every component without its own)."""

    configs: dict[str | None, AdapterConfig]

    def alpha_for(self, stem: str, rank: int) -> float | None:
        component, path = module_path(stem)
        config = self.configs.get(component) or self.configs.get(None)
        return None if config is None else config.alpha_for(path, rank)


def module_path(stem: str) -> tuple[str | None, str]:
    """(component prefix, dotted module path) of a key stem, as PEFT's patterns see it."""
    kohya = _KOHYA_STEM.match(stem)
    if kohya:
        return _KOHYA_COMPONENTS[kohya.group(1)], stem[kohya.end() :]
    segments = stem.split(".")
    component = None
    while segments and segments[0] in COMPONENT_PREFIXES:
        component = segments.pop(0)
    if segments[:2] == ["base_model", "model"]:
        segments = segments[2:]
    return component, ".".join(segments)


def adapter_settings(metadata: Mapping[str, str]) -> AdapterSettings:
    configs: dict[str | None, AdapterConfig] = {}
    for key in CONFIG_KEYS:
        if key not in metadata:
            continue
        try:
            data = json.loads(metadata[key])
        except (json.JSONDecodeError, TypeError):
            continue
        if not isinstance(data, Mapping):
            continue
        default_component = {"unet_lora_adapter_metadata": "unet"}.get(key)
        default_component = default_component or {"transformer_lora_adapter_metadata": "transformer"}.get(key)
        for component, group in _split_prefixed(data).items():
            config = _config(group)
            if config is not None:
                configs.setdefault(component or default_component, config)
    if None not in configs:
        for key in PLAIN_ALPHA_KEYS:
            try:
                value = float(metadata[key])
            except (KeyError, ValueError):
                continue
            if math.isfinite(value):
                configs[None] = AdapterConfig(value)
                break
    return AdapterSettings(configs)
