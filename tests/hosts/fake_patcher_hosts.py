"""Minimal, faithful stand-ins for Forge's and reForge's LoRA machinery, for CPU tests of `engines/patcher.py`
and `hosts/forge.py`.

Written from scratch (no host code copied); each piece reproduces the interface and behaviour of:

- Forge, lllyasviel/stable-diffusion-webui-forge commit dfdcbab:
  `backend/operations.py` `ForgeOperations.Linear` (a plain nn.Module holding weight/bias Parameters, NOT an
  nn.Linear) and `ForgeOperations.Conv2d` (an nn.Conv2d subclass) -> `ForgeLinear`, `ForgeConv2d`;
  `backend/operations_bnb.py` `ForgeLoader4Bit` (packed uint8 NF4 weight, bitsandbytes `quant_state`)
  -> `Packed4BitLinear`; `backend/operations_gguf.py` `ParameterGGUF` (`real_shape`) -> `GGUFLinear`;
  `backend/patcher/lora.py` `load_lora` (-> (patch_dict, remaining)), `model_lora_keys_unet`,
  `model_lora_keys_clip`, `merge_lora_to_weight`, and `packages_3rdparty/comfyui_lora_collection/lora.py`
  (`load_lora`'s value formats ("lora", (up, down, alpha, mid, dora_scale)), ("loha", ...),
  ("lokr", (w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, t2, dora_scale)), ("diff", (w,)), ("set", (w,)); the
  kohya key map "lora_unet_<path_with_underscores>" -> "diffusion_model.<path>.weight");
  `backend/patcher/base.py` `ModelPatcher.clone` / `add_patches` (tuple keys (param, offset[, function])) /
  `set_model_sampler_post_cfg_function` -> `ForgeUnetPatcher`, `ForgeClipPatcher`; `backend/utils.py`
  `get_attr`, `load_torch_file`.
- reForge, Panchovix/stable-diffusion-webui-reForge commit 3b56b26:
  `ldm_patched/modules/lora.py` `load_lora` (-> a dict of weight-adapter objects, tuples for diff/set),
  `calculate_weight`, `model_lora_keys_unet`, `model_lora_keys_clip`; `ldm_patched/modules/weight_adapter/
  lora.py` `LoRAAdapter` (`.name == "lora"`, `.weights == (up, down, alpha, mid, dora_scale, reshape)`) and
  `loha.py` `LoHaAdapter`; `weight_adapter/base.py` `weight_decompose` (DoRA); `ldm_patched/modules/ops.py`
  `disable_weight_init.Linear` (an nn.Linear subclass) -> `ReForgeLinear`; `lora_convert.convert_lora`;
  `ldm_patched/modules/utils.py` `get_attr`, `load_torch_file`.
- The WebUI `modules` package (Forge dfdcbab / reForge 3b56b26 `modules/`): only the attributes
  `lib_klora.hosts.webui` and `lib_klora.hosts.forge` touch at import time and in the tested functions.

Deliberate reductions: no diffusers/FLUX key conversion (a model may list its fused-layer keys explicitly in
`FUSED_KEYS`), no GLoRA/OFT, no Tucker cores for LoHa/LoKr, no LoKr in reForge, no online LoRA / memory
management, CPU only.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

# ---------------------------------------------------------------- layers (operations.py / ops.py)
from tests.hosts.module_swap import swapped_modules


class ForgeLinear(nn.Module):
    """Forge's `ForgeOperations.Linear`: an nn.Module with `weight`/`bias` Parameters, F.linear forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=torch.float32) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ForgeConv2d(nn.Conv2d):
    """Forge's `ForgeOperations.Conv2d`: a real nn.Conv2d subclass."""


class ReForgeLinear(nn.Linear):
    """reForge's `ops.disable_weight_init.Linear`: an nn.Linear subclass that skips its initialisation."""

    def reset_parameters(self) -> None:
        return None


@dataclass
class QuantState:
    """What bitsandbytes keeps next to a packed 4-bit weight (`Params4bit.quant_state`): the logical shape."""

    shape: torch.Size
    absmax: float


