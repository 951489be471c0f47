"""A1111: K-LoRA's view of one built-in Lora `NetworkModule` on its layer — its rank bound (K), its ΔW for
scoring, and its delta on the layer's activations (method `dynamic`, switching layers).

Host-free: the module and layer objects are passed in; nothing here imports the WebUI.
"""

from __future__ import annotations

from typing import Any

import torch

from lib_klora.dynamic.branches import ConvSpec, DenseBranch, LowRankBranch, branch_dtype
from lib_klora.dynamic.hooks import Branch
from lib_klora.engines.job import JobError
from lib_klora.loras.oft import oft_rank
from lib_klora.loras.structured import full_rank, loha_rank, lokr_rank


def host_rank(module: Any, weight: torch.Tensor) -> int:
    """The rank bound K-LoRA uses as K for one A1111 NetworkModule, the file reader's definition
    (`loras/structured.py`, `loras/oft.py`): LoRA/LoCon/DoRA their rank, LoHa r1·r2, LoKr the product of its
    halves' ranks, full, OFT/BOFT (network_oft) and anything else without a rank min(out, in·kh·kw)."""
    out_features, in_size = int(weight.shape[0]), int(weight[0].numel())
    if hasattr(module, "w1") and hasattr(module, "w2"):  # network_lokr.NetworkModuleLokr
        return lokr_rank(module.w1, module.w1b, module.w2, module.w2b, out_features, in_size)
    if hasattr(module, "w1b") and hasattr(module, "w2b"):  # network_hada.NetworkModuleHada
        return loha_rank(module.w1b, module.w2b, out_features, in_size)
    if hasattr(module, "up_model") and getattr(module, "dim", None):
        return int(module.dim)
    if hasattr(module, "oft_blocks"):  # network_oft.NetworkModuleOFT: a rotation of W
        return oft_rank(out_features, in_size)
    return full_rank(out_features, in_size)


class HostDelta:
    """A `DeltaSource` over an A1111 NetworkModule: low-rank factors when plain LoRA, else calc_updown.

    A DoRA layer is scored by its low-rank update (its `factors`), as the file reader scores it; its exact,
    weight-dependent delta is what `branch_for` applies (`exact_low_rank` is False for it)."""

    def __init__(self, module: Any, layer: torch.nn.Module) -> None:
        self.module, self.layer, self.stem = module, layer, module.sd_key
        weight = layer.weight
        self.numel = int(weight.numel())
        self.rank = host_rank(module, weight)
        low_rank = (
            hasattr(module, "up_model")
            and getattr(module, "mid_model", None) is None
            and getattr(module.network, "dyn_dim", None) is None
        )
        self.exact_low_rank = low_rank and getattr(module, "dora_scale", None) is None
        if low_rank:
            self.factors = self._factors

    def _factors(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        up = self.module.up_model.weight.to(device=device, dtype=torch.float32)
        down = self.module.down_model.weight.to(device=device, dtype=torch.float32)
        up = up.reshape(up.shape[0], -1) * float(self.module.calc_scale())
        return up, down.reshape(down.shape[0], -1)

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        backup = getattr(self.layer, "network_weights_backup", None)
        weight = backup if isinstance(backup, torch.Tensor) else self.layer.weight
        updown, _ = self.module.calc_updown(weight.to(device))
        return updown.float().reshape(updown.shape[0], -1)


def branch_for(module: Any, layer: torch.nn.Module, strength: float) -> Branch:
    """The activation-side delta of one A1111 NetworkModule on `layer`, at `strength`.

    Plain LoRA (LoCon) stays low-rank; anything else (LoHa, LoKr, DoRA, CP cores) becomes a dense ΔW from the
    module's own calc_updown, computed once here."""
    if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
        raise JobError(
            f"K-LoRA: method 'dynamic' supports Linear and Conv2d layers, not {type(layer).__name__} "
            f"({getattr(layer, 'network_layer_name', '?')})"
        )
    conv = ConvSpec.of(layer) if isinstance(layer, torch.nn.Conv2d) else None
    dtype = branch_dtype(layer.weight)
    source = HostDelta(module, layer)
    with torch.no_grad():
        if source.exact_low_rank:
            up = module.up_model.weight.detach().to(dtype)
            down = module.down_model.weight.detach().to(dtype)
            return LowRankBranch(up, down, strength * float(module.calc_scale()), conv=conv)
        saved = module.network.unet_multiplier
        try:  # calc_updown applies the network's multiplier: compute at this job's strength
            module.network.unet_multiplier = strength
            weight = source.delta(layer.weight.device)
        finally:
            module.network.unet_multiplier = saved
        return DenseBranch(weight.to(dtype).reshape(layer.weight.shape), conv=conv)


def cached_low_rank_branch(net: Any, key: str, layer: torch.nn.Module, strength: float) -> Branch | None:
    """The activation-side delta of a plain LoRA/LoCon layer of `net`, or None for any other kind (whose
    activation form would be a dense ΔW: merging is cheaper). Kept on the privately loaded network, so the
    factors move to the layer's device once, not once per job."""
    module = net.modules.get(key)
    if module is None or not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
        return None
    if not HostDelta(module, layer).exact_low_rank:
        return None
    branches = net.__dict__.setdefault("_klora_branches", {})
    cache_key = (key, float(strength), layer.weight.dtype, layer.weight.device.type)
    branch = branches.get(cache_key)
    if branch is None:
        branch = branches[cache_key] = branch_for(module, layer, strength)
    return branch
