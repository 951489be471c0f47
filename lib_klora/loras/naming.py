"""Map LoRA tensor keys of every common file format onto one canonical layer name.

K-LoRA fuses two LoRAs layer by layer, and the two files are often written by different trainers
(kohya/A1111, old diffusers, PEFT). Pairing works on ``ParsedKey.canonical``:
``<component>:<path in diffusers naming, "." replaced by "_">`` with component one of
``unet``, ``te`` (single text encoder), ``te1``/``te2``/``te3`` (kohya SDXL/SD3/FLUX text encoders)
or ``transformer`` (diffusers DiT: FLUX/SD3).

Judgement calls, documented here because the caller relies on them:

* LDM/compvis UNet paths (``input_blocks_4_1_...``) become diffusers paths, so a kohya-SDXL file
  pairs with a diffusers-SDXL file. Anything unrecognised keeps its path unchanged; nothing raises.
  A kohya-style ``lora_<x>_`` key of an unknown network becomes ``other:<x>_...`` (never paired
  with a known component by accident).
* Native DiT names (``double_blocks``, ``single_blocks``, ``joint_blocks``) are always ``unet:``,
  whatever the wrapper, because that is how kohya writes them. Diffusers DiT names
  (``transformer_blocks``, ``single_transformer_blocks``) are always ``transformer:``. There is no
  BFL <-> diffusers conversion (their qkv layouts differ), so such pairs simply do not match.
* A dotted path with no component prefix (bare, or under PEFT's ``base_model.model.``) is a text
  encoder if it starts with ``text_model``, a transformer/unet by the rules above, else a UNet.
* Diffusers calls the first SDXL/SD3/FLUX text encoder ``text_encoder`` (parsed as ``te``) where
  kohya writes ``lora_te1_``; that cannot be told from one key, so :func:`align_text_encoder`
  fixes it once the architecture is known.
* PEFT's DoRA ``lora_magnitude_vector`` reports part ``"dora_scale"`` like kohya's DoRA tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ParsedKey", "align_text_encoder", "detect_base_architecture", "parse_lora_key"]


@dataclass(frozen=True)
class ParsedKey:
    """One tensor key of a LoRA file, split into its module and its tensor role."""

    stem: str  # module key exactly as written, everything before the tensor part
    canonical: str  # "<component>:<diffusers path with '_'>", shared by all formats
    part: str  # "down" | "up" | "mid" | "alpha" | raw suffix ("hada_w1_a", "diff", ...)
    format: str  # "kohya" | "diffusers" | "peft" | "xlabs"


# Tensor-part suffixes, tried in order; (pattern, part, format implied by the suffix or None).
_SUFFIXES: tuple[tuple[re.Pattern[str], str, str | None], ...] = tuple(
    (re.compile(pattern), part, fmt)
    for pattern, part, fmt in (
        (r"\.lora_A(?:\.[^.]+)?\.weight$", "down", "peft"),  # optional PEFT adapter name
        (r"\.lora_B(?:\.[^.]+)?\.weight$", "up", "peft"),
        (r"\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$", "dora_scale", "peft"),
        (r"\.(?:lora|lora_linear_layer)\.down\.weight$", "down", "diffusers"),
        (r"\.(?:lora|lora_linear_layer)\.up\.weight$", "up", "diffusers"),
        (r"(?<=_lora)\.down\.weight$", "down", "diffusers"),  # attn-processor form: to_q_lora.down
        (r"(?<=_lora)\.up\.weight$", "up", "diffusers"),
        (r"(?<=_lora[12])\.down\.weight$", "down", "xlabs"),  # XLabs FLUX: qkv_lora1.down, proj_lora2.up
        (r"(?<=_lora[12])\.up\.weight$", "up", "xlabs"),
        (r"\.lora_down\.weight$", "down", None),
        (r"\.lora_up\.weight$", "up", None),
        (r"\.lora_mid\.weight$", "mid", None),
        (r"\.alpha$", "alpha", None),
    )
)
# Anything else: the last segment, or "<algo>_x.<y>" so "lora_B.bias" / "lokr_w1.weight" stay whole.
_RAW_SUFFIX = re.compile(r"\.((?:lora|hada|lokr|oft|boft|dora)_[^.]*\.[^.]+|[^.]+)$")

_KOHYA_STEM = re.compile(r"^(?:lora_(unet|te[123]?|transformer)|(lycoris))_(.+)$")
_COMPONENT_SEGMENTS = {
    "unet": "unet",
    "transformer": "transformer",
    "diffusion_model": "unet",
    "text_encoder": "te",
    "text_encoder_2": "te2",
    "text_encoder_3": "te3",
}
_PROCESSOR = re.compile(r"(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora$")
_PROCESSOR_TARGET = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "te": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
_NATIVE_DIT_ROOT = re.compile(r"^(?:double_blocks|single_blocks|joint_blocks)_\d")
_DIFFUSERS_DIT_ROOT = re.compile(r"^(?:single_transformer_blocks|transformer_blocks)_\d")

# LDM/compvis -> diffusers UNet names (same layout for SD1/SD2/SDXL: 3 LDM blocks per level).
_LDM_FIXED = {
    "input_blocks_0_0": "conv_in",
    "out_0": "conv_norm_out",
    "out_2": "conv_out",
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "label_emb_0_0": "add_embedding_linear_1",
    "label_emb_0_2": "add_embedding_linear_2",
}
_LDM_RESNET_PARTS = {
    "in_layers_0": "norm1",
    "in_layers_2": "conv1",
    "out_layers_0": "norm2",
    "out_layers_3": "conv2",
    "emb_layers_1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_LDM_IN_OUT = re.compile(r"^(input|output)_blocks_(\d+)_(\d+)_(.+)$")
_LDM_MIDDLE = re.compile(r"^middle_block_(\d+)_(.+)$")
_LDM_ATTN_REST = re.compile(r"^(?:transformer_blocks_\d+_.+|proj_in|proj_out|norm)$")


def _split_tensor_part(key: str) -> tuple[str, str, str | None] | None:
    """(stem, part, format implied by the suffix) or None when the key has no tensor part."""
    for pattern, part, fmt in _SUFFIXES:
        m = pattern.search(key)
        if m and m.start() > 0:
            return key[: m.start()], part, fmt
    m = _RAW_SUFFIX.search(key)
    if m and m.start() > 0:
        return key[: m.start()], m.group(1), None
    return None


def _strip_wrappers(stem: str) -> tuple[str | None, str, bool]:
    """Peel component prefixes (also doubled ``unet.unet.``) and PEFT's ``base_model.model.``."""
    segs = stem.split(".")
    component: str | None = None
    peft_wrapped = False
    while len(segs) > 1:
        comp = _COMPONENT_SEGMENTS.get(segs[0])
        if comp is not None and component in (None, comp):
            component = comp
            del segs[0]
        elif segs[:2] == ["base_model", "model"] and len(segs) > 2:
            peft_wrapped = True
            del segs[:2]
        elif segs[:2] == ["model", "diffusion_model"]:
            del segs[0]
        else:
            break
    return component, ".".join(segs), peft_wrapped