class Packed4BitLinear(nn.Module):
    """Forge's `ForgeOperationsBNB4bits.Linear` (ForgeLoader4Bit): the weight is a packed uint8 Parameter
    of shape (out·in/2, 1), two 4-bit codes per byte, with a `quant_state`; no in/out_features.

    This stand-in quantizes to 16 uniform levels (not NF4's table); forward dequantizes, as the host does.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        absmax = float(weight.abs().max())
        codes = torch.round((weight.flatten() / absmax + 1.0) * 7.5).clamp(0, 15).to(torch.uint8)
        packed = (codes[0::2] << 4) | codes[1::2]
        self.weight = nn.Parameter(packed.reshape(-1, 1), requires_grad=False)
        self.weight.quant_state = QuantState(weight.shape, absmax)
        self.bias = None if bias is None else nn.Parameter(bias.clone())

    def dequantize(self) -> torch.Tensor:
        packed = self.weight.detach().flatten()
        codes = torch.stack([packed >> 4, packed & 15], dim=1).flatten().float()
        state = self.weight.quant_state
        return ((codes / 7.5 - 1.0) * state.absmax).reshape(state.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(
            x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        )


class GGUFLinear(nn.Module):
    """Forge's `ForgeOperationsGGUF.Linear`: the weight holds the file's raw bytes (here int8 codes,
    flattened) and carries `real_shape`, the logical (out, in) shape (`ParameterGGUF.real_shape`)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.scale = float(weight.abs().max()) / 127.0
        codes = torch.round(weight.flatten() / self.scale).to(torch.int8).view(torch.uint8)
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.weight.real_shape = torch.Size(weight.shape)
        self.bias = None

    def dequantize(self) -> torch.Tensor:
        return self.weight.detach().view(torch.int8).float().reshape(self.weight.real_shape) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype))


# ---------------------------------------------------------------- models and patchers


def get_attr(obj: Any, name: str) -> Any:
    """`backend.utils.get_attr` / `ldm_patched.modules.utils.get_attr`: dotted getattr (AttributeError)."""
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


class HostModel(nn.Module):
    """A host's `unet.model` (Forge KModel / reForge BaseModel): the UNet lives under `diffusion_model`.

    `FUSED_KEYS` mimics the FLUX key conversion: LoRA key -> (model key, (dim, start, size)).
    """

    def __init__(self, diffusion_model: nn.Module, fused_keys: Mapping[str, tuple] | None = None) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model
        self.FUSED_KEYS = dict(fused_keys or {})


class TextModel(nn.Module):
    """`clip.cond_stage_model`: one CLIP-L q_proj, keyed like the host's `clip_l.transformer.text_model`."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.Linear(8, 8)
        self.clip_l = nn.Module()
        self.clip_l.transformer = nn.Module()
        self.clip_l.transformer.text_model = nn.Module()
        self.clip_l.transformer.text_model.q_proj = layer


@dataclass
class ForgeUnetPatcher:
    """`backend/patcher/base.py` ModelPatcher (unet): clone shares the model, copies patches and options."""

    model: HostModel
    lora_patches: dict = field(default_factory=dict)
    model_options: dict = field(default_factory=dict)

    def clone(self) -> ForgeUnetPatcher:
        return ForgeUnetPatcher(self.model, dict(self.lora_patches), dict(self.model_options))

    def set_model_sampler_post_cfg_function(self, post_cfg_function: Callable) -> None:
        self.model_options["sampler_post_cfg_function"] = [
            *self.model_options.get("sampler_post_cfg_function", []),
            post_cfg_function,
        ]


@dataclass
class ForgeClipPatcher:
    """Forge's CLIP patcher: `add_patches(filename=, patches=, strength_patch=, online_mode=)` on a clone."""

    cond_stage_model: TextModel
    lora_patches: dict = field(default_factory=dict)

    def clone(self) -> ForgeClipPatcher:
        return ForgeClipPatcher(self.cond_stage_model, dict(self.lora_patches))

    def add_patches(
        self,
        *,
        filename: str,
        patches: dict,
        strength_patch: float = 1.0,
        strength_model: float = 1.0,
        online_mode: bool = False,
    ) -> set:
        keys = {k for k, _ in self.cond_stage_model.named_parameters()}
        this: dict[str, list] = {}
        found = set()
        for key, value in patches.items():
            param, offset, function = (key, None, None) if isinstance(key, str) else (*key, None)[:3]
            if param in keys:
                found.add(key)
                this.setdefault(param, []).append([strength_patch, value, strength_model, offset, function])
        self.lora_patches[(filename, strength_patch, strength_model, online_mode)] = this
        return found


