"""A minimal, faithful stand-in for the WebUI's built-in Lora extension, for CPU tests of the A1111 engine.

Written from scratch (no host code copied) to reproduce the behaviour of AUTOMATIC1111 stable-diffusion-webui
v1.10.1 (tag v1.10.1, commit 82a973c), `extensions-builtin/Lora/`:

- `networks.py`: `network_apply_weights` L411-542 (lazy backup, the "no backup weights found" RuntimeError,
  restore-then-reapply when `network_current_names != wanted_names`, `net.modules.get(layer)`, error
  counting), `network_restore_weights_from_backup` L391-408, `network_forward` L545-569 (functional mode,
  with its early return when no network is loaded), `network_reset_cached_weight` L572-575, `load_network`
  L158-270, `load_networks` L281-366 (reduced), `process_network_files` / `list_available_networks`
  L650-688, the registry globals L725-737, and `network_Linear_load_state_dict` /
  `network_Conv2d_load_state_dict` among the patches of L578-635 (an in-place checkpoint load calls
  `network_reset_cached_weight`).
- `network.py`: `NetworkOnDisk` L24-88 (name, filename, alias only), `Network` L91-103, `NetworkModule`
  L106-227.
- `network_lora.py`: `ModuleTypeLora` / `NetworkModuleLora` L9-92 (`lyco_helpers.rebuild_conventional`
  inlined).
- `network_hada.py`, `network_lokr.py`, `network_full.py`: `NetworkModuleHada` (w1a, w1b, dim = w1b rows,
  w2a, w2b), `NetworkModuleLokr` (w1/w1a/w1b, w2/w2a/w2b, dim = w2b rows else w1b rows, `make_kron`) and
  `NetworkModuleFull` (`weight` = diff), each with `NetworkModule.finalize_updown`'s reshape, scale and
  multiplier (no Tucker cores, DoRA or bias).
- `network_oft.py`: `NetworkModuleOFT` (kohya/LyCORIS OFT, old `oft_diag`, BOFT, rescale), in
  `fake_network_oft.py`.

Deliberate reductions: key matching knows only this file's tiny model (`lora_unet_X` -> `diffusion_model_X`,
`lora_te_X` -> `transformer_X`, the host's SDXL-style and SD1-TE fallbacks), kohya LoRA, LoHa, LoKr and
full modules exist (no DoRA, MHA, fp8 or inpainting paths), `devices.dtype` is float32 and everything lives
on the CPU.
Test-only instrumentation: `FakeNetworks.calc_updown_calls` logs every merge `(layer, network name)`.
"""

from __future__ import annotations

import math
import os
import sys
import types
from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from lib_klora.tools.synthetic import make_lora_tensors, write_lora
from tests.hosts.fake_network_oft import reference_rotated

NetworkWeights = namedtuple("NetworkWeights", ["network_key", "sd_key", "w", "sd_module"])

LORA_SUFFIXES = (".pt", ".ckpt", ".safetensors")
UNET_NAMES = ("a", "b", "c", "d", "e")
TE_LAYER = "transformer_text_model_encoder_layers_0_self_attn_q_proj"
TE_PATH = "text_model.encoder.layers.0.self_attn.q_proj"  # kohya stem lora_te_text_model_..._q_proj


# ---------------------------------------------------------------- network.py


class NetworkOnDisk:
    """A LoRA file the WebUI lists: name = file stem, alias = `ss_output_name` metadata or the name."""

    def __init__(self, name: str, filename: str) -> None:
        self.name = name
        self.filename = filename
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        self.metadata: dict[str, str] = {}
        if self.is_safetensors:
            with safe_open(filename, framework="pt") as handle:
                self.metadata = dict(handle.metadata() or {})
        self.alias = self.metadata.get("ss_output_name", self.name)