def _ldm_to_diffusers(path: str) -> str:
    """Rename one LDM UNet path (underscored) to its diffusers path; unknown paths pass through."""
    if path in _LDM_FIXED:
        return _LDM_FIXED[path]
    m = _LDM_IN_OUT.match(path)
    if m:
        side, n, sub, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if side == "input":
            if n == 0:
                return path
            block, slot = f"down_blocks_{(n - 1) // 3}", (n - 1) % 3
            if sub == 0 and rest == "op":  # the 3rd LDM block of a level is its downsampler
                return f"{block}_downsamplers_0_conv"
        else:
            block, slot = f"up_blocks_{n // 3}", n % 3
            if sub in (1, 2) and rest == "conv":  # index 2 when the level also has attention
                return f"{block}_upsamplers_0_conv"
        if sub == 0 and rest in _LDM_RESNET_PARTS:
            return f"{block}_resnets_{slot}_{_LDM_RESNET_PARTS[rest]}"
        if sub == 1 and _LDM_ATTN_REST.match(rest):
            return f"{block}_attentions_{slot}_{rest}"
        return path
    m = _LDM_MIDDLE.match(path)
    if m:
        sub, rest = int(m.group(1)), m.group(2)
        if sub in (0, 2) and rest in _LDM_RESNET_PARTS:
            return f"mid_block_resnets_{sub // 2}_{_LDM_RESNET_PARTS[rest]}"
        if sub == 1 and _LDM_ATTN_REST.match(rest):
            return f"mid_block_attentions_0_{rest}"
    return path


def _canonical(component: str | None, path: str) -> str:
    """Resolve the component from the path where needed and build the canonical name."""
    if component in (None, "unet", "transformer"):
        if _NATIVE_DIT_ROOT.match(path):
            component = "unet"
        elif _DIFFUSERS_DIT_ROOT.match(path):
            component = "transformer"
        elif component is None:
            component = "te" if path.startswith("text_model_") else "unet"
    if component == "unet":
        path = _ldm_to_diffusers(path)
    return f"{component}:{path}"