@dataclass
class ReForgeClipPatcher:
    """reForge's CLIP object: `add_patches(patches, strength_patch=1.0, strength_model=1.0)` on a clone."""

    cond_stage_model: TextModel
    patches: list = field(default_factory=list)

    def clone(self) -> ReForgeClipPatcher:
        return ReForgeClipPatcher(self.cond_stage_model, list(self.patches))

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        self.patches.append((dict(patches), strength_patch, strength_model))
        return list(patches)


# ---------------------------------------------------------------- key maps


def model_lora_keys_unet(model: HostModel, key_map: dict | None = None) -> dict:
    """kohya "lora_unet_<path_with_underscores>" and the generic "diffusion_model.<path>" -> the weight key;
    non-weight parameters map to themselves; plus the model's fused (FLUX-style) keys."""
    key_map = {} if key_map is None else key_map
    for k in model.state_dict():
        if not k.startswith("diffusion_model."):
            continue
        if k.endswith(".weight"):
            path = k[len("diffusion_model.") : -len(".weight")]
            key_map["lora_unet_" + path.replace(".", "_")] = k
            key_map["diffusion_model." + path] = k
        else:
            key_map[k] = k
    key_map.update(getattr(model, "FUSED_KEYS", {}))
    return key_map


def model_lora_keys_clip(model: nn.Module, key_map: dict | None = None) -> dict:
    """kohya "lora_te_text_model_<path>" -> "clip_l.transformer.text_model.<path>.weight" (CLIP-L only)."""
    key_map = {} if key_map is None else key_map
    prefix = "clip_l.transformer."
    for k in model.state_dict():
        if k.startswith(prefix) and k.endswith(".weight"):
            key_map["lora_te_" + k[len(prefix) : -len(".weight")].replace(".", "_")] = k
    return key_map


# ---------------------------------------------------------------- LoRA arithmetic (shared by both hosts)


def _lora_diff(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None) -> torch.Tensor:
    """up @ down flattened; a LoCon CP core `mid` (r, r, kh, kw) is folded into down first."""
    up, down = up.float(), down.float()
    if mid is not None:
        rank, fan_in = down.shape[0], down.shape[1]
        folded = torch.mm(down.reshape(rank, fan_in).t(), mid.float().transpose(0, 1).flatten(1))
        down = folded.reshape(fan_in, rank, *mid.shape[2:]).transpose(0, 1)
    return torch.mm(up.flatten(1), down.flatten(1))


def _weight_decompose(dora_scale: torch.Tensor, weight: torch.Tensor, diff: torch.Tensor, strength: float):
    """DoRA as both hosts merge it: W' = (W + ΔW)·m/‖·‖ (the norm of W per output row when the magnitude
    vector runs along the output axis, else of W + ΔW per input column), then W + strength·(W' − W)."""
    calc = weight + diff.to(weight.dtype)
    if dora_scale.shape[0] == calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1)
        norm = norm.reshape(calc.shape[1], *[1] * (calc.ndim - 1)).transpose(0, 1)
    calc = calc * (dora_scale.float() / (norm + torch.finfo(weight.dtype).eps)).to(weight.dtype)
    if strength != 1.0:
        weight += strength * (calc - weight)
    else:
        weight[:] = calc
    return weight


def _apply_lora(weight, up, down, alpha, mid, dora_scale, strength, function):
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    diff = _lora_diff(up, down, mid)
    try:
        diff = diff.reshape(weight.shape)
    except RuntimeError:
        if diff.shape[1] > weight.shape[1]:  # FluxTools control LoRAs widen the input: pad the weight
            weight = F.pad(weight, (0, diff.shape[1] - weight.shape[1]))
        else:
            diff = F.pad(diff, (0, weight.shape[1] - diff.shape[1]))
    if dora_scale is not None:
        return _weight_decompose(dora_scale, weight, function(diff * scale), strength)
    weight += function((strength * scale) * diff).to(weight.dtype)
    return weight


