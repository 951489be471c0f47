"""Where a LoRA layer lands in a plain torch model: canonical layer names onto (module, output slice) targets.

The LoRA reader names every layer canonically (``<component>:<diffusers path, "." as "_">``, see
loras/naming.py). A diffusers model is a tree of ``nn.Module``s whose dotted paths are those diffusers
paths, so most names resolve by looking the underscored path up in the component's ``named_modules()``.
Two FLUX cases need more, as on Forge (engines/patcher.py handles the mirror image there):

* kohya/BFL FLUX names (``unet:double_blocks_3_img_attn_qkv``, ``unet:single_blocks_0_linear1``) adapt
  fused layers that diffusers keeps separate: the LoRA's up rows are split over ``to_q``/``to_k``/``to_v``
  (and ``proj_mlp`` for a single block's ``linear1``), one target per slice, all following one
  selection row;
* a diffusers model whose attention projections were fused (``fuse_qkv_projections()``: ``to_qkv``,
  ``to_kv``, ``to_added_qkv``) runs the fused layer, not ``to_q``: a LoRA of ``to_q`` becomes a slice of it.

Host-free and model-library-free: only ``torch.nn`` and names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from lib_klora.loras.oft import BaseWeights

# canonical component -> which of the caller's components holds it (first one present wins)
COMPONENT_ROOTS: dict[str, tuple[str, ...]] = {
    "unet": ("unet", "transformer"),  # kohya writes FLUX/SD3 DiT layers as lora_unet_
    "transformer": ("transformer", "unet"),
    "te": ("te", "te1"),
    "te1": ("te1", "te"),
    "te2": ("te2",),
    "te3": ("te3",),
}
TEXT_ENCODER_COMPONENTS = ("te", "te1", "te2", "te3")

_BFL_DOUBLE = re.compile(r"^double_blocks_(\d+)_(img|txt)_(attn_qkv|attn_proj|mlp_0|mlp_2|mod_lin)$")
_BFL_SINGLE = re.compile(r"^single_blocks_(\d+)_(linear1|linear2|modulation_lin)$")
_DOUBLE_PARTS = {
    ("img", "attn_qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("img", "attn_proj"): ("attn.to_out.0",),
    ("img", "mlp_0"): ("ff.net.0.proj",),
    ("img", "mlp_2"): ("ff.net.2",),
    ("img", "mod_lin"): ("norm1.linear",),
    ("txt", "attn_qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ("txt", "attn_proj"): ("attn.to_add_out",),
    ("txt", "mlp_0"): ("ff_context.net.0.proj",),
    ("txt", "mlp_2"): ("ff_context.net.2",),
    ("txt", "mod_lin"): ("norm1_context.linear",),
}
_SINGLE_PARTS = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
# fused projection -> the separate projections it replaces, in output order
_FUSED = (
    ("to_qkv", ("to_q", "to_k", "to_v")),
    ("to_kv", ("to_k", "to_v")),
    ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
)


@dataclass(frozen=True)
class Target:
    """One place a LoRA layer's delta goes: rows [lora_start, lora_start+size) of its up factor are added
    to output channels [start, start+size) of `module` (the whole output when size == out_features)."""

    name: str  # dotted module path, prefixed with the component: "unet:down_blocks.0....to_q"
    module: nn.Module
    start: int
    size: int
    lora_start: int
    out_features: int

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.size == self.out_features


def out_features(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if isinstance(module, (nn.Linear, nn.Conv2d)) and weight is not None:
        return int(weight.shape[0])
    return None


class ModuleIndex:
    """Looks up canonical layer names in a set of named components (``{"unet": unet, "te": encoder}``)."""

    def __init__(self, components: Mapping[str, nn.Module]) -> None:
        self.components = dict(components)
        self._by_path: dict[str, dict[str, tuple[str, nn.Module]]] = {}
        for component, root in self.components.items():
            table: dict[str, tuple[str, nn.Module]] = {}
            for path, module in root.named_modules():
                if path:
                    table.setdefault(path.replace(".", "_"), (path, module))
            self._by_path[component] = table

    def _root(self, component: str) -> str | None:
        for candidate in COMPONENT_ROOTS.get(component, (component,)):
            if candidate in self.components:
                return candidate
        return None

    def _find(self, root: str, dotted: str) -> tuple[str, nn.Module] | None:
        return self._by_path[root].get(dotted.replace(".", "_"))

    def module(self, canonical: str) -> nn.Module | None:
        """The Linear/Conv2d a canonical name names as it is (no FLUX split, no fused projection)."""
        component, sep, path = canonical.partition(":")
        root = self._root(component) if sep else None
        found = self._find(root, path) if root is not None else None
        return found[1] if found is not None and out_features(found[1]) is not None else None

    def resolve(self, canonical: str, lora_rows: int) -> list[Target] | None:
        """The targets of one LoRA layer with `lora_rows` output rows, or None when this model lacks it."""
        component, sep, path = canonical.partition(":")
        root = self._root(component) if sep else None
        if root is None:
            return None
        pieces = self._bfl_pieces(path)
        if pieces is None:
            found = self._find(root, path)
            if found is None:
                return None
            pieces = [found[0]]
        targets: list[Target] = []
        lora_start = 0
        for dotted in pieces:
            found = self._find(root, dotted)
            size = out_features(found[1]) if found is not None else None
            if found is None or size is None:
                return None
            targets.append(self._fused_target(root, found[0], found[1], size, lora_start))
            lora_start += size
        return targets if lora_start == lora_rows else None

    @staticmethod
    def _bfl_pieces(path: str) -> list[str] | None:
        """Diffusers module paths of a kohya/BFL FLUX layer, in the order of its output rows."""
        m = _BFL_DOUBLE.match(path)
        if m:
            block, stream, layer = m.groups()
            return [f"transformer_blocks.{block}.{p}" for p in _DOUBLE_PARTS[(stream, layer)]]
        m = _BFL_SINGLE.match(path)
        if m:
            block, layer = m.groups()
            return [f"single_transformer_blocks.{block}.{p}" for p in _SINGLE_PARTS[layer]]
        return None

    def _fused_target(self, root: str, path: str, module: nn.Module, size: int, lora_start: int) -> Target:
        """`path` itself, or its slice of the fused projection that runs instead of it."""
        parent_path, _, leaf = path.rpartition(".")
        parent = self.components[root].get_submodule(parent_path) if parent_path else None
        if parent is not None and getattr(parent, "fused_projections", False):
            for fused_name, parts in _FUSED:
                fused = getattr(parent, fused_name, None)
                fused_out = out_features(fused) if isinstance(fused, nn.Module) else None
                if leaf not in parts or fused_out is None:
                    continue
                start = 0
                for part in parts[: parts.index(leaf)]:
                    start += out_features(getattr(parent, part)) or 0
                dotted = f"{parent_path}.{fused_name}"
                return Target(f"{root}:{dotted}", fused, start, size, lora_start, fused_out)
        return Target(f"{root}:{path}", module, 0, size, lora_start, size)


def module_base_weights(components: Callable[[], Mapping[str, nn.Module]], identity: str) -> BaseWeights:
    """The weights of a torch model's layers for OFT/BOFT layers (`loras/oft.py`), looked up by canonical
    name. `components` is called on the first lookup only, so a model no OFT layer needs is never loaded.
    A layer the model keeps fused (`to_qkv`) has no weight of its own here: None."""
    index: list[ModuleIndex] = []

    def lookup(_path: Path, canonical: str, _stem: str) -> Tensor | None:
        if not index:
            index.append(ModuleIndex(components()))
        module = index[0].module(canonical)
        return None if module is None else module.weight.detach()

    return BaseWeights(lookup, identity)
