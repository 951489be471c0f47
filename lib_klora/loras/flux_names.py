"""FLUX layer names of every trainer onto the BFL layout that kohya sd-scripts and Forge use.

kohya sd-scripts writes FLUX LoRAs with the model's own (BFL) names: one fused ``img_attn_qkv`` per double
block and one fused ``linear1`` (q, k, v and the MLP input) per single block. diffusers / ai-toolkit /
SimpleTuner files use diffusers' names with separate ``to_q``/``to_k``/``to_v``/``proj_mlp``; XLabs files
name their attention processors (``qkv_lora1`` = image qkv, ``proj_lora2`` = text projection, a single
block's ``qkv_lora`` = the first 3·hidden rows of ``linear1``). Forge maps all of them onto the BFL weights,
a split layer becoming row slices of the fused weight (q at 0, k at hidden, v at 2·hidden, the MLP input at
3·hidden); this module does the same, so a plan from any FLUX file names the layers Forge's hooks use and a
kohya file pairs with a diffusers one. FLUX.1's MLP ratio (4) fixes ``linear1``'s height at 7·hidden.
"""

from __future__ import annotations

import re

# (BFL layer, slot) where slot is the index of a hidden-sized row block, "mlp" (rows 3h..7h), "qkv" (rows
# 0..3h) or None (the whole layer). Paths are canonical (underscored) diffusers names within a block.
_DOUBLE = {
    "attn_to_q": ("img_attn_qkv", 0),
    "attn_to_k": ("img_attn_qkv", 1),
    "attn_to_v": ("img_attn_qkv", 2),
    "attn_add_q_proj": ("txt_attn_qkv", 0),
    "attn_add_k_proj": ("txt_attn_qkv", 1),
    "attn_add_v_proj": ("txt_attn_qkv", 2),
    "attn_to_out_0": ("img_attn_proj", None),
    "attn_to_add_out": ("txt_attn_proj", None),
    "ff_net_0_proj": ("img_mlp_0", None),
    "ff_net_2": ("img_mlp_2", None),
    "ff_context_net_0_proj": ("txt_mlp_0", None),
    "ff_context_net_2": ("txt_mlp_2", None),
    "norm1_linear": ("img_mod_lin", None),
    "norm1_context_linear": ("txt_mod_lin", None),
}
_SINGLE = {
    "attn_to_q": ("linear1", 0),
    "attn_to_k": ("linear1", 1),
    "attn_to_v": ("linear1", 2),
    "proj_mlp": ("linear1", "mlp"),
    "proj_out": ("linear2", None),
    "norm_linear": ("modulation_lin", None),
}
_XLABS_DOUBLE = {
    "processor_qkv_lora1": ("img_attn_qkv", None),
    "processor_proj_lora1": ("img_attn_proj", None),
    "processor_qkv_lora2": ("txt_attn_qkv", None),
    "processor_proj_lora2": ("txt_attn_proj", None),
}
_XLABS_SINGLE = {"processor_qkv_lora": ("linear1", "qkv"), "processor_proj_lora": ("linear2", None)}
_GLOBAL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed_timestep_embedder_linear_1": "time_in_in_layer",
    "time_text_embed_timestep_embedder_linear_2": "time_in_out_layer",
    "time_text_embed_text_embedder_linear_1": "vector_in_in_layer",
    "time_text_embed_text_embedder_linear_2": "vector_in_out_layer",
    "time_text_embed_guidance_embedder_linear_1": "guidance_in_in_layer",
    "time_text_embed_guidance_embedder_linear_2": "guidance_in_out_layer",
    "proj_out": "final_layer_linear",
    "norm_out_linear": "final_layer_adaLN_modulation_1",  # rows swapped (shift/scale): Top-K does not mind
}
_DIFFUSERS_BLOCK = re.compile(r"^transformer:(single_transformer_blocks|transformer_blocks)_(\d+)_(.+)$")
_XLABS_BLOCK = re.compile(r"^unet:(double_blocks|single_blocks)_(\d+)_(processor_.+)$")
FLUX_MLP_RATIO = 4

Slot = int | str | None


def bfl_name(canonical: str) -> tuple[str, Slot] | None:
    """The BFL layer (and row slot) a diffusers/XLabs FLUX layer adapts; None when already BFL or unknown."""
    m = _DIFFUSERS_BLOCK.match(canonical)
    if m:
        single = m.group(1) == "single_transformer_blocks"
        found = (_SINGLE if single else _DOUBLE).get(m.group(3))
        if found is None:
            return None
        prefix = f"unet:{'single' if single else 'double'}_blocks_{m.group(2)}_"
        return prefix + found[0], found[1]
    m = _XLABS_BLOCK.match(canonical)
    if m:
        found = (_XLABS_SINGLE if m.group(1) == "single_blocks" else _XLABS_DOUBLE).get(m.group(3))
        return None if found is None else (f"unet:{m.group(1)}_{m.group(2)}_{found[0]}", found[1])
    component, _, path = canonical.partition(":")
    if component == "transformer" and path in _GLOBAL:
        return f"unet:{_GLOBAL[path]}", None
    return None


def slot_rows(slot: Slot, hidden: int, layer: str) -> tuple[int, int, int]:
    """(first row, row count, the fused layer's height) of a slot, `hidden` being the layer's input size."""
    height = (3 + FLUX_MLP_RATIO) * hidden if layer.endswith("linear1") else 3 * hidden
    if slot == "mlp":
        return 3 * hidden, FLUX_MLP_RATIO * hidden, height
    if slot == "qkv":
        return 0, 3 * hidden, height
    assert isinstance(slot, int)
    return slot * hidden, hidden, height