def _apply_loha(weight, w1a, w1b, alpha, w2a, w2b, strength, function):
    scale = alpha / w1b.shape[0] if alpha is not None else 1.0
    diff = (torch.mm(w1a.float(), w1b.float()) * torch.mm(w2a.float(), w2b.float())).reshape(weight.shape)
    weight += function((strength * scale) * diff).to(weight.dtype)
    return weight


def _apply_lokr(weight, w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, strength, function):
    dim = None
    if w1 is None:
        dim = w1_b.shape[0]
        w1 = torch.mm(w1_a.float(), w1_b.float())
    if w2 is None:
        dim = w2_b.shape[0]
        w2 = torch.mm(w2_a.float(), w2_b.float())
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    diff = torch.kron(w1.float(), w2.float()).reshape(weight.shape)
    weight += function((strength * scale) * diff).to(weight.dtype)
    return weight


def _collect(lora: Mapping[str, torch.Tensor], x: str, loaded: set[str]) -> dict[str, Any]:
    """The tensors of LoRA stem `x` in the formats both loaders read (kohya, PEFT A/B, LoHa, diff, set)."""

    def take(name: str) -> torch.Tensor | None:
        if name in lora:
            loaded.add(name)
            return lora[name]
        return None

    alpha = take(f"{x}.alpha")
    found: dict[str, Any] = {"alpha": None if alpha is None else alpha.item()}
    found["dora_scale"] = take(f"{x}.dora_scale")
    for up_key, down_key, mid_key in (
        (f"{x}.lora_up.weight", f"{x}.lora_down.weight", f"{x}.lora_mid.weight"),
        (f"{x}.lora_B.weight", f"{x}.lora_A.weight", None),
    ):
        if up_key in lora:
            found["lora"] = (take(up_key), take(down_key), take(mid_key) if mid_key else None)
            break
    if f"{x}.hada_w1_a" in lora:
        found["loha"] = tuple(take(f"{x}.hada_{n}") for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
    lokr_names = ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2")
    if any(f"{x}.lokr_{n}" in lora for n in lokr_names):
        found["lokr"] = tuple(take(f"{x}.lokr_{n}") for n in lokr_names)
    for kind in ("diff", "diff_b", "set_weight", "reshape_weight"):
        value = take(f"{x}.{kind}")
        if value is not None:
            found[kind] = value
    return found


# ---------------------------------------------------------------- Forge: backend.patcher.lora


def forge_load_lora(lora: Mapping[str, torch.Tensor], to_load: Mapping[str, Any]) -> tuple[dict, dict]:
    """Forge's `load_lora`: (patch_dict keyed by the key map's targets, the tensors nobody consumed)."""
    patch_dict: dict = {}
    loaded: set[str] = set()
    for x, target in to_load.items():
        found = _collect(lora, x, loaded)
        alpha, dora = found["alpha"], found["dora_scale"]
        if "lora" in found:
            up, down, mid = found["lora"]
            patch_dict[target] = ("lora", (up, down, alpha, mid, dora))
        if "loha" in found:
            w1a, w1b, w2a, w2b = found["loha"]
            patch_dict[target] = ("loha", (w1a, w1b, alpha, w2a, w2b, None, None, dora))
        if "lokr" in found:
            w1, w2, w1_a, w1_b, w2_a, w2_b, t2 = found["lokr"]
            patch_dict[target] = ("lokr", (w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, t2, dora))
        if "diff" in found:
            patch_dict[target] = ("diff", (found["diff"],))
        if "diff_b" in found:
            patch_dict[target[: -len(".weight")] + ".bias"] = ("diff", (found["diff_b"],))
        if "set_weight" in found:
            patch_dict[target] = ("set", (found["set_weight"],))
    return patch_dict, {k: v for k, v in lora.items() if k not in loaded}


def merge_lora_to_weight(
    patches: list, weight: torch.Tensor, key: str = "online_lora", computation_dtype=None
):
    """Forge's `merge_lora_to_weight`: each [strength, value, strength_model, offset, function] onto a copy of
    `weight` in `computation_dtype` (a narrowed view for an offset); returns the merged weight."""
    computation_dtype = computation_dtype or torch.float32
    weight = weight.clone() if weight.dtype == computation_dtype else weight.to(computation_dtype)
    for strength, value, strength_model, offset, function in patches:
        function = function or (lambda a: a)
        whole = weight
        if offset is not None:
            weight = weight.narrow(*offset)
        if strength_model != 1.0:
            weight *= strength_model
        kind, v = value if len(value) == 2 else ("diff", value)
        if kind == "diff":
            if v[0].shape == weight.shape and strength != 0.0:
                weight += strength * v[0].to(weight.dtype)
        elif kind == "set":
            weight.copy_(v[0])
        elif kind == "lora":
            weight = _apply_lora(weight, *v, strength, function)
        elif kind == "loha":
            weight = _apply_loha(weight, *v[:5], strength, function)
        elif kind == "lokr":
            weight = _apply_lokr(weight, *v[:7], strength, function)
        else:
            raise ValueError(f"patch type {kind!r} is not in this stand-in")
        if offset is not None:
            weight = whole
    return weight


# ---------------------------------------------------------------- reForge: ldm_patched.modules.lora


class WeightAdapterBase:
    """`weight_adapter.base.WeightAdapterBase`."""

    name = ""

    def __init__(self, loaded_keys: set[str], weights: tuple) -> None:
        self.loaded_keys = loaded_keys
        self.weights = weights

    def __getitem__(self, index: int) -> str:  # the hosts' compatibility shim: value[0] is the type name
        if index == 0:
            return self.name
        raise IndexError(index)


class LoRAAdapter(WeightAdapterBase):
    """`weight_adapter.lora.LoRAAdapter`: weights (up, down, alpha, mid, dora_scale, reshape)."""

    name = "lora"

    def calculate_weight(
        self, weight, key, strength, strength_model, offset, function, dtype=None, orig=None
    ):
        up, down, alpha, mid, dora, reshape = self.weights
        if reshape is not None:  # BFL control LoRAs: the weight grows to `reshape`
            grown = torch.zeros(list(reshape), dtype=weight.dtype)
            grown[tuple(slice(0, n) for n in weight.shape)] = weight
            weight = grown
        return _apply_lora(weight, up, down, alpha, mid, dora, strength, function)


class LoHaAdapter(WeightAdapterBase):
    """`weight_adapter.loha.LoHaAdapter`: weights (w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale)."""

    name = "loha"

    def calculate_weight(
        self, weight, key, strength, strength_model, offset, function, dtype=None, orig=None
    ):
        w1a, w1b, alpha, w2a, w2b = self.weights[:5]
        return _apply_loha(weight, w1a, w1b, alpha, w2a, w2b, strength, function)


def reforge_load_lora(lora: Mapping[str, torch.Tensor], to_load: Mapping[str, Any], log_missing=True) -> dict:
    """reForge's `load_lora`: adapter objects for LoRA/LoHa, ("diff", ...) / ("set", ...) tuples otherwise."""
    patch_dict: dict = {}
    loaded: set[str] = set()
    for x, target in to_load.items():
        found = _collect(lora, x, loaded)
        alpha, dora = found["alpha"], found["dora_scale"]
        if "lora" in found:
            up, down, mid = found["lora"]
            reshape = found.get("reshape_weight")
            reshape = None if reshape is None else reshape.tolist()
            patch_dict[target] = LoRAAdapter(set(loaded), (up, down, alpha, mid, dora, reshape))
        if "loha" in found:
            w1a, w1b, w2a, w2b = found["loha"]
            patch_dict[target] = LoHaAdapter(set(loaded), (w1a, w1b, alpha, w2a, w2b, None, None, dora))
        if "diff" in found:
            patch_dict[target] = ("diff", (found["diff"],))
        if "diff_b" in found:
            patch_dict[target[: -len(".weight")] + ".bias"] = ("diff", (found["diff_b"],))
        if "set_weight" in found:
            patch_dict[target] = ("set", (found["set_weight"],))
    return patch_dict


def calculate_weight(
    patches: list, weight: torch.Tensor, key: str, intermediate_dtype=None, original_weights=None
):
    """reForge's `calculate_weight`: adapters compute themselves; diff/set tuples are merged here. Like the
    host, it works on `weight` itself (callers pass a copy)."""
    for strength, value, strength_model, offset, function in patches:
        function = function or (lambda a: a)
        whole = weight
        if offset is not None:
            weight = weight.narrow(*offset)
        if strength_model != 1.0:
            weight *= strength_model
        if isinstance(value, WeightAdapterBase):
            weight = value.calculate_weight(weight, key, strength, strength_model, offset, function)
        else:
            kind, v = value if len(value) == 2 else ("diff", value)
            if kind == "diff":
                if v[0].shape == weight.shape and strength != 0.0:
                    weight += function(strength * v[0].to(weight.dtype))
            elif kind == "set":
                weight.copy_(v[0])
            else:
                raise ValueError(f"patch type {kind!r} is not in this stand-in")
        if offset is not None:
            weight = whole
    return weight


# ---------------------------------------------------------------- the WebUI's Lora extension registry


@dataclass
class NetworkOnDisk:
    name: str
    filename: str
    alias: str = ""


class FakeNetworks(types.ModuleType):
    """`sys.modules["networks"]` as far as `webui.lora_file` reads it: the registries and their refresh."""

    def __init__(self, lora_dir: Path) -> None:
        super().__init__("networks")
        self.lora_dir = lora_dir
        self.available_networks: dict[str, NetworkOnDisk] = {}
        self.available_network_aliases: dict[str, NetworkOnDisk] = {}
        self.forbidden_network_aliases: dict[str, int] = {}
        self.list_available_networks()

    def list_available_networks(self) -> None:
        self.available_networks.clear()
        self.available_network_aliases.clear()
        listed = (".pt", ".ckpt", ".safetensors")  # the host's allowed_extensions for LoRAs
        for file in sorted(f for f in self.lora_dir.iterdir() if f.suffix in listed):
            entry = NetworkOnDisk(file.stem, str(file), file.stem)
            self.available_networks[file.stem] = entry
            self.available_network_aliases[file.stem] = entry

    def load_networks(self, *args: Any, **kwargs: Any) -> None:
        pass


# ---------------------------------------------------------------- fake packages in sys.modules


@dataclass
class CallbackLog:
    """`modules.script_callbacks`: every registration, by callback kind."""

    registered: dict[str, list[Callable]] = field(default_factory=dict)

    def module(self) -> types.ModuleType:
        module = types.ModuleType("modules.script_callbacks")
        for kind in (
            "on_cfg_denoiser",
            "on_model_loaded",
            "on_ui_settings",
            "on_before_ui",
            "on_app_started",
        ):
            setattr(module, kind, lambda fn, _kind=kind: self.registered.setdefault(_kind, []).append(fn))
        return module


def _package(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so `from name import sub` and `import name.sub` resolve
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


def _module(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


def _load_torch_file(ckpt: str, safe_load: bool = False, device=None) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt), device="cpu")


def webui_modules(models_path: Path, callbacks: CallbackLog) -> dict[str, types.ModuleType]:
    """The WebUI's `modules` package, reduced to what K-LoRA's Forge glue uses."""

    class Script:
        pass

    class ExtraNetwork:
        def __init__(self, name: str) -> None:
            self.name = name

    class OptionInfo:
        def __init__(self, default: Any = None, label: str = "", *args: Any, **kwargs: Any) -> None:
            self.default, self.label = default, label

        def info(self, _text: str) -> OptionInfo:
            return self

    opts = types.SimpleNamespace(klora_score_device="cpu", klora_guidance_offload=False)
    state = types.SimpleNamespace(interrupted=False, textinfo="")
    scripts = _module("modules.scripts", Script=Script, AlwaysVisible=object())
    shared = _module(
        "modules.shared", opts=opts, state=state, sd_model=None, OptionInfo=OptionInfo, cmd_opts=None
    )
    paths = _module("modules.paths", models_path=str(models_path))
    devices = _module("modules.devices", device=torch.device("cpu"), torch_gc=lambda: None)
    extra_networks = _module(
        "modules.extra_networks", ExtraNetwork=ExtraNetwork, register_extra_network=lambda _net: None
    )
    script_callbacks = callbacks.module()
    subs = {
        "scripts": scripts,
        "shared": shared,
        "paths": paths,
        "devices": devices,
        "extra_networks": extra_networks,
        "script_callbacks": script_callbacks,
    }
    package = _package("modules", **subs)
    return {"modules": package, **{f"modules.{k}": v for k, v in subs.items()}}


def forge_backend() -> dict[str, types.ModuleType]:
    """Forge's `backend` package: `backend.utils` and `backend.patcher.lora`."""
    lora = _module(
        "backend.patcher.lora",
        load_lora=forge_load_lora,
        model_lora_keys_unet=model_lora_keys_unet,
        model_lora_keys_clip=model_lora_keys_clip,
        merge_lora_to_weight=merge_lora_to_weight,
    )
    utils = _module("backend.utils", get_attr=get_attr, load_torch_file=_load_torch_file)
    patcher = _package("backend.patcher", lora=lora)
    backend = _package("backend", patcher=patcher, utils=utils)
    return {
        "backend": backend,
        "backend.patcher": patcher,
        "backend.patcher.lora": lora,
        "backend.utils": utils,
    }


def reforge_ldm_patched() -> dict[str, types.ModuleType]:
    """reForge's `ldm_patched.modules.{lora, lora_convert, utils, weight_adapter}`."""
    lora = _module(
        "ldm_patched.modules.lora",
        load_lora=reforge_load_lora,
        model_lora_keys_unet=model_lora_keys_unet,
        model_lora_keys_clip=model_lora_keys_clip,
        calculate_weight=calculate_weight,
    )
    convert = _module("ldm_patched.modules.lora_convert", convert_lora=lambda sd: sd)
    utils = _module("ldm_patched.modules.utils", get_attr=get_attr, load_torch_file=_load_torch_file)
    adapters = _module(
        "ldm_patched.modules.weight_adapter",
        WeightAdapterBase=WeightAdapterBase,
        LoRAAdapter=LoRAAdapter,
        LoHaAdapter=LoHaAdapter,
        adapters=[LoRAAdapter, LoHaAdapter],
    )
    inner = _package(
        "ldm_patched.modules", lora=lora, lora_convert=convert, utils=utils, weight_adapter=adapters
    )
    outer = _package("ldm_patched", modules=inner)
    return {
        "ldm_patched": outer,
        "ldm_patched.modules": inner,
        "ldm_patched.modules.lora": lora,
        "ldm_patched.modules.lora_convert": convert,
        "ldm_patched.modules.utils": utils,
        "ldm_patched.modules.weight_adapter": adapters,
    }


KLORA_HOST_MODULES = (
    "lib_klora.hosts.forge",
    "lib_klora.hosts.webui",
    "lib_klora.hosts.job_start",
    "lib_klora.hosts.guidance_glue",
)


@dataclass
class FakeWebUI:
    forge: types.ModuleType  # lib_klora.hosts.forge, imported against the fakes
    webui: types.ModuleType
    job_start: types.ModuleType
    callbacks: CallbackLog
    networks: FakeNetworks
    shared: types.ModuleType


@contextmanager
def installed_webui(tmp_path: Path, lora_dir: Path) -> Iterator[FakeWebUI]:
    """Put fake `modules`, `backend`, `ldm_patched` and `networks` into sys.modules, import
    `lib_klora.hosts.forge` against them, and take all of it (the K-LoRA modules too) out again."""
    import importlib

    callbacks = CallbackLog()
    networks = FakeNetworks(lora_dir)
    fakes = {
        **webui_modules(tmp_path / "models", callbacks),
        **forge_backend(),
        **reforge_ldm_patched(),
        "networks": networks,
    }
    with swapped_modules(fakes, KLORA_HOST_MODULES):
        forge = importlib.import_module("lib_klora.hosts.forge")
        yield FakeWebUI(
            forge,
            sys.modules["lib_klora.hosts.webui"],
            sys.modules["lib_klora.hosts.job_start"],
            callbacks,
            networks,
            fakes["modules.shared"],
        )