def parse_lora_key(key: str) -> ParsedKey | None:
    """Parse one tensor key; None only for keys that do not belong to a module (never raises)."""
    if not isinstance(key, str) or key.startswith("bundle_emb."):  # bundled embeddings: no module
        return None
    split = _split_tensor_part(key)
    if split is None:
        return None
    stem, part, suffix_format = split

    kohya = _KOHYA_STEM.match(stem)
    if kohya and "." not in stem:  # "lora_transformer_" (OneTrainer); "lycoris_": the path tells (LyCORIS)
        return ParsedKey(stem, _canonical(kohya.group(1), kohya.group(3)), part, "kohya")
    if stem.startswith("lora_") and "." not in stem:  # kohya-style, unknown network: keep it whole
        return ParsedKey(stem, f"other:{stem[len('lora_') :]}", part, "kohya")

    component, path, peft_wrapped = _strip_wrappers(stem)
    proc = _PROCESSOR.search(path)
    if proc:  # old attention-processor keys name the LoRA after the projection it wraps
        is_te = component in ("te", "te1", "te2", "te3") or path.startswith("text_model.")
        targets = _PROCESSOR_TARGET["te" if is_te else "unet"]
        path = path[: proc.start()] + "." + targets[proc.group(1)]
    fmt = suffix_format or ("peft" if peft_wrapped else "diffusers")
    return ParsedKey(stem, _canonical(component, path.replace(".", "_")), part, fmt)


def align_text_encoder(canonical: str, arch: str | None) -> str:
    """Give diffusers text-encoder names the kohya numbering once the architecture is known.

    Diffusers' ``text_encoder`` is CLIP-L, which kohya calls ``te1`` on SDXL/SD3/FLUX; on FLUX
    diffusers' ``text_encoder_2`` is T5, which kohya calls ``te3``.
    """
    component, sep, path = canonical.partition(":")
    if not sep:
        return canonical
    if component == "te" and arch in ("sdxl", "sd3", "flux"):
        return f"te1:{path}"
    if component == "te2" and arch == "flux":
        return f"te3:{path}"
    return canonical


_META_ARCH: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(?:stable-diffusion-xl|sdxl)"), "sdxl"),
    (re.compile(r"^(?:stable-diffusion-3|sd3)"), "sd3"),
    (re.compile(r"^flux"), "flux"),
    (re.compile(r"^(?:stable-diffusion-v2|sd_v2|sd2)"), "sd2"),
    (re.compile(r"^(?:stable-diffusion-v1|sd_v1|sd1)"), "sd1"),
)
_CROSS_ATTN_KV = re.compile(r"^unet:.*_attn2_to_[kv]$")
_CROSS_ATTN_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_DIT_ATTN = re.compile(r"^transformer:transformer_blocks_\d+_attn_(?:to_[qkv]|add_[qkv]_proj)$")
_DIT_DIM = {3072: "flux", 1536: "sd3", 2432: "sd3"}  # FLUX.1; SD3/3.5-medium; SD3.5-large
_TE_ATTN = re.compile(r"^te:text_model_encoder_layers_\d+_self_attn_[qkv]_proj$")
_TE_DIM = {768: "sd1", 1024: "sd2"}  # CLIP-L vs OpenCLIP-H
_SDXL_ONLY = re.compile(r"^unet:(?:add_embedding_|.*_transformer_blocks_[1-9])")  # SD1/2: depth 1


def _arch_from_metadata(metadata: dict[str, str] | None) -> str | None:
    if not metadata:
        return None
    for field in ("modelspec.architecture", "ss_base_model_version"):
        value = str(metadata.get(field) or "").strip().lower()
        for pattern, arch in _META_ARCH:
            if value and pattern.match(value):
                return arch
    if str(metadata.get("ss_v2", "")).strip().lower() == "true":
        return "sd2"
    return None  # ss_v2 == "False" is also written for SDXL files, so it proves nothing


def _first_dim_match(features: dict[str, int], names: re.Pattern[str], dims: dict[int, str]) -> str | None:
    for name, dim in features.items():
        if names.match(name) and dim in dims:
            return dims[dim]
    return None


def detect_base_architecture(
    canonical_in_features: dict[str, int], metadata: dict[str, str] | None
) -> str | None:
    """Guess "sd1" | "sd2" | "sdxl" | "flux" | "sd3" from metadata, else from layer names/shapes.

    ``canonical_in_features`` maps canonical names to the in_features of their down projection.
    DiT names are checked before ``te1``/``te2`` because kohya's FLUX and SD3 files use
    ``lora_te1_`` too.
    """
    arch = _arch_from_metadata(metadata)
    if arch:
        return arch
    names = list(canonical_in_features)

    def any_name(pattern: str) -> bool:
        return any(re.match(pattern, name) for name in names)

    if any_name(r"unet:(?:double_blocks|single_blocks)_|transformer:single_transformer_blocks_"):
        return "flux"
    if any_name(r"unet:joint_blocks_|.*_context_block_"):
        return "sd3"
    dit = _first_dim_match(canonical_in_features, _DIT_ATTN, _DIT_DIM)
    if dit:
        return dit
    if any_name(r"te[12]:"):
        return "sdxl"
    cross = _first_dim_match(canonical_in_features, _CROSS_ATTN_KV, _CROSS_ATTN_DIM)
    if cross:
        return cross
    if any(_SDXL_ONLY.match(name) for name in names):
        return "sdxl"
    return _first_dim_match(canonical_in_features, _TE_ATTN, _TE_DIM)