class Network:
    """`network.Network`: one loaded LoRA; `modules` maps A1111 layer names to NetworkModules."""

    def __init__(self, name: str, network_on_disk: NetworkOnDisk) -> None:
        self.name = name
        self.network_on_disk = network_on_disk
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim: int | None = None
        self.modules: dict[str, Any] = {}
        self.bundle_embeddings: dict[str, Any] = {}
        self.mtime: float | None = None
        self.mentioned_name: str | None = None


class NetworkModuleLora:
    """`NetworkModule` + `NetworkModuleLora`: up/down factors held in real nn.Linear / nn.Conv2d modules."""

    def __init__(self, net: Network, weights: NetworkWeights) -> None:
        self.network = net
        self.network_key = weights.network_key
        self.sd_key = weights.sd_key
        self.sd_module = weights.sd_module
        self.shape = self.sd_module.weight.shape
        self.ops: Callable[..., torch.Tensor]
        self.extra_kwargs: dict[str, Any] = {}
        if isinstance(self.sd_module, nn.Conv2d):
            self.ops = F.conv2d
            self.extra_kwargs = {"stride": self.sd_module.stride, "padding": self.sd_module.padding}
        else:
            self.ops = F.linear
        w = weights.w
        self.bias = w.get("bias")
        self.alpha = w["alpha"].item() if "alpha" in w else None
        self.scale = w["scale"].item() if "scale" in w else None
        self.dora_scale = w.get("dora_scale")
        self.up_model = self._factor_module(w, "lora_up.weight")
        self.down_model = self._factor_module(w, "lora_down.weight")
        self.mid_model = None  # only CP-decomposed (LoCon mid) files have one
        self.dim = int(w["lora_down.weight"].shape[0])

    def _factor_module(self, w: Mapping[str, torch.Tensor], key: str) -> nn.Module:
        weight = w[key]
        if type(self.sd_module) is nn.Linear:
            weight = weight.reshape(weight.shape[0], -1)
            module: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        elif type(self.sd_module) is nn.Conv2d:
            if weight.ndim == 2:
                weight = weight.reshape(*weight.shape, 1, 1)
            if key == "lora_down.weight" and weight.shape[2:] != (1, 1):
                # The down factor carries the layer's kernel, stride and padding; up is always 1x1.
                conv = self.sd_module
                module = nn.Conv2d(
                    weight.shape[1], weight.shape[0], conv.kernel_size, conv.stride, conv.padding, bias=False
                )
            else:
                module = nn.Conv2d(weight.shape[1], weight.shape[0], (1, 1), bias=False)
        else:
            raise AssertionError(f"Lora layer {self.network_key} matched a layer of unsupported type")
        with torch.no_grad():
            module.weight.copy_(weight.reshape(module.weight.shape))
        module.to(device="cpu", dtype=torch.float32)  # the host's devices.cpu / devices.dtype
        module.weight.requires_grad_(False)
        return module

    def multiplier(self) -> float:
        # The host's own TE/UNet test: text-encoder keys carry 'transformer' near their start.
        if "transformer" in self.sd_key[:20]:
            return self.network.te_multiplier
        return self.network.unet_multiplier

    def calc_scale(self) -> float:
        if self.scale is not None:
            return self.scale
        if self.dim is not None and self.alpha is not None:
            return self.alpha / self.dim
        return 1.0

    def calc_updown(self, orig_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        up = self.up_model.weight.to(orig_weight.device)
        down = self.down_model.weight.to(orig_weight.device)
        output_shape = [up.size(0), down.size(1)]
        if down.ndim == 4:
            output_shape += list(down.shape[2:])
        up2, down2 = up.reshape(up.size(0), -1), down.reshape(down.size(0), -1)
        dyn = self.network.dyn_dim
        if dyn is not None:
            up2, down2 = up2[:, :dyn], down2[:dyn, :]
        updown = (up2 @ down2).reshape(output_shape)
        # finalize_updown without bias/DoRA: reshape to the weight, then scale, then multiplier (this order).
        if orig_weight.numel() == updown.numel():
            updown = updown.reshape(orig_weight.shape)
        updown = updown * self.calc_scale()
        return updown * self.multiplier(), None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Functional mode: ignores mid, dyn_dim and DoRA, as the host does."""
        return y + self.up_model(self.down_model(x)) * self.multiplier() * self.calc_scale()


class NetworkModuleLyco:
    """`NetworkModule`'s part the LyCORIS types share: alpha/scale, multiplier and `finalize_updown`."""

    def __init__(self, net: Network, weights: NetworkWeights) -> None:
        self.network = net
        self.network_key = weights.network_key
        self.sd_key = weights.sd_key
        self.sd_module = weights.sd_module
        self.shape = self.sd_module.weight.shape
        w = weights.w
        self.alpha = w["alpha"].item() if "alpha" in w else None
        self.scale = w["scale"].item() if "scale" in w else None
        self.dora_scale = None
        self.dim: int | None = None

    multiplier = NetworkModuleLora.multiplier
    calc_scale = NetworkModuleLora.calc_scale

    def finalize_updown(self, updown: torch.Tensor, orig_weight: torch.Tensor, output_shape: list) -> tuple:
        updown = updown.reshape(output_shape)
        if orig_weight.numel() == updown.numel():
            updown = updown.reshape(orig_weight.shape)
        updown = updown * self.calc_scale()
        return updown * self.multiplier(), None


class NetworkModuleHada(NetworkModuleLyco):
    def __init__(self, net: Network, weights: NetworkWeights) -> None:
        super().__init__(net, weights)
        self.w1a, self.w1b = weights.w["hada_w1_a"], weights.w["hada_w1_b"]
        self.dim = int(self.w1b.shape[0])
        self.w2a, self.w2b = weights.w["hada_w2_a"], weights.w["hada_w2_b"]
        self.t1, self.t2 = weights.w.get("hada_t1"), weights.w.get("hada_t2")

    def calc_updown(self, orig_weight: torch.Tensor) -> tuple:
        output_shape = [self.w1a.size(0), self.w1b.size(1)]
        updown1 = (self.w1a @ self.w1b.flatten(1)).reshape(output_shape)
        updown2 = (self.w2a @ self.w2b.flatten(1)).reshape(output_shape)
        return self.finalize_updown(updown1 * updown2, orig_weight, output_shape)


class NetworkModuleOFT(NetworkModuleLyco):
    """`oft_blocks` / `oft_diag` layers (network_oft.py): calc_updown(W) = finalize_updown(W' − W)."""

    def __init__(self, net: Network, weights: NetworkWeights) -> None:
        super().__init__(net, weights)
        w = weights.w
        self.stores_rotation = "oft_blocks" not in w
        self.oft_blocks = w["oft_diag"] if self.stores_rotation else w["oft_blocks"]
        self.rescale = w.get("rescale")
        self.scale = 1.0
        self.dim = int(self.oft_blocks.shape[0])

    def calc_updown(self, orig_weight: torch.Tensor) -> tuple:
        rotated = reference_rotated(
            orig_weight,
            self.oft_blocks,
            alpha=self.alpha,
            stores_rotation=self.stores_rotation,
            rescale=self.rescale,
        )
        updown = (rotated - orig_weight.double()).to(orig_weight.dtype)
        return self.finalize_updown(updown, orig_weight, list(orig_weight.shape))


class NetworkModuleLokr(NetworkModuleLyco):
    def __init__(self, net: Network, weights: NetworkWeights) -> None:
        super().__init__(net, weights)
        w = weights.w
        self.w1, self.w1a, self.w1b = w.get("lokr_w1"), w.get("lokr_w1_a"), w.get("lokr_w1_b")
        self.dim = int(self.w1b.shape[0]) if self.w1b is not None else self.dim
        self.w2, self.w2a, self.w2b = w.get("lokr_w2"), w.get("lokr_w2_a"), w.get("lokr_w2_b")
        self.dim = int(self.w2b.shape[0]) if self.w2b is not None else self.dim
        self.t2 = w.get("lokr_t2")

    def calc_updown(self, orig_weight: torch.Tensor) -> tuple:
        w1 = self.w1 if self.w1 is not None else self.w1a @ self.w1b
        w2 = self.w2 if self.w2 is not None else self.w2a @ self.w2b
        output_shape = [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        if len(orig_weight.shape) == 4:
            output_shape = list(orig_weight.shape)
        if len(w2.shape) == 4:  # network_lokr.make_kron
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2.contiguous()).reshape(output_shape)
        return self.finalize_updown(updown, orig_weight, output_shape)


class NetworkModuleFull(NetworkModuleLyco):
    def __init__(self, net: Network, weights: NetworkWeights) -> None:
        super().__init__(net, weights)
        self.weight = weights.w["diff"]

    def calc_updown(self, orig_weight: torch.Tensor) -> tuple:
        return self.finalize_updown(self.weight.clone(), orig_weight, list(self.weight.shape))


def _module_type(w: Mapping[str, torch.Tensor]) -> type | None:
    """networks.module_types in the host's order: the first type whose create_module accepts the keys."""
    if all(part in w for part in ("lora_up.weight", "lora_down.weight")):
        return NetworkModuleLora
    if all(part in w for part in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        return NetworkModuleHada
    has_1 = "lokr_w1" in w or ("lokr_w1_a" in w and "lokr_w1_b" in w)
    has_2 = "lokr_w2" in w or ("lokr_w2_a" in w and "lokr_w2_b" in w)
    if has_1 and has_2:
        return NetworkModuleLokr
    if "diff" in w:
        return NetworkModuleFull
    if "oft_blocks" in w or "oft_diag" in w:  # network_oft.ModuleTypeOFT, last in the host's list
        return NetworkModuleOFT
    return None


class FakeNetworkModule(types.ModuleType):
    """What `sys.modules["network"]` holds: the classes other extensions subclass (K-LoRA's slots)."""

    def __init__(self) -> None:
        super().__init__("network", "Fake of extensions-builtin/Lora/network.py (A1111 v1.10.1)")
        self.Network = Network
        self.NetworkOnDisk = NetworkOnDisk
        self.NetworkWeights = NetworkWeights
        self.NetworkModuleLora = NetworkModuleLora


# ---------------------------------------------------------------- networks.py


def _layer_key(stem: str) -> str:
    """This fake's key mapper (the host's convert_diffusers_name_to_compvis + fallbacks, reduced)."""
    if stem.startswith("lora_unet_"):
        return "diffusion_model_" + stem[len("lora_unet_") :]
    if stem.startswith("lora_te_"):
        return "transformer_" + stem[len("lora_te_") :]
    return stem


class FakeNetworks(types.ModuleType):
    """What `sys.modules["networks"]` holds: registries, the loader and the weight patching functions."""

    def __init__(self, sd_model: nn.Module, lora_dir: Path) -> None:
        super().__init__("networks", "Fake of extensions-builtin/Lora/networks.py (A1111 v1.10.1)")
        self.sd_model = sd_model  # shared.sd_model
        self.lora_dir = Path(lora_dir)  # cmd_opts.lora_dir
        self.lora_functional = False  # shared.opts.lora_functional
        self.available_networks: dict[str, NetworkOnDisk] = {}
        self.available_network_aliases: dict[str, NetworkOnDisk] = {}
        self.forbidden_network_aliases: dict[str, int] = {}
        self.loaded_networks: list[Any] = []
        self.networks_in_memory: dict[str, Network] = {}
        self.errors: dict[str, int] = {}  # extra_network_lora.errors
        self.calc_updown_calls: list[tuple[str, str]] = []  # test instrumentation: (layer, net name)
        self.loads: list[str] = []  # test instrumentation: names given to load_network
        self.keys_failed_to_match: dict[str, str] = {}  # of the last load (the host logs them at debug level)
        self.list_available_networks()

    # ------------------------------------------------------------ registry

    def process_network_files(self, names: list[str] | None = None) -> None:
        for filename in sorted(self.lora_dir.rglob("*")):
            if filename.is_dir() or filename.suffix.lower() not in LORA_SUFFIXES:
                continue
            name = filename.stem
            if names and name not in names:
                continue
            entry = NetworkOnDisk(name, str(filename))
            self.available_networks[name] = entry
            if entry.alias in self.available_network_aliases:
                self.forbidden_network_aliases[entry.alias.lower()] = 1
            self.available_network_aliases[name] = entry
            self.available_network_aliases[entry.alias] = entry

    def update_available_networks_by_names(self, names: list[str]) -> None:
        self.process_network_files(names)

    def list_available_networks(self) -> None:
        self.available_networks.clear()
        self.available_network_aliases.clear()
        self.forbidden_network_aliases.clear()
        self.forbidden_network_aliases.update({"none": 1, "Addams": 1})
        self.lora_dir.mkdir(parents=True, exist_ok=True)
        self.process_network_files()

    # ------------------------------------------------------------ loading

    def load_network(self, name: str, network_on_disk: NetworkOnDisk) -> Network:
        self.loads.append(name)
        net = Network(name, network_on_disk)
        net.mtime = os.path.getmtime(network_on_disk.filename)
        if network_on_disk.is_safetensors:
            sd = load_file(network_on_disk.filename, device="cpu")
        else:
            sd = torch.load(network_on_disk.filename, map_location="cpu", weights_only=True)
        mapping = self.sd_model.network_layer_mapping
        matched: dict[str, NetworkWeights] = {}
        failed: dict[str, str] = {}
        for key_network, weight in sd.items():
            stem, _, part = key_network.partition(".")
            key = _layer_key(stem)
            sd_module = mapping.get(key)
            if sd_module is None:
                failed[key_network] = key
                continue
            if key not in matched:
                matched[key] = NetworkWeights(network_key=key_network, sd_key=key, w={}, sd_module=sd_module)
            matched[key].w[part] = weight
        for key, weights in matched.items():
            module_type = _module_type(weights.w)
            if module_type is None:
                raise AssertionError(
                    f"Could not find a module type that would accept those keys: {list(weights.w)}"
                )
            net.modules[key] = module_type(net, weights)
        self.keys_failed_to_match = failed
        return net

    def load_networks(
        self,
        names: list[str],
        te_multipliers: list[float] | None = None,
        unet_multipliers: list[float] | None = None,
        dyn_dims: list[int | None] | None = None,
    ) -> None:
        """What `<lora:...>` activation does: REPLACE the whole list (K-LoRA's slots go too)."""
        already_loaded = {net.name: net for net in self.loaded_networks if net.name in names}
        self.loaded_networks.clear()
        for i, name in enumerate(names):
            entry = self.available_network_aliases.get(name)
            if entry is None:
                continue
            net = already_loaded.get(name) or self.networks_in_memory.get(name)
            if net is None or os.path.getmtime(entry.filename) > (net.mtime or 0):
                net = self.load_network(name, entry)
                self.networks_in_memory[name] = net
            net.mentioned_name = name
            net.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
            net.unet_multiplier = unet_multipliers[i] if unet_multipliers else net.te_multiplier
            net.dyn_dim = dyn_dims[i] if dyn_dims else None
            self.loaded_networks.append(net)

    # ------------------------------------------------------------ weights

    def network_restore_weights_from_backup(self, module: nn.Module) -> None:
        weights_backup = getattr(module, "network_weights_backup", None)
        bias_backup = getattr(module, "network_bias_backup", None)
        if weights_backup is None and bias_backup is None:
            return
        with torch.no_grad():
            if weights_backup is not None:
                module.weight.copy_(weights_backup)
            if bias_backup is None:
                module.bias = None
            else:
                module.bias.copy_(bias_backup)

    def network_reset_cached_weight(self, module: nn.Module) -> None:
        module.network_current_names = ()
        module.network_weights_backup = None
        module.network_bias_backup = None

    def network_apply_weights(self, module: nn.Module) -> None:
        layer_name = getattr(module, "network_layer_name", None)
        if layer_name is None:
            return
        current_names = getattr(module, "network_current_names", ())
        wanted_names = tuple(
            (n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in self.loaded_networks
        )

        weights_backup = getattr(module, "network_weights_backup", None)
        if weights_backup is None and wanted_names != ():
            if current_names != ():  # the weight may hold a merge: backing it up now would be wrong
                raise RuntimeError(
                    f"{layer_name} - no backup weights found and current weights are not unchanged"
                )
            module.network_weights_backup = module.weight.detach().to("cpu", copy=True)

        bias_backup = getattr(module, "network_bias_backup", None)
        if bias_backup is None and wanted_names != ():
            bias = getattr(module, "bias", None)
            bias_backup = None if bias is None else bias.detach().to("cpu", copy=True)
            if bias_backup is not None and current_names != ():
                raise RuntimeError("no backup bias found and current bias are not unchanged")
            module.network_bias_backup = bias_backup

        if current_names != wanted_names:
            self.network_restore_weights_from_backup(module)
            for net in self.loaded_networks:
                net_module = net.modules.get(layer_name, None)
                if net_module is None:
                    continue
                try:
                    with torch.no_grad():
                        weight = module.weight
                        updown, ex_bias = net_module.calc_updown(weight)
                        self.calc_updown_calls.append((layer_name, net.name))
                        module.weight.copy_(
                            (weight.to(dtype=updown.dtype) + updown).to(dtype=module.weight.dtype)
                        )
                        if ex_bias is not None and module.bias is not None:
                            module.bias.copy_((module.bias + ex_bias).to(dtype=module.bias.dtype))
                except RuntimeError:
                    self.errors[net.name] = self.errors.get(net.name, 0) + 1
            module.network_current_names = wanted_names

    def network_forward(
        self,
        module: nn.Module,
        x: torch.Tensor,
        original_forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        if len(self.loaded_networks) == 0:  # host quirk (pitfall P4): returns before restoring
            return original_forward(module, x)
        self.network_restore_weights_from_backup(module)
        self.network_reset_cached_weight(module)
        y = original_forward(module, x)
        layer_name = getattr(module, "network_layer_name", None)
        for net in self.loaded_networks:
            net_module = net.modules.get(layer_name, None)
            if net_module is None:
                continue
            y = net_module.forward(x, y)
        return y

    def patched_forward(
        self,
        module: nn.Module,
        x: torch.Tensor,
        original_forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """`network_Linear_forward` / `network_Conv2d_forward`: the class-level patches of lora_patches.py."""
        if self.lora_functional:
            return self.network_forward(module, x, original_forward)
        self.network_apply_weights(module)
        return original_forward(module, x)


# ---------------------------------------------------------------- the model


class TinyModel(nn.Module):
    """Four UNet Linears, one 3x3 UNet Conv2d and one text-encoder Linear, named as A1111 names them."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.unet = nn.ModuleDict(
            {
                "a": nn.Linear(8, 16),
                "b": nn.Linear(16, 64),
                "c": nn.Conv2d(4, 4, 3, padding=1),
                "d": nn.Linear(64, 8),
                "e": nn.Linear(8, 8),
            }
        )
        self.text_encoder = nn.Linear(8, 16)
        self.requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)  # own generator: leave the global RNG alone
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        # assign_network_names_to_compvis_modules: the attribute on each layer plus the reverse mapping.
        self.network_layer_mapping: dict[str, nn.Module] = {}
        named = {f"diffusion_model_{k}": m for k, m in self.unet.items()} | {TE_LAYER: self.text_encoder}
        for name, module in named.items():
            module.network_layer_name = name
            self.network_layer_mapping[name] = module

    @staticmethod
    def _run(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # A call through nn.Module.__call__, as in the host: the class-level forward patch of the Lora
        # extension (see `installed`) runs, then any per-instance forward hooks.
        return layer(x)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self._run(self.unet["a"], x) + self._run(self.text_encoder, text))
        h = self._run(self.unet["b"], h).reshape(-1, 4, 4, 4)
        h = torch.tanh(self._run(self.unet["c"], h)).flatten(1)
        h = self._run(self.unet["d"], h)
        return self._run(self.unet["e"], h)

    def layer(self, name: str) -> nn.Module:
        return self.network_layer_mapping[name]


# ---------------------------------------------------------------- LoRA files


def layer_shape(model: TinyModel, name: str) -> tuple[int, ...]:
    return tuple(model.layer(name).weight.shape)


def write_kohya_lora(
    path: Path,
    model: TinyModel,
    layers: Mapping[str, float],
    *,
    rank: int,
    alpha: float,
    seed: int,
    metadata: dict[str, str] | None = None,
) -> Path:
    """A kohya LoRA over `layers` (A1111 layer name -> gain) of `model`, in float32 for exact comparisons.

    Linears come from `lib_klora.tools.synthetic.make_lora_tensors`; the 3x3 conv gets a kohya LoCon pair
    (down: rank x in x 3 x 3, up: out x rank x 1 x 1).
    """
    tensors: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(seed)
    for offset, (name, gain) in enumerate(layers.items()):
        shape = layer_shape(model, name)
        unet = name.startswith("diffusion_model_")
        path_part = name[len("diffusion_model_") :] if unet else TE_PATH
        if len(shape) == 2:
            part = make_lora_tensors(
                {path_part: (shape[0], shape[1])},
                rank,
                seed=seed * 100 + offset,
                alpha=alpha,
                layer_gain=lambda _p, g=gain: g,
                dtype=torch.float32,
            )
        else:
            out_ch, in_ch, kh, kw = shape
            stem = "lora_unet_" + path_part
            down = torch.randn(rank, in_ch, kh, kw, generator=generator) / math.sqrt(in_ch * kh * kw)
            up = torch.randn(out_ch, rank, 1, 1, generator=generator) * (gain / math.sqrt(rank))
            part = {
                f"{stem}.lora_down.weight": down,
                f"{stem}.lora_up.weight": up,
                f"{stem}.alpha": torch.tensor(float(alpha)),
            }
        if not unet:  # synthetic writes UNet stems; text-encoder stems are lora_te_*
            part = {k.replace("lora_unet_", "lora_te_", 1): v for k, v in part.items()}
        tensors.update(part)
    return write_lora(path, tensors, metadata)


# ---------------------------------------------------------------- install / remove


@contextmanager
def installed(model: TinyModel, lora_dir: Path) -> Iterator[FakeNetworks]:
    """Put fake `networks` / `network` modules into sys.modules; take them (and their caches) out again."""
    saved = {name: sys.modules.get(name) for name in ("networks", "network")}
    nets = FakeNetworks(model, lora_dir)
    network_module = FakeNetworkModule()
    sys.modules["networks"], sys.modules["network"] = nets, network_module
    # lora_patches.LoraPatches: the extension replaces Linear/Conv2d forwards and state-dict loads at class
    # level; loading a checkpoint into the model in place forgets the backups and the merged names.
    originals = {cls: (cls.forward, cls._load_from_state_dict) for cls in (nn.Linear, nn.Conv2d)}

    def patch(original: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
        def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return nets.patched_forward(module, x, original)

        return forward

    def patch_load(original: Callable[..., Any]) -> Callable[..., Any]:
        def load(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            nets.network_reset_cached_weight(module)
            return original(module, *args, **kwargs)

        return load

    for cls, (forward, load) in originals.items():
        cls.forward = patch(forward)  # type: ignore[method-assign]
        cls._load_from_state_dict = patch_load(load)  # type: ignore[method-assign]
    try:
        yield nets
    finally:
        for cls, (forward, load) in originals.items():
            cls.forward = forward  # type: ignore[method-assign]
            cls._load_from_state_dict = load  # type: ignore[method-assign]
        # The engine caches its slot class on the `network` module; it must not outlive this host.
        if hasattr(network_module, "_klora_slot_class"):
            delattr(network_module, "_klora_slot_class")
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
